//! The agent's life on an edge box, with the real binaries: boot never waits on the network
//! (a cached profile whose broker is a blackhole does not hold back the cached workloads, O2).
//!
//! Build the binaries first (with the `amqp` feature, as `scripts/test` does):
//! `cargo build --bins --all-features && cargo test -p outpost-fleet-tests`.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use outpost_fleet_tests::{
    AGENT_BINARY, AgentProcess, COMMAND_TIMEOUT, ControlProcess, StopMode, TestDir,
    allocation_pids, binary, run_with_timeout, sleeper_service, status_running_pids,
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
