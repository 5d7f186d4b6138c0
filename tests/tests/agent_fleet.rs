//! A real control and two real agents on loopback: replicas spread over the nodes, scaling
//! places the new replica, deleting a service stops its processes, and a workload gets SIGTERM
//! (and its grace) when its service is removed.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AgentProcess, COMMAND_TIMEOUT, ControlProcess, START_TIMEOUT, TestDir, allocation_pids,
    process_alive, status_allocations, status_running_pids, wait_for, wait_until,
};
use serde_json::{Value, json};

/// Heartbeats every TTL/3; short enough that control hears states quickly, long enough that
/// a loaded machine does not miss one and see its node marked down.
const NODE_TTL_SECS: &str = "9";

fn spread_service(replicas: u32) -> String {
    format!(
        "name: spread\ncommand: /bin/sleep\nargs: [\"3600\"]\nreplicas: {replicas}\nmemory_bytes: 1048576\n"
    )
}

/// Allocation id → pid of the running `spread` allocations of one agent.
fn running_pids(status: &Value) -> BTreeMap<String, u32> {
    status_running_pids(status, "spread")
}

/// Every allocation the agents run is one live process, the only one with its allocation id.
fn assert_one_live_process_each(root: &Path, running: &BTreeMap<String, u32>) {
    for (allocation_id, pid) in running {
        assert!(process_alive(*pid), "pid {pid} of {allocation_id} is gone");
        assert_eq!(
            allocation_pids(root, allocation_id),
            vec![*pid],
            "processes of {allocation_id}"
        );
    }
}

/// Waits until control lists exactly `expected` as the running `spread` allocations.
fn wait_for_control_running(
    control: &ControlProcess,
    expected: &BTreeMap<String, u32>,
) -> Result<()> {
    wait_until(
        "control to show the same spread allocations running",
        START_TIMEOUT,
        || {
            let Ok(allocations) = control.allocations() else {
                return false;
            };
            let running: Vec<&str> = allocations
                .iter()
                .filter(|allocation| {
                    allocation["service"] == "spread" && allocation["state"] == "running"
                })
                .filter_map(|allocation| allocation["allocation_id"].as_str())
                .collect();
            let all: usize = allocations
                .iter()
                .filter(|allocation| allocation["service"] == "spread")
                .count();
            all == expected.len()
                && running.len() == expected.len()
                && running.iter().all(|id| expected.contains_key(*id))
        },
    )
}

#[test]
fn two_agents_run_spread_replicas_scale_and_stop_them() -> Result<()> {
    let dir = TestDir::new("fleet-spread")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS],
    )?;
    let mut edge_a = AgentProcess::start(
        &dir.path().join("edge-a"),
        &control.enrollment_token()?,
        &["--node-id", "edge-a"],
    )?;
    let mut edge_b = AgentProcess::start(
        &dir.path().join("edge-b"),
        &control.enrollment_token()?,
        &["--node-id", "edge-b"],
    )?;
    control.wait_for_nodes_ready(&["edge-a", "edge-b"])?;

    // Two replicas: one on each node (replicas spread over the ready nodes).
    control.apply_services(&spread_service(2))?;
    let status_a = edge_a.wait_for_status("edge-a to run one spread replica", |status| {
        running_pids(status).len() == 1
    })?;
    let status_b = edge_b.wait_for_status("edge-b to run one spread replica", |status| {
        running_pids(status).len() == 1
    })?;
    let mut two = running_pids(&status_a);
    two.extend(running_pids(&status_b));
    assert_eq!(two.len(), 2, "two distinct allocations: {two:?}");
    assert_one_live_process_each(dir.path(), &two);
    wait_for_control_running(&control, &two)?;

    // Three replicas: the third is placed on one of the two nodes, the first two run on.
    control.apply_services(&spread_service(3))?;
    let three = wait_for(
        "three spread replicas running over both agents",
        START_TIMEOUT,
        || {
            let mut running = running_pids(&edge_a.status().ok()?);
            let on_a = running.len();
            running.extend(running_pids(&edge_b.status().ok()?));
            (running.len() == 3 && (1..=2).contains(&on_a)).then_some(running)
        },
    )?;
    assert_one_live_process_each(dir.path(), &three);
    for (allocation_id, pid) in &two {
        assert_eq!(
            three.get(allocation_id),
            Some(pid),
            "scaling up replaced or restarted {allocation_id}: {three:?}"
        );
    }
    wait_for_control_running(&control, &three)?;

    // Deleting the service stops every process.
    control.remove_service("spread")?;
    for agent in [&mut edge_a, &mut edge_b] {
        agent.wait_for_status("the agent to drop every spread allocation", |status| {
            status_allocations(status, "spread").is_empty()
        })?;
    }
    wait_until("every spread process to be gone", COMMAND_TIMEOUT, || {
        three.iter().all(|(allocation_id, pid)| {
            !process_alive(*pid) && allocation_pids(dir.path(), allocation_id).is_empty()
        })
    })?;
    wait_for_control_running(&control, &BTreeMap::new())?;
    Ok(())
}

/// A workload that traps SIGTERM, writes `got-term` to `$MARKER` and exits 0. SIGKILL would
/// leave no marker. The grace is long, so only SIGTERM can end it during the test.
fn graceful_service(marker: &Path) -> String {
    json!({
        "name": "graceful",
        "command": "/bin/sh",
        "args": [
            "-c",
            "trap 'echo got-term > \"$MARKER\"; exit 0' TERM; echo started > \"$MARKER.started\"; sleep 3600 & wait",
        ],
        "memory_bytes": 1048576,
        "stop_grace_ms": 120000,
        "env": {"MARKER": marker.display().to_string()},
    })
    .to_string()
}

#[test]
fn a_removed_service_gets_sigterm_and_exits_within_its_grace() -> Result<()> {
    let dir = TestDir::new("fleet-sigterm")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS],
    )?;
    let mut agent = AgentProcess::start(
        &dir.path().join("edge"),
        &control.enrollment_token()?,
        &["--node-id", "edge"],
    )?;
    let marker = dir.path().join("term-marker");
    let started = dir.path().join("term-marker.started");
    control.apply_services(&graceful_service(&marker))?;
    let status = agent.wait_for_status("the agent to run graceful", |status| {
        status_allocations(status, "graceful")
            .first()
            .is_some_and(|allocation| allocation["state"] == "running")
    })?;
    let allocation = status_allocations(&status, "graceful")[0].clone();
    let pid = allocation["pid"].as_u64().context("no pid")? as u32;
    // The trap is set before the shell writes `started`; only then is SIGTERM meaningful.
    wait_until("the workload to install its trap", START_TIMEOUT, || {
        started.exists()
    })?;
    assert!(!marker.exists(), "the marker exists before any stop");

    control.remove_service("graceful")?;
    wait_until(
        "the workload to exit after its SIGTERM trap ran",
        COMMAND_TIMEOUT,
        || !process_alive(pid),
    )?;
    let written = fs::read_to_string(&marker).unwrap_or_default();
    if written.trim() != "got-term" {
        bail!(
            "the workload (pid {pid}) ended without running its TERM trap (marker {:?}); it was killed, not terminated",
            written
        );
    }
    let allocation_id = allocation["allocation_id"].as_str().unwrap_or_default();
    assert!(allocation_pids(dir.path(), allocation_id).is_empty());
    agent.wait_for_status("the agent to drop graceful", |status| {
        status_allocations(status, "graceful").is_empty()
    })?;
    Ok(())
}
