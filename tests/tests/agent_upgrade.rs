//! Signed agent self-update (U2) with the real binaries. Two agents run under a fake of
//! systemd's `Restart=always` (a shell loop that starts `DATA_DIR/agent/current` again whenever
//! it exits: the stand-in for the unit in images/systemd, which this machine cannot run). A
//! second agent binary (the same code built with a version marker,
//! `OUTPOST_AGENT_BUILD_MARKER`) is pushed, signed with the release key control handed out at
//! enrollment, and rolled out one node at a time: both end on it, `outpostctl agents` shows its
//! version on both, and their workloads' pids are unchanged. Then a signed binary that exits at
//! once: its box retries it up to the boot counter's limit, rolls back by itself and says so, and
//! the upgrade halts before the second box. Then a signed build that boots but never reports
//! healthy (built with the test fault `OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY`, the stand-in for
//! a binary that hangs): its box goes back to the previous binary when the health deadline
//! passes, and the upgrade halts. A signed binary for another architecture and a binary signed
//! with another key are refused by every box, and an unknown artifact is a 4xx.
//!
//! The marker builds are made by this test with cargo in their own target dir
//! (`target/agent-upgrade-builds`, so `target/debug/outpost-agent`, which other tests run, is
//! never overwritten; its dependencies are compiled there once and reused by later runs).
//!
//! Prints the time from the upgrade command to every agent on the new binary and how long the
//! workloads were without an agent during each switch (from the new binary's boot timeline).
//!
//! Build the binaries first: `cargo build --bins --all-features`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AGENT_BINARY, AGENT_ENVIRONMENT, COMMAND_TIMEOUT, CONTROL_BINARY, ControlProcess, ProcessGuard,
    START_TIMEOUT, StopMode, TestDir, agent_status, binary, process_alive, run_with_timeout,
    status_running_pids, stop_all_workloads, wait_for,
};
use serde_json::{Value, json};

/// The version marker of the second build.
const V2_MARKER: &str = "upgrade-test-v2";
/// The health deadline the agents get (`OUTPOST_UPGRADE_DEADLINE_SECS`): long enough for a
/// good binary to register on a loaded machine, short enough for the hang case.
const HEALTH_DEADLINE_SECS: u64 = 15;
/// How long a marker build of the agent may take (the first one compiles its dependencies).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Builds the agent with `OUTPOST_AGENT_BUILD_MARKER=marker` (and the given extra build-time
/// variables) in its own target dir and copies the binary to `out`. A lock file serialises
/// builds and copies of concurrent runs, since each build replaces the binary in that dir.
fn build_marker_agent(marker: &str, extra: &[(&str, &str)], out: &Path) -> Result<()> {
    // Canonical, so every run names the same target dir and reuses its dependencies.
    let workspace = std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| workspace.join("target"), PathBuf::from)
        .join("agent-upgrade-builds");
    std::fs::create_dir_all(&target)?;
    let lock = std::fs::File::create(target.join("build.lock"))?;
    lock.lock().context("locking the marker build dir")?;
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&workspace)
        .args(["build", "-p", "outpost-agent", "--bin", "outpost-agent"])
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_INCREMENTAL", "0")
        .env("OUTPOST_AGENT_BUILD_MARKER", marker)
        .env_remove("OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY");
    for (name, value) in extra {
        cargo.env(name, value);
    }
    run_with_timeout(cargo, None, BUILD_TIMEOUT)?
        .expect_success(&format!("cargo build of the agent with marker {marker}"))?;
    std::fs::copy(target.join("debug/outpost-agent"), out)
        .with_context(|| format!("copying the {marker} build to {}", out.display()))?;
    Ok(())
}

/// An agent started through the stable link by the fake service manager.
struct SupervisedAgent {
    guard: ProcessGuard,
    data_dir: PathBuf,
}

impl SupervisedAgent {
    fn start(data_dir: &Path, token: &str, node_id: &str) -> Result<Self> {
        let slots = data_dir.join("agent");
        std::fs::create_dir_all(&slots)?;
        let current = slots.join("current");
        std::os::unix::fs::symlink(binary(AGENT_BINARY)?, &current)?;
        let mut command = Command::new("/bin/sh");
        command
            // Restart=always, RestartSec=0.2: whatever `current` is when the agent exits.
            .args(["-c", r#"while :; do "$0" "$@"; sleep 0.2; done"#])
            .arg(&current)
            .arg("run")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--enroll", token, "--status-listen", "127.0.0.1:0"])
            .args(["--no-overlay", "--node-id", node_id]);
        for variable in AGENT_ENVIRONMENT {
            command.env_remove(variable);
        }
        command.env(
            "OUTPOST_UPGRADE_DEADLINE_SECS",
            HEALTH_DEADLINE_SECS.to_string(),
        );
        Ok(Self {
            guard: ProcessGuard::spawn(
                "outpost-agent under a fake systemd",
                command,
                &data_dir.with_extension("log"),
            )?,
            data_dir: data_dir.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.guard.log_path()).unwrap_or_default()
    }
}

impl Drop for SupervisedAgent {
    fn drop(&mut self) {
        self.guard.stop(StopMode::Graceful);
        stop_all_workloads(&self.data_dir);
    }
}

fn push(control: &ControlProcess, file: &Path) -> Result<String> {
    let pushed = control
        .outpostctl(&["artifacts", "push", &file.display().to_string(), "--json"])?
        .expect_success("outpostctl artifacts push")?
        .json()?;
    pushed["sha256"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("push printed no sha256: {pushed}"))
}

fn sign(control: &ControlProcess, key: &Path, sha256: &str) -> Result<String> {
    let output = control
        .outpostctl(&[
            "artifacts",
            "sign",
            "--key",
            &key.display().to_string(),
            sha256,
        ])?
        .expect_success("outpostctl artifacts sign")?;
    Ok(output.stdout.trim().to_string())
}

fn release_key(dir: &TestDir, name: &str) -> Result<PathBuf> {
    let key = dir.path().join(name);
    let mut command = Command::new(binary(CONTROL_BINARY)?);
    command.args(["admin", "release-key", "--out"]).arg(&key);
    run_with_timeout(command, None, COMMAND_TIMEOUT)?.expect_success("admin release-key")?;
    Ok(key)
}

fn agents(control: &ControlProcess) -> Result<Value> {
    control
        .outpostctl(&["agents", "--json"])?
        .expect_success("outpostctl agents")?
        .json()
}

fn node<'a>(agents: &'a Value, node_id: &str) -> &'a Value {
    agents["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == node_id))
        .unwrap_or(&Value::Null)
}

/// `outpostctl agents upgrade` one node at a time.
fn upgrade(control: &ControlProcess, sha256: &str, signature: &str) -> Result<()> {
    upgrade_batched(control, sha256, signature, 1)
}

fn upgrade_batched(
    control: &ControlProcess,
    sha256: &str,
    signature: &str,
    max_parallel: u32,
) -> Result<()> {
    control
        .outpostctl(&[
            "agents",
            "upgrade",
            "--artifact",
            sha256,
            "--signature",
            signature,
            "--max-parallel",
            &max_parallel.to_string(),
        ])?
        .expect_success(&format!("outpostctl agents upgrade --artifact {sha256}"))?;
    Ok(())
}

/// Waits until the org's latest upgrade is in `state` and `check` holds on the listing.
fn wait_for_upgrade(
    control: &ControlProcess,
    state: &str,
    mut check: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    wait_for(
        &format!("the agent upgrade to be {state}"),
        START_TIMEOUT * 2,
        || {
            let listing = agents(control).ok()?;
            last = listing.clone();
            let now = listing["upgrade"]["state"].as_str().unwrap_or("none");
            if now != state && now != "progressing" {
                return Some(Err(anyhow::anyhow!(
                    "the agent upgrade is {now}, not {state}"
                )));
            }
            (now == state && check(&listing)).then_some(Ok(listing))
        },
    )
    .and_then(|found| found)
    .with_context(|| format!("last listing: {last:#}"))
}

/// Waits until the upgrade to `sha256` halted with both boxes refusing it with a message that
/// contains `reason`, each still on `running_sha`.
fn refused_by_both(
    control: &ControlProcess,
    sha256: &str,
    reason: &str,
    running_sha: &str,
) -> Result<()> {
    let refused = wait_for_upgrade(control, "halted", |listing| {
        ["a1", "a2"].iter().all(|id| {
            let upgrade = &node(listing, id)["agent"]["upgrade"];
            upgrade["target_sha256"] == sha256 && upgrade["state"] == "refused"
        })
    })?;
    for id in ["a1", "a2"] {
        let view = &node(&refused, id)["agent"];
        let message = view["upgrade"]["message"].as_str().unwrap_or("");
        assert!(message.contains(reason), "{refused:#}");
        assert_eq!(view["sha256"], running_sha, "{refused:#}");
    }
    Ok(())
}

/// The workload pids of every agent, by node.
fn workload_pids(agents: &[&SupervisedAgent]) -> Result<BTreeMap<PathBuf, BTreeMap<String, u32>>> {
    agents
        .iter()
        .map(|a| {
            Ok((
                a.data_dir.clone(),
                status_running_pids(&agent_status(&a.data_dir)?, "sleeper"),
            ))
        })
        .collect()
}

/// From the agent log after its last "switching to": the new binary's boot timeline marks for
/// adopting the workloads and for the supervision threads running, in ms since it started.
fn switch_gap_ms(log: &str) -> Option<(f64, f64)> {
    let after = &log[log.rfind("switching to")?..];
    let line = after.lines().find(|l| l.contains("boot timeline"))?;
    let mark = |name: &str| -> Option<f64> {
        let at = line.find(&format!("{name} "))? + name.len() + 1;
        line[at..]
            .split(|c: char| c == ',' || c.is_whitespace())
            .next()?
            .parse()
            .ok()
    };
    Some((mark("adopt")?, mark("threads")?))
}

#[test]
fn agents_upgrade_in_batches_and_a_bad_binary_rolls_back_by_itself() -> Result<()> {
    let dir = TestDir::new("agent-upgrade")?;
    let key = release_key(&dir, "release.key")?;
    let public = format!("{}.pub", key.display());
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "6", "--release-public-key", &public],
    )?;
    let (t1, t2) = (control.enrollment_token()?, control.enrollment_token()?);
    let a1 = SupervisedAgent::start(&dir.path().join("a1"), &t1, "a1")?;
    let a2 = SupervisedAgent::start(&dir.path().join("a2"), &t2, "a2")?;
    control.wait_for_nodes_ready(&["a1", "a2"])?;
    control.apply_services(
        &json!({
            "name": "sleeper",
            "command": "/bin/sleep",
            "args": ["3600"],
            "replicas": "all",
            "memory_bytes": 1048576,
        })
        .to_string(),
    )?;
    let both = [&a1, &a2];
    // Upgraded right away: an agent whose plan is still on probation (R4) waits with the switch
    // until the plan is the last-good one (a switch is a boot, and boot drops a plan on
    // probation), so the workloads keep their pids.
    let before = wait_for("a sleeper running on each box", START_TIMEOUT, || {
        let pids = workload_pids(&both).ok()?;
        pids.values().all(|p| p.len() == 1).then_some(pids)
    })?;
    let listing = agents(&control)?;
    for id in ["a1", "a2"] {
        let agent = &node(&listing, id)["agent"];
        if agent["version"].as_str().is_none_or(str::is_empty)
            || agent["version"]
                .as_str()
                .is_some_and(|v| v.contains(V2_MARKER))
            || !agent["sha256"].is_null()
        {
            bail!("node {id} should report its version and no upgraded binary: {listing:#}");
        }
    }

    // An unknown artifact is a 4xx, and nothing starts.
    let unknown = "0".repeat(64);
    let refused = control
        .outpostctl(&[
            "agents",
            "upgrade",
            "--artifact",
            &unknown,
            "--signature",
            "AAAA",
        ])?
        .expect_failure("an upgrade to an unknown artifact")?;
    assert!(
        refused.stderr.contains("artifact") && refused.stderr.contains(&unknown),
        "{}",
        refused.stderr
    );
    assert!(agents(&control)?["upgrade"].is_null());

    // The new binary: the same code with a version marker built in.
    let v2 = dir.path().join("outpost-agent-v2");
    build_marker_agent(V2_MARKER, &[], &v2)?;
    let never_healthy = dir.path().join("outpost-agent-never-healthy");
    build_marker_agent(
        "upgrade-test-never-healthy",
        &[("OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY", "1")],
        &never_healthy,
    )?;
    let v2_version = format!("{}+{V2_MARKER}", env!("CARGO_PKG_VERSION"));
    let v2_sha = push(&control, &v2)?;
    let v2_signature = sign(&control, &key, &v2_sha)?;
    let started = Instant::now();
    upgrade(&control, &v2_sha, &v2_signature)?;
    let done = wait_for_upgrade(&control, "completed", |listing| {
        ["a1", "a2"]
            .iter()
            .all(|id| node(listing, id)["agent"]["sha256"] == v2_sha.as_str())
    })?;
    let rollout_secs = started.elapsed().as_secs_f64();
    assert_eq!(done["upgrade"]["updated"], 2, "{done:#}");
    // Both boxes report the marker build's version, in JSON and in the table.
    let versions = wait_for(
        "both agents to report the new version",
        START_TIMEOUT,
        || {
            let listing = agents(&control).ok()?;
            ["a1", "a2"]
                .iter()
                .all(|id| node(&listing, id)["agent"]["version"] == v2_version.as_str())
                .then_some(listing)
        },
    )?;
    let table = control
        .outpostctl(&["agents"])?
        .expect_success("outpostctl agents")?
        .stdout;
    for id in ["a1", "a2"] {
        let row = table
            .lines()
            .find(|line| line.starts_with(id))
            .with_context(|| format!("no row for {id} in:\n{table}\n{versions:#}"))?;
        assert!(row.contains(&v2_version), "{table}");
    }
    for agent in both {
        let current = std::fs::canonicalize(agent.data_dir.join("agent/current"))?;
        assert_eq!(
            current,
            std::fs::canonicalize(agent.data_dir.join("agent/slot-a"))?
        );
    }
    let after = workload_pids(&both)?;
    assert_eq!(before, after, "the workloads were restarted by the switch");
    let gaps: Vec<(f64, f64)> = both
        .iter()
        .filter_map(|a| switch_gap_ms(&a.log()))
        .collect();
    assert_eq!(gaps.len(), 2, "a boot timeline after each switch");

    // A signed binary that exits at once: the first box tries it twice, rolls back by itself,
    // and the upgrade halts before the second box.
    let broken = dir.path().join("exits-at-once");
    std::fs::copy("/bin/true", &broken)?;
    let broken_sha = push(&control, &broken)?;
    upgrade(&control, &broken_sha, &sign(&control, &key, &broken_sha)?)?;
    let halted = wait_for_upgrade(&control, "halted", |_| true)?;
    let reason = halted["upgrade"]["halt_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("a1") && reason.contains("rolled_back"),
        "{halted:#}"
    );
    let a1_view = &node(&halted, "a1")["agent"];
    assert_eq!(a1_view["upgrade"]["state"], "rolled_back", "{halted:#}");
    assert_eq!(
        a1_view["sha256"],
        v2_sha.as_str(),
        "a1 runs the previous binary again"
    );
    assert_eq!(
        node(&halted, "a2")["agent"]["sha256"],
        v2_sha.as_str(),
        "a2 was never admitted"
    );
    let status = agent_status(&a1.data_dir)?;
    let said = status["upgrade"].as_str().unwrap_or("");
    assert!(said.starts_with("rolled_back to "), "{status:#}");
    let text = run_with_timeout(
        {
            let mut c = Command::new(binary(AGENT_BINARY)?);
            c.arg("status").arg("--data-dir").arg(&a1.data_dir);
            c
        },
        None,
        COMMAND_TIMEOUT,
    )?
    .expect_success("outpost-agent status")?
    .stdout;
    assert!(text.contains("upgrade:     rolled_back"), "{text}");
    assert!(a1.log().contains("stopped 2 times"), "{}", a1.log());
    assert_eq!(
        before,
        workload_pids(&both)?,
        "workloads kept their pids through the rollback"
    );

    // A signed binary that boots but never reports healthy: the box that gets it goes back to
    // the previous binary when the deadline passes, says so, and the upgrade halts.
    let hang_sha = push(&control, &never_healthy)?;
    upgrade(&control, &hang_sha, &sign(&control, &key, &hang_sha)?)?;
    let halted = wait_for_upgrade(&control, "halted", |listing| {
        ["a1", "a2"].iter().any(|id| {
            let upgrade = &node(listing, id)["agent"]["upgrade"];
            upgrade["target_sha256"] == hang_sha.as_str() && upgrade["state"] == "rolled_back"
        })
    })?;
    let (tried, spared) =
        match node(&halted, "a1")["agent"]["upgrade"]["target_sha256"] == hang_sha.as_str() {
            true => (&a1, "a2"),
            false => (&a2, "a1"),
        };
    let tried_id = tried
        .data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let reason = halted["upgrade"]["halt_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&tried_id) && reason.contains("rolled_back"),
        "{halted:#}"
    );
    let view = &node(&halted, &tried_id)["agent"];
    let message = view["upgrade"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("did not register and report healthy within"),
        "{halted:#}"
    );
    // Back on the marker build, and reporting it (the heartbeat after the rollback).
    wait_for(
        "the rolled-back box to report its previous build",
        START_TIMEOUT,
        || {
            let listing = agents(&control).ok()?;
            let agent = &node(&listing, &tried_id)["agent"];
            (agent["sha256"] == v2_sha.as_str() && agent["version"] == v2_version.as_str())
                .then_some(())
        },
    )?;
    assert_eq!(
        node(&halted, spared)["agent"]["sha256"],
        v2_sha.as_str(),
        "{spared} was never admitted: {halted:#}"
    );
    let status = agent_status(&tried.data_dir)?;
    assert!(
        status["upgrade"]
            .as_str()
            .is_some_and(|s| s.starts_with("rolled_back to ") && s.contains("healthy within")),
        "{status:#}"
    );
    assert!(
        tried
            .log()
            .contains("OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY"),
        "the never-healthy build ran: {}",
        tried.log()
    );
    assert_eq!(
        before,
        workload_pids(&both)?,
        "workloads kept their pids through the deadline rollback"
    );

    // Signed, but for another architecture: every box refuses it before switching.
    let mut foreign = std::fs::read(&v2)?;
    let other_machine: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    foreign[18..20].copy_from_slice(&other_machine.to_le_bytes());
    let foreign_path = dir.path().join("outpost-agent-other-arch");
    std::fs::write(&foreign_path, &foreign)?;
    let foreign_sha = push(&control, &foreign_path)?;
    upgrade_batched(
        &control,
        &foreign_sha,
        &sign(&control, &key, &foreign_sha)?,
        2,
    )?;
    refused_by_both(
        &control,
        &foreign_sha,
        &format!("ELF machine {other_machine}"),
        &v2_sha,
    )?;
    assert_eq!(before, workload_pids(&both)?);

    // Signed with another key: refused by every box, nothing changes.
    let other_key = release_key(&dir, "other.key")?;
    let v3 = dir.path().join("outpost-agent-v3");
    std::fs::write(&v3, [std::fs::read(&v2)?, b"v3".to_vec()].concat())?;
    let v3_sha = push(&control, &v3)?;
    upgrade_batched(&control, &v3_sha, &sign(&control, &other_key, &v3_sha)?, 2)?;
    refused_by_both(
        &control,
        &v3_sha,
        "does not verify with the pinned key",
        &v2_sha,
    )?;
    let v3_bytes = std::fs::read(&v3)?;
    for agent in both {
        let current = std::fs::canonicalize(agent.data_dir.join("agent/current"))?;
        assert_eq!(
            current,
            std::fs::canonicalize(agent.data_dir.join("agent/slot-a"))?
        );
        // slot-b holds a rolled-back binary at most, never a refused one.
        let slot_b = std::fs::read(agent.data_dir.join("agent/slot-b")).unwrap_or_default();
        assert_ne!(slot_b, v3_bytes);
        assert_ne!(slot_b, foreign);
    }
    assert_eq!(before, workload_pids(&both)?);
    assert!(
        before
            .values()
            .flat_map(|p| p.values())
            .all(|pid| process_alive(*pid))
    );

    println!(
        "agent upgrade, 2 agents on loopback, one at a time: {rollout_secs:.1} s from `outpostctl agents upgrade` to both on the new binary"
    );
    for (agent, (adopt, threads)) in both.iter().zip(&gaps) {
        println!(
            "  {}: workloads without an agent during the switch: adopted {adopt:.1} ms and supervised {threads:.1} ms after exec",
            agent
                .data_dir
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
    }
    Ok(())
}
