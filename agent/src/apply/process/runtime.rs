//! The system calls the supervisor makes, behind the [`Syscalls`] trait: the real one
//! (std::process::Command with its own process group, nix waitpid/killpg, /proc) and, in tests,
//! a recording double that stands in for the kernel.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use outpost_proto::service::ReadinessProbe;

use super::cgroup::CgroupTree;
use super::launcher::{HOLD_FLAG, LAUNCH_COMMAND, Launcher, launch_args, resolve_program};
use super::{logs, procfs, readiness};

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub allocation_id: String,
    pub program: String,
    pub args: Vec<String>,
    /// The complete environment of the process.
    pub env: BTreeMap<String, String>,
    pub working_dir: PathBuf,
    /// Where stdout.log and stderr.log go.
    pub log_dir: PathBuf,
    pub memory_bytes: u64,
    pub cpu_millis: u32,
}

/// A started process; it leads its own process group (pgid == pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: i32,
    pub start_ticks: u64,
}

/// Whether the agent started the process (and can reap it) or adopted it after a restart
/// (and can only watch /proc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Child,
    Adopted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Code(i32),
    Signal(i32),
    /// An adopted process is gone; its exit status went to its real parent.
    Unknown,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Code(code) => write!(f, "exited with code {code}"),
            ExitReason::Signal(signal) => write!(f, "killed by signal {signal}"),
            ExitReason::Unknown => f.write_str("exited (status unknown: adopted process)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCheck {
    Running,
    Exited(ExitReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Kill,
}

/// The kernel as the supervisor sees it.
pub trait Syscalls: Send {
    fn spawn(&mut self, launch: &Launch) -> Result<Spawned, String>;
    /// Has the process exited? Children are reaped; adopted processes are checked in /proc.
    fn check_exit(&mut self, process: Spawned, origin: Origin) -> ExitCheck;
    /// The start ticks of `pid` if it is alive (not a zombie).
    fn live_start_ticks(&mut self, pid: i32) -> Option<u64>;
    fn signal_group(&mut self, pgid: i32, signal: StopSignal) -> Result<(), String>;
    /// What runs readiness probes; shared with the threads that run them off the supervisor's
    /// lock.
    fn prober(&self) -> Arc<dyn Prober>;
    /// Keeps the allocation's logs under their cap.
    fn cap_logs(&mut self, log_dir: &std::path::Path);
    /// The start of `pid` is on record: its launcher may exec the program (see
    /// [`super::launcher`]). Nothing to do where programs start at once.
    fn confirm_start(&mut self, _pid: i32) {}
    /// The start of `pid` could not be recorded: its launcher must never exec the program, and
    /// whatever runs in its group is killed (a directly started program already runs).
    fn abort_start(&mut self, pid: i32) {
        let _ = self.signal_group(pid, StopSignal::Kill);
    }
    /// Frees what the allocation held besides its process (its cgroup).
    fn release(&mut self, allocation_id: &str);
    /// Why resource limits are not applied, if they are not.
    fn limits_unavailable(&self) -> Option<String>;
    fn random_u64(&mut self) -> u64;
}

/// Runs one readiness probe attempt; `Err` says why it did not pass. Called from any thread.
pub trait Prober: Send + Sync {
    fn probe(
        &self,
        allocation_id: &str,
        check: &ReadinessProbe,
        timeout: Duration,
    ) -> Result<(), String>;
}

/// Real probes: HTTP, TCP and exec against this host ([`readiness::probe`]).
pub struct RealProber;

impl Prober for RealProber {
    fn probe(
        &self,
        _allocation_id: &str,
        check: &ReadinessProbe,
        timeout: Duration,
    ) -> Result<(), String> {
        readiness::probe(check, timeout)
    }
}

/// The real kernel.
pub struct RealSyscalls {
    log_cap_bytes: u64,
    cgroups: Result<CgroupTree, String>,
    launcher: Launcher,
    /// Launchers held until their start is on record, by pid: the write end of their stdin.
    start_gates: BTreeMap<i32, std::io::PipeWriter>,
}

impl RealSyscalls {
    pub fn new(
        log_cap_bytes: u64,
        cgroups: Result<CgroupTree, String>,
        launcher: Launcher,
    ) -> Self {
        Self {
            log_cap_bytes,
            cgroups,
            launcher,
            start_gates: BTreeMap::new(),
        }
    }
}

fn open_log(path: PathBuf) -> Result<fs::File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

impl Syscalls for RealSyscalls {
    fn spawn(&mut self, launch: &Launch) -> Result<Spawned, String> {
        for dir in [&launch.working_dir, &launch.log_dir] {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let path_var = launch.env.get("PATH").map_or("", String::as_str);
        let program = resolve_program(&launch.program, path_var)
            .map_err(|why| format!("cannot start {:?}: {why}", launch.program))?;
        let stdout = open_log(logs::stdout_path(&launch.log_dir))?;
        let stderr = open_log(logs::stderr_path(&launch.log_dir))?;
        // Limits first, so the process joins its cgroup before it can fork.
        let cgroup_procs = match &self.cgroups {
            Ok(tree) => {
                match tree.prepare(
                    &launch.allocation_id,
                    launch.memory_bytes,
                    launch.cpu_millis,
                ) {
                    Ok(procs) => Some(procs),
                    Err(why) => {
                        self.cgroups = Err(why);
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let (mut command, stdin, gate) = match &self.launcher {
            Launcher::Direct => {
                let mut command = Command::new(&program);
                command.args(&launch.args);
                (command, Stdio::null(), None)
            }
            Launcher::ThroughAgent(agent) => {
                let (gate_reader, gate_writer) = std::io::pipe()
                    .map_err(|e| format!("cannot start {:?}: no pipe: {e}", launch.program))?;
                let mut command = Command::new(agent);
                command.arg(LAUNCH_COMMAND).arg(HOLD_FLAG).args(launch_args(
                    cgroup_procs.as_deref(),
                    &program.display().to_string(),
                    &launch.args,
                ));
                (command, Stdio::from(gate_reader), Some(gate_writer))
            }
        };
        let child = command
            .env_clear()
            .envs(&launch.env)
            .current_dir(&launch.working_dir)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", launch.program))?;
        let pid = child.id() as i32;
        // The std handle is dropped without waiting: the supervisor reaps with waitpid, and the
        // process outlives the agent when the agent exits.
        drop(child);
        if let Some(gate) = gate {
            self.start_gates.insert(pid, gate);
        }
        // The start time is set at fork and survives the launcher's exec.
        let start_ticks = procfs::read_stat(pid)
            .map(|stat| stat.start_ticks)
            .unwrap_or(0);
        if let (Launcher::Direct, Some(procs)) = (&self.launcher, &cgroup_procs)
            && let Err(why) = std::fs::write(procs, pid.to_string())
        {
            self.cgroups = Err(format!("cannot write {pid} to {}: {why}", procs.display()));
        }
        Ok(Spawned { pid, start_ticks })
    }

    fn check_exit(&mut self, process: Spawned, origin: Origin) -> ExitCheck {
        if origin == Origin::Child {
            match waitpid(Pid::from_raw(process.pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return ExitCheck::Exited(ExitReason::Code(code));
                }
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    return ExitCheck::Exited(ExitReason::Signal(signal as i32));
                }
                Ok(_) => return ExitCheck::Running,
                // Not our child after all (reaped elsewhere): fall back to /proc.
                Err(Errno::ECHILD) | Err(_) => {}
            }
        }
        match procfs::live_start_ticks(process.pid) {
            Some(ticks) if ticks == process.start_ticks => ExitCheck::Running,
            _ => ExitCheck::Exited(ExitReason::Unknown),
        }
    }

    fn live_start_ticks(&mut self, pid: i32) -> Option<u64> {
        procfs::live_start_ticks(pid)
    }

    fn signal_group(&mut self, pgid: i32, signal: StopSignal) -> Result<(), String> {
        let signal = match signal {
            StopSignal::Terminate => Signal::SIGTERM,
            StopSignal::Kill => Signal::SIGKILL,
        };
        match killpg(Pid::from_raw(pgid), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!("cannot send {signal} to process group {pgid}: {e}")),
        }
    }

    fn prober(&self) -> Arc<dyn Prober> {
        Arc::new(RealProber)
    }

    fn cap_logs(&mut self, log_dir: &std::path::Path) {
        for path in [logs::stdout_path(log_dir), logs::stderr_path(log_dir)] {
            let _ = logs::cap_log(&path, self.log_cap_bytes);
        }
    }

    fn confirm_start(&mut self, pid: i32) {
        use std::io::Write;
        if let Some(mut gate) = self.start_gates.remove(&pid) {
            // A launcher that already died (stopped before it was let go) is no error.
            let _ = gate.write_all(b"g");
        }
    }

    fn abort_start(&mut self, pid: i32) {
        // Closing the pipe is enough for a held launcher (it exits without exec); the kill
        // covers a program started directly.
        drop(self.start_gates.remove(&pid));
        let _ = self.signal_group(pid, StopSignal::Kill);
    }

    fn release(&mut self, allocation_id: &str) {
        if let Ok(tree) = &self.cgroups {
            tree.release(allocation_id);
        }
    }

    fn limits_unavailable(&self) -> Option<String> {
        self.cgroups
            .as_ref()
            .err()
            .map(|why| format!("cgroup limits unavailable: {why}"))
    }

    fn random_u64(&mut self) -> u64 {
        crate::os::random_u64()
    }
}

/// A recording double standing in for the kernel in supervisor tests: spawns get increasing pids,
/// processes "run" until the test marks them exited, probes answer what the test set.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub mod recording {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Spawn {
            allocation_id: String,
            pid: i32,
        },
        /// The go-ahead to a held launcher.
        Confirm {
            pid: i32,
        },
        /// A start that could not be recorded, called off.
        Abort {
            pid: i32,
        },
        Signal {
            pgid: i32,
            signal: StopSignal,
        },
        Release {
            allocation_id: String,
        },
    }

    #[derive(Debug, Default)]
    pub struct Kernel {
        pub calls: Vec<Call>,
        pub next_pid: i32,
        /// pid → start ticks of processes that are alive.
        pub alive: BTreeMap<i32, u64>,
        /// pid → exit reason of processes that exited and were not yet reaped.
        pub exited: BTreeMap<i32, ExitReason>,
        /// allocation id → probe answer (absent: fail).
        pub ready: BTreeMap<String, bool>,
        /// The timeout of every probe attempt, in order.
        pub probe_timeouts: Vec<Duration>,
        /// Programs that fail to start.
        pub missing_programs: Vec<String>,
        pub launches: Vec<Launch>,
        /// Processes that ignore SIGTERM.
        pub ignore_term: Vec<i32>,
    }

    #[derive(Clone, Default)]
    pub struct RecordingSyscalls(pub Arc<Mutex<Kernel>>);

    impl RecordingSyscalls {
        pub fn kernel(&self) -> std::sync::MutexGuard<'_, Kernel> {
            self.0.lock().unwrap()
        }

        pub fn exit(&self, pid: i32, reason: ExitReason) {
            let mut kernel = self.kernel();
            kernel.alive.remove(&pid);
            kernel.exited.insert(pid, reason);
        }

        pub fn pid_of(&self, allocation_id: &str) -> Option<i32> {
            self.kernel()
                .calls
                .iter()
                .rev()
                .find_map(|call| match call {
                    Call::Spawn {
                        allocation_id: id,
                        pid,
                    } if id == allocation_id => Some(*pid),
                    _ => None,
                })
        }
    }

    impl Prober for RecordingSyscalls {
        fn probe(
            &self,
            allocation_id: &str,
            _check: &ReadinessProbe,
            timeout: Duration,
        ) -> Result<(), String> {
            let mut kernel = self.kernel();
            kernel.probe_timeouts.push(timeout);
            match kernel.ready.get(allocation_id) {
                Some(true) => Ok(()),
                _ => Err(format!("{allocation_id} not ready (recording double)")),
            }
        }
    }

    impl Syscalls for RecordingSyscalls {
        fn spawn(&mut self, launch: &Launch) -> Result<Spawned, String> {
            let mut kernel = self.kernel();
            if kernel.missing_programs.contains(&launch.program) {
                return Err(format!(
                    "cannot start {:?}: No such file or directory",
                    launch.program
                ));
            }
            kernel.next_pid += 1;
            let pid = 1000 + kernel.next_pid;
            kernel.alive.insert(pid, 7);
            kernel.calls.push(Call::Spawn {
                allocation_id: launch.allocation_id.clone(),
                pid,
            });
            kernel.launches.push(launch.clone());
            Ok(Spawned {
                pid,
                start_ticks: 7,
            })
        }

        fn check_exit(&mut self, process: Spawned, _origin: Origin) -> ExitCheck {
            let mut kernel = self.kernel();
            match kernel.exited.remove(&process.pid) {
                Some(reason) => ExitCheck::Exited(reason),
                None if kernel.alive.contains_key(&process.pid) => ExitCheck::Running,
                None => ExitCheck::Exited(ExitReason::Unknown),
            }
        }

        fn live_start_ticks(&mut self, pid: i32) -> Option<u64> {
            self.kernel().alive.get(&pid).copied()
        }

        fn signal_group(&mut self, pgid: i32, signal: StopSignal) -> Result<(), String> {
            let mut kernel = self.kernel();
            kernel.calls.push(Call::Signal { pgid, signal });
            let ignores = signal == StopSignal::Terminate && kernel.ignore_term.contains(&pgid);
            if !ignores && kernel.alive.remove(&pgid).is_some() {
                let number = if signal == StopSignal::Kill { 9 } else { 15 };
                kernel.exited.insert(pgid, ExitReason::Signal(number));
            }
            Ok(())
        }

        fn prober(&self) -> Arc<dyn Prober> {
            Arc::new(self.clone())
        }

        fn cap_logs(&mut self, _log_dir: &std::path::Path) {}

        fn confirm_start(&mut self, pid: i32) {
            self.kernel().calls.push(Call::Confirm { pid });
        }

        fn abort_start(&mut self, pid: i32) {
            let mut kernel = self.kernel();
            kernel.calls.push(Call::Abort { pid });
            if kernel.alive.remove(&pid).is_some() {
                kernel.exited.insert(pid, ExitReason::Signal(9));
            }
        }

        fn release(&mut self, allocation_id: &str) {
            self.kernel().calls.push(Call::Release {
                allocation_id: allocation_id.to_string(),
            });
        }

        fn limits_unavailable(&self) -> Option<String> {
            Some("cgroup limits unavailable: recording double".into())
        }

        /// Backoff delays come out as 800 ms for the first attempts.
        fn random_u64(&mut self) -> u64 {
            800
        }
    }
}
