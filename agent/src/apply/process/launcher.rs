//! The workload launcher: `outpost-agent __launch [--cgroup-procs FILE] -- PROGRAM ARGS...`.
//!
//! The running agent blocks SIGTERM and SIGINT in every thread (its main thread waits for them),
//! and a spawned process inherits that mask, so a workload would ignore the SIGTERM that stops
//! it. Rather than reset the mask with `unsafe` code between fork and exec, the agent starts
//! workloads through itself: this single-threaded launcher clears its signal mask, joins the
//! allocation's cgroup (so no child escapes the limits), then execs the program in place, keeping
//! its pid, process group, environment, working directory and log files.
//!
//! With `--hold-until-recorded` the launcher first waits for one byte on stdin, which the agent
//! writes once the process (pid and start time) is on record in its store. An agent killed in
//! between closes the pipe, and the launcher exits without starting the program, so a restarted
//! agent never meets a workload it has no record of (and would start a twin of).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::SigSet;

pub const LAUNCH_COMMAND: &str = "__launch";
/// Wait for the agent's go-ahead on stdin before exec (see the module docs).
pub const HOLD_FLAG: &str = "--hold-until-recorded";

/// When the launcher may exec the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartGate {
    /// At once.
    #[default]
    Immediate,
    /// Once a byte arrives on stdin; never if stdin closes first.
    UntilRecorded,
}

/// How the supervisor starts programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// Spawn the program directly (the caller's signal mask is clean, as in tests).
    Direct,
    /// Spawn this executable's launcher, which then execs the program.
    ThroughAgent(PathBuf),
}

/// The launcher's arguments, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchArgs {
    pub gate: StartGate,
    pub cgroup_procs: Option<PathBuf>,
    pub program: String,
    pub args: Vec<String>,
}

/// Builds the arguments after `__launch`.
pub fn launch_args(cgroup_procs: Option<&Path>, program: &str, args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(path) = cgroup_procs {
        out.push("--cgroup-procs".to_string());
        out.push(path.display().to_string());
    }
    out.push("--".to_string());
    out.push(program.to_string());
    out.extend(args.iter().cloned());
    out
}

/// Parses the arguments after `__launch`.
pub fn parse_launch_args(args: &[String]) -> Result<LaunchArgs, String> {
    let mut cgroup_procs = None;
    let mut gate = StartGate::Immediate;
    let mut index = 0;
    loop {
        match args.get(index).map(String::as_str) {
            Some(HOLD_FLAG) => {
                gate = StartGate::UntilRecorded;
                index += 1;
            }
            Some("--cgroup-procs") => {
                cgroup_procs = Some(PathBuf::from(
                    args.get(index + 1).ok_or("--cgroup-procs needs a path")?,
                ));
                index += 2;
            }
            Some("--") => {
                index += 1;
                break;
            }
            Some(other) => return Err(format!("unknown launcher argument {other:?}")),
            None => return Err("missing -- PROGRAM".into()),
        }
    }
    let program = args.get(index).ok_or("missing program after --")?.clone();
    Ok(LaunchArgs {
        gate,
        cgroup_procs,
        program,
        args: args[index + 1..].to_vec(),
    })
}

/// Runs the launcher; returns only if exec failed (the exit code to use).
pub fn run(args: &[String]) -> i32 {
    let launch = match parse_launch_args(args) {
        Ok(launch) => launch,
        Err(why) => {
            eprintln!("outpost-agent launcher: {why}");
            return 2;
        }
    };
    if let Err(error) = SigSet::all().thread_unblock() {
        eprintln!("outpost-agent launcher: cannot clear the signal mask: {error}");
    }
    if let Some(procs) = &launch.cgroup_procs
        && let Err(error) = std::fs::write(procs, std::process::id().to_string())
    {
        eprintln!(
            "outpost-agent launcher: cgroup limits not applied: cannot write {}: {error}",
            procs.display()
        );
    }
    if launch.gate == StartGate::UntilRecorded {
        let mut go = [0u8; 1];
        match std::io::stdin().lock().read(&mut go) {
            Ok(1) => {}
            _ => {
                eprintln!(
                    "outpost-agent launcher: the agent went away before recording this start; not starting {:?}",
                    launch.program
                );
                return 125;
            }
        }
    }
    let error = Command::new(&launch.program)
        .args(&launch.args)
        .stdin(Stdio::null())
        .exec();
    eprintln!(
        "outpost-agent launcher: cannot start {:?}: {error}",
        launch.program
    );
    127
}

/// Finds `program` as exec would: a path with a slash must be an executable file; a bare name
/// is looked up in `path_var`.
pub fn resolve_program(program: &str, path_var: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if executable(&path) {
            Ok(path)
        } else if path.exists() {
            Err(format!("{program:?} is not an executable file"))
        } else {
            Err(format!("{program:?}: No such file or directory"))
        };
    }
    path_var
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| format!("{program:?} not found in PATH {path_var:?}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let args = vec!["-c".to_string(), "--".to_string()];
        let built = launch_args(
            Some(Path::new("/sys/fs/cgroup/x/cgroup.procs")),
            "/bin/sh",
            &args,
        );
        assert_eq!(
            parse_launch_args(&built).unwrap(),
            LaunchArgs {
                gate: StartGate::Immediate,
                cgroup_procs: Some(PathBuf::from("/sys/fs/cgroup/x/cgroup.procs")),
                program: "/bin/sh".into(),
                args
            }
        );
        let mut held = vec![HOLD_FLAG.to_string()];
        held.extend(launch_args(None, "/bin/true", &[]));
        assert_eq!(
            parse_launch_args(&held).unwrap().gate,
            StartGate::UntilRecorded
        );
        assert!(parse_launch_args(&["--bogus".to_string()]).is_err());
        assert!(parse_launch_args(&["--".to_string()]).is_err());
    }

    #[test]
    fn programs_resolve_like_exec() {
        assert_eq!(
            resolve_program("/bin/sh", "").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            resolve_program("sh", "/nonexistent:/bin").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(
            resolve_program("/nope/prog", "")
                .unwrap_err()
                .contains("No such file")
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "not a program").unwrap();
        let error = resolve_program(&plain.display().to_string(), "").unwrap_err();
        assert!(error.contains("not an executable"), "{error}");
        assert!(resolve_program("no-such-program-xyz", "/bin").is_err());
    }
}
