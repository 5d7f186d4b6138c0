//! Network-namespace lab for tests: several "hosts" on one machine, each a network namespace
//! joined to a bridge that lives in its own switch namespace, with test-only addresses that
//! exist only inside the namespaces (underlay `10.231.0.0/24` by default). Nothing is added to
//! the host's own network namespace, and dropping the [`Lab`] deletes every namespace it made
//! (the veth pairs and bridge go with them), even when a test panics.
//!
//! Needs root, iproute2 (`ip netns`) and `ping`. [`lab_support`] says why a test cannot run;
//! [`require_lab_support`] fails the test with that reason unless the environment variable
//! `OUTPOST_NETNS_TESTS=skip` asks to skip it. Std only, so the fleet tests and the agent's
//! namespace tests share this file.

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The environment variable that turns a missing prerequisite into a skip instead of a failure.
pub const SKIP_VARIABLE: &str = "OUTPOST_NETNS_TESTS";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

static LAB_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct LabError(pub String);

impl fmt::Display for LabError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

pub type LabResult<T> = Result<T, LabError>;

/// `Err(reason)` when this process cannot build a lab: not root, no `ip netns`, or a missing
/// program from `extra_programs` (e.g. `wireguard-go`).
pub fn lab_support(extra_programs: &[&str]) -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .unwrap_or("?");
    if effective_uid != "0" {
        return Err(format!(
            "network-namespace tests need root (effective uid is {effective_uid}); run them as root or in CI"
        ));
    }
    let netns_works = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !netns_works {
        return Err("`ip netns list` does not work: install iproute2".to_string());
    }
    for program in ["ping"].iter().chain(extra_programs) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            return Err(format!("program {program} is not installed"));
        }
    }
    Ok(())
}

/// Returns `true` when the test may run. Without support it panics with the reason, or, when
/// `OUTPOST_NETNS_TESTS=skip` is set, prints the reason and returns `false`.
pub fn require_lab_support(test_name: &str, extra_programs: &[&str]) -> bool {
    match lab_support(extra_programs) {
        Ok(()) => true,
        Err(reason) if std::env::var(SKIP_VARIABLE).as_deref() == Ok("skip") => {
            eprintln!("SKIPPED {test_name}: {reason} ({SKIP_VARIABLE}=skip)");
            false
        }
        Err(reason) => panic!(
            "{test_name} cannot run: {reason}. Set {SKIP_VARIABLE}=skip to skip it on purpose"
        ),
    }
}

/// Whether a link is up or down (for cutting a node off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Down,
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct LabNode {
    pub index: usize,
    pub namespace: String,
    /// The node's name for its underlay interface (inside its namespace).
    pub underlay_interface: String,
    pub underlay_address: Ipv4Addr,
    /// The other end of its veth, inside the switch namespace.
    switch_port: String,
}

impl LabNode {
    /// The namespace handle, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.namespace)
    }
}

/// Namespaces on a bridge. Dropping it deletes them all.
#[derive(Debug)]
pub struct Lab {
    /// Short and unique per lab in this machine (`PID%100000` + sequence), for names.
    pub id: String,
    pub switch_namespace: String,
    pub nodes: Vec<LabNode>,
    made_namespaces: Vec<String>,
}

/// How long one `ip` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

impl Lab {
    /// Makes `node_count` namespaces named `op-TAG-PID-SEQ-N` on a bridge, addresses
    /// `10.231.0.(N+1)/24` on interface `ul0`, everything up.
    pub fn create(tag: &str, node_count: usize) -> LabResult<Lab> {
        Self::create_with_underlay(tag, node_count, Ipv4Addr::new(10, 231, 0, 0))
    }

    pub fn create_with_underlay(
        tag: &str,
        node_count: usize,
        underlay_network: Ipv4Addr,
    ) -> LabResult<Lab> {
        if node_count == 0 || node_count > 200 {
            return Err(LabError(format!(
                "a lab has 1 to 200 nodes, not {node_count}"
            )));
        }
        let sequence = LAB_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{}{}", pid % 100_000, sequence);
        let prefix = format!("op-{tag}-{pid}-{sequence}");
        let mut lab = Lab {
            id,
            switch_namespace: format!("{prefix}-sw"),
            nodes: Vec::new(),
            made_namespaces: Vec::new(),
        };
        // From here on, a failure drops `lab`, which deletes what was made so far.
        lab.add_namespace(&lab.switch_namespace.clone())?;
        let switch = lab.switch_namespace.clone();
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        let base = underlay_network.octets();
        for index in 0..node_count {
            let namespace = format!("{prefix}-{index}");
            lab.add_namespace(&namespace)?;
            let switch_port = format!("n{index}");
            let underlay_interface = "ul0".to_string();
            ip(&[
                "link",
                "add",
                &underlay_interface,
                "netns",
                &namespace,
                "type",
                "veth",
                "peer",
                "name",
                &switch_port,
                "netns",
                &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &switch_port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &switch_port, "up"])?;
            let last_octet =
                u8::try_from(index + 1).map_err(|_| LabError("too many nodes".into()))?;
            let underlay_address = Ipv4Addr::new(base[0], base[1], base[2], last_octet);
            ip(&[
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{underlay_address}/24"),
                "dev",
                &underlay_interface,
            ])?;
            ip(&["-n", &namespace, "link", "set", &underlay_interface, "up"])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            lab.nodes.push(LabNode {
                index,
                namespace,
                underlay_interface,
                underlay_address,
                switch_port,
            });
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, name: &str) -> LabResult<()> {
        ip(&["netns", "add", name])?;
        self.made_namespaces.push(name.to_string());
        Ok(())
    }

    pub fn node(&self, index: usize) -> &LabNode {
        &self.nodes[index]
    }

    /// Runs `program args…` inside a node's namespace (`ip netns exec`), with a deadline.
    pub fn exec(
        &self,
        node: usize,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> LabResult<Output> {
        let mut full = vec!["netns", "exec", &self.nodes[node].namespace, program];
        full.extend_from_slice(args);
        run("ip", &full, timeout)
    }

    /// One ping (1 s wait) from a node to an address; `true` when it was answered.
    pub fn ping_once(&self, from: usize, to: IpAddr) -> bool {
        let target = to.to_string();
        self.exec(
            from,
            "ping",
            &["-c", "1", "-W", "1", "-q", &target],
            Duration::from_secs(10),
        )
        .is_ok_and(|output| output.status.success())
    }

    /// Polls until a ping from `from` to `to` is answered, or fails at the deadline.
    pub fn wait_for_ping(&self, from: usize, to: IpAddr, timeout: Duration) -> LabResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping_once(from, to) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError(format!(
                    "node {from} ({}) got no ping answer from {to} within {} s",
                    self.nodes[from].namespace,
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls until a ping from `from` to `to` goes unanswered, or fails at the deadline.
    pub fn wait_for_ping_loss(&self, from: usize, to: IpAddr, timeout: Duration) -> LabResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.ping_once(from, to) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError(format!(
                    "node {from} still gets ping answers from {to} after {} s",
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cuts or restores a node's underlay link (its switch port), e.g. to take it offline.
    pub fn set_underlay(&self, node: usize, state: LinkState) -> LabResult<()> {
        let word = match state {
            LinkState::Up => "up",
            LinkState::Down => "down",
        };
        ip(&[
            "-n",
            &self.switch_namespace,
            "link",
            "set",
            &self.nodes[node].switch_port,
            word,
        ])
        .map(|_| ())
    }

    /// Whether a link exists inside a node's namespace.
    pub fn link_exists(&self, node: usize, name: &str) -> bool {
        ip(&[
            "-n",
            &self.nodes[node].namespace,
            "link",
            "show",
            "dev",
            name,
        ])
        .is_ok()
    }
}

/// Pids of every process in a namespace (`ip netns pids`); empty when it cannot be read.
pub fn namespace_pids(namespace: &str) -> Vec<i32> {
    ip(&["netns", "pids", namespace])
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in a namespace (the box loses power) and waits, with a deadline, until
/// none is left. `ip netns del` kills nothing, so a lab does this before deleting one.
pub fn kill_namespace(namespace: &str) {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let pids = namespace_pids(namespace);
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("lab cleanup: processes {pids:?} of namespace {namespace} outlived SIGKILL");
            return;
        }
        let mut kill = Command::new("kill");
        kill.arg("-KILL")
            .args(pids.iter().map(i32::to_string))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = kill.status();
        thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Whatever still runs inside (a daemon a failed test left) dies first; then the node
        // namespaces (their veth ends die with them), the switch last.
        for name in &self.made_namespaces {
            kill_namespace(name);
        }
        for name in self.made_namespaces.iter().rev() {
            if let Err(error) = ip(&["netns", "del", name]) {
                eprintln!("lab cleanup: cannot delete namespace {name}: {error}");
            }
        }
    }
}

fn ip(args: &[&str]) -> LabResult<Output> {
    run("ip", args, COMMAND_TIMEOUT)
}

/// Runs a command to completion within `timeout`; a non-zero exit is an error with stderr.
fn run(program: &str, args: &[&str], timeout: Duration) -> LabResult<Output> {
    let text = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| LabError(format!("cannot start `{text}`: {error}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError(format!(
                    "`{text}` did not finish within {} s",
                    timeout.as_secs()
                )));
            }
            Err(error) => return Err(LabError(format!("cannot wait for `{text}`: {error}"))),
        }
    }
    // The commands here print little, so reading after exit cannot dead-lock on a full pipe.
    let output = child
        .wait_with_output()
        .map_err(|error| LabError(format!("cannot read `{text}` output: {error}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError(format!(
            "`{text}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
