//! In-process API tests of delivery (R1, R2): artifact upload, listing, download with Range,
//! removal, the artifact check of service specs, release history and rollback, and every bad
//! input the issue names. Real router, core and projector over the in-memory store, with the
//! directory blob store in a temp dir; upload, download, hash check, truncation and size limit
//! run again on the S3 blob store (moto, the S3 fake) and must behave the same.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};

use super::{Harness, Reply, harness_configured, settings};
use crate::artifact::s3::tests::MotoServer;
use crate::artifact::{ArtifactConfig, BlobStoreConfig};

struct Delivery {
    h: Harness,
    dir: tempfile::TempDir,
    /// With the S3 store: the bucket, and moto serving it.
    s3: Option<(crate::artifact::s3::S3BlobStore, MotoServer)>,
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Directory,
    S3,
}

async fn delivery(max_bytes: u64) -> Delivery {
    delivery_on(Backend::Directory, max_bytes).await
}

async fn delivery_on(backend: Backend, max_bytes: u64) -> Delivery {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings();
    let (store, s3) = match backend {
        Backend::Directory => (BlobStoreConfig::Directory(dir.path().to_path_buf()), None),
        Backend::S3 => {
            let moto = MotoServer::start();
            let config = moto.config("delivery");
            let store = crate::artifact::s3::S3BlobStore::new(&config).unwrap();
            (BlobStoreConfig::S3(config), Some((store, moto)))
        }
    };
    settings.artifacts = ArtifactConfig { store, max_bytes };
    Delivery {
        h: harness_configured(settings).await,
        dir,
        s3,
    }
}

fn sha(bytes: &[u8]) -> String {
    outpost_proto::hash::sha256_hex(bytes)
}

impl Delivery {
    async fn push_as(&self, declared: &str, body: Body, length: Option<u64>) -> Reply {
        let mut request = Request::builder()
            .method("PUT")
            .uri(format!("/v1/artifacts/{declared}?name=app.tar"))
            .header("authorization", format!("Bearer {}", self.h.admin));
        if let Some(length) = length {
            request = request.header("content-length", length.to_string());
        }
        self.h.send(request.body(body).unwrap()).await
    }

    async fn push(&self, bytes: &[u8]) -> String {
        let reply = self
            .push_as(
                &sha(bytes),
                Body::from(bytes.to_vec()),
                Some(bytes.len() as u64),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        assert_eq!(reply.json()["size_bytes"], bytes.len());
        sha(bytes)
    }

    /// What the blob store holds: published blobs and leftover staging (S3: objects and open
    /// multipart uploads).
    fn stored_files(&self) -> Vec<String> {
        if let Some((store, _)) = &self.s3 {
            return store
                .stored_keys()
                .into_iter()
                .map(|key| key.replace("outpost/", ""))
                .collect();
        }
        let mut found = Vec::new();
        for folder in ["blobs", "staging"] {
            if let Ok(entries) = std::fs::read_dir(self.dir.path().join(folder)) {
                for entry in entries.flatten() {
                    found.push(format!("{folder}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        found
    }

    async fn listed(&self) -> Vec<Value> {
        let reply = self
            .h
            .call("GET", "/v1/artifacts", Some(&self.h.admin), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json().as_array().unwrap().clone()
    }

    async fn get(&self, sha256: &str, token: &str, range: Option<&str>) -> Reply {
        let mut request = Request::builder()
            .method("GET")
            .uri(format!("/v1/artifacts/{sha256}"))
            .header("authorization", format!("Bearer {token}"));
        if let Some(range) = range {
            request = request.header("range", range);
        }
        self.h.send(request.body(Body::empty()).unwrap()).await
    }
}

/// A body that yields some bytes, then fails like a dropped connection.
struct BrokenBody {
    sent: bool,
}

impl http_body::Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.sent {
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ))));
        }
        self.sent = true;
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            b"first half",
        )))))
    }
}

#[tokio::test]
async fn an_artifact_is_pushed_listed_and_downloaded_whole_or_from_an_offset() {
    pushed_listed_downloaded(Backend::Directory).await;
}

#[tokio::test]
async fn an_artifact_is_pushed_listed_and_downloaded_whole_or_from_an_offset_on_s3() {
    pushed_listed_downloaded(Backend::S3).await;
}

async fn pushed_listed_downloaded(backend: Backend) {
    let d = delivery_on(backend, 1 << 20).await;
    let bytes = b"#!/bin/sh\necho v1\n".to_vec();
    let sha256 = d.push(&bytes).await;
    let listed = d.listed().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sha256"], sha256.as_str());
    assert_eq!(listed[0]["name"], "app.tar");
    assert_eq!(d.stored_files(), vec![format!("blobs/{sha256}")]);
    // Pushing the same bytes again stores nothing new.
    d.push(&bytes).await;
    assert_eq!(d.listed().await.len(), 1);

    let whole = d.get(&sha256, &d.h.admin, None).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.bytes, bytes);
    let rest = d.get(&sha256, &d.h.admin, Some("bytes=10-")).await;
    assert_eq!(rest.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(rest.bytes, bytes[10..]);
    assert_eq!(
        rest.headers["content-range"],
        format!("bytes 10-{}/{}", bytes.len() - 1, bytes.len())
    );
    let past = d.get(&sha256, &d.h.admin, Some("bytes=999-")).await;
    Harness::assert_refused(
        &past,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        "range",
        "bytes=999-",
    );
}

#[tokio::test]
async fn a_body_that_does_not_match_its_declared_hash_stores_nothing() {
    hash_mismatch(Backend::Directory).await;
}

#[tokio::test]
async fn a_body_that_does_not_match_its_declared_hash_stores_nothing_on_s3() {
    hash_mismatch(Backend::S3).await;
}

async fn hash_mismatch(backend: Backend) {
    let d = delivery_on(backend, 1 << 20).await;
    let declared = sha(b"what the client hashed");
    let reply = d
        .push_as(&declared, Body::from(&b"something else"[..]), None)
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "sha256",
        &declared,
    );
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains(&sha(b"something else"))
    );
    assert!(d.listed().await.is_empty());
    assert!(d.stored_files().is_empty(), "{:?}", d.stored_files());

    let reply = d.push_as("not-a-hash", Body::from(&b"x"[..]), None).await;
    Harness::assert_refused(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "sha256",
        "not-a-hash",
    );
}

#[tokio::test]
async fn truncated_and_oversized_uploads_store_nothing() {
    truncated_oversized(Backend::Directory).await;
}

#[tokio::test]
async fn truncated_and_oversized_uploads_store_nothing_on_s3() {
    truncated_oversized(Backend::S3).await;
}

async fn truncated_oversized(backend: Backend) {
    let d = delivery_on(backend, 16).await;
    // Declared longer than what arrives.
    let bytes = b"short body";
    let reply = d
        .push_as(&sha(bytes), Body::from(&bytes[..]), Some(100))
        .await;
    assert!(reply.status.is_client_error(), "{}", reply.json());
    // A connection that breaks off.
    let reply = d
        .push_as(
            &sha(b"first half and more"),
            Body::new(BrokenBody { sent: false }),
            None,
        )
        .await;
    let body = Harness::assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_body");
    assert!(
        body["message"].as_str().unwrap().contains("after 10 bytes"),
        "{body}"
    );
    // Over --artifact-max-bytes, declared up front or found while streaming.
    let big = vec![7u8; 17];
    let reply = d
        .push_as(&sha(&big), Body::from(big.clone()), Some(17))
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "artifact_too_large",
        "size_bytes",
        "17",
    );
    let reply = d.push_as(&sha(&big), Body::from(big.clone()), None).await;
    Harness::assert_refused(
        &reply,
        StatusCode::PAYLOAD_TOO_LARGE,
        "artifact_too_large",
        "size_bytes",
        "17",
    );
    assert!(d.listed().await.is_empty());
    assert!(d.stored_files().is_empty(), "{:?}", d.stored_files());
}

fn app_spec(sha256: &str, args: &[&str]) -> Value {
    json!({"name": "app", "command": "bin/app", "args": args, "artifact": {"sha256": sha256}})
}

#[tokio::test]
async fn specs_name_known_artifacts_and_stay_inside_them() {
    let d = delivery(1 << 20).await;
    let unknown = sha(b"never pushed");
    let reply = d.h.define(app_spec(&unknown, &[])).await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
        "artifact.sha256",
        &unknown,
    );
    let sha256 = d.push(b"v1").await;
    let mut escaping = app_spec(&sha256, &[]);
    escaping["command"] = json!("../../bin/sh");
    let reply = d.h.define(escaping).await;
    Harness::assert_refused(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "command",
        "../../bin/sh",
    );
    let mut bad_policy = app_spec(&sha256, &[]);
    bad_policy["rollout"] = json!({"max_parallel": 0, "health_deadline_secs": 30});
    let reply = d.h.define(bad_policy).await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
        "rollout.max_parallel",
        "0",
    );
    let mut bad_deadline = app_spec(&sha256, &[]);
    bad_deadline["rollout"] = json!({"max_parallel": 1, "health_deadline_secs": 999999});
    let reply = d.h.define(bad_deadline).await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
        "rollout.health_deadline_secs",
        "999999",
    );
    let reply = d.h.define(app_spec(&sha256, &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["service"]["release"], 1);
}

#[tokio::test]
async fn nodes_download_only_what_their_allocations_reference() {
    let d = delivery(1 << 20).await;
    let n1 = d.h.enroll("n1", 1024).await;
    let sha256 = d.push(b"v1 bytes").await;
    let other = d.push(b"other bytes").await;
    let reply = d.get(&sha256, &n1, None).await;
    Harness::assert_refused(
        &reply,
        StatusCode::FORBIDDEN,
        "forbidden",
        "sha256",
        &sha256,
    );
    let reply = d.h.define(app_spec(&sha256, &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    d.h.settled().await;
    super::eventually("the allocation on n1", || async {
        d.h.allocations_on("n1").await == 1
    })
    .await;
    let reply = d.get(&sha256, &n1, Some("bytes=3-")).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(reply.bytes, b"bytes");
    let reply = d.get(&other, &n1, None).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn releases_are_numbered_listed_and_rolled_back() {
    let d = delivery(1 << 20).await;
    let v1 = d.push(b"v1").await;
    let v2 = d.push(b"v2").await;
    for (sha256, expected) in [(&v1, 1), (&v1, 1), (&v2, 2)] {
        let reply = d.h.define(app_spec(sha256, &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        assert_eq!(reply.json()["service"]["release"], expected);
    }
    let history =
        d.h.call("GET", "/v1/services/app/releases", Some(&d.h.admin), None)
            .await;
    let releases = history.json();
    let releases = releases.as_array().unwrap();
    assert_eq!(releases.len(), 2, "an unchanged spec is not a release");
    assert_eq!(releases[1]["current"], true);
    assert_eq!(releases[0]["artifact_sha256"], v1.as_str());

    // The artifact of any release stays while the service exists.
    let reply =
        d.h.call(
            "DELETE",
            &format!("/v1/artifacts/{v1}"),
            Some(&d.h.admin),
            None,
        )
        .await;
    let body = Harness::assert_error(&reply, StatusCode::CONFLICT, "in_use");
    assert!(
        body["message"].as_str().unwrap().contains("service app"),
        "{body}"
    );

    let reply =
        d.h.call(
            "POST",
            "/v1/services/app/rollback",
            Some(&d.h.admin),
            Some(json!({"to": 9})),
        )
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
        "to",
        "9",
    );
    let reply =
        d.h.call(
            "POST",
            "/v1/services/app/rollback",
            Some(&d.h.admin),
            Some(json!({"to": "one"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply =
        d.h.call("POST", "/v1/services/app/rollback", Some(&d.h.admin), None)
            .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["service"]["release"], 3);
    assert_eq!(
        reply.json()["service"]["spec"]["artifact"]["sha256"],
        v1.as_str()
    );

    let reply =
        d.h.call("DELETE", "/v1/services/app", Some(&d.h.admin), None)
            .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    d.h.settled().await;
    let reply =
        d.h.call(
            "DELETE",
            &format!("/v1/artifacts/{v1}"),
            Some(&d.h.admin),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(d.stored_files(), vec![format!("blobs/{v2}")]);
    let reply =
        d.h.call(
            "DELETE",
            &format!("/v1/artifacts/{v1}"),
            Some(&d.h.admin),
            None,
        )
        .await;
    Harness::assert_refused(&reply, StatusCode::NOT_FOUND, "not_found", "artifact", &v1);
}
