//! The edge's logs in the fleet's shared vocabulary (issue 15): the real `outpost-edge run
//! --log-format json` writes one JSON object a line, and its lines carry `component`, `action`,
//! `node_id` and `allocation_id` (a backend's health), `generation` and `duration_ms` (a route
//! table applied) and `attempt` (control unreachable); neither the edge's credential, its
//! sealing key nor the enrollment token appears in the log.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::edge::{
    EdgeProcess, Fleet, apply_route, backend_service, fleet, route, wait_for_answer,
};
use outpost_fleet_tests::{START_TIMEOUT, StopMode, wait_for};
use serde_json::Value;

/// Every line of the edge's log, each parsed as JSON (a line that is not JSON fails the test).
fn json_lines(log: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("reading the edge's log {}", log.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .with_context(|| format!("an edge log line is not JSON: {line:?}"))
        })
        .collect()
}

/// Waits for a line with this `component` and `action` whose `fields` are all present.
fn wait_for_line(log: &Path, component: &str, action: &str, fields: &[&str]) -> Result<Value> {
    wait_for(
        &format!("an edge log line {component}/{action} with {fields:?}"),
        START_TIMEOUT,
        || match json_lines(log) {
            Err(error) => Some(Err(error)),
            Ok(lines) => lines
                .into_iter()
                .find(|line| {
                    line["component"] == component
                        && line["action"] == action
                        && fields.iter().all(|field| !line[*field].is_null())
                })
                .map(Ok),
        },
    )?
}

#[test]
fn json_logs_of_the_real_edge_carry_the_shared_fields_and_no_secret() -> Result<()> {
    let fleet = fleet("edge-logs")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    apply_route(&fleet.control, &route("shop", "shop.test", "web"))?;
    let token = fleet.control.enrollment_token()?;
    let edge_dir = fleet.dir.path().join("edge");
    let log = edge_dir.with_extension("log");
    let edge = EdgeProcess::start(
        &edge_dir,
        &token,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--log-format", "json"],
    )?;
    wait_for_answer(&edge, "shop.test", "shop.test to answer through the edge")?;

    let applied = wait_for_line(&log, "routes", "apply", &["generation", "duration_ms"])?;
    assert!(applied["generation"].as_u64().unwrap() > 0, "{applied}");
    assert!(applied["duration_ms"].is_u64(), "{applied}");
    for field in ["timestamp", "level", "target", "message"] {
        assert!(applied[field].is_string(), "{field} missing: {applied}");
    }
    let healthy = wait_for_line(&log, "health", "backend_up", &["node_id", "allocation_id"])?;
    let node_id = healthy["node_id"].as_str().unwrap();
    let nodes = fleet
        .control
        .outpostctl(&["nodes", "--json"])?
        .expect_success("outpostctl nodes --json")?;
    assert!(
        !node_id.is_empty() && nodes.stdout.contains(&format!("\"{node_id}\"")),
        "the health line names node {node_id:?}, not one of {}",
        nodes.stdout
    );
    assert!(
        healthy["allocation_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("web-")),
        "{healthy}"
    );

    // Control gone: the edge says it retries, with the attempt.
    let Fleet { dir, control, .. } = fleet;
    control.stop(StopMode::Kill);
    let retry = wait_for_line(&log, "follow", "retry", &["attempt"])?;
    assert!(retry["attempt"].is_u64(), "{retry}");

    let identity: Value = serde_json::from_slice(&std::fs::read(edge_dir.join("identity.json"))?)?;
    let text = std::fs::read_to_string(&log)?;
    let secrets = [
        identity["credential"].as_str().context("no credential")?,
        identity["sealing_key"].as_str().context("no sealing key")?,
        token.as_str(),
    ];
    for secret in secrets {
        if secret.len() < 16 {
            bail!(
                "a secret of {} characters is too short to search for",
                secret.len()
            );
        }
        assert!(!text.contains(secret), "a secret appears in the edge's log");
    }
    drop(edge);
    drop(dir);
    Ok(())
}
