//! Helpers of the edge fleet tests: `outpost-edge run` as a guarded process, a plain HTTP/1.1
//! client over std sockets (so a test controls the Host header, PROXY bytes and keep-alive), and
//! the backends the workloads run: a small Python HTTP server that says who it is, optionally
//! requiring a PROXY v2 header or speaking TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{AgentProcess, ControlProcess, ProcessGuard, START_TIMEOUT, TestDir, binary, wait_for};

pub const EDGE_BINARY: &str = "outpost-edge";

/// The Python backend: answers every GET with `hello from ALLOCATION host=HOST xff=XFF
/// proxy=SOURCE peer=IP` (IP: where the connection came from, the edge's address as the backend
/// sees it); `/healthz` answers 200 too. With `BACKEND_REQUIRE_PROXY=v2` it reads a PROXY v2
/// header first and closes connections without one; with `BACKEND_TLS_CERT`/`KEY` it speaks TLS.
pub const BACKEND_SCRIPT: &str = r#"
import os, socket, socketserver, ssl, struct, sys, threading
port = int(os.environ["OUTPOST_PORT_HTTP"])
name = os.environ.get("OUTPOST_ALLOCATION_ID", "?")
require_proxy = os.environ.get("BACKEND_REQUIRE_PROXY", "")
cert, key = os.environ.get("BACKEND_TLS_CERT"), os.environ.get("BACKEND_TLS_KEY")
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

def read_exact(f, n):
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise EOFError()
        data += chunk
    return data

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        proxy = "-"
        try:
            if require_proxy == "v2":
                head = read_exact(self.rfile, 16)
                if head[:12] != SIG or head[12] != 0x21:
                    return
                rest = read_exact(self.rfile, struct.unpack("!H", head[14:16])[0])
                if head[13] == 0x11:
                    proxy = socket.inet_ntoa(rest[0:4]) + ":" + str(struct.unpack("!H", rest[8:10])[0])
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    return
                headers = {}
                while True:
                    h = self.rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                if n:
                    read_exact(self.rfile, n)
                body = ("hello from %s host=%s xff=%s proxy=%s peer=%s\n" % (name, headers.get("host", "-"), headers.get("x-forwarded-for", "-"), proxy, self.client_address[0])).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                self.wfile.flush()
        except (EOFError, ConnectionError, OSError):
            return

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    def get_request(self):
        sock, addr = super().get_request()
        if cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            sock = context.wrap_socket(sock, server_side=True)
        return sock, addr

Server(("0.0.0.0", port), Handler).serve_forever()
"#;

/// A service document whose instances run the backend on a port the agent picks.
pub fn backend_service(name: &str, replicas: u32, script: &Path, env: &[(&str, &str)]) -> String {
    serde_json::json!({
        "name": name,
        "command": "/usr/bin/python3",
        "args": ["-u", script.display().to_string()],
        "replicas": replicas,
        "memory_bytes": 1048576,
        "env": crate::environment(env),
        "ports": [{"name": "http", "port": 0}],
    })
    .to_string()
}

/// A running `outpost-edge run`, listening on ports it picked (read from its status file).
pub struct EdgeProcess {
    pub guard: ProcessGuard,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
}

impl EdgeProcess {
    /// Starts the edge on `data_dir` with `--enroll TOKEN` and `extra_args`, on the given
    /// listen addresses (`127.0.0.1:0` picks), and waits until its status file names them.
    pub fn start(
        data_dir: &Path,
        enrollment_token: &str,
        http_listen: &str,
        https_listen: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let status_file = data_dir.join("status.json");
        let _ = std::fs::remove_file(&status_file);
        let mut command = Command::new(binary(EDGE_BINARY)?);
        command
            .arg("run")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--enroll", enrollment_token])
            .args(["--http-listen", http_listen, "--https-listen", https_listen])
            .args(extra_args)
            .env("OUTPOST_LOG", "info,outpost_edge=debug");
        let mut guard = ProcessGuard::spawn(EDGE_BINARY, command, &data_dir.with_extension("log"))?;
        let (http, https) = wait_for("the edge to write its listeners", START_TIMEOUT, || {
            if let Some(status) = guard.exited() {
                return Some(Err(anyhow!(
                    "outpost-edge exited with {status}:\n{}",
                    guard.log_tail()
                )));
            }
            let status: Value = serde_json::from_slice(&std::fs::read(&status_file).ok()?).ok()?;
            let http = status["http_listen"].as_str()?.parse().ok()?;
            let https = status["https_listen"].as_str()?.parse().ok()?;
            Some(Ok((http, https)))
        })??;
        Ok(Self {
            guard,
            data_dir: data_dir.to_path_buf(),
            http,
            https,
        })
    }

    /// `outpost-edge status --data-dir D`, parsed.
    pub fn status(&self) -> Result<Value> {
        edge_status(&self.data_dir)
    }
}

/// `outpost-edge status --data-dir D` (works with the edge stopped).
pub fn edge_status(data_dir: &Path) -> Result<Value> {
    let output = Command::new(binary(EDGE_BINARY)?)
        .args(["status", "--data-dir"])
        .arg(data_dir)
        .output()
        .context("running outpost-edge status")?;
    if !output.status.success() {
        bail!(
            "outpost-edge status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("outpost-edge status printed no json")
}

/// One HTTP/1.1 answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

/// Sends one `GET path` with `Host: host` on `stream` (after `preamble`, e.g. a PROXY header)
/// and reads the answer (Content-Length bodies only, as the edge and the backends send).
pub fn http_exchange<S: Read + Write>(
    stream: &mut BufReader<S>,
    host: &str,
    path: &str,
) -> Result<HttpAnswer> {
    write!(
        stream.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: outpost-fleet-test\r\n\r\n"
    )?;
    stream.get_mut().flush()?;
    let mut status_line = String::new();
    if stream.read_line(&mut status_line)? == 0 {
        bail!("the connection closed before an answer");
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(HttpAnswer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET path` with `Host: host` on a fresh connection to `address`.
pub fn http_get(address: SocketAddr, host: &str, path: &str) -> Result<HttpAnswer> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = BufReader::new(stream);
    http_exchange(&mut stream, host, path)
}

/// A keep-alive HTTP connection.
pub fn http_connection(address: SocketAddr) -> Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(BufReader::new(stream))
}

// ------------------------------------------------------------------------------------------
// A fleet with one node

pub const NODE_TTL_SECS: &str = "9";

/// Control, one agent (node `n1`, reached at 127.0.0.1) and the backend script.
pub struct Fleet {
    pub dir: TestDir,
    pub control: ControlProcess,
    pub agent: AgentProcess,
    pub script: std::path::PathBuf,
}

pub fn fleet(prefix: &str) -> Result<Fleet> {
    let dir = TestDir::new(prefix)?;
    let script = dir.write("backend.py", BACKEND_SCRIPT)?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS],
    )?;
    let agent = AgentProcess::start(
        &dir.path().join("agent"),
        &control.enrollment_token()?,
        &[
            "--node-id",
            "n1",
            "--advertise-ip",
            "127.0.0.1",
            "--no-overlay",
        ],
    )?;
    control.wait_for_nodes_ready(&["n1"])?;
    Ok(Fleet {
        dir,
        control,
        agent,
        script,
    })
}

/// A route document with fast health checks.
pub fn route(name: &str, host: &str, service: &str) -> String {
    serde_json::json!({
        "name": name,
        "hosts": [host],
        "service": service,
        "port": "http",
        "health": {"http": {"path": "/healthz"}, "interval_ms": 200, "timeout_ms": 500,
                   "unhealthy_after": 2, "healthy_after": 2}
    })
    .to_string()
}

pub fn apply_route(control: &ControlProcess, document: &str) -> Result<()> {
    control
        .outpostctl_with(&["routes", "apply", "-f", "-"], &[], Some(document))?
        .expect_success("outpostctl routes apply")?;
    Ok(())
}

/// Waits until `host` answers 200 through the edge, and returns the body.
pub fn wait_for_answer(edge: &EdgeProcess, host: &str, what: &str) -> Result<String> {
    wait_for(what, START_TIMEOUT, || {
        http_get(edge.http, host, "/")
            .ok()
            .filter(|answer| answer.status == 200)
            .map(|answer| answer.body)
    })
    .with_context(|| format!("edge log:\n{}", edge.guard.log_tail()))
}

pub fn routes_ls(control: &ControlProcess) -> Result<Value> {
    control
        .outpostctl(&["routes", "ls", "--json"])?
        .expect_success("outpostctl routes ls")?
        .json()
}
