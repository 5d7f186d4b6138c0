//! The agent's life on an edge box, with the real binaries: boot never waits on the network
//! (a cached profile whose broker is a blackhole does not hold back the cached workloads, O2);
//! after a power cut, an offline reboot spawns each cached workload again exactly once and the
//! status port answers; a revoked node says so and keeps its last-good workloads (P9, P10);
//! status says when cgroup limits are unavailable; a chatty workload's log stays capped.
//!
//! Build the binaries first (with the `amqp` feature, as `scripts/test` does):
//! `cargo build --bins --all-features && cargo test -p outpost-fleet-tests`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AGENT_BINARY, AgentProcess, COMMAND_TIMEOUT, ControlProcess, START_TIMEOUT, StopMode, TestDir,
    allocation_pids, assert_exactly_these_processes, binary, process_alive, run_with_timeout,
    sleeper_service, status_allocations, status_running_pids, wait_until,
};
use serde_json::Value;

/// Long enough that stopping an agent for a moment never gets its node marked down.
const NODE_TTL_SECS: &str = "60";

/// A sleeping service.
fn sleeper(name: &str, replicas: u32) -> String {
    sleeper_service(name, replicas, &[])
}

fn start_control(dir: &TestDir) -> Result<ControlProcess> {
    ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS],
    )
}

/// `outpost-agent stop-all --data-dir D`: stops every workload the agent recorded.
fn stop_all(data_dir: &Path) -> Result<()> {
    let mut command = Command::new(binary(AGENT_BINARY)?);
    command.args(["stop-all", "--data-dir"]).arg(data_dir);
    run_with_timeout(command, None, COMMAND_TIMEOUT)?.expect_success("stop-all")?;
    Ok(())
}

/// The agent's status notes, as one text.
fn notes(status: &Value) -> String {
    status["notes"]
        .as_array()
        .map(|notes| {
            notes
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A TCP listener on loopback that accepts connections and never answers, until closed.
struct Blackhole {
    port: u16,
    held: Arc<Mutex<Vec<TcpStream>>>,
    closed: Arc<AtomicBool>,
}

impl Blackhole {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let (thread_held, thread_closed) = (held.clone(), closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_closed.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    thread_held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(stream);
                }
            }
        });
        Ok(Self { port, held, closed })
    }

    fn accepted(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Closes every connection it holds and stops listening.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `closed` and drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.close();
    }
}

/// A cached profile with a broker exchange, so the boot run calls the broker.
const PROFILE_WITH_A_BROKER: &str = r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile",
  "metadata":{"name":"site"},
  "spec":{"broker":{"exchanges":[{"name":"events"}]}}}"#;

#[test]
fn a_blackholed_broker_never_holds_back_the_cached_workloads_at_boot() -> Result<()> {
    let dir = TestDir::new("boot-blackhole")?;
    let control = start_control(&dir)?;
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("steady", 1))?;
    agent.wait_for_status("the agent to run steady and promote its plan", |status| {
        status_running_pids(status, "steady").len() == 1 && status["plan_generation"].is_string()
    })?;

    // Everything goes down; the box boots again offline with a cached profile whose broker
    // accepts connections and never answers.
    agent.stop(StopMode::Kill);
    stop_all(&agent.data_dir)?;
    control.stop(StopMode::Graceful);
    fs::write(agent.data_dir.join("profile.json"), PROFILE_WITH_A_BROKER)?;
    let broker = Blackhole::start()?;
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/", broker.port);
    agent.restart_with_environment(&token, &["--node-id", "edge"], &[("AMQP_URL", &amqp_url)])?;

    // The workload runs while the broker step is still waiting on the blackhole.
    let status = agent.wait_for_status(
        "steady to run while the profile's boot run still waits on the broker",
        |status| {
            status_running_pids(status, "steady").len() == 1
                && notes(status).contains("boot run was still going")
        },
    )?;
    assert!(
        broker.accepted() >= 1,
        "the boot run never reached the broker: {status}"
    );
    assert_eq!(status["plan_source"], "store", "{status}");
    let running = status_running_pids(&status, "steady");
    for (allocation_id, pid) in &running {
        assert_eq!(allocation_pids(dir.path(), allocation_id), vec![*pid]);
    }
    let log = fs::read_to_string(agent.data_dir.with_extension("log")).unwrap_or_default();
    if let Some(line) = log.lines().rev().find(|line| line.contains("booted from")) {
        println!("{line}");
    }

    // The broker goes away: the run ends, reports the failed broker, and the workload that
    // started without it keeps running.
    broker.close();
    let status = agent.wait_for_status("the boot run to end and report the broker", |status| {
        let notes = notes(status);
        notes.contains("broker failed") && !notes.contains("boot run was still going")
    })?;
    assert_eq!(
        status_running_pids(&status, "steady"),
        running,
        "the workload is the one that started at boot"
    );
    assert_eq!(
        status["components"]["broker"]["status"], "error",
        "{status}"
    );
    Ok(())
}

/// `GET path` on the agent's local status port (its address is in `DATA_DIR/status.addr`).
fn status_port_get(data_dir: &Path, path: &str) -> Result<(u16, Value)> {
    let addr = fs::read_to_string(data_dir.join("status.addr"))?;
    let addr = addr.trim();
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {answer:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, serde_json::from_str(body)?))
}

#[test]
fn after_a_power_cut_an_offline_reboot_spawns_each_cached_workload_once() -> Result<()> {
    let dir = TestDir::new("power-cut")?;
    let control = start_control(&dir)?;
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("steady", 2))?;
    let status = agent.wait_for_status("two steady replicas and the promoted plan", |status| {
        status_running_pids(status, "steady").len() == 2 && status["plan_generation"].is_string()
    })?;
    let before = status_running_pids(&status, "steady");
    let generation = status["plan_generation"].clone();

    // The power goes: control, the agent and its workloads all die at once, nobody cleans up.
    control.stop(StopMode::Kill);
    agent.stop(StopMode::Kill);
    for pid in before.values() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until("the workloads to be dead", START_TIMEOUT, || {
        before.values().all(|pid| !process_alive(*pid))
    })?;
    for allocation_id in before.keys() {
        assert!(allocation_pids(dir.path(), allocation_id).is_empty());
    }

    // The box boots with control still down: the agent starts each workload again from its
    // store (the recorded processes are gone, so none is adopted).
    agent.restart(&token, &["--node-id", "edge"])?;
    let status = agent.wait_for_status("both replicas spawned again from the cache", |status| {
        let allocations = status_allocations(status, "steady");
        status_running_pids(status, "steady").len() == 2
            && allocations
                .iter()
                .all(|allocation| allocation["adopted"] == false)
    })?;
    assert_eq!(status["plan_source"], "store", "{status}");
    assert_eq!(status["plan_generation"], generation);
    let after = status_running_pids(&status, "steady");
    assert_eq!(
        after.keys().collect::<BTreeSet<_>>(),
        before.keys().collect::<BTreeSet<_>>(),
        "the same allocations"
    );
    assert_exactly_these_processes(dir.path(), &after);

    // Exactly once: after the agent has tried control and found it down, still one process
    // each, the same ones.
    let status = agent.wait_for_status("the agent to find control unreachable", |status| {
        status["control"]["state"] == "unreachable"
    })?;
    assert_eq!(status_running_pids(&status, "steady"), after);
    assert_exactly_these_processes(dir.path(), &after);
    for allocation in status_allocations(&status, "steady") {
        assert_eq!(allocation["restarts"], 0, "{allocation}");
    }

    // The running agent answers on its status port, offline.
    let (code, health) = status_port_get(&agent.data_dir, "/health")?;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["node_id"], "edge");
    let (code, bootstrap) = status_port_get(&agent.data_dir, "/internal/bootstrap/status")?;
    assert_eq!(code, 200, "{bootstrap}");
    assert_eq!(bootstrap["node_id"], "edge");
    let (code, missing) = status_port_get(&agent.data_dir, "/nope")?;
    assert_eq!(code, 404, "{missing}");
    Ok(())
}

/// The node's row in `outpostctl nodes --json`.
fn node_row(control: &ControlProcess, node_id: &str) -> Result<Value> {
    let nodes = control
        .outpostctl(&["nodes", "--json"])?
        .expect_success("outpostctl nodes")?
        .json()?;
    nodes
        .as_array()
        .and_then(|nodes| nodes.iter().find(|node| node["node_id"] == node_id))
        .cloned()
        .with_context(|| format!("no node {node_id} in {nodes}"))
}

#[test]
fn a_revoked_node_says_so_and_keeps_its_last_good_workloads() -> Result<()> {
    let dir = TestDir::new("revoked")?;
    // Heartbeats every 3 s, so the agent hears of the revocation soon.
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "9"],
    )?;
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &["--node-id", "edge"])?;
    control.apply_services(&sleeper("kept", 1))?;
    let status = agent.wait_for_status("kept to run and the agent to be connected", |status| {
        status_running_pids(status, "kept").len() == 1 && status["control"]["state"] == "connected"
    })?;
    let running = status_running_pids(&status, "kept");

    control
        .outpostctl(&["nodes", "revoke", "edge"])?
        .expect_success("outpostctl nodes revoke")?;
    assert_eq!(node_row(&control, "edge")?["state"], "revoked");
    let status = agent.wait_for_status("the agent to say it was revoked", |status| {
        status["control"]["state"] == "revoked"
    })?;
    let note = notes(&status);
    assert!(
        note.contains("revoked by control") && note.contains("stop-all"),
        "{status}"
    );

    // It keeps saying so while it retries (its enrollment token is spent), and the workload of
    // its last-good plan keeps running: the same process, not restarted.
    let mut errors = BTreeSet::new();
    let mut flipped = None;
    wait_until(
        "the agent to retry twice while revoked",
        START_TIMEOUT,
        || {
            let Ok(status) = agent.status() else {
                return false;
            };
            if status["control"]["state"] != "revoked" {
                flipped.get_or_insert(status.clone());
            }
            if let Some(error) = status["control"]["last_error"].as_str() {
                errors.insert(error.to_string());
            }
            errors.len() >= 2
        },
    )?;
    if let Some(status) = flipped {
        bail!("a revoked agent showed another state: {status}");
    }
    let status = agent.status()?;
    assert_eq!(status_running_pids(&status, "kept"), running, "{status}");
    assert_exactly_these_processes(dir.path(), &running);

    // Restarted, it is still revoked from the start and adopts the same workload.
    agent.restart(&token, &["--node-id", "edge"])?;
    let status = agent.wait_for_status("the restarted agent to adopt kept", |status| {
        status_running_pids(status, "kept") == running
    })?;
    assert_eq!(status["control"]["state"], "revoked", "{status}");
    assert!(notes(&status).contains("revoked by control"), "{status}");
    assert_exactly_these_processes(dir.path(), &running);
    Ok(())
}

/// A workload that prints fixed-width numbered lines (`line 00000001 …`, 55 bytes each) in
/// bursts of 64 with a short pause between bursts.
fn chatty(name: &str) -> String {
    serde_json::json!({
        "name": name,
        "command": "/bin/sh",
        "args": ["-c", "i=0; while :; do j=0; while [ $j -lt 64 ]; do i=$((i+1)); j=$((j+1)); printf 'line %08d %s\\n' $i 0123456789012345678901234567890123456789; done; sleep 0.1; done"],
        "replicas": 1,
        "memory_bytes": 8388608,
    })
    .to_string()
}
const CHATTY_LINE_BYTES: u64 = 55;
const LOG_CAP_BYTES: u64 = 4096;

/// The number of the first and of the last whole line in a log file.
fn line_numbers(path: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let numbers: Vec<u64> = text
        .lines()
        .filter(|line| line.len() as u64 == CHATTY_LINE_BYTES - 1)
        .filter_map(|line| line.split(' ').nth(1)?.parse().ok())
        .collect();
    Some((*numbers.first()?, *numbers.last()?))
}

fn file_bytes(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |metadata| metadata.len())
}

#[test]
fn a_chatty_workload_log_stays_capped_and_status_says_limits_are_unavailable() -> Result<()> {
    let dir = TestDir::new("log-cap")?;
    let control = start_control(&dir)?;
    let token = control.enrollment_token()?;
    // A cgroup root that is a plain folder: limits are unavailable and status must say why.
    let not_cgroupfs = dir.subdir("not-cgroupfs")?;
    let cap = LOG_CAP_BYTES.to_string();
    let mut agent = AgentProcess::start_with_environment(
        &dir.path().join("edge"),
        &token,
        &["--node-id", "edge"],
        &[
            ("OUTPOST_LOG_CAP_BYTES", cap.as_str()),
            (
                "OUTPOST_CGROUP_ROOT",
                not_cgroupfs.to_str().context("path")?,
            ),
        ],
    )?;
    control.apply_services(&chatty("chatty"))?;
    let status = agent.wait_for_status("chatty to run", |status| {
        status_running_pids(status, "chatty").len() == 1
    })?;
    let note = notes(&status);
    assert!(
        note.contains("cgroup limits unavailable: ")
            && note.contains(&format!(
                "{} is not a cgroup2 file system",
                not_cgroupfs.display()
            )),
        "{status}"
    );
    let (allocation_id, _) = status_running_pids(&status, "chatty")
        .into_iter()
        .next()
        .context("no chatty allocation")?;
    let log_dir = agent.data_dir.join("allocations").join(&allocation_id);
    let (log, rotated) = (log_dir.join("stdout.log"), log_dir.join("stdout.log.1"));

    // Let it write 64 times the cap, watching each rotation the agent makes.
    let mut rotations = BTreeSet::new();
    let mut written = 0;
    wait_until(
        "chatty to write 64 times the log cap",
        START_TIMEOUT,
        || {
            if let Some((first, _)) = line_numbers(&rotated) {
                rotations.insert(first);
            }
            let newest = line_numbers(&log)
                .or(line_numbers(&rotated))
                .map_or(0, |(_, last)| last);
            written = newest * CHATTY_LINE_BYTES;
            written >= 64 * LOG_CAP_BYTES
        },
    )?;
    // The agent rotated the log again and again while the workload kept writing, and what is
    // kept stays a small part of what was written (each file holds at most the cap plus what
    // arrives within one supervision tick).
    assert!(
        rotations.len() >= 3,
        "rotations seen (first line of stdout.log.1): {rotations:?}"
    );
    let kept = file_bytes(&log) + file_bytes(&rotated);
    assert!(
        kept <= written / 4,
        "{kept} bytes kept of {written} written (cap {LOG_CAP_BYTES})"
    );
    // The workload was never restarted for it.
    let status = agent.status()?;
    assert_eq!(
        status_allocations(&status, "chatty")[0]["restarts"],
        0,
        "{status}"
    );
    Ok(())
}
