//! Configuration of `outpost-control serve`, checked once into [`ServeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use outpost_proto::limits::{TTL_MAX_SECS, TTL_MIN_SECS};

use crate::app::{ControlSettings, Followers};

#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// URL nodes use to reach control; defaults to the bound address.
    pub public_url: Option<String>,
    pub gateway_url: String,
    /// Extra names (DNS or IP) for the server certificate.
    pub sans: Vec<String>,
    pub node_ttl_secs: u32,
    pub cpu_overcommit_ratio: f64,
    pub projection_wait: Duration,
    pub plan_requests_max: usize,
    /// PostgreSQL connection string; the redb file in the data directory when absent.
    pub database_url: Option<String>,
    /// PostgreSQL schema holding the store's tables.
    pub database_schema: String,
    /// Whether control advertises itself over mDNS (`--advertise-mdns`).
    pub advertise: Advertise,
    /// Site join secret and leadership epoch (set by the agent that runs a self-elected control).
    pub site: crate::discovery::SiteSettings,
    /// The overlay network node addresses come from (`--overlay-cidr`).
    pub overlay: crate::overlay::OverlayConfig,
    /// Where the master key is (P11); `DATA_DIR/master.key` when absent.
    pub master_key: Option<crate::secret::MasterKeySource>,
    /// Largest artifact upload (`--artifact-max-bytes`).
    pub artifact_max_bytes: u64,
    /// Where artifact bytes live; `DATA_DIR/artifacts` when absent.
    pub artifact_store: Option<crate::artifact::BlobStoreConfig>,
    /// Where Prometheus metrics are served over plain HTTP (`--metrics-listen`); off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// The release public key (base64 ed25519, `--release-public-key FILE`) nodes pin (U2).
    pub release_public_key: Option<String>,
}

/// Whether control answers mDNS queries for `_outpost-control._tcp` (D2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertise {
    Off,
    Mdns,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason} (got {value:?})")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
    pub value: String,
}

fn invalid(field: &'static str, reason: impl Into<String>, value: impl ToString) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
        value: value.to_string(),
    }
}

/// The host part of an `https://HOST[:PORT][/...]` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next()?.to_string()
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .to_string()
    };
    (!host.is_empty()).then_some(host)
}

impl ServeConfig {
    /// A config with defaults for everything but where to keep data and where to listen.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            public_url: None,
            gateway_url: String::new(),
            sans: Vec::new(),
            node_ttl_secs: 30,
            cpu_overcommit_ratio: crate::scheduler::DEFAULT_CPU_OVERCOMMIT_RATIO,
            projection_wait: Duration::from_secs(5),
            plan_requests_max: 64,
            database_url: None,
            database_schema: "outpost".to_string(),
            advertise: Advertise::Off,
            site: crate::discovery::SiteSettings::default(),
            overlay: crate::overlay::OverlayConfig::default(),
            master_key: None,
            artifact_max_bytes: crate::artifact::DEFAULT_ARTIFACT_MAX_BYTES,
            artifact_store: None,
            metrics_listen: None,
            release_public_key: None,
        }
    }

    /// Where the master key is: the operator's choice, else `DATA_DIR/master.key`.
    pub fn master_key_source(&self) -> crate::secret::MasterKeySource {
        self.master_key
            .clone()
            .unwrap_or_else(|| crate::secret::MasterKeySource::default_file(&self.data_dir))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(TTL_MIN_SECS..=TTL_MAX_SECS).contains(&self.node_ttl_secs) {
            return Err(invalid(
                "node-ttl-secs",
                format!("must be between {TTL_MIN_SECS} and {TTL_MAX_SECS}"),
                self.node_ttl_secs,
            ));
        }
        if let Some(url) = &self.public_url
            && url_host(url).is_none()
        {
            return Err(invalid("public-url", "must be https://HOST[:PORT]", url));
        }
        if !(self.cpu_overcommit_ratio >= 1.0 && self.cpu_overcommit_ratio <= 64.0) {
            return Err(invalid(
                "cpu-overcommit-ratio",
                "must be between 1 and 64",
                self.cpu_overcommit_ratio,
            ));
        }
        for san in &self.sans {
            if san.is_empty()
                || san.len() > 253
                || (san.contains(['/', ' ', ':']) && san.parse::<std::net::IpAddr>().is_err())
            {
                return Err(invalid("san", "must be a DNS name or an IP address", san));
            }
        }
        if self.artifact_max_bytes == 0 {
            return Err(invalid("artifact-max-bytes", "must be at least 1", 0));
        }
        if self.plan_requests_max == 0 {
            return Err(invalid("plan-requests-max", "must be at least 1", 0));
        }
        Ok(())
    }

    /// Core settings once the bound URL is known.
    pub fn settings(&self, bound_url: &str) -> ControlSettings {
        ControlSettings {
            public_url: self
                .public_url
                .clone()
                .unwrap_or_else(|| bound_url.to_string()),
            gateway_url: self.gateway_url.clone(),
            node_ttl_secs: self.node_ttl_secs,
            cpu_overcommit_ratio: self.cpu_overcommit_ratio,
            projection_wait: self.projection_wait,
            plan_requests_max: self.plan_requests_max,
            liveness_interval: Duration::from_millis(u64::from(self.node_ttl_secs) * 1000 / 3)
                .min(Duration::from_secs(1)),
            followers: Followers::Automatic,
            site: self.site.clone(),
            overlay: self.overlay.clone(),
            // Loaded by `serve` from `master_key_source()`; empty until then.
            master_keys: crate::secret::MasterKeyring::new(Vec::new()),
            artifacts: crate::artifact::ArtifactConfig {
                store: self.artifact_store.clone().unwrap_or_else(|| {
                    crate::artifact::BlobStoreConfig::Directory(self.data_dir.join("artifacts"))
                }),
                max_bytes: self.artifact_max_bytes,
            },
            release_public_key: self.release_public_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://control.lan:7443").as_deref(),
            Some("control.lan")
        );
        assert_eq!(
            url_host("https://[fd00::1]:7443/x").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(url_host("https://10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(url_host("http://10.0.0.1"), None);
        assert_eq!(url_host("https://"), None);
    }

    #[test]
    fn bad_values_are_named() {
        let mut config = ServeConfig::new("/tmp/x".into(), "127.0.0.1:0".parse().unwrap());
        assert!(config.validate().is_ok());
        config.node_ttl_secs = 1;
        assert_eq!(config.validate().unwrap_err().field, "node-ttl-secs");
        config.node_ttl_secs = 30;
        config.public_url = Some("ftp://x".into());
        assert_eq!(config.validate().unwrap_err().field, "public-url");
        config.public_url = None;
        config.sans = vec!["bad name".into()];
        assert_eq!(config.validate().unwrap_err().field, "san");
    }
}
