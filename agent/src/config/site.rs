//! Settings of discovery and leadership (D2, D6, D7), parsed from the agent's settings map.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::config::{ConfigError, Settings};

pub const KEY_JOIN_SECRET: &str = "join_secret";
pub const KEY_MAY_LEAD: &str = "may_lead";
pub const KEY_DISCOVERY: &str = "discovery";
pub const KEY_LEASE_TTL_SECS: &str = "lease_ttl_secs";
pub const KEY_CONTROL_PROGRAM: &str = "control_program";
pub const KEY_CONTROL_PORT: &str = "control_port";
pub const KEY_ELECTION_PORT: &str = "election_port";
pub const KEY_ADVERTISE_IP: &str = "advertise_ip";

/// Every key of this module, for the agent's list of known settings.
pub const SITE_KEYS: &[&str] = &[
    KEY_JOIN_SECRET,
    KEY_MAY_LEAD,
    KEY_DISCOVERY,
    KEY_LEASE_TTL_SECS,
    KEY_CONTROL_PROGRAM,
    KEY_CONTROL_PORT,
    KEY_ELECTION_PORT,
    KEY_ADVERTISE_IP,
];

/// Command-line flags of this module and their keys.
pub const SITE_FLAGS: &[(&str, &str)] = &[
    ("--join-secret", KEY_JOIN_SECRET),
    ("--may-lead", KEY_MAY_LEAD),
    ("--discovery", KEY_DISCOVERY),
    ("--lease-ttl-secs", KEY_LEASE_TTL_SECS),
    ("--control-program", KEY_CONTROL_PROGRAM),
    ("--control-port", KEY_CONTROL_PORT),
    ("--election-port", KEY_ELECTION_PORT),
    ("--advertise-ip", KEY_ADVERTISE_IP),
];

pub const DEFAULT_LEASE_TTL_SECS: u64 = 15;
pub const DEFAULT_CONTROL_PORT: u16 = 7443;
pub const DEFAULT_ELECTION_PORT: u16 = 7446;

/// Whether the agent browses mDNS for control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryMode {
    /// Browse (and elect) only when the node is a site member (has a join secret); a node
    /// started with nothing, or pointed at a control by URL or token, stays off the LAN's
    /// multicast.
    Auto,
    Mdns,
    Off,
}

/// Whether this node may become leader when it finds no control (D6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    MayLead,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    pub join_secret: Option<String>,
    pub leadership: Leadership,
    pub discovery: DiscoveryMode,
    pub lease_ttl_secs: u64,
    /// The `outpost-control` to run when leader; default: next to this executable.
    pub control_program: Option<PathBuf>,
    pub control_port: u16,
    pub election_port: u16,
    /// The address to advertise when leader; default: the first non-loopback IPv4 address.
    pub advertise_ip: Option<Ipv4Addr>,
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            join_secret: None,
            leadership: Leadership::MayLead,
            discovery: DiscoveryMode::Auto,
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            control_program: None,
            control_port: DEFAULT_CONTROL_PORT,
            election_port: DEFAULT_ELECTION_PORT,
            advertise_ip: None,
        }
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl SiteConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let get = |key: &str| {
            settings
                .get(key)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let join_secret = match get(KEY_JOIN_SECRET) {
            Some(secret) if secret.len() < 16 => {
                return Err(invalid(
                    KEY_JOIN_SECRET,
                    "(hidden)",
                    &format!("is {} characters; use at least 16", secret.len()),
                ));
            }
            other => other.map(str::to_string),
        };
        let leadership = match get(KEY_MAY_LEAD) {
            None | Some("yes" | "true" | "on" | "1") => Leadership::MayLead,
            Some("no" | "false" | "off" | "0") => Leadership::Never,
            Some(other) => return Err(invalid(KEY_MAY_LEAD, other, "expected yes or no")),
        };
        let discovery = match get(KEY_DISCOVERY) {
            None | Some("auto") => DiscoveryMode::Auto,
            Some("mdns") => DiscoveryMode::Mdns,
            Some("off") => DiscoveryMode::Off,
            Some(other) => return Err(invalid(KEY_DISCOVERY, other, "expected auto, mdns or off")),
        };
        let number = |key: &str, default: u64, min: u64, max: u64| match get(key) {
            None => Ok(default),
            Some(text) => match text.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(invalid(
                    key,
                    text,
                    &format!("expected a whole number between {min} and {max}"),
                )),
            },
        };
        let port = |key: &str, default: u16| {
            number(key, u64::from(default), 1, 65535).map(|n| u16::try_from(n).unwrap_or(default))
        };
        let advertise_ip = get(KEY_ADVERTISE_IP)
            .map(|text| {
                text.parse()
                    .map_err(|_| invalid(KEY_ADVERTISE_IP, text, "expected an IPv4 address"))
            })
            .transpose()?;
        Ok(Self {
            join_secret,
            leadership,
            discovery,
            lease_ttl_secs: number(KEY_LEASE_TTL_SECS, DEFAULT_LEASE_TTL_SECS, 3, 3600)?,
            control_program: get(KEY_CONTROL_PROGRAM).map(PathBuf::from),
            control_port: port(KEY_CONTROL_PORT, DEFAULT_CONTROL_PORT)?,
            election_port: port(KEY_ELECTION_PORT, DEFAULT_ELECTION_PORT)?,
            advertise_ip,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_values() {
        let config = SiteConfig::from_settings(&map(&[])).unwrap();
        assert_eq!(config, SiteConfig::default());
        let config = SiteConfig::from_settings(&map(&[
            ("join_secret", "0123456789abcdef"),
            ("may_lead", "no"),
            ("discovery", "mdns"),
            ("lease_ttl_secs", "6"),
            ("advertise_ip", "10.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(config.leadership, Leadership::Never);
        assert_eq!(config.discovery, DiscoveryMode::Mdns);
        assert_eq!(config.lease_ttl_secs, 6);
        assert_eq!(config.advertise_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn bad_values_are_named_and_secrets_hidden() {
        let short = SiteConfig::from_settings(&map(&[("join_secret", "short")])).unwrap_err();
        assert!(!short.to_string().contains("short\""), "{short}");
        assert!(short.to_string().contains("join_secret"));
        let lead = SiteConfig::from_settings(&map(&[("may_lead", "maybe")])).unwrap_err();
        assert!(lead.to_string().contains("\"maybe\""));
        let ttl = SiteConfig::from_settings(&map(&[("lease_ttl_secs", "1")])).unwrap_err();
        assert!(ttl.to_string().contains("lease_ttl_secs"));
    }
}
