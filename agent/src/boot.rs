//! Offline-first boot (O2): open the store (recovering from corruption), take the last-good plan
//! from redb or its copy (or start empty, and say so), adopt processes a previous agent left
//! running, apply the plan, and only then start the status port and the threads that look for
//! control. Nothing here waits on the network: the cached profile's reconcile (which may call
//! an external broker, bucket store or index) is waited for at most
//! [`BOOT_RUN_WAIT`] before the plan's services start.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_proto::plan::Plan;

use crate::apply::process::Supervisor;
use crate::apply::process::cgroup::CgroupTree;
use crate::apply::process::launcher::Launcher;
use crate::apply::process::probes::OffLockProbes;
use crate::apply::process::runtime::RealSyscalls;
use crate::config::AgentConfig;
use crate::election::site::SiteParts;
use crate::enroll::{Enrollment, choose_node_id};
use crate::node::cluster::read_cluster_file;
use crate::node::{Bell, NodeState, PlanState, Workloads};
use crate::overlay::{OverlayHandle, OverlayParts};
use crate::profile_runner::{
    BOOT_RUN_WAIT, BootRun, ProfileParts, ProfileRunner, still_running_note,
};
use crate::status::{
    AgentRun, AgentStatus, ControlState, ControlStatus, SnapshotWriter, StatusBoard, http,
};
use crate::store::{Identity, META_LAST_SYNC_UNIX, Store, StoreHealth, last_good};
use crate::sync::SyncParts;
use crate::sync::artifacts::ArtifactParts;
use crate::sync::promote;

const TICK: Duration = Duration::from_millis(250);
/// How long a starting agent waits for the store's lock to be let go by a predecessor that was
/// just killed (see `Store::open_for_boot_waiting`) before it says another agent holds it.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(3);

/// The composition root: every handle of the running agent, made once at boot. Threads never
/// see this; each gets the parts it needs (`*_parts`), so what a thread can touch is in its
/// signature.
pub struct Agent {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub node: Arc<NodeState>,
    pub plan: Arc<PlanState>,
    pub workloads: Arc<Workloads>,
    /// Wakes the heartbeat thread early when allocation states change.
    pub heartbeat: Arc<Bell>,
    /// When the next heartbeat is due: the feed's poll gives way to it (sync::wire).
    pub beats: Arc<crate::sync::wire::BeatSchedule>,
    /// The WireGuard overlay: key and apply thread (crate::overlay).
    pub overlay: Arc<OverlayHandle>,
    /// The session with control; registering never holds a lock (link::session).
    pub enrollment: Enrollment,
    /// Self-update (crate::upgrade).
    pub upgrades: Arc<crate::upgrade::Upgrades>,
}

impl Agent {
    /// Wires the handles together.
    fn assemble(
        config: AgentConfig,
        store: Arc<Store>,
        board: StatusBoard,
        supervisor: Supervisor,
        node: NodeState,
        plan: Option<Plan>,
        empty: Plan,
    ) -> Self {
        let config = Arc::new(config);
        let overlay = Arc::new(OverlayHandle::new(config.overlay.clone()));
        let plan = Arc::new(PlanState::new(
            plan,
            empty,
            read_cluster_file(&config.data_dir),
            store.clone(),
            board.clone(),
            overlay.plan_changed(),
            config.data_dir.clone(),
        ));
        let node = Arc::new(node);
        let overlay_parts = OverlayParts {
            config: config.clone(),
            store: store.clone(),
            board: board.clone(),
            node: node.clone(),
            plan: plan.clone(),
            overlay: overlay.clone(),
        };
        let enrollment = Enrollment::new(
            config.clone(),
            store.clone(),
            board.clone(),
            node.clone(),
            plan.clone(),
            overlay_parts,
        );
        Self {
            config,
            store,
            board,
            node,
            plan,
            workloads: Arc::new(Workloads::new(supervisor)),
            heartbeat: Arc::new(Bell::default()),
            beats: Arc::default(),
            overlay,
            enrollment,
            upgrades: Arc::default(),
        }
    }

    pub fn node_id(&self) -> String {
        self.node.node_id()
    }

    pub fn overlay_parts(&self) -> OverlayParts {
        self.enrollment.overlay.clone()
    }

    pub fn artifact_parts(&self) -> ArtifactParts {
        ArtifactParts {
            config: self.config.clone(),
            store: self.store.clone(),
            board: self.board.clone(),
            plan: self.plan.clone(),
            enrollment: self.enrollment.clone(),
        }
    }

    pub fn sync_parts(&self) -> SyncParts {
        SyncParts {
            config: self.config.clone(),
            store: self.store.clone(),
            board: self.board.clone(),
            node: self.node.clone(),
            plan: self.plan.clone(),
            workloads: self.workloads.clone(),
            enrollment: self.enrollment.clone(),
            heartbeat: self.heartbeat.clone(),
            beats: self.beats.clone(),
            overlay: self.overlay_parts(),
            artifacts: self.artifact_parts(),
            upgrades: self.upgrades.clone(),
        }
    }

    pub fn site_parts(&self) -> SiteParts {
        SiteParts {
            config: self.config.clone(),
            store: self.store.clone(),
            board: self.board.clone(),
            node: self.node.clone(),
            heartbeat: self.heartbeat.clone(),
            enrollment: self.enrollment.clone(),
        }
    }

    pub fn profile_parts(&self) -> ProfileParts {
        ProfileParts {
            config: self.config.clone(),
            store: self.store.clone(),
            board: self.board.clone(),
            workloads: self.workloads.clone(),
            heartbeat: self.heartbeat.clone(),
            enrollment: self.enrollment.clone(),
        }
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
pub fn boot(config: AgentConfig, started_at: Instant) -> anyhow::Result<(Agent, BootReport)> {
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
    // U2: a new binary on trial that stopped is retried or rolled back before anything starts.
    let upgrade = crate::upgrade::at_boot(&store, &data_dir, state.upgrade.clone());
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
    // R4: a plan that never proved healthy is no boot fallback; control sends it again.
    if let Some(generation) = &state.probation {
        let _ = store.discard_probation();
        notes.push(format!(
            "plan generation {} was applied but never became healthy; booted the last-good plan",
            generation.get(..12).unwrap_or(generation)
        ));
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
    // from starting (see profile_runner).
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
    notes.extend(crate::sync::artifacts::check_at_boot(
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
        role: plan.role,
        plan_generation: boot_plan.plan.as_ref().map(Plan::generation),
        last_good: boot_plan.plan.as_ref().map(Plan::generation),
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
        upgrade: upgrade.as_ref().map(crate::upgrade::describe),
    };
    let board = StatusBoard::new(status);
    let node = NodeState::new(node_id, state.identity.clone(), board.clone());
    let mut agent = Agent::assemble(
        config,
        store,
        board,
        supervisor,
        node,
        boot_plan.plan.clone(),
        plan,
    );
    agent.upgrades = Arc::new(crate::upgrade::Upgrades::new(upgrade));
    // A binary on trial starts its deadline before anything that could hang (status port,
    // threads, sync): whatever stops it from reporting healthy later, the deadline still fires.
    agent.upgrades.spawn_deadline(agent.store.clone());

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
    crate::overlay::start(&agent.overlay_parts())?;
    profile.hand_over(agent.profile_parts());
    if crate::upgrade::TEST_FAULT_NEVER_HEALTHY {
        eprintln!(
            "outpost-agent: built with the test fault OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY: not talking to control"
        );
    } else if syncs {
        spawn_sync(&agent)?;
    }
    crate::election::site::spawn(&agent.site_parts())?;
    timeline.mark("threads", started_at);
    tracing::info!(
        component = "agent",
        action = "boot_timeline",
        "boot timeline, ms since process start: {}",
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

fn serve_status(agent: &Agent) -> anyhow::Result<()> {
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
    http::spawn(
        listener,
        agent.board.clone(),
        agent.config.data_dir.join("artifacts"),
    )
    .context("cannot start the status thread")?;
    Ok(())
}

fn spawn_supervision(agent: &Agent) -> anyhow::Result<()> {
    let (workloads, board, heartbeat) = (
        agent.workloads.clone(),
        agent.board.clone(),
        agent.heartbeat.clone(),
    );
    let (plan, store, data_dir) = (
        agent.plan.clone(),
        agent.store.clone(),
        agent.config.data_dir.clone(),
    );
    let healthy_after = Duration::from_secs(agent.config.healthy_after_secs);
    let mut writer = SnapshotWriter::new(&agent.config.data_dir);
    let _ = writer.write_if_changed(&board.snapshot());
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            let mut last_states = Vec::new();
            // Readiness probes run off the supervisor's lock, so a slow probe never blocks
            // status, heartbeats, plan changes or shutdown.
            let probes = OffLockProbes::default();
            loop {
                std::thread::sleep(TICK);
                let probation = promote::on_probation(&plan);
                let (reports, drift, notes, healthy) =
                    probes.round(workloads.mutex(), Instant::now(), |supervisor| {
                        let healthy = probation
                            .as_ref()
                            .map(|p| supervisor.healthy(&p.new, healthy_after, Instant::now()));
                        let notes = supervisor.notes();
                        (supervisor.reports(), supervisor.drift(), notes, healthy)
                    });
                if let (Some(checked), Some(healthy)) = (&probation, healthy) {
                    promote::settle_probation(&plan, &store, &board, &data_dir, checked, healthy);
                }
                let states: Vec<_> = reports
                    .iter()
                    .map(|r| (r.allocation_id.clone(), r.state))
                    .collect();
                if states != last_states {
                    heartbeat.ring();
                    last_states = states;
                }
                board.update(|s| {
                    s.allocations = reports;
                    s.drift = drift;
                    for note in notes {
                        s.note(note);
                    }
                });
                if let Err(error) = writer.write_if_changed(&board.snapshot()) {
                    board.update(|s| s.note(format!("cannot write status.json: {error}")));
                }
            }
        })
        .context("cannot start the supervisor thread")?;
    Ok(())
}

/// Sets the control part of status as boot finds it (not configured, connecting or revoked),
/// before the first status is written. Returns whether the sync threads have anything to do.
fn control_status_at_boot(agent: &Agent) -> bool {
    let identity = agent.node.identity();
    let enrolled = identity.node_credential.is_some() && identity.ca_pem.is_some();
    if !enrolled && agent.config.enroll_token.is_none() && agent.config.site.join_secret.is_none() {
        agent.board.update(|s| {
            s.control.url = agent.config.control_url.clone();
            s.control.state = ControlState::NotConfigured;
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
            s.note(crate::status::REVOKED_NOTE.into());
            ControlState::Revoked
        } else {
            ControlState::Connecting
        };
    });
    true
}

fn spawn_sync(agent: &Agent) -> anyhow::Result<()> {
    let feed = agent.sync_parts();
    std::thread::Builder::new()
        .name("feed".into())
        .spawn(move || crate::sync::feed::run(&feed))
        .context("cannot start the feed thread")?;
    let beat = agent.sync_parts();
    let handle = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || crate::sync::heartbeat::run(&beat))
        .context("cannot start the heartbeat thread")?;
    agent.heartbeat.attach(handle.thread().clone());
    crate::sync::artifacts::spawn(&agent.artifact_parts())
        .context("cannot start the artifacts thread")?;
    Ok(())
}

/// Orderly exit on SIGTERM: optionally stop workloads, write a final status, close the store.
pub fn shutdown(agent: &Agent, workloads: crate::config::WorkloadsOnExit) {
    if workloads == crate::config::WorkloadsOnExit::Stop {
        let deadline = Instant::now() + Duration::from_secs(60);
        agent.workloads.supervisor().stop_all(Instant::now());
        while Instant::now() < deadline {
            let mut supervisor = agent.workloads.supervisor();
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
        s.control.state = ControlState::Stopped;
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
    let board = StatusBoard::default();
    let empty = Plan::empty(outpost_proto::name::name("n", &node_id).unwrap_or_default());
    let node = NodeState::new(node_id, Identity::default(), board.clone());
    Agent::assemble(config, store, board, supervisor, node, plan, empty)
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
