//! Sync tests against a real TLS server on loopback that presents `[leaf, CA]` like control:
//! CA pinning by fingerprint, verification against the pinned CA, and how the client classifies
//! answers (errors, 410 Gone, garbled and oversized frames).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::codec::{Encoding, POSTCARD_CONTENT_TYPE, encode};
use outpost_proto::feed::ChangeBatch;
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::node::{Capacity, NodeFacts, RegisterRequest, RegisterResponse, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use super::client::{CallError, ControlClient, Recovery};
use super::pinning::{PinError, fetch_pinned_ca};

/// A canned answer: status, content type, body.
type Answer = (u16, &'static str, Vec<u8>);
type Handler = Arc<dyn Fn(&str) -> Answer + Send + Sync>;

pub(crate) struct Pki {
    pub(crate) ca_der: Vec<u8>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key_der: Vec<u8>,
}

pub(crate) fn pki() -> Pki {
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test control CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    Pki {
        ca_der: ca.der().to_vec(),
        chain: vec![leaf.der().clone(), ca.der().clone()],
        key_der: leaf_key.serialize_der(),
    }
}

/// Serves HTTPS on loopback until the test ends, answering each request with `handler`.
fn serve(pki: &Pki, handler: Handler) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pki.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (config, handler) = (config.clone(), handler.clone());
            std::thread::spawn(move || {
                let tcp = stream;
                tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let Ok(connection) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(connection, tcp);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return, // handshake-only client (pinning) or gone
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let line = text.lines().next().unwrap_or("").to_string();
                // Read the whole body before answering: closing a socket with unread bytes sends
                // a reset, which a slow client (qemu-user) sees before the answer.
                let header_end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                let content_length = text
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while head.len() < header_end + content_length {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, content_type, body) = handler(&line);
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes());
                let _ = tls.write_all(&body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    addr
}

fn fingerprint(der: &[u8]) -> String {
    crate::os::hex(&Sha256::digest(der))
}

fn register_request() -> RegisterRequest {
    RegisterRequest {
        enrollment_token: Some("opt1.x".into()),
        node_credential: None,
        facts: NodeFacts {
            node_id: outpost_proto::name::name("n", "n1").unwrap(),
            hostname: "h".into(),
            arch: "x86_64".into(),
            capacity: Capacity::default(),
            labels: Default::default(),
        },
        wireguard_public_key: None,
        endpoints: Vec::new(),
        wireguard_listen_port: None,
        sealing_public_key: None,
        agent: None,
    }
}

fn register_response() -> Vec<u8> {
    serde_json::to_vec(&RegisterResponse {
        node_id: outpost_proto::name::name("n", "n1").unwrap(),
        node_credential: "opn.n1.secret".into(),
        role: Role::Worker,
        control_url: "https://127.0.0.1".into(),
        gateway_url: String::new(),
        ttl_secs: 30,
        epoch: 1,
        release_public_key: None,
    })
    .unwrap()
}

#[test]
fn pins_the_ca_by_fingerprint_then_verifies_against_it() {
    let pki = pki();
    let addr = serve(
        &pki,
        Arc::new(|_| (200, "application/json", register_response())),
    );
    let url = format!("https://{addr}");
    let ca = fetch_pinned_ca(&url, &fingerprint(&pki.ca_der), Duration::from_secs(5)).unwrap();
    assert_eq!(
        ca, pki.ca_der,
        "the CA (second in the chain) is the pinned certificate"
    );
    let client = ControlClient::new(&url, &ca);
    let response = client.register(&register_request()).unwrap();
    assert_eq!(response.node_credential, "opn.n1.secret");
}

#[test]
fn a_chain_without_the_pinned_ca_is_refused_and_named() {
    let pki = pki();
    let addr = serve(&pki, Arc::new(|_| (200, "application/json", Vec::new())));
    let error = fetch_pinned_ca(
        &format!("https://{addr}"),
        &"ab".repeat(32),
        Duration::from_secs(5),
    )
    .unwrap_err();
    let PinError::NotPresented { presented, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!(presented.len(), 2);
    assert!(presented.contains(&fingerprint(&pki.ca_der)));
}

#[test]
fn a_server_signed_by_another_ca_fails_verification() {
    let (ours, theirs) = (pki(), pki());
    let addr = serve(
        &theirs,
        Arc::new(|_| (200, "application/json", register_response())),
    );
    let client = ControlClient::new(&format!("https://{addr}"), &ours.ca_der);
    let error = client.register(&register_request()).unwrap_err();
    assert!(matches!(error, CallError::Transport(_)), "{error}");
    assert_eq!(error.recovery(), Recovery::Backoff);
}

fn client_for(handler: Handler) -> ControlClient {
    let pki = pki();
    let addr = serve(&pki, handler);
    let mut client = ControlClient::new(&format!("https://{addr}"), &pki.ca_der);
    client.set_credential(Some("opn.n1.secret".into()));
    client
}

#[test]
fn feed_answers_are_decoded_or_classified() {
    let batch = ChangeBatch {
        events: vec![],
        bookmark: Cursor::new(7, 42),
    };
    let good = encode(Encoding::Postcard, &batch);
    let client = client_for(Arc::new(move |line| {
        if line.contains("cursor=0000000000000007.1&") {
            (200, POSTCARD_CONTENT_TYPE, good.clone())
        } else if line.contains("cursor=0000000000000007.2&") {
            (200, POSTCARD_CONTENT_TYPE, vec![0xff; 16])
        } else if line.contains("cursor=0000000000000007.3&") {
            (200, POSTCARD_CONTENT_TYPE, vec![0; FRAME_MAX_BYTES + 1])
        } else if line.contains("cursor=0000000000000007.4&") {
            let gone = r#"{"error":"gone","message":"compacted","snapshot":"/v1/nodes/n1/plan","log_epoch":8,"floor":9}"#;
            (410, "application/json", gone.as_bytes().to_vec())
        } else if line.contains("cursor=0000000000000007.5&") {
            (
                401,
                "application/json",
                br#"{"error":"unauthorized","message":"who are you"}"#.to_vec(),
            )
        } else {
            (
                404,
                "application/json",
                br#"{"error":"not_found","message":"no such node"}"#.to_vec(),
            )
        }
    }));
    let poll = |event_id| client.changes("n1", Cursor::new(7, event_id), 1);
    assert_eq!(poll(1).unwrap(), batch);
    let garbled = poll(2).unwrap_err();
    assert!(
        matches!(&garbled, CallError::Decode(m) if m.contains("postcard")),
        "{garbled}"
    );
    let oversized = poll(3).unwrap_err();
    assert!(
        matches!(&oversized, CallError::Decode(m) if m.contains("limit")),
        "{oversized}"
    );
    let gone = poll(4).unwrap_err();
    assert_eq!(gone.recovery(), Recovery::Snapshot);
    let unauthorized = poll(5).unwrap_err();
    assert_eq!(unauthorized.recovery(), Recovery::Register);
    assert!(unauthorized.to_string().contains("who are you"));
    assert_eq!(poll(6).unwrap_err().recovery(), Recovery::Register);
}
