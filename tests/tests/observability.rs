//! Observability (M1, issue 15) against the real binaries: control's Prometheus endpoint on
//! `--metrics-listen` counts the nodes by state, the commands group-committed with their batch
//! sizes and fsync time, the waiting long-polls and the fan-out to a waiting node; control's
//! `--log-format json` writes one JSON object a line carrying the shared field vocabulary; the
//! agent's status port serves its own `/metrics`.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::fs;

use anyhow::{Context, Result};
use outpost_fleet_tests::{AgentProcess, ControlProcess, START_TIMEOUT, TestDir, wait_for};
use serde_json::Value;

const NODE_TTL_SECS: &str = "9";

/// The metrics URL control printed (`metrics on http://ADDR/metrics`).
fn metrics_url(control: &ControlProcess) -> Result<String> {
    wait_for("control to print its metrics url", START_TIMEOUT, || {
        let log = fs::read_to_string(control.guard.log_path()).ok()?;
        log.lines()
            .find_map(|line| line.strip_prefix("metrics on "))
            .map(str::to_string)
    })
}

fn scrape(url: &str) -> Result<(String, String)> {
    let mut response = ureq::get(url)
        .call()
        .context("scraping control's metrics")?;
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.body_mut().read_to_string()?;
    Ok((content_type, body))
}

/// The value of the sample named exactly `name` (labels included), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
}

#[test]
fn control_metrics_and_json_logs_describe_the_fleet() -> Result<()> {
    let dir = TestDir::new("observability")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &[
            "--node-ttl-secs",
            NODE_TTL_SECS,
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
    )?;
    let url = metrics_url(&control)?;
    let (content_type, text) = scrape(&url)?;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "content type {content_type}"
    );
    assert_eq!(
        sample(&text, "outpost_control_nodes{state=\"ready\"}"),
        Some(0.0)
    );

    let mut agent = AgentProcess::start(
        &dir.path().join("obs-a"),
        &control.enrollment_token()?,
        &["--node-id", "obs-a", "--log-format", "json"],
    )?;
    control.wait_for_nodes_ready(&["obs-a"])?;
    // The agent's long-poll waits under its node's key.
    let text = wait_for(
        "metrics to show one ready node with its long-poll waiting",
        START_TIMEOUT,
        || {
            let (_, text) = scrape(&url).ok()?;
            (sample(&text, "outpost_control_nodes{state=\"ready\"}") == Some(1.0)
                && sample(&text, "outpost_control_feed_waiters") == Some(1.0))
            .then_some(text)
        },
    )?;
    let commands = sample(&text, "outpost_control_commands_total").unwrap_or(0.0);
    assert!(commands >= 1.0, "registration is a command: {text}");
    assert!(
        sample(&text, "outpost_control_commit_fsync_seconds_count").unwrap_or(0.0) >= 1.0,
        "{text}"
    );

    // A change for the node reaches its waiting long-poll: fan-out is observed.
    control.apply_services(
        "name: obs-sleeper\ncommand: /bin/sleep\nargs: [\"3600\"]\nmemory_bytes: 1048576\n",
    )?;
    agent.wait_for_status("the agent to run obs-sleeper", |status| {
        !outpost_fleet_tests::status_running_pids(status, "obs-sleeper").is_empty()
    })?;
    let text = wait_for("a fan-out observation", START_TIMEOUT, || {
        let (_, text) = scrape(&url).ok()?;
        (sample(&text, "outpost_control_feed_fanout_seconds_count").unwrap_or(0.0) >= 1.0)
            .then_some(text)
    })?;
    assert!(
        sample(&text, "outpost_control_commands_total").unwrap_or(0.0) > commands,
        "the service and its placement are commands: {text}"
    );
    assert!(
        sample(&text, "outpost_control_projection_lag_seconds_count").unwrap_or(0.0) >= 1.0,
        "{text}"
    );

    // The agent's own metrics on its status port.
    let status_addr = fs::read_to_string(dir.path().join("obs-a").join("status.addr"))?;
    let agent_url = format!("http://{}/metrics", status_addr.trim());
    let agent_text = wait_for(
        "the agent's metrics to show its allocation",
        START_TIMEOUT,
        || {
            let (_, text) = scrape(&agent_url).ok()?;
            (sample(&text, "outpost_agent_allocations{state=\"running\"}") == Some(1.0))
                .then_some(text)
        },
    )?;
    assert_eq!(
        sample(&agent_text, "outpost_agent_control_connected"),
        Some(1.0),
        "{agent_text}"
    );
    assert!(
        sample(&agent_text, "outpost_agent_last_sync_timestamp_seconds").is_some(),
        "{agent_text}"
    );
    assert!(
        sample(&agent_text, "outpost_agent_sync_cursor_event_id").unwrap_or(0.0) >= 1.0,
        "{agent_text}"
    );
    assert!(
        agent_text.contains("outpost_agent_component_reconcile_ok{component=\"allocations\"} 1"),
        "{agent_text}"
    );
    assert!(
        sample(&agent_text, "outpost_agent_artifact_cache_bytes").is_some(),
        "{agent_text}"
    );

    // The node goes silent: metrics count it down.
    agent.guard.stop(outpost_fleet_tests::StopMode::Kill);
    wait_for("metrics to count the node down", START_TIMEOUT * 2, || {
        let (_, text) = scrape(&url).ok()?;
        (sample(&text, "outpost_control_nodes{state=\"down\"}") == Some(1.0)).then_some(())
    })?;

    // Logs: every stderr line that is not a banner is a JSON object; the liveness and
    // scheduler lines carry the shared vocabulary.
    let log = fs::read_to_string(control.guard.log_path())?;
    let records: Vec<Value> = log
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect::<Result<_>>()?;
    let with = |component: &str, action: &str| {
        records
            .iter()
            .find(|r| r["component"] == component && r["action"] == action)
            .cloned()
    };
    let down = with("liveness", "mark_down").context("no liveness/mark_down record")?;
    assert_eq!(down["node_id"], "obs-a", "{down}");
    assert_eq!(down["level"], "INFO", "{down}");
    let pass = with("scheduler", "schedule").context("no scheduler/schedule record")?;
    assert!(pass["duration_ms"].is_u64(), "{pass}");
    assert!(pass["generation"].is_u64(), "{pass}");

    // The agent's log (`--log-format json`, logging.rs): every line is a JSON object in the
    // same shape as control's, and its boot, plan and start lines carry the shared fields.
    let agent_log = fs::read_to_string(agent.guard.log_path())?;
    let agent_records: Vec<Value> = agent_log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect::<Result<_>>()?;
    let agent_with = |component: &str, action: &str| {
        agent_records
            .iter()
            .find(|r| r["component"] == component && r["action"] == action)
            .cloned()
            .with_context(|| format!("no {component}/{action} record in {agent_log}"))
    };
    let boot = agent_with("agent", "boot")?;
    assert_eq!(boot["node_id"], "obs-a", "{boot}");
    assert!(boot["duration_ms"].is_u64(), "{boot}");
    assert_eq!(boot["level"], "INFO", "{boot}");
    assert!(
        boot["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{boot}"
    );
    assert!(
        boot["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("outpost_agent")),
        "{boot}"
    );
    let plan = agent_with("sync", "plan")?;
    assert_eq!(plan["node_id"], "obs-a", "{plan}");
    assert!(plan["generation"].as_str().is_some(), "{plan}");
    let start = agent_with("allocations", "start")?;
    assert!(
        start["allocation_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("obs-sleeper")),
        "{start}"
    );
    assert!(start["attempt"].is_u64(), "{start}");
    Ok(())
}
