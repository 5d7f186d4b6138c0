//! Bad input from control: the real agent, fed a garbled frame, an oversized frame, a plan that
//! fails verification, a plan for another node and a plan that cannot be applied, keeps its
//! last-good plan and its running workload, and reports the error in its status.
//!
//! The real control never sends such input, so these tests run the agent against
//! [`FakeControl`], a fake that stands in for a misbehaving control service: real HTTPS
//! (rustls) on 127.0.0.1 with a CA made here by rcgen, pinned through a hand-made enrollment
//! token, speaking the node half of docs/api.md. It first serves a good registration and plan,
//! then whatever bad answer the test asks for.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_fleet_tests::{
    AgentProcess, StopMode, TestDir, agent_status, allocation_pids, process_alive,
    status_running_pids,
};
use outpost_proto::codec::{Encoding, POSTCARD_CONTENT_TYPE, encode};
use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::feed::ChangeBatch;
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::plan::Plan;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NODE_ID: &str = "fake-edge";
const LOG_EPOCH: u64 = 0x00c0_ffee;
/// How long a healthy feed poll is held open, like control's long poll (but short).
const HEALTHY_POLL_HOLD: Duration = Duration::from_millis(500);

/// What the fake answers to feed polls.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Behaviour {
    /// Holds the poll briefly, then answers "nothing new" at the good plan's cursor.
    Healthy,
    /// `200` with the postcard content type and bytes that are no change batch.
    GarbledFrame,
    /// `200` with a frame one byte over `FRAME_MAX_BYTES`.
    OversizedFrame,
    /// `410 Gone`, then these bytes (a postcard plan) as the snapshot.
    GoneThenPlan(Vec<u8>),
}

struct FakeState {
    behaviour: Behaviour,
    good_plan: Plan,
    /// Answers served, by kind.
    served: BTreeMap<&'static str, usize>,
}

/// A fake control service for bad-input tests (see the module docs).
struct FakeControl {
    url: String,
    ca_fingerprint: String,
    state: Arc<Mutex<FakeState>>,
}

/// A request as the fake sees it.
struct Request {
    method: String,
    target: String,
}

/// An answer: status, content type, body.
type Answer = (u16, &'static str, Vec<u8>);

impl FakeControl {
    /// Generates a CA and a server certificate for 127.0.0.1 and serves until the test ends.
    fn start(good_plan: Plan) -> Result<Self> {
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fake control CA");
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let tls = Arc::new(tls);

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("https://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(FakeState {
            behaviour: Behaviour::Healthy,
            good_plan,
            served: BTreeMap::new(),
        }));
        let shared = Arc::clone(&state);
        let own_url = url.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (tls, state, url) = (Arc::clone(&tls), Arc::clone(&shared), own_url.clone());
                std::thread::spawn(move || serve_connection(stream, tls, &state, &url));
            }
        });
        Ok(Self {
            url,
            ca_fingerprint: Sha256::digest(ca.der())
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect(),
            state,
        })
    }

    /// An enrollment token that points at the fake and pins its CA.
    fn enrollment_token(&self) -> String {
        EnrollmentClaims {
            token_id: "fake-token".into(),
            secret: "fake-secret".into(),
            ca_fingerprint: self.ca_fingerprint.clone(),
            control_url: self.url.clone(),
            expires_at_unix: 4_000_000_000,
        }
        .to_token()
    }

    fn behave(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = behaviour;
    }

    fn served(&self, kind: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .served
            .get(kind)
            .copied()
            .unwrap_or(0)
    }
}

/// One HTTPS connection: reads one request (head and body), answers it, closes.
fn serve_connection(
    stream: std::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    state: &Mutex<FakeState>,
    url: &str,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(connection) = rustls::ServerConnection::new(tls) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        match tls.read(&mut buffer) {
            // A handshake-only client (the agent pinning the CA) or one that went away.
            Ok(0) | Err(_) => return,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_string();
    let body_length: usize = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + body_length {
        match tls.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
        }
    }
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let request = Request {
        method: request_line.next().unwrap_or_default().to_string(),
        target: request_line.next().unwrap_or_default().to_string(),
    };
    let (status, content_type, body) = answer(&request, state, url);
    let head = format!(
        "HTTP/1.1 {status} Fake\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(&body);
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn json_answer(status: u16, value: Value) -> Answer {
    (status, "application/json", value.to_string().into_bytes())
}

fn count(state: &Mutex<FakeState>, kind: &'static str) {
    *state.lock().unwrap().served.entry(kind).or_default() += 1;
}

/// The node half of docs/api.md, as this fake control plays it.
fn answer(request: &Request, state: &Mutex<FakeState>, url: &str) -> Answer {
    let path = request.target.split('?').next().unwrap_or_default();
    let node_path = format!("/v1/nodes/{NODE_ID}");
    match (request.method.as_str(), path) {
        ("POST", "/v1/nodes/register") => {
            count(state, "register");
            json_answer(
                200,
                json!({
                    "node_id": NODE_ID,
                    "node_credential": format!("opn.{NODE_ID}.fake"),
                    "role": "worker",
                    "control_url": url,
                    "gateway_url": "",
                    "ttl_secs": 60,
                    "epoch": 1,
                }),
            )
        }
        ("POST", "/v1/bootstrap/events") => json_answer(202, json!({"accepted": 1})),
        ("POST", path) if path == format!("{node_path}/heartbeat") => {
            count(state, "heartbeat");
            json_answer(200, json!({"ttl_secs": 60, "epoch": 1, "role": "worker"}))
        }
        ("GET", path) if path == format!("{node_path}/plan") => plan_answer(state),
        ("GET", path) if path == format!("{node_path}/changes") => changes_answer(state),
        _ => json_answer(
            404,
            json!({"error": "not_found", "message": format!("the fake has no {path}")}),
        ),
    }
}

fn plan_answer(state: &Mutex<FakeState>) -> Answer {
    let state_now = state.lock().unwrap();
    let body = match &state_now.behaviour {
        Behaviour::GoneThenPlan(bytes) => bytes.clone(),
        _ => encode(Encoding::Postcard, &state_now.good_plan),
    };
    drop(state_now);
    count(state, "plan");
    (200, POSTCARD_CONTENT_TYPE, body)
}

fn changes_answer(state: &Mutex<FakeState>) -> Answer {
    let held_until = Instant::now() + HEALTHY_POLL_HOLD;
    loop {
        let behaviour = state.lock().unwrap().behaviour.clone();
        match behaviour {
            Behaviour::Healthy if Instant::now() < held_until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Behaviour::Healthy => {
                count(state, "healthy poll");
                let bookmark = state.lock().unwrap().good_plan.as_of;
                let batch = ChangeBatch {
                    events: Vec::new(),
                    bookmark,
                };
                return (
                    200,
                    POSTCARD_CONTENT_TYPE,
                    encode(Encoding::Postcard, &batch),
                );
            }
            Behaviour::GarbledFrame => {
                count(state, "garbled frame");
                let garbage = (0..64u8).map(|byte| byte.wrapping_mul(37) | 0x80).collect();
                return (200, POSTCARD_CONTENT_TYPE, garbage);
            }
            Behaviour::OversizedFrame => {
                count(state, "oversized frame");
                return (200, POSTCARD_CONTENT_TYPE, vec![0; FRAME_MAX_BYTES + 1]);
            }
            Behaviour::GoneThenPlan(_) => {
                count(state, "gone");
                return json_answer(
                    410,
                    json!({
                        "error": "gone",
                        "message": "the fake says this cursor is gone",
                        "snapshot": format!("/v1/nodes/{NODE_ID}/plan"),
                        "log_epoch": LOG_EPOCH,
                        "floor": 1,
                    }),
                );
            }
        }
    }
}

/// A plan for `node` with `allocations` (id, command), at cursor `LOG_EPOCH.event_id`. Built
/// from JSON so fields added to the contract later take their defaults.
fn plan(node: &str, event_id: u64, allocations: &[(String, &str)]) -> Plan {
    let allocations: Vec<Value> = allocations
        .iter()
        .map(|(id, command)| {
            json!({
                "id": id,
                "node_id": NODE_ID,
                "service": "steady",
                "seq": 1,
                "spec": {
                    "name": "steady",
                    "command": command,
                    "args": ["3600"],
                    "memory_bytes": 1048576,
                    "stop_grace_ms": 1000,
                },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "node_id": node,
        "role": "worker",
        "as_of": {"log_epoch": LOG_EPOCH, "event_id": event_id},
        "control_url": "",
        "gateway_url": "",
        "ttl_secs": 60,
        "epoch": 1,
        "allocations": allocations,
    }))
    .unwrap()
}

/// The fake, an agent on it, and the agent's last-good state once it runs the good plan.
struct Fixture {
    dir: TestDir,
    fake: FakeControl,
    agent: AgentProcess,
    good: Plan,
    /// The good plan's allocation (named after the test: tests run side by side).
    allocation_id: String,
    pid: u32,
}

fn running_the_good_plan(name: &str) -> Result<Fixture> {
    let dir = TestDir::new(name)?;
    let allocation_id = format!("{name}-1");
    let good = plan(NODE_ID, 10, &[(allocation_id.clone(), "/bin/sleep")]);
    let fake = FakeControl::start(good.clone())?;
    let mut agent = AgentProcess::start(
        &dir.path().join("edge"),
        &fake.enrollment_token(),
        &["--node-id", NODE_ID],
    )?;
    let generation = good.generation();
    let status = agent.wait_for_status("the agent to run the fake's good plan", |status| {
        status["plan_generation"].as_str() == Some(generation.as_str())
            && status_running_pids(status, "steady").len() == 1
    })?;
    let pid = *status_running_pids(&status, "steady")
        .values()
        .next()
        .unwrap();
    Ok(Fixture {
        dir,
        fake,
        agent,
        good,
        allocation_id,
        pid,
    })
}

impl Fixture {
    /// Waits until the agent's status reports an error containing `expected` (in the link's
    /// last error or the last plan error), then checks it still runs the good plan and its
    /// process, live and after a `kill -9` from its store.
    fn expect_refused(&mut self, expected: &str) -> Result<()> {
        let status =
            self.agent
                .wait_for_status(&format!("status to report {expected:?}"), |status| {
                    [&status["control"]["last_error"], &status["last_plan_error"]]
                        .iter()
                        .any(|error| error.as_str().is_some_and(|text| text.contains(expected)))
                })?;
        let generation = self.good.generation();
        assert_eq!(
            status["plan_generation"].as_str(),
            Some(generation.as_str()),
            "the last-good plan was replaced: {status}"
        );
        assert_eq!(
            status["cursor"].as_str(),
            Some(self.good.as_of.to_string().as_str()),
            "the cursor moved past refused input: {status}"
        );
        let running = status_running_pids(&status, "steady");
        assert_eq!(
            running.values().copied().collect::<Vec<_>>(),
            vec![self.pid],
            "the workload was disturbed: {status}"
        );
        assert!(process_alive(self.pid));
        assert_eq!(
            allocation_pids(self.dir.path(), &self.allocation_id),
            vec![self.pid]
        );

        self.agent.stop(StopMode::Kill);
        let stored = agent_status(&self.agent.data_dir)?;
        assert_eq!(
            stored["plan_generation"].as_str(),
            Some(generation.as_str()),
            "the stored last-good plan was replaced: {stored}"
        );
        Ok(())
    }
}

#[test]
fn a_garbled_frame_is_refused_and_the_last_good_plan_runs_on() -> Result<()> {
    let mut fixture = running_the_good_plan("bad-garbled")?;
    fixture.fake.behave(Behaviour::GarbledFrame);
    fixture.expect_refused("bad answer from control")?;
    assert!(fixture.fake.served("garbled frame") >= 1);
    Ok(())
}

#[test]
fn an_oversized_frame_is_refused_and_the_last_good_plan_runs_on() -> Result<()> {
    let mut fixture = running_the_good_plan("bad-oversized")?;
    fixture.fake.behave(Behaviour::OversizedFrame);
    fixture.expect_refused("larger than the limit")?;
    assert!(fixture.fake.served("oversized frame") >= 1);
    Ok(())
}

#[test]
fn a_snapshot_that_fails_verification_is_refused() -> Result<()> {
    let mut fixture = running_the_good_plan("bad-invalid-plan")?;
    // The same allocation twice: allocations must be sorted by id without duplicates.
    let invalid = plan(
        NODE_ID,
        20,
        &[
            ("bad-invalid-plan-2".to_string(), "/bin/sleep"),
            ("bad-invalid-plan-2".to_string(), "/bin/sleep"),
        ],
    );
    fixture.fake.behave(Behaviour::GoneThenPlan(encode(
        Encoding::Postcard,
        &invalid,
    )));
    fixture.expect_refused("without duplicates")?;
    assert!(fixture.fake.served("gone") >= 1 && fixture.fake.served("plan") >= 2);
    Ok(())
}

#[test]
fn a_snapshot_for_another_node_is_refused() -> Result<()> {
    let mut fixture = running_the_good_plan("bad-other-node")?;
    let mut foreign = plan(NODE_ID, 20, &[]);
    foreign.node_id = "someone-else".try_into().unwrap();
    fixture.fake.behave(Behaviour::GoneThenPlan(encode(
        Encoding::Postcard,
        &foreign,
    )));
    fixture.expect_refused("plan is for node someone-else")?;
    Ok(())
}

#[test]
fn a_plan_that_cannot_be_applied_leaves_the_last_good_plan_running() -> Result<()> {
    let mut fixture = running_the_good_plan("bad-apply")?;
    let unrunnable = plan(
        NODE_ID,
        20,
        &[
            (fixture.allocation_id.clone(), "/bin/sleep"),
            (
                "bad-apply-2".to_string(),
                "/nonexistent/outpost-test-program",
            ),
        ],
    );
    fixture.fake.behave(Behaviour::GoneThenPlan(encode(
        Encoding::Postcard,
        &unrunnable,
    )));
    fixture
        .expect_refused("failed to apply, keeping the last-good plan")
        .context("an unrunnable plan")?;
    assert!(allocation_pids(fixture.dir.path(), "bad-apply-2").is_empty());
    Ok(())
}
