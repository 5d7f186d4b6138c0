//! Offline-first boot (O2): open the store (recovering from corruption), take the last-good plan
//! from redb or its copy (or start empty, and say so), adopt processes a previous agent left
//! running, apply the plan, and only then start the status port and the threads that look for
//! control. Nothing here waits on the network: the cached profile's reconcile (which may call
//! an external broker, bucket store or index) is waited for at most
//! [`BOOT_RUN_WAIT`] before the plan's services start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_proto::node::HeartbeatResponse;
use outpost_proto::plan::Plan;

use crate::apply::process::Supervisor;
use crate::apply::process::cgroup::CgroupTree;
use crate::apply::process::launcher::Launcher;
use crate::apply::process::probes::OffLockProbes;
use crate::apply::process::runtime::RealSyscalls;
use crate::apply::profile_runner::{BOOT_RUN_WAIT, BootRun, ProfileRunner, still_running_note};
use crate::config::AgentConfig;
use crate::status::{AgentRun, AgentStatus, ControlStatus, SnapshotWriter, StatusBoard, http};
use crate::store::{Identity, META_LAST_SYNC_UNIX, Store, StoreHealth, last_good};
use crate::sync::registration::{
    AgentSessionSlot, ClusterFile, choose_node_id, write_cluster_file,
};

const TICK: Duration = Duration::from_millis(250);
/// How long a starting agent waits for the store's lock to be let go by a predecessor that was
/// just killed (see `Store::open_for_boot_waiting`) before it says another agent holds it.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(3);

/// The running agent's shared state. Each part has its own lock; none is held across a network
/// call.
pub struct Agent {
    pub config: AgentConfig,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    supervisor: Mutex<Supervisor>,
    plan: Mutex<Plan>,
    has_plan: AtomicBool,
    node_id: Mutex<String>,
    pub identity: Mutex<Identity>,
    /// The session with control; registering never holds a lock (sync::session).
    pub session: AgentSessionSlot,
    cluster: Mutex<Option<ClusterFile>>,
    /// The heartbeat thread, woken early when allocation states change.
    heartbeat: Mutex<Option<std::thread::Thread>>,
    /// Set by [`Agent::nudge_heartbeat`], taken by the heartbeat thread.
    heartbeat_nudged: AtomicBool,
    /// The WireGuard overlay: key and apply thread (crate::overlay).
    pub overlay: crate::overlay::OverlayHandle,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Agent {
    pub fn node_id(&self) -> String {
        lock(&self.node_id).clone()
    }

    pub fn set_node_id(&self, node_id: &str) {
        *lock(&self.node_id) = node_id.to_string();
        self.board.update(|s| s.node_id = node_id.to_string());
    }

    pub fn supervisor(&self) -> MutexGuard<'_, Supervisor> {
        lock(&self.supervisor)
    }

    /// The plan that runs: the last-good plan.
    pub fn current_plan(&self) -> Plan {
        lock(&self.plan).clone()
    }

    /// False until a plan came from the store, its copy or control.
    pub fn has_plan(&self) -> bool {
        self.has_plan.load(Ordering::SeqCst)
    }

    pub fn ttl_secs(&self) -> u32 {
        lock(&self.cluster)
            .as_ref()
            .map_or_else(|| lock(&self.plan).ttl_secs, |c| c.ttl_secs)
    }

    /// Records a promoted plan as the one that runs.
    pub fn settle_plan(&self, plan: &Plan, source: &str) {
        *lock(&self.plan) = plan.clone();
        self.has_plan.store(true, Ordering::SeqCst);
        self.overlay.wake();
        let now = crate::os::unix_now_secs();
        self.board.update(|s| {
            s.role = plan.role.as_str().to_string();
            s.plan_generation = Some(plan.generation());
            s.plan_source = source.to_string();
            s.cursor = Some(plan.as_of.to_string());
            s.last_sync_unix = Some(now);
        });
        let cluster = lock(&self.cluster).clone();
        if let Some(mut cluster) = cluster {
            cluster.role = plan.role.as_str().to_string();
            if !plan.control_url.is_empty() {
                cluster.control_url.clone_from(&plan.control_url);
            }
            if !plan.gateway_url.is_empty() {
                cluster.gateway_url.clone_from(&plan.gateway_url);
            }
            cluster.ttl_secs = plan.ttl_secs;
            cluster.epoch = plan.epoch;
            self.update_cluster(cluster);
        }
    }

    /// Rewrites cluster.json when it changes (D4).
    pub fn update_cluster(&self, cluster: ClusterFile) {
        let mut current = lock(&self.cluster);
        if current.as_ref() == Some(&cluster) {
            return;
        }
        if let Err(error) = write_cluster_file(&self.config.data_dir, &cluster) {
            self.board
                .update(|s| s.note(format!("cannot write cluster.json: {error}")));
        }
        *current = Some(cluster);
    }

    /// Wakes the heartbeat thread so control hears about changed allocation states now.
    pub fn nudge_heartbeat(&self) {
        self.heartbeat_nudged.store(true, Ordering::SeqCst);
        if let Some(thread) = lock(&self.heartbeat).as_ref() {
            thread.unpark();
        }
    }

    /// Whether the heartbeat was nudged since the last call (clears it).
    pub fn take_heartbeat_nudge(&self) -> bool {
        self.heartbeat_nudged.swap(false, Ordering::SeqCst)
    }

    /// Records the apply of a component (C10): in the store, and on the status port's
    /// `/internal/bootstrap/status`. Profile reconcilers report through this.
    pub fn record_component(&self, component: &str, apply: crate::store::ComponentApply) {
        if let Err(error) = self.store.record_component(component, &apply) {
            self.board
                .update(|s| s.note(format!("cannot record {component} apply: {error}")));
        }
        self.board.update(|s| {
            s.components.insert(component.to_string(), apply);
        });
    }

    pub fn note_heartbeat(&self, response: &HeartbeatResponse) {
        let cluster = lock(&self.cluster).clone();
        if let Some(mut cluster) = cluster {
            cluster.ttl_secs = response.ttl_secs;
            cluster.epoch = response.epoch;
            cluster.role = response.role.as_str().to_string();
            self.update_cluster(cluster);
        }
        let outbox_len = self.store.state().map(|s| s.outbox_len).unwrap_or(0);
        self.board.update(|s| {
            s.control.state = "connected".into();
            s.control.last_error = None;
            s.control.last_contact_unix = Some(crate::os::unix_now_secs());
            s.outbox_len = outbox_len;
        });
    }
}

/// The plan to boot from and where it came from.
struct BootPlan {
    plan: Option<Plan>,
    source: &'static str,
    notes: Vec<String>,
}

fn choose_boot_plan(
    data_dir: &Path,
    stored: Option<Plan>,
    stored_error: Option<String>,
) -> BootPlan {
    if let Some(plan) = stored {
        return BootPlan {
            plan: Some(plan),
            source: "store",
            notes: Vec::new(),
        };
    }
    let mut notes = Vec::new();
    if let Some(error) = stored_error {
        notes.push(format!("last-good plan record unreadable ({error})"));
    }
    match last_good::read(data_dir) {
        Ok(Some(plan)) => {
            notes.push("plan recovered from last-good copy".into());
            BootPlan {
                plan: Some(plan),
                source: "last-good copy",
                notes,
            }
        }
        Ok(None) => BootPlan {
            plan: None,
            source: "empty",
            notes,
        },
        Err(error) => {
            notes.push(format!("last-good copy unusable: {error}; started empty"));
            BootPlan {
                plan: None,
                source: "empty",
                notes,
            }
        }
    }
}

/// What boot measured.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// From process start (`started_at`) to the cached plan's first wave spawned.
    pub applied_after: Duration,
    /// When each phase of boot ended, from process start.
    pub timeline: BootTimeline,
}

/// When each phase of boot ended, measured from process start: for the boot log and the
/// benchmark, to see where boot's time goes.
#[derive(Debug, Clone, Default)]
pub struct BootTimeline {
    marks: Vec<(&'static str, Duration)>,
}

impl BootTimeline {
    fn mark(&mut self, phase: &'static str, started_at: Instant) {
        self.marks.push((phase, started_at.elapsed()));
    }

    /// `store 1.2, plan 1.4, …` (milliseconds since process start).
    pub fn render(&self) -> String {
        self.marks
            .iter()
            .map(|(phase, at)| format!("{phase} {:.1}", at.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Boots the agent and starts its threads. `started_at` is when the process started.
pub fn boot(config: AgentConfig, started_at: Instant) -> anyhow::Result<(Arc<Agent>, BootReport)> {
    let data_dir = config.data_dir.clone();
    if !data_dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        // Private: the data dir holds the node credential and the plan.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    }
    let (store, health) = Store::open_for_boot_waiting(&data_dir, STORE_LOCK_WAIT)?;
    let store = Arc::new(store);
    let (mut state, state_error) = match store.state() {
        Ok(state) => (state, None),
        Err(error) => (Default::default(), Some(error.to_string())),
    };
    let mut timeline = BootTimeline::default();
    timeline.mark("store", started_at);
    let mut notes = Vec::new();
    if let Some(error) = &state_error {
        notes.push(format!("store unreadable: {error}"));
    }
    if state.has_candidate {
        let _ = store.discard_candidate();
        notes.push("discarded a candidate plan left by an interrupted apply".into());
    }
    let boot_plan = choose_boot_plan(
        &data_dir,
        state.last_good.clone(),
        state.last_good_error.clone(),
    );
    notes.extend(boot_plan.notes.iter().cloned());
    // Keep the copy outside redb in step (it may be missing after an upgrade or a crash).
    if let (Some(plan), "store") = (&boot_plan.plan, boot_plan.source)
        && !matches!(last_good::read(&data_dir), Ok(Some(copy)) if &copy == plan)
        && let Err(error) = last_good::write(&data_dir, plan)
    {
        notes.push(format!("cannot write last-good copy: {error}"));
    }
    let hostname = crate::os::hostname().ok();
    let node_id = choose_node_id(
        config.node_id.as_deref(),
        state
            .identity
            .node_id
            .as_deref()
            .or(boot_plan.plan.as_ref().map(|p| p.node_id.as_str())),
        hostname.as_deref(),
    );
    let plan = boot_plan.plan.clone().unwrap_or_else(|| {
        Plan::empty(outpost_proto::name::name("node_id", &node_id).unwrap_or_default())
    });
    timeline.mark("plan", started_at);

    let cgroups = CgroupTree::probe(&config.cgroup_root);
    // Workloads start through this executable so they get a clean signal mask (see launcher).
    let launcher = Launcher::ThroughAgent(std::path::PathBuf::from("/proc/self/exe"));
    let sys = RealSyscalls::new(config.log_cap_bytes, cgroups, launcher);
    let mut supervisor = Supervisor::new(
        &node_id,
        data_dir.clone(),
        Box::new(sys),
        Box::new(store.clone()),
    );
    // The sealing key exists before anything registers or any process starts (P11).
    let secrets_root = crate::apply::secret::SecretsRoot::choose(&data_dir);
    match crate::apply::secret::load_or_generate_key(
        state.identity.sealing_private_key_hex.as_deref(),
    ) {
        Ok((key, created)) => {
            if created {
                let updated = Identity {
                    sealing_private_key_hex: Some(crate::os::hex(&key)),
                    ..state.identity.clone()
                };
                match store.save_identity(&updated) {
                    Ok(()) => state.identity = updated,
                    Err(error) => notes.push(format!("cannot store the sealing key: {error}")),
                }
            }
            if state.identity.sealing_private_key_hex.is_some() {
                supervisor.set_secrets(key, secrets_root.clone());
            }
        }
        Err(error) => notes.push(format!("no sealing key, secrets cannot open: {error}")),
    }
    if let Some(note) = secrets_root.note() {
        notes.push(note);
    }
    let now = Instant::now();
    let processes: Vec<_> = state.processes.values().cloned().collect();
    let (adopted, _gone) = supervisor.adopt(processes, &plan, now);
    secrets_root.sweep(&adopted);
    timeline.mark("adopt", started_at);
    if !adopted.is_empty() {
        notes.push(format!(
            "adopted {} running allocation(s): {}",
            adopted.len(),
            adopted.join(", ")
        ));
    }
    // C1: storage → broker → index from the cached profile, then services. Boot never waits
    // on the network: the profile's boot run goes on its own thread and the services wait for
    // it at most BOOT_RUN_WAIT; a failed or slow profile never keeps the last-good services
    // from starting (see apply::profile_runner).
    let profile = ProfileRunner::prepare(
        &config,
        &node_id,
        store.clone(),
        &std::env::vars().collect(),
    );
    supervisor.set_profile_environment(profile.environment());
    let profile = profile.start_boot_run()?;
    if profile.wait_for_boot_run(BOOT_RUN_WAIT) == BootRun::StillRunning {
        notes.push(still_running_note(BOOT_RUN_WAIT));
    }
    timeline.mark("profile", started_at);
    // R1: a cached artifact is checked before anything runs from it; a corrupt one is removed.
    let artifact_cache = crate::artifact::ArtifactCache::new(&data_dir);
    let artifact_board = StatusBoard::default();
    notes.extend(crate::artifact::runner::check_at_boot(
        &artifact_cache,
        &plan,
        Some(&artifact_board),
    ));
    let mut last_plan_error = None;
    if let Err(error) = supervisor.apply(&plan, now) {
        last_plan_error = Some(format!("cached plan did not fully apply: {error}"));
    }
    timeline.mark("apply", started_at);
    let applied_after = started_at.elapsed();

    let status = AgentStatus {
        agent: AgentRun::Running,
        pid: Some(std::process::id()),
        node_id: node_id.clone(),
        role: plan.role.as_str().to_string(),
        plan_generation: boot_plan.plan.as_ref().map(Plan::generation),
        plan_source: boot_plan.source.to_string(),
        cursor: boot_plan.plan.as_ref().map(|p| p.as_of.to_string()),
        last_sync_unix: state.meta.get(META_LAST_SYNC_UNIX).copied(),
        store_health: match &health {
            StoreHealth::Healthy if boot_plan.source == "last-good copy" => {
                "healthy file, but the plan came from the last-good copy".into()
            }
            other => other.to_string(),
        },
        control: ControlStatus::default(),
        components: state.components.clone(),
        allocations: supervisor.reports(),
        drift: supervisor.drift(),
        notes,
        last_plan_error,
        outbox_len: state.outbox_len,
        status_addr: None,
        overlay: None,
        artifacts: artifact_board.snapshot().artifacts,
    };
    let agent = Arc::new(Agent {
        config: config.clone(),
        store,
        board: StatusBoard::new(status),
        supervisor: Mutex::new(supervisor),
        plan: Mutex::new(plan),
        has_plan: AtomicBool::new(boot_plan.plan.is_some()),
        node_id: Mutex::new(node_id),
        identity: Mutex::new(state.identity.clone()),
        session: AgentSessionSlot::default(),
        cluster: Mutex::new(read_cluster_file(&data_dir)),
        heartbeat: Mutex::new(None),
        heartbeat_nudged: AtomicBool::new(false),
        overlay: crate::overlay::OverlayHandle::new(config.overlay.clone()),
    });

    let syncs = control_status_at_boot(&agent);
    // The workloads already run; a busy status port degrades status, it does not stop the agent.
    if let Err(error) = serve_status(&agent) {
        agent
            .board
            .update(|s| s.note(format!("status port unavailable: {error:#}")));
    }
    timeline.mark("status port", started_at);
    spawn_supervision(&agent)?;
    // The cached overlay comes up before anything looks for control (O2).
    crate::overlay::start(&agent)?;
    profile.hand_over(&agent);
    if syncs {
        spawn_sync(&agent)?;
    }
    crate::election::site::spawn(&agent)?;
    timeline.mark("threads", started_at);
    eprintln!(
        "outpost-agent: boot timeline, ms since process start: {}",
        timeline.render()
    );
    Ok((
        agent,
        BootReport {
            applied_after,
            timeline,
        },
    ))
}

fn serve_status(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let listen = agent.config.status_listen;
    let listener =
        http::bind(listen).with_context(|| format!("cannot listen for status on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("status listener has no address")?;
    agent
        .board
        .update(|s| s.status_addr = Some(addr.to_string()));
    crate::os::atomic_write(
        &agent
            .config
            .data_dir
            .join(crate::status::STATUS_ADDR_FILE_NAME),
        addr.to_string().as_bytes(),
    )
    .context("cannot write status.addr")?;
    http::spawn(listener, agent.board.clone()).context("cannot start the status thread")?;
    Ok(())
}

fn read_cluster_file(data_dir: &Path) -> Option<ClusterFile> {
    let bytes = std::fs::read(crate::sync::registration::cluster_path(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn spawn_supervision(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let agent = agent.clone();
    let mut writer = SnapshotWriter::new(&agent.config.data_dir);
    let _ = writer.write_if_changed(&agent.board.snapshot());
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            let mut last_states = Vec::new();
            // Readiness probes run off the supervisor's lock, so a slow probe never blocks
            // status, heartbeats, plan changes or shutdown.
            let probes = OffLockProbes::default();
            loop {
                std::thread::sleep(TICK);
                let (reports, drift, notes) =
                    probes.round(&agent.supervisor, Instant::now(), |supervisor| {
                        (supervisor.reports(), supervisor.drift(), supervisor.notes())
                    });
                let states: Vec<_> = reports
                    .iter()
                    .map(|r| (r.allocation_id.clone(), r.state))
                    .collect();
                if states != last_states {
                    agent.nudge_heartbeat();
                    last_states = states;
                }
                agent.board.update(|s| {
                    s.allocations = reports;
                    s.drift = drift;
                    for note in notes {
                        s.note(note);
                    }
                });
                if let Err(error) = writer.write_if_changed(&agent.board.snapshot()) {
                    agent
                        .board
                        .update(|s| s.note(format!("cannot write status.json: {error}")));
                }
            }
        })
        .context("cannot start the supervisor thread")?;
    Ok(())
}

/// Sets the control part of status as boot finds it (not configured, connecting or revoked),
/// before the first status is written. Returns whether the sync threads have anything to do.
fn control_status_at_boot(agent: &Agent) -> bool {
    let identity = lock(&agent.identity).clone();
    let enrolled = identity.node_credential.is_some() && identity.ca_pem.is_some();
    if !enrolled && agent.config.enroll_token.is_none() && agent.config.site.join_secret.is_none() {
        agent.board.update(|s| {
            s.control.url = agent.config.control_url.clone();
            s.control.state = "not configured".into();
            s.control.last_error =
                Some("not enrolled: pass --enroll TOKEN, or --join-secret S to join a site (docs/election.md), to join a control service; running from the local cache".into());
        });
        return false;
    }
    agent.board.update(|s| {
        s.control.url = agent
            .config
            .control_url
            .clone()
            .or(identity.control_url.clone());
        s.control.state = if identity.revoked {
            s.note(crate::sync::registration::REVOKED_NOTE.into());
            "revoked".into()
        } else {
            "connecting".into()
        };
    });
    true
}

fn spawn_sync(agent: &Arc<Agent>) -> anyhow::Result<()> {
    let feed_agent = agent.clone();
    std::thread::Builder::new()
        .name("feed".into())
        .spawn(move || crate::sync::feed::run(&feed_agent))
        .context("cannot start the feed thread")?;
    let beat_agent = agent.clone();
    let handle = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || crate::sync::heartbeat::run(&beat_agent))
        .context("cannot start the heartbeat thread")?;
    *lock(&agent.heartbeat) = Some(handle.thread().clone());
    crate::artifact::runner::spawn(agent).context("cannot start the artifacts thread")?;
    Ok(())
}

/// Orderly exit on SIGTERM: optionally stop workloads, write a final status, close the store.
pub fn shutdown(agent: &Agent, workloads: crate::config::WorkloadsOnExit) {
    if workloads == crate::config::WorkloadsOnExit::Stop {
        let deadline = Instant::now() + Duration::from_secs(60);
        agent.supervisor().stop_all(Instant::now());
        while Instant::now() < deadline {
            let mut supervisor = agent.supervisor();
            supervisor.tick(Instant::now());
            if supervisor.is_idle() {
                break;
            }
            drop(supervisor);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    agent.board.update(|s| {
        s.agent = AgentRun::Stopped;
        s.control.state = "stopped".into();
    });
    let _ = SnapshotWriter::new(&agent.config.data_dir).write_if_changed(&agent.board.snapshot());
    let _ = std::fs::remove_file(
        agent
            .config
            .data_dir
            .join(crate::status::STATUS_ADDR_FILE_NAME),
    );
    crate::leader::stop_running_on_exit();
    agent.store.close();
}

/// An agent around a given store and supervisor, without threads or sockets, for tests of the
/// sync logic.
#[cfg(test)]
pub(crate) fn agent_for_test(
    config: AgentConfig,
    store: Arc<Store>,
    supervisor: Supervisor,
    plan: Option<Plan>,
) -> Agent {
    let node_id = config.node_id.as_deref().unwrap_or("n1").to_string();
    Agent {
        config,
        store,
        board: StatusBoard::default(),
        supervisor: Mutex::new(supervisor),
        has_plan: AtomicBool::new(plan.is_some()),
        plan: Mutex::new(plan.unwrap_or_else(|| {
            Plan::empty(outpost_proto::name::name("n", &node_id).unwrap_or_default())
        })),
        node_id: Mutex::new(node_id),
        identity: Mutex::new(Identity::default()),
        session: AgentSessionSlot::default(),
        cluster: Mutex::new(None),
        heartbeat: Mutex::new(None),
        heartbeat_nudged: AtomicBool::new(false),
        overlay: crate::overlay::OverlayHandle::new(crate::overlay::OverlaySettings::default()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests::sample_plan;

    #[test]
    fn boot_plan_prefers_the_store_then_the_copy_then_empty() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(1);
        assert_eq!(
            choose_boot_plan(dir.path(), Some(plan.clone()), None).source,
            "store"
        );
        assert_eq!(choose_boot_plan(dir.path(), None, None).source, "empty");
        last_good::write(dir.path(), &plan).unwrap();
        let from_copy = choose_boot_plan(dir.path(), None, Some("checksum mismatch".into()));
        assert_eq!(from_copy.source, "last-good copy");
        assert_eq!(from_copy.plan, Some(plan));
        assert!(from_copy.notes[0].contains("checksum mismatch"));
        std::fs::write(
            last_good::last_good_path(dir.path()),
            b"OPLGOOD1 but garbage",
        )
        .unwrap();
        let damaged = choose_boot_plan(dir.path(), None, None);
        assert_eq!(damaged.source, "empty");
        assert!(damaged.notes[0].contains("started empty"));
    }
}
