//! The edge's byte-level paths against real processes (E2): TLS by SNI passed through to a
//! backend that speaks TLS itself, the PROXY v2 header toward a backend that refuses
//! connections without one, and PROXY headers accepted from an upstream load balancer — with
//! malformed headers, garbage and a slowloris client refused while other clients are served.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use outpost_fleet_tests::edge::{
    EdgeProcess, apply_route, backend_service, fleet, http_exchange, http_get, wait_for_answer,
};

fn route_with(name: &str, host: &str, extra: serde_json::Value) -> String {
    let mut route = serde_json::json!({
        "name": name,
        "hosts": [host],
        "service": name,
        "port": "http",
        "health": {"interval_ms": 200, "timeout_ms": 500, "unhealthy_after": 2, "healthy_after": 2}
    });
    if let (Some(route), Some(extra)) = (route.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            route.insert(key.clone(), value.clone());
        }
    }
    route.to_string()
}

#[test]
fn tls_is_passed_through_by_sni_to_a_backend_that_terminates_it() -> Result<()> {
    let fleet = fleet("edge-sni")?;
    let certified = rcgen::generate_simple_self_signed(vec!["secure.test".to_string()])?;
    let cert = fleet.dir.write("backend.crt", &certified.cert.pem())?;
    let key = fleet
        .dir
        .write("backend.key", &certified.signing_key.serialize_pem())?;
    fleet.control.apply_services(&backend_service(
        "secure",
        1,
        &fleet.script,
        &[
            ("BACKEND_TLS_CERT", cert.to_str().unwrap()),
            ("BACKEND_TLS_KEY", key.to_str().unwrap()),
        ],
    ))?;
    apply_route(
        &fleet.control,
        &route_with(
            "secure",
            "secure.test",
            serde_json::json!({"tls": "passthrough"}),
        ),
    )?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let fetch = || -> Result<String> {
        let name = rustls::pki_types::ServerName::try_from("secure.test")?;
        let connection = rustls::ClientConnection::new(Arc::clone(&config), name)?;
        let stream = TcpStream::connect(edge.https)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = BufReader::new(rustls::StreamOwned::new(connection, stream));
        let answer = http_exchange(&mut tls, "secure.test", "/")?;
        anyhow::ensure!(answer.status == 200, "{answer:?}");
        Ok(answer.body)
    };
    // The backend's own certificate verifies end to end: the edge never touched the TLS.
    let body = outpost_fleet_tests::wait_for(
        "TLS through the edge",
        outpost_fleet_tests::START_TIMEOUT,
        || fetch().ok(),
    )
    .with_context(|| edge.guard.log_tail())?;
    assert!(body.starts_with("hello from secure-"), "{body}");
    // Plain HTTP for a passthrough route is refused with a clear answer.
    let plain = http_get(edge.http, "secure.test", "/")?;
    assert_eq!(plain.status, 421, "{plain:?}");
    Ok(())
}

#[test]
fn the_proxy_v2_header_reaches_a_backend_that_requires_it() -> Result<()> {
    let fleet = fleet("edge-ppv2")?;
    fleet.control.apply_services(&backend_service(
        "strict",
        1,
        &fleet.script,
        &[("BACKEND_REQUIRE_PROXY", "v2")],
    ))?;
    apply_route(
        &fleet.control,
        &route_with(
            "strict",
            "strict.test",
            serde_json::json!({"proxy_protocol": "v2",
                "health": {"http": {"path": "/healthz"}, "interval_ms": 200, "timeout_ms": 500,
                           "unhealthy_after": 2, "healthy_after": 2}}),
        ),
    )?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )?;
    // The backend closes any connection without a v2 header, health checks included: an
    // answer at all means the header arrived, and it names the client's address.
    let body = wait_for_answer(
        &edge,
        "strict.test",
        "strict.test to answer through the edge",
    )?;
    assert!(body.contains("proxy=127.0.0.1:"), "{body}");
    Ok(())
}

#[test]
fn proxy_headers_from_upstream_are_read_and_bad_clients_are_refused() -> Result<()> {
    let fleet = fleet("edge-upstream")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    apply_route(
        &fleet.control,
        &route_with("web", "shop.test", serde_json::json!({})),
    )?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--accept-proxy-protocol"],
    )?;
    let through_upstream = |header: &[u8]| -> Result<String> {
        let stream = TcpStream::connect(edge.http)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(header)?;
        let answer = http_exchange(&mut stream, "shop.test", "/")?;
        anyhow::ensure!(answer.status == 200, "{answer:?}");
        Ok(answer.body)
    };
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n";
    let body = outpost_fleet_tests::wait_for(
        "an answer through a v1 upstream",
        outpost_fleet_tests::START_TIMEOUT,
        || through_upstream(v1).ok(),
    )
    .with_context(|| edge.guard.log_tail())?;
    assert!(body.contains("xff=203.0.113.9"), "{body}");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 7, 127, 0, 0, 1, 0x1f, 0x90, 0, 80]);
    let body = through_upstream(&v2)?;
    assert!(body.contains("xff=198.51.100.7"), "{body}");

    // A malformed header, plain garbage and a request without a header are closed unanswered.
    for bad in [
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n".as_slice(),
        b"\x16\x03\x01garbage garbage garbage".as_slice(),
        b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n".as_slice(),
    ] {
        let mut stream = TcpStream::connect(edge.http)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(bad)?;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            answer.is_empty(),
            "{bad:?} got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // A slowloris client (one byte, then silence) is cut off, and others are served meanwhile.
    let mut slow = TcpStream::connect(edge.http)?;
    slow.set_read_timeout(Some(Duration::from_secs(30)))?;
    slow.write_all(b"P")?;
    let body = through_upstream(v1)?;
    assert!(body.contains("xff=203.0.113.9"), "{body}");
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "the slow client was closed: {closed:?}"
    );
    Ok(())
}

/// A TLS client that trusts only `trusted`, sending SNI `server_name` and `Host: host`.
fn tls_get(
    edge: &EdgeProcess,
    trusted: &rcgen::CertifiedKey<rcgen::KeyPair>,
    server_name: &str,
    host: &str,
) -> Result<outpost_fleet_tests::edge::HttpAnswer> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let connection = rustls::ClientConnection::new(config, name)?;
    let stream = TcpStream::connect(edge.https)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = BufReader::new(rustls::StreamOwned::new(connection, stream));
    http_exchange(&mut tls, host, "/")
}

fn set_tls_secret(
    fleet: &outpost_fleet_tests::edge::Fleet,
    name: &str,
    certified: &rcgen::CertifiedKey<rcgen::KeyPair>,
    with_cert: bool,
) -> Result<()> {
    let key = fleet.dir.write(
        &format!("{name}.key"),
        &certified.signing_key.serialize_pem(),
    )?;
    let cert = fleet
        .dir
        .write(&format!("{name}.crt"), &certified.cert.pem())?;
    let key_arg = format!("key={}", key.display());
    let cert_arg = format!("cert={}", cert.display());
    let mut args = vec!["secrets", "set", name, "--from-file", &key_arg];
    if with_cert {
        args.extend(["--from-file", &cert_arg]);
    }
    fleet
        .control
        .outpostctl(&args)?
        .expect_success("outpostctl secrets set")?;
    Ok(())
}

/// The base64 body of a PEM key (its first full line): what would show if it were on disk.
fn pem_marker(certified: &rcgen::CertifiedKey<rcgen::KeyPair>) -> String {
    certified
        .signing_key
        .serialize_pem()
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn tls_is_terminated_with_the_certificate_the_sni_names_and_its_key_never_reaches_disk()
-> Result<()> {
    let fleet = fleet("edge-tls")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    let alpha = rcgen::generate_simple_self_signed(vec!["alpha.test".to_string()])?;
    let beta = rcgen::generate_simple_self_signed(vec!["beta.test".to_string()])?;
    set_tls_secret(&fleet, "alpha-tls", &alpha, true)?;
    set_tls_secret(&fleet, "beta-tls", &beta, true)?;
    set_tls_secret(&fleet, "key-only", &alpha, false)?;
    let terminate = |name: &str, host: &str, secret: &str| {
        route_with(
            name,
            host,
            serde_json::json!({"service": "web", "tls": "terminate", "tls_secret": secret}),
        )
    };
    // A tls_secret without cert and key, or one that does not exist, is refused by name.
    for (secret, reason) in [("key-only", "no key cert"), ("nowhere", "no secret")] {
        let refused = fleet
            .control
            .outpostctl_with(
                &["routes", "apply", "-f", "-"],
                &[],
                Some(&terminate("bad", "bad.test", secret)),
            )?
            .expect_failure("a route whose tls_secret lacks cert and key")?;
        assert!(
            refused.stderr.contains(secret) && refused.stderr.contains(reason),
            "{}",
            refused.stderr
        );
    }
    apply_route(
        &fleet.control,
        &terminate("alpha", "alpha.test", "alpha-tls"),
    )?;
    apply_route(&fleet.control, &terminate("beta", "beta.test", "beta-tls"))?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )?;
    // Each SNI gets its own certificate: a client trusting only that one verifies it.
    for (certified, host) in [(&alpha, "alpha.test"), (&beta, "beta.test")] {
        let body = outpost_fleet_tests::wait_for(
            "TLS terminated by the edge",
            outpost_fleet_tests::START_TIMEOUT,
            || {
                tls_get(&edge, certified, host, host)
                    .ok()
                    .filter(|a| a.status == 200)
                    .map(|a| a.body)
            },
        )
        .with_context(|| edge.guard.log_tail())?;
        assert!(body.starts_with("hello from web-"), "{body}");
        assert!(body.contains(&format!("host={host}")), "{body}");
    }
    assert!(
        tls_get(&edge, &beta, "alpha.test", "alpha.test").is_err(),
        "alpha.test must not be answered with beta's certificate"
    );
    // One TLS connection serves only its SNI's route; plain HTTP is sent to https.
    let crossed = tls_get(&edge, &alpha, "alpha.test", "beta.test")?;
    assert_eq!(crossed.status, 421, "{crossed:?}");
    let plain = http_get(edge.http, "alpha.test", "/x?y=1")?;
    assert_eq!(plain.status, 308, "{plain:?}");
    assert!(
        plain
            .body
            .contains(&format!("https://alpha.test:{}/x?y=1", edge.https.port())),
        "{plain:?}"
    );

    // A new version of the secret is served without a restart.
    let renewed = rcgen::generate_simple_self_signed(vec!["alpha.test".to_string()])?;
    set_tls_secret(&fleet, "alpha-tls", &renewed, true)?;
    outpost_fleet_tests::wait_for(
        "the renewed certificate",
        outpost_fleet_tests::START_TIMEOUT,
        || {
            tls_get(&edge, &renewed, "alpha.test", "alpha.test")
                .ok()
                .filter(|a| a.status == 200)
        },
    )
    .with_context(|| edge.guard.log_tail())?;

    // A secret leaves the edge when no route references it.
    fleet
        .control
        .outpostctl(&["routes", "rm", "beta"])?
        .expect_success("outpostctl routes rm beta")?;
    // Route changes are audited: each event names the operator token that made it.
    let events = fleet.control.aggregate_events("route/beta")?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["RouteDefined", "RouteDeleted"], "{events:?}");
    for event in &events {
        let actor = event["data"]["actor"].as_str().unwrap_or_default();
        assert!(actor.starts_with("opa."), "{event}");
    }
    let status = outpost_fleet_tests::wait_for(
        "beta-tls to leave the edge",
        outpost_fleet_tests::START_TIMEOUT,
        || {
            edge.status().ok().filter(|s| {
                let held = s["status"]["tls_secrets"].to_string();
                !held.contains("beta-tls") && held.contains("alpha-tls@v2")
            })
        },
    )?;
    assert_eq!(
        status["status"]["tls_problems"],
        serde_json::json!([]),
        "{status}"
    );
    assert!(tls_get(&edge, &beta, "beta.test", "beta.test").is_err());

    // The private keys were never written in the clear under the edge's data dir.
    let markers = [pem_marker(&alpha), pem_marker(&beta), pem_marker(&renewed)];
    for file in files_under(&edge.data_dir) {
        let bytes = std::fs::read(&file)?;
        let text = String::from_utf8_lossy(&bytes);
        for marker in &markers {
            assert!(
                !text.contains(marker.as_str()),
                "{} holds a private key in the clear",
                file.display()
            );
        }
    }
    Ok(())
}
