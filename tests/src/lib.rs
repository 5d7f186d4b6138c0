//! Whole-fleet test helpers: start the real binaries on loopback and in namespaces.
//!
//! The tests drive the built binaries, not the crates' internals. Cargo does not hand one
//! package's binaries to another package's tests, so build them first:
//!
//! ```text
//! cargo build --bins && cargo test -p outpost-fleet-tests
//! ```
//!
//! The binaries are looked up in `$OUTPOST_BIN_DIR` when set, else in the workspace target
//! directory (`$CARGO_TARGET_DIR` or `target/`), in the profile the tests were built with
//! (`debug` or `release`) and then the other one.
//!
//! Every process started here is owned by a guard that kills it on drop, even when a test
//! panics; every wait polls a condition against a deadline.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod edge;
pub mod netns;
pub mod overlay_lab;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

pub const CONTROL_BINARY: &str = "outpost-control";
pub const AGENT_BINARY: &str = "outpost-agent";
pub const OUTPOSTCTL_BINARY: &str = "outpostctl";

/// How long a process gets to start and answer, and a command to finish. Generous: the
/// machine is shared, and tests never assert times.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------
// Binaries

/// The folder holding the built binaries.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OUTPOST_BIN_DIR").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target"),
    };
    let (first, second) = if cfg!(debug_assertions) {
        ("debug", "release")
    } else {
        ("release", "debug")
    };
    for profile in [first, second] {
        let dir = target.join(profile);
        if dir.join(CONTROL_BINARY).is_file() {
            return Ok(dir);
        }
    }
    Ok(target.join(first))
}

/// The path of a built binary, or an error that says how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "binary {name} not found in {}; build the binaries first with `cargo build --bins` (or set OUTPOST_BIN_DIR)",
            dir.display()
        );
    }
    warn_if_stale(name, &path);
    Ok(path)
}

/// Source folders (relative to the workspace) each binary is built from.
fn sources_of(name: &str) -> &'static [&'static str] {
    match name {
        CONTROL_BINARY | OUTPOSTCTL_BINARY => &["control/src", "proto/src"],
        AGENT_BINARY => &["agent/src", "proto/src"],
        _ => &[],
    }
}

/// Tests run the binaries as built; a source newer than the binary means `cargo build --bins`
/// was skipped. Said on stderr, which the test runner shows when a test fails.
fn warn_if_stale(name: &str, binary_path: &Path) {
    static CHECKED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if let Ok(mut checked) = CHECKED.lock()
        && !checked.insert(name.to_string())
    {
        return;
    }
    let Ok(built) = fs::metadata(binary_path).and_then(|meta| meta.modified()) else {
        return;
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for folder in sources_of(name) {
        if let Some((newest, path)) = newest_file(&workspace.join(folder))
            && newest > built
        {
            eprintln!(
                "warning: {} is older than {}; run `cargo build --bins` so the tests run the current code",
                binary_path.display(),
                path.display()
            );
            return;
        }
    }
}

fn newest_file(folder: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut pending = vec![folder.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(path);
            } else if let Ok(modified) = meta.modified()
                && newest.as_ref().is_none_or(|(time, _)| modified > *time)
            {
                newest = Some((modified, path));
            }
        }
    }
    newest
}

// ------------------------------------------------------------------------------------------
// Waiting

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(250));
    }
}

/// Polls `condition` until it holds, or fails after `timeout` naming `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    wait_for(what, timeout, || condition().then_some(()))
}

/// A port that was free a moment ago on 127.0.0.1. Prefer letting a server bind port 0.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

// ------------------------------------------------------------------------------------------
// Temp dirs

/// A test's own folder. On drop, kills any process still running from inside it (services an
/// agent started, whose process groups the agent guard cannot reach), then removes it.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("outpost-{prefix}-"))
            .tempdir()?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A subfolder, created.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }

    /// Writes a file under the folder and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_processes_working_under(self.dir.path());
    }
}

/// SIGKILLs every process whose working directory is inside `root`. Only processes this test
/// started can be there: `root` is a fresh temp dir.
pub fn kill_processes_working_under(root: &Path) {
    let Ok(root) = root.canonicalize() else {
        return;
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let own_pid = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == own_pid {
            continue;
        }
        let Ok(cwd) = fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(&root) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Processes

/// A started process in its own process group. Drop kills the group (SIGTERM, then SIGKILL
/// after [`STOP_GRACE`]) and reaps it.
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

/// Whether to let a process shut down cleanly or kill it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Graceful,
    Kill,
}

impl ProcessGuard {
    /// Starts `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> Result<Self> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log {}", log_path.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 40)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the process group and waits for it; returns how it ended.
    pub fn stop(&mut self, mode: StopMode) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let group = Pid::from_raw(child.id() as i32);
        if let Ok(Some(status)) = child.try_wait() {
            let _ = killpg(group, Signal::SIGKILL);
            return Some(status);
        }
        if mode == StopMode::Graceful {
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = killpg(group, Signal::SIGKILL);
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let _ = killpg(group, Signal::SIGKILL);
        child.wait().ok()
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.stop(StopMode::Kill);
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Fails with both streams when the command did not succeed.
    pub fn expect_success(self, what: &str) -> Result<Self> {
        if !self.status.success() {
            bail!(
                "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Fails when the command succeeded; returns it otherwise.
    pub fn expect_failure(self, what: &str) -> Result<Self> {
        if self.status.success() {
            bail!(
                "{what} succeeded but should have failed\nstdout:\n{}\nstderr:\n{}",
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON:\n{}", self.stdout))
    }
}

/// Runs a command to completion, killing it if it outlives `timeout`.
pub fn run_with_timeout(
    mut command: Command,
    stdin_text: Option<&str>,
    timeout: Duration,
) -> Result<CommandOutput> {
    command
        .stdin(if stdin_text.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let description = format!("{command:?}");
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {description}"))?;
    if let (Some(text), Some(mut stdin)) = (stdin_text, child.stdin.take()) {
        use std::io::Write;
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing stdin of {description}"))?;
    }
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            bail!(
                "{description} did not finish within {} s and was killed",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = stderr
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok(CommandOutput {
        status,
        stdout,
        stderr,
    })
}

fn read_in_background(stream: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stream {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// A long-running command whose stdout is collected while it runs (`events --follow`).
pub struct StreamingCommand {
    guard: ProcessGuard,
    stdout: Arc<Mutex<String>>,
}

impl StreamingCommand {
    pub fn spawn(name: &str, mut command: Command, stderr_log: &Path) -> Result<Self> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_log)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stdout.take() {
            let sink = Arc::clone(&stdout);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(count) = pipe.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    if let Ok(mut text) = sink.lock() {
                        text.push_str(&String::from_utf8_lossy(&buffer[..count]));
                    }
                }
            });
        }
        let guard = ProcessGuard {
            name: name.to_string(),
            child: Some(child),
            log_path: stderr_log.to_path_buf(),
        };
        Ok(Self { guard, stdout })
    }

    /// Everything printed so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .map(|text| text.clone())
            .unwrap_or_default()
    }

    pub fn guard(&mut self) -> &mut ProcessGuard {
        &mut self.guard
    }
}

// ------------------------------------------------------------------------------------------
// Control

/// What `outpost-control serve` writes to `DATA_DIR/admin/outpostctl.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub control_url: String,
    pub ca_file: PathBuf,
    pub token: String,
}

impl AdminConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{} has no string {name:?}: {text}", path.display()))
        };
        let ca_file = PathBuf::from(field("ca_file")?);
        let ca_file = if ca_file.is_relative() {
            path.parent()
                .map(|folder| folder.join(&ca_file))
                .unwrap_or(ca_file)
        } else {
            ca_file
        };
        Ok(Self {
            control_url: field("control_url")?,
            ca_file,
            token: field("token")?,
        })
    }
}

/// A running `outpost-control serve` on 127.0.0.1 with its own data dir.
pub struct ControlProcess {
    pub guard: ProcessGuard,
    pub data_dir: PathBuf,
    pub url: String,
    pub admin: AdminConfig,
    pub admin_config_path: PathBuf,
    /// `$HOME` for the outpostctl runs: empty, so no operator config leaks in.
    home_dir: PathBuf,
}

impl ControlProcess {
    /// Starts control on `data_dir` (created if missing) and waits until `/v1/health` answers
    /// over TLS with the CA it wrote. The log goes to `data_dir.log` beside the data dir.
    pub fn start(data_dir: &Path) -> Result<Self> {
        Self::start_with(data_dir, "127.0.0.1:0", &[])
    }

    /// Starts control listening on `listen` (e.g. the port of a previous run, so clients that
    /// know its URL reconnect after a restart) with extra `serve` arguments.
    pub fn start_with(data_dir: &Path, listen: &str, extra_args: &[&str]) -> Result<Self> {
        fs::create_dir_all(data_dir)?;
        let url_file = data_dir.join("control.url");
        // A warm restart finds the previous run's URL; wait for this run's own.
        if url_file.exists() {
            fs::remove_file(&url_file)
                .with_context(|| format!("removing stale {}", url_file.display()))?;
        }
        let log_path = data_dir.with_extension("log");
        let mut command = Command::new(binary(CONTROL_BINARY)?);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra_args)
            // The embedded store: a DATABASE_URL in the developer's shell would select PostgreSQL.
            .env_remove("DATABASE_URL");
        command.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut guard = ProcessGuard::spawn(CONTROL_BINARY, command, &log_path)?;
        let admin_config_path = data_dir.join("admin").join("outpostctl.json");
        // Control writes control.url and admin/outpostctl.json once it listens; both are read
        // again on every poll, so a half-written file only costs one more round.
        let ready = wait_for(
            "control to write control.url and answer /v1/health",
            START_TIMEOUT,
            || {
                if let Some(status) = guard.exited() {
                    return Some(Err(anyhow!(
                        "outpost-control exited with {status} before it was ready"
                    )));
                }
                let url = fs::read_to_string(&url_file).ok()?.trim().to_string();
                if !is_https_host_port(&url) {
                    return None;
                }
                let admin = AdminConfig::read(&admin_config_path).ok()?;
                let http = ControlHttp::new(&url, &admin.ca_file).ok()?;
                match http.get("/v1/health", None) {
                    Ok((200, _)) => Some(Ok((url, admin))),
                    _ => None,
                }
            },
        );
        let (url, admin) = ready.and_then(|ready| ready).with_context(|| {
            format!(
                "outpost-control did not become ready; its log {}:\n{}",
                guard.log_path().display(),
                guard.log_tail()
            )
        })?;
        let home_dir = data_dir.with_extension("home");
        fs::create_dir_all(&home_dir)?;
        Ok(Self {
            guard,
            data_dir: data_dir.to_path_buf(),
            url,
            admin,
            admin_config_path,
            home_dir,
        })
    }

    /// An HTTPS client that trusts only this control's CA.
    pub fn http(&self) -> Result<ControlHttp> {
        ControlHttp::new(&self.url, &self.admin.ca_file)
    }

    /// `outpostctl ARGS` with `OUTPOST_CONFIG` pointing at the admin config control wrote.
    pub fn outpostctl(&self, args: &[&str]) -> Result<CommandOutput> {
        self.outpostctl_with(args, &[], None)
    }

    /// `outpostctl ARGS` with extra environment variables and optional stdin.
    pub fn outpostctl_with(
        &self,
        args: &[&str],
        environment: &[(&str, &str)],
        stdin_text: Option<&str>,
    ) -> Result<CommandOutput> {
        let command = self.outpostctl_command(args, environment)?;
        run_with_timeout(command, stdin_text, COMMAND_TIMEOUT)
    }

    /// `outpostctl ARGS` left running (e.g. `events --follow`), stdout collected.
    pub fn outpostctl_streaming(&self, args: &[&str]) -> Result<StreamingCommand> {
        let command = self.outpostctl_command(args, &[])?;
        StreamingCommand::spawn(
            OUTPOSTCTL_BINARY,
            command,
            &self.data_dir.with_extension("outpostctl.log"),
        )
    }

    fn outpostctl_command(&self, args: &[&str], environment: &[(&str, &str)]) -> Result<Command> {
        let mut command = Command::new(binary(OUTPOSTCTL_BINARY)?);
        command
            .args(args)
            .env_remove("OUTPOST_CONTROL_URL")
            .env_remove("OUTPOST_CA_FILE")
            .env_remove("OUTPOST_TOKEN")
            .env("HOME", &self.home_dir)
            .env("OUTPOST_CONFIG", &self.admin_config_path);
        for (name, value) in environment {
            command.env(name, value);
        }
        Ok(command)
    }

    /// A fresh enrollment token from `outpostctl enroll create`.
    pub fn enrollment_token(&self) -> Result<String> {
        let created = self
            .outpostctl(&["enroll", "create", "--ttl", "1h", "--json"])?
            .expect_success("outpostctl enroll create")?
            .json()?;
        created["token"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("enroll create printed no token: {created}"))
    }

    /// `outpostctl services apply -f -` with `document` (YAML or JSON) on stdin.
    pub fn apply_services(&self, document: &str) -> Result<CommandOutput> {
        self.outpostctl_with(&["services", "apply", "-f", "-"], &[], Some(document))?
            .expect_success("outpostctl services apply")
    }

    /// `outpostctl services rm NAME`.
    pub fn remove_service(&self, name: &str) -> Result<CommandOutput> {
        self.outpostctl(&["services", "rm", name])?
            .expect_success("outpostctl services rm")
    }

    /// `outpostctl allocations --json`.
    pub fn allocations(&self) -> Result<Vec<Value>> {
        let listed = self
            .outpostctl(&["allocations", "--json"])?
            .expect_success("outpostctl allocations")?
            .json()?;
        match listed {
            Value::Array(allocations) => Ok(allocations),
            other => bail!("outpostctl allocations --json printed no list: {other}"),
        }
    }

    /// Waits until every node in `node_ids` shows as `ready` in `outpostctl nodes`.
    pub fn wait_for_nodes_ready(&self, node_ids: &[&str]) -> Result<()> {
        wait_until(
            &format!("nodes {node_ids:?} to be ready in outpostctl nodes"),
            START_TIMEOUT,
            || {
                let Ok(nodes) = self
                    .outpostctl(&["nodes", "--json"])
                    .and_then(|output| output.json())
                else {
                    return false;
                };
                let nodes = nodes.as_array().map(Vec::as_slice).unwrap_or_default();
                node_ids.iter().all(|id| {
                    nodes
                        .iter()
                        .any(|node| node["node_id"] == *id && node["state"] == "ready")
                })
            },
        )
    }

    /// Waits until node `node_id` in `outpostctl nodes --json` satisfies `condition`; returns it.
    pub fn wait_for_node(
        &self,
        node_id: &str,
        what: &str,
        mut condition: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        wait_for(what, START_TIMEOUT, || {
            let nodes = self
                .outpostctl(&["nodes", "--json"])
                .and_then(|output| output.json())
                .ok()?;
            nodes
                .as_array()?
                .iter()
                .find(|node| node["node_id"] == node_id && condition(node))
                .cloned()
        })
    }

    /// The log events of one aggregate (`allocation/ID`, `node/ID`, …), oldest first.
    pub fn aggregate_events(&self, aggregate: &str) -> Result<Vec<Value>> {
        let (status, body) = self.http()?.get(
            &format!("/v1/admin/aggregates/{aggregate}/events"),
            Some(&self.admin.token),
        )?;
        match (status, body) {
            (200, Value::Array(events)) => Ok(events),
            (status, body) => bail!("events of {aggregate} answered {status}: {body}"),
        }
    }

    /// `GET /v1/nodes/{node_id}/plan` with the admin token: the plan control holds for a node.
    pub fn node_plan(&self, node_id: &str) -> Result<outpost_proto::plan::Plan> {
        let (status, body) = self.http()?.get(
            &format!("/v1/nodes/{node_id}/plan"),
            Some(&self.admin.token),
        )?;
        if status != 200 {
            bail!("GET plan of {node_id} answered {status}: {body}");
        }
        serde_json::from_value(body).with_context(|| format!("the plan of {node_id} is not a Plan"))
    }

    /// `POST /v1/admin/rotate-epoch`: every cursor becomes 410 Gone. Returns the new epoch.
    pub fn rotate_epoch(&self) -> Result<u64> {
        let (status, body) = self.http()?.send(
            "POST",
            "/v1/admin/rotate-epoch",
            Some(&self.admin.token),
            &serde_json::json!({}),
        )?;
        if status != 200 {
            bail!("rotate-epoch answered {status}: {body}");
        }
        body["log_epoch"]
            .as_u64()
            .with_context(|| format!("rotate-epoch answered no log_epoch: {body}"))
    }

    /// The `HOST:PORT` control listens on.
    pub fn listen_address(&self) -> &str {
        self.url.trim_start_matches("https://")
    }

    /// Stops control and waits for it to exit.
    pub fn stop(mut self, mode: StopMode) -> Option<ExitStatus> {
        self.guard.stop(mode)
    }
}

/// `https://HOST:PORT` with a numeric port and nothing after it.
pub fn is_https_host_port(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://") else {
        return false;
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

// ------------------------------------------------------------------------------------------
// HTTP

/// A small HTTPS JSON client trusting only one CA, for tests that call the API directly.
pub struct ControlHttp {
    agent: ureq::Agent,
    url: String,
}

impl ControlHttp {
    pub fn new(url: &str, ca_file: &Path) -> Result<Self> {
        let pem =
            fs::read(ca_file).with_context(|| format!("reading CA file {}", ca_file.display()))?;
        let mut certificates = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(certificate) = item? {
                certificates.push(certificate);
            }
        }
        if certificates.is_empty() {
            bail!("CA file {} holds no certificate", ca_file.display());
        }
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certificates)))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Ok(Self {
            agent,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// GET; returns the status and the body as JSON (`Null` when empty or not JSON).
    pub fn get(&self, path: &str, bearer: Option<&str>) -> Result<(u16, Value)> {
        let mut request = self.agent.get(format!("{}{path}", self.url));
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        answer(request.call().with_context(|| format!("GET {path}"))?)
    }

    /// A request with a JSON body (POST, PUT).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.url);
        let request = match method {
            "POST" => self.agent.post(url),
            "PUT" => self.agent.put(url),
            other => bail!("unsupported method {other}"),
        };
        let mut request = request.header("content-type", "application/json");
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        answer(
            request
                .send(body.to_string())
                .with_context(|| format!("{method} {path}"))?,
        )
    }
}

/// sha256 (lowercase hex) of the first certificate's DER in a PEM file: the CA fingerprint an
/// enrollment token carries.
pub fn ca_fingerprint(ca_file: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let pem =
        fs::read(ca_file).with_context(|| format!("reading CA file {}", ca_file.display()))?;
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(certificate) = item? {
            let digest = Sha256::digest(certificate.der());
            return Ok(digest.iter().map(|byte| format!("{byte:02x}")).collect());
        }
    }
    bail!("CA file {} holds no certificate", ca_file.display())
}

fn answer(mut response: ureq::http::Response<ureq::Body>) -> Result<(u16, Value)> {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((status, value))
}

// ------------------------------------------------------------------------------------------
// Agent

/// Agent settings a developer's shell might carry; tests pass everything as flags instead.
pub const AGENT_ENVIRONMENT: [&str; 6] = [
    "OUTPOST_DATA_DIR",
    "OUTPOST_CONTROL_URL",
    "OUTPOST_ENROLL_TOKEN",
    "OUTPOST_STATUS_LISTEN",
    "OUTPOST_NODE_ID",
    "OUTPOST_CONFIG",
];

/// A running `outpost-agent run` with its own data dir.
pub struct AgentProcess {
    pub guard: ProcessGuard,
    pub data_dir: PathBuf,
}

impl AgentProcess {
    /// Starts `outpost-agent run --data-dir D --enroll TOKEN --status-listen 127.0.0.1:0`
    /// plus `extra_args`. The log goes to `D.log`.
    pub fn start(data_dir: &Path, enrollment_token: &str, extra_args: &[&str]) -> Result<Self> {
        let guard = spawn_agent_with(data_dir, enrollment_token, extra_args, &[])?;
        Ok(Self {
            guard,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// [`AgentProcess::start`] with extra environment variables (`OUTPOST_LOG_CAP_BYTES`,
    /// `AMQP_URL`, …).
    pub fn start_with_environment(
        data_dir: &Path,
        enrollment_token: &str,
        extra_args: &[&str],
        environment: &[(&str, &str)],
    ) -> Result<Self> {
        let guard = spawn_agent_with(data_dir, enrollment_token, extra_args, environment)?;
        Ok(Self {
            guard,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Starts the agent process again on the same data dir (after [`AgentProcess::stop`]; a
    /// process still running is killed first). The workloads are left alone, as across a
    /// crash or a reboot of the agent alone.
    pub fn restart(&mut self, enrollment_token: &str, extra_args: &[&str]) -> Result<()> {
        self.restart_with_environment(enrollment_token, extra_args, &[])
    }

    /// [`AgentProcess::restart`] with extra environment variables.
    pub fn restart_with_environment(
        &mut self,
        enrollment_token: &str,
        extra_args: &[&str],
        environment: &[(&str, &str)],
    ) -> Result<()> {
        self.guard.stop(StopMode::Kill);
        self.guard = spawn_agent_with(&self.data_dir, enrollment_token, extra_args, environment)?;
        Ok(())
    }

    /// The pid of the agent process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }

    /// `outpost-agent status --data-dir D --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        agent_status(&self.data_dir)
    }

    /// Polls the agent's status until `condition` holds on a status this process wrote.
    pub fn wait_for_status(
        &mut self,
        what: &str,
        mut condition: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let data_dir = self.data_dir.clone();
        let guard = &mut self.guard;
        let found = wait_for(what, START_TIMEOUT, || {
            if let Some(status) = guard.exited() {
                return Some(Err(anyhow!(
                    "outpost-agent exited with {status}:\n{}",
                    guard.log_tail()
                )));
            }
            let status = agent_status(&data_dir).ok()?;
            // Right after a restart the file may still be the previous process's last snapshot.
            let own = status["pid"].as_u64() == guard.pid().map(u64::from);
            (own && condition(&status)).then_some(Ok(status))
        });
        found
            .and_then(|status| status)
            .with_context(|| format!("agent log:\n{}", self.guard.log_tail()))
    }

    /// Stops the agent process only; the workloads it started keep running (as after a crash),
    /// so a restarted agent can adopt them.
    pub fn stop(&mut self, mode: StopMode) -> Option<ExitStatus> {
        self.guard.stop(mode)
    }
}

impl Drop for AgentProcess {
    /// Stops the agent, then its workloads with `outpost-agent stop-all` (the [`TestDir`] kills
    /// whatever is still left).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of outpost-agent ({}) ---\n{}",
                self.guard.log_path().display(),
                self.guard.log_tail()
            );
        }
        self.guard.stop(StopMode::Graceful);
        stop_all_workloads(&self.data_dir);
    }
}

/// `outpost-agent stop-all --data-dir D`: stops the workloads an agent on `data_dir` started
/// (best effort: a test's cleanup).
pub fn stop_all_workloads(data_dir: &Path) {
    if let Ok(agent) = binary(AGENT_BINARY) {
        let mut command = Command::new(agent);
        command.arg("stop-all").arg("--data-dir").arg(data_dir);
        let _ = run_with_timeout(command, None, COMMAND_TIMEOUT);
    }
}

/// `outpost-agent run --data-dir D --enroll TOKEN --status-listen 127.0.0.1:0 EXTRA...` with
/// `environment` added, its output appended to `D.log`.
fn spawn_agent_with(
    data_dir: &Path,
    enrollment_token: &str,
    extra_args: &[&str],
    environment: &[(&str, &str)],
) -> Result<ProcessGuard> {
    fs::create_dir_all(data_dir)?;
    let mut command = Command::new(binary(AGENT_BINARY)?);
    command
        .arg("run")
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--enroll",
            enrollment_token,
            "--status-listen",
            "127.0.0.1:0",
        ])
        // Agents of loopback tests share one host: no WireGuard interface in the host's
        // namespace (the overlay has its own namespace tests, tests/tests/overlay_netns.rs).
        .arg("--no-overlay")
        .args(extra_args);
    // R4 (last-good means healthy) is tested in delivery_fleet, which passes the default
    // `--healthy-after-secs 10` itself. Elsewhere a plan without readiness checks is last-good
    // once applied, so tests that restart or power-cut an agent right after a change test what
    // they are about (the store, adoption, placement) without waiting 10 s for each plan.
    if !extra_args.contains(&"--healthy-after-secs") {
        command.args(["--healthy-after-secs", "0"]);
    }
    command.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    for variable in AGENT_ENVIRONMENT {
        command.env_remove(variable);
    }
    command.envs(environment.iter().copied());
    ProcessGuard::spawn(AGENT_BINARY, command, &data_dir.with_extension("log"))
}

/// `outpost-agent status --data-dir D --json`; works with the agent stopped.
pub fn agent_status(data_dir: &Path) -> Result<Value> {
    let mut command = Command::new(binary(AGENT_BINARY)?);
    command
        .arg("status")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--json");
    run_with_timeout(command, None, COMMAND_TIMEOUT)?
        .expect_success("outpost-agent status")?
        .json()
}

/// The allocations in an agent's status (`outpost-agent status --json`) of one service.
pub fn status_allocations<'a>(status: &'a Value, service: &str) -> Vec<&'a Value> {
    status["allocations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|allocation| allocation["service"] == service)
        .collect()
}

/// Allocation id → pid of the running allocations of `service` in an agent's status.
pub fn status_running_pids(status: &Value, service: &str) -> BTreeMap<String, u32> {
    status_allocations(status, service)
        .into_iter()
        .filter(|allocation| allocation["state"] == "running")
        .filter_map(|allocation| {
            Some((
                allocation["allocation_id"].as_str()?.to_string(),
                u32::try_from(allocation["pid"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

/// True when the status shows exactly `count` allocations of `service`, all running with a pid.
pub fn status_runs(status: &Value, service: &str, count: usize) -> bool {
    let allocations = status_allocations(status, service);
    allocations.len() == count
        && allocations
            .iter()
            .all(|allocation| allocation["state"] == "running" && allocation["pid"].is_u64())
}

// ------------------------------------------------------------------------------------------
// Workload processes

/// True while `pid` exists and is not a zombie waiting for its reaper.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 2 (comm) may hold spaces and ')': the state follows the last ')'.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

/// The environment of process `pid`, or `None` once it is gone or unreadable.
pub fn process_environment(pid: u32) -> Option<BTreeMap<String, String>> {
    let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        bytes
            .split(|byte| *byte == 0)
            .filter_map(|entry| {
                let text = String::from_utf8_lossy(entry);
                let (name, value) = text.split_once('=')?;
                Some((name.to_string(), value.to_string()))
            })
            .collect(),
    )
}

/// Live processes whose environment holds `name=value`, in pid order.
pub fn pids_with_environment(name: &str, value: &str) -> Vec<u32> {
    let needle = format!("{name}={value}");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ")).is_ok_and(|bytes| {
                bytes
                    .split(|byte| *byte == 0)
                    .any(|entry| entry == needle.as_bytes())
            })
        })
        .filter(|pid| process_alive(*pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// True when process `pid` works or logs (stdout) inside `root`: a workload of an agent whose
/// data dir is under `root`.
pub fn process_under(pid: u32, root: &Path) -> bool {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    ["cwd", "fd/1"].iter().any(|link| {
        fs::read_link(format!("/proc/{pid}/{link}")).is_ok_and(|target| target.starts_with(&root))
    })
}

/// The live processes of one allocation started by an agent under `root` (the test's folder):
/// those with `OUTPOST_ALLOCATION_ID=allocation_id` in their environment. Control derives
/// allocation ids from its log, so tests side by side can share one; `root` tells them apart.
pub fn allocation_pids(root: &Path, allocation_id: &str) -> Vec<u32> {
    pids_with_environment("OUTPOST_ALLOCATION_ID", allocation_id)
        .into_iter()
        .filter(|pid| process_under(*pid, root))
        .collect()
}

/// A service document (JSON, for `outpostctl services apply`) that sleeps for an hour, with
/// `env` as its environment.
pub fn sleeper_service(name: &str, replicas: u32, env: &[(&str, &str)]) -> String {
    serde_json::json!({
        "name": name,
        "command": "/bin/sleep",
        "args": ["3600"],
        "replicas": replicas,
        "memory_bytes": 1048576,
        "env": environment(env),
    })
    .to_string()
}

/// Asserts that each allocation of `running` (allocation id → pid, as status shows them) is
/// exactly its one live process among the workloads under `root`.
pub fn assert_exactly_these_processes(root: &Path, running: &BTreeMap<String, u32>) {
    for (allocation_id, pid) in running {
        assert!(process_alive(*pid), "pid {pid} of {allocation_id} is gone");
        assert_eq!(
            allocation_pids(root, allocation_id),
            vec![*pid],
            "processes carrying OUTPOST_ALLOCATION_ID={allocation_id}"
        );
    }
}

/// Environment variables as a map, for tests that build configs from one.
pub fn environment(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let mut polls = 0;
        wait_until("three polls", Duration::from_secs(10), || {
            polls += 1;
            polls >= 3
        })
        .unwrap();
        assert_eq!(polls, 3);
    }

    #[test]
    fn wait_until_fails_naming_what_it_waited_for() {
        let error = wait_until(
            "a condition that never holds",
            Duration::from_millis(50),
            || false,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("a condition that never holds"),
            "{error}"
        );
    }

    #[test]
    fn commands_that_overrun_are_killed() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let started = Instant::now();
        let error = run_with_timeout(command, None, Duration::from_millis(200)).unwrap_err();
        assert!(error.to_string().contains("did not finish"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn command_output_and_stdin_are_captured() {
        let output = run_with_timeout(Command::new("cat"), Some("hello"), COMMAND_TIMEOUT).unwrap();
        assert!(output.success());
        assert_eq!(output.stdout, "hello");
    }

    #[test]
    fn process_guard_kills_on_drop() {
        let dir = TestDir::new("guard").unwrap();
        let mut command = Command::new("sleep");
        command.arg("300");
        let guard = ProcessGuard::spawn("sleep", command, &dir.path().join("sleep.log")).unwrap();
        let pid = guard.pid().unwrap();
        drop(guard);
        // The guard reaped it, so the pid is gone (or reused by an unrelated process, which
        // would not be our sleep).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }

    #[test]
    fn test_dir_kills_processes_left_inside_it() {
        let dir = TestDir::new("leftover").unwrap();
        let work = dir.subdir("alloc").unwrap();
        let mut child = Command::new("sleep")
            .arg("300")
            .current_dir(&work)
            .spawn()
            .unwrap();
        kill_processes_working_under(dir.path());
        let status = wait_for("the leftover sleep to die", Duration::from_secs(10), || {
            child.try_wait().unwrap()
        })
        .unwrap();
        assert!(!status.success());
    }

    #[test]
    fn admin_config_resolves_a_relative_ca_file() {
        let dir = TestDir::new("admin").unwrap();
        let admin = dir.subdir("admin").unwrap();
        let path = admin.join("outpostctl.json");
        fs::write(
            &path,
            r#"{"control_url":"https://127.0.0.1:1","ca_file":"../tls/ca.pem","token":"opa.x"}"#,
        )
        .unwrap();
        let config = AdminConfig::read(&path).unwrap();
        assert_eq!(config.ca_file, admin.join("../tls/ca.pem"));
        assert_eq!(config.token, "opa.x");
    }

    #[test]
    fn control_urls_are_recognised_only_when_complete() {
        assert!(is_https_host_port("https://127.0.0.1:40123"));
        assert!(!is_https_host_port("https://127.0.0.1:"));
        assert!(!is_https_host_port("https://127.0.0.1"));
        assert!(!is_https_host_port("http://127.0.0.1:1"));
        assert!(!is_https_host_port("https://127.0.0.1:99999"));
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let error = binary("no-such-outpost-binary").unwrap_err().to_string();
        assert!(error.contains("cargo build --bins"), "{error}");
    }
}
