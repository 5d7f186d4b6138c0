//! The artifact routes: a streaming upload checked against the hash the client declared, the
//! list, removal, and a streaming download with `Range` for nodes (only artifacts an allocation
//! of theirs references) and operators. Nothing here holds a whole file in memory: bytes pass
//! through a small bounded channel between the connection and a blocking thread at the blob
//! store.

use std::collections::BTreeMap;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use outpost_proto::artifact::{check_artifact_name, check_sha256};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::blob::{BlobError, BlobStore};
use super::range::{RangeRequest, parse_range};
use crate::api::auth::{Principal, Scope};
use crate::api::error::ApiError;
use crate::api::extract::{ApiPath, ApiQuery};
use crate::api::{authenticate, header_text};
use crate::app::Control;
use crate::command::Command;
use crate::command::execute::execute;

/// Bytes per chunk read from the blob store for a download.
const DOWNLOAD_CHUNK_BYTES: usize = 64 * 1024;
/// Chunks in flight between the connection and the blob store.
const CHANNEL_CHUNKS: usize = 8;

impl From<BlobError> for ApiError {
    fn from(error: BlobError) -> Self {
        ApiError::internal(error)
    }
}

fn blob_store(control: &Control) -> Result<Arc<dyn BlobStore>, ApiError> {
    control
        .settings
        .artifacts
        .blob_store()
        .ok_or_else(|| ApiError::Unavailable {
            what: "artifact store",
            message: "this control was started without one".into(),
        })
}

fn parse_sha256(text: &str) -> Result<String, ApiError> {
    check_sha256("sha256", text)?;
    Ok(text.to_string())
}

/// What a finished upload hashed to.
struct Received {
    sha256: String,
    size_bytes: u64,
    staged: Box<dyn super::blob::StagedBlob>,
}

/// `PUT /v1/artifacts/{sha256}?name=NAME`: streams the body into the blob store, checks its
/// hash and size, publishes it and records it for the caller's org.
pub async fn upload(
    State(control): State<Arc<Control>>,
    ApiPath(sha256): ApiPath<String>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    principal.require(Scope::ServicesWrite)?;
    let declared = parse_sha256(&sha256)?;
    let name = match query.get("name") {
        Some(name) => {
            check_artifact_name("name", name)?;
            name.clone()
        }
        None => declared[..12].to_string(),
    };
    let max_bytes = control.settings.artifacts.max_bytes;
    let declared_length = match header_text(&headers, header::CONTENT_LENGTH.as_str()) {
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::invalid("content-length", "must be a number", text))?,
        ),
        None => None,
    };
    if let Some(length) = declared_length
        && length > max_bytes
    {
        return Err(too_large(length, max_bytes));
    }
    let store = blob_store(&control)?;
    let received = receive(store, &declared, body, max_bytes).await?;
    if received.sha256 != declared {
        return Err(ApiError::invalid(
            "sha256",
            format!(
                "does not match the body, which hashes to {} over {} bytes; nothing was stored",
                received.sha256, received.size_bytes
            ),
            &declared,
        ));
    }
    if let Some(length) = declared_length
        && length != received.size_bytes
    {
        return Err(ApiError::invalid(
            "content-length",
            format!(
                "the body ended after {} bytes; nothing was stored",
                received.size_bytes
            ),
            length,
        ));
    }
    let size_bytes = received.size_bytes;
    let staged = received.staged;
    crate::app::blocking(move || Ok(staged.publish()?)).await?;
    Ok(execute(
        &control,
        Some(&principal),
        Command::RecordArtifact {
            sha256: declared,
            size_bytes,
            name,
        },
        None,
    )
    .await?
    .into_response())
}

fn too_large(size_bytes: u64, max_bytes: u64) -> ApiError {
    ApiError::ArtifactTooLarge {
        size_bytes,
        max_bytes,
    }
}

/// Streams `body` into a staged blob on a blocking thread, hashing as it goes.
async fn receive(
    store: Arc<dyn BlobStore>,
    declared: &str,
    mut body: Body,
    max_bytes: u64,
) -> Result<Received, ApiError> {
    let (sender, mut receiver) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let declared_owned = declared.to_string();
    let writer = tokio::task::spawn_blocking(move || {
        let mut staged = store.stage(&declared_owned)?;
        let mut hasher = Sha256::new();
        let mut size_bytes = 0u64;
        while let Some(chunk) = receiver.blocking_recv() {
            hasher.update(&chunk);
            size_bytes += chunk.len() as u64;
            staged.write_chunk(&chunk)?;
        }
        Ok::<_, BlobError>(Received {
            sha256: outpost_proto::hash::to_hex(&hasher.finalize()),
            size_bytes,
            staged,
        })
    });
    let mut size_bytes = 0u64;
    let outcome = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Err(error)) => {
                break Err(ApiError::InvalidBody {
                    reason: format!(
                        "the upload broke off after {size_bytes} bytes ({error}); nothing was stored"
                    ),
                    field: Some("body".into()),
                });
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                size_bytes += data.len() as u64;
                if size_bytes > max_bytes {
                    break Err(too_large(size_bytes, max_bytes));
                }
                if sender.send(data).await.is_err() {
                    // The writer stopped: its error is the answer.
                    break Ok(());
                }
            }
        }
    };
    drop(sender);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("artifact writer failed: {e}")))?;
    // On a refusal the staged blob is dropped here, which removes it.
    outcome?;
    Ok(written?)
}

/// `GET /v1/artifacts`: the caller's org's artifacts.
pub async fn list(
    State(control): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let artifacts = control.projector.views().artifacts.list(&org);
    Ok(axum::Json(artifacts).into_response())
}

/// `DELETE /v1/artifacts/{sha256}`.
pub async fn remove(
    State(control): State<Arc<Control>>,
    ApiPath(sha256): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let sha256 = parse_sha256(&sha256)?;
    Ok(execute(
        &control,
        Some(&principal),
        Command::RemoveArtifact { sha256 },
        None,
    )
    .await?
    .into_response())
}

/// May `principal` download `sha256`? Nodes only what an allocation of theirs references, or
/// the agent binary an agent upgrade admitted them to (U2).
fn authorize_download(
    control: &Control,
    principal: &Principal,
    sha256: &str,
) -> Result<(), ApiError> {
    let views = control.projector.views();
    match principal {
        Principal::Node { node_id, org } => {
            let referenced = views.allocations.values().any(|allocation| {
                allocation.node_id == *node_id
                    && allocation
                        .spec
                        .artifact
                        .as_ref()
                        .is_some_and(|artifact| artifact.sha256 == sha256)
            }) || views
                .agent_upgrades
                .offer(org, node_id, None)
                .is_some_and(|upgrade| upgrade.sha256 == sha256);
            if referenced {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "sha256",
                    sha256,
                    format!("no allocation of node {node_id} references artifact {sha256}"),
                ))
            }
        }
        Principal::Operator { .. } => {
            let org = principal.require(Scope::Read)?;
            match views.artifacts.held_by(org, sha256) {
                Some(_) => Ok(()),
                None => Err(crate::audit::not_found_here(
                    control, &views, principal, "artifact", sha256,
                )),
            }
        }
    }
}

/// `GET /v1/artifacts/{sha256}`, with `Range: bytes=START-` to resume.
pub async fn download(
    State(control): State<Arc<Control>>,
    ApiPath(sha256): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let sha256 = parse_sha256(&sha256)?;
    authorize_download(&control, &principal, &sha256)?;
    let store = blob_store(&control)?;
    let range_header = header_text(&headers, header::RANGE.as_str()).map(str::to_string);
    let lookup = Arc::clone(&store);
    let sha = sha256.clone();
    let size_bytes = crate::app::blocking(move || Ok(lookup.size(&sha)?))
        .await?
        .ok_or_else(|| ApiError::NotFound {
            what: "artifact",
            value: sha256.clone(),
        })?;
    let (status, start, length) = match parse_range(range_header.as_deref(), size_bytes) {
        RangeRequest::Whole => (StatusCode::OK, 0, size_bytes),
        RangeRequest::Partial(range) => (
            StatusCode::PARTIAL_CONTENT,
            range.start,
            range.length_bytes(),
        ),
        RangeRequest::NotSatisfiable => {
            return Err(ApiError::RangeNotSatisfiable {
                range: range_header.unwrap_or_default(),
                size_bytes,
            });
        }
    };
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || send_blob(store.as_ref(), &sha256, start, length, sender));
    let mut response = Response::new(Body::new(ChannelBody {
        receiver,
        remaining_bytes: length,
    }));
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) = HeaderValue::from_str(&format!(
            "bytes {start}-{}/{size_bytes}",
            start + length - 1
        ))
    {
        response_headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// Reads `length` bytes of the blob from `start` into the channel; an error ends the body
/// early, which the client sees as a cut download and resumes.
fn send_blob(
    store: &dyn BlobStore,
    sha256: &str,
    start: u64,
    length: u64,
    sender: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut reader = match store.open(sha256, start) {
        Ok(Some(opened)) => opened.reader,
        Ok(None) => {
            let _ = sender.blocking_send(Err(std::io::Error::other(format!(
                "artifact {sha256} vanished"
            ))));
            return;
        }
        Err(error) => {
            let _ = sender.blocking_send(Err(std::io::Error::other(error.to_string())));
            return;
        }
    };
    let mut remaining = length;
    while remaining > 0 {
        let want = DOWNLOAD_CHUNK_BYTES.min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let mut buffer = vec![0u8; want];
        match reader.read(&mut buffer) {
            Ok(0) => {
                let _ = sender.blocking_send(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("artifact {sha256} is shorter than recorded"),
                )));
                return;
            }
            Ok(read) => {
                buffer.truncate(read);
                remaining -= read as u64;
                if sender.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                    return; // the client went away
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return;
            }
        }
    }
}

/// A response body fed by a bounded channel.
struct ChannelBody {
    receiver: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    remaining_bytes: u64,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.remaining_bytes = self.remaining_bytes.saturating_sub(bytes.len() as u64);
                Poll::Ready(Some(Ok(http_body::Frame::data(bytes))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining_bytes)
    }
}
