//! Liveness and placement with the real binaries (F1, F2): a box whose agent is gone for
//! longer than the TTL keeps its workload (same pid) and nothing starts elsewhere until the
//! service's `reschedule_after_secs`; past it the instance moves and the returning box stops
//! its copy, never before the replacement runs; `replicas: all` with a selector lands on a node
//! that joins later (by its `--label` or an operator label); drain moves counted instances in
//! wave order and stops every-node ones.
//!
//! An outage is the agent process killed: its workloads keep running, as on a box whose link
//! dropped, and the restarted agent adopts them. Build the binaries first:
//! `cargo build --bins && cargo test -p outpost-fleet-tests --test fleet_placement`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AgentProcess, ControlProcess, START_TIMEOUT, StopMode, TestDir, allocation_pids, process_alive,
    status_allocations, status_running_pids, wait_for, wait_until,
};
use serde_json::{Value, json};

/// A killed agent's node is `down` about 9 s later. Heartbeats go every TTL/3: long enough that
/// a loaded machine does not miss one and see a live node marked down (with 3 s, one run failed
/// under a load average of 12; a missed heartbeat is the likely cause, not proven).
const NODE_TTL_SECS: &str = "9";

/// A service document of one `/bin/sleep` per instance.
fn sleeper(name: &str, replicas: Value, extra: Value) -> String {
    let mut spec = json!({
        "name": name,
        "command": "/bin/sleep",
        "args": ["3600"],
        "replicas": replicas,
        "memory_bytes": 1048576,
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    spec.to_string()
}

fn start_control(dir: &TestDir) -> Result<ControlProcess> {
    ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS],
    )
}

fn start_agent(
    dir: &TestDir,
    control: &ControlProcess,
    node_id: &str,
    labels: &[&str],
) -> Result<AgentProcess> {
    let mut args = vec!["--node-id", node_id];
    for label in labels {
        args.extend(["--label", label]);
    }
    AgentProcess::start(
        &dir.path().join(node_id),
        &control.enrollment_token()?,
        &args,
    )
}

/// The one running instance of `service` on an agent: allocation id and pid.
fn wait_for_one_running(agent: &mut AgentProcess, service: &str) -> Result<(String, u32)> {
    let status = agent.wait_for_status(&format!("one running {service}"), |status| {
        status_running_pids(status, service).len() == 1
    })?;
    status_running_pids(&status, service)
        .into_iter()
        .next()
        .context("no running instance")
}

/// Control's allocations of `service`: allocation id → node.
fn placed(control: &ControlProcess, service: &str) -> Result<BTreeMap<String, String>> {
    Ok(control
        .allocations()?
        .iter()
        .filter(|a| a["service"] == service)
        .filter_map(|a| {
            Some((
                a["allocation_id"].as_str()?.to_string(),
                a["node_id"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Waits until control places `service` exactly as `expected` (node → count).
fn wait_for_placement(
    control: &ControlProcess,
    service: &str,
    expected: &[(&str, usize)],
) -> Result<BTreeMap<String, String>> {
    wait_for(
        &format!("{service} placed as {expected:?}"),
        START_TIMEOUT,
        || {
            let placed = placed(control, service).ok()?;
            let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
            for node in placed.values() {
                *per_node.entry(node.as_str()).or_default() += 1;
            }
            let wanted: BTreeMap<&str, usize> = expected.iter().copied().collect();
            (per_node == wanted).then_some(placed)
        },
    )
}

/// A barrier through the scheduler: `marker` (one replica) placed proves every event before
/// it, such as a node marked down, has been through a scheduler pass.
fn scheduler_barrier(control: &ControlProcess, marker: &str) -> Result<()> {
    control.apply_services(&sleeper(marker, json!(1), json!({})))?;
    wait_until(&format!("{marker} to be placed"), START_TIMEOUT, || {
        placed(control, marker).is_ok_and(|placed| placed.len() == 1)
    })
}

/// Places the one instance of `document` on edge-a (edge-b cordoned meanwhile); returns its
/// allocation id and pid.
fn one_instance_on_edge_a(
    control: &ControlProcess,
    edge_a: &mut AgentProcess,
    service: &str,
    document: &str,
) -> Result<(String, u32)> {
    control
        .outpostctl(&["nodes", "cordon", "edge-b"])?
        .expect_success("nodes cordon")?;
    control.apply_services(document)?;
    let running = wait_for_one_running(edge_a, service)?;
    control
        .outpostctl(&["nodes", "uncordon", "edge-b"])?
        .expect_success("nodes uncordon")?;
    Ok(running)
}

/// The link of edge-a drops: its agent is killed, its workloads run on. Returns edge-a as
/// `outpostctl nodes` shows it once marked down.
fn lose_edge_a(control: &ControlProcess, edge_a: &mut AgentProcess) -> Result<Value> {
    edge_a.stop(StopMode::Kill);
    control.wait_for_node("edge-a", "edge-a marked down", |node| {
        node["state"] == "down"
    })
}

fn assert_one_process(root: &Path, allocation_id: &str, pid: u32) {
    assert!(process_alive(pid), "pid {pid} of {allocation_id} is gone");
    assert_eq!(allocation_pids(root, allocation_id), vec![pid]);
}

#[test]
fn an_outage_shorter_than_reschedule_after_keeps_the_same_pid_and_starts_no_copy() -> Result<()> {
    let dir = TestDir::new("placement-short-outage")?;
    let control = start_control(&dir)?;
    let mut edge_a = start_agent(&dir, &control, "edge-a", &[])?;
    let edge_b = start_agent(&dir, &control, "edge-b", &[])?;
    control.wait_for_nodes_ready(&["edge-a", "edge-b"])?;
    let (allocation_id, pid) = one_instance_on_edge_a(
        &control,
        &mut edge_a,
        "boxed",
        &sleeper("boxed", json!(1), json!({"reschedule_after_secs": 600})),
    )?;

    // The link drops: the agent is gone, its workload runs on.
    let down = lose_edge_a(&control, &mut edge_a)?;
    assert!(down["down_since_unix_ms"].is_u64(), "{down}");
    let table = control
        .outpostctl(&["nodes"])?
        .expect_success("outpostctl nodes")?;
    let row = table
        .stdout
        .lines()
        .find(|line| line.starts_with("edge-a"))
        .with_context(|| format!("no edge-a row:\n{}", table.stdout))?;
    assert!(row.contains("down"), "{row}");
    // Every event so far went through the scheduler: nothing moved.
    scheduler_barrier(&control, "marker")?;
    assert_eq!(
        placed(&control, "boxed")?,
        BTreeMap::from([(allocation_id.clone(), "edge-a".to_string())])
    );
    let on_b = edge_b.status()?;
    assert!(status_allocations(&on_b, "boxed").is_empty(), "{on_b}");
    assert_one_process(dir.path(), &allocation_id, pid);

    // The box comes back before 600 s: same allocation, same process, untouched.
    edge_a.restart(&control.enrollment_token()?, &["--node-id", "edge-a"])?;
    control.wait_for_nodes_ready(&["edge-a"])?;
    let status = edge_a.wait_for_status("edge-a to adopt boxed", |status| {
        status_running_pids(status, "boxed").len() == 1
    })?;
    assert_eq!(
        status_running_pids(&status, "boxed"),
        BTreeMap::from([(allocation_id.clone(), pid)])
    );
    let instance = &status_allocations(&status, "boxed")[0];
    assert_eq!(instance["restarts"], 0, "{instance}");
    assert_one_process(dir.path(), &allocation_id, pid);
    assert_eq!(
        placed(&control, "boxed")?,
        BTreeMap::from([(allocation_id.clone(), "edge-a".to_string())])
    );
    // A role change (a new plan generation) and a label change reach the box and restart
    // nothing either.
    let (code, body) = control.http()?.send(
        "POST",
        "/v1/nodes/edge-a/role",
        Some(&control.admin.token),
        &json!({"role": "proxy"}),
    )?;
    assert_eq!(code, 200, "{body}");
    control
        .outpostctl(&["nodes", "label", "edge-a", "site=north"])?
        .expect_success("nodes label")?;
    let status = edge_a.wait_for_status("edge-a to take the proxy role", |status| {
        status["role"] == "proxy"
    })?;
    assert_eq!(
        status_running_pids(&status, "boxed"),
        BTreeMap::from([(allocation_id.clone(), pid)])
    );
    assert_eq!(status_allocations(&status, "boxed")[0]["restarts"], 0);
    assert_one_process(dir.path(), &allocation_id, pid);
    Ok(())
}

#[test]
fn an_outage_past_reschedule_after_moves_the_instance_and_the_box_stops_its_copy_after()
-> Result<()> {
    let dir = TestDir::new("placement-long-outage")?;
    let control = start_control(&dir)?;
    let mut edge_a = start_agent(&dir, &control, "edge-a", &[])?;
    let mut edge_b = start_agent(&dir, &control, "edge-b", &[])?;
    control.wait_for_nodes_ready(&["edge-a", "edge-b"])?;
    let (old_id, old_pid) = one_instance_on_edge_a(
        &control,
        &mut edge_a,
        "mobile",
        &sleeper("mobile", json!(1), json!({"reschedule_after_secs": 2})),
    )?;
    lose_edge_a(&control, &mut edge_a)?;
    // 2 s later the replacement is placed on edge-b and runs there; only then does the old
    // copy leave edge-a's plan. Its process still runs: nobody told the box yet.
    let (new_id, new_pid) = wait_for_one_running(&mut edge_b, "mobile")?;
    assert_ne!(new_id, old_id);
    wait_for_placement(&control, "mobile", &[("edge-b", 1)])?;
    let removed = control.aggregate_events(&format!("allocation/{old_id}"))?;
    let removal = removed
        .iter()
        .find(|e| e["kind"] == "AllocationRemoved")
        .with_context(|| format!("no removal of {old_id}: {removed:?}"))?;
    let placed_new = control.aggregate_events(&format!("allocation/{new_id}"))?;
    assert!(
        placed_new[0]["kind"] == "AllocationPlaced"
            && placed_new[0]["event_id"].as_u64() < removal["event_id"].as_u64(),
        "the replacement is placed before the old copy is removed: {placed_new:?} {removal}"
    );
    assert!(
        removal["data"]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("running")),
        "{removal}"
    );
    assert_one_process(dir.path(), &old_id, old_pid);

    // The box returns: it stops its copy; the replacement runs on, untouched.
    edge_a.restart(&control.enrollment_token()?, &["--node-id", "edge-a"])?;
    control.wait_for_nodes_ready(&["edge-a"])?;
    edge_a.wait_for_status("edge-a to drop its copy", |status| {
        status_allocations(status, "mobile").is_empty()
    })?;
    wait_until("the old copy's process to end", START_TIMEOUT, || {
        !process_alive(old_pid)
    })?;
    assert_one_process(dir.path(), &new_id, new_pid);
    assert_eq!(
        placed(&control, "mobile")?,
        BTreeMap::from([(new_id, "edge-b".to_string())])
    );
    Ok(())
}

#[test]
fn replicas_all_with_a_selector_lands_on_nodes_that_join_or_are_labeled_later() -> Result<()> {
    let dir = TestDir::new("placement-every-node")?;
    let control = start_control(&dir)?;
    let mut north_a = start_agent(&dir, &control, "north-a", &["site=north"])?;
    let mut south = start_agent(&dir, &control, "south", &["site=south", "rack=r1"])?;
    control.wait_for_nodes_ready(&["north-a", "south"])?;
    let node = control.wait_for_node("south", "south with its labels", |node| {
        node["labels"] == json!({"site": "south", "rack": "r1"})
    })?;
    assert_eq!(node["scheduling"], "schedulable");
    control.apply_services(&sleeper(
        "relay",
        json!("all"),
        json!({"selector": {"labels": {"site": "north"}}}),
    ))?;
    wait_for_one_running(&mut north_a, "relay")?;
    wait_for_placement(&control, "relay", &[("north-a", 1)])?;

    // A node that joins later with the label gets its own instance.
    let mut north_b = start_agent(&dir, &control, "north-b", &["site=north"])?;
    wait_for_one_running(&mut north_b, "relay")?;
    // So does a node the operator labels into the selector.
    let labeled = control
        .outpostctl(&["nodes", "label", "south", "site=north"])?
        .expect_success("nodes label")?;
    assert!(
        labeled.stdout.contains("south labeled"),
        "{}",
        labeled.stdout
    );
    wait_for_one_running(&mut south, "relay")?;
    let placed = wait_for_placement(
        &control,
        "relay",
        &[("north-a", 1), ("north-b", 1), ("south", 1)],
    )?;
    let table = control
        .outpostctl(&["nodes"])?
        .expect_success("outpostctl nodes")?;
    assert!(
        table.stdout.contains("rack=r1,site=north"),
        "{}",
        table.stdout
    );
    // A label that is not a name is refused, naming it; nothing changes.
    let refused = control
        .outpostctl(&["nodes", "label", "south", "Site=x"])?
        .expect_failure("a bad label")?;
    assert!(refused.stderr.contains("Site"), "{}", refused.stderr);
    assert_eq!(self::placed(&control, "relay")?, placed);
    Ok(())
}

#[test]
fn drain_moves_counted_instances_in_wave_order_and_stops_every_node_ones() -> Result<()> {
    let dir = TestDir::new("placement-drain")?;
    let control = start_control(&dir)?;
    let mut edge_a = start_agent(&dir, &control, "edge-a", &[])?;
    let mut edge_b = start_agent(&dir, &control, "edge-b", &[])?;
    control.wait_for_nodes_ready(&["edge-a", "edge-b"])?;
    control
        .outpostctl(&["nodes", "cordon", "edge-b"])?
        .expect_success("nodes cordon")?;
    control.apply_services(&format!(
        "[{}, {}, {}]",
        sleeper("db", json!(1), json!({"wave": 0})),
        sleeper("api", json!(1), json!({"wave": 1})),
        sleeper("relay", json!("all"), json!({"wave": 1})),
    ))?;
    let (db_old, db_pid) = wait_for_one_running(&mut edge_a, "db")?;
    let (api_old, api_pid) = wait_for_one_running(&mut edge_a, "api")?;
    let (relay_a, relay_pid) = wait_for_one_running(&mut edge_a, "relay")?;
    control
        .outpostctl(&["nodes", "uncordon", "edge-b"])?
        .expect_success("nodes uncordon")?;
    wait_for_one_running(&mut edge_b, "relay")?;

    let drained = control
        .outpostctl(&["nodes", "drain", "edge-a"])?
        .expect_success("nodes drain")?;
    assert!(drained.stdout.contains("draining"), "{}", drained.stdout);
    let status = edge_b.wait_for_status("edge-b to run db and api", |status| {
        status_running_pids(status, "db").len() == 1
            && status_running_pids(status, "api").len() == 1
    })?;
    edge_a.wait_for_status("edge-a to run nothing", |status| {
        status["allocations"]
            .as_array()
            .is_some_and(|allocations| allocations.is_empty())
    })?;
    for pid in [db_pid, api_pid, relay_pid] {
        wait_until("edge-a's processes to end", START_TIMEOUT, || {
            !process_alive(pid)
        })?;
    }
    // Wave order in the log: api's replacement is placed only after db has left edge-a.
    let db_new = status_running_pids(&status, "db")
        .into_keys()
        .next()
        .unwrap();
    let api_new = status_running_pids(&status, "api")
        .into_keys()
        .next()
        .unwrap();
    let event_id = |aggregate: String, kind: &str| -> Result<u64> {
        let events = control.aggregate_events(&aggregate)?;
        match events
            .iter()
            .find(|e| e["kind"] == kind)
            .and_then(|e| e["event_id"].as_u64())
        {
            Some(id) => Ok(id),
            None => bail!("no {kind} in {aggregate}: {events:?}"),
        }
    };
    let db_placed = event_id(format!("allocation/{db_new}"), "AllocationPlaced")?;
    let db_removed = event_id(format!("allocation/{db_old}"), "AllocationRemoved")?;
    let api_placed = event_id(format!("allocation/{api_new}"), "AllocationPlaced")?;
    let api_removed = event_id(format!("allocation/{api_old}"), "AllocationRemoved")?;
    let relay_removed = event_id(format!("allocation/{relay_a}"), "AllocationRemoved")?;
    assert!(
        db_placed < db_removed && db_removed < api_placed && api_placed < api_removed,
        "db placed {db_placed}, removed {db_removed}; api placed {api_placed}, removed {api_removed}"
    );
    assert!(
        db_removed < relay_removed,
        "relay (wave 1) stops after db (wave 0) left"
    );
    wait_for_placement(&control, "relay", &[("edge-b", 1)])?;
    control.wait_for_node("edge-a", "edge-a draining", |node| {
        node["scheduling"] == "draining" && node["allocations"] == 0
    })?;
    // Draining it again, or an unknown node, is refused by name.
    let again = control
        .outpostctl(&["nodes", "drain", "edge-a"])?
        .expect_failure("a second drain")?;
    assert!(
        again.stderr.contains("already draining"),
        "{}",
        again.stderr
    );
    let unknown = control
        .outpostctl(&["nodes", "drain", "nowhere"])?
        .expect_failure("draining an unknown node")?;
    assert!(unknown.stderr.contains("nowhere"), "{}", unknown.stderr);
    Ok(())
}
