//! Running `outpost-control` on the node that leads (D3, D6): a supervised child process from
//! the same binary directory, data under `DATA_DIR/control`, listening on the LAN, advertising
//! itself over mDNS with the leadership epoch and signing with the site join secret. Stopping
//! it sends SIGTERM to its process group, then SIGKILL after a grace period.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::config::AgentConfig;

pub const CONTROL_DIR_NAME: &str = "control";
pub const CONTROL_PROGRAM_NAME: &str = "outpost-control";
/// The epoch the control data in `DATA_DIR/control` was last served at.
const EPOCH_FILE_NAME: &str = "leader-epoch";
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The pid (and process group) of the control this node started last.
const PID_FILE_NAME: &str = "control.pid";

/// The process group of the control child this process runs, for shutdown.
static RUNNING_GROUP: Mutex<Option<i32>> = Mutex::new(None);

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot prepare the control data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("outpost-control exited during start ({status}); see {log}")]
    Exited { status: String, log: String },
    #[error("outpost-control did not write control.url within {secs} s; see {log}")]
    NotReady { secs: u64, log: String },
}

pub fn control_data_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(CONTROL_DIR_NAME)
}

/// The control program: configured, else `outpost-control` next to this executable.
pub fn control_program(config: &AgentConfig) -> PathBuf {
    config.site.control_program.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(CONTROL_PROGRAM_NAME)))
            .unwrap_or_else(|| PathBuf::from(CONTROL_PROGRAM_NAME))
    })
}

/// sha256 hex of the control CA in `DIR/admin/ca.pem`.
pub fn ca_fingerprint(control_dir: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(control_dir.join("admin/ca.pem")).ok()?;
    let der = crate::link::pinning::pem_to_der(&pem)?;
    Some(crate::os::hex(&Sha256::digest(&der)))
}

/// The local admin token control wrote to `DIR/admin/outpostctl.json`.
pub fn admin_token(control_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(control_dir.join("admin/outpostctl.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("token")?.as_str().map(str::to_string)
}

/// The epoch the data in `control_dir` was served at, if any.
pub fn served_epoch(control_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(control_dir.join(EPOCH_FILE_NAME))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// How the control data dir starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Keep the store this node served before (it is at least as fresh as the standby copy).
    Previous,
    /// Move the old store aside (`control.previous`) and start empty, to be seeded.
    Fresh,
}

/// A running control child.
pub struct ControlChild {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
}

/// Starts control for leadership `epoch`, reachable at `https://ip:port`.
pub fn start(
    config: &AgentConfig,
    epoch: u64,
    ip: Ipv4Addr,
    from: StartFrom,
) -> Result<ControlChild, LeaderError> {
    let data_dir = control_data_dir(&config.data_dir);
    let dir_error = |source| LeaderError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    if from == StartFrom::Fresh && data_dir.exists() {
        let previous = config.data_dir.join("control.previous");
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(&data_dir, &previous).map_err(dir_error)?;
    }
    std::fs::create_dir_all(&data_dir).map_err(dir_error)?;
    let _ = std::fs::remove_file(data_dir.join("control.url"));
    crate::os::atomic_write(
        &data_dir.join(EPOCH_FILE_NAME),
        epoch.to_string().as_bytes(),
    )
    .map_err(dir_error)?;
    let log_path = data_dir.join("control.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(dir_error)?;
    let log_err = log.try_clone().map_err(dir_error)?;
    let url = format!("https://{ip}:{}", config.site.control_port);
    let program = control_program(config);
    let mut command = Command::new(&program);
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--listen")
        .arg(format!("0.0.0.0:{}", config.site.control_port))
        .arg("--public-url")
        .arg(&url)
        .arg("--san")
        .arg(ip.to_string())
        .arg("--advertise-mdns")
        .arg("--leader-epoch")
        .arg(epoch.to_string())
        .env_remove("OUTPOST_DATA_DIR")
        .env_remove("OUTPOST_CONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // The secret goes through the environment, not the command line (ps shows that).
    match &config.site.join_secret {
        Some(secret) => command.env("OUTPOST_JOIN_SECRET", secret),
        None => command.env_remove("OUTPOST_JOIN_SECRET"),
    };
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command.spawn().map_err(|source| LeaderError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    *RUNNING_GROUP.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.id() as i32);
    let _ = crate::os::atomic_write(
        &data_dir.join(PID_FILE_NAME),
        child.id().to_string().as_bytes(),
    );
    Ok(ControlChild {
        child,
        url,
        data_dir,
        log_path,
    })
}

impl ControlChild {
    /// Waits until control wrote `control.url` (it serves), or fails when it exits or times out.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), LeaderError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(LeaderError::Exited {
                    status,
                    log: self.log_path.display().to_string(),
                });
            }
            if self.data_dir.join("control.url").exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LeaderError::NotReady {
                    secs: timeout.as_secs(),
                    log: self.log_path.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(error) => Some(format!("cannot wait: {error}")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM to the group, SIGKILL after the grace period.
    pub fn stop(mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.exited().is_none() {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.child.wait();
        }
        *RUNNING_GROUP.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Stops a control left running by a previous agent process (killed without a chance to stop
/// it): nobody renews its lease any more, so it must not keep serving. Returns its pid.
pub fn stop_orphan(data_dir: &Path) -> Option<i32> {
    let pid_file = control_data_dir(data_dir).join(PID_FILE_NAME);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let _ = std::fs::remove_file(&pid_file);
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if name.trim() != CONTROL_PROGRAM_NAME {
        return None;
    }
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while killpg(group, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    Some(pid)
}

/// Stops the control child, if any, when the agent exits.
pub fn stop_running_on_exit() {
    let group = RUNNING_GROUP
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(group) = group {
        let group = Pid::from_raw(group);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        // The group leader is control itself (our child): reap it so it does not linger as a
        // zombie that keeps the group alive.
        while Instant::now() < deadline {
            let _ = nix::sys::wait::waitpid(group, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if killpg(group, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(group, None);
    }
}
