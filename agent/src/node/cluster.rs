//! `DIR/cluster.json` (D4): what this node is in the cluster, rewritten when it changes.

use std::path::{Path, PathBuf};

use outpost_proto::node::{RegisterResponse, Role};
use serde::{Deserialize, Serialize};

pub const CLUSTER_FILE_NAME: &str = "cluster.json";

/// `DIR/cluster.json`: what this node is in the cluster (D4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub role: Role,
    pub node_id: String,
    pub control_url: String,
    pub gateway_url: String,
    pub ttl_secs: u32,
    pub epoch: u64,
}

impl ClusterFile {
    pub fn from_registration(response: &RegisterResponse) -> Self {
        Self {
            role: response.role,
            node_id: response.node_id.to_string(),
            control_url: response.control_url.clone(),
            gateway_url: response.gateway_url.clone(),
            ttl_secs: response.ttl_secs,
            epoch: response.epoch,
        }
    }
}

pub fn cluster_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CLUSTER_FILE_NAME)
}

/// Writes cluster.json atomically.
pub fn write_cluster_file(data_dir: &Path, cluster: &ClusterFile) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(cluster).unwrap_or_default();
    bytes.push(b'\n');
    crate::os::atomic_write(&cluster_path(data_dir), &bytes)
}

/// The cluster.json a previous run left, if it is readable.
pub fn read_cluster_file(data_dir: &Path) -> Option<ClusterFile> {
    let bytes = std::fs::read(cluster_path(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterFile {
            role: Role::Worker,
            node_id: "n1".into(),
            control_url: "https://c".into(),
            gateway_url: "https://g".into(),
            ttl_secs: 30,
            epoch: 2,
        };
        write_cluster_file(dir.path(), &cluster).unwrap();
        let text = std::fs::read_to_string(cluster_path(dir.path())).unwrap();
        assert!(text.contains("\"role\": \"worker\""), "{text}");
        assert_eq!(read_cluster_file(dir.path()), Some(cluster));
    }
}
