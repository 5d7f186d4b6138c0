//! Delivery with the real binaries (R1, R2): an artifact (a small script in a .tar.gz) pushed
//! with `outpostctl artifacts push` runs on two agents from their caches; after a power cut with
//! control down a box runs it again offline from its cache; a cached file found corrupt at boot
//! is never run and is fetched again once control is back; a new release replaces it and the
//! cache, capped small, keeps only what the plans reference; history and rollback.
//!
//! Build the binaries first: `cargo build --bins --all-features`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AgentProcess, COMMAND_TIMEOUT, ControlProcess, START_TIMEOUT, StopMode, TestDir, process_alive,
    run_with_timeout, status_allocations, status_running_pids, wait_until,
};
use serde_json::{Value, json};

/// A `.tar.gz` holding `bin/app`, a script that execs `sleep SECONDS` (the version shows in the
/// process's command line).
fn script_archive(dir: &TestDir, name: &str, sleep_secs: u32) -> Result<PathBuf> {
    archive_of(dir, name, &format!("#!/bin/sh\nexec sleep {sleep_secs}\n"))
}

/// A `.tar.gz` holding `bin/app` with `script` in it.
fn archive_of(dir: &TestDir, name: &str, script: &str) -> Result<PathBuf> {
    let tree = dir.subdir(&format!("{name}-tree"))?;
    let bin = tree.join("bin");
    std::fs::create_dir_all(&bin)?;
    let app = bin.join("app");
    std::fs::write(&app, script)?;
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let archive = dir.path().join(format!("{name}.tar.gz"));
    let mut command = Command::new("tar");
    command
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&tree)
        .arg(".");
    run_with_timeout(command, None, COMMAND_TIMEOUT)?.expect_success("tar")?;
    Ok(archive)
}

/// `outpostctl artifacts push FILE --json`: the sha256.
fn push(control: &ControlProcess, archive: &Path) -> Result<String> {
    let pushed = control
        .outpostctl(&[
            "artifacts",
            "push",
            &archive.display().to_string(),
            "--json",
        ])?
        .expect_success("outpostctl artifacts push")?
        .json()?;
    pushed["sha256"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("push printed no sha256: {pushed}"))
}

fn app_service(sha256: &str, replicas: u32) -> String {
    json!({
        "name": "app",
        "command": "bin/app",
        "replicas": replicas,
        "memory_bytes": 1048576,
        "artifact": {"sha256": sha256},
    })
    .to_string()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', "\n"))
        .unwrap_or_default()
}

/// Whether the status shows `count` running `app` processes, each `sleep SECONDS`.
fn runs_version(status: &Value, count: usize, sleep_secs: u32) -> bool {
    let running = status_running_pids(status, "app");
    running.len() == count
        && running
            .values()
            .all(|pid| cmdline(*pid).contains(&format!("sleep {sleep_secs}")))
}

fn unpacked(data_dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(data_dir.join("artifacts/unpacked"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.ends_with(".manifest"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Whether the plan that runs is the last-good plan (R4: its new instances proved healthy).
fn is_last_good(status: &Value) -> bool {
    status["plan_generation"].is_string() && status["last_good"] == status["plan_generation"]
}

fn power_cut(agent: &mut AgentProcess, status: &Value) -> Result<()> {
    agent.stop(StopMode::Kill);
    let pids = status_running_pids(status, "app");
    for pid in pids.values() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until("the workloads to be dead", START_TIMEOUT, || {
        pids.values().all(|pid| !process_alive(*pid))
    })
}

#[test]
fn an_artifact_runs_on_two_boxes_and_again_offline_from_the_cache() -> Result<()> {
    let dir = TestDir::new("delivery")?;
    let control_dir = dir.path().join("control");
    let control =
        ControlProcess::start_with(&control_dir, "127.0.0.1:0", &["--node-ttl-secs", "60"])?;
    let listen = control.listen_address().to_string();
    // Enrollment tokens are single-use: one per box.
    let token = control.enrollment_token()?;
    let second_token = control.enrollment_token()?;
    let mut first = AgentProcess::start(
        &dir.path().join("a1"),
        &token,
        &["--node-id", "a1", "--healthy-after-secs", "10"],
    )?;
    let mut second = AgentProcess::start(
        &dir.path().join("a2"),
        &second_token,
        &["--node-id", "a2", "--healthy-after-secs", "10"],
    )?;
    control.wait_for_nodes_ready(&["a1", "a2"])?;

    let v1 = push(&control, &script_archive(&dir, "v1", 3601)?)?;
    let listed = control
        .outpostctl(&["artifacts", "ls", "--json"])?
        .expect_success("artifacts ls")?
        .json()?;
    assert_eq!(listed[0]["sha256"], v1.as_str(), "{listed}");
    assert_eq!(listed[0]["name"], "v1.tar.gz", "{listed}");
    control.apply_services(&app_service(&v1, 2))?;
    for agent in [&mut first, &mut second] {
        let status = agent.wait_for_status("v1 running from the artifact", |status| {
            runs_version(status, 1, 3601)
        })?;
        let pid = *status_running_pids(&status, "app")
            .values()
            .next()
            .context("a running app process")?;
        let expected = agent.data_dir.join("artifacts/unpacked").join(&v1);
        assert!(
            environ(pid).contains(&format!("OUTPOST_ARTIFACT_DIR={}", expected.display())),
            "{}",
            environ(pid)
        );
        assert!(
            status["artifacts"][&v1]
                .as_str()
                .unwrap_or("")
                .starts_with("ready"),
            "{status}"
        );
    }
    // A release references v1: it cannot be removed.
    let refused = control
        .outpostctl(&["artifacts", "rm", &v1])?
        .expect_failure("artifacts rm")?;
    assert!(refused.stderr.contains("service app"), "{}", refused.stderr);

    // R4: v1 has no readiness check, so it is last-good once up for 10 s; only then is it what
    // a reboot falls back to.
    let first_status = first.wait_for_status("v1 to be last-good", is_last_good)?;
    let second_status = second.wait_for_status("v1 to be last-good", is_last_good)?;
    // The power goes on both boxes with control down. One box's cached script was damaged.
    control.stop(StopMode::Kill);
    power_cut(&mut first, &first_status)?;
    power_cut(&mut second, &second_status)?;
    let damaged = second
        .data_dir
        .join("artifacts/unpacked")
        .join(&v1)
        .join("bin/app");
    std::fs::write(&damaged, "#!/bin/sh\nexec sleep 6666\n")?;

    first.restart(&token, &["--node-id", "a1", "--healthy-after-secs", "10"])?;
    second.restart(
        &second_token,
        &["--node-id", "a2", "--healthy-after-secs", "10"],
    )?;
    let status = first.wait_for_status("v1 running again offline from the cache", |status| {
        runs_version(status, 1, 3601)
    })?;
    assert_eq!(status["plan_source"], "store", "{status}");
    let status = second.wait_for_status("the corrupt artifact reported, not run", |status| {
        status["artifacts"][&v1]
            .as_str()
            .unwrap_or("")
            .contains("corrupt")
            && status["control"]["state"] == "unreachable"
    })?;
    assert!(status_running_pids(&status, "app").is_empty(), "{status}");
    for allocation in status_allocations(&status, "app") {
        assert!(
            allocation["message"]
                .as_str()
                .unwrap_or("")
                .contains("not in the cache"),
            "{allocation}"
        );
    }
    assert!(!damaged.exists(), "the corrupt tree is removed");

    // Control comes back on the same address: the damaged box fetches v1 again and runs it.
    let control = ControlProcess::start_with(&control_dir, &listen, &["--node-ttl-secs", "60"])?;
    second.wait_for_status("v1 fetched again and running", |status| {
        runs_version(status, 1, 3601)
    })?;
    drop(control);
    Ok(())
}

#[test]
fn a_new_release_replaces_the_artifact_and_the_capped_cache_keeps_what_plans_reference()
-> Result<()> {
    let dir = TestDir::new("delivery-gc")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "60"],
    )?;
    let token = control.enrollment_token()?;
    // A cap far below one artifact: only what the plans reference may stay.
    let mut agent = AgentProcess::start(
        &dir.path().join("a1"),
        &token,
        &[
            "--node-id",
            "a1",
            "--artifact-cache-bytes",
            "1",
            "--healthy-after-secs",
            "10",
        ],
    )?;
    control.wait_for_nodes_ready(&["a1"])?;
    let v1 = push(&control, &script_archive(&dir, "v1", 3601)?)?;
    let v2 = push(&control, &script_archive(&dir, "v2", 3602)?)?;
    control.apply_services(&app_service(&v1, 1))?;
    agent.wait_for_status("v1 running", |status| runs_version(status, 1, 3601))?;
    assert_eq!(unpacked(&agent.data_dir), vec![v1.clone()]);

    control.apply_services(&app_service(&v2, 1))?;
    let status = agent.wait_for_status("v2 running and v1 collected", |status| {
        runs_version(status, 1, 3602) && status["artifacts"].get(&v1).is_none()
    })?;
    wait_until("v1 gone from the cache", START_TIMEOUT, || {
        unpacked(&agent.data_dir) == vec![v2.clone()]
    })?;
    let notes = status["notes"].to_string();
    let status = agent.wait_for_status("the over-cap note", |status| {
        status["notes"]
            .to_string()
            .contains("artifact cache is over")
    })?;
    assert!(status["artifacts"][&v2].is_string(), "{status} {notes}");

    // History lists both releases; rolling back runs v1 again as release 3.
    let history = control
        .outpostctl(&["services", "history", "app", "--json"])?
        .expect_success("services history")?
        .json()?;
    let releases = history.as_array().context("history is a list")?;
    assert_eq!(releases.len(), 2, "{history}");
    assert_eq!(releases[1]["current"], true);
    let missing = control
        .outpostctl(&["services", "rollback", "app", "--to", "7"])?
        .expect_failure("rollback to a missing release")?;
    if !(missing.stderr.contains("to") && missing.stderr.contains('7')) {
        bail!(
            "the refusal names neither the field nor the value: {}",
            missing.stderr
        );
    }
    let rolled = control
        .outpostctl(&["services", "rollback", "app", "--json"])?
        .expect_success("services rollback")?
        .json()?;
    assert_eq!(rolled["service"]["release"], 3, "{rolled}");
    agent.wait_for_status("v1 running again", |status| runs_version(status, 1, 3601))?;
    Ok(())
}

/// `outpostctl rollout status app --json`.
fn rollout_status(control: &ControlProcess) -> Result<Value> {
    control
        .outpostctl(&["rollout", "status", "app", "--json"])?
        .expect_success("outpostctl rollout status")?
        .json()
}

/// R3 with the real binaries: v1 runs on both boxes; v2's readiness never passes, so its
/// rollout halts after its first batch (one box) and rolls back by itself; the other box's v1
/// is never touched and v1 runs on both at the end.
#[test]
fn a_release_that_never_gets_ready_halts_after_its_first_batch_and_rolls_back() -> Result<()> {
    let dir = TestDir::new("rollout")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "60"],
    )?;
    let first_token = control.enrollment_token()?;
    let second_token = control.enrollment_token()?;
    let mut first = AgentProcess::start(
        &dir.path().join("a1"),
        &first_token,
        &["--node-id", "a1", "--healthy-after-secs", "10"],
    )?;
    let mut second = AgentProcess::start(
        &dir.path().join("a2"),
        &second_token,
        &["--node-id", "a2", "--healthy-after-secs", "10"],
    )?;
    control.wait_for_nodes_ready(&["a1", "a2"])?;
    let v1 = push(&control, &script_archive(&dir, "v1", 3601)?)?;
    let v2 = push(&control, &script_archive(&dir, "v2", 3602)?)?;
    let release = |sha256: &str, readiness: Value| {
        json!({
            "name": "app",
            "command": "bin/app",
            "replicas": "all",
            "memory_bytes": 1048576,
            "artifact": {"sha256": sha256},
            "readiness": readiness,
            "rollout": {"max_parallel": 1, "health_deadline_secs": 6, "auto_rollback": true},
        })
        .to_string()
    };
    control.apply_services(&release(&v1, Value::Null))?;
    let mut v1_pids = Vec::new();
    for agent in [&mut first, &mut second] {
        let status = agent.wait_for_status("v1 running", |status| runs_version(status, 1, 3601))?;
        v1_pids.extend(status_running_pids(&status, "app").into_values());
    }
    let first_rollout = rollout_status(&control)?;
    assert_eq!(first_rollout["state"], "none", "{first_rollout}");

    // v2 waits for a TCP port nobody listens on.
    let refused_port = outpost_fleet_tests::free_port()?;
    control.apply_services(&release(
        &v2,
        json!({"probe": {"tcp": {"port": refused_port}}, "timeout_ms": 60000}),
    ))?;
    let mut both_on_v2 = false;
    let settled =
        outpost_fleet_tests::wait_for("the rollout of v2 to roll back", START_TIMEOUT, || {
            let on_v2 = [&first, &second]
                .iter()
                .filter(|agent| {
                    agent.status().is_ok_and(|status| {
                        !status_running_pids(&status, "app").is_empty()
                            && status_running_pids(&status, "app")
                                .values()
                                .all(|pid| cmdline(*pid).contains("sleep 3602"))
                    })
                })
                .count();
            both_on_v2 |= on_v2 == 2;
            rollout_status(&control)
                .ok()
                .filter(|view| view["state"] == "rolled_back")
        })?;
    assert!(!both_on_v2, "v2 never ran on both boxes at once");
    assert_eq!(settled["release"], 2, "{settled}");
    assert_eq!(settled["from_release"], 1, "{settled}");
    assert_eq!(settled["rolled_back_as_release"], 3, "{settled}");
    assert_eq!(settled["batch"], 1, "{settled}");
    let reason = settled["halt_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("batch 1") && reason.contains("health_deadline_secs 6"),
        "{settled}"
    );

    // The log says it: one batch of one instance, a halt, a rollback; nothing more.
    let kinds: Vec<(String, Value)> = control
        .aggregate_events("service/app")?
        .into_iter()
        .map(|event| {
            (
                event["kind"].as_str().unwrap_or_default().to_string(),
                event["data"].clone(),
            )
        })
        .filter(|(kind, _)| kind.starts_with("Rollout"))
        .collect();
    let names: Vec<&str> = kinds.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(
        names,
        vec!["RolloutBatchStarted", "RolloutHalted", "RolloutRolledBack"],
        "{kinds:?}"
    );
    assert_eq!(
        kinds[0].1["allocations"].as_array().map(Vec::len),
        Some(1),
        "{kinds:?}"
    );

    // v1 runs on both boxes at the end; the box outside the first batch kept its process.
    let mut end_pids = Vec::new();
    for agent in [&mut first, &mut second] {
        let status = agent.wait_for_status("v1 running again", |status| {
            runs_version(status, 1, 3601)
                && status_allocations(status, "app")
                    .iter()
                    .all(|a| a["state"] == "running")
        })?;
        end_pids.extend(status_running_pids(&status, "app").into_values());
    }
    let kept = v1_pids.iter().filter(|pid| end_pids.contains(pid)).count();
    assert_eq!(
        kept, 1,
        "one box never left v1: {v1_pids:?} then {end_pids:?}"
    );
    let text = control
        .outpostctl(&["rollout", "status", "app"])?
        .expect_success("rollout status")?;
    assert!(
        text.stdout.contains("rolled_back release 2") && text.stdout.contains("halted: batch 1"),
        "{}",
        text.stdout
    );
    let history = control
        .outpostctl(&["services", "history", "app", "--json"])?
        .expect_success("services history")?
        .json()?;
    assert_eq!(history[2]["artifact_sha256"], v1.as_str(), "{history}");

    // After v1 is healthy again, control dies and the box that tried v2 loses power: it comes
    // back offline and runs v1 from its cache (v2 never became its last-good plan, R4).
    let (tried_v2, token) = if v1_pids.contains(&end_pids[0]) {
        (&mut second, &second_token)
    } else {
        (&mut first, &first_token)
    };
    let status = tried_v2.wait_for_status("v1 to be last-good again", is_last_good)?;
    control.stop(StopMode::Kill);
    power_cut(tried_v2, &status)?;
    let node_id = status["node_id"].as_str().unwrap_or_default().to_string();
    tried_v2.restart(
        token,
        &["--node-id", &node_id, "--healthy-after-secs", "10"],
    )?;
    let back = tried_v2.wait_for_status("v1 running offline from the cache", |status| {
        runs_version(status, 1, 3601) && status["control"]["state"] == "unreachable"
    })?;
    assert_eq!(back["plan_source"], "store", "{back}");
    assert_eq!(back["plan_generation"], status["last_good"], "{back}");
    Ok(())
}

/// R4 with the real binaries: v1 is healthy and last-good; v2 crashes a second after each
/// start, so it is applied but never becomes last-good; with control down and the box power-cut,
/// the agent boots v1 again from its cache.
#[test]
fn a_release_that_crashes_on_start_is_never_last_good_and_a_reboot_brings_back_v1() -> Result<()> {
    let dir = TestDir::new("delivery-r4")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "60"],
    )?;
    let token = control.enrollment_token()?;
    let mut agent = AgentProcess::start(
        &dir.path().join("a1"),
        &token,
        &["--node-id", "a1", "--healthy-after-secs", "10"],
    )?;
    control.wait_for_nodes_ready(&["a1"])?;
    let v1 = push(&control, &script_archive(&dir, "v1", 3601)?)?;
    let v2 = push(
        &control,
        &archive_of(&dir, "v2", "#!/bin/sh\nsleep 1\nexit 3\n")?,
    )?;
    control.apply_services(&app_service(&v1, 1))?;
    agent.wait_for_status("v1 running", |status| runs_version(status, 1, 3601))?;
    let healthy = agent.wait_for_status("v1 to be last-good", is_last_good)?;
    let v1_generation = healthy["last_good"].clone();

    control.apply_services(&app_service(&v2, 1))?;
    // v2 is applied (the plan that runs moved on) and has crashed at least twice.
    let crashing = agent.wait_for_status("v2 applied and crashing", |status| {
        status["plan_generation"] != v1_generation
            && status_allocations(status, "app")
                .iter()
                .any(|a| a["restarts"].as_u64().unwrap_or(0) >= 2)
    })?;
    assert_eq!(crashing["last_good"], v1_generation, "{crashing}");
    assert!(
        crashing["notes"].to_string().contains("plan on probation"),
        "{crashing}"
    );
    assert!(
        unpacked(&agent.data_dir).contains(&v1),
        "v1 stays cached while it is last-good: {:?}",
        unpacked(&agent.data_dir)
    );

    control.stop(StopMode::Kill);
    power_cut(&mut agent, &crashing)?;
    agent.restart(&token, &["--node-id", "a1", "--healthy-after-secs", "10"])?;
    let status = agent.wait_for_status("v1 running again offline", |status| {
        runs_version(status, 1, 3601) && status["control"]["state"] == "unreachable"
    })?;
    assert_eq!(status["plan_generation"], v1_generation, "{status}");
    assert_eq!(status["plan_source"], "store", "{status}");
    assert!(
        status["notes"]
            .to_string()
            .contains("was applied but never became healthy"),
        "{status}"
    );
    Ok(())
}

/// A TCP relay to control that cuts the first connection to carry more than `cut_after`
/// bytes towards the agent: a link that drops in the middle of a download. It relays bytes
/// only (TLS passes through it untouched).
struct CuttingRelay {
    address: std::net::SocketAddr,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl CuttingRelay {
    fn start(upstream: std::net::SocketAddr, cut_after: u64) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut client_in), Ok(mut server_out)) =
                    (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_in, &mut server_out);
                    let _ = server_out.shutdown(std::net::Shutdown::Both);
                });
                let cuts = counted.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut from, mut to) = (server, client);
                    let mut relayed = 0u64;
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buffer) {
                        if n == 0 || to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                        relayed += n as u64;
                        if relayed > cut_after
                            && cuts
                                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                                .is_ok()
                        {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Ok(Self { address, cuts })
    }
}

/// A download cut in the middle (the relay drops the connection after 1 MiB of a 6 MiB
/// artifact) resumes with `Range` from what is on disk, verifies, and runs.
#[test]
fn a_download_cut_in_the_middle_resumes_and_verifies() -> Result<()> {
    let dir = TestDir::new("delivery-cut")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", "60"],
    )?;
    let upstream: std::net::SocketAddr = control.listen_address().parse()?;
    let relay = CuttingRelay::start(upstream, 1024 * 1024)?;
    let token = control.enrollment_token()?;
    let relayed_url = format!("https://{}", relay.address);
    let mut agent = AgentProcess::start(
        &dir.path().join("a1"),
        &token,
        &[
            "--node-id",
            "a1",
            "--control",
            &relayed_url,
            "--healthy-after-secs",
            "10",
        ],
    )?;
    control.wait_for_nodes_ready(&["a1"])?;
    // 6 MiB of incompressible bytes beside the script, so the archive is large.
    archive_of(&dir, "big", "#!/bin/sh\nexec sleep 3603\n")?;
    let mut noise = vec![0u8; 6 * 1024 * 1024];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for byte in noise.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = (state >> 24) as u8;
    }
    std::fs::write(dir.path().join("big-tree/noise"), &noise)?;
    let mut command = Command::new("tar");
    command
        .arg("-cf")
        .arg(dir.path().join("big.tar"))
        .arg("-C")
        .arg(dir.path().join("big-tree"))
        .arg(".");
    run_with_timeout(command, None, COMMAND_TIMEOUT)?.expect_success("tar")?;
    let big = push(&control, &dir.path().join("big.tar"))?;
    let size = std::fs::metadata(dir.path().join("big.tar"))?.len();
    control.apply_services(&app_service(&big, 1))?;
    let status = agent.wait_for_status("the big artifact running", |status| {
        runs_version(status, 1, 3603)
    })?;
    assert_eq!(
        relay.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the relay cut a connection"
    );
    let state = status["artifacts"][&big].as_str().unwrap_or_default();
    let resumed: u32 = state
        .split("resumed ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no resume count in {state:?}"))?;
    assert!(resumed >= 1, "the download resumed: {state}");
    assert!(
        state.contains(&format!("fetched {size} bytes")),
        "every byte fetched once, none again after the cut: {state} (size {size})"
    );
    let noise_copy = agent
        .data_dir
        .join("artifacts/unpacked")
        .join(&big)
        .join("noise");
    assert_eq!(
        std::fs::read(noise_copy)?,
        noise,
        "the unpacked file verifies"
    );
    Ok(())
}
