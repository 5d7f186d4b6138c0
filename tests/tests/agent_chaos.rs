//! `kill -9` the real agent at random points while it applies a plan change, 50 times: the
//! last-good plan in its store is never lost nor rolled back, and the agent always converges
//! in the end with exactly one process per allocation.
//!
//! Each round changes the plan while the agent is down, starts the agent and kills it after a
//! random delay drawn from the time a full catch-up took on this machine, so the kills land
//! before registration, during the feed poll, between candidate and promotion, and after.
//! The seed is printed; `OUTPOST_CHAOS_SEED=N` replays a run, `OUTPOST_CHAOS_ROUNDS=N` runs
//! more (or fewer) rounds.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AGENT_BINARY, AgentProcess, COMMAND_TIMEOUT, CommandOutput, ControlProcess, START_TIMEOUT,
    StopMode, TestDir, agent_status, allocation_pids, binary, pids_with_environment,
    process_environment, process_under, run_with_timeout, status_running_pids, wait_for,
    wait_until,
};
use serde_json::{Value, json};

const DEFAULT_ROUNDS: usize = 50;
const NODE_ID: &str = "chaos-edge";
const SERVICE: &str = "churn";

/// The service at `round`: every round changes its environment, so every round is a new plan
/// generation that restarts the process.
fn churn(round: usize) -> String {
    json!({
        "name": SERVICE,
        "command": "/bin/sleep",
        "args": ["3600"],
        "memory_bytes": 1048576,
        "stop_grace_ms": 2000,
        "env": {"ROUND": round.to_string()},
    })
    .to_string()
}

/// A small xorshift generator: the test needs a reproducible spread of delays, nothing more.
struct Delays(u64);

impl Delays {
    fn next_below(&mut self, bound_ms: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(self.0 % bound_ms.max(1))
    }
}

fn rounds() -> usize {
    std::env::var("OUTPOST_CHAOS_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
}

fn seed() -> u64 {
    std::env::var("OUTPOST_CHAOS_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |elapsed| elapsed.as_nanos() as u64);
            (nanos ^ u64::from(std::process::id())) | 1
        })
}

/// Changes the plan and waits until control's plan for the node holds the change; returns its
/// generation.
fn change_plan(control: &ControlProcess, round: usize) -> Result<String> {
    control.apply_services(&churn(round))?;
    let round = round.to_string();
    wait_for(
        &format!("control's plan for {NODE_ID} to reach round {round}"),
        START_TIMEOUT,
        || {
            let plan = control.node_plan(NODE_ID).ok()?;
            let placed = plan.allocations.iter().any(|allocation| {
                allocation.service.as_str() == SERVICE
                    && allocation.spec.env.get("ROUND") == Some(&round)
            });
            placed.then(|| plan.generation())
        },
    )
}

/// The live `churn` processes started by this test's agent.
fn churn_processes(data_dir: &Path) -> Vec<u32> {
    pids_with_environment("OUTPOST_SERVICE", SERVICE)
        .into_iter()
        .filter(|pid| process_under(*pid, data_dir))
        .collect()
}

fn generation_of(status: &Value) -> Option<String> {
    status["plan_generation"].as_str().map(str::to_string)
}

#[test]
fn kill_9_while_applying_never_loses_the_last_good_plan_and_always_converges() -> Result<()> {
    let dir = TestDir::new("chaos")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "600"],
    )?;
    let token = control.enrollment_token()?;
    let arguments = ["--node-id", NODE_ID];
    let mut agent = AgentProcess::start(&dir.path().join("edge"), &token, &arguments)?;
    control.wait_for_nodes_ready(&[NODE_ID])?;

    // Round 0, uninterrupted: the agent reaches the plan; how long that took sets the range of
    // the kill delays.
    let mut history = vec![change_plan(&control, 0)?];
    agent.wait_for_status("the agent to run round 0", |status| {
        generation_of(status).as_ref() == history.last()
    })?;
    agent.stop(StopMode::Kill);
    history.push(change_plan(&control, 1)?);
    let started = Instant::now();
    agent.restart(&token, &arguments)?;
    agent.wait_for_status("the agent to catch up to round 1", |status| {
        generation_of(status).as_ref() == history.last() && status["agent"] == "running"
    })?;
    let catch_up = started.elapsed().min(Duration::from_secs(3));
    let bound_ms = (catch_up.as_millis() as u64).max(20);
    let seed = seed();
    eprintln!(
        "chaos: catch-up took {} ms; kill delays below {bound_ms} ms; OUTPOST_CHAOS_SEED={seed}",
        catch_up.as_millis()
    );
    let mut delays = Delays(seed);
    let rounds = rounds();

    let mut at = history.len() - 1;
    // The stored plan is the old one or the new one; when several changes were pending (the
    // agent was killed early in earlier rounds) it may be one between them. Never an older
    // one, never none.
    let (mut kept_old, mut in_between, mut reached_new) = (0, 0, 0);
    for round in 2..rounds + 2 {
        agent.stop(StopMode::Kill);
        history.push(change_plan(&control, round)?);
        agent.restart(&token, &arguments)?;
        let delay = delays.next_below(bound_ms);
        std::thread::sleep(delay);
        agent.stop(StopMode::Kill);

        let status = agent_status(&agent.data_dir)
            .with_context(|| format!("round {round}: status after kill -9 at {delay:?}"))?;
        let Some(generation) = generation_of(&status) else {
            bail!("round {round}: after kill -9 at {delay:?} the plan is gone: {status}");
        };
        let Some(index) = history.iter().rposition(|known| *known == generation) else {
            bail!("round {round}: generation {generation} is no plan control ever made: {status}");
        };
        if index < at {
            bail!(
                "round {round}: after kill -9 at {delay:?} the plan went back from round {at} to round {index}"
            );
        }
        if index == history.len() - 1 {
            reached_new += 1;
        } else if index == at {
            kept_old += 1;
        } else {
            in_between += 1;
        }
        at = index;
    }
    eprintln!(
        "chaos: {rounds} kills: {kept_old} kept the old plan, {in_between} one in between, {reached_new} had the new one"
    );

    // Started once more and left alone, the agent converges: the latest plan, its process
    // running, and every process of older rounds gone.
    agent.restart(&token, &arguments)?;
    let latest = (rounds + 1).to_string();
    let status = agent.wait_for_status("the agent to converge on the latest round", |status| {
        let running = status_running_pids(status, SERVICE);
        generation_of(status).as_ref() == history.last()
            && running.len() == 1
            && running.values().all(|pid| {
                process_environment(*pid).and_then(|env| env.get("ROUND").cloned())
                    == Some(latest.clone())
            })
    })?;
    let running = status_running_pids(&status, SERVICE);
    let (allocation_id, pid) = running.iter().next().unwrap();
    wait_until(
        "exactly one churn process, the latest, to be left",
        COMMAND_TIMEOUT,
        || churn_processes(&agent.data_dir) == vec![*pid],
    )
    .with_context(|| {
        format!(
            "churn processes left: {:?} (the agent runs {pid})",
            churn_processes(&agent.data_dir)
        )
    })?;
    assert_eq!(allocation_pids(dir.path(), allocation_id), vec![*pid]);
    Ok(())
}

/// The window the loop above hits only by chance, made certain: the agent starts workloads
/// through `outpost-agent __launch --hold-until-recorded`, which runs the program only once the
/// agent has recorded the start. A launcher whose agent died first (its stdin closes) runs
/// nothing, so no unrecorded twin survives a `kill -9`.
#[test]
fn a_launcher_whose_agent_died_before_recording_the_start_runs_nothing() -> Result<()> {
    let dir = TestDir::new("chaos-gate")?;
    let marker = dir.path().join("ran");
    let script = format!("echo ran > '{}'", marker.display());
    let launch = |go_ahead: &str| -> Result<CommandOutput> {
        let mut command = Command::new(binary(AGENT_BINARY)?);
        command.args([
            "__launch",
            "--hold-until-recorded",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ]);
        run_with_timeout(command, Some(go_ahead), COMMAND_TIMEOUT)
    };
    let abandoned = launch("")?;
    assert!(!abandoned.success(), "{abandoned:?}");
    assert!(
        abandoned.stderr.contains("went away"),
        "{}",
        abandoned.stderr
    );
    assert!(!marker.exists(), "the program ran without the go-ahead");
    launch("g")?.expect_success("a launcher given the go-ahead")?;
    assert!(
        marker.exists(),
        "the program did not run after the go-ahead"
    );
    Ok(())
}
