//! Durable commands per second through the HTTP API, against etcd's durable puts, in the same
//! run and under the same load generator: `wrk` with 64 connections, a small Lua script for the
//! POST body and the bearer token. Control's command is `POST /v1/enrollment-tokens` (one event
//! and one config record, acknowledged after its batch is fsynced); etcd's is
//! `POST /v3/kv/put` on its JSON gateway (a raft entry, fsynced), once over plain HTTP (its
//! default) and once over TLS (`--auto-tls`), since control only speaks HTTPS: the TLS run is the
//! like-for-like comparison.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::BenchError;
use super::process::{Running, ScratchDir, free_port, start_control};

/// What to run.
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    pub control_bin: PathBuf,
    pub wrk_bin: PathBuf,
    pub etcd_bin: PathBuf,
    pub connections: usize,
    pub threads: usize,
    pub duration_secs: u64,
}

/// One wrk run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub non_2xx: u64,
    pub seconds: f64,
}

impl WrkResult {
    /// Answered 2xx per second.
    pub fn ok_per_sec(&self) -> f64 {
        self.requests.saturating_sub(self.non_2xx) as f64 / self.seconds.max(1e-9)
    }
}

/// Both figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThroughputReport {
    pub control: WrkResult,
    pub etcd: WrkResult,
    pub etcd_tls: WrkResult,
}

impl ThroughputReport {
    pub fn print(&self, options: &ThroughputOptions) {
        println!(
            "durable commands/s, wrk -t{} -c{} -d{}s:",
            options.threads, options.connections, options.duration_secs
        );
        let line = |name: &str, result: &WrkResult| {
            println!(
                "  {name}: {:.0}/s ({} requests, {} not 2xx, {:.1} s)",
                result.ok_per_sec(),
                result.requests,
                result.non_2xx,
                result.seconds
            )
        };
        line("control POST /v1/enrollment-tokens (https)", &self.control);
        line("etcd 3.4 POST /v3/kv/put (http)", &self.etcd);
        line(
            "etcd 3.4 POST /v3/kv/put (https, --auto-tls)",
            &self.etcd_tls,
        );
        println!(
            "  ratio control/etcd: {:.2} against etcd over https, {:.2} against etcd over http",
            self.control.ok_per_sec() / self.etcd_tls.ok_per_sec().max(1e-9),
            self.control.ok_per_sec() / self.etcd.ok_per_sec().max(1e-9)
        );
    }
}

/// Reads wrk's summary: "N requests in 10.00s, ..." and "Non-2xx or 3xx responses: M".
pub fn parse_wrk(output: &str) -> Result<WrkResult, BenchError> {
    let parse_error = |reason: &str| BenchError::Parse {
        what: "wrk output".into(),
        reason: format!("{reason}: {}", output.chars().take(400).collect::<String>()),
    };
    let summary = output
        .lines()
        .find(|line| line.contains(" requests in "))
        .ok_or_else(|| parse_error("no 'requests in' line"))?;
    let mut words = summary.split_whitespace();
    let requests: u64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| parse_error("no request count"))?;
    let seconds_text = summary
        .split(" requests in ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .ok_or_else(|| parse_error("no duration"))?;
    let seconds = parse_wrk_duration(seconds_text).ok_or_else(|| parse_error("bad duration"))?;
    let non_2xx = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map(|rest| rest.trim().parse().unwrap_or(0))
        .unwrap_or(0);
    Ok(WrkResult {
        requests,
        non_2xx,
        seconds,
    })
}

/// wrk prints durations like `10.00s`, `1.00m`, `500.00ms`.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(s) = text.strip_suffix('s') {
        return s.parse().ok();
    }
    if let Some(m) = text.strip_suffix('m') {
        return m.parse::<f64>().ok().map(|v| v * 60.0);
    }
    None
}

fn wrk_script(dir: &Path, body: &str, authorization: Option<&str>) -> Result<PathBuf, BenchError> {
    let mut script = String::from("wrk.method = \"POST\"\n");
    script.push_str(&format!("wrk.body = '{body}'\n"));
    script.push_str("wrk.headers[\"Content-Type\"] = \"application/json\"\n");
    if let Some(authorization) = authorization {
        script.push_str(&format!(
            "wrk.headers[\"Authorization\"] = \"{authorization}\"\n"
        ));
    }
    let path = dir.join(format!("post-{:08x}.lua", rand::random::<u32>()));
    std::fs::write(&path, script).map_err(BenchError::io(path.display().to_string()))?;
    Ok(path)
}

fn run_wrk(options: &ThroughputOptions, script: &Path, url: &str) -> Result<WrkResult, BenchError> {
    let output = Command::new(&options.wrk_bin)
        .args([
            format!("-t{}", options.threads),
            format!("-c{}", options.connections),
            format!("-d{}s", options.duration_secs),
            "-s".into(),
            script.display().to_string(),
            url.to_string(),
        ])
        .output()
        .map_err(|error| BenchError::Spawn {
            program: options.wrk_bin.display().to_string(),
            reason: error.to_string(),
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    parse_wrk(&text)
}

/// Starts etcd on loopback in a fresh data dir under `dir` and waits until it serves: /health
/// over plain HTTP, or (with `tls`, self-signed client certificates from `--auto-tls`) its log
/// saying it serves clients and the port taking connections.
fn start_etcd(
    options: &ThroughputOptions,
    dir: &Path,
    tls: bool,
) -> Result<(Running, u16), BenchError> {
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let scheme = if tls { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let name = if tls { "etcd-tls" } else { "etcd" };
    let mut args: Vec<String> = vec![
        "--name".into(),
        "bench".into(),
        "--data-dir".into(),
        dir.join(format!("{name}-data")).display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client.clone(),
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("bench={peer}"),
    ];
    if tls {
        args.push("--auto-tls".into());
    }
    let log = dir.join(format!("{name}.log"));
    let etcd = Running::spawn(&options.etcd_bin, &args, &log)?;
    let started = Instant::now();
    loop {
        let healthy = if tls {
            std::fs::read_to_string(&log)
                .is_ok_and(|text| text.contains("ready to serve client requests"))
                && std::net::TcpStream::connect(("127.0.0.1", client_port)).is_ok()
        } else {
            etcd_health(client_port)
        };
        if healthy {
            return Ok((etcd, client_port));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Timeout {
                what: format!("{name} serving clients"),
                secs: 30,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a plain-HTTP etcd answers /health with `"health":"true"`.
fn etcd_health(client_port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", client_port))
        .ok()
        .and_then(|mut stream| {
            use std::io::{Read, Write};
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            stream
                .write_all(b"GET /health HTTP/1.0\r\nhost: etcd\r\n\r\n")
                .ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            Some(answer.contains("\"health\":\"true\""))
        })
        .unwrap_or(false)
}

/// Runs wrk against a fresh control, then against a fresh etcd.
pub async fn run(options: ThroughputOptions) -> Result<ThroughputReport, BenchError> {
    let scratch = ScratchDir::new("throughput")?;
    let control_result = {
        let control =
            start_control(&options.control_bin, 30, "bench-throughput-secret-0123").await?;
        let script = wrk_script(
            &scratch.0,
            r#"{"ttl_secs": 600}"#,
            Some(&format!("Bearer {}", control.admin_token)),
        )?;
        let url = format!("https://{}/v1/enrollment-tokens", control.address);
        let options = options.clone();
        tokio::task::spawn_blocking(move || run_wrk(&options, &script, &url))
            .await
            .map_err(|e| BenchError::Http {
                what: "wrk".into(),
                reason: e.to_string(),
            })??
    };
    let etcd_result = run_etcd(&options, &scratch.0, false).await?;
    let etcd_tls_result = run_etcd(&options, &scratch.0, true).await?;
    Ok(ThroughputReport {
        control: control_result,
        etcd: etcd_result,
        etcd_tls: etcd_tls_result,
    })
}

/// wrk against a fresh etcd, over plain HTTP or TLS.
async fn run_etcd(
    options: &ThroughputOptions,
    dir: &Path,
    tls: bool,
) -> Result<WrkResult, BenchError> {
    let (etcd, port) = start_etcd(options, dir, tls)?;
    // key "bench", value "outpost" (base64).
    let script = wrk_script(dir, r#"{"key": "YmVuY2g=", "value": "b3V0cG9zdA=="}"#, None)?;
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}/v3/kv/put");
    let options = options.clone();
    let result = tokio::task::spawn_blocking(move || run_wrk(&options, &script, &url))
        .await
        .map_err(|e| BenchError::Http {
            what: "wrk".into(),
            reason: e.to_string(),
        })??;
    drop(etcd);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_summaries_are_read() {
        let output = "Running 10s test @ https://127.0.0.1:1/v1/enrollment-tokens\n  2 threads and 64 connections\n  20000 requests in 10.00s, 9.54MB read\n  Non-2xx or 3xx responses: 12\nRequests/sec:   1999.00\n";
        let result = parse_wrk(output).unwrap();
        assert_eq!((result.requests, result.non_2xx), (20000, 12));
        assert!((result.ok_per_sec() - 1998.8).abs() < 0.01);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(parse_wrk_duration("1.00m"), Some(60.0));
        assert_eq!(parse_wrk_duration("500.00ms"), Some(0.5));
    }
}
