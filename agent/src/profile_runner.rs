//! Runs the environment-profile reconcilers inside the agent (C1–C10, O2): the cached profile at
//! boot before services start, each changed profile control publishes, a retry of a failed run,
//! and a periodic check of actual state. Bootstrap events go to the bounded outbox; the last
//! apply per component goes to status.
//!
//! # When it runs
//! - **Boot**: the cached `DATA_DIR/profile.json` with [`UnchangedPolicy::VerifyActual`] (the
//!   in-process bus and the in-memory index start empty, and a bucket may have been deleted
//!   while the agent was down), on the `profile` thread, before the last-good plan's services
//!   start (C1) — but boot never waits on the network (O2): it waits for this run at most
//!   [`BOOT_RUN_WAIT`] (3 s). With the default adapters (directory, in-process bus, in-memory
//!   index) the run takes milliseconds and C1's order holds. With an external adapter (`s3`,
//!   `amqp`, `weaviate`) whose service is slow or unreachable, a call may take its 10–30 s
//!   timeout; past the wait the services start anyway, with the profile environment they would
//!   have had (it comes from the document, not from the run), status carries a note
//!   ([`still_running_note`]) until the run ends and publishes its own result, and the run goes
//!   on in the background. Chosen over a per-service split (start first the services that need
//!   no profile component) because the plan does not say which service needs which component:
//!   a bounded wait is the same rule for every service, and its note tells the operator.
//!   Retries are short at boot ([`BOOT_RETRY`]) so a dead external service is given up on soon.
//! - **Offline boot when a component fails**: the profile fails closed (the failed component
//!   blocks the ones after it, and nothing is recorded as applied that was not), but the
//!   last-good plan's services start anyway: an edge box is never left without workloads
//!   because an external broker is down (O2). Status says so in a note, the `profile`
//!   component shows the error, and the run is retried every `profile_poll_secs`.
//! - **Fetch**: control's change feed says nothing about the profile, so the `profile` thread
//!   asks `GET /v1/bootstrap/profile` right after the agent registers (a new session) and then
//!   every `profile_poll_secs` (default 30). A profile whose hash differs from the one held is
//!   written atomically to `DATA_DIR/profile.json` and applied with [`UnchangedPolicy::Skip`]:
//!   components whose generation did not change are not even read. The same document again
//!   changes nothing.
//! - **Retry**: a run that did not converge is run again with `Skip` every `profile_poll_secs`
//!   (failed components are never skipped).
//! - **Periodic**: every `profile_verify_secs` (default 600), `VerifyActual`, which repairs
//!   drift such as a bucket deleted by hand. Only its repairs and errors are sent to control; a
//!   clean check sends nothing.
//! - A plan change does not start a run: the plan names no profile resources, so a `Skip` run
//!   after it would skip every component.
//!
//! # What it reports
//! - Per component (`storage`, `broker`, `index`) the last apply, through
//!   [`Agent::record_component`]: `/internal/bootstrap/status`, `status.json` and
//!   `outpost-agent status`. Skipped and out-of-scope components keep their previous record.
//!   The full detail is in `DATA_DIR/profile-status.json` ([`ApplyStatus`]).
//! - The pseudo-component `profile`: the generation is control's profile generation (sha256 of
//!   the profile's JSON, as control computes it), ok when the run converged. It is also sent to
//!   control, so `GET /v1/bootstrap/status` tells which profile a node has applied.
//! - Services get the profile's bucket locations and their own modules, migrations and
//!   parameters as environment variables when they start ([`ProfileEnvironment`]).
//!
//! [`ApplyStatus`]: crate::apply::profile::ApplyStatus

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::bootstrap::{BootstrapEvent, BootstrapStepStatus};
use outpost_proto::hash::sha256_hex;
use outpost_proto::name::Name;
use outpost_proto::profile::EnvironmentProfile;

use crate::apply::process::ProfileEnvironment;
use crate::apply::profile::command::{CACHED_PROFILE_FILE, NODE_ID_FILE, read_profile};
use crate::apply::profile::{
    AdapterConfig, Adapters, BootstrapSink, ComponentApply, DestructivePolicy, Engine, Outcome,
    ReconcileReport, ReconcileRequest, RetryPolicy, RunMode, UnchangedPolicy, bucket_environment,
    build_adapters, service_environment,
};
use crate::config::AgentConfig;
use crate::enroll::Enrollment;
use crate::node::{Bell, Workloads};
use crate::status::StatusBoard;
use crate::store::{ApplyOutcome, Store};

/// What the `profile` thread needs of the running agent.
#[derive(Clone)]
pub struct ProfileParts {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub workloads: Arc<Workloads>,
    /// Rung when components change, so control hears at once.
    pub heartbeat: Arc<Bell>,
    /// The session the profile is fetched over.
    pub enrollment: Enrollment,
}

/// The pseudo-component that records which profile the node applied.
pub const PROFILE_COMPONENT: &str = "profile";
/// Every status note of this module starts with this.
pub const NOTE_PREFIX: &str = "profile: ";
/// Longest time boot waits for the boot run before the last-good plan's services start.
pub const BOOT_RUN_WAIT: Duration = Duration::from_secs(3);
/// Retries at boot: short, so a dead external service is given up on soon.
pub const BOOT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 2,
    base_delay_ms: 200,
    cap_delay_ms: 1_000,
};
/// How often the profile thread looks at its clocks and the session.
const TICK: Duration = Duration::from_secs(1);

/// Why a reconcile runs. Decides the unchanged policy and which events reach control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The cached profile, before services start.
    Boot,
    /// Control published a profile with another hash.
    Fetched,
    /// The previous run did not converge.
    Retry,
    /// The periodic check of actual state.
    Periodic,
}

impl Trigger {
    pub fn unchanged_policy(self) -> UnchangedPolicy {
        match self {
            Trigger::Boot | Trigger::Periodic => UnchangedPolicy::VerifyActual,
            Trigger::Fetched | Trigger::Retry => UnchangedPolicy::Skip,
        }
    }

    /// Which of the run's bootstrap events are sent to control.
    pub fn forwarding(self) -> Forwarding {
        match self {
            Trigger::Periodic => Forwarding::ChangesOnly,
            Trigger::Boot | Trigger::Fetched | Trigger::Retry => Forwarding::All,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Trigger::Boot => "boot",
            Trigger::Fetched => "fetched",
            Trigger::Retry => "retry",
            Trigger::Periodic => "periodic",
        }
    }
}

/// Which bootstrap events go to control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    All,
    /// A component's events only when it changed something or failed: a `start` is held until
    /// its component's outcome is known, and dropped with an `ok` whose action is `noop`.
    ChangesOnly,
}

/// Where the run's bootstrap events end up before they reach the outbox.
pub trait EventQueue {
    fn push(&mut self, event: &BootstrapEvent) -> Result<(), String>;
}

impl EventQueue for Arc<Store> {
    fn push(&mut self, event: &BootstrapEvent) -> Result<(), String> {
        self.push_outbox(event).map_err(|error| error.to_string())
    }
}

impl EventQueue for Vec<BootstrapEvent> {
    fn push(&mut self, event: &BootstrapEvent) -> Result<(), String> {
        Vec::push(self, event.clone());
        Ok(())
    }
}

/// The engine's [`BootstrapSink`]: pushes events into the agent's bounded redb outbox, which
/// the heartbeat thread flushes to `POST /v1/bootstrap/events`, filtered by [`Forwarding`].
pub struct OutboxSink<Q: EventQueue> {
    queue: Q,
    forwarding: Forwarding,
    held: Vec<BootstrapEvent>,
    pub forwarded: usize,
    pub last_push_error: Option<String>,
}

impl<Q: EventQueue> OutboxSink<Q> {
    pub fn new(queue: Q, forwarding: Forwarding) -> Self {
        Self {
            queue,
            forwarding,
            held: Vec::new(),
            forwarded: 0,
            last_push_error: None,
        }
    }

    fn forward(&mut self, event: &BootstrapEvent) {
        match self.queue.push(event) {
            Ok(()) => self.forwarded += 1,
            Err(error) => self.last_push_error = Some(error),
        }
    }

    pub fn into_queue(self) -> Q {
        self.queue
    }
}

impl<Q: EventQueue> BootstrapSink for OutboxSink<Q> {
    fn accept(&mut self, event: &BootstrapEvent) {
        if self.forwarding == Forwarding::All {
            self.forward(event);
            return;
        }
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|held| held.component == event.component);
        self.held = others;
        match event.status {
            BootstrapStepStatus::Start => {
                self.held.extend(mine);
                self.held.push(event.clone());
            }
            BootstrapStepStatus::Ok if event.action == "noop" => {}
            BootstrapStepStatus::Ok | BootstrapStepStatus::Error => {
                for held in &mine {
                    self.forward(held);
                }
                self.forward(event);
            }
        }
    }
}

/// Control's generation of a profile: sha256 of its JSON (control computes it the same way).
pub fn profile_generation(profile: &EnvironmentProfile) -> String {
    sha256_hex(&serde_json::to_vec(profile).unwrap_or_default())
}

fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::Unchanged => "unchanged",
        Outcome::Skipped => "skipped",
        Outcome::OutOfScope => "out of scope",
        Outcome::NeedsAttention => "needs attention",
        Outcome::Failed => "failed",
        Outcome::Blocked => "blocked",
    }
}

/// The status record of one component's apply, or `None` when the previous record stands
/// (skipped: nothing was done; out of scope: not this node's concern).
pub fn status_record(apply: &ComponentApply) -> Option<crate::store::ComponentApply> {
    let (status, generation) = match apply.outcome {
        Outcome::Skipped | Outcome::OutOfScope => return None,
        Outcome::Applied | Outcome::Unchanged | Outcome::NeedsAttention => (
            ApplyOutcome::Ok,
            apply
                .applied_generation
                .clone()
                .unwrap_or_else(|| apply.generation.clone()),
        ),
        Outcome::Failed | Outcome::Blocked => (ApplyOutcome::Error, apply.generation.clone()),
    };
    let outcome = outcome_text(apply.outcome);
    Some(crate::store::ComponentApply {
        generation,
        status,
        message: match &apply.message {
            Some(message) => format!("{outcome}: {message}"),
            None => outcome.to_string(),
        },
        at_unix: apply.finished_at_unix,
    })
}

/// One line over every component: `storage applied, broker unchanged, index skipped`, with the
/// first failure's message.
pub fn run_summary(report: &ReconcileReport) -> String {
    let mut parts: Vec<String> = report
        .components
        .iter()
        .map(|apply| {
            format!(
                "{} {}",
                apply.component.as_str(),
                outcome_text(apply.outcome)
            )
        })
        .collect();
    if let Some(failed) = report
        .components
        .iter()
        .find(|apply| apply.outcome == Outcome::Failed)
    {
        parts.push(format!(
            "{}: {}",
            failed.component.as_str(),
            failed.message.as_deref().unwrap_or("failed")
        ));
    }
    parts.join(", ")
}

/// The first component that failed, for notes.
fn first_failure(report: &ReconcileReport) -> Option<&ComponentApply> {
    report
        .components
        .iter()
        .find(|apply| apply.outcome == Outcome::Failed)
}

/// What the profile adds to allocations' environments: bucket locations (when the adapters are
/// known) and each named service's own modules, migrations and parameters.
pub fn profile_environment(
    profile: &EnvironmentProfile,
    adapters: Option<&AdapterConfig>,
) -> ProfileEnvironment {
    ProfileEnvironment {
        shared: adapters
            .map(|config| bucket_environment(profile, config))
            .unwrap_or_default(),
        per_service: profile
            .spec
            .services
            .iter()
            .map(|entry| {
                (
                    entry.service.to_string(),
                    service_environment(profile, &entry.service),
                )
            })
            .collect(),
    }
}

/// The profile being applied.
#[derive(Debug, Clone)]
struct HeldProfile {
    profile: EnvironmentProfile,
    generation: String,
}

/// The reconcilers of one agent process. Built at boot, then owned by the `profile` thread.
pub struct ProfileRunner {
    data_dir: PathBuf,
    node_id: Result<Name, String>,
    store: Arc<Store>,
    /// Built once and kept: the in-process bus and the in-memory index live in them.
    adapters: Result<(AdapterConfig, Adapters), String>,
    profile: Option<HeldProfile>,
    /// The last run did not converge and may succeed if run again.
    retry_wanted: bool,
    /// Status records not yet handed to the agent.
    records: Vec<(String, crate::store::ComponentApply)>,
    /// The note about the last run, and the one about fetching.
    run_note: Option<String>,
    fetch_note: Option<String>,
    /// Bootstrap events queued since the agent last heard.
    events_queued: usize,
    /// The notes and environment last handed to the agent.
    published: Option<(Vec<String>, ProfileEnvironment)>,
    poll_secs: u64,
}

impl ProfileRunner {
    /// Reads the cached profile and builds the adapters, touching no network; the boot run
    /// itself is [`ProfileRunner::start_boot_run`] (or [`ProfileRunner::boot`]). Never fails:
    /// whatever goes wrong is in the records and notes.
    pub fn prepare(
        config: &AgentConfig,
        node_id: &str,
        store: Arc<Store>,
        environment: &BTreeMap<String, String>,
    ) -> Self {
        // The external adapters' ureq agents are built without a provider (rustls-no-provider);
        // they talk to arbitrary servers, so they get ring's full default provider. Builds
        // without them leave it out (link/pinning.rs has the control link's smaller one).
        #[cfg(any(feature = "s3", feature = "weaviate"))]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let data_dir = config.data_dir.clone();
        let node_id_result = outpost_proto::name::name("node id", node_id)
            .map_err(|error| format!("node id {node_id:?} is not usable: {error}"));
        let mut runner = Self {
            adapters: AdapterConfig::from_environment(environment, &data_dir)
                .map_err(|error| format!("cannot choose profile adapters: {error}"))
                .and_then(|adapter_config| {
                    build_adapters(&adapter_config)
                        .map(|adapters| (adapter_config, adapters))
                        .map_err(|error| format!("cannot build profile adapters: {error}"))
                }),
            data_dir,
            node_id: node_id_result,
            store,
            profile: None,
            retry_wanted: false,
            records: Vec::new(),
            run_note: None,
            fetch_note: None,
            events_queued: 0,
            published: None,
            poll_secs: config.profile_poll_secs,
        };
        let cached = runner.data_dir.join(CACHED_PROFILE_FILE);
        if cached.exists() {
            match read_profile(&cached) {
                Ok(profile) => {
                    runner.profile = Some(HeldProfile {
                        generation: profile_generation(&profile),
                        profile,
                    });
                }
                Err(error) => {
                    runner.fetch_note = Some(format!(
                        "{NOTE_PREFIX}cached profile unusable ({error:#}); nothing applied, waiting for control"
                    ));
                }
            }
        }
        runner
    }

    /// [`ProfileRunner::prepare`], then the boot run on this thread (for tests and tools that
    /// may wait).
    pub fn boot(
        config: &AgentConfig,
        node_id: &str,
        store: Arc<Store>,
        environment: &BTreeMap<String, String>,
    ) -> Self {
        let mut runner = Self::prepare(config, node_id, store, environment);
        runner.write_node_id_file();
        runner.reconcile(Trigger::Boot);
        runner
    }

    /// Starts the `profile` thread, which first reconciles the cached profile (if any) with
    /// `VerifyActual`, then waits for the running agent ([`ProfileThread::hand_over`]). Boot
    /// waits for that first run at most [`BOOT_RUN_WAIT`] (see the module docs).
    pub fn start_boot_run(mut self) -> anyhow::Result<ProfileThread> {
        use anyhow::Context;
        let (boot_run_done, boot_run) = std::sync::mpsc::sync_channel(1);
        let (hand_over, handed_over) = std::sync::mpsc::sync_channel::<ProfileParts>(1);
        std::thread::Builder::new()
            .name("profile".into())
            .spawn(move || {
                self.reconcile(Trigger::Boot);
                let _ = boot_run_done.send(());
                // After boot stopped waiting: a durable write only `outpost-agent reconcile`
                // reads.
                self.write_node_id_file();
                // Boot failed after starting this thread: nothing to publish to.
                let Ok(agent) = handed_over.recv() else {
                    return;
                };
                self.publish(&agent);
                self.run(&agent);
            })
            .context("cannot start the profile thread")?;
        Ok(ProfileThread {
            boot_run,
            hand_over,
        })
    }

    /// `outpost-agent reconcile` finds the node id here.
    fn write_node_id_file(&mut self) {
        let Ok(node_id) = &self.node_id else { return };
        let path = self.data_dir.join(NODE_ID_FILE);
        if std::fs::read_to_string(&path).is_ok_and(|text| text.trim() == node_id.as_str()) {
            return;
        }
        if let Err(error) = crate::os::atomic_write(&path, format!("{node_id}\n").as_bytes()) {
            self.fetch_note = Some(format!(
                "{NOTE_PREFIX}cannot write {}: {error}",
                path.display()
            ));
        }
    }

    /// What the profile adds to allocations' environments.
    pub fn environment(&self) -> ProfileEnvironment {
        match &self.profile {
            Some(held) => profile_environment(
                &held.profile,
                self.adapters.as_ref().ok().map(|(config, _)| config),
            ),
            None => ProfileEnvironment::default(),
        }
    }

    /// The generation of the profile held (control's), if any.
    pub fn profile_generation(&self) -> Option<&str> {
        self.profile.as_ref().map(|held| held.generation.as_str())
    }

    /// Whether the last run converged (every component good or out of scope).
    pub fn converged(&self) -> bool {
        !self.retry_wanted
    }

    /// Status records not yet handed out, oldest first.
    pub fn take_records(&mut self) -> Vec<(String, crate::store::ComponentApply)> {
        std::mem::take(&mut self.records)
    }

    /// The current notes of this module (each starts with [`NOTE_PREFIX`]).
    pub fn notes(&self) -> Vec<String> {
        self.fetch_note
            .iter()
            .chain(self.run_note.iter())
            .cloned()
            .collect()
    }

    /// Takes a profile from control: when its hash differs from the one held, caches it in
    /// `DATA_DIR/profile.json` (atomically) and returns true.
    pub fn take_profile(&mut self, profile: EnvironmentProfile) -> bool {
        let generation = profile_generation(&profile);
        if self.profile_generation() == Some(generation.as_str()) {
            self.fetch_note = None;
            return false;
        }
        let bytes = serde_json::to_vec_pretty(&profile).unwrap_or_default();
        let path = self.data_dir.join(CACHED_PROFILE_FILE);
        self.fetch_note = crate::os::atomic_write(&path, &bytes).err().map(|error| {
            format!(
                "{NOTE_PREFIX}cannot cache the profile in {}: {error}; applied from memory",
                path.display()
            )
        });
        self.profile = Some(HeldProfile {
            profile,
            generation,
        });
        true
    }

    /// Records that fetching failed (the held profile stays in force).
    pub fn fetch_failed(&mut self, error: &str) {
        let held = match self.profile_generation() {
            Some(generation) => format!("profile {} stays in force", short(generation)),
            None => "no profile applied yet".to_string(),
        };
        self.fetch_note = Some(format!(
            "{NOTE_PREFIX}cannot fetch from control ({error}); {held}"
        ));
    }

    /// Whether a retry would do anything.
    pub fn retry_wanted(&self) -> bool {
        self.retry_wanted && self.profile.is_some()
    }

    fn record(&mut self, component: &str, apply: crate::store::ComponentApply) {
        self.records.push((component.to_string(), apply));
    }

    /// Records a failure that stopped the run before any component was tried.
    fn fail_before_start(&mut self, trigger: Trigger, message: String, retry: bool) {
        let generation = self
            .profile_generation()
            .map(str::to_string)
            .unwrap_or_default();
        self.record(
            PROFILE_COMPONENT,
            crate::store::ComponentApply {
                generation: generation.clone(),
                status: ApplyOutcome::Error,
                message: message.clone(),
                at_unix: crate::os::unix_now_secs(),
            },
        );
        if let Ok(node_id) = self.node_id.clone() {
            let event = BootstrapEvent {
                node_id,
                component: PROFILE_COMPONENT.into(),
                action: trigger.as_str().into(),
                status: BootstrapStepStatus::Error,
                message: Some(outpost_proto::validate::shorten(&message)),
                generation: Some(generation),
            };
            let mut queue = self.store.clone();
            if queue.push(&event).is_ok() {
                self.events_queued += 1;
            }
        }
        self.retry_wanted = retry;
        self.run_note = Some(format!(
            "{NOTE_PREFIX}{message}; the last-good plan's services run anyway"
        ));
    }

    /// Runs the reconcilers once on the held profile. Returns the report, if the engine ran.
    pub fn reconcile(&mut self, trigger: Trigger) -> Option<ReconcileReport> {
        let held = self.profile.clone()?;
        let node_id = match &self.node_id {
            Ok(node_id) => node_id.clone(),
            Err(error) => {
                let error = error.clone();
                self.fail_before_start(trigger, error, false);
                return None;
            }
        };
        let (adapter_config, adapters) = match &mut self.adapters {
            Ok((config, adapters)) => (config.clone(), adapters),
            Err(error) => {
                let error = error.clone();
                self.fail_before_start(trigger, error, false);
                return None;
            }
        };
        let mut sink = OutboxSink::new(self.store.clone(), trigger.forwarding());
        let result = {
            let mut engine = Engine::new(node_id.clone(), &self.data_dir, adapters, &mut sink);
            if trigger == Trigger::Boot {
                engine.retry = BOOT_RETRY;
            }
            engine.reconcile(&ReconcileRequest {
                profile: &held.profile,
                components: &adapter_config.components,
                unchanged: trigger.unchanged_policy(),
                destructive: DestructivePolicy::Withhold,
                mode: RunMode::Apply,
            })
        };
        self.events_queued += sink.forwarded;
        let push_error = sink.last_push_error.clone();
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                self.fail_before_start(
                    trigger,
                    format!("profile {} not applied: {error}", short(&held.generation)),
                    false,
                );
                return None;
            }
        };
        for apply in &report.components {
            if let Some(record) = status_record(apply) {
                self.record(apply.component.as_str(), record);
            }
        }
        let was_converged = !self.retry_wanted;
        self.retry_wanted = !report.services_may_start;
        // A periodic check that changed nothing and failed nothing stays quiet.
        let worth_reporting = match trigger {
            Trigger::Boot | Trigger::Fetched | Trigger::Retry => true,
            Trigger::Periodic => sink.forwarded > 0 || was_converged != report.services_may_start,
        };
        if worth_reporting {
            let summary = run_summary(&report);
            let status = if report.services_may_start {
                BootstrapStepStatus::Ok
            } else {
                BootstrapStepStatus::Error
            };
            self.record(
                PROFILE_COMPONENT,
                crate::store::ComponentApply {
                    generation: held.generation.clone(),
                    status: if report.services_may_start {
                        ApplyOutcome::Ok
                    } else {
                        ApplyOutcome::Error
                    },
                    message: format!("{} ({}): {summary}", held.name(), trigger.as_str()),
                    at_unix: crate::os::unix_now_secs(),
                },
            );
            let event = BootstrapEvent {
                node_id,
                component: PROFILE_COMPONENT.into(),
                action: "apply".into(),
                status,
                message: Some(outpost_proto::validate::shorten(&summary)),
                generation: Some(held.generation.clone()),
            };
            let mut queue = self.store.clone();
            if queue.push(&event).is_ok() {
                self.events_queued += 1;
            }
        }
        self.run_note = match first_failure(&report) {
            Some(failed) => Some(format!(
                "{NOTE_PREFIX}{} failed ({}); later components wait; {}; retrying every {} s",
                failed.component.as_str(),
                failed.message.as_deref().unwrap_or("no message"),
                if trigger == Trigger::Boot {
                    "the last-good plan's services started anyway so the node keeps its workloads"
                } else {
                    "services keep running"
                },
                self.poll_secs
            )),
            None => push_error.map(|error| {
                format!("{NOTE_PREFIX}cannot queue bootstrap events for control: {error}")
            }),
        };
        Some(report)
    }

    /// Hands the records, notes and environment to the running agent; wakes the heartbeat when
    /// events are waiting for control.
    pub fn publish(&mut self, agent: &ProfileParts) {
        for (component, apply) in self.take_records() {
            crate::node::record_component(&agent.store, &agent.board, &component, apply);
        }
        let current = (self.notes(), self.environment());
        if self.published.as_ref() != Some(&current) {
            let (notes, environment) = current.clone();
            agent.board.update(|status| {
                status.notes.retain(|note| !note.starts_with(NOTE_PREFIX));
                for note in notes {
                    status.note(note);
                }
            });
            agent
                .workloads
                .supervisor()
                .set_profile_environment(environment);
            self.published = Some(current);
        }
        if self.events_queued > 0 {
            self.events_queued = 0;
            agent.heartbeat.ring();
        }
    }

    /// The `profile` thread: fetch, retry, verify (see the module docs). Runs until the process
    /// exits.
    fn run(mut self, agent: &ProfileParts) {
        let poll = Duration::from_secs(agent.config.profile_poll_secs);
        let verify = Duration::from_secs(agent.config.profile_verify_secs);
        let mut clock = Clock::new(Instant::now());
        loop {
            std::thread::sleep(TICK);
            let now = Instant::now();
            // Never waits for a registration in flight.
            let session = agent.enrollment.current_session();
            let due = clock.due(
                now,
                session.is_some(),
                self.retry_wanted(),
                self.profile.is_some(),
                poll,
                verify,
            );
            let mut trigger = None;
            if due.fetch
                && let Some(session) = session
            {
                match session.client.profile() {
                    Ok(profile) => {
                        if self.take_profile(profile) {
                            trigger = Some(Trigger::Fetched);
                        }
                    }
                    Err(error) => self.fetch_failed(&error.to_string()),
                }
            }
            if trigger.is_none() && due.verify {
                trigger = Some(Trigger::Periodic);
            }
            if trigger.is_none() && due.retry {
                trigger = Some(Trigger::Retry);
            }
            if let Some(trigger) = trigger {
                self.reconcile(trigger);
                clock.ran(now, trigger);
            }
            self.publish(agent);
        }
    }
}

/// The `profile` thread between boot and the running agent.
pub struct ProfileThread {
    boot_run: std::sync::mpsc::Receiver<()>,
    hand_over: std::sync::mpsc::SyncSender<ProfileParts>,
}

/// What boot learned of the profile's boot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootRun {
    /// Ended (converged or not) before services start: C1's order held.
    Ended,
    /// Still running past the wait (a slow or unreachable external service): services start
    /// without it.
    StillRunning,
}

impl ProfileThread {
    /// Waits at most `wait` for the boot run to end.
    pub fn wait_for_boot_run(&self, wait: Duration) -> BootRun {
        match self.boot_run.recv_timeout(wait) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => BootRun::Ended,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => BootRun::StillRunning,
        }
    }

    /// Gives the thread the running agent: it publishes the boot run (once it has ended), then
    /// fetches, retries and verifies.
    pub fn hand_over(self, parts: ProfileParts) {
        let _ = self.hand_over.send(parts);
    }
}

/// The status note while the boot run outlasts [`BOOT_RUN_WAIT`]; replaced by the run's own
/// notes when it ends.
pub fn still_running_note(wait: Duration) -> String {
    format!(
        "{NOTE_PREFIX}the cached profile's boot run was still going after {} ms (an external service is slow or unreachable); the last-good plan's services started without waiting for it",
        wait.as_millis()
    )
}

impl HeldProfile {
    fn name(&self) -> String {
        if self.profile.metadata.name.is_empty() {
            format!("profile {}", short(&self.generation))
        } else {
            format!(
                "profile {:?} {}",
                self.profile.metadata.name,
                short(&self.generation)
            )
        }
    }
}

fn short(generation: &str) -> &str {
    generation.get(..12).unwrap_or(generation)
}

/// What is due in one tick of the `profile` thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    pub fetch: bool,
    pub retry: bool,
    pub verify: bool,
}

/// The `profile` thread's timing, as plain data over instants (no clock inside).
#[derive(Debug, Clone)]
pub struct Clock {
    had_session: bool,
    /// Retries since the last converged run: the retry interval doubles from `poll` up to
    /// `verify` (C6).
    retry_attempt: u32,
    last_fetch: Option<Instant>,
    last_run: Instant,
    last_verify: Instant,
}

impl Clock {
    /// `booted_at`: the boot run was a verification.
    pub fn new(booted_at: Instant) -> Self {
        Self {
            had_session: false,
            retry_attempt: 0,
            last_fetch: None,
            last_run: booted_at,
            last_verify: booted_at,
        }
    }

    /// Fetch at once when a session appears (the agent registered), then every `poll`; retry
    /// a run that did not converge after `poll`, then twice as long each time up to `verify`;
    /// verify every `verify`.
    pub fn due(
        &mut self,
        now: Instant,
        has_session: bool,
        retry_wanted: bool,
        has_profile: bool,
        poll: Duration,
        verify: Duration,
    ) -> Due {
        let new_session = has_session && !self.had_session;
        self.had_session = has_session;
        let fetch = has_session
            && (new_session
                || self
                    .last_fetch
                    .is_none_or(|at| now.saturating_duration_since(at) >= poll));
        if fetch {
            self.last_fetch = Some(now);
        }
        if !retry_wanted {
            self.retry_attempt = 0;
        }
        let retry_after = poll
            .saturating_mul(1u32 << self.retry_attempt.min(16))
            .min(verify.max(poll));
        Due {
            fetch,
            retry: retry_wanted && now.saturating_duration_since(self.last_run) >= retry_after,
            verify: has_profile && now.saturating_duration_since(self.last_verify) >= verify,
        }
    }

    /// A run happened at `now`.
    pub fn ran(&mut self, now: Instant, trigger: Trigger) {
        self.last_run = now;
        if trigger == Trigger::Retry {
            self.retry_attempt = self.retry_attempt.saturating_add(1);
        }
        if trigger.unchanged_policy() == UnchangedPolicy::VerifyActual {
            self.last_verify = now;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
