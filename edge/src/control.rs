//! The edge's client of control: HTTPS that trusts only the CA whose sha256 the enrollment token
//! carries (found in the chain control presents, then used as the only root), JSON requests with
//! timeouts and bounded answers, and the errors mapped to what the follower does next.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use outpost_proto::Cursor;
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::route::{
    EdgeBatch, EdgeRegisterRequest, EdgeRegisterResponse, EdgeReport, EdgeSnapshot,
};
use outpost_proto::validate::Validate;
use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Time for connecting and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a request that does not long-poll.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control url {url:?} is not https://HOST:PORT")]
    BadUrl { url: String },
    #[error("cannot reach control at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("control answered {status} to {what}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("control's answer to {what} does not decode: {reason}")]
    Decode { what: String, reason: String },
    #[error("control did not answer {what} within {seconds} s")]
    Timeout { what: String, seconds: u64 },
}

impl ClientError {
    /// The credential was refused: enroll or register again.
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            ClientError::Status {
                status: 401 | 403,
                ..
            }
        )
    }

    /// The cursor is gone: fetch the snapshot.
    pub fn is_gone(&self) -> bool {
        matches!(self, ClientError::Status { status: 410, .. })
    }
}

/// Checks control's chain against the pinned CA fingerprint: the CA must be in the chain control
/// presents, and the leaf must verify against it as the only root.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256_hex: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| hex_sha256(cert.as_ref()).eq_ignore_ascii_case(&self.ca_sha256_hex))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "control's chain holds no CA with sha256 {}",
                    self.ca_sha256_hex
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA does not parse: {e}")))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    outpost_proto::hash::to_hex(&Sha256::digest(bytes))
}

/// A client of one control URL.
#[derive(Clone)]
pub struct ControlClient {
    url: String,
    host: String,
    authority: String,
    connector: TlsConnector,
}

impl ControlClient {
    pub fn new(url: &str, ca_sha256_hex: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadUrl {
            url: url.to_string(),
        };
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let authority = rest.split('/').next().unwrap_or_default().to_string();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return Err(bad()),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedCaVerifier {
            ca_sha256_hex: ca_sha256_hex.to_string(),
            provider: Arc::clone(&provider),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            host,
            authority,
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let what = format!("{method} {path}");
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let connect = async {
            let tcp = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(self.host.clone())
                .map_err(|e| unreachable(format!("bad host name: {e}")))?;
            self.connector
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(format!("tls: {e}")))
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("connect to {}", self.url),
                seconds: CONNECT_TIMEOUT.as_secs(),
            })??;
        let exchange = async {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(connection);
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, &self.authority)
                .header(hyper::header::ACCEPT, "application/json");
            if let Some(bearer) = bearer {
                builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {bearer}"));
            }
            if body.is_some() {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let request = builder
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| unreachable(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), FRAME_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                what: what.clone(),
                seconds: timeout.as_secs(),
            })??;
        if !status.is_success() {
            return Err(ClientError::Status {
                what,
                status: status.as_u16(),
                body: outpost_proto::validate::shorten(&String::from_utf8_lossy(&bytes)),
            });
        }
        Ok((status, bytes))
    }

    fn decode<T: serde::de::DeserializeOwned + Validate>(
        what: &str,
        bytes: &[u8],
    ) -> Result<T, ClientError> {
        let value: T = serde_json::from_slice(bytes).map_err(|e| ClientError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        value.validate().map_err(|e| ClientError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        Ok(value)
    }

    pub async fn register(
        &self,
        request: &EdgeRegisterRequest,
    ) -> Result<EdgeRegisterResponse, ClientError> {
        let body = serde_json::to_vec(request).unwrap_or_default();
        let (_, bytes) = self
            .request(
                Method::POST,
                "/v1/edges/register",
                None,
                Some(body),
                REQUEST_TIMEOUT,
            )
            .await?;
        Self::decode("edge registration", &bytes)
    }

    pub async fn snapshot(
        &self,
        edge_id: &str,
        credential: &str,
    ) -> Result<EdgeSnapshot, ClientError> {
        let path = format!("/v1/edges/{edge_id}/routes");
        let (_, bytes) = self
            .request(Method::GET, &path, Some(credential), None, REQUEST_TIMEOUT)
            .await?;
        Self::decode("edge snapshot", &bytes)
    }

    pub async fn changes(
        &self,
        edge_id: &str,
        credential: &str,
        cursor: Cursor,
        backends_digest: &str,
        tls_digest: &str,
        wait: Duration,
    ) -> Result<EdgeBatch, ClientError> {
        let path = format!(
            "/v1/edges/{edge_id}/changes?cursor={cursor}&wait={}&backends={backends_digest}&tls={tls_digest}",
            wait.as_secs()
        );
        // The server may add up to wait/16 of jitter.
        let timeout = wait + wait / 8 + REQUEST_TIMEOUT;
        let (_, bytes) = self
            .request(Method::GET, &path, Some(credential), None, timeout)
            .await?;
        Self::decode("edge feed batch", &bytes)
    }

    pub async fn report(
        &self,
        edge_id: &str,
        credential: &str,
        report: &EdgeReport,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/edges/{edge_id}/report");
        let body = serde_json::to_vec(report).unwrap_or_default();
        self.request(
            Method::POST,
            &path,
            Some(credential),
            Some(body),
            REQUEST_TIMEOUT,
        )
        .await
        .map(|_| ())
    }
}
