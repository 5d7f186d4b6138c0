//! Readiness probes (B2): an HTTP GET answering 2xx, a TCP connect, or a command exiting 0,
//! each bounded by a timeout. The HTTP status line parser is a pure function.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_proto::service::ReadinessProbe;

/// Runs one probe attempt. `Err` says why it did not pass.
pub fn probe(check: &ReadinessProbe, timeout: Duration) -> Result<(), String> {
    match check {
        ReadinessProbe::Tcp { port } => connect(*port, timeout).map(|_| ()),
        ReadinessProbe::Http { port, path } => http_get(*port, path, timeout),
        ReadinessProbe::Exec { command, args } => exec(command, args, timeout),
    }
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("tcp connect to {addr}: {e}"))
}

fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(port, timeout)?;
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(remaining()))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: outpost-agent\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("http {port}{path}: send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream
            .set_read_timeout(Some(remaining()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("http {port}{path}: read: {e}")),
        }
    }
    match status_code(&head) {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(format!("http {port}{path} answered {code}")),
        None => Err(format!(
            "http {port}{path}: no http status line in {:?}",
            String::from_utf8_lossy(&head)
        )),
    }
}

/// The status code of an HTTP/1.x status line at the start of `head`.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end();
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

fn exec(command: &str, args: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(command)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("exec {command}: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("exec {command} exited with {status}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "exec {command} did not finish within {} ms",
                    timeout.as_millis()
                ));
            }
            Err(e) => return Err(format!("exec {command}: {e}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(listener: TcpListener, answer: &'static str) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(answer.as_bytes());
            }
        })
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 500 Oops\r\n"), Some(500));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 200"), None);
    }

    #[test]
    fn tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(probe(&ReadinessProbe::Tcp { port }, Duration::from_secs(2)).is_ok());
        drop(listener);
        let error = probe(&ReadinessProbe::Tcp { port }, Duration::from_secs(2)).unwrap_err();
        assert!(error.contains(&port.to_string()), "{error}");
    }

    #[test]
    fn http_probe_needs_a_2xx() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = serve_once(listener, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let check = ReadinessProbe::Http {
            port,
            path: "/ready".into(),
        };
        assert!(probe(&check, Duration::from_secs(2)).is_ok());
        server.join().unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = serve_once(listener, "HTTP/1.1 503 Busy\r\n\r\n");
        let error = probe(
            &ReadinessProbe::Http {
                port,
                path: "/ready".into(),
            },
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(error.contains("503"), "{error}");
        server.join().unwrap();
    }

    #[test]
    fn http_probe_times_out_on_a_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = probe(
            &ReadinessProbe::Http {
                port,
                path: "/".into(),
            },
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(error.contains("read"), "{error}");
        drop(listener);
    }

    #[test]
    fn exec_probe_follows_the_exit_code() {
        let ok = ReadinessProbe::Exec {
            command: "/bin/true".into(),
            args: vec![],
        };
        assert!(probe(&ok, Duration::from_secs(5)).is_ok());
        let fail = ReadinessProbe::Exec {
            command: "/bin/false".into(),
            args: vec![],
        };
        assert!(probe(&fail, Duration::from_secs(5)).is_err());
        let slow = ReadinessProbe::Exec {
            command: "/bin/sleep".into(),
            args: vec!["5".into()],
        };
        assert!(
            probe(&slow, Duration::from_millis(100))
                .unwrap_err()
                .contains("did not finish")
        );
    }
}
