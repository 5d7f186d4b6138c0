//! D6 end to end: a 403 on heartbeat or on plan makes the real agent register again, and it
//! carries on with the credential that registration gave it.
//!
//! A real `outpost-control` never answers a plain 403 (`forbidden`) to a node's own heartbeat or
//! plan: it answers 403 only when a node credential is used on another node's path
//! (`require_node` / `require_node_or` in control/src/api/auth.rs), which the agent never does
//! (it always calls its own path with its own credential, and registration refuses a credential
//! of another node with 401), or when the node is revoked (403 `node_revoked`: the agent then
//! needs a fresh enrollment token and its status says revoked, which is not the plain
//! re-registration tested here). So these tests run the real agent against [`ForbiddingFake`],
//! a fake control service: real HTTPS (rustls) on 127.0.0.1 with a CA made here by rcgen,
//! pinned through a hand-made enrollment token. It plays the node half of docs/api.md and
//! answers 403 `forbidden` to as many heartbeats or plan requests as the test asks, recording
//! every call it answers.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use outpost_fleet_tests::{AgentProcess, START_TIMEOUT, TestDir, wait_until};
use outpost_proto::codec::{Encoding, POSTCARD_CONTENT_TYPE, encode};
use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::feed::ChangeBatch;
use outpost_proto::plan::Plan;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NODE_ID: &str = "forbidden-edge";
/// The TTL the fake hands out: the agent heartbeats every second (TTL / 3).
const TTL_SECS: u32 = 3;
/// How long the fake holds a feed poll before answering "nothing new".
const POLL_HOLD: Duration = Duration::from_millis(300);

/// One call the fake answered: what, with which bearer, and the status it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    what: &'static str,
    bearer: String,
    status: u16,
}

#[derive(Default)]
struct Script {
    /// Heartbeats and plan requests still to answer with 403.
    forbid_heartbeats: usize,
    forbid_plans: usize,
    /// Credentials issued, one per registration.
    registrations: usize,
    calls: Vec<Call>,
}

/// A fake control service that forbids on request (see the module docs).
struct ForbiddingFake {
    url: String,
    ca_fingerprint: String,
    plan: Plan,
    script: Arc<Mutex<Script>>,
}

impl ForbiddingFake {
    fn start(forbid_heartbeats: usize, forbid_plans: usize) -> Result<Arc<Self>> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_der = ca_params.self_signed(&ca_key)?.der().clone();
        let leaf_key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&leaf_key, &Issuer::new(ca_params, ca_key))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("https://{}", listener.local_addr()?);
        let plan: Plan = serde_json::from_value(json!({
            "node_id": NODE_ID,
            "role": "worker",
            "as_of": {"log_epoch": 0x0f0b_1dde_u64, "event_id": 7},
            "control_url": url,
            "gateway_url": "",
            "ttl_secs": TTL_SECS,
            "epoch": 1,
            "allocations": [],
        }))?;
        let fake = Arc::new(Self {
            url,
            ca_fingerprint: hex(&Sha256::digest(ca_der.as_ref())),
            plan,
            script: Arc::new(Mutex::new(Script {
                forbid_heartbeats,
                forbid_plans,
                ..Script::default()
            })),
        });
        let (config, serving) = (Arc::new(config), Arc::clone(&fake));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, fake) = (Arc::clone(&config), Arc::clone(&serving));
                std::thread::spawn(move || fake.serve(stream, config));
            }
        });
        Ok(fake)
    }

    /// An enrollment token that points at the fake and pins its CA.
    fn enrollment_token(&self) -> String {
        EnrollmentClaims {
            token_id: "forbidding-fake".into(),
            secret: "fake".into(),
            ca_fingerprint: self.ca_fingerprint.clone(),
            control_url: self.url.clone(),
            expires_at_unix: 4_000_000_000,
        }
        .to_token()
    }

    fn calls(&self) -> Vec<Call> {
        self.script.lock().unwrap().calls.clone()
    }

    fn forbid_heartbeats(&self, count: usize) {
        self.script.lock().unwrap().forbid_heartbeats = count;
    }

    /// One request per connection: parse it, answer it, close.
    fn serve(&self, stream: TcpStream, config: Arc<rustls::ServerConfig>) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let Ok(connection) = rustls::ServerConnection::new(config) else {
            return;
        };
        let mut reader = BufReader::new(rustls::StreamOwned::new(connection, stream));
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return; // the agent pinning the CA: a handshake and nothing more
        }
        let (mut body_length, mut bearer) = (0usize, String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or_default();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => body_length = value.trim().parse().unwrap_or(0),
                "authorization" => bearer = value.trim().trim_start_matches("Bearer ").into(),
                _ => {}
            }
        }
        let mut body = vec![0u8; body_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut words = request_line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let (status, content_type, answer) = self.answer(&method, &path, bearer);
        let mut stream = reader.into_inner();
        let head = format!(
            "HTTP/1.1 {status} Fake\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            answer.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&answer);
        stream.conn.send_close_notify();
        let _ = stream.flush();
    }

    fn record(&self, what: &'static str, bearer: String, status: u16) {
        let call = Call {
            what,
            bearer,
            status,
        };
        self.script.lock().unwrap().calls.push(call);
    }

    fn answer(&self, method: &str, path: &str, bearer: String) -> (u16, &'static str, Vec<u8>) {
        let json_answer = |status: u16, value: Value| {
            (status, "application/json", value.to_string().into_bytes())
        };
        let forbidden = |what: &str| {
            json_answer(
                403,
                json!({"error": "forbidden", "message": format!("the fake forbids this {what}")}),
            )
        };
        let own = |suffix: &str| path == format!("/v1/nodes/{NODE_ID}/{suffix}");
        match method {
            "POST" if path == "/v1/nodes/register" => {
                let issued = {
                    let mut script = self.script.lock().unwrap();
                    script.registrations += 1;
                    script.registrations
                };
                self.record("register", bearer, 200);
                json_answer(
                    200,
                    json!({
                        "node_id": NODE_ID,
                        "node_credential": format!("opn.{NODE_ID}.fake-{issued}"),
                        "role": "worker",
                        "control_url": self.url,
                        "gateway_url": "",
                        "ttl_secs": TTL_SECS,
                        "epoch": 1,
                    }),
                )
            }
            "POST" if own("heartbeat") => {
                if take_one(&mut self.script.lock().unwrap().forbid_heartbeats) {
                    self.record("heartbeat", bearer, 403);
                    return forbidden("heartbeat");
                }
                self.record("heartbeat", bearer, 200);
                json_answer(
                    200,
                    json!({"ttl_secs": TTL_SECS, "epoch": 1, "role": "worker"}),
                )
            }
            "GET" if own("plan") => {
                if take_one(&mut self.script.lock().unwrap().forbid_plans) {
                    self.record("plan", bearer, 403);
                    return forbidden("plan request");
                }
                self.record("plan", bearer, 200);
                (
                    200,
                    POSTCARD_CONTENT_TYPE,
                    encode(Encoding::Postcard, &self.plan),
                )
            }
            "GET" if own("changes") => {
                std::thread::sleep(POLL_HOLD);
                let batch = ChangeBatch {
                    events: Vec::new(),
                    bookmark: self.plan.as_of,
                };
                (
                    200,
                    POSTCARD_CONTENT_TYPE,
                    encode(Encoding::Postcard, &batch),
                )
            }
            "POST" if path == "/v1/bootstrap/events" => json_answer(202, json!({"accepted": 0})),
            _ => json_answer(
                404,
                json!({"error": "not_found", "message": format!("the fake has no {method} {path}")}),
            ),
        }
    }
}

/// Decrements `count` when it is above zero; true when it did.
fn take_one(count: &mut usize) -> bool {
    let took = *count > 0;
    *count = count.saturating_sub(1);
    took
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether, after the first 403 answer to `what`, the agent registered again and then had
/// `what` answered 200 with a credential issued by one of those later registrations (not the
/// one that was refused).
fn registered_again_then_succeeded(calls: &[Call], what: &str) -> bool {
    let Some(at) = calls
        .iter()
        .position(|call| call.what == what && call.status == 403)
    else {
        return false;
    };
    let (before, after) = calls.split_at(at + 1);
    let issued_before = before.iter().filter(|call| call.what == "register").count();
    let Some(register) = after.iter().position(|call| call.what == "register") else {
        return false;
    };
    let issued_after = after.iter().filter(|call| call.what == "register").count();
    let new_credentials: Vec<String> = (issued_before + 1..=issued_before + issued_after)
        .map(|number| format!("opn.{NODE_ID}.fake-{number}"))
        .collect();
    after[register + 1..].iter().any(|call| {
        call.what == what && call.status == 200 && new_credentials.contains(&call.bearer)
    })
}

fn start_agent(name: &str, fake: &ForbiddingFake) -> Result<(TestDir, AgentProcess)> {
    let dir = TestDir::new(name)?;
    let agent = AgentProcess::start(
        &dir.path().join("edge"),
        &fake.enrollment_token(),
        &["--node-id", NODE_ID],
    )?;
    Ok((dir, agent))
}

#[test]
fn a_403_on_heartbeat_makes_the_agent_register_again() -> Result<()> {
    let fake = ForbiddingFake::start(0, 0)?;
    let (_dir, mut agent) = start_agent("forbidden-heartbeat", &fake)?;
    let generation = fake.plan.generation();
    agent.wait_for_status("the agent to run the fake's plan", |status| {
        status["plan_generation"].as_str() == Some(generation.as_str())
            && status["control"]["state"] == "connected"
    })?;
    wait_until("a heartbeat to be answered", START_TIMEOUT, || {
        fake.calls()
            .iter()
            .any(|call| call.what == "heartbeat" && call.status == 200)
    })?;
    fake.forbid_heartbeats(1);
    wait_until(
        "a 403 on heartbeat, a new registration, then a heartbeat with the new credential",
        START_TIMEOUT,
        || registered_again_then_succeeded(&fake.calls(), "heartbeat"),
    )?;
    let status = agent.wait_for_status("the agent to be connected again", |status| {
        status["control"]["state"] == "connected" && status["control"]["last_error"].is_null()
    })?;
    assert_eq!(
        status["plan_generation"].as_str(),
        Some(generation.as_str()),
        "the plan is kept across the registration: {status}"
    );
    Ok(())
}

#[test]
fn a_403_on_plan_makes_the_agent_register_again() -> Result<()> {
    let fake = ForbiddingFake::start(0, 1)?;
    let (_dir, mut agent) = start_agent("forbidden-plan", &fake)?;
    wait_until(
        "a 403 on plan, a new registration, then the plan with the new credential",
        START_TIMEOUT,
        || registered_again_then_succeeded(&fake.calls(), "plan"),
    )?;
    let generation = fake.plan.generation();
    agent.wait_for_status("the agent to run the fake's plan", |status| {
        status["plan_generation"].as_str() == Some(generation.as_str())
            && status["control"]["state"] == "connected"
    })?;
    Ok(())
}
