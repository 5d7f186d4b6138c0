//! Finding the control service (D2): an mDNS-advertised control this node trusts (`mdns`
//! browses, `advert` decides trust and picks one), else the configured control URL, else the URL
//! registered with before or the enrollment token's; with none, the site thread (`election`)
//! self-elects. `pacing` says when to look again; the settings of discovery and leadership are
//! `config::site`.

pub mod advert;
pub mod mdns;
pub mod pacing;

pub use crate::config::site::SiteConfig;

/// Where the control URL came from, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSource {
    Configured,
    Registered,
    EnrollmentToken,
}

impl ControlSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlSource::Configured => "configured",
            ControlSource::Registered => "registered before",
            ControlSource::EnrollmentToken => "enrollment token",
        }
    }
}

/// The control URL to use, first match wins.
pub fn control_url(
    configured: Option<&str>,
    registered: Option<&str>,
    token: Option<&str>,
) -> Option<(String, ControlSource)> {
    let usable = |url: Option<&str>| {
        url.map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
    };
    usable(configured)
        .map(|u| (u, ControlSource::Configured))
        .or_else(|| usable(registered).map(|u| (u, ControlSource::Registered)))
        .or_else(|| usable(token).map(|u| (u, ControlSource::EnrollmentToken)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn configured_then_registered_then_token() {
        assert_eq!(
            control_url(Some("https://a"), Some("https://b"), Some("https://c"))
                .unwrap()
                .1,
            ControlSource::Configured
        );
        assert_eq!(
            control_url(None, Some("https://b"), Some("https://c"))
                .unwrap()
                .0,
            "https://b"
        );
        assert_eq!(
            control_url(Some(" "), None, Some("https://c")).unwrap().1,
            ControlSource::EnrollmentToken
        );
        assert_eq!(control_url(None, None, Some("")), None);
    }
}
