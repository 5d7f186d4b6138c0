//! Talking to control: a small [`Transport`] (real one over ureq + rustls, trusting only the
//! control CA) and [`ControlClient`], which turns answers into JSON or errors that say what to do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::api::ApiErrorBody;
use serde_json::Value;

/// Every call has a deadline; long-polls add their wait to it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer outpostctl reads.
pub const ANSWER_MAX_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// One HTTP request, without the base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call<'a> {
    pub method: Method,
    /// Path and query, e.g. `/v1/events?cursor=…`.
    pub path: &'a str,
    pub json_body: Option<Vec<u8>>,
    /// A file streamed as the body (artifact uploads), instead of JSON.
    pub file_body: Option<&'a Path>,
    pub bearer: Option<&'a str>,
    pub timeout: Duration,
}

/// Status and body of an answer, whatever the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why no answer came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportFailure {
    ConnectionRefused,
    HostNotFound,
    TimedOut,
    Tls(String),
    Other(String),
}

/// Sends one request to control. The real one is [`UreqTransport`]; unit tests use a fake.
pub trait Transport {
    fn send(&self, call: &Call<'_>) -> Result<Answer, TransportFailure>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach control at {url}: {reason}; is outpost-control running? set --control-url or OUTPOST_CONTROL_URL"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "control at {url} did not answer {method} {path} within {timeout_secs} s; is it overloaded or stuck?"
    )]
    TimedOut {
        url: String,
        method: &'static str,
        path: String,
        timeout_secs: u64,
    },
    #[error(
        "TLS with control at {url} failed: {reason}; check that the CA file ({ca_file}) is the CA of this control (set --ca-file or OUTPOST_CA_FILE)"
    )]
    Tls {
        url: String,
        ca_file: String,
        reason: String,
    },
    #[error(
        "cannot read CA file {path}: {reason}; set --ca-file or OUTPOST_CA_FILE to the control CA (PEM)"
    )]
    CaFile { path: String, reason: String },
    #[error(
        "the token was refused by control at {url} ({code}: {message}); set --token or OUTPOST_TOKEN to a valid operator token (outpost-control serve writes the admin token to DATA_DIR/admin/outpostctl.json)"
    )]
    Unauthorized {
        url: String,
        code: String,
        message: String,
    },
    #[error("the token may not do this ({code}: {message}); use a token with the needed scope")]
    Forbidden { code: String, message: String },
    #[error("control refused {method} {path}: {status} {code}: {message}{detail}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        code: String,
        message: String,
        detail: String,
    },
    #[error(
        "control answered {method} {path} with {status} and a body that is not what outpostctl expects: {detail}"
    )]
    BadAnswer {
        method: &'static str,
        path: String,
        status: u16,
        detail: String,
    },
}

#[cfg(test)]
impl ClientError {
    /// The error body's code, when control sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Unauthorized { code, .. }
            | ClientError::Forbidden { code, .. }
            | ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The client outpostctl uses: base URL, token, and a transport.
pub struct ControlClient<T: Transport> {
    transport: T,
    control_url: String,
    ca_file: String,
    token: Option<String>,
}

impl<T: Transport> ControlClient<T> {
    pub fn new(transport: T, control_url: &str, ca_file: &str, token: Option<String>) -> Self {
        Self {
            transport,
            control_url: control_url.to_string(),
            ca_file: ca_file.to_string(),
            token,
        }
    }

    pub fn control_url(&self) -> &str {
        &self.control_url
    }

    #[cfg(test)]
    pub fn transport_ref(&self) -> &T {
        &self.transport
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call_json(Method::Get, path, None, CALL_TIMEOUT)
    }

    /// A long-poll: the call may take `wait` plus the usual deadline.
    pub fn get_waiting(&self, path: &str, wait: Duration) -> Result<Value, ClientError> {
        self.call_json(Method::Get, path, None, CALL_TIMEOUT + wait + wait / 16)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call_json(Method::Post, path, Some(body), CALL_TIMEOUT)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call_json(Method::Put, path, Some(body), CALL_TIMEOUT)
    }

    /// Streams `file` as the body of a PUT; the call may take `timeout`.
    pub fn put_file(
        &self,
        path: &str,
        file: &Path,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let call = Call {
            method: Method::Put,
            path,
            json_body: None,
            file_body: Some(file),
            bearer: self.token.as_deref(),
            timeout,
        };
        let answer = self
            .transport
            .send(&call)
            .map_err(|failure| self.transport_error(&call, failure))?;
        interpret_answer(&self.control_url, Method::Put, path, answer)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call_json(Method::Delete, path, None, CALL_TIMEOUT)
    }

    fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let call = Call {
            method,
            path,
            json_body: body.map(|body| serde_json::to_vec(body).unwrap_or_default()),
            file_body: None,
            bearer: self.token.as_deref(),
            timeout,
        };
        let answer = self
            .transport
            .send(&call)
            .map_err(|failure| self.transport_error(&call, failure))?;
        interpret_answer(&self.control_url, method, path, answer)
    }

    fn transport_error(&self, call: &Call<'_>, failure: TransportFailure) -> ClientError {
        let url = self.control_url.clone();
        let unreachable = |reason: &str| ClientError::Unreachable {
            url: url.clone(),
            reason: reason.to_string(),
        };
        match failure {
            TransportFailure::ConnectionRefused => unreachable("connection refused"),
            TransportFailure::HostNotFound => unreachable("host not found"),
            TransportFailure::Other(reason) => ClientError::Unreachable { url, reason },
            TransportFailure::TimedOut => ClientError::TimedOut {
                url,
                method: call.method.as_str(),
                path: call.path.to_string(),
                timeout_secs: call.timeout.as_secs(),
            },
            TransportFailure::Tls(reason) => ClientError::Tls {
                url,
                ca_file: self.ca_file.clone(),
                reason,
            },
        }
    }
}

/// Turns a status and body into the JSON answer or an error naming what control said.
pub fn interpret_answer(
    control_url: &str,
    method: Method,
    path: &str,
    answer: Answer,
) -> Result<Value, ClientError> {
    let parsed: Result<Value, _> = if answer.body.is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_slice(&answer.body)
    };
    if (200..300).contains(&answer.status) {
        return parsed.map_err(|error| ClientError::BadAnswer {
            method: method.as_str(),
            path: path.to_string(),
            status: answer.status,
            detail: format!("not JSON: {error}"),
        });
    }
    let error_body = parsed
        .ok()
        .and_then(|value| serde_json::from_value::<ApiErrorBody>(value).ok());
    let Some(body) = error_body else {
        let text = String::from_utf8_lossy(&answer.body);
        let shown: String = text.chars().take(200).collect();
        return Err(ClientError::BadAnswer {
            method: method.as_str(),
            path: path.to_string(),
            status: answer.status,
            detail: if shown.is_empty() {
                "empty body".into()
            } else {
                format!("{shown:?}")
            },
        });
    };
    match answer.status {
        401 => Err(ClientError::Unauthorized {
            url: control_url.to_string(),
            code: body.error,
            message: body.message,
        }),
        403 => Err(ClientError::Forbidden {
            code: body.error,
            message: body.message,
        }),
        status => {
            let mut detail = String::new();
            if let Some(field) = &body.field {
                detail.push_str(&format!(" (field {field}"));
                if let Some(value) = &body.value {
                    detail.push_str(&format!(", value {value:?}"));
                }
                detail.push(')');
            }
            Err(ClientError::Refused {
                method: method.as_str(),
                path: path.to_string(),
                status,
                code: body.error,
                message: body.message,
                detail,
            })
        }
    }
}

/// The real transport: HTTPS to control, trusting only the CA read from the CA file.
pub struct UreqTransport {
    agent: ureq::Agent,
    base_url: String,
}

impl UreqTransport {
    pub fn new(control_url: &str, ca_file: &Path) -> Result<Self, ClientError> {
        let ca_error = |reason: String| ClientError::CaFile {
            path: ca_file.display().to_string(),
            reason,
        };
        let pem = std::fs::read(ca_file).map_err(|error| ca_error(error.to_string()))?;
        let mut certificates = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(certificate)) => certificates.push(certificate),
                Ok(_) => {}
                Err(error) => return Err(ca_error(format!("not PEM: {error}"))),
            }
        }
        if certificates.is_empty() {
            return Err(ca_error("holds no certificate".into()));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certificates)))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(CALL_TIMEOUT))
            .max_redirects(0)
            .user_agent(concat!("outpostctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            agent,
            base_url: control_url.to_string(),
        })
    }
}

impl Transport for UreqTransport {
    fn send(&self, call: &Call<'_>) -> Result<Answer, TransportFailure> {
        let url = format!("{}{}", self.base_url, call.path);
        let bearer = call.bearer.map(|token| format!("Bearer {token}"));
        let result = match call.method {
            Method::Get | Method::Delete => {
                let request = if call.method == Method::Get {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                let mut request = request.header("accept", "application/json");
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request
                    .config()
                    .timeout_global(Some(call.timeout))
                    .build()
                    .call()
            }
            Method::Put if call.file_body.is_some() => {
                let path = call.file_body.unwrap_or(Path::new(""));
                let file = std::fs::File::open(path).map_err(|error| {
                    TransportFailure::Other(format!("cannot open {}: {error}", path.display()))
                })?;
                let mut request = self
                    .agent
                    .put(&url)
                    .header("accept", "application/json")
                    .header("content-type", "application/octet-stream");
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request
                    .config()
                    .timeout_global(Some(call.timeout))
                    .build()
                    .send(file)
            }
            Method::Post | Method::Put => {
                let request = if call.method == Method::Post {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                let mut request = request
                    .header("accept", "application/json")
                    .header("content-type", "application/json");
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                let body = call.json_body.clone().unwrap_or_default();
                request
                    .config()
                    .timeout_global(Some(call.timeout))
                    .build()
                    .send(&body[..])
            }
        };
        let mut response = result.map_err(classify_ureq_error)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(ANSWER_MAX_BYTES)
            .read_to_vec()
            .map_err(classify_ureq_error)?;
        Ok(Answer { status, body })
    }
}

fn classify_ureq_error(error: ureq::Error) -> TransportFailure {
    match error {
        ureq::Error::Timeout(_) => TransportFailure::TimedOut,
        ureq::Error::HostNotFound => TransportFailure::HostNotFound,
        ureq::Error::Tls(reason) => TransportFailure::Tls(reason.to_string()),
        ureq::Error::Rustls(error) => TransportFailure::Tls(error.to_string()),
        ureq::Error::Io(io) => {
            let text = io.to_string();
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => TransportFailure::ConnectionRefused,
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    TransportFailure::TimedOut
                }
                // rustls reports certificate problems as InvalidData io errors.
                std::io::ErrorKind::InvalidData if looks_like_tls(&text) => {
                    TransportFailure::Tls(text)
                }
                _ => TransportFailure::Other(text),
            }
        }
        other => TransportFailure::Other(other.to_string()),
    }
}

fn looks_like_tls(text: &str) -> bool {
    [
        "certificate",
        "Certificate",
        "handshake",
        "TLS",
        "tls",
        "alert",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Method, path, bearer token and body of one call.
    type RecordedCall = (Method, String, Option<String>, Option<String>);

    /// A fake that stands in for the control service: answers a fixed list in order and
    /// records the calls.
    pub struct FakeControl {
        pub answers: RefCell<Vec<Result<Answer, TransportFailure>>>,
        pub calls: RefCell<Vec<RecordedCall>>,
    }

    impl FakeControl {
        pub fn new(answers: Vec<Result<Answer, TransportFailure>>) -> Self {
            Self {
                answers: RefCell::new(answers),
                calls: RefCell::new(Vec::new()),
            }
        }
    }

    impl Transport for FakeControl {
        fn send(&self, call: &Call<'_>) -> Result<Answer, TransportFailure> {
            self.calls.borrow_mut().push((
                call.method,
                call.path.to_string(),
                call.bearer.map(str::to_string),
                call.json_body
                    .as_ref()
                    .map(|body| String::from_utf8_lossy(body).into_owned()),
            ));
            let mut answers = self.answers.borrow_mut();
            if answers.is_empty() {
                return Err(TransportFailure::Other(
                    "fake control has no more answers".into(),
                ));
            }
            answers.remove(0)
        }
    }

    fn answer(status: u16, body: &str) -> Result<Answer, TransportFailure> {
        Ok(Answer {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    fn client(answers: Vec<Result<Answer, TransportFailure>>) -> ControlClient<FakeControl> {
        ControlClient::new(
            FakeControl::new(answers),
            "https://127.0.0.1:7443",
            "/d/ca.pem",
            Some("opa.t".into()),
        )
    }

    #[test]
    fn success_returns_the_json_and_sends_the_token() {
        let control = client(vec![answer(200, r#"{"status":"ok"}"#)]);
        let value = control.post("/v1/x", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(value["status"], "ok");
        let calls = control.transport.calls.borrow();
        assert_eq!(calls[0].0, Method::Post);
        assert_eq!(calls[0].2.as_deref(), Some("opa.t"));
        assert_eq!(calls[0].3.as_deref(), Some(r#"{"a":1}"#));
    }

    #[test]
    fn connection_refused_says_what_to_do() {
        let control = client(vec![Err(TransportFailure::ConnectionRefused)]);
        let message = control.get("/v1/health").unwrap_err().to_string();
        assert_eq!(
            message,
            "cannot reach control at https://127.0.0.1:7443: connection refused; is outpost-control running? set --control-url or OUTPOST_CONTROL_URL"
        );
    }

    #[test]
    fn unauthorized_says_the_token_was_refused() {
        let control = client(vec![answer(
            401,
            r#"{"error":"unauthorized","message":"unknown token"}"#,
        )]);
        let message = control.get("/v1/nodes").unwrap_err().to_string();
        assert!(message.starts_with("the token was refused"), "{message}");
        assert!(
            message.contains("OUTPOST_TOKEN") && message.contains("unknown token"),
            "{message}"
        );
    }

    #[test]
    fn api_errors_show_message_field_and_value() {
        let control = client(vec![answer(
            422,
            r#"{"error":"unschedulable","message":"no node can hold it","field":"memory_bytes","value":"999"}"#,
        )]);
        let error = control.post("/v1/services", &Value::Null).unwrap_err();
        assert_eq!(error.code(), Some("unschedulable"));
        assert_eq!(
            error.to_string(),
            "control refused POST /v1/services: 422 unschedulable: no node can hold it (field memory_bytes, value \"999\")"
        );
    }

    #[test]
    fn non_json_answers_are_reported_with_the_status() {
        let control = client(vec![answer(502, "bad gateway"), answer(200, "<html>")]);
        let message = control.get("/v1/nodes").unwrap_err().to_string();
        assert!(
            message.contains("502") && message.contains("bad gateway"),
            "{message}"
        );
        let message = control.get("/v1/nodes").unwrap_err().to_string();
        assert!(
            message.contains("200") && message.contains("not JSON"),
            "{message}"
        );
    }

    #[test]
    fn tls_and_timeouts_are_explained() {
        let control = client(vec![
            Err(TransportFailure::Tls(
                "invalid peer certificate: UnknownIssuer".into(),
            )),
            Err(TransportFailure::TimedOut),
        ]);
        let message = control.get("/v1/nodes").unwrap_err().to_string();
        assert!(
            message.contains("UnknownIssuer") && message.contains("/d/ca.pem"),
            "{message}"
        );
        let message = control
            .get_waiting("/v1/events", Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(message.contains("within 46 s"), "{message}");
    }
}
