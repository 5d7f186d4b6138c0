//! A download cut in the middle resumes: a test server over real TLS (control's `[leaf, CA]`)
//! that sends half of an artifact and drops the connection, then answers the agent's `Range`
//! request with the rest. The result verifies and unpacks; a server that sends wrong bytes
//! gets the download discarded.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::ArtifactCache;
use super::fetch::ensure;
use crate::link::client::ControlClient;
use crate::link::tls_tests::{Pki, pki};

/// What the fake control does with each request: the `Range` start it saw, and how much of
/// the rest it sends before dropping the connection (`None`: all of it).
struct Script {
    body: Vec<u8>,
    cut_after: Vec<Option<usize>>,
    seen_ranges: Vec<Option<u64>>,
}

fn serve(pki: &Pki, script: Arc<Mutex<Script>>) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                pki.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
            )
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head).to_lowercase();
            let start = text
                .lines()
                .find_map(|l| l.strip_prefix("range: bytes="))
                .and_then(|r| r.trim().trim_end_matches('-').parse::<u64>().ok());
            let mut script = script.lock().unwrap();
            script.seen_ranges.push(start);
            let cut = if script.cut_after.is_empty() {
                None
            } else {
                script.cut_after.remove(0)
            };
            let from = start.unwrap_or(0) as usize;
            let total = script.body.len();
            let rest = script.body[from..].to_vec();
            drop(script);
            let status = if start.is_some() {
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {from}-{}/{total}",
                    total - 1
                )
            } else {
                "200 OK".to_string()
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                rest.len()
            );
            let _ = tls.write_all(answer.as_bytes());
            let sent = cut.unwrap_or(rest.len()).min(rest.len());
            let _ = tls.write_all(&rest[..sent]);
            let _ = tls.flush();
            if cut.is_none() {
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
            // Dropping the stream here closes the TCP connection: for a cut, mid-body.
        }
    });
    addr
}

/// A tar.gz of `bin/app`, big enough that half of it is a real cut.
fn archive() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let content: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut header = tar::Header::new_gnu();
    header.set_path("bin/app").unwrap();
    header.set_size(content.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    builder.append(&header, &content[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn a_download_cut_in_the_middle_resumes_and_verifies() {
    let pki = pki();
    let body = archive();
    let sha256 = outpost_proto::hash::sha256_hex(&body);
    let half = body.len() / 2;
    let script = Arc::new(Mutex::new(Script {
        body: body.clone(),
        cut_after: vec![Some(half), Some(1000)],
        seen_ranges: Vec::new(),
    }));
    let addr = serve(&pki, script.clone());
    let client = ControlClient::new(&format!("https://127.0.0.1:{}", addr.port()), &pki.ca_der);
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(dir.path());

    let report = ensure(&cache, &client, &sha256).unwrap();
    assert_eq!(report.resumed, 2, "{report:?}");
    assert_eq!(report.received_bytes, body.len() as u64, "{report:?}");
    let ranges = script.lock().unwrap().seen_ranges.clone();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], None);
    // Each resumption starts where the file ended: never from zero.
    let first_resume = ranges[1].unwrap();
    assert!(
        first_resume > 0 && first_resume <= half as u64,
        "{ranges:?}"
    );
    assert!(ranges[2].unwrap() > first_resume, "{ranges:?}");
    assert!(cache.is_ready(&sha256));
    cache.verify(&sha256).unwrap();
    assert_eq!(
        std::fs::metadata(cache.dir(&sha256).join("bin/app"))
            .unwrap()
            .len(),
        800_000
    );
    assert!(!cache.partial_path(&sha256).exists());
}

#[test]
fn bytes_that_do_not_hash_to_the_plan_are_discarded_and_never_unpacked() {
    let pki = pki();
    let body = archive();
    let claimed = outpost_proto::hash::sha256_hex(b"what the plan names");
    let script = Arc::new(Mutex::new(Script {
        body,
        cut_after: Vec::new(),
        seen_ranges: Vec::new(),
    }));
    let addr = serve(&pki, script);
    let client = ControlClient::new(&format!("https://127.0.0.1:{}", addr.port()), &pki.ca_der);
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(dir.path());
    let error = ensure(&cache, &client, &claimed).unwrap_err();
    assert!(error.to_string().contains("hashes to"), "{error}");
    assert!(!cache.is_ready(&claimed));
    assert!(!cache.partial_path(&claimed).exists());
}
