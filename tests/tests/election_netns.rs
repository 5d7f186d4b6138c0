//! Discovery, roles and leader election on an offline LAN (issue 7, SPEC D1–D7), in network
//! namespaces on a bridge with real mDNS and real election datagrams. Every agent, and every
//! control it starts, runs inside a namespace this test made, so no multicast or broadcast
//! reaches the host's interfaces; dropping a [`Site`] kills every process in its namespaces
//! before the namespaces go.
//!
//! Figures (cold boot until all registered, leader loss until a new leader serves, two leaders
//! at once) are printed with `FIGURE`; run with `--nocapture` to see them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::netns::{Lab, kill_namespace, namespace_pids, require_lab_support};
use outpost_fleet_tests::{
    AGENT_BINARY, CONTROL_BINARY, OUTPOSTCTL_BINARY, ProcessGuard, TestDir, binary,
    run_with_timeout, wait_for, wait_until,
};
use serde_json::Value;

const JOIN_SECRET: &str = "site-join-secret-for-tests-0001";
/// The lease TTL the agents run with; the issue asks for a new leader within 2 × TTL.
const LEASE_TTL_SECS: u64 = 8;
const CONTROL_PORT: u16 = 7443;
/// Generous deadlines: the machine is shared. Figures are printed, never asserted.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// `reschedule_after_secs: 0`: the replica of the powered-off leader moves as soon as its node
/// is marked down (the default waits 300 s, F1).
const SERVICE_YAML: &str = "\
name: sleeper
command: /bin/sleep
args: [\"3600\"]
memory_bytes: 1048576
replicas: 2
reschedule_after_secs: 0
";

/// A profile with one bucket; the agents' default storage adapter makes it a directory
/// `DATA_DIR/storage/BUCKET`.
const SITE_PROFILE_YAML: &str = "\
apiVersion: outpost/v1
kind: EnvironmentProfile
metadata:
  name: site-a
spec:
  storage:
    buckets:
      - name: solo-media
";
const SITE_BUCKET: &str = "solo-media";

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One box of the site.
struct Node {
    node_id: String,
    namespace: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    agent: Option<ProcessGuard>,
}

/// Namespaces, data dirs and agents. Field order matters: processes die before the lab goes.
struct Site {
    /// Set when the test passed; otherwise drop prints the logs.
    passed: bool,
    nodes: Vec<Node>,
    home: PathBuf,
    dir: TestDir,
    lab: Lab,
}

impl Drop for Site {
    fn drop(&mut self) {
        if !self.passed {
            for node in &self.nodes {
                eprintln!(
                    "--- {} agent log ---\n{}",
                    node.node_id,
                    outpost_fleet_tests::log_tail(&node.log_path, 40)
                );
                let control_log = node.data_dir.join("control/control.log");
                if control_log.exists() {
                    eprintln!(
                        "--- {} control log ---\n{}",
                        node.node_id,
                        outpost_fleet_tests::log_tail(&control_log, 15)
                    );
                }
            }
        }
        for node in &mut self.nodes {
            node.agent.take();
        }
        for node in &self.nodes {
            kill_namespace(&node.namespace);
        }
        kill_namespace(&self.lab.switch_namespace);
    }
}

impl Site {
    /// A site of `count` nodes for the test `test`, or `None` when this machine cannot make
    /// network namespaces and `OUTPOST_NETNS_TESTS=skip` says to skip (see
    /// `require_lab_support`).
    fn for_test(test: &str, tag: &str, count: usize) -> Result<Option<Self>> {
        if !require_lab_support(test, &[]) {
            return Ok(None);
        }
        Self::create(tag, count).map(Some)
    }

    /// The test passed: tears the site down without printing its logs.
    fn pass(mut self) -> Result<()> {
        self.passed = true;
        drop(self);
        Ok(())
    }

    fn create(tag: &str, count: usize) -> Result<Self> {
        let lab = Lab::create(tag, count).map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = TestDir::new(&format!("election-{tag}"))?;
        let home = dir.subdir("home")?;
        let nodes = (0..count)
            .map(|index| {
                Ok(Node {
                    node_id: format!("node{index}"),
                    namespace: lab.node(index).namespace.clone(),
                    data_dir: dir.subdir(&format!("node{index}"))?,
                    log_path: dir.path().join(format!("node{index}.log")),
                    agent: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            passed: false,
            nodes,
            home,
            dir,
            lab,
        })
    }

    fn agent_command(&self, index: usize, extra: &[&str]) -> Result<Command> {
        let node = &self.nodes[index];
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.namespace])
            .arg(binary(AGENT_BINARY)?)
            .arg("run")
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--node-id", &node.node_id])
            .args(["--discovery", "mdns"])
            .args(["--lease-ttl-secs", &LEASE_TTL_SECS.to_string()])
            .arg("--control-program")
            .arg(binary(CONTROL_BINARY)?)
            .args(["--status-listen", "127.0.0.1:7450"])
            // The overlay is not under test here, and every namespace would share the host's
            // /var/run/wireguard socket directory, so no interface is made.
            .arg("--no-overlay")
            // As the shared harness does (tests/src/lib.rs): a plan without readiness checks is
            // last-good once applied, since these tests restart agents right after a change (R4
            // is tested in delivery_fleet).
            .args(["--healthy-after-secs", "0"])
            .args(extra);
        for (name, _) in std::env::vars() {
            if name.starts_with("OUTPOST_") {
                command.env_remove(name);
            }
        }
        // The profile's default adapters (a directory per bucket, in-process bus and index).
        for name in ["MINIO_ENDPOINT", "AMQP_URL", "WEAVIATE_URL"] {
            command.env_remove(name);
        }
        Ok(command)
    }

    fn stop_agent(&mut self, index: usize, mode: outpost_fleet_tests::StopMode) {
        if let Some(mut agent) = self.nodes[index].agent.take() {
            agent.stop(mode);
        }
    }

    /// The box loses power: its agent and everything in its namespace (its control) die at once.
    fn power_off(&mut self, index: usize) {
        self.stop_agent(index, outpost_fleet_tests::StopMode::Kill);
        kill_namespace(&self.nodes[index].namespace);
    }

    fn start_agent(&mut self, index: usize, extra: &[&str]) -> Result<()> {
        let command = self.agent_command(index, extra)?;
        let node = &self.nodes[index];
        let guard = ProcessGuard::spawn(&node.node_id, command, &node.log_path)?;
        self.nodes[index].agent = Some(guard);
        Ok(())
    }

    /// Starts a site member at `index` alone on the LAN and waits until it leads.
    fn start_lone_leader(&mut self, index: usize) -> Result<()> {
        self.start_agent(index, &["--join-secret", JOIN_SECRET])?;
        self.wait_for_leader_with(&[index], CONVERGE_TIMEOUT)
            .map(|_| ())
    }

    /// Indexes of the nodes whose namespace runs an `outpost-control` right now.
    fn controls_running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&index| {
                namespace_pids(&self.nodes[index].namespace)
                    .into_iter()
                    .any(|pid| process_name(pid) == CONTROL_BINARY)
            })
            .collect()
    }

    /// `outpostctl ARGS` run in the node's namespace as the local admin of its control, with
    /// `stdin`, whatever its exit status.
    fn outpostctl_output(
        &self,
        index: usize,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<outpost_fleet_tests::CommandOutput> {
        let node = &self.nodes[index];
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.namespace])
            .arg(binary(OUTPOSTCTL_BINARY)?)
            .args(args)
            .env("HOME", &self.home)
            .env(
                "OUTPOST_CONFIG",
                node.data_dir.join("control/admin/outpostctl.json"),
            );
        run_with_timeout(command, stdin, Duration::from_secs(20))
    }

    /// `outpostctl ARGS --json` as the local admin of the node's control, parsed.
    fn outpostctl(&self, index: usize, args: &[&str]) -> Result<Value> {
        let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        let output = self.outpostctl_output(index, &args, None)?;
        if !output.success() {
            bail!("outpostctl {args:?} failed: {}", output.stderr);
        }
        output.json()
    }

    /// `outpostctl KIND apply -f -` with `document` on the node's control.
    fn apply(&self, index: usize, kind: &str, document: &str) -> Result<()> {
        self.outpostctl_output(index, &[kind, "apply", "-f", "-"], Some(document))?
            .expect_success(&format!("outpostctl {kind} apply"))?;
        Ok(())
    }

    fn apply_services(&self, index: usize, document: &str) -> Result<()> {
        self.apply(index, "services", document)
    }

    /// The log epoch of the node's control (`outpostctl status`).
    fn log_epoch(&self, index: usize) -> Result<u64> {
        let health = self.outpostctl(index, &["status"])?;
        health["log_epoch"]
            .as_u64()
            .with_context(|| format!("no log_epoch in {health}"))
    }

    /// The node's feed cursor from its status, when it has one in log epoch `log_epoch`.
    fn cursor_in_epoch(&self, index: usize, log_epoch: u64) -> Option<String> {
        let status = self.status(index).ok()?;
        let cursor = status["cursor"].as_str()?;
        cursor
            .starts_with(&format!("{log_epoch:016x}."))
            .then(|| cursor.to_string())
    }

    fn status(&self, index: usize) -> Result<Value> {
        let mut command = Command::new(binary(AGENT_BINARY)?);
        command
            .arg("status")
            .arg("--data-dir")
            .arg(&self.nodes[index].data_dir)
            .arg("--json");
        run_with_timeout(command, None, Duration::from_secs(20))?
            .expect_success("outpost-agent status")?
            .json()
    }

    fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.nodes[index].log_path).unwrap_or_default()
    }

    /// Node ids registered with the control on `leader`, from its `outpostctl nodes`.
    fn registered(&self, leader: usize) -> Vec<String> {
        self.outpostctl(leader, &["nodes"])
            .map(|nodes| {
                list(&nodes)
                    .iter()
                    .filter_map(|n| n["node_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for exactly one running control that answers and knows every node in `expected`.
    fn wait_for_leader_with(&self, expected: &[usize], timeout: Duration) -> Result<usize> {
        wait_for(
            &format!("one leader with nodes {expected:?} registered"),
            timeout,
            || {
                let running = self.controls_running();
                let [leader] = running[..] else { return None };
                let registered = self.registered(leader);
                expected
                    .iter()
                    .all(|&i| registered.contains(&self.nodes[i].node_id))
                    .then_some(leader)
            },
        )
    }
}

/// Samples how many controls run at once, and records the longest stretch with more than one.
struct LeaderWatch {
    stop: Arc<AtomicBool>,
    longest_overlap: Arc<Mutex<Duration>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LeaderWatch {
    fn start(namespaces: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_overlap = Arc::new(Mutex::new(Duration::ZERO));
        let (stop_flag, longest) = (stop.clone(), longest_overlap.clone());
        let handle = std::thread::spawn(move || {
            let mut overlap_since: Option<Instant> = None;
            while !stop_flag.load(Ordering::SeqCst) {
                let running = namespaces
                    .iter()
                    .filter(|ns| {
                        namespace_pids(ns)
                            .into_iter()
                            .any(|pid| process_name(pid) == CONTROL_BINARY)
                    })
                    .count();
                match (running > 1, overlap_since) {
                    (true, None) => overlap_since = Some(Instant::now()),
                    (true, Some(since)) | (false, Some(since)) => {
                        let mut longest = longest.lock().unwrap_or_else(|p| p.into_inner());
                        *longest = (*longest).max(since.elapsed());
                        if running <= 1 {
                            overlap_since = None;
                        }
                    }
                    (false, None) => {}
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            longest_overlap,
            handle: Some(handle),
        }
    }

    fn longest_overlap(&self) -> Duration {
        *self
            .longest_overlap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for LeaderWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn running_sleepers(site: &Site, leader: usize) -> Vec<String> {
    site.outpostctl(leader, &["allocations"])
        .map(|allocations| {
            list(&allocations)
                .iter()
                .filter(|a| a["service"] == "sleeper" && a["state"] == "running")
                .filter_map(|a| a["node_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn standby_has(data_dir: &Path, needle: &str) -> bool {
    std::fs::read_to_string(data_dir.join("standby/events.jsonl"))
        .is_ok_and(|text| text.contains(needle))
}

#[test]
fn three_nodes_elect_one_leader_enroll_run_a_workload_and_survive_leader_loss() -> Result<()> {
    let Some(mut site) = Site::for_test("three_nodes_elect_one_leader", "el3", 3)? else {
        return Ok(());
    };
    let watch = LeaderWatch::start(site.nodes.iter().map(|n| n.namespace.clone()).collect());
    let cold_boot = Instant::now();
    for index in 0..3 {
        site.start_agent(index, &["--join-secret", JOIN_SECRET])?;
    }
    let leader = site.wait_for_leader_with(&[0, 1, 2], CONVERGE_TIMEOUT)?;
    let all_registered = cold_boot.elapsed();
    println!(
        "FIGURE cold boot of 3 nodes until all registered: {} ms (leader {})",
        all_registered.as_millis(),
        site.nodes[leader].node_id
    );
    // The leader's role is an event its control records and its agent reports.
    wait_until(
        "the leader's role to show in outpostctl nodes and its status",
        CONVERGE_TIMEOUT,
        || {
            let nodes = site.outpostctl(leader, &["nodes"]).unwrap_or_default();
            let in_control = list(&nodes).iter().any(|n| {
                n["node_id"] == site.nodes[leader].node_id.as_str() && n["role"] == "leader"
            });
            in_control && site.status(leader).is_ok_and(|s| s["role"] == "leader")
        },
    )?;
    for index in (0..3).filter(|&i| i != leader) {
        let log = site.log(index);
        assert!(
            log.contains("is trusted: it is signed with the site join secret"),
            "worker {index} found the leader over mDNS:\n{log}"
        );
        let cluster: Value = serde_json::from_slice(&std::fs::read(
            site.nodes[index].data_dir.join("cluster.json"),
        )?)?;
        assert_eq!(cluster["role"], "worker", "{cluster}");
    }

    site.apply_services(leader, SERVICE_YAML)?;
    wait_until("two sleepers running", CONVERGE_TIMEOUT, || {
        running_sleepers(&site, leader).len() == 2
    })?;
    let standbys: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    wait_until(
        "the standbys to copy the service into their log",
        CONVERGE_TIMEOUT,
        || {
            standbys
                .iter()
                .all(|&i| standby_has(&site.nodes[i].data_dir, "\"sleeper\""))
        },
    )?;

    // Where the workers stand in the first leader's log: cursors of its log epoch.
    let old_log_epoch = site.log_epoch(leader)?;
    let mut old_cursors = Vec::new();
    for &index in &standbys {
        old_cursors.push(wait_for(
            &format!("node{index}'s cursor in the leader's log epoch {old_log_epoch:016x}"),
            CONVERGE_TIMEOUT,
            || site.cursor_in_epoch(index, old_log_epoch),
        )?);
    }

    // The leader loses power: its agent and its control die at once.
    let lost_at = Instant::now();
    site.power_off(leader);
    let new_leader = wait_for("another node to serve control", CONVERGE_TIMEOUT, || {
        let running = site.controls_running();
        let [candidate] = running[..] else {
            return None;
        };
        (candidate != leader && site.outpostctl(candidate, &["nodes"]).is_ok()).then_some(candidate)
    })?;
    let failover = lost_at.elapsed();
    println!(
        "FIGURE leader loss until a new leader serves: {} ms ({} → {}; 2 × TTL is {} ms: {})",
        failover.as_millis(),
        site.nodes[leader].node_id,
        site.nodes[new_leader].node_id,
        2 * LEASE_TTL_SECS * 1000,
        if failover <= Duration::from_secs(2 * LEASE_TTL_SECS) {
            "within"
        } else {
            "OVER"
        }
    );
    // The workers follow the new leader, and the workload spec survived through the standby log.
    let survivors: Vec<usize> = standbys.clone();
    site.wait_for_leader_with(&survivors, CONVERGE_TIMEOUT)?;
    let services = site.outpostctl(new_leader, &["services"])?;
    assert!(
        list(&services).iter().any(|s| s["name"] == "sleeper"),
        "the new leader knows the service: {services}"
    );
    wait_until(
        "sleepers running under the new leader",
        CONVERGE_TIMEOUT,
        || running_sleepers(&site, new_leader).len() == 2,
    )?;
    let follow_log = site.log(new_leader);
    assert!(
        follow_log.contains("seeded control from the standby log"),
        "{follow_log}"
    );
    // The agents crossed the epoch change through 410 and the snapshot: the new control has
    // another log epoch and answers the cursors the workers held with 410 Gone; a batch from
    // another epoch is never folded into a plan, so a cursor of the new epoch can only come
    // from the plan snapshot the agent fetches after a 410.
    let new_log_epoch = site.log_epoch(new_leader)?;
    assert_ne!(
        new_log_epoch, old_log_epoch,
        "the new leader's control has a log epoch of its own"
    );
    for old_cursor in &old_cursors {
        let gone = site.outpostctl_output(new_leader, &["events", "--from", old_cursor], None)?;
        assert!(
            !gone.success() && gone.stderr.contains("is no longer served"),
            "the new control answers the old cursor {old_cursor} with 410 Gone: {}",
            gone.stderr
        );
    }
    for &index in &survivors {
        let cursor = wait_for(
            &format!("node{index}'s cursor in the new log epoch {new_log_epoch:016x}"),
            CONVERGE_TIMEOUT,
            || site.cursor_in_epoch(index, new_log_epoch),
        )?;
        println!(
            "node{index} crossed the epoch change: cursor {} → {cursor}",
            old_cursors[standbys.iter().position(|&i| i == index).unwrap_or(0)]
        );
    }
    let overlap = watch.longest_overlap();
    println!(
        "FIGURE two leaders at once (3-node boot and failover): longest {} ms",
        overlap.as_millis()
    );
    assert!(
        overlap < Duration::from_secs(LEASE_TTL_SECS),
        "two controls ran at once for {} ms, longer than the TTL",
        overlap.as_millis()
    );
    site.pass()
}

#[test]
fn two_nodes_booting_at_the_same_instant_end_with_one_leader() -> Result<()> {
    let Some(mut site) = Site::for_test("two_nodes_booting_at_once", "el2", 2)? else {
        return Ok(());
    };
    let watch = LeaderWatch::start(site.nodes.iter().map(|n| n.namespace.clone()).collect());
    let commands = [
        site.agent_command(0, &["--join-secret", JOIN_SECRET])?,
        site.agent_command(1, &["--join-secret", JOIN_SECRET])?,
    ];
    let started = Instant::now();
    for (index, command) in commands.into_iter().enumerate() {
        let guard = ProcessGuard::spawn(
            &site.nodes[index].node_id,
            command,
            &site.nodes[index].log_path,
        )?;
        site.nodes[index].agent = Some(guard);
    }
    let leader = site.wait_for_leader_with(&[0, 1], CONVERGE_TIMEOUT)?;
    println!(
        "FIGURE two simultaneous boots until both registered with one leader ({}): {} ms",
        site.nodes[leader].node_id,
        started.elapsed().as_millis()
    );
    // Stays one leader for a few lease periods.
    let settle = Instant::now() + Duration::from_secs(2 * LEASE_TTL_SECS);
    while Instant::now() < settle {
        assert_eq!(site.controls_running(), vec![leader], "one leader only");
        std::thread::sleep(Duration::from_millis(250));
    }
    let overlap = watch.longest_overlap();
    println!(
        "FIGURE two leaders at once (simultaneous boot): longest {} ms",
        overlap.as_millis()
    );
    assert!(
        overlap < Duration::from_secs(LEASE_TTL_SECS),
        "two controls ran at once for {} ms",
        overlap.as_millis()
    );
    site.pass()
}

/// A plain control in node 0's namespace, reachable at `https://10.231.0.1:PORT`, optionally
/// advertising itself over mDNS (unsigned). Returns the guard and its data dir.
fn plain_control(
    site: &Site,
    name: &str,
    port: u16,
    advertise: bool,
) -> Result<(ProcessGuard, PathBuf)> {
    let data_dir = site.dir.subdir(name)?;
    let address = site.lab.node(0).underlay_address;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &site.nodes[0].namespace])
        .arg(binary(CONTROL_BINARY)?)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .args(["--public-url", &format!("https://{address}:{port}")])
        .args(["--san", &address.to_string()]);
    if advertise {
        command.arg("--advertise-mdns");
    }
    command.env_remove("OUTPOST_JOIN_SECRET");
    let guard = ProcessGuard::spawn(name, command, &site.dir.path().join(format!("{name}.log")))?;
    wait_until(&format!("{name} to serve"), CONVERGE_TIMEOUT, || {
        data_dir.join("control.url").exists()
    })?;
    Ok((guard, data_dir))
}

fn enrollment_token(site: &Site, control_dir: &Path) -> Result<String> {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &site.nodes[0].namespace])
        .arg(binary(OUTPOSTCTL_BINARY)?)
        .args(["enroll", "create", "--ttl", "1h", "--json"])
        .env("HOME", &site.home)
        .env("OUTPOST_CONFIG", control_dir.join("admin/outpostctl.json"));
    let created = run_with_timeout(command, None, Duration::from_secs(20))?
        .expect_success("outpostctl enroll create")?
        .json()?;
    created["token"]
        .as_str()
        .map(str::to_string)
        .context("no token printed")
}

#[test]
fn a_configured_url_works_without_mdns_and_untrusted_adverts_are_ignored() -> Result<()> {
    let Some(mut site) = Site::for_test("configured_url_and_untrusted_adverts", "elu", 3)? else {
        return Ok(());
    };
    // Control C serves at a URL and advertises nothing.
    let (_control, control_dir) = plain_control(&site, "control-c", CONTROL_PORT, false)?;
    let url = format!(
        "https://{}:{CONTROL_PORT}",
        site.lab.node(0).underlay_address
    );
    let token = enrollment_token(&site, &control_dir)?;
    site.start_agent(
        1,
        &["--control", &url, "--enroll", &token, "--may-lead", "no"],
    )?;
    wait_until(
        "node1 registered through the configured url",
        CONVERGE_TIMEOUT,
        || {
            site.status(1)
                .is_ok_and(|s| s["control"]["state"] == "connected")
        },
    )?;
    wait_until(
        "node1's log to say it used the configured url",
        CONVERGE_TIMEOUT,
        || {
            site.log(1).contains(
                "no trusted control advertised over mDNS; using the configured control url",
            )
        },
    )?;

    // Control A advertises over mDNS with a CA node2 knows nothing about.
    let (_rogue, rogue_dir) = plain_control(&site, "control-a", CONTROL_PORT + 1, true)?;
    let rogue_fingerprint = std::fs::read_to_string(rogue_dir.join("admin/ca.pem"))
        .map(|_| ())
        .ok();
    assert!(rogue_fingerprint.is_some());
    let token = enrollment_token(&site, &control_dir)?;
    site.start_agent(
        2,
        &["--control", &url, "--enroll", &token, "--may-lead", "no"],
    )?;
    wait_until(
        "node2 registered through the configured url",
        CONVERGE_TIMEOUT,
        || {
            site.status(2)
                .is_ok_and(|s| s["control"]["state"] == "connected")
        },
    )?;
    wait_until(
        "node2's log to say why it ignored the advert",
        CONVERGE_TIMEOUT,
        || {
            let log = site.log(2);
            log.contains("ignoring control advertisement")
                && log.contains(&format!(":{}", CONTROL_PORT + 1))
                && log.contains("matches no CA this node knows")
        },
    )?;
    assert_eq!(
        site.status(2)?["control"]["url"],
        url.as_str(),
        "node2 follows the configured control, not the advertised one"
    );
    site.pass()
}

#[test]
fn a_wrong_join_secret_enrolls_nowhere_and_without_leadership_the_node_runs_solo() -> Result<()> {
    let Some(mut site) = Site::for_test("wrong_join_secret_and_solo", "els", 2)? else {
        return Ok(());
    };
    site.start_lone_leader(0)?;
    site.start_agent(
        1,
        &[
            "--join-secret",
            "another-site-secret-0002",
            "--may-lead",
            "no",
        ],
    )?;
    wait_until("node1 to run solo and say why", CONVERGE_TIMEOUT, || {
        site.status(1).is_ok_and(|s| {
            s["control"]["state"] == "solo"
                && list(&s["notes"]).iter().any(|n| {
                    n.as_str()
                        .is_some_and(|n| n.contains("signature does not verify"))
                })
        })
    })?;
    assert!(!site.registered(0).contains(&"node1".to_string()));
    assert_eq!(site.controls_running(), vec![0], "node1 never leads");
    // An agent that exits (SIGTERM) stops the control it runs.
    if let Some(agent) = site.nodes[0].agent.as_mut() {
        agent.stop(outpost_fleet_tests::StopMode::Graceful);
    }
    wait_until(
        "the leader's control to stop with its agent",
        CONVERGE_TIMEOUT,
        || site.controls_running().is_empty(),
    )?;
    site.pass()
}

#[test]
fn a_healed_partition_keeps_the_leader_with_the_higher_epoch() -> Result<()> {
    let Some(mut site) = Site::for_test("healed_partition", "elp", 3)? else {
        return Ok(());
    };
    for index in 0..3 {
        site.start_agent(index, &["--join-secret", JOIN_SECRET])?;
    }
    let first = site.wait_for_leader_with(&[0, 1, 2], CONVERGE_TIMEOUT)?;
    // Cut the leader off: each side believes it is alone. The other side elects a leader at a
    // higher epoch; the cut-off leader keeps serving its own side (split brain, documented).
    site.lab
        .set_underlay(first, outpost_fleet_tests::netns::LinkState::Down)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let split = wait_for(
        "a second leader on the other side",
        CONVERGE_TIMEOUT,
        || {
            let running = site.controls_running();
            (running.len() == 2).then(|| running.into_iter().find(|&i| i != first))?
        },
    )?;
    println!(
        "FIGURE partition: {} still leads its side, {} leads the other",
        site.nodes[first].node_id, site.nodes[split].node_id
    );
    let healed_at = Instant::now();
    site.lab
        .set_underlay(first, outpost_fleet_tests::netns::LinkState::Up)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The higher epoch (the side that elected during the split) wins; the old leader steps
    // down and its node follows the winner.
    let winner = site.wait_for_leader_with(&[0, 1, 2], CONVERGE_TIMEOUT)?;
    assert_eq!(
        winner, split,
        "the leader elected later (higher epoch) wins"
    );
    println!(
        "FIGURE healed partition until one leader with all nodes: {} ms",
        healed_at.elapsed().as_millis()
    );
    wait_until(
        "the old leader to log that it stepped down",
        CONVERGE_TIMEOUT,
        || site.log(first).contains("stepping down from epoch"),
    )?;
    site.pass()
}

#[test]
fn a_restarted_leader_agent_stops_the_control_its_killed_predecessor_left() -> Result<()> {
    let Some(mut site) = Site::for_test("orphaned_control", "elo", 1)? else {
        return Ok(());
    };
    site.start_lone_leader(0)?;
    let orphan = namespace_pids(&site.nodes[0].namespace)
        .into_iter()
        .find(|&pid| process_name(pid) == CONTROL_BINARY)
        .context("a control runs")?;
    // The agent dies without a chance to stop its control (its own process group survives).
    if let Some(mut agent) = site.nodes[0].agent.take() {
        agent.stop(outpost_fleet_tests::StopMode::Kill);
    }
    assert_eq!(site.controls_running(), vec![0], "the orphan still runs");
    site.start_agent(0, &["--join-secret", JOIN_SECRET])?;
    wait_until("the new agent to stop the orphan", CONVERGE_TIMEOUT, || {
        site.log(0).contains(&format!(
            "stopped outpost-control (pid {orphan}) left running"
        ))
    })?;
    site.wait_for_leader_with(&[0], CONVERGE_TIMEOUT)?;
    let running: Vec<i32> = namespace_pids(&site.nodes[0].namespace)
        .into_iter()
        .filter(|&pid| process_name(pid) == CONTROL_BINARY)
        .collect();
    assert_eq!(running.len(), 1, "one control: {running:?}");
    assert_ne!(running[0], orphan, "a control the new agent supervises");
    site.pass()
}

#[test]
fn a_leader_without_a_standby_copy_starts_from_the_built_in_profile() -> Result<()> {
    let Some(mut site) = Site::for_test("leader_without_standby_copy", "elb", 2)? else {
        return Ok(());
    };
    site.start_lone_leader(0)?;
    site.apply(0, "profile", SITE_PROFILE_YAML)?;
    assert_eq!(
        site.outpostctl(0, &["profile", "show"])?["metadata"]["name"],
        "site-a"
    );
    // The leader loses power before node1 ever ran: node1 (a replacement box) has no standby
    // copy of the control log and no control data of its own, so nothing fresher than the
    // built-in profile is within its reach.
    site.power_off(0);
    site.start_agent(1, &["--join-secret", JOIN_SECRET])?;
    let leader = site.wait_for_leader_with(&[1], CONVERGE_TIMEOUT)?;
    assert_eq!(leader, 1);
    assert!(
        !site.nodes[1].data_dir.join("standby/events.jsonl").exists(),
        "node1 has no standby copy"
    );
    let log = site.log(1);
    assert!(
        log.contains(
            "no standby copy of the control log and no control data served before; control starts from the built-in profile"
        ),
        "{log}"
    );
    assert!(!log.contains("seeded"), "nothing was seeded: {log}");
    let profile = site.outpostctl(1, &["profile", "show"])?;
    assert_eq!(profile["metadata"]["name"], "minimal", "{profile}");
    assert!(
        list(&profile["spec"]["storage"]["buckets"]).is_empty(),
        "the built-in profile has no bucket: {profile}"
    );
    assert!(
        list(&site.outpostctl(1, &["services"])?).is_empty(),
        "no service survives without a standby copy"
    );
    // The new leader's own agent fetches the built-in profile from its control and caches it.
    wait_until(
        "node1's agent to cache the built-in profile",
        CONVERGE_TIMEOUT,
        || {
            std::fs::read(site.nodes[1].data_dir.join("profile.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                .is_some_and(|cached| cached["metadata"]["name"] == "minimal")
        },
    )?;
    // A leader never copies its own control's log: its standby source is empty while it leads
    // (it once copied in the moment before its own role reached it).
    assert!(
        !site.nodes[1].data_dir.join("standby/events.jsonl").exists(),
        "the leader copied its own control's log into its standby copy"
    );
    site.pass()
}

fn running_sleeper_pids(status: &Value) -> Vec<u32> {
    outpost_fleet_tests::status_running_pids(status, "sleeper")
        .into_values()
        .collect()
}

#[test]
fn without_control_or_leadership_a_node_runs_solo_from_its_cache() -> Result<()> {
    let Some(mut site) = Site::for_test("solo_from_cache", "elc", 2)? else {
        return Ok(());
    };
    // node1 may never lead, and stops its workloads when its agent exits (as a reboot would).
    let solo_args = [
        "--join-secret",
        JOIN_SECRET,
        "--may-lead",
        "no",
        "--stop-workloads-on-exit",
    ];
    site.start_agent(0, &["--join-secret", JOIN_SECRET])?;
    site.start_agent(1, &solo_args)?;
    let leader = site.wait_for_leader_with(&[0, 1], CONVERGE_TIMEOUT)?;
    assert_eq!(leader, 0, "node1 may not lead");
    site.apply(0, "profile", SITE_PROFILE_YAML)?;
    site.apply_services(0, SERVICE_YAML)?;
    let bucket = site.nodes[1].data_dir.join("storage").join(SITE_BUCKET);
    let cached_pids = wait_for(
        "node1 to run a sleeper and hold the profile's bucket",
        CONVERGE_TIMEOUT,
        || {
            let pids = running_sleeper_pids(&site.status(1).ok()?);
            (!pids.is_empty() && bucket.is_dir()).then_some(pids)
        },
    )?;

    // No control anywhere from now on.
    site.power_off(0);
    let status = wait_for("node1 to run solo", CONVERGE_TIMEOUT, || {
        site.status(1)
            .ok()
            .filter(|s| s["control"]["state"] == "solo")
    })?;
    let why = status["control"]["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("may not lead (may_lead no)") && why.contains("built-in profile"),
        "status says why it runs solo: {status}"
    );
    assert_eq!(
        running_sleeper_pids(&status),
        cached_pids,
        "the cached workloads run on: {status}"
    );
    assert!(
        cached_pids
            .iter()
            .all(|&pid| outpost_fleet_tests::process_alive(pid))
    );

    // The agent restarts with no control anywhere: the workloads (stopped with the agent) come
    // back from its cache, and the cached profile is applied again with the default adapters,
    // which repairs the bucket deleted while the agent was down.
    site.stop_agent(1, outpost_fleet_tests::StopMode::Graceful);
    assert!(
        cached_pids
            .iter()
            .all(|&pid| !outpost_fleet_tests::process_alive(pid)),
        "the workloads stopped with the agent"
    );
    std::fs::remove_dir_all(&bucket)?;
    site.start_agent(1, &solo_args)?;
    let status = wait_for(
        "node1 to run solo again with its workloads and its bucket",
        CONVERGE_TIMEOUT,
        || {
            site.status(1).ok().filter(|s| {
                s["control"]["state"] == "solo"
                    && running_sleeper_pids(s).len() == cached_pids.len()
                    && bucket.is_dir()
            })
        },
    )?;
    assert_eq!(
        status["components"]["storage"]["status"], "ok",
        "the storage component applied: {status}"
    );
    let mut command = Command::new(binary(AGENT_BINARY)?);
    command
        .arg("status")
        .arg("--data-dir")
        .arg(&site.nodes[1].data_dir);
    let text = run_with_timeout(command, None, Duration::from_secs(20))?
        .expect_success("outpost-agent status")?
        .stdout;
    let running = cached_pids.len();
    assert!(
        text.contains("control:     solo")
            && text.contains(&format!("{running} of {running} allocations running")),
        "outpost-agent status says solo and shows the workloads:\n{text}"
    );
    assert!(site.controls_running().is_empty(), "node1 never leads");
    site.pass()
}

#[test]
fn a_node_without_a_join_secret_enrolls_nowhere_and_says_why() -> Result<()> {
    let Some(mut site) = Site::for_test("no_join_secret", "eln", 3)? else {
        return Ok(());
    };
    site.start_lone_leader(0)?;
    // node1: nothing at all (no secret, no token, no url): it stays off the LAN's multicast.
    site.start_agent(1, &["--discovery", "auto"])?;
    // node2: no secret either, but told to browse: it sees the leader's signed advertisement
    // and cannot check it.
    site.start_agent(2, &[])?;
    wait_until(
        "node1's status to say why it enrolls nowhere",
        CONVERGE_TIMEOUT,
        || {
            site.status(1).is_ok_and(|s| {
                list(&s["notes"]).iter().any(|n| {
                    n.as_str().is_some_and(|n| {
                        n.contains("enrolls nowhere") && n.contains("no site join secret")
                    })
                }) && s["control"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not enrolled"))
            })
        },
    )?;
    wait_until(
        "node2's status to say why it enrolls nowhere",
        CONVERGE_TIMEOUT,
        || {
            site.status(2).is_ok_and(|s| {
                s["control"]["state"] == "solo"
                    && s["control"]["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("no site join secret"))
                    && list(&s["notes"]).iter().any(|n| {
                        n.as_str().is_some_and(|n| {
                            n.contains("ignoring control advertisement")
                                && n.contains("no join secret to check a signature with")
                        })
                    })
            })
        },
    )?;
    let registered = site.registered(0);
    assert_eq!(
        registered,
        vec!["node0".to_string()],
        "only the leader enrolled"
    );
    assert_eq!(site.controls_running(), vec![0], "neither node leads");
    for index in [1, 2] {
        assert!(
            !site.nodes[index].data_dir.join("cluster.json").exists(),
            "node{index} registered nowhere"
        );
    }
    site.pass()
}
