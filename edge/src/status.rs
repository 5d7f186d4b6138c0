//! What the edge is doing, for people: `status.json` in the data dir, rewritten atomically by the
//! running edge when something changes, and `outpost-edge status --data-dir DIR`, which works
//! with the edge stopped and control down (it reads that file and the cached route copies, never
//! the redb file a running edge holds). No secret is ever written here.

use std::path::Path;

use outpost_proto::route::EdgeTable;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cache::{BootSource, LAST_GOOD_FILE_NAME, PREVIOUS_FILE_NAME, unseal, write_atomically};

pub const STATUS_FILE_NAME: &str = "status.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub route: String,
    pub address: String,
    pub ready: bool,
    pub healthy: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EdgeStatus {
    pub pid: u32,
    pub edge_id: Option<String>,
    pub org: Option<String>,
    pub control_url: Option<String>,
    pub boot_source: Option<BootSource>,
    /// Why boot skipped a source (corrupt store, damaged copy), in plain words.
    pub boot_notes: Vec<String>,
    pub cursor: String,
    pub route_count: usize,
    pub routes: Vec<String>,
    /// Why the last table from control was refused; the table before it keeps serving.
    pub refused: Option<String>,
    pub last_sync_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub http_listen: Option<String>,
    pub https_listen: Option<String>,
    pub tcp_ports: Vec<u16>,
    pub backends: Vec<BackendStatus>,
    /// Terminating routes whose certificate could not be opened, and why (never a value).
    #[serde(default)]
    pub tls_problems: Vec<String>,
    /// The TLS secrets the edge holds (sealed; `NAME@vVERSION`), only those a route references.
    #[serde(default)]
    pub tls_secrets: Vec<String>,
}

pub fn write(dir: &Path, status: &EdgeStatus) {
    let bytes = serde_json::to_vec_pretty(status).unwrap_or_default();
    if let Err(error) = write_atomically(&dir.join(STATUS_FILE_NAME), &bytes, 0o644) {
        tracing::warn!(
            component = "status",
            action = "write",
            "cannot write the status file: {error}"
        );
    }
}

fn read_copy(dir: &Path, file: &str) -> Option<EdgeTable> {
    let sealed = std::fs::read(dir.join(file)).ok()?;
    serde_json::from_slice(unseal(&sealed).ok()?).ok()
}

/// The offline report: the last status the edge wrote and what its cache would boot.
pub fn offline_report(dir: &Path) -> Value {
    let status: Option<EdgeStatus> = std::fs::read(dir.join(STATUS_FILE_NAME))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let running = status
        .as_ref()
        .is_some_and(|s| Path::new(&format!("/proc/{}", s.pid)).exists() && s.pid != 0);
    let cached = read_copy(dir, LAST_GOOD_FILE_NAME)
        .map(|t| (t, "last-good"))
        .or_else(|| read_copy(dir, PREVIOUS_FILE_NAME).map(|t| (t, "previous")));
    let cache = match cached {
        Some((table, copy)) => json!({
            "copy": copy,
            "cursor": table.as_of.to_string(),
            "route_count": table.routes.len(),
            "routes": table.routes.keys().collect::<Vec<_>>(),
        }),
        None => json!(null),
    };
    json!({
        "data_dir": dir.display().to_string(),
        "running": running,
        "status": status,
        "cache": cache,
    })
}
