//! A fleet in network namespaces with the real WireGuard overlay, shared by the namespace fleet
//! tests (overlay, edge over the overlay): `outpost-control` in the lab's first namespace, an
//! `outpost-agent` with a userspace wireguard-go in each, and helpers that wait for the mesh.
//! Every namespace, process, daemon, socket and file is removed by drop guards.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::netns::Lab;
use crate::{
    AGENT_BINARY, COMMAND_TIMEOUT, CONTROL_BINARY, OUTPOSTCTL_BINARY, ProcessGuard, StopMode,
    TestDir, binary, run_with_timeout, wait_for, wait_until,
};

/// Port control listens on inside its namespace (each lab has its own namespaces).
pub const CONTROL_PORT: u16 = 7443;
/// Generous: the machine is shared. Tests wait for conditions; they never assert a time.
pub const CONVERGE: Duration = Duration::from_secs(90);
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Control inside the lab's first namespace.
pub struct LabControl {
    pub guard: ProcessGuard,
    pub namespace: String,
    pub data_dir: PathBuf,
}

impl LabControl {
    pub fn start(lab: &Lab, data_dir: &Path) -> Result<Self> {
        fs::create_dir_all(data_dir)?;
        let node = lab.node(0);
        let address = node.underlay_address;
        let listen = format!("{address}:{CONTROL_PORT}");
        let url = format!("https://{listen}");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.namespace])
            .arg(binary(CONTROL_BINARY)?)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--listen",
                &listen,
                "--public-url",
                &url,
                "--san",
                &address.to_string(),
            ])
            .args(["--node-ttl-secs", "15"])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info");
        let guard = ProcessGuard::spawn(CONTROL_BINARY, command, &data_dir.with_extension("log"))?;
        let mut control = Self {
            guard,
            namespace: node.namespace.clone(),
            data_dir: data_dir.to_path_buf(),
        };
        let admin = data_dir.join("admin").join("outpostctl.json");
        let ready = wait_for(
            "control to answer outpostctl in its namespace",
            CONVERGE,
            || {
                if let Some(status) = control.guard.exited() {
                    return Some(Err(anyhow!(
                        "outpost-control exited with {status}:\n{}",
                        control.guard.log_tail()
                    )));
                }
                if !admin.is_file() {
                    return None;
                }
                control
                    .outpostctl(&["nodes", "--json"])
                    .ok()
                    .filter(|out| out.success())
                    .map(|_| Ok(()))
            },
        );
        ready
            .and_then(|ready| ready)
            .with_context(|| format!("control log:\n{}", control.guard.log_tail()))?;
        Ok(control)
    }

    pub fn outpostctl(&self, args: &[&str]) -> Result<crate::CommandOutput> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(binary(OUTPOSTCTL_BINARY)?)
            .args(args)
            .env_remove("OUTPOST_CONTROL_URL")
            .env_remove("OUTPOST_TOKEN")
            .env_remove("OUTPOST_CA_FILE")
            .env("HOME", self.data_dir.with_extension("home"))
            .env(
                "OUTPOST_CONFIG",
                self.data_dir.join("admin").join("outpostctl.json"),
            );
        run_with_timeout(command, None, COMMAND_TIMEOUT)
    }

    /// `GET path` with the admin token, from inside control's namespace (curl).
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let admin: Value = serde_json::from_slice(&fs::read(
            self.data_dir.join("admin").join("outpostctl.json"),
        )?)?;
        let token = admin["token"].as_str().context("no admin token")?;
        let url = format!(
            "{}{path}",
            admin["control_url"].as_str().context("no control url")?
        );
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &self.namespace,
                "curl",
                "--silent",
                "--fail",
                "--cacert",
            ])
            .arg(self.data_dir.join("admin").join("ca.pem"))
            .args(["-H", &format!("authorization: Bearer {token}"), &url]);
        let output = run_with_timeout(command, None, COMMAND_TIMEOUT)?.expect_success(path)?;
        Ok(serde_json::from_str(&output.stdout)?)
    }

    pub fn enrollment_token(&self) -> Result<String> {
        let output = self
            .outpostctl(&["enroll", "create", "--ttl", "30m", "--json"])?
            .expect_success("enroll create")?;
        Ok(output.json()?["token"]
            .as_str()
            .context("no token")?
            .to_string())
    }
}

/// One agent in one namespace, with its own data dir and interface name.
pub struct LabAgent {
    pub guard: Option<ProcessGuard>,
    /// The enrollment token of the first start; later starts run on the stored credential.
    pub token: String,
    pub node_id: String,
    pub namespace: String,
    pub interface: String,
    pub data_dir: PathBuf,
}

impl LabAgent {
    pub fn start(&mut self, token: &str, extra_args: &[&str]) -> Result<()> {
        self.token = token.to_string();
        self.restart(extra_args)
    }

    /// Starts the agent again on its data dir (offline-capable: nothing here needs control).
    pub fn restart(&mut self, extra_args: &[&str]) -> Result<()> {
        let token = self.token.clone();
        fs::create_dir_all(&self.data_dir)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(binary(AGENT_BINARY)?)
            .arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            // As the shared harness does (tests/src/lib.rs): last-good once applied (R4 is tested
            // in delivery_fleet).
            .args(["--healthy-after-secs", "0"])
            .args([
                "--enroll",
                &token,
                "--status-listen",
                "127.0.0.1:0",
                "--node-id",
                &self.node_id,
            ])
            .args([
                "--wireguard-backend",
                "wireguard-go",
                "--wireguard-interface",
                &self.interface,
            ])
            .args(["--feed-wait-secs", "20"])
            .args(extra_args)
            .env("RUST_LOG", "info");
        for variable in [
            "OUTPOST_DATA_DIR",
            "OUTPOST_CONTROL_URL",
            "OUTPOST_ENROLL_TOKEN",
            "OUTPOST_NODE_ID",
        ] {
            command.env_remove(variable);
        }
        self.guard = Some(ProcessGuard::spawn(
            AGENT_BINARY,
            command,
            &self.data_dir.with_extension("log"),
        )?);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            guard.stop(StopMode::Kill);
        }
    }

    /// The running agent's status snapshot (`DIR/status.json`).
    pub fn status(&self) -> Option<Value> {
        serde_json::from_slice(&fs::read(self.data_dir.join("status.json")).ok()?).ok()
    }

    /// The overlay address the agent's device has, once it has one.
    pub fn overlay_address(&self) -> Option<IpAddr> {
        let status = self.status()?;
        let text = status["overlay"]["addresses"].get(0)?.as_str()?;
        text.split('/').next()?.parse().ok()
    }

    pub fn peer_ids(&self) -> Vec<String> {
        self.status()
            .map(|status| {
                status["overlay"]["peers"]
                    .as_array()
                    .map(|peers| {
                        peers
                            .iter()
                            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    pub fn peer_key(&self, node_id: &str) -> Option<String> {
        let status = self.status()?;
        status["overlay"]["peers"]
            .as_array()?
            .iter()
            .find(|peer| peer["node_id"] == node_id)
            .and_then(|peer| peer["public_key"].as_str().map(str::to_string))
    }

    pub fn own_key(&self) -> Option<String> {
        self.status()?["overlay"]["public_key"]
            .as_str()
            .map(str::to_string)
    }

    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.data_dir.with_extension("log"), 30)
    }

    /// `outpost-agent status --data-dir D ARGS` run on the node (inside its namespace).
    pub fn status_command(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(binary(AGENT_BINARY)?)
            .arg("status")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args);
        Ok(run_with_timeout(command, None, COMMAND_TIMEOUT)?
            .expect_success("outpost-agent status")?
            .stdout)
    }

    /// The pid of the interface's userspace daemon, from the pid file the agent writes.
    pub fn daemon_pid(&self) -> Option<i32> {
        let pid_path = Path::new(SOCKET_DIR).join(format!("{}.outpost-pid", self.interface));
        fs::read_to_string(pid_path).ok()?.trim().parse().ok()
    }

    /// Kills the userspace daemon of the agent's interface (as a reboot would) and removes its
    /// files; the interface goes with it.
    pub fn kill_daemon(&self) {
        let pid_path = Path::new(SOCKET_DIR).join(format!("{}.outpost-pid", self.interface));
        if let Some(pid) = fs::read_to_string(&pid_path)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for suffix in ["sock", "outpost-pid", "outpost-log"] {
            let _ =
                fs::remove_file(Path::new(SOCKET_DIR).join(format!("{}.{suffix}", self.interface)));
        }
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of agent {} ---\n{}",
                self.node_id,
                self.log_tail()
            );
        }
        self.stop();
        self.kill_daemon();
    }
}

/// A lab with control and agents. Field order is drop order: agents (and their daemons) first,
/// then control, then the namespaces, then the folder.
pub struct OverlayFleet {
    pub agents: Vec<LabAgent>,
    pub control: Option<LabControl>,
    pub lab: Lab,
    pub dir: TestDir,
}

impl OverlayFleet {
    pub fn create(tag: &str, hosts: usize) -> Result<OverlayFleet> {
        let dir = TestDir::new(tag)?;
        let lab = Lab::create(tag, hosts).map_err(|e| anyhow!("{e}"))?;
        let control = LabControl::start(&lab, &dir.path().join("control"))?;
        let agents = lab
            .nodes
            .iter()
            .map(|node| LabAgent {
                guard: None,
                token: String::new(),
                node_id: format!("n{}", node.index),
                namespace: node.namespace.clone(),
                interface: format!("ow{}n{}", lab.id, node.index),
                data_dir: dir.path().join(format!("agent-{}", node.index)),
            })
            .collect();
        Ok(OverlayFleet {
            agents,
            control: Some(control),
            lab,
            dir,
        })
    }

    /// Control, while it runs (a test that took it away must not ask for it).
    pub fn control(&self) -> &LabControl {
        self.control
            .as_ref()
            .expect("control was taken away by the test")
    }

    pub fn start_agent(&mut self, index: usize, extra_args: &[&str]) -> Result<()> {
        let token = self.control().enrollment_token()?;
        self.agents[index].start(&token, extra_args)
    }

    /// Waits until each of `members` has exactly the others as peers and an address.
    pub fn wait_for_mesh(&self, members: &[usize]) -> Result<()> {
        self.wait_for_peers(members, members)
    }

    /// Waits until each of `observers` has exactly `members` (without itself) as peers.
    pub fn wait_for_peers(&self, observers: &[usize], members: &[usize]) -> Result<()> {
        for &index in observers {
            let agent = &self.agents[index];
            let mut wanted: Vec<String> = members
                .iter()
                .filter(|&&other| other != index)
                .map(|other| format!("n{other}"))
                .collect();
            wanted.sort();
            wait_until(
                &format!("agent n{index} to have peers {wanted:?}"),
                CONVERGE,
                || {
                    let mut peers = agent.peer_ids();
                    peers.sort();
                    peers == wanted && agent.overlay_address().is_some()
                },
            )
            .with_context(|| {
                format!(
                    "agent n{index}: overlay {:?}\nlog:\n{}",
                    agent.status().map(|s| s["overlay"].clone()),
                    agent.log_tail()
                )
            })?;
        }
        Ok(())
    }

    /// The node's overlay address, once its device shows one (it may be coming back up).
    pub fn address(&self, index: usize) -> Result<IpAddr> {
        wait_for(
            &format!("agent n{index} to show its overlay address"),
            CONVERGE,
            || self.agents[index].overlay_address(),
        )
        .with_context(|| format!("agent n{index}: {:?}", self.agents[index].status()))
    }

    /// Waits until every ordered pair of `members` pings over the overlay.
    pub fn wait_for_pings(&self, members: &[usize]) -> Result<()> {
        for &from in members {
            for &to in members {
                if from != to {
                    let target = self.address(to)?;
                    self.lab
                        .wait_for_ping(from, target, CONVERGE)
                        .map_err(|e| {
                            anyhow!(
                                "{e}; n{from} status: {:?}",
                                self.agents[from].status().map(|s| s["overlay"].clone())
                            )
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Starts control again on its data dir and port (after it was killed).
    pub fn restart_control(&mut self) -> Result<()> {
        let data_dir = self.dir.path().join("control");
        self.control.take();
        self.control = Some(LabControl::start(&self.lab, &data_dir)?);
        Ok(())
    }
}
