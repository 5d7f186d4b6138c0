//! The userspace backend: one `wireguard-go` (or `boringtun-cli`) daemon per interface, started
//! by the agent or adopted when its UAPI socket already answers, driven over that socket, and
//! killed and restarted when it stops answering in time (the watchdog in `ensure_device`).
//!
//! The daemon runs in the foreground as the agent's child in its own process group, so it
//! outlives an agent restart (the next agent adopts it) but not a reboot. Its pid is written
//! next to the socket so a later agent can stop a hung daemon it did not start.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::WireguardError;
use super::backend::{DeviceReadiness, UserspaceImplementation, WireguardBackend};
use super::device::{DeviceUpdate, LinkChanges, LinkState, LiveDevice};
use super::diff::UpdateStyle;
use super::link;
use super::spec::InterfaceName;
use super::uapi::{ListenerCheck, UapiClient, UapiError, UapiParseError, same_network_namespace};

/// Where wireguard-go and boringtun put their sockets (fixed in both).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long an agent waits for another agent of the host (another network namespace) to finish
/// with an interface name before it gives up on this round.
const INTERFACE_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the userspace backend.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    pub implementation: UserspaceImplementation,
    /// The daemon program; a bare name is looked up on `PATH`.
    pub program: PathBuf,
    pub socket_dir: PathBuf,
    /// Deadline of each UAPI exchange; a daemon slower than this counts as hung.
    pub uapi_timeout: Duration,
    /// How long a new daemon may take until its socket answers.
    pub start_timeout: Duration,
    /// Deadline of each netlink request (addresses and routes of the tun device).
    pub command_timeout: Duration,
}

impl UserspaceConfig {
    pub fn new(implementation: UserspaceImplementation) -> Self {
        Self {
            implementation,
            program: PathBuf::from(implementation.default_program()),
            socket_dir: PathBuf::from(DEFAULT_SOCKET_DIR),
            uapi_timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(5),
        }
    }
}

/// A daemon this backend knows about: started here (`child` is set) or adopted.
#[derive(Debug)]
struct Daemon {
    pid: Option<u32>,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct UserspaceBackend {
    config: UserspaceConfig,
    daemons: BTreeMap<InterfaceName, Daemon>,
}

impl UserspaceBackend {
    pub fn new(config: UserspaceConfig) -> Self {
        Self {
            config,
            daemons: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &UserspaceConfig {
        &self.config
    }

    pub fn socket_path(&self, interface: &InterfaceName) -> PathBuf {
        self.config.socket_dir.join(format!("{interface}.sock"))
    }

    pub fn pid_path(&self, interface: &InterfaceName) -> PathBuf {
        self.config
            .socket_dir
            .join(format!("{interface}.outpost-pid"))
    }

    pub fn log_path(&self, interface: &InterfaceName) -> PathBuf {
        self.config
            .socket_dir
            .join(format!("{interface}.outpost-log"))
    }

    pub fn lock_path(&self, interface: &InterfaceName) -> PathBuf {
        self.config
            .socket_dir
            .join(format!("{interface}.outpost-lock"))
    }

    /// Takes the host-wide lock of an interface name, so agents of several network namespaces
    /// that share the socket folder never start, adopt or stop daemons of one name at once.
    /// Released when the returned guard drops.
    fn lock_interface(&self, interface: &InterfaceName) -> Result<Flock<fs::File>, WireguardError> {
        let path = self.lock_path(interface);
        let filesystem = |source| WireguardError::Filesystem {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.config.socket_dir).map_err(|source| {
            WireguardError::Filesystem {
                path: self.config.socket_dir.clone(),
                source,
            }
        })?;
        let deadline = Instant::now() + INTERFACE_LOCK_TIMEOUT;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(filesystem)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(guard) => return Ok(guard),
                Err((returned, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = returned;
                    thread::sleep(POLL_INTERVAL);
                }
                Err((_, errno)) => {
                    return Err(filesystem(std::io::Error::other(format!(
                        "cannot lock it within {} ms: {errno}",
                        INTERFACE_LOCK_TIMEOUT.as_millis()
                    ))));
                }
            }
        }
    }

    /// The pid of the interface's daemon, from this backend or the pid file it wrote.
    pub fn daemon_pid(&self, interface: &InterfaceName) -> Option<u32> {
        self.daemons
            .get(interface)
            .and_then(|daemon| daemon.pid)
            .or_else(|| read_pid_file(&self.pid_path(interface)))
    }

    /// Lets go of every daemon without stopping it (they keep serving their interfaces and a
    /// later backend adopts them), reaping those that already exited. For an agent that is
    /// shutting down or handing over.
    pub fn detach_daemons(&mut self) {
        for (_, daemon) in std::mem::take(&mut self.daemons) {
            if let Some(mut child) = daemon.child {
                let _ = child.try_wait();
            }
        }
    }

    /// A client that talks only to a daemon of this network namespace.
    fn client(&self, interface: &InterfaceName) -> UapiClient {
        UapiClient::new(self.socket_path(interface), self.config.uapi_timeout)
            .with_listener_check(ListenerCheck::SameNetworkNamespace)
    }

    fn start_daemon(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        let program = self.config.program.display().to_string();
        let start_error = |reason: String| WireguardError::DaemonStart {
            program: program.clone(),
            interface: interface.to_string(),
            reason,
        };
        fs::create_dir_all(&self.config.socket_dir).map_err(|source| {
            WireguardError::Filesystem {
                path: self.config.socket_dir.clone(),
                source,
            }
        })?;
        remove_if_present(&self.socket_path(interface))?;
        let log_path = self.log_path(interface);
        let log = fs::File::create(&log_path).map_err(|source| WireguardError::Filesystem {
            path: log_path.clone(),
            source,
        })?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|source| WireguardError::Filesystem {
                path: log_path.clone(),
                source,
            })?;
        let mut command = Command::new(&self.config.program);
        // The daemon gets no part of the agent's environment (which may hold credentials).
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        match self.config.implementation {
            UserspaceImplementation::WireguardGo => {
                command
                    .arg("-f")
                    .arg(interface.as_str())
                    .env("LOG_LEVEL", "error");
            }
            UserspaceImplementation::Boringtun => {
                command
                    .args(["--foreground", "--disable-drop-privileges"])
                    .arg(interface.as_str());
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr))
            .process_group(0)
            .spawn()
            .map_err(|error| start_error(error.to_string()))?;
        let pid = child.id();
        // Written whole (temporary file, then rename): a reader never sees half a pid.
        let pid_path = self.pid_path(interface);
        let partial_path = pid_path.with_extension("outpost-pid.tmp");
        fs::write(&partial_path, format!("{pid}\n"))
            .and_then(|()| fs::rename(&partial_path, &pid_path))
            .map_err(|source| WireguardError::Filesystem {
                path: pid_path,
                source,
            })?;
        self.daemons.insert(
            interface.clone(),
            Daemon {
                pid: Some(pid),
                child: Some(child),
            },
        );
        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            if let Some(daemon) = self.daemons.get_mut(interface)
                && let Some(child) = daemon.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.daemons.remove(interface);
                let log_text = fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = log_text
                    .trim()
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(start_error(format!("it exited ({status}): {tail}")));
            }
            let own_daemon = self
                .client(interface)
                .with_listener_check(ListenerCheck::Pid(pid));
            match own_daemon.get() {
                Ok(_) => return Ok(()),
                Err(error @ UapiError::ForeignListener { .. }) => {
                    let _ = self.stop_daemon(interface);
                    return Err(start_error(format!(
                        "another daemon took its socket: {error}"
                    )));
                }
                Err(_) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Err(error) => {
                    let _ = self.stop_daemon(interface);
                    return Err(start_error(format!(
                        "its socket did not answer within {} ms: {error}",
                        self.config.start_timeout.as_millis()
                    )));
                }
            }
        }
    }

    /// Kills the interface's daemon (SIGKILL: a hung daemon ignores anything gentler) and waits
    /// until it is gone. A pid from the pid file is only signalled when that process's command
    /// line still names this interface, so a reused pid is never hit.
    fn stop_daemon(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        let known = self.daemons.remove(interface);
        let stop_error = |pid: u32, reason: String| WireguardError::DaemonStop {
            pid,
            interface: interface.to_string(),
            reason,
        };
        match known {
            Some(Daemon {
                pid: Some(pid),
                child: Some(mut child),
            }) => {
                let _ = child.kill();
                wait_child(&mut child, Duration::from_secs(5))
                    .map_err(|reason| stop_error(pid, reason))?;
            }
            _ => {
                if let Some(pid) = read_pid_file(&self.pid_path(interface))
                    && process_serves_interface(pid, interface)
                {
                    // Another namespace's daemon and its files are never touched.
                    if !same_network_namespace(pid) {
                        return Err(foreign_namespace(interface, Some(pid)));
                    }
                    let target = Pid::from_raw(
                        i32::try_from(pid)
                            .map_err(|_| stop_error(pid, "pid out of range".into()))?,
                    );
                    match kill(target, Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(errno) => return Err(stop_error(pid, errno.to_string())),
                    }
                    wait_gone(pid, Duration::from_secs(5))
                        .map_err(|reason| stop_error(pid, reason))?;
                }
            }
        }
        remove_if_present(&self.pid_path(interface))?;
        remove_if_present(&self.socket_path(interface))?;
        Ok(())
    }

    /// Forgets a daemon that exited on its own (reaping it when it was our child).
    fn reap_if_exited(&mut self, interface: &InterfaceName) -> bool {
        let exited = match self.daemons.get_mut(interface) {
            Some(Daemon {
                child: Some(child), ..
            }) => matches!(child.try_wait(), Ok(Some(_))),
            Some(Daemon { pid: Some(pid), .. }) => !process_serves_interface(*pid, interface),
            _ => false,
        };
        if exited {
            self.daemons.remove(interface);
        }
        exited
    }
}

impl WireguardBackend for UserspaceBackend {
    fn description(&self) -> String {
        format!("userspace {}", self.config.program.display())
    }

    fn update_style(&self) -> UpdateStyle {
        self.config.implementation.update_style()
    }

    fn ensure_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<DeviceReadiness, WireguardError> {
        let _interface_lock = self.lock_interface(interface)?;
        let known_before = self.daemons.contains_key(interface);
        match self.client(interface).get_with_listener() {
            Ok(_) if known_before => Ok(DeviceReadiness::Running),
            Ok((_, listener)) => {
                let pid = listener.or_else(|| {
                    read_pid_file(&self.pid_path(interface))
                        .filter(|pid| process_serves_interface(*pid, interface))
                });
                self.daemons
                    .insert(interface.clone(), Daemon { pid, child: None });
                Ok(DeviceReadiness::Adopted)
            }
            // The socket folder is shared by every network namespace of the host: a daemon
            // of another agent (another namespace) is never adopted, reconfigured or stopped.
            Err(UapiError::ForeignListener { pid, .. }) => {
                self.daemons.remove(interface);
                Err(foreign_namespace(interface, pid))
            }
            Err(error) if error.is_not_listening() => {
                let exited = self.reap_if_exited(interface);
                self.stop_daemon(interface)?;
                self.start_daemon(interface)?;
                if known_before || exited {
                    Ok(DeviceReadiness::Restarted {
                        reason: format!("the daemon had exited ({error})"),
                    })
                } else {
                    Ok(DeviceReadiness::Created)
                }
            }
            Err(UapiError::Reply {
                source: source @ UapiParseError::Malformed { .. },
                path,
            }) => Err(WireguardError::Uapi(UapiError::Reply { path, source })),
            Err(error) => {
                // Timed out, closed early, or answered an error: hung or broken. Restart it.
                self.stop_daemon(interface)?;
                self.start_daemon(interface)?;
                Ok(DeviceReadiness::Restarted {
                    reason: error.to_string(),
                })
            }
        }
    }

    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<LiveDevice>, WireguardError> {
        match self.client(interface).get() {
            Ok(device) => Ok(Some(device)),
            Err(error) if error.is_not_listening() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &DeviceUpdate,
    ) -> Result<(), WireguardError> {
        Ok(self.client(interface).set(update)?)
    }

    fn read_link(&mut self, interface: &InterfaceName) -> Result<LinkState, WireguardError> {
        link::read_link(interface, self.config.command_timeout)
    }

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &LinkChanges,
    ) -> Result<(), WireguardError> {
        link::update_link(interface, changes, self.config.command_timeout)
    }

    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        let _interface_lock = self.lock_interface(interface)?;
        if let Err(UapiError::ForeignListener { pid, .. }) = self.client(interface).get() {
            return Err(foreign_namespace(interface, pid));
        }
        self.stop_daemon(interface)?;
        remove_if_present(&self.log_path(interface))
    }
}

fn foreign_namespace(interface: &InterfaceName, pid: Option<u32>) -> WireguardError {
    WireguardError::ForeignNamespace {
        interface: interface.to_string(),
        daemon: pid.map_or_else(|| "an unknown process".into(), |pid| format!("pid {pid}")),
    }
}

fn remove_if_present(path: &Path) -> Result<(), WireguardError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(WireguardError::Filesystem {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_pid_file(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    text.trim().parse().ok().filter(|pid| *pid > 1)
}

/// Whether `pid` is alive (not a zombie) and its command line has the interface name as an
/// argument of its own.
fn process_serves_interface(pid: u32, interface: &InterfaceName) -> bool {
    let Ok(command_line) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true);
    !zombie
        && command_line
            .split(|byte| *byte == 0)
            .skip(1)
            .any(|argument| argument == interface.as_str().as_bytes())
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            Ok(None) => {
                return Err(format!(
                    "still running {} ms after SIGKILL",
                    timeout.as_millis()
                ));
            }
            Err(error) => return Err(error.to_string()),
        }
    }
}

fn wait_gone(pid: u32, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|state| state != "Z")
            })
            .unwrap_or(false);
        if !alive {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "still running {} ms after SIGKILL",
                timeout.as_millis()
            ));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_in(dir: &Path, program: &str) -> UserspaceBackend {
        let mut config = UserspaceConfig::new(UserspaceImplementation::WireguardGo);
        config.program = PathBuf::from(program);
        config.socket_dir = dir.to_path_buf();
        config.start_timeout = Duration::from_secs(2);
        UserspaceBackend::new(config)
    }

    #[test]
    fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = backend_in(dir.path(), "/nonexistent/wireguard-go");
        let interface = InterfaceName::new("optest0").unwrap();
        let error = backend.ensure_device(&interface).unwrap_err();
        assert!(
            matches!(error, WireguardError::DaemonStart { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("/nonexistent/wireguard-go"),
            "{error}"
        );
        assert_eq!(backend.read_device(&interface).unwrap(), None);
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-daemon");
        fs::write(
            &script,
            "#!/bin/sh\necho \"cannot create tun for $2\" >&2\nexit 3\n",
        )
        .unwrap();
        let mut permissions = fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        fs::set_permissions(&script, permissions).unwrap();
        let mut backend = backend_in(dir.path(), script.to_str().unwrap());
        let interface = InterfaceName::new("optest0").unwrap();
        let error = backend.ensure_device(&interface).unwrap_err().to_string();
        assert!(error.contains("cannot create tun for optest0"), "{error}");
        assert!(error.contains("exit status: 3"), "{error}");
    }

    #[test]
    fn a_stale_socket_file_is_not_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = backend_in(dir.path(), "/nonexistent/wireguard-go");
        let interface = InterfaceName::new("optest0").unwrap();
        // A socket file nobody listens on, as a killed daemon leaves behind.
        drop(std::os::unix::net::UnixListener::bind(backend.socket_path(&interface)).unwrap());
        assert_eq!(backend.read_device(&interface).unwrap(), None);
    }
}
