//! Which adapter serves each port and which components concern this node, parsed once from an
//! environment map (C5, S2).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::diff::Component;

pub const MINIO_ENDPOINT: &str = "MINIO_ENDPOINT";
pub const MINIO_ACCESS_KEY: &str = "MINIO_ACCESS_KEY";
pub const MINIO_SECRET_KEY: &str = "MINIO_SECRET_KEY";
pub const MINIO_REGION: &str = "MINIO_REGION";
pub const AMQP_URL: &str = "AMQP_URL";
pub const WEAVIATE_URL: &str = "WEAVIATE_URL";
/// Comma-separated components this node applies (S2); default all: `storage,broker,index`.
pub const OUTPOST_PROFILE_COMPONENTS: &str = "OUTPOST_PROFILE_COMPONENTS";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{variable} is required when {because} is set")]
    Missing {
        variable: &'static str,
        because: &'static str,
    },
    #[error("invalid {variable}: {reason} (got {value:?})")]
    Invalid {
        variable: &'static str,
        reason: String,
        value: String,
    },
    #[error("{variable} is set but this agent was built without the {feature:?} feature")]
    FeatureMissing {
        variable: &'static str,
        feature: &'static str,
    },
}

#[derive(Clone, PartialEq, Eq)]
pub enum StorageAdapterConfig {
    Filesystem {
        root: PathBuf,
    },
    S3 {
        endpoint: String,
        access_key: String,
        secret_key: String,
        region: String,
    },
}

impl fmt::Debug for StorageAdapterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageAdapterConfig::Filesystem { root } => {
                f.debug_struct("Filesystem").field("root", root).finish()
            }
            StorageAdapterConfig::S3 {
                endpoint,
                access_key,
                region,
                ..
            } => f
                .debug_struct("S3")
                .field("endpoint", endpoint)
                .field("access_key", access_key)
                .field("secret_key", &"<redacted>")
                .field("region", region)
                .finish(),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum BusAdapterConfig {
    InProcess,
    Amqp { url: String },
}

impl fmt::Debug for BusAdapterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusAdapterConfig::InProcess => f.write_str("InProcess"),
            BusAdapterConfig::Amqp { url } => f
                .debug_struct("Amqp")
                .field("url", &redact_url(url))
                .finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexAdapterConfig {
    InMemory,
    Weaviate { url: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    pub storage: StorageAdapterConfig,
    pub bus: BusAdapterConfig,
    pub index: IndexAdapterConfig,
    /// The components that concern this node (S2).
    pub components: BTreeSet<Component>,
    /// `DATA_DIR/storage`: the default storage, and the source of fall-forward copies.
    pub local_storage_root: PathBuf,
}

/// A URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn non_empty<'a>(environment: &'a BTreeMap<String, String>, variable: &str) -> Option<&'a str> {
    environment
        .get(variable)
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
}

fn check_http_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    let valid = (value.starts_with("http://") || value.starts_with("https://"))
        && value.len() <= outpost_proto::limits::TEXT_MAX_BYTES
        && value
            .split("://")
            .nth(1)
            .is_some_and(|rest| !rest.is_empty());
    if valid {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err(ConfigError::Invalid {
            variable,
            reason: "must be an http:// or https:// URL".into(),
            value: value.to_string(),
        })
    }
}

impl AdapterConfig {
    /// Parses the adapter choice from `environment`; `data_dir` holds the default storage.
    pub fn from_environment(
        environment: &BTreeMap<String, String>,
        data_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let local_storage_root = data_dir.join("storage");
        let storage = match non_empty(environment, MINIO_ENDPOINT) {
            None => StorageAdapterConfig::Filesystem {
                root: local_storage_root.clone(),
            },
            Some(endpoint) => {
                if !cfg!(feature = "s3") {
                    return Err(ConfigError::FeatureMissing {
                        variable: MINIO_ENDPOINT,
                        feature: "s3",
                    });
                }
                let endpoint = check_http_url(MINIO_ENDPOINT, endpoint)?;
                let access_key =
                    non_empty(environment, MINIO_ACCESS_KEY).ok_or(ConfigError::Missing {
                        variable: MINIO_ACCESS_KEY,
                        because: MINIO_ENDPOINT,
                    })?;
                let secret_key =
                    non_empty(environment, MINIO_SECRET_KEY).ok_or(ConfigError::Missing {
                        variable: MINIO_SECRET_KEY,
                        because: MINIO_ENDPOINT,
                    })?;
                let region = non_empty(environment, MINIO_REGION).unwrap_or("us-east-1");
                StorageAdapterConfig::S3 {
                    endpoint,
                    access_key: access_key.to_string(),
                    secret_key: secret_key.to_string(),
                    region: region.to_string(),
                }
            }
        };
        let bus = match non_empty(environment, AMQP_URL) {
            None => BusAdapterConfig::InProcess,
            Some(url) => {
                if !cfg!(feature = "amqp") {
                    return Err(ConfigError::FeatureMissing {
                        variable: AMQP_URL,
                        feature: "amqp",
                    });
                }
                if !url.starts_with("amqp://") {
                    return Err(ConfigError::Invalid {
                        variable: AMQP_URL,
                        reason: "must be an amqp:// URL (amqps is not supported)".into(),
                        value: redact_url(url),
                    });
                }
                BusAdapterConfig::Amqp {
                    url: url.to_string(),
                }
            }
        };
        let index = match non_empty(environment, WEAVIATE_URL) {
            None => IndexAdapterConfig::InMemory,
            Some(url) => {
                if !cfg!(feature = "weaviate") {
                    return Err(ConfigError::FeatureMissing {
                        variable: WEAVIATE_URL,
                        feature: "weaviate",
                    });
                }
                IndexAdapterConfig::Weaviate {
                    url: check_http_url(WEAVIATE_URL, url)?,
                }
            }
        };
        let components = match non_empty(environment, OUTPOST_PROFILE_COMPONENTS) {
            None => Component::ORDER.into_iter().collect(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| {
                    Component::parse(item).ok_or_else(|| ConfigError::Invalid {
                        variable: OUTPOST_PROFILE_COMPONENTS,
                        reason: format!(
                            "unknown component {item:?}; known: storage, broker, index"
                        ),
                        value: list.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            storage,
            bus,
            index,
            components,
            local_storage_root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_set_means_default_adapters_and_every_component() {
        let config = AdapterConfig::from_environment(&map(&[]), Path::new("/data")).unwrap();
        assert_eq!(
            config.storage,
            StorageAdapterConfig::Filesystem {
                root: "/data/storage".into()
            }
        );
        assert_eq!(config.bus, BusAdapterConfig::InProcess);
        assert_eq!(config.index, IndexAdapterConfig::InMemory);
        assert_eq!(config.components.len(), 3);
    }

    #[test]
    fn components_are_checked_by_name() {
        let config = AdapterConfig::from_environment(
            &map(&[(OUTPOST_PROFILE_COMPONENTS, "broker, index")]),
            Path::new("/d"),
        )
        .unwrap();
        assert_eq!(
            config.components,
            BTreeSet::from([Component::Broker, Component::Index])
        );
        let error = AdapterConfig::from_environment(
            &map(&[(OUTPOST_PROFILE_COMPONENTS, "disk")]),
            Path::new("/d"),
        )
        .unwrap_err();
        assert!(error.to_string().contains("\"disk\""), "{error}");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn minio_needs_credentials_and_hides_the_secret() {
        let error = AdapterConfig::from_environment(
            &map(&[(MINIO_ENDPOINT, "http://10.0.0.1:9000")]),
            Path::new("/d"),
        )
        .unwrap_err();
        assert_eq!(
            error,
            ConfigError::Missing {
                variable: MINIO_ACCESS_KEY,
                because: MINIO_ENDPOINT
            }
        );
        let config = AdapterConfig::from_environment(
            &map(&[
                (MINIO_ENDPOINT, "http://m:9000/"),
                (MINIO_ACCESS_KEY, "ak"),
                (MINIO_SECRET_KEY, "sekrit"),
            ]),
            Path::new("/d"),
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("sekrit"));
    }

    #[test]
    fn urls_are_checked_and_passwords_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        let error =
            AdapterConfig::from_environment(&map(&[(WEAVIATE_URL, "ftp://x")]), Path::new("/d"))
                .unwrap_err();
        assert!(matches!(
            error,
            ConfigError::Invalid {
                variable: WEAVIATE_URL,
                ..
            } | ConfigError::FeatureMissing {
                variable: WEAVIATE_URL,
                ..
            }
        ));
    }
}
