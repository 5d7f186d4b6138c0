//! The HTTP client for control's node endpoints (docs/api.md), over ureq with the pinned CA as
//! the only root. Every call has a timeout; answers are size-limited and validated; errors are
//! classified into what the caller should do next (D6).

use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::api::{
    ApiErrorBody, PATH_BOOTSTRAP_EVENTS, PATH_BOOTSTRAP_PROFILE, PATH_REGISTER, node_changes_path,
    node_heartbeat_path, node_plan_path,
};
use outpost_proto::bootstrap::BootstrapEvent;
use outpost_proto::codec::{
    Encoding, JSON_CONTENT_TYPE, POSTCARD_CONTENT_TYPE, WIRE_VERSION, WIRE_VERSION_HEADER, decode,
    encode,
};
use outpost_proto::feed::{ChangeBatch, GoneBody};
use outpost_proto::limits::{FRAME_MAX_BYTES, PROFILE_MAX_BYTES};
use outpost_proto::node::{HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse};
use outpost_proto::plan::Plan;
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::validate::Validate;
use serde::de::DeserializeOwned;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::pinning::ring_provider;

/// Timeout of every call but the long poll.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest small answer (register, heartbeat, errors).
const SMALL_BODY_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("control answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after_secs: Option<u64>,
    },
    #[error("cursor is gone ({}): {}", .0.error, .0.message)]
    Gone(GoneBody),
    #[error("cannot reach control: {0}")]
    Transport(String),
    #[error("bad answer from control: {0}")]
    Decode(String),
}

/// The error code older controls answered a cursor past their log head with (`400`).
const LEGACY_CURSOR_PAST_HEAD_CODE: &str = "cursor_from_future";

/// What to do after a failed call (D6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// 401/403/404 on a node path: register again (with the credential), then retry.
    Register,
    /// The node was revoked: only a fresh enrollment token helps.
    Reenroll,
    /// 410 (or an older control's `400 cursor_from_future`): fetch the plan snapshot and resume
    /// from its cursor.
    Snapshot,
    /// Anything else: back off and retry.
    Backoff,
}

impl CallError {
    pub fn recovery(&self) -> Recovery {
        match self {
            CallError::Status { code, .. } if code == "node_revoked" => Recovery::Reenroll,
            CallError::Status {
                status: 401 | 403 | 404,
                ..
            } => Recovery::Register,
            CallError::Gone(_) => Recovery::Snapshot,
            // Controls before the 410 for cursors past the head answered 400 here; backing off
            // would retry the same cursor forever.
            CallError::Status {
                status: 400, code, ..
            } if code == LEGACY_CURSOR_PAST_HEAD_CODE => Recovery::Snapshot,
            _ => Recovery::Backoff,
        }
    }
}

/// A client for one control URL, trusting only the pinned CA.
#[derive(Clone)]
pub struct ControlClient {
    base_url: String,
    agent: ureq::Agent,
    credential: Option<String>,
}

/// A ureq agent whose only root is `ca_der`.
pub fn agent_for_ca(ca_der: &[u8]) -> ureq::Agent {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(ring_provider())
        .root_certs(RootCerts::Specific(std::sync::Arc::new(vec![
            Certificate::from_der(ca_der).to_owned(),
        ])))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(CALL_TIMEOUT))
        .user_agent(concat!("outpost-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn transport(error: ureq::Error) -> CallError {
    CallError::Transport(error.to_string())
}

impl ControlClient {
    pub fn new(base_url: &str, ca_der: &[u8]) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            agent: agent_for_ca(ca_der),
            credential: None,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn set_credential(&mut self, credential: Option<String>) {
        self.credential = credential;
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn finish<T: DeserializeOwned + Validate>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        what: &'static str,
        limit_bytes: usize,
    ) -> Result<T, CallError> {
        let mut response = response.map_err(transport)?;
        let status = response.status().as_u16();
        let encoding = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(Encoding::from_content_type)
            .unwrap_or(Encoding::Json);
        let retry_after_secs = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let limit = if (200..300).contains(&status) {
            limit_bytes
        } else {
            SMALL_BODY_MAX_BYTES
        };
        let bytes = response
            .body_mut()
            .with_config()
            .limit(limit as u64)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    CallError::Decode(format!("{what} is larger than the limit of {limit} bytes"))
                }
                other => transport(other),
            })?;
        if (200..300).contains(&status) {
            return decode::<T>(encoding, &bytes, limit, what)
                .map_err(|e| CallError::Decode(e.to_string()));
        }
        if status == 410
            && let Ok(gone) =
                decode::<GoneBody>(Encoding::Json, &bytes, SMALL_BODY_MAX_BYTES, "gone body")
        {
            return Err(CallError::Gone(gone));
        }
        let (code, message) = match decode::<ApiErrorBody>(
            Encoding::Json,
            &bytes,
            SMALL_BODY_MAX_BYTES,
            "error body",
        ) {
            Ok(body) => (body.error, body.message),
            Err(_) => (
                String::from("unknown"),
                outpost_proto::validate::shorten(&String::from_utf8_lossy(&bytes)),
            ),
        };
        Err(CallError::Status {
            status,
            code,
            message,
            retry_after_secs,
        })
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.credential {
            Some(credential) => request.header("Authorization", format!("Bearer {credential}")),
            None => request,
        }
    }

    fn post_json<T: DeserializeOwned + Validate>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        what: &'static str,
    ) -> Result<T, CallError> {
        let request = self
            .authorized(self.agent.post(self.url(path)))
            .header("Content-Type", JSON_CONTENT_TYPE);
        self.finish(
            request.send(encode(Encoding::Json, body)),
            what,
            SMALL_BODY_MAX_BYTES,
        )
    }

    pub fn register(&self, request: &RegisterRequest) -> Result<RegisterResponse, CallError> {
        self.post_json(PATH_REGISTER, request, "register response")
    }

    pub fn heartbeat(
        &self,
        node_id: &str,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, CallError> {
        self.post_json(&node_heartbeat_path(node_id), request, "heartbeat response")
    }

    pub fn post_events(&self, events: &[BootstrapEvent]) -> Result<(), CallError> {
        self.post_json::<Accepted>(PATH_BOOTSTRAP_EVENTS, &events, "events answer")
            .map(|_| ())
    }

    /// `GET /v1/bootstrap/profile` (JSON), validated.
    pub fn profile(&self) -> Result<EnvironmentProfile, CallError> {
        let request = self
            .authorized(self.agent.get(self.url(PATH_BOOTSTRAP_PROFILE)))
            .header("Accept", JSON_CONTENT_TYPE);
        self.finish(request.call(), "environment profile", PROFILE_MAX_BYTES)
    }

    fn get_frame<T: DeserializeOwned + Validate>(
        &self,
        url: String,
        timeout: Duration,
        what: &'static str,
    ) -> Result<T, CallError> {
        let request = self
            .authorized(self.agent.get(url))
            .header("Accept", POSTCARD_CONTENT_TYPE)
            .header(WIRE_VERSION_HEADER, WIRE_VERSION.to_string())
            .config()
            .timeout_global(Some(timeout))
            .build();
        self.finish(request.call(), what, FRAME_MAX_BYTES)
    }

    pub fn plan(&self, node_id: &str) -> Result<Plan, CallError> {
        self.get_frame(self.url(&node_plan_path(node_id)), CALL_TIMEOUT, "plan")
    }

    /// Long-polls the change feed from `cursor`, waiting up to `wait_secs` (plus control's jitter).
    pub fn changes(
        &self,
        node_id: &str,
        cursor: Cursor,
        wait_secs: u64,
    ) -> Result<ChangeBatch, CallError> {
        let url = format!(
            "{}?cursor={cursor}&wait={wait_secs}",
            self.url(&node_changes_path(node_id))
        );
        let timeout = Duration::from_secs(wait_secs + wait_secs / 16) + CALL_TIMEOUT;
        self.get_frame(url, timeout, "change batch")
    }
}

/// How a download call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downloaded {
    /// The body was read to its end; `appended` bytes were written.
    Complete { appended: u64 },
    /// Control answered 416: the file already holds every byte (or more).
    NothingLeft,
}

/// Longest silence while a download body is read; the download then resumes.
pub const DOWNLOAD_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlClient {
    /// `GET /v1/artifacts/SHA256` from `offset` (a `Range` request when `offset > 0`), written
    /// to `file`: appended after a 206, from the start after a 200 (control ignored the range).
    /// A cut connection leaves what arrived in `file` and answers `Transport`, so the caller
    /// resumes from the file's new length.
    pub fn download_artifact(
        &self,
        sha256: &str,
        offset: u64,
        file: &mut std::fs::File,
    ) -> Result<Downloaded, CallError> {
        use std::io::{Seek, SeekFrom, Write};
        let mut request = self
            .authorized(
                self.agent
                    .get(self.url(&outpost_proto::artifact::artifact_path(sha256))),
            )
            .config()
            .timeout_global(None)
            .timeout_per_read(Some(DOWNLOAD_READ_TIMEOUT))
            .build();
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let mut response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let start = match status {
            206 => offset,
            200 => 0,
            416 => return Ok(Downloaded::NothingLeft),
            _ => {
                return self
                    .finish::<Accepted>(Ok(response), "artifact", SMALL_BODY_MAX_BYTES)
                    .map(|_| Downloaded::NothingLeft);
            }
        };
        let local =
            |e: std::io::Error| CallError::Decode(format!("cannot write the download: {e}"));
        file.set_len(start).map_err(local)?;
        file.seek(SeekFrom::Start(start)).map_err(local)?;
        let mut reader = response.body_mut().with_config().reader();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut appended = 0u64;
        loop {
            use std::io::Read;
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => {
                    file.write_all(&buffer[..read]).map_err(local)?;
                    appended += read as u64;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    let _ = file.flush();
                    return Err(CallError::Transport(format!(
                        "artifact download cut after {} bytes: {error}",
                        start + appended
                    )));
                }
            }
        }
        file.flush().map_err(local)?;
        Ok(Downloaded::Complete { appended })
    }
}

/// `202 {"accepted": n}`.
#[derive(serde::Deserialize)]
struct Accepted {
    #[allow(dead_code)]
    accepted: u64,
}

impl Validate for Accepted {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(status: u16, code: &str) -> CallError {
        CallError::Status {
            status,
            code: code.into(),
            message: String::new(),
            retry_after_secs: None,
        }
    }

    #[test]
    fn errors_map_to_the_d6_recoveries() {
        assert_eq!(status(401, "unauthorized").recovery(), Recovery::Register);
        assert_eq!(status(403, "forbidden").recovery(), Recovery::Register);
        assert_eq!(status(404, "not_found").recovery(), Recovery::Register);
        assert_eq!(status(403, "node_revoked").recovery(), Recovery::Reenroll);
        assert_eq!(
            status(503, "projection_lagging").recovery(),
            Recovery::Backoff
        );
        // An older control's answer to a cursor past its head: the snapshot, not a backoff
        // that would retry the same cursor forever.
        assert_eq!(
            status(400, "cursor_from_future").recovery(),
            Recovery::Snapshot
        );
        assert_eq!(status(400, "invalid_field").recovery(), Recovery::Backoff);
        assert_eq!(
            CallError::Transport("refused".into()).recovery(),
            Recovery::Backoff
        );
        let gone = GoneBody {
            error: "gone".into(),
            message: "m".into(),
            snapshot: "/v1/nodes/n1/plan".into(),
            log_epoch: 1,
            floor: 2,
        };
        assert_eq!(CallError::Gone(gone).recovery(), Recovery::Snapshot);
    }
}
