//! A minimal HTTP/1.1 client over one kept-alive TLS connection, for the fleet benchmark: a
//! simulated agent holds its connections open as the real agent's pooled client does, and
//! thousands of them fit one process. Requests carry a body with Content-Length; answers are
//! read by Content-Length or chunked encoding, up to a size limit.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::BenchError;

/// Largest answer body read.
pub const RESPONSE_BODY_MAX_BYTES: usize = 64 << 20;
/// Longest status or header line.
const LINE_MAX_BYTES: usize = 16 * 1024;

/// A client TLS configuration trusting only the control's CA (PEM).
pub fn tls_for_ca(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = ca_pem;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| BenchError::Parse {
            what: "control CA".into(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| BenchError::Parse {
            what: "control CA".into(),
            reason: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BenchError::Parse {
            what: "tls versions".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `name=value` of each `Set-Cookie` (the dashboard's login).
    pub set_cookies: Vec<String>,
}

impl Response {
    /// The body of a 2xx answer, or an error naming the call.
    pub fn ok(self, what: &str) -> Result<Vec<u8>, BenchError> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            Err(BenchError::Status {
                what: what.to_string(),
                status: self.status,
                body: String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(300)
                    .collect(),
            })
        }
    }
}

/// One kept-alive TLS connection to control.
pub struct Connection {
    stream: BufReader<TlsStream<TcpStream>>,
}

fn http_error(what: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |error| BenchError::Http {
        what: what.to_string(),
        reason: error.to_string(),
    }
}

impl Connection {
    pub async fn connect(
        address: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, BenchError> {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(http_error("connect"))?;
        tcp.set_nodelay(true).map_err(http_error("connect"))?;
        let name = ServerName::IpAddress(address.ip().into());
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(http_error("tls handshake"))?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request and reads its answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, BenchError> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: control\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let stream = self.stream.get_mut();
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(http_error(path))?;
        stream.write_all(body).await.map_err(http_error(path))?;
        stream.flush().await.map_err(http_error(path))?;
        self.read_response(path).await
    }

    async fn read_line(&mut self, what: &str) -> Result<String, BenchError> {
        let mut line = String::new();
        let read = (&mut self.stream)
            .take(LINE_MAX_BYTES as u64)
            .read_line(&mut line)
            .await
            .map_err(http_error(what))?;
        if read == 0 {
            return Err(BenchError::Http {
                what: what.to_string(),
                reason: "connection closed".into(),
            });
        }
        Ok(line.trim_end().to_string())
    }

    async fn read_response(&mut self, what: &str) -> Result<Response, BenchError> {
        let status_line = self.read_line(what).await?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| BenchError::Parse {
                what: format!("status line of {what}"),
                reason: status_line.clone(),
            })?;
        let mut content_length = None;
        let mut chunked = false;
        let mut set_cookies = Vec::new();
        loop {
            let line = self.read_line(what).await?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("set-cookie") {
                set_cookies.push(value.split(';').next().unwrap_or("").to_string());
            }
        }
        let body = if chunked {
            self.read_chunked(what).await?
        } else {
            let length = content_length.unwrap_or(0);
            if length > RESPONSE_BODY_MAX_BYTES {
                return Err(BenchError::Parse {
                    what: format!("answer of {what}"),
                    reason: format!("{length} bytes, more than {RESPONSE_BODY_MAX_BYTES}"),
                });
            }
            let mut body = vec![0; length];
            self.stream
                .read_exact(&mut body)
                .await
                .map_err(http_error(what))?;
            body
        };
        Ok(Response {
            status,
            body,
            set_cookies,
        })
    }

    async fn read_chunked(&mut self, what: &str) -> Result<Vec<u8>, BenchError> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line(what).await?;
            let size_text = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| BenchError::Parse {
                what: format!("chunk size of {what}"),
                reason: size_line.clone(),
            })?;
            if size == 0 {
                // Trailers end with an empty line.
                while !self.read_line(what).await?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > RESPONSE_BODY_MAX_BYTES {
                return Err(BenchError::Parse {
                    what: format!("answer of {what}"),
                    reason: format!("more than {RESPONSE_BODY_MAX_BYTES} bytes"),
                });
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.stream
                .read_exact(&mut body[start..])
                .await
                .map_err(http_error(what))?;
            // The CRLF after a chunk reads as an empty line.
            self.read_line(what).await?;
        }
    }
}
