//! Artifacts on control (R1): the index of what each org pushed (a projection of
//! `ArtifactStored` / `ArtifactRemoved`), the blob-store configuration, and the HTTP handlers
//! that stream uploads in and downloads out (`http.rs`). The bytes live behind the
//! [`blob::BlobStore`] port; the log records only hashes, sizes and names.

pub mod blob;
pub mod command;
pub mod http;
pub mod range;
pub mod s3;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use outpost_proto::artifact::ArtifactInfo;
use serde::{Deserialize, Serialize};

use crate::log::Event;

/// The log aggregate of an artifact's events (also the conflict key of a service definition
/// that references it).
pub fn artifact_aggregate(sha256: &str) -> String {
    format!("artifact/{sha256}")
}

/// Default `--artifact-max-bytes`: 1 GiB.
pub const DEFAULT_ARTIFACT_MAX_BYTES: u64 = 1 << 30;

/// Where control keeps artifact bytes, and the largest upload it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactConfig {
    pub store: BlobStoreConfig,
    pub max_bytes: u64,
}

impl Default for ArtifactConfig {
    fn default() -> Self {
        Self {
            store: BlobStoreConfig::Unconfigured,
            max_bytes: DEFAULT_ARTIFACT_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BlobStoreConfig {
    /// No blob store (an in-process core built without one): artifact routes answer 503.
    Unconfigured,
    /// A directory, by default `DATA_DIR/artifacts`.
    Directory(PathBuf),
    /// A bucket of an S3 or MinIO server (`--artifact-store s3://…`), for several replicas.
    S3(s3::S3Config),
}

impl BlobStoreConfig {
    /// `--artifact-store`: `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]` (credentials from
    /// `env`), or a directory.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        if text.starts_with("s3:") {
            return s3::S3Config::parse(text, env).map(Self::S3);
        }
        if text.is_empty() || text.contains("://") {
            return Err("must be a directory or s3://BUCKET[/PREFIX]?endpoint=URL".into());
        }
        Ok(Self::Directory(PathBuf::from(text)))
    }
}

impl ArtifactConfig {
    /// The configured blob store, or `None` when there is none.
    pub fn blob_store(&self) -> Option<Arc<dyn blob::BlobStore>> {
        match &self.store {
            BlobStoreConfig::Unconfigured => None,
            BlobStoreConfig::Directory(root) => {
                Some(Arc::new(blob::DirBlobStore::new(root.clone())))
            }
            // The endpoint was checked when the setting was parsed.
            BlobStoreConfig::S3(config) => s3::S3BlobStore::new(config)
                .ok()
                .map(|store| Arc::new(store) as Arc<dyn blob::BlobStore>),
        }
    }
}

/// One org's hold on an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactHolding {
    pub name: String,
    pub stored_at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub size_bytes: u64,
    /// Orgs that pushed these bytes, with the name each gave them.
    pub holders: BTreeMap<String, ArtifactHolding>,
}

/// Every stored artifact by sha256 (a part of the views).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArtifactIndex {
    pub artifacts: BTreeMap<String, ArtifactRecord>,
}

impl ArtifactIndex {
    /// Folds an artifact event into the index; other events change nothing.
    pub fn apply(&mut self, event: &Event, at_unix_ms: u64) {
        match event {
            Event::ArtifactStored {
                org,
                sha256,
                size_bytes,
                name,
            } => {
                let record =
                    self.artifacts
                        .entry(sha256.clone())
                        .or_insert_with(|| ArtifactRecord {
                            size_bytes: *size_bytes,
                            holders: BTreeMap::new(),
                        });
                record.holders.insert(
                    org.clone(),
                    ArtifactHolding {
                        name: name.clone(),
                        stored_at_unix_ms: at_unix_ms,
                    },
                );
            }
            Event::ArtifactRemoved { org, sha256 } => {
                if let Some(record) = self.artifacts.get_mut(sha256) {
                    record.holders.remove(org);
                    if record.holders.is_empty() {
                        self.artifacts.remove(sha256);
                    }
                }
            }
            _ => {}
        }
    }

    /// The artifact as `org` sees it, if `org` pushed it.
    pub fn held_by(&self, org: &str, sha256: &str) -> Option<ArtifactInfo> {
        let record = self.artifacts.get(sha256)?;
        let holding = record.holders.get(org)?;
        Some(ArtifactInfo {
            sha256: sha256.to_string(),
            size_bytes: record.size_bytes,
            name: holding.name.clone(),
            stored_at_unix_ms: holding.stored_at_unix_ms,
        })
    }

    /// Whether any org still holds the bytes (the blob must stay).
    pub fn is_held(&self, sha256: &str) -> bool {
        self.artifacts.contains_key(sha256)
    }

    /// Everything `org` pushed, by sha256.
    pub fn list(&self, org: &str) -> Vec<ArtifactInfo> {
        self.artifacts
            .keys()
            .filter_map(|sha256| self.held_by(org, sha256))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(org: &str, sha: &str, name: &str) -> Event {
        Event::ArtifactStored {
            org: org.into(),
            sha256: sha.into(),
            size_bytes: 3,
            name: name.into(),
        }
    }

    #[test]
    fn orgs_hold_artifacts_separately() {
        let mut index = ArtifactIndex::default();
        index.apply(&stored("a", "s1", "app"), 5);
        index.apply(&stored("b", "s1", "same-bytes"), 6);
        assert_eq!(index.held_by("a", "s1").unwrap().name, "app");
        assert_eq!(index.list("b").len(), 1);
        index.apply(
            &Event::ArtifactRemoved {
                org: "a".into(),
                sha256: "s1".into(),
            },
            7,
        );
        assert!(index.held_by("a", "s1").is_none());
        assert!(index.is_held("s1"), "org b still holds the bytes");
        index.apply(
            &Event::ArtifactRemoved {
                org: "b".into(),
                sha256: "s1".into(),
            },
            8,
        );
        assert!(!index.is_held("s1"));
    }
}
