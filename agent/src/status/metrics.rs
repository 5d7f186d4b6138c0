//! The agent's Prometheus metrics (M1), rendered by hand in the text exposition format from the
//! status snapshot: the agent's 4 MiB static-binary budget has no room for a metrics crate and
//! its registry, and every figure is already in the snapshot, so a renderer of a few `writeln!`s
//! is all it takes. Pure: the snapshot, the artifact cache size and the time in, text out.

use std::fmt::Write;
use std::path::Path;

use outpost_proto::node::AllocationState;

use super::{AgentStatus, ControlState};
use crate::store::ApplyOutcome;

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const ALLOCATION_STATES: [AllocationState; 7] = [
    AllocationState::Pending,
    AllocationState::Starting,
    AllocationState::Running,
    AllocationState::Unready,
    AllocationState::Backoff,
    AllocationState::Failed,
    AllocationState::Stopped,
];

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

fn header(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The event id of a cursor's text form `EPOCH.ID`.
fn cursor_event_id(cursor: &str) -> Option<u64> {
    cursor.rsplit_once('.')?.1.parse().ok()
}

/// Renders every metric of the agent.
pub fn render(status: &AgentStatus, artifact_cache_bytes: u64, now_unix: u64) -> String {
    let mut text = String::with_capacity(2048);
    header(
        &mut text,
        "outpost_agent_allocations",
        "gauge",
        "Allocations by state",
    );
    for state in ALLOCATION_STATES {
        let count = status
            .allocations
            .iter()
            .filter(|a| a.state == state)
            .count();
        let _ = writeln!(
            text,
            "outpost_agent_allocations{{state=\"{}\"}} {count}",
            state.as_str()
        );
    }
    header(
        &mut text,
        "outpost_agent_allocation_restarts_total",
        "counter",
        "Restarts of each allocation since it was placed",
    );
    for allocation in &status.allocations {
        let _ = writeln!(
            text,
            "outpost_agent_allocation_restarts_total{{allocation_id=\"{}\",service=\"{}\"}} {}",
            label(&allocation.allocation_id),
            label(&allocation.service),
            allocation.restarts
        );
    }
    if let Some(id) = status.cursor.as_deref().and_then(cursor_event_id) {
        header(
            &mut text,
            "outpost_agent_sync_cursor_event_id",
            "gauge",
            "Event id of the sync cursor (how far the plan follows control's log)",
        );
        let _ = writeln!(text, "outpost_agent_sync_cursor_event_id {id}");
    }
    if let Some(last) = status.last_sync_unix {
        header(
            &mut text,
            "outpost_agent_last_sync_timestamp_seconds",
            "gauge",
            "Unix time of the last successful sync with control",
        );
        let _ = writeln!(text, "outpost_agent_last_sync_timestamp_seconds {last}");
        header(
            &mut text,
            "outpost_agent_sync_lag_seconds",
            "gauge",
            "Seconds since the cursor last caught up with control (every answer of the feed brings it to control's head for this node)",
        );
        let _ = writeln!(
            text,
            "outpost_agent_sync_lag_seconds {}",
            now_unix.saturating_sub(last)
        );
    }
    header(
        &mut text,
        "outpost_agent_control_connected",
        "gauge",
        "1 while the link to control is up",
    );
    let _ = writeln!(
        text,
        "outpost_agent_control_connected {}",
        u8::from(status.control.state == ControlState::Connected)
    );
    header(
        &mut text,
        "outpost_agent_component_reconcile_ok",
        "gauge",
        "Last reconcile result per component: 1 ok, 0 error",
    );
    for (name, component) in &status.components {
        let _ = writeln!(
            text,
            "outpost_agent_component_reconcile_ok{{component=\"{}\"}} {}",
            label(name),
            u8::from(component.status == ApplyOutcome::Ok)
        );
    }
    header(
        &mut text,
        "outpost_agent_component_reconcile_timestamp_seconds",
        "gauge",
        "Unix time of the last reconcile per component",
    );
    for (name, component) in &status.components {
        let _ = writeln!(
            text,
            "outpost_agent_component_reconcile_timestamp_seconds{{component=\"{}\"}} {}",
            label(name),
            component.at_unix
        );
    }
    header(
        &mut text,
        "outpost_agent_artifact_cache_bytes",
        "gauge",
        "Bytes of artifacts cached on this node",
    );
    let _ = writeln!(
        text,
        "outpost_agent_artifact_cache_bytes {artifact_cache_bytes}"
    );
    header(
        &mut text,
        "outpost_agent_outbox_reports",
        "gauge",
        "Reports waiting to be sent to control",
    );
    let _ = writeln!(text, "outpost_agent_outbox_reports {}", status.outbox_len);
    text
}

/// Bytes of the files under `root` (the artifact cache), following no symlinks.
pub fn directory_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    total += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::apply::process::AllocationReport;
    use crate::store::ComponentApply;

    #[test]
    fn renders_allocations_sync_components_and_cache() {
        let mut status = AgentStatus {
            cursor: Some("00ab.42".into()),
            last_sync_unix: Some(1_000),
            ..AgentStatus::default()
        };
        status.allocations.push(AllocationReport {
            allocation_id: "web-1".into(),
            service: "we\"b".into(),
            wave: 0,
            state: AllocationState::Running,
            pid: Some(7),
            adopted: false,
            restarts: 3,
            message: String::new(),
        });
        status.components.insert(
            "storage".into(),
            ComponentApply {
                generation: "g".into(),
                status: ApplyOutcome::Error,
                message: "disk full".into(),
                at_unix: 990,
            },
        );
        let text = render(&status, 4096, 1_030);
        for line in [
            "outpost_agent_allocations{state=\"running\"} 1",
            "outpost_agent_allocations{state=\"failed\"} 0",
            "outpost_agent_allocation_restarts_total{allocation_id=\"web-1\",service=\"we\\\"b\"} 3",
            "outpost_agent_sync_cursor_event_id 42",
            "outpost_agent_last_sync_timestamp_seconds 1000",
            "outpost_agent_sync_lag_seconds 30",
            "outpost_agent_component_reconcile_ok{component=\"storage\"} 0",
            "outpost_agent_artifact_cache_bytes 4096",
            "outpost_agent_control_connected 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Every sample belongs to a declared metric.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(&name), "{name} undeclared");
        }
    }
}
