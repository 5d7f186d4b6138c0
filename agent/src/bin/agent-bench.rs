//! Agent benchmark: prints the figures issue 3 asks for (not a test; it asserts nothing).
//!
//! - time from starting `outpost-agent run` offline to every cached allocation spawned
//!   (measured outside, from spawn to status.json listing a pid for each, and inside, as the
//!   agent logs it from `main` to the end of the boot apply);
//! - idle RSS (VmRSS) of the agent running 3 allocations;
//! - size of the agent binary given (default: the static musl release build).
//!
//! Usage: agent-bench [AGENT_BINARY] [SIZE_BINARY]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost_agent::status::{AgentStatus, status_path};
use outpost_agent::store::{ApplyOutcome, ComponentApply, Store, last_good};
use outpost_proto::Cursor;
use outpost_proto::plan::{Allocation, Plan};
use outpost_proto::service::{RestartPolicy, ServiceSpec};

const ALLOCATIONS: usize = 3;
const RUNS: usize = 5;

fn name(text: &str) -> anyhow::Result<outpost_proto::Name> {
    outpost_proto::name::name("name", text).map_err(|e| anyhow::anyhow!("{e}"))
}

fn cached_plan() -> anyhow::Result<Plan> {
    let mut plan = Plan::empty(name("bench")?);
    plan.as_of = Cursor::new(1, 10);
    for index in 0..ALLOCATIONS {
        plan.allocations.push(Allocation {
            id: name(&format!("sleeper-{index}"))?,
            node_id: name("bench")?,
            service: name("sleeper")?,
            seq: 1,
            spec: ServiceSpec {
                name: name("sleeper")?,
                process_type: name("web")?,
                command: "/bin/sleep".into(),
                args: vec!["3600".into()],
                env: Default::default(),
                replicas: outpost_proto::service::Replicas::Count(1),
                memory_bytes: 0,
                cpu_millis: 0,
                wave: 0,
                readiness: None,
                restart: RestartPolicy::Always,
                stop_grace_ms: 1000,
                working_dir: None,
                ports: Vec::new(),
                selector: Default::default(),
                reschedule: Default::default(),
                reschedule_after_secs: None,
                artifact: None,
                rollout: None,
                secrets: Vec::new(),
            },
        });
    }
    Ok(plan)
}

fn seed(dir: &std::path::Path, plan: &Plan) -> anyhow::Result<()> {
    let (store, _) = Store::open_for_boot(dir)?;
    store.write_candidate(plan)?;
    store.promote_candidate(&ComponentApply {
        generation: plan.generation(),
        status: ApplyOutcome::Ok,
        message: String::new(),
        at_unix: outpost_agent::os::unix_now_secs(),
    })?;
    last_good::write(dir, plan)?;
    store.close();
    Ok(())
}

fn read_status(dir: &std::path::Path) -> Option<AgentStatus> {
    serde_json::from_slice(&std::fs::read(status_path(dir)).ok()?).ok()
}

fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

struct Run {
    outside_ms: f64,
    inside_ms: Option<u64>,
    rss_kib: Option<u64>,
    /// The agent's own `boot timeline` line: when each boot phase ended.
    timeline: Option<String>,
}

fn one_run(agent: &PathBuf, measure_rss: bool) -> anyhow::Result<Run> {
    let dir = std::env::temp_dir().join(format!(
        "agent-bench-{}-{}",
        std::process::id(),
        outpost_agent::os::random_u64()
    ));
    std::fs::create_dir_all(&dir)?;
    seed(&dir, &cached_plan()?)?;
    let started = Instant::now();
    let mut child = Command::new(agent)
        .args(["run", "--data-dir"])
        .arg(&dir)
        .args(["--status-listen", "127.0.0.1:0", "--node-id", "bench"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", agent.display()))?;
    let deadline = started + Duration::from_secs(10);
    let outside = loop {
        if let Some(status) = read_status(&dir)
            && status.allocations.len() == ALLOCATIONS
            && status.allocations.iter().all(|a| a.pid.is_some())
        {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("allocations were not spawned within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let mut rss_kib = None;
    if measure_rss {
        // Let it settle: a few supervisor ticks with 3 allocations and no control.
        std::thread::sleep(Duration::from_secs(3));
        rss_kib = Some(vm_rss_kib(child.id())?);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = child.wait();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let inside_ms = stderr
        .lines()
        .find(|line| line.contains(" booted from "))
        .and_then(|line| line.split(" in ").nth(1))
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.trim().parse().ok());
    let timeline = stderr
        .lines()
        .find_map(|line| line.split_once("boot timeline, ms since process start: "))
        // The line's structured fields (logging.rs) follow the phases.
        .map(|(_, phases)| {
            phases
                .split(" component=")
                .next()
                .unwrap_or(phases)
                .to_string()
        });
    let _ = Command::new(agent)
        .args(["stop-all", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run {
        outside_ms: outside.as_secs_f64() * 1000.0,
        inside_ms,
        rss_kib,
        timeline,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let here = std::env::current_exe()?;
    let sibling = here.with_file_name("outpost-agent");
    let agent = args.first().map(PathBuf::from).unwrap_or(sibling);
    let size_binary = args.get(1).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-musl/release/outpost-agent")
    });
    println!("agent binary: {}", agent.display());
    match std::fs::metadata(&size_binary) {
        Ok(meta) => println!(
            "binary size: {} bytes ({:.2} MiB) for {} (target < 4 MiB)",
            meta.len(),
            meta.len() as f64 / 1048576.0,
            size_binary.display()
        ),
        Err(error) => println!(
            "binary size: {} not found ({error}); build it with cargo build -p outpost-agent --release --target x86_64-unknown-linux-musl",
            size_binary.display()
        ),
    }
    let mut outside = Vec::new();
    let mut inside = Vec::new();
    let mut rss = None;
    for run in 0..RUNS {
        let result = one_run(&agent, run == 0)?;
        println!(
            "run {}: {:.1} ms outside; boot timeline (ms since process start): {}",
            run + 1,
            result.outside_ms,
            result.timeline.as_deref().unwrap_or("?")
        );
        outside.push(result.outside_ms);
        inside.extend(result.inside_ms);
        rss = rss.or(result.rss_kib);
    }
    outside.sort_by(f64::total_cmp);
    inside.sort();
    println!(
        "offline boot to {ALLOCATIONS} cached allocations spawned, {RUNS} runs: median {:.1} ms outside (spawn → status.json lists every pid), median {} ms inside (main → boot apply done) (target < 50 ms)",
        outside[RUNS / 2],
        inside
            .get(inside.len() / 2)
            .map_or("?".to_string(), |ms| ms.to_string()),
    );
    if let Some(kib) = rss {
        println!(
            "idle RSS with {ALLOCATIONS} allocations: {kib} KiB ({:.2} MiB) (target < 8 MiB)",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}
