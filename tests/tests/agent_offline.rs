//! Offline-first agent against the real control (O2, O3): workloads outlive control, an agent
//! restarted while control is down brings its workloads back from its cache without
//! duplicates, an agent stopped while the plan changes catches up by cursor, a rotated log
//! epoch (410 Gone) makes it re-snapshot, so does a control restored from an older copy whose
//! log is behind the agent's cursor (410 Gone, never 400), and a corrupt redb file falls back to
//! the last-good copy.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AGENT_BINARY, AgentProcess, COMMAND_TIMEOUT, CONTROL_BINARY, ControlProcess, START_TIMEOUT,
    StopMode, TestDir, agent_status, allocation_pids, assert_exactly_these_processes, binary,
    process_alive, process_environment, run_with_timeout, sleeper_service, status_allocations,
    status_running_pids, wait_for, wait_until,
};
use outpost_proto::plan::Plan;
use serde_json::Value;

/// Long enough that stopping an agent for a moment never gets its node marked down (which
/// would move its allocations); these tests are about the agent's own cache.
const NODE_TTL_SECS: &str = "60";
/// For the test that keeps its agent running: heartbeats every 3 s, so control hears fresh
/// allocation states soon after it comes back.
const SHORT_NODE_TTL_SECS: &str = "9";

/// A sleeping service whose environment carries `VERSION`.
fn sleeper(name: &str, replicas: u32, version: &str) -> String {
    sleeper_service(name, replicas, &[("VERSION", version)])
}

fn start_control(dir: &TestDir, node_ttl_secs: &str) -> Result<ControlProcess> {
    ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", node_ttl_secs],
    )
}

/// Restarts control on its data dir and address, as after a crash or an upgrade.
fn restart_control(data_dir: &Path, listen: &str, node_ttl_secs: &str) -> Result<ControlProcess> {
    ControlProcess::start_with(data_dir, listen, &["--node-ttl-secs", node_ttl_secs])
}

/// The `VERSION` in a live process's environment.
fn version_of(pid: u32) -> Option<String> {
    process_environment(pid)?.get("VERSION").cloned()
}

/// Waits until control's plan for `node_id` satisfies `condition` (placement runs after the
/// command that caused it has answered).
fn wait_for_plan(
    control: &ControlProcess,
    node_id: &str,
    mut condition: impl FnMut(&Plan) -> bool,
) -> Result<Plan> {
    wait_for(
        &format!("control's plan for {node_id} to change"),
        START_TIMEOUT,
        || {
            control
                .node_plan(node_id)
                .ok()
                .filter(|plan| condition(plan))
        },
    )
}

/// Whether the status shows exactly one process of `service`, running `version`.
fn runs_one_at_version(status: &Value, service: &str, version: &str) -> bool {
    let running = status_running_pids(status, service);
    running.len() == 1
        && running
            .values()
            .all(|pid| version_of(*pid).as_deref() == Some(version))
}

/// The epoch part (16 hex digits) of a status cursor `EPOCH.ID`.
fn cursor_epoch(status: &Value) -> Option<String> {
    let cursor = status["cursor"].as_str()?;
    Some(cursor.split_once('.')?.0.to_string())
}

fn cursor_event_id(status: &Value) -> Option<u64> {
    status["cursor"].as_str()?.split_once('.')?.1.parse().ok()
}

#[test]
fn workloads_outlive_control_and_come_back_from_the_cache_without_duplicates() -> Result<()> {
    let dir = TestDir::new("offline-cache")?;
    let control = start_control(&dir, SHORT_NODE_TTL_SECS)?;
    let control_dir = control.data_dir.clone();
    let listen = control.listen_address().to_string();
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("steady", 2, "1"))?;
    let status = agent.wait_for_status("the agent to run two steady replicas", |status| {
        status_running_pids(status, "steady").len() == 2
    })?;
    let before = status_running_pids(&status, "steady");
    assert_exactly_these_processes(dir.path(), &before);

    // Control dies: the workloads go on, and the agent notices it lost control.
    control.stop(StopMode::Kill);
    agent.wait_for_status("the agent to see control unreachable", |status| {
        status["control"]["state"] == "unreachable"
    })?;
    let status = agent.status()?;
    assert_eq!(status_running_pids(&status, "steady"), before);
    assert_exactly_these_processes(dir.path(), &before);

    // The agent restarts while control is down: it boots from its store and adopts the
    // processes it started, starting none twice.
    agent.stop(StopMode::Graceful);
    assert_exactly_these_processes(dir.path(), &before);
    agent.restart(&token, &["--node-id", "edge"])?;
    let status = agent.wait_for_status("the restarted agent to adopt both replicas", |status| {
        status_running_pids(status, "steady") == before
    })?;
    assert_eq!(status["plan_source"], "store", "{status}");
    for allocation in status_allocations(&status, "steady") {
        assert_eq!(allocation["adopted"], true, "{allocation}");
    }
    assert_exactly_these_processes(dir.path(), &before);

    // Control comes back on the same address: the agent reconnects and control hears that the
    // same allocations run.
    let restarted_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let control = restart_control(&control_dir, &listen, SHORT_NODE_TTL_SECS)?;
    agent.wait_for_status("the agent to reconnect", |status| {
        status["control"]["state"] == "connected"
    })?;
    wait_until(
        "control to hear afresh that both steady replicas run",
        START_TIMEOUT,
        || {
            control.allocations().is_ok_and(|allocations| {
                let running: Vec<&str> = allocations
                    .iter()
                    .filter(|a| a["service"] == "steady" && a["state"] == "running")
                    .filter(|a| {
                        a["reported_at_unix_ms"]
                            .as_u64()
                            .is_some_and(|at| at >= restarted_at_unix_ms)
                    })
                    .filter_map(|a| a["allocation_id"].as_str())
                    .collect();
                running.len() == 2 && running.iter().all(|id| before.contains_key(*id))
            })
        },
    )?;
    assert_exactly_these_processes(dir.path(), &before);
    Ok(())
}

#[test]
fn a_stopped_agent_catches_up_by_cursor_to_the_latest_plan() -> Result<()> {
    let dir = TestDir::new("offline-catch-up")?;
    let control = start_control(&dir, NODE_TTL_SECS)?;
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&format!(
        "[{}, {}]",
        sleeper("keeper", 1, "1"),
        sleeper("goner", 1, "1")
    ))?;
    let status = agent.wait_for_status("the agent to run keeper and goner", |status| {
        status_running_pids(status, "keeper").len() == 1
            && status_running_pids(status, "goner").len() == 1
    })?;
    let old_keeper = status_running_pids(&status, "keeper");
    let goner = status_running_pids(&status, "goner");

    // The agent stops (its workloads keep running) and the plan changes meanwhile.
    agent.stop(StopMode::Graceful);
    let stopped_at = cursor_event_id(&agent_status(&agent.data_dir)?).context("no cursor")?;
    control.apply_services(&sleeper("keeper", 1, "2"))?;
    control.remove_service("goner")?;
    let offline = agent_status(&agent.data_dir)?;
    assert_eq!(offline["agent"], "stopped");
    assert_eq!(
        cursor_event_id(&offline),
        Some(stopped_at),
        "the stopped agent still holds its old cursor"
    );
    let latest = wait_for_plan(&control, "edge", |plan| {
        plan.allocations.len() == 1
            && plan.allocations[0]
                .spec
                .env
                .get("VERSION")
                .map(String::as_str)
                == Some("2")
    })?;
    assert!(latest.as_of.event_id > stopped_at);

    // Started again, it catches up to the latest plan.
    agent.restart(&token, &["--node-id", "edge"])?;
    let status = agent.wait_for_status("the agent to run keeper version 2 only", |status| {
        let keeper = status_running_pids(status, "keeper");
        keeper.len() == 1
            && keeper
                .values()
                .all(|pid| version_of(*pid).as_deref() == Some("2"))
            && status_allocations(status, "goner").is_empty()
    })?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(latest.generation().as_str()),
        "the agent runs control's latest plan"
    );
    assert_eq!(
        cursor_epoch(&status),
        Some(format!("{:016x}", latest.as_of.log_epoch))
    );
    assert!(cursor_event_id(&status).unwrap_or(0) >= latest.as_of.event_id);
    let new_keeper = status_running_pids(&status, "keeper");
    assert_exactly_these_processes(dir.path(), &new_keeper);
    assert_eq!(
        new_keeper.keys().collect::<Vec<_>>(),
        old_keeper.keys().collect::<Vec<_>>(),
        "a spec update keeps the allocation"
    );
    wait_until(
        "the old keeper and the goner processes to be gone",
        COMMAND_TIMEOUT,
        || {
            old_keeper
                .values()
                .chain(goner.values())
                .all(|pid| !process_alive(*pid))
                && goner
                    .keys()
                    .all(|id| allocation_pids(dir.path(), id).is_empty())
        },
    )?;
    Ok(())
}

/// Waits until the agent's cursor is in `epoch` and it runs `service` at `version`, with one
/// process.
fn wait_for_epoch_and_version(
    agent: &mut AgentProcess,
    epoch: u64,
    service: &str,
    version: &str,
) -> Result<Value> {
    let epoch = format!("{epoch:016x}");
    let status = agent.wait_for_status(
        &format!("the agent to be at epoch {epoch} running {service} version {version}"),
        |status| {
            let running = status_running_pids(status, service);
            cursor_epoch(status).as_deref() == Some(epoch.as_str())
                && running.len() == 1
                && running
                    .values()
                    .all(|pid| version_of(*pid).as_deref() == Some(version))
        },
    )?;
    assert_exactly_these_processes(&agent.data_dir, &status_running_pids(&status, service));
    Ok(status)
}

#[test]
fn a_rotated_log_epoch_makes_the_agent_snapshot_and_converge() -> Result<()> {
    let dir = TestDir::new("offline-410")?;
    let control = start_control(&dir, NODE_TTL_SECS)?;
    let control_dir = control.data_dir.clone();
    let listen = control.listen_address().to_string();
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("epochal", 1, "1"))?;
    let status = agent.wait_for_status("the agent to run epochal", |status| {
        status_running_pids(status, "epochal").len() == 1 && status["cursor"].is_string()
    })?;
    let first_epoch = cursor_epoch(&status).context("no cursor")?;

    // Online: the admin API rotates the epoch; every cursor becomes 410 Gone.
    let second_epoch = control.rotate_epoch()?;
    assert_ne!(format!("{second_epoch:016x}"), first_epoch);
    wait_for_epoch_and_version(&mut agent, second_epoch, "epochal", "1")?;
    control.apply_services(&sleeper("epochal", 1, "2"))?;
    let status = wait_for_epoch_and_version(&mut agent, second_epoch, "epochal", "2")?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(control.node_plan("edge")?.generation().as_str())
    );

    // Offline: `outpost-control admin rotate-epoch` on the stopped control, as after a
    // restore; the agent's next poll gets 410 once control is back.
    control.stop(StopMode::Graceful);
    let mut rotate = Command::new(binary(CONTROL_BINARY)?);
    rotate
        .args(["admin", "rotate-epoch", "--data-dir"])
        .arg(&control_dir);
    run_with_timeout(rotate, None, COMMAND_TIMEOUT)?.expect_success("admin rotate-epoch")?;
    let control = restart_control(&control_dir, &listen, NODE_TTL_SECS)?;
    let third_epoch = control.node_plan("edge")?.as_of.log_epoch;
    assert_ne!(third_epoch, second_epoch);
    wait_for_epoch_and_version(&mut agent, third_epoch, "epochal", "2")?;
    control.apply_services(&sleeper("epochal", 1, "3"))?;
    let status = wait_for_epoch_and_version(&mut agent, third_epoch, "epochal", "3")?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(control.node_plan("edge")?.generation().as_str())
    );
    // The agent says how it crossed each epoch change: a 410, then the snapshot.
    let log = fs::read_to_string(agent.guard.log_path())?;
    let crossings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("resuming from the plan snapshot as of"))
        .collect();
    for epoch in [second_epoch, third_epoch] {
        assert!(
            crossings
                .iter()
                .any(|line| line.contains("410") && line.contains(&format!("{epoch:016x}."))),
            "no 410 crossing into epoch {epoch:016x} in the agent log: {crossings:?}"
        );
    }
    Ok(())
}

/// Copies a directory tree (a stopped control's data dir: redb file, admin files, CA).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[test]
fn a_control_restored_behind_the_agents_cursor_answers_410_and_the_agent_converges() -> Result<()> {
    let dir = TestDir::new("offline-restored")?;
    let control = start_control(&dir, NODE_TTL_SECS)?;
    let control_dir = control.data_dir.clone();
    let listen = control.listen_address().to_string();
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("kept", 1, "1"))?;
    agent.wait_for_status("the agent to run kept version 1", |status| {
        runs_one_at_version(status, "kept", "1")
    })?;

    // The operator backs control up (stopped, so the copy is consistent) and starts it again.
    control.stop(StopMode::Graceful);
    let backup_dir = dir.path().join("control-backup");
    copy_tree(&control_dir, &backup_dir)?;
    let control = restart_control(&control_dir, &listen, NODE_TTL_SECS)?;
    let backup_plan = control.node_plan("edge")?;

    // Work after the backup: the agent follows it, so its cursor passes the backup's head.
    control.apply_services(&sleeper("kept", 1, "2"))?;
    control.apply_services(&sleeper("lost", 1, "1"))?;
    control.apply_services(&sleeper("lost", 1, "2"))?;
    let status = agent.wait_for_status("the agent to run kept 2 and lost 2", |status| {
        runs_one_at_version(status, "kept", "2") && runs_one_at_version(status, "lost", "2")
    })?;
    let ahead = cursor_event_id(&status).context("no cursor")?;
    let ahead_epoch = cursor_epoch(&status).context("no cursor")?;
    assert!(
        ahead > backup_plan.as_of.event_id,
        "the agent's cursor {ahead} is past the backup's {}",
        backup_plan.as_of
    );
    let lost = status_running_pids(&status, "lost");

    // The data dir is restored from the backup without a new epoch: control's log is behind
    // the agent's cursor, in the same epoch.
    control.stop(StopMode::Graceful);
    fs::remove_dir_all(&control_dir)?;
    copy_tree(&backup_dir, &control_dir)?;
    let control = restart_control(&control_dir, &listen, NODE_TTL_SECS)?;
    let restored = control.node_plan("edge")?;
    assert_eq!(format!("{:016x}", restored.as_of.log_epoch), ahead_epoch);
    assert!(restored.as_of.event_id < ahead);

    // The agent's next poll is answered 410: it takes the restored plan, so what the restored
    // control does not hold is undone (lost stops, kept goes back to version 1).
    let status = agent.wait_for_status(
        "the agent to run the restored plan: kept version 1, no lost",
        |status| {
            runs_one_at_version(status, "kept", "1")
                && status_allocations(status, "lost").is_empty()
                && cursor_event_id(status).is_some_and(|id| id < ahead)
        },
    )?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(restored.generation().as_str()),
        "the agent runs the restored control's plan"
    );
    assert_exactly_these_processes(dir.path(), &status_running_pids(&status, "kept"));
    wait_until("the lost workload to stop", COMMAND_TIMEOUT, || {
        lost.values().all(|pid| !process_alive(*pid))
    })?;

    // From there it follows the restored control's new events, whose ids it had seen before in
    // the lineage that was thrown away.
    control.apply_services(&sleeper("kept", 1, "3"))?;
    let status = agent.wait_for_status("the agent to run kept version 3", |status| {
        runs_one_at_version(status, "kept", "3")
    })?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(control.node_plan("edge")?.generation().as_str())
    );
    assert_exactly_these_processes(dir.path(), &status_running_pids(&status, "kept"));

    // The agent says how it crossed: a 410 for its cursor past the head, then the snapshot.
    let log = fs::read_to_string(agent.guard.log_path())?;
    let crossing = log
        .lines()
        .find(|line| line.contains("resuming from the plan snapshot as of"))
        .with_context(|| format!("no crossing in the agent log:\n{log}"))?;
    for needle in [
        format!("cursor {ahead_epoch}."),
        "got 410 Gone".to_string(),
        "is past the log head".to_string(),
        "back to a log behind this node's cursor".to_string(),
    ] {
        assert!(crossing.contains(&needle), "{needle:?} not in {crossing:?}");
    }
    Ok(())
}

/// Overwrites every page after the first (the header stays, so the file is still recognisably
/// redb) with garbage.
fn corrupt_pages(path: &Path) -> Result<()> {
    const PAGE_BYTES: u64 = 4096;
    let length = fs::metadata(path)?.len();
    if length <= 2 * PAGE_BYTES {
        bail!("{} is only {length} bytes", path.display());
    }
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.seek(SeekFrom::Start(PAGE_BYTES))?;
    let garbage: Vec<u8> = (0..length - PAGE_BYTES)
        .map(|index| (index.wrapping_mul(2_654_435_761) >> 7) as u8 ^ 0xa5)
        .collect();
    file.write_all(&garbage)?;
    file.sync_all()?;
    Ok(())
}

#[test]
fn a_corrupt_store_boots_from_the_last_good_copy_and_says_so() -> Result<()> {
    let dir = TestDir::new("offline-corrupt")?;
    let control = start_control(&dir, NODE_TTL_SECS)?;
    let control_dir = control.data_dir.clone();
    let listen = control.listen_address().to_string();
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("durable", 1, "1"))?;
    // The plan is promoted (its generation shown) just after its processes start.
    let status = agent.wait_for_status("the agent to run durable", |status| {
        status_running_pids(status, "durable").len() == 1 && status["plan_generation"].is_string()
    })?;
    let generation = status["plan_generation"].clone();
    let allocation_id = status_running_pids(&status, "durable")
        .into_keys()
        .next()
        .unwrap();

    // Agent, workloads and control all stop; then the store is damaged.
    agent.stop(StopMode::Graceful);
    let mut stop_all = Command::new(binary(AGENT_BINARY)?);
    stop_all
        .args(["stop-all", "--data-dir"])
        .arg(&agent.data_dir);
    run_with_timeout(stop_all, None, COMMAND_TIMEOUT)?.expect_success("stop-all")?;
    assert!(allocation_pids(dir.path(), &allocation_id).is_empty());
    control.stop(StopMode::Graceful);
    corrupt_pages(&agent.data_dir.join("agent.redb"))?;

    // Status with the agent stopped already falls back to the copy.
    let offline = agent_status(&agent.data_dir)?;
    assert_eq!(offline["plan_source"], "last-good copy", "{offline}");
    assert_eq!(offline["plan_generation"], generation);

    // The agent boots with control down: its only source is the last-good copy.
    agent.restart(&token, &["--node-id", "edge"])?;
    let status = agent.wait_for_status("the agent to run durable from its copy", |status| {
        status_running_pids(status, "durable").len() == 1
    })?;
    assert_eq!(status["plan_generation"], generation);
    let health = status["store_health"].as_str().unwrap_or_default();
    assert!(
        health.starts_with("recovered from last-good copy"),
        "status does not report the recovery: {status}"
    );
    assert!(
        fs::read_dir(&agent.data_dir)?.flatten().any(|entry| entry
            .file_name()
            .to_string_lossy()
            .starts_with("agent.redb.corrupt-")),
        "the damaged store was not kept aside"
    );
    assert_exactly_these_processes(dir.path(), &status_running_pids(&status, "durable"));

    // Control returns: the recovered agent still holds its credential and follows changes.
    let control = restart_control(&control_dir, &listen, NODE_TTL_SECS)?;
    control.apply_services(&sleeper("durable", 1, "2"))?;
    let status = agent.wait_for_status("the recovered agent to apply a change", |status| {
        let running = status_running_pids(status, "durable");
        running.len() == 1
            && running
                .values()
                .all(|pid| version_of(*pid).as_deref() == Some("2"))
    })?;
    assert_exactly_these_processes(dir.path(), &status_running_pids(&status, "durable"));
    Ok(())
}
