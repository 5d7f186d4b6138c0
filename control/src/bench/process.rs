//! The processes a benchmark starts (a release control, etcd) and what it reads about them:
//! resident memory and CPU seconds from `/proc`. Each is stopped (SIGTERM, then SIGKILL) when
//! its handle is dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use super::http::{Connection, tls_for_ca};

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("bind a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(BenchError::io("bind a free port"))?
        .port())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Result<Self, BenchError> {
        let path = std::env::temp_dir().join(format!(
            "outpost-bench-{label}-{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).map_err(BenchError::io(path.display().to_string()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, stopped on drop.
pub struct Running {
    pub child: Child,
    pub name: String,
}

impl Running {
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Self, BenchError> {
        let log_file =
            std::fs::File::create(log).map_err(BenchError::io(log.display().to_string()))?;
        let err_file = log_file
            .try_clone()
            .map_err(BenchError::io(log.display().to_string()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|error| BenchError::Spawn {
                program: program.display().to_string(),
                reason: error.to_string(),
            })?;
        Ok(Self {
            child,
            name: program.display().to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident and peak resident memory in bytes, from /proc/PID/status.
    pub fn memory_bytes(&self) -> Result<(u64, u64), BenchError> {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).map_err(BenchError::io(path.clone()))?;
        let field = |name: &str| -> Result<u64, BenchError> {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|kib| kib * 1024)
                .ok_or_else(|| BenchError::Parse {
                    what: path.clone(),
                    reason: format!("no {name} line"),
                })
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// User plus system CPU seconds, from /proc/PID/stat.
    pub fn cpu_secs(&self) -> Result<f64, BenchError> {
        let path = format!("/proc/{}/stat", self.pid());
        let text = std::fs::read_to_string(&path).map_err(BenchError::io(path.clone()))?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        match (ticks(11), ticks(12)) {
            (Some(user), Some(system)) => Ok((user + system) as f64 / clock_ticks_per_sec()),
            _ => Err(BenchError::Parse {
                what: path,
                reason: "no utime/stime fields".into(),
            }),
        }
    }
}

/// Clock ticks per second of /proc times (USER_HZ, 100 on Linux).
fn clock_ticks_per_sec() -> f64 {
    100.0
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A release control serving on loopback, with what a client needs to call it.
pub struct ControlUnderTest {
    pub process: Running,
    pub address: SocketAddr,
    pub ca_pem: Vec<u8>,
    pub admin_token: String,
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub data_dir: ScratchDir,
}

/// Starts `control_bin serve` in a fresh data dir and waits until it answers /v1/health.
pub async fn start_control(
    control_bin: &Path,
    node_ttl_secs: u32,
    join_secret: &str,
) -> Result<ControlUnderTest, BenchError> {
    let data_dir = ScratchDir::new("control")?;
    let port = free_port()?;
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let args: Vec<String> = vec![
        "serve".into(),
        "--data-dir".into(),
        data_dir.0.join("data").display().to_string(),
        "--listen".into(),
        address.to_string(),
        "--node-ttl-secs".into(),
        node_ttl_secs.to_string(),
        "--join-secret".into(),
        join_secret.into(),
    ];
    let process = Running::spawn(control_bin, &args, &data_dir.0.join("control.log"))?;
    let admin_file = data_dir
        .0
        .join("data")
        .join("admin")
        .join("outpostctl.json");
    let started = Instant::now();
    let config: crate::api::views::ClientConfigFile = loop {
        if let Ok(bytes) = std::fs::read(&admin_file)
            && let Ok(config) = serde_json::from_slice(&bytes)
        {
            break config;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Timeout {
                what: format!("control writing {}", admin_file.display()),
                secs: 60,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ca_pem = std::fs::read(&config.ca_file).map_err(BenchError::io(config.ca_file.clone()))?;
    let tls = tls_for_ca(&ca_pem)?;
    loop {
        if let Ok(mut connection) = Connection::connect(address, tls.clone()).await
            && let Ok(response) = connection.request("GET", "/v1/health", &[], b"").await
            && response.status == 200
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Timeout {
                what: "control answering /v1/health".into(),
                secs: 60,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(ControlUnderTest {
        process,
        address,
        ca_pem,
        admin_token: config.token,
        tls,
        data_dir,
    })
}
