//! What the agent reports about itself: the status snapshot (shared by the running agent's
//! threads, written to `DIR/status.json`, served on the local HTTP port), the offline reader
//! behind `outpost-agent status`, and the text rendering.
//!
//! Snapshot file choice: the running agent holds redb's exclusive lock, so `outpost-agent status`
//! cannot read the store while it runs. The agent therefore rewrites `DIR/status.json` atomically
//! whenever the status changes (checked every supervisor tick, 250 ms); nothing is written while
//! nothing changes, which spares flash storage. With the agent stopped, `status` reads the store
//! read-only (or the last-good copy) instead, so it never shows a stale snapshot as live.

pub mod http;
pub mod metrics;
pub mod offline;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use outpost_proto::node::Role;

use crate::apply::process::{AllocationReport, Drift};
use crate::store::ComponentApply;

pub const STATUS_FILE_NAME: &str = "status.json";
pub const STATUS_ADDR_FILE_NAME: &str = "status.addr";
/// The status note of a revoked node (P9): what keeps running and what an operator can do.
/// Revocation cuts the node off from new plans; it does not stop the last-good plan's
/// workloads (P10: with no word from control they go on), because stopping an edge box's
/// workloads is a destructive step the operator takes explicitly.
pub const REVOKED_NOTE: &str = "revoked by control: no new plans reach this node; the last-good plan's workloads keep running unchanged (control has moved its allocations elsewhere); stop them with `outpost-agent stop-all`, or re-admit the node with a fresh enrollment token (--enroll TOKEN)";

/// Whether the status comes from a running agent or from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgentRun {
    #[default]
    Running,
    Stopped,
}

/// The state of the link to control, as threads set and compare it; status.json shows it as
/// the lowercase words of each variant (`not configured`, `connected`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ControlState {
    /// Nothing to enroll with: no token, no credential, no site join secret.
    #[default]
    #[serde(rename = "not configured")]
    NotConfigured,
    #[serde(rename = "connecting")]
    Connecting,
    #[serde(rename = "enrolling")]
    Enrolling,
    #[serde(rename = "connected")]
    Connected,
    #[serde(rename = "unreachable")]
    Unreachable,
    /// Control revoked this node (P9); only a fresh enrollment token admits it again.
    #[serde(rename = "revoked")]
    Revoked,
    /// Looking for a control over mDNS (D2).
    #[serde(rename = "searching")]
    Searching,
    /// Leading a site of one (D7).
    #[serde(rename = "solo")]
    Solo,
    /// This agent is exiting.
    #[serde(rename = "stopped")]
    Stopped,
    /// Read from the files of an agent that does not run (`outpost-agent status`).
    #[serde(rename = "agent stopped")]
    AgentStopped,
}

impl ControlState {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlState::NotConfigured => "not configured",
            ControlState::Connecting => "connecting",
            ControlState::Enrolling => "enrolling",
            ControlState::Connected => "connected",
            ControlState::Unreachable => "unreachable",
            ControlState::Revoked => "revoked",
            ControlState::Searching => "searching",
            ControlState::Solo => "solo",
            ControlState::Stopped => "stopped",
            ControlState::AgentStopped => "agent stopped",
        }
    }
}

impl std::fmt::Display for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The link to control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ControlStatus {
    pub url: Option<String>,
    pub state: ControlState,
    pub last_error: Option<String>,
    pub last_contact_unix: Option<u64>,
}

/// Everything `status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AgentStatus {
    pub agent: AgentRun,
    pub pid: Option<u32>,
    pub node_id: String,
    pub role: Role,
    pub plan_generation: Option<String>,
    /// The last-good plan's generation, the boot fallback (R4): behind `plan_generation` while
    /// the applied plan's new instances are not healthy yet.
    #[serde(default)]
    pub last_good: Option<String>,
    /// Where the plan being run came from: `store`, `last-good copy`, `control`, `empty`.
    pub plan_source: String,
    pub cursor: Option<String>,
    pub last_sync_unix: Option<u64>,
    pub store_health: String,
    pub control: ControlStatus,
    pub drift: Drift,
    /// Last apply per component (C10).
    pub components: BTreeMap<String, ComponentApply>,
    pub allocations: Vec<AllocationReport>,
    /// Conditions worth knowing: limits unavailable, plan refused, outbox drops.
    pub notes: Vec<String>,
    pub last_plan_error: Option<String>,
    pub outbox_len: u64,
    pub status_addr: Option<String>,
    /// The WireGuard overlay as the device shows it (refreshed every few seconds).
    #[serde(default)]
    pub overlay: Option<crate::apply::wireguard::OverlayStatus>,
    /// Each artifact the plans reference, by sha256: ready, fetching, failed (R1).
    #[serde(default)]
    pub artifacts: BTreeMap<String, String>,
    /// The agent's last self-update (U2), as `STATE to SHA (why)`: a rolled-back box says so
    /// here (`crate::upgrade::describe`).
    #[serde(default)]
    pub upgrade: Option<String>,
}

/// Most notes kept; notes come from a fixed set of conditions, this is a backstop.
pub const NOTES_MAX: usize = 32;

impl AgentStatus {
    /// Adds a note unless it is already there.
    pub fn note(&mut self, text: String) {
        if !self.notes.contains(&text) && self.notes.len() < NOTES_MAX {
            self.notes.push(text);
        }
    }
}

/// The running agent's status, shared by its threads.
#[derive(Clone, Default)]
pub struct StatusBoard(Arc<Mutex<AgentStatus>>);

impl StatusBoard {
    pub fn new(status: AgentStatus) -> Self {
        Self(Arc::new(Mutex::new(status)))
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentStatus> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn update(&self, change: impl FnOnce(&mut AgentStatus)) {
        change(&mut self.lock());
    }

    pub fn snapshot(&self) -> AgentStatus {
        self.lock().clone()
    }
}

pub fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE_NAME)
}

/// Writes the snapshot when it differs from what was last written. Returns the bytes written.
pub struct SnapshotWriter {
    path: PathBuf,
    last: Vec<u8>,
}

impl SnapshotWriter {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: status_path(data_dir),
            last: Vec::new(),
        }
    }

    pub fn write_if_changed(&mut self, status: &AgentStatus) -> std::io::Result<bool> {
        let bytes = serde_json::to_vec_pretty(status).unwrap_or_default();
        if bytes == self.last {
            return Ok(false);
        }
        crate::os::atomic_write(&self.path, &bytes)?;
        self.last = bytes;
        Ok(true)
    }
}

fn age(unix: Option<u64>, now_unix: u64) -> String {
    match unix {
        None => "never".into(),
        Some(at) => format!("{}s ago", now_unix.saturating_sub(at)),
    }
}

/// The human form of `outpost-agent status`.
pub fn render_text(status: &AgentStatus, now_unix: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let short = |g: &Option<String>| g.as_deref().map(|g| g.get(..12).unwrap_or(g).to_string());
    let _ = writeln!(
        out,
        "agent:       {}{}",
        match status.agent {
            AgentRun::Running => "running",
            AgentRun::Stopped => "stopped",
        },
        status
            .pid
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "node:        {}",
        if status.node_id.is_empty() {
            "(unknown)"
        } else {
            &status.node_id
        }
    );
    let _ = writeln!(out, "role:        {}", status.role.as_str());
    let _ = writeln!(
        out,
        "plan:        generation {} from {}",
        short(&status.plan_generation).unwrap_or_else(|| "(none)".into()),
        status.plan_source
    );
    let _ = writeln!(
        out,
        "cursor:      {}",
        status.cursor.as_deref().unwrap_or("(none)")
    );
    let _ = writeln!(out, "last sync:   {}", age(status.last_sync_unix, now_unix));
    let _ = writeln!(
        out,
        "control:     {} {}{}",
        status.control.state,
        status.control.url.as_deref().unwrap_or(""),
        status
            .control
            .last_error
            .as_ref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "store:       {}", status.store_health);
    if let Some(upgrade) = &status.upgrade {
        let _ = writeln!(out, "upgrade:     {upgrade}");
    }
    let _ = writeln!(
        out,
        "drift:       {} of {} allocations running{}",
        status.drift.running,
        status.drift.desired,
        if status.drift.missing.is_empty() && status.drift.unexpected.is_empty() {
            String::new()
        } else {
            format!(
                "; not running: [{}]; leaving: [{}]",
                status.drift.missing.join(", "),
                status.drift.unexpected.join(", ")
            )
        }
    );
    if let Some(error) = &status.last_plan_error {
        let _ = writeln!(out, "plan error:  {error}");
    }
    for note in &status.notes {
        let _ = writeln!(out, "note:        {note}");
    }
    if !status.components.is_empty() {
        let _ = writeln!(out, "components:");
        for (name, apply) in &status.components {
            let _ = writeln!(
                out,
                "  {name:<14} {:<6} generation {} {}{}",
                format!("{:?}", apply.status).to_lowercase(),
                apply.generation.get(..12).unwrap_or(&apply.generation),
                age(Some(apply.at_unix), now_unix),
                if apply.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", apply.message)
                }
            );
        }
    }
    if !status.allocations.is_empty() {
        let _ = writeln!(out, "allocations:");
        for report in &status.allocations {
            let _ = writeln!(
                out,
                "  {:<24} wave {:<2} {:<9} pid {:<8} restarts {:<3} {}",
                report.allocation_id,
                report.wave,
                report.state.as_str(),
                report
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                report.restarts,
                report.message
            );
        }
    }
    if let Some(overlay) = &status.overlay {
        out.push_str(&crate::apply::wireguard::render_overlay_status(
            overlay, now_unix,
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SnapshotWriter::new(dir.path());
        let mut status = AgentStatus {
            node_id: "n1".into(),
            ..Default::default()
        };
        assert!(writer.write_if_changed(&status).unwrap());
        assert!(!writer.write_if_changed(&status).unwrap());
        status.role = Role::Leader;
        assert!(writer.write_if_changed(&status).unwrap());
        let back: AgentStatus =
            serde_json::from_slice(&std::fs::read(status_path(dir.path())).unwrap()).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn text_names_the_essentials() {
        let status = AgentStatus {
            node_id: "edge-1".into(),
            role: Role::Worker,
            plan_source: "store".into(),
            store_health: "recovered from last-good copy".into(),
            control: ControlStatus {
                state: ControlState::Unreachable,
                ..Default::default()
            },
            last_sync_unix: Some(90),
            ..Default::default()
        };
        let text = render_text(&status, 100);
        for needle in [
            "edge-1",
            "worker",
            "recovered from last-good copy",
            "unreachable",
            "10s ago",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
