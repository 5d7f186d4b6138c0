//! The agent's local status port: `/health`, `/internal/bootstrap/status` (C10), `/status` and
//! `/metrics` (Prometheus text, [`super::metrics`]),
//! served by a tiny HTTP/1.1 responder on a std TcpListener. Request parsing is sans-IO
//! ([`parse_head`]); the socket loop is a thin shell that answers one request per connection.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde::Serialize;

use super::StatusBoard;
use crate::store::{ApplyOutcome, ComponentApply};

/// Longest request head accepted.
pub const HEAD_MAX_BYTES: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What the parser made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    NeedMore,
    Request(Request),
    Invalid(String),
}

/// A parsed request, as a closed set of routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Health,
    BootstrapStatus,
    Status,
    Metrics,
    NotFound(String),
    MethodNotAllowed(String),
}

/// Parses a request head (up to the blank line).
pub fn parse_head(bytes: &[u8]) -> Parsed {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        if bytes.len() > HEAD_MAX_BYTES {
            return Parsed::Invalid(format!("request head over {HEAD_MAX_BYTES} bytes"));
        }
        return Parsed::NeedMore;
    };
    let Ok(head) = std::str::from_utf8(&bytes[..end]) else {
        return Parsed::Invalid("request head is not utf-8".into());
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid(format!(
            "malformed request line {:?}",
            outpost_proto::validate::shorten(line)
        ));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Parsed::Invalid(format!(
            "malformed request line {:?}",
            outpost_proto::validate::shorten(line)
        ));
    }
    let path = target.split('?').next().unwrap_or(target);
    let route = match path {
        "/health" => Request::Health,
        "/internal/bootstrap/status" => Request::BootstrapStatus,
        "/status" => Request::Status,
        "/metrics" => Request::Metrics,
        other => {
            return Parsed::Request(Request::NotFound(outpost_proto::validate::shorten(other)));
        }
    };
    if method != "GET" && method != "HEAD" {
        return Parsed::Request(Request::MethodNotAllowed(outpost_proto::validate::shorten(
            method,
        )));
    }
    Parsed::Request(route)
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'a str,
    node_id: &'a str,
}

/// `/internal/bootstrap/status`: the last apply per component.
#[derive(Serialize)]
struct BootstrapView<'a> {
    node_id: &'a str,
    applied: BTreeMap<&'a str, &'a str>,
    components: &'a BTreeMap<String, ComponentApply>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// The status code, content type and body for a request (JSON, or Prometheus text for
/// `/metrics`, which sizes the artifact cache under `artifacts_root`).
pub fn respond(
    request: &Parsed,
    board: &StatusBoard,
    artifacts_root: &std::path::Path,
) -> (u16, &'static str, Vec<u8>) {
    let status = board.snapshot();
    if let Parsed::Request(Request::Metrics) = request {
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cache = super::metrics::directory_bytes(artifacts_root);
        let text = super::metrics::render(&status, cache, now_unix);
        return (200, super::metrics::CONTENT_TYPE, text.into_bytes());
    }
    let (code, body) = respond_json(request, &status);
    (code, "application/json", body)
}

fn respond_json(request: &Parsed, status: &super::AgentStatus) -> (u16, Vec<u8>) {
    let json = |value: &dyn erased::Json| value.to_json();
    match request {
        Parsed::NeedMore => (
            400,
            json(&ErrorBody {
                error: "bad_request",
                message: "incomplete request".into(),
            }),
        ),
        Parsed::Invalid(why) => (
            400,
            json(&ErrorBody {
                error: "bad_request",
                message: why.clone(),
            }),
        ),
        Parsed::Request(Request::Health) => (
            200,
            json(&Health {
                status: "ok",
                node_id: &status.node_id,
            }),
        ),
        Parsed::Request(Request::Status) => (200, json(status)),
        Parsed::Request(Request::BootstrapStatus) => {
            let view = BootstrapView {
                node_id: &status.node_id,
                applied: status
                    .components
                    .iter()
                    .filter(|(_, c)| c.status == ApplyOutcome::Ok)
                    .map(|(name, c)| (name.as_str(), c.generation.as_str()))
                    .collect(),
                components: &status.components,
                errors: status
                    .components
                    .iter()
                    .filter(|(_, c)| c.status == ApplyOutcome::Error)
                    .map(|(name, c)| format!("{name}: {}", c.message))
                    .collect(),
            };
            (200, json(&view))
        }
        // Answered by `respond` before it gets here.
        Parsed::Request(Request::Metrics) => (200, Vec::new()),
        Parsed::Request(Request::NotFound(path)) => (
            404,
            json(&ErrorBody {
                error: "not_found",
                message: format!("no such path {path:?}"),
            }),
        ),
        Parsed::Request(Request::MethodNotAllowed(method)) => (
            405,
            json(&ErrorBody {
                error: "method_not_allowed",
                message: format!("method {method} is not allowed; use GET"),
            }),
        ),
    }
}

mod erased {
    /// Lets `respond` serialize differently typed bodies through one closure.
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

fn handle(
    mut stream: TcpStream,
    board: &StatusBoard,
    artifacts_root: &std::path::Path,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let parsed = loop {
        match parse_head(&buf) {
            Parsed::NeedMore => {}
            done => break done,
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break parse_head(&buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (code, content_type, body) = respond(&parsed, board, artifacts_root);
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !buf.starts_with(b"HEAD ") {
        stream.write_all(&body)?;
    }
    stream.flush()
}

/// Binds the status port. `127.0.0.1:0` picks a free port; the caller writes it to status.addr.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves forever on its own thread, one connection at a time. `artifacts_root` is the artifact
/// cache `/metrics` sizes.
pub fn spawn(
    listener: TcpListener,
    board: StatusBoard,
    artifacts_root: std::path::PathBuf,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("status-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &board, &artifacts_root);
            }
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::status::AgentStatus;

    #[test]
    fn parses_routes_methods_and_garbage() {
        assert_eq!(
            parse_head(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Request(Request::Health)
        );
        assert_eq!(
            parse_head(b"GET /internal/bootstrap/status?x=1 HTTP/1.0\r\n\r\n"),
            Parsed::Request(Request::BootstrapStatus)
        );
        assert_eq!(parse_head(b"GET /health HTTP/1.1\r\n"), Parsed::NeedMore);
        assert_eq!(
            parse_head(b"POST /status HTTP/1.1\r\n\r\n"),
            Parsed::Request(Request::MethodNotAllowed("POST".into()))
        );
        assert_eq!(
            parse_head(b"GET /nope HTTP/1.1\r\n\r\n"),
            Parsed::Request(Request::NotFound("/nope".into()))
        );
        assert!(matches!(parse_head(b"hello\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse_head(&vec![b'a'; HEAD_MAX_BYTES + 1]),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn serves_health_and_bootstrap_status_over_a_socket() {
        let mut status = AgentStatus {
            node_id: "n1".into(),
            ..Default::default()
        };
        status.components.insert(
            "allocations".into(),
            ComponentApply {
                generation: "abc".into(),
                status: ApplyOutcome::Ok,
                message: String::new(),
                at_unix: 1,
            },
        );
        status.components.insert(
            "storage".into(),
            ComponentApply {
                generation: "def".into(),
                status: ApplyOutcome::Error,
                message: "disk full".into(),
                at_unix: 1,
            },
        );
        let board = StatusBoard::new(status);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, board, std::path::PathBuf::from("/nonexistent")).unwrap();
        let get = |path: &str| {
            let mut stream = TcpStream::connect(addr).unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        };
        let health = get("/health");
        assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
        assert!(
            health.ends_with(r#"{"status":"ok","node_id":"n1"}"#),
            "{health}"
        );
        let bootstrap = get("/internal/bootstrap/status");
        let body: serde_json::Value =
            serde_json::from_str(bootstrap.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["applied"]["allocations"], "abc");
        assert_eq!(body["errors"][0], "storage: disk full");
        assert!(get("/other").starts_with("HTTP/1.1 404"));
        let metrics = get("/metrics");
        assert!(
            metrics.contains("Content-Type: text/plain; version=0.0.4"),
            "{metrics}"
        );
        assert!(
            metrics.contains("outpost_agent_component_reconcile_ok{component=\"storage\"} 0"),
            "{metrics}"
        );
    }
}
