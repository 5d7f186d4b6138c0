//! A real `outpost-agent` enrolls with the real `outpost-control` using a token from the real
//! `outpostctl`, runs what the operator applies, reports its state back, and stops what is
//! removed.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use anyhow::{Context, Result};
use outpost_fleet_tests::{
    AgentProcess, COMMAND_TIMEOUT, ControlProcess, START_TIMEOUT, TestDir, wait_for, wait_until,
};
use serde_json::Value;

const SERVICE_YAML: &str = "\
name: sleeper
command: /bin/sleep
args: [\"3600\"]
memory_bytes: 1048576
";

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The agent's own view of one service's allocation, from `outpost-agent status --json`.
fn agent_allocation<'a>(status: &'a Value, service: &str) -> Option<&'a Value> {
    list(&status["allocations"])
        .iter()
        .find(|allocation| allocation["service"] == service)
}

#[test]
fn an_enrolled_agent_runs_what_the_operator_applies() -> Result<()> {
    let dir = TestDir::new("agent-enroll")?;
    let control = ControlProcess::start(&dir.path().join("control"))?;
    let enroll = control
        .outpostctl(&["enroll", "create", "--ttl", "10m", "--json"])?
        .expect_success("enroll")?;
    let token = enroll.json()?["token"]
        .as_str()
        .context("no token")?
        .to_string();

    let mut agent =
        AgentProcess::start(&dir.path().join("edge-a"), &token, &["--node-id", "edge-a"])?;
    wait_until(
        "edge-a to show as ready in outpostctl nodes",
        START_TIMEOUT,
        || {
            let Ok(nodes) = control
                .outpostctl(&["nodes", "--json"])
                .and_then(|output| output.json())
            else {
                return false;
            };
            list(&nodes)
                .iter()
                .any(|node| node["node_id"] == "edge-a" && node["state"] == "ready")
        },
    )?;

    let service_file = dir.write("sleeper.yaml", SERVICE_YAML)?;
    control
        .outpostctl(&["services", "apply", "-f", service_file.to_str().unwrap()])?
        .expect_success("services apply")?;

    // The agent starts it...
    let status = agent.wait_for_status("the agent to run sleeper", |status| {
        agent_allocation(status, "sleeper")
            .is_some_and(|allocation| allocation["state"] == "running")
    })?;
    let pid =
        agent_allocation(&status, "sleeper").and_then(|allocation| allocation["pid"].as_u64());
    let pid = pid.with_context(|| format!("no pid for sleeper in {status}"))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("3600"),
        "pid {pid} is not the sleeper"
    );

    // ...and control learns its state from the heartbeats.
    let allocation = wait_for(
        "outpostctl allocations to show sleeper running on edge-a",
        START_TIMEOUT,
        || {
            let allocations = control
                .outpostctl(&["allocations", "--json"])
                .ok()?
                .json()
                .ok()?;
            list(&allocations)
                .iter()
                .find(|allocation| {
                    allocation["service"] == "sleeper"
                        && allocation["node_id"] == "edge-a"
                        && allocation["state"] == "running"
                })
                .cloned()
        },
    )?;
    let table = control
        .outpostctl(&["allocations"])?
        .expect_success("allocations")?;
    let id = allocation["allocation_id"].as_str().unwrap_or_default();
    let row = table
        .stdout
        .lines()
        .find(|line| line.starts_with(id))
        .unwrap_or_default();
    assert!(
        row.contains("edge-a") && row.contains("running"),
        "{}",
        table.stdout
    );

    // Removing the service stops the process.
    control
        .outpostctl(&["services", "rm", "sleeper"])?
        .expect_success("services rm")?;
    agent.wait_for_status("the agent to drop sleeper", |status| {
        agent_allocation(status, "sleeper").is_none()
    })?;
    wait_until("the sleeper process to be gone", COMMAND_TIMEOUT, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its reaper.
        !Path::new(&format!("/proc/{pid}")).exists()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })?;
    Ok(())
}
