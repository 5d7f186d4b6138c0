//! The fleet benchmark: a release control in its own process, and N simulated agents that talk
//! to it the way the real agent does (agent/src/sync): registration with the site join secret,
//! the plan (postcard), a long-poll of the change feed (postcard) and a heartbeat every TTL/3,
//! each agent over ONE kept-alive TLS connection, as the agent does (agent/src/sync/wire.rs): its
//! long-poll asks for a wait that ends before its next heartbeat is due, and the beat goes out
//! on the same connection between two polls. Then one change that lands on every node is made
//! and undone, and the figures are printed.
//!
//! The change: one `replicas: all` service (or, against a control without it, `ceil(N / 1024)`
//! services of up to 1024 replicas), each replica needing a whole node's memory, so the
//! scheduler puts exactly one allocation on every node; then it is deleted. Fan-out is timed
//! from the command to each agent's long-poll answer carrying its allocation (add) or its
//! removal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::Cursor;
use outpost_proto::codec::{
    Encoding, POSTCARD_CONTENT_TYPE, WIRE_VERSION, WIRE_VERSION_HEADER, decode,
};
use outpost_proto::feed::{ChangeBatch, NodeChange};
use outpost_proto::limits::{FRAME_MAX_BYTES, feed_wait_before_beat};
use outpost_proto::plan::Plan;
use outpost_proto::site::JoinProof;
use tokio::sync::Semaphore;

use super::http::Connection;
use super::process::{ControlUnderTest, start_control};
use super::{BenchError, Percentiles, percentiles};

/// Memory every simulated node offers; each benchmark replica asks for all of it.
const NODE_MEMORY_BYTES: u64 = 1 << 30;
/// Replicas of one service at most (proto's limit).
const REPLICAS_PER_SERVICE: usize = outpost_proto::limits::REPLICAS_MAX as usize;
const JOIN_SECRET: &str = "bench-fleet-join-secret-0123456789";
/// A beat due sooner than this goes out before the next poll (the agent's `POLL_SPAN_MIN`).
const BEAT_BEFORE_POLL: Duration = Duration::from_millis(1100);

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub agents: usize,
    pub control_bin: PathBuf,
    pub node_ttl_secs: u32,
    /// The agent's long-poll wait (its default is 300 s).
    pub feed_wait_secs: u64,
    /// Registrations in flight at once.
    pub registrations_in_flight: usize,
    /// How long to wait for every agent to see a change.
    pub change_timeout: Duration,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub agents: usize,
    pub registrations_per_sec: f64,
    pub fanout_add: Percentiles,
    pub fanout_remove: Percentiles,
    pub agents_missing_add: usize,
    pub agents_missing_remove: usize,
    pub heartbeat_during_add: Percentiles,
    pub heartbeat_during_remove: Percentiles,
    /// How the change was made: one `replicas: all` service, or services of 1024 replicas.
    pub change: String,
    pub heartbeat_throughout: Percentiles,
    pub heartbeats_failed: usize,
    pub control_rss_idle_bytes: u64,
    pub control_rss_before_agents_bytes: u64,
    pub control_rss_end_bytes: u64,
    pub control_rss_peak_bytes: u64,
    pub control_cpu_secs: f64,
    pub feed_errors: usize,
    /// Time to render the dashboard's fleet page (`/ui/`, first page of 50 nodes with the
    /// counts over the whole fleet), and its HTML bytes; then the live region alone.
    pub dashboard_fleet_page: Percentiles,
    pub dashboard_fleet_page_bytes: usize,
    pub dashboard_live_region: Percentiles,
}

impl FleetReport {
    /// Control memory per connected, idle agent (its connection and its parked poll).
    pub fn idle_agent_bytes(&self) -> f64 {
        self.control_rss_idle_bytes
            .saturating_sub(self.control_rss_before_agents_bytes) as f64
            / self.agents.max(1) as f64
    }

    pub fn print(&self) {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        println!("agents: {}", self.agents);
        println!(
            "registration rate: {:.0} agents/s",
            self.registrations_per_sec
        );
        println!(
            "fan-out add (command -> agent's feed): {}{}",
            self.fanout_add,
            missing(self.agents_missing_add)
        );
        println!(
            "fan-out remove (command -> agent's feed): {}{}",
            self.fanout_remove,
            missing(self.agents_missing_remove)
        );
        println!("change: {}", self.change);
        println!(
            "heartbeat during the add fan-out: {}",
            self.heartbeat_during_add
        );
        println!(
            "heartbeat during the remove fan-out: {}",
            self.heartbeat_during_remove
        );
        println!(
            "heartbeat throughout: {} ({} failed or refused)",
            self.heartbeat_throughout, self.heartbeats_failed
        );
        println!(
            "control RSS: {:.1} MiB before agents, {:.1} MiB idle with agents ({:.1} KiB per idle agent), {:.1} MiB at the end, peak {:.1} MiB",
            mib(self.control_rss_before_agents_bytes),
            mib(self.control_rss_idle_bytes),
            self.idle_agent_bytes() / 1024.0,
            mib(self.control_rss_end_bytes),
            mib(self.control_rss_peak_bytes)
        );
        println!("control CPU: {:.1} s", self.control_cpu_secs);
        println!("feed errors: {}", self.feed_errors);
        println!(
            "dashboard fleet page /ui/ ({} nodes, 50 a page, {} bytes of HTML): {}",
            self.agents, self.dashboard_fleet_page_bytes, self.dashboard_fleet_page
        );
        println!(
            "dashboard live region (x-outpost-live, what the page polls every 2 s): {}",
            self.dashboard_live_region
        );
    }
}

fn missing(count: usize) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(" -- {count} agents never saw it")
    }
}

/// Shared measurements of the simulated agents.
struct Recorder {
    started: Instant,
    /// Per agent: nanoseconds since `started` when its feed carried the add / the removal;
    /// 0 while not yet.
    add_seen_ns: Vec<AtomicU64>,
    remove_seen_ns: Vec<AtomicU64>,
    /// (sent at ns since `started`, latency ms) of answered heartbeats.
    heartbeats: Mutex<Vec<(u64, f64)>>,
    heartbeats_failed: AtomicUsize,
    feed_errors: AtomicUsize,
    polls_parked: AtomicUsize,
    /// Set once the figures are taken: the agents stop (control is about to be stopped).
    stopping: std::sync::atomic::AtomicBool,
}

impl Recorder {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

/// A registered simulated agent.
struct SimulatedAgent {
    index: usize,
    node_id: String,
    credential: String,
    connection: Connection,
    cursor: Cursor,
}

async fn register(control: &ControlUnderTest, index: usize) -> Result<SimulatedAgent, BenchError> {
    let node_id = format!("bench-{index:05}");
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let proof = JoinProof::new(JOIN_SECRET, &node_id, now_unix).to_text();
    let body = serde_json::json!({
        "enrollment_token": proof,
        "facts": {"node_id": node_id, "hostname": node_id, "arch": "x86_64",
                  "capacity": {"memory_bytes": NODE_MEMORY_BYTES, "cpu_millis": 1000}},
    });
    let mut connection = Connection::connect(control.address, control.tls.clone()).await?;
    let answer = connection
        .request(
            "POST",
            "/v1/nodes/register",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
        .await?
        .ok("register")?;
    let registered: outpost_proto::node::RegisterResponse = serde_json::from_slice(&answer)
        .map_err(|e| BenchError::Parse {
            what: "register answer".into(),
            reason: e.to_string(),
        })?;
    let credential = registered.node_credential;
    let authorization = format!("Bearer {credential}");
    let wire_version = WIRE_VERSION.to_string();
    let bytes = connection
        .request(
            "GET",
            &format!("/v1/nodes/{node_id}/plan"),
            &[
                ("authorization", &authorization),
                ("accept", POSTCARD_CONTENT_TYPE),
                (WIRE_VERSION_HEADER, &wire_version),
            ],
            b"",
        )
        .await?
        .ok("plan")?;
    let plan: Plan = decode(Encoding::Postcard, &bytes, FRAME_MAX_BYTES, "plan").map_err(|e| {
        BenchError::Parse {
            what: "plan".into(),
            reason: e.to_string(),
        }
    })?;
    Ok(SimulatedAgent {
        index,
        node_id,
        credential,
        connection,
        cursor: plan.as_of,
    })
}

/// What a simulated agent is and does.
struct AgentLoop {
    connection: Connection,
    node_id: String,
    authorization: String,
    cursor: Cursor,
    index: usize,
    wait_secs: u64,
    period: Duration,
    recorder: Arc<Recorder>,
}

impl AgentLoop {
    /// The agent's sync on one connection: a long-poll that ends before the next beat is due,
    /// and the beat between two polls; the first beat at a random point of the first period.
    async fn run(mut self) {
        let offset =
            Duration::from_millis(rand::random::<u64>() % self.period.as_millis().max(1) as u64);
        let mut next_beat = Instant::now() + offset;
        let mut first = true;
        loop {
            let to_beat = next_beat.saturating_duration_since(Instant::now());
            if to_beat < BEAT_BEFORE_POLL {
                // Brought forward, as the agent does: a poll could not end before it is due.
                self.beat().await;
                next_beat = Instant::now() + self.period;
                continue;
            }
            if first {
                self.recorder.polls_parked.fetch_add(1, Ordering::Relaxed);
                first = false;
            }
            let wait = feed_wait_before_beat(self.wait_secs, Some(to_beat));
            if !self.poll(wait).await {
                return;
            }
        }
    }

    /// One long-poll; notes what arrived and follows the bookmark. `false`: the run is over.
    async fn poll(&mut self, wait_secs: u64) -> bool {
        let wire_version = WIRE_VERSION.to_string();
        let path = format!(
            "/v1/nodes/{}/changes?cursor={}&wait={wait_secs}",
            self.node_id, self.cursor
        );
        let answer = self
            .connection
            .request(
                "GET",
                &path,
                &[
                    ("authorization", &self.authorization),
                    ("accept", POSTCARD_CONTENT_TYPE),
                    (WIRE_VERSION_HEADER, &wire_version),
                ],
                b"",
            )
            .await
            .and_then(|response| response.ok("changes"));
        let recorder = &self.recorder;
        if recorder.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let bytes = match answer {
            Ok(bytes) => bytes,
            Err(error) => {
                if recorder.feed_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("feed of {}: {error}", self.node_id);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                return true;
            }
        };
        let batch: ChangeBatch =
            match decode(Encoding::Postcard, &bytes, FRAME_MAX_BYTES, "change batch") {
                Ok(batch) => batch,
                Err(error) => {
                    recorder.feed_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("feed of {}: {error}", self.node_id);
                    return true;
                }
            };
        let now = recorder.now_ns();
        for event in &batch.events {
            let slot = match event.change {
                NodeChange::AllocationUpserted(_) => &recorder.add_seen_ns[self.index],
                NodeChange::AllocationRemoved { .. } => &recorder.remove_seen_ns[self.index],
                _ => continue,
            };
            let _ = slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.cursor = batch.bookmark;
        true
    }

    /// One heartbeat, timed from the request to its answer.
    async fn beat(&mut self) {
        let path = format!("/v1/nodes/{}/heartbeat", self.node_id);
        let recorder = &self.recorder;
        let sent = recorder.now_ns();
        let answer = self
            .connection
            .request(
                "POST",
                &path,
                &[
                    ("authorization", &self.authorization),
                    ("content-type", "application/json"),
                ],
                br#"{"allocations":[]}"#,
            )
            .await
            .and_then(|response| response.ok("heartbeat"));
        if recorder.stopping.load(Ordering::Relaxed) {
            return;
        }
        match answer {
            Ok(_) => {
                let latency_ms = (recorder.now_ns() - sent) as f64 / 1e6;
                recorder
                    .heartbeats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((sent, latency_ms));
            }
            Err(error) => {
                if recorder.heartbeats_failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("heartbeat of {}: {error}", self.node_id);
                }
            }
        }
    }
}

/// Logs in to the dashboard with the admin token and times `ROUNDS` renders of the fleet page
/// and of its live region, over one kept-alive connection.
async fn time_dashboard(
    control: &ControlUnderTest,
) -> Result<(Percentiles, usize, Percentiles), BenchError> {
    const ROUNDS: usize = 20;
    let mut connection = Connection::connect(control.address, control.tls.clone()).await?;
    let form = connection.request("GET", "/ui/login", &[], b"").await?;
    let csrf_cookie = form
        .set_cookies
        .iter()
        .find(|c| c.starts_with("outpost_csrf="))
        .cloned()
        .ok_or_else(|| BenchError::Parse {
            what: "dashboard login form".into(),
            reason: "no csrf cookie".into(),
        })?;
    let csrf = csrf_cookie.trim_start_matches("outpost_csrf=").to_string();
    let body =
        serde_urlencoded::to_string([("csrf", csrf.as_str()), ("token", &control.admin_token)])
            .unwrap_or_default();
    let login = connection
        .request(
            "POST",
            "/ui/login",
            &[
                ("cookie", &csrf_cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body.as_bytes(),
        )
        .await?;
    let session = login
        .set_cookies
        .iter()
        .find(|c| c.starts_with("outpost_session=") && c.len() > "outpost_session=".len())
        .cloned()
        .ok_or_else(|| BenchError::Parse {
            what: "dashboard login".into(),
            reason: format!("status {}, no session cookie", login.status),
        })?;
    let mut page_ms = Vec::new();
    let mut live_ms = Vec::new();
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let page = connection
            .request("GET", "/ui/", &[("cookie", &session)], b"")
            .await?
            .ok("dashboard fleet page")?;
        page_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = page.len();
        let started = Instant::now();
        connection
            .request(
                "GET",
                "/ui/",
                &[("cookie", &session), ("x-outpost-live", "1")],
                b"",
            )
            .await?
            .ok("dashboard live region")?;
        live_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((percentiles(&page_ms), bytes, percentiles(&live_ms)))
}

/// Sends the admin calls at once, each over its own connection.
async fn admin_calls(
    control: &ControlUnderTest,
    calls: Vec<(&'static str, String, String)>,
) -> Result<(), BenchError> {
    admin_answers(control, calls)
        .await?
        .into_iter()
        .try_for_each(|(path, response)| response.ok(&path).map(|_| ()))
}

/// Sends the admin calls at once, each over its own connection; returns every answer.
async fn admin_answers(
    control: &ControlUnderTest,
    calls: Vec<(&'static str, String, String)>,
) -> Result<Vec<(String, super::http::Response)>, BenchError> {
    let mut tasks = Vec::new();
    for (method, path, body) in calls {
        let (address, tls) = (control.address, control.tls.clone());
        let authorization = format!("Bearer {}", control.admin_token);
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::connect(address, tls).await?;
            let response = connection
                .request(
                    method,
                    &path,
                    &[
                        ("authorization", &authorization),
                        ("content-type", "application/json"),
                    ],
                    body.as_bytes(),
                )
                .await?;
            Ok::<_, BenchError>((path, response))
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.map_err(|e| BenchError::Http {
            what: "admin call".into(),
            reason: e.to_string(),
        })??);
    }
    Ok(answers)
}

/// Waits until every agent's slot is set (or the timeout); returns when the last was seen.
async fn wait_all_seen(slots: &[AtomicU64], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = slots
            .iter()
            .filter(|slot| slot.load(Ordering::Relaxed) == 0)
            .count();
        if missing == 0 || Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn latencies_ms(slots: &[AtomicU64], from_ns: u64) -> Vec<f64> {
    slots
        .iter()
        .map(|slot| slot.load(Ordering::Relaxed))
        .filter(|seen| *seen != 0)
        .map(|seen| seen.saturating_sub(from_ns) as f64 / 1e6)
        .collect()
}

fn last_seen_ns(slots: &[AtomicU64]) -> u64 {
    slots
        .iter()
        .map(|slot| slot.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0)
}

/// Runs the fleet benchmark.
pub async fn run(options: FleetOptions) -> Result<FleetReport, BenchError> {
    let control = start_control(&options.control_bin, options.node_ttl_secs, JOIN_SECRET).await?;
    let recorder = Arc::new(Recorder {
        started: Instant::now(),
        add_seen_ns: (0..options.agents).map(|_| AtomicU64::new(0)).collect(),
        remove_seen_ns: (0..options.agents).map(|_| AtomicU64::new(0)).collect(),
        heartbeats: Mutex::new(Vec::new()),
        heartbeats_failed: AtomicUsize::new(0),
        feed_errors: AtomicUsize::new(0),
        polls_parked: AtomicUsize::new(0),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    let (rss_before, _) = control.process.memory_bytes()?;

    // Registration, some in flight at once; each agent starts its feed and beats right away.
    let permits = Arc::new(Semaphore::new(options.registrations_in_flight.max(1)));
    let control = Arc::new(control);
    let period = Duration::from_millis(u64::from(options.node_ttl_secs) * 1000 / 3);
    let registering = Instant::now();
    let mut registrations = Vec::with_capacity(options.agents);
    for index in 0..options.agents {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .map_err(|e| BenchError::Http {
                what: "registration permit".into(),
                reason: e.to_string(),
            })?;
        let (control, recorder) = (Arc::clone(&control), Arc::clone(&recorder));
        let wait_secs = options.feed_wait_secs;
        registrations.push(tokio::spawn(async move {
            let agent = register(&control, index).await;
            drop(permit);
            let agent = agent?;
            let SimulatedAgent {
                index,
                node_id,
                credential,
                connection,
                cursor,
            } = agent;
            tokio::spawn(
                AgentLoop {
                    connection,
                    node_id,
                    authorization: format!("Bearer {credential}"),
                    cursor,
                    index,
                    wait_secs,
                    period,
                    recorder,
                }
                .run(),
            );
            Ok::<_, BenchError>(())
        }));
    }
    for registration in registrations {
        registration.await.map_err(|e| BenchError::Http {
            what: "registration task".into(),
            reason: e.to_string(),
        })??;
    }
    let registration_secs = registering.elapsed().as_secs_f64();
    println!(
        "registered {} agents in {registration_secs:.1} s",
        options.agents
    );

    // Let every poll park and the first beats land, then take the idle figure.
    let parked_by = Instant::now() + Duration::from_secs(60);
    while recorder.polls_parked.load(Ordering::Relaxed) < options.agents
        && Instant::now() < parked_by
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_idle, _) = control.process.memory_bytes()?;

    // The change that lands on every node, then its removal: one `replicas: all` service where
    // control knows it (issue 10 item 5), else one service per 1024 nodes, defined at once.
    let mut add_at = recorder.now_ns();
    let every_node = serde_json::json!({"name": "fanout-all", "command": "/bin/true",
        "replicas": "all", "memory_bytes": NODE_MEMORY_BYTES, "cpu_millis": 10});
    let tried = admin_answers(
        &control,
        vec![("POST", "/v1/services".to_string(), every_node.to_string())],
    )
    .await?;
    let replicas_all = tried.iter().all(|(_, response)| response.status == 200);
    let services: Vec<String> = if replicas_all {
        vec!["fanout-all".to_string()]
    } else {
        (0..options.agents.div_ceil(REPLICAS_PER_SERVICE))
            .map(|service| format!("fanout-{service}"))
            .collect()
    };
    let change = if replicas_all {
        "one service with replicas: all".to_string()
    } else {
        format!(
            "{} services of up to {REPLICAS_PER_SERVICE} replicas defined at once (replicas: all was refused)",
            services.len()
        )
    };
    if !replicas_all {
        let defines = services
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let replicas =
                    (options.agents - index * REPLICAS_PER_SERVICE).min(REPLICAS_PER_SERVICE);
                let spec = serde_json::json!({"name": name, "command": "/bin/true",
                    "replicas": replicas, "memory_bytes": NODE_MEMORY_BYTES, "cpu_millis": 10});
                ("POST", "/v1/services".to_string(), spec.to_string())
            })
            .collect();
        add_at = recorder.now_ns();
        admin_calls(&control, defines).await?;
    }
    let agents_missing_add = wait_all_seen(&recorder.add_seen_ns, options.change_timeout).await;
    let add_done = last_seen_ns(&recorder.add_seen_ns).max(recorder.now_ns().min(add_at + 1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deletes = services
        .iter()
        .map(|name| ("DELETE", format!("/v1/services/{name}"), String::new()))
        .collect();
    let remove_at = recorder.now_ns();
    admin_calls(&control, deletes).await?;
    let agents_missing_remove =
        wait_all_seen(&recorder.remove_seen_ns, options.change_timeout).await;
    let remove_done = last_seen_ns(&recorder.remove_seen_ns).max(remove_at + 1);

    let heartbeats = recorder
        .heartbeats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let during = |from: u64, to: u64| -> Vec<f64> {
        heartbeats
            .iter()
            .filter(|(sent, _)| *sent >= from && *sent <= to)
            .map(|(_, latency)| *latency)
            .collect()
    };
    let throughout: Vec<f64> = heartbeats.iter().map(|(_, latency)| *latency).collect();
    let (dashboard_fleet_page, dashboard_fleet_page_bytes, dashboard_live_region) =
        time_dashboard(&control).await?;
    let (rss_end, rss_peak) = control.process.memory_bytes()?;
    recorder.stopping.store(true, Ordering::Relaxed);
    Ok(FleetReport {
        agents: options.agents,
        registrations_per_sec: options.agents as f64 / registration_secs.max(1e-9),
        fanout_add: percentiles(&latencies_ms(&recorder.add_seen_ns, add_at)),
        fanout_remove: percentiles(&latencies_ms(&recorder.remove_seen_ns, remove_at)),
        agents_missing_add,
        agents_missing_remove,
        heartbeat_during_add: percentiles(&during(add_at, add_done)),
        heartbeat_during_remove: percentiles(&during(remove_at, remove_done)),
        change,
        heartbeat_throughout: percentiles(&throughout),
        heartbeats_failed: recorder.heartbeats_failed.load(Ordering::Relaxed),
        control_rss_idle_bytes: rss_idle,
        control_rss_before_agents_bytes: rss_before,
        control_rss_end_bytes: rss_end,
        control_rss_peak_bytes: rss_peak,
        control_cpu_secs: control.process.cpu_secs()?,
        feed_errors: recorder.feed_errors.load(Ordering::Relaxed),
        dashboard_fleet_page,
        dashboard_fleet_page_bytes,
        dashboard_live_region,
    })
}
