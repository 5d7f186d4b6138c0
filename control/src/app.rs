//! The control service's core: the store, views, feed tail and settings held together, the one
//! path every write takes (commands validated one at a time, group-committed in one store
//! transaction per batch, then fanned out), and the background followers (projector,
//! scheduler, node liveness).

pub mod group_commit;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard, Semaphore};

use crate::api::error::ApiError;
use crate::feed::{FeedHub, NodeSettings, TAIL_EVENTS};
use crate::init::{ClusterIdentity, InitError, StartKind};
use crate::log::Event;
use crate::projection::NodeState;
use crate::projection::projector::Projector;
use crate::scheduler::{Decision, handover_candidates, next_review_unix_ms, schedule};
use crate::store::{Commit, CommitOutcome, Sharing, Store, TableWrite};
use group_commit::GroupCommitter;
use status::{Refresh, StatusBoard};

/// How often the status board writes changed records back to the store.
pub const STATUS_WRITE_BACK: Duration = Duration::from_secs(1);

/// How often a replica sharing its store looks for events other replicas appended.
pub const SHARED_LOG_POLL: Duration = Duration::from_millis(200);

/// Wall-clock time, behind a trait so tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now_unix_ms(&self) -> u64;
    fn now_unix_secs(&self) -> u64 {
        self.now_unix_ms() / 1000
    }
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A fake clock for tests: stands in for wall-clock time and moves only when told.
pub struct ManualClock {
    now_unix_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(now_unix_ms: u64) -> Self {
        Self {
            now_unix_ms: AtomicU64::new(now_unix_ms),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.now_unix_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.now_unix_ms.load(Ordering::SeqCst)
    }
}

/// Runtime settings of the core, validated by [`crate::config`].
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSettings {
    /// URL nodes use to reach control (tokens, plans).
    pub public_url: String,
    pub gateway_url: String,
    pub node_ttl_secs: u32,
    pub cpu_overcommit_ratio: f64,
    /// How long read-your-writes endpoints wait for the projections.
    pub projection_wait: Duration,
    /// Most plan (snapshot) requests served at once; more get 429.
    pub plan_requests_max: usize,
    /// How often node liveness is checked.
    pub liveness_interval: Duration,
    /// Whether the liveness and scheduler followers run on their own.
    pub followers: Followers,
    /// Join secret and leadership epoch of a self-elected control (D2, D6).
    pub site: crate::discovery::SiteSettings,
    /// Overlay network and interface for node plans (P9).
    pub overlay: crate::overlay::OverlayConfig,
    /// The master key(s) wrapping secrets' data keys (P11); never stored in the store.
    pub master_keys: crate::secret::MasterKeyring,
    /// Where artifact bytes live and the largest upload (R1).
    pub artifacts: crate::artifact::ArtifactConfig,
    /// The release public key (base64 ed25519) handed to nodes at enrollment (U2).
    pub release_public_key: Option<String>,
}

/// Whether background followers run by themselves or only when a test calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followers {
    Automatic,
    /// The scheduler still follows the projector; liveness runs only when called.
    LivenessOnDemand,
}

impl ControlSettings {
    pub fn for_url(public_url: &str) -> Self {
        Self {
            public_url: public_url.to_string(),
            gateway_url: String::new(),
            node_ttl_secs: 30,
            cpu_overcommit_ratio: crate::scheduler::DEFAULT_CPU_OVERCOMMIT_RATIO,
            projection_wait: Duration::from_secs(5),
            plan_requests_max: 64,
            liveness_interval: Duration::from_secs(1),
            followers: Followers::Automatic,
            site: crate::discovery::SiteSettings::default(),
            overlay: crate::overlay::OverlayConfig::default(),
            master_keys: crate::secret::MasterKeyring::ephemeral(),
            artifacts: crate::artifact::ArtifactConfig::default(),
            release_public_key: None,
        }
    }
}

/// Proof that the caller holds the command lock: commands are validated one at a time, and
/// the commit a guard stages carries the views checkpoint it validated against, so a write it
/// could not see is a conflict rather than a lost update ([`group_commit`]).
pub struct CommandGuard<'a> {
    _lock: MutexGuard<'a, ()>,
    validated_at: u64,
}

pub struct Control {
    pub store: Arc<dyn Store>,
    pub settings: ControlSettings,
    pub identity: ClusterIdentity,
    pub projector: Arc<Projector>,
    pub hub: Arc<FeedHub>,
    pub clock: Arc<dyn Clock>,
    /// Caps concurrent plan (snapshot) requests.
    pub plan_permits: Arc<Semaphore>,
    /// Staged commands and the writer that appends them in batches.
    pub committer: Arc<GroupCommitter>,
    /// Heartbeats and allocation states, latest per key, off the command path.
    pub status: Arc<StatusBoard>,
    /// Prometheus metrics (`--metrics-listen`).
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// Refused attempts on another org's objects, coalesced and bounded (audit).
    pub refusals: Arc<crate::audit::RefusalLog>,
    command_lock: Mutex<()>,
    started_at_unix_ms: u64,
    /// When the scheduler must look again without a new event (`u64::MAX`: no need).
    next_scheduler_review_unix_ms: AtomicU64,
}

/// What a start found and did.
pub struct Started {
    pub control: Arc<Control>,
    pub kind: StartKind,
    /// The admin token, shown once: only on a cold start.
    pub admin_token: Option<String>,
}

/// How often the rollout driver looks at reported states while a rollout progresses.
pub const ROLLOUT_POLL: Duration = Duration::from_millis(500);

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
}

impl Control {
    /// Opens the control on a store: initializes it on a cold start, loads it on a warm one,
    /// and starts the followers.
    pub async fn start(
        store: Arc<dyn Store>,
        settings: ControlSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Started, InitError> {
        let now = clock.now_unix_ms();
        // The CA key and credentials are sealed under the master key below this point; an
        // older store's plaintext ones are sealed in place first.
        let keyring = settings.master_keys.clone();
        let raw_store = store;
        let store: Arc<dyn Store> = Arc::new(crate::secret::sealed_records::SealingStore::new(
            Arc::clone(&raw_store),
            keyring.clone(),
        ));
        let init_store = Arc::clone(&store);
        let (identity, kind, admin_token, position, projector, status) =
            tokio::task::spawn_blocking(move || {
                let sealed = crate::secret::sealed_records::seal_plaintext_records(
                    raw_store.as_ref(),
                    &keyring,
                    now,
                )?;
                if sealed > 0 {
                    tracing::info!(
                        "sealed {sealed} plaintext record(s) (CA key, credentials) under the master key"
                    );
                }
                let (identity, kind, admin_token) =
                    crate::init::initialize_or_load(init_store.as_ref(), now)?;
                let position = init_store.log_position()?;
                let projector = Projector::load(init_store.as_ref());
                let status = StatusBoard::load(init_store.as_ref())?;
                Ok::<_, InitError>((identity, kind, admin_token, position, projector, status))
            })
            .await
            .map_err(|e| InitError::Task(e.to_string()))??;
        let hub = Arc::new(FeedHub::new(position, TAIL_EVENTS));
        let refusals = {
            let store = Arc::clone(&store);
            Arc::new(
                tokio::task::spawn_blocking(move || crate::audit::RefusalLog::load(store.as_ref()))
                    .await
                    .unwrap_or_default(),
            )
        };
        let control = Arc::new(Control {
            plan_permits: Arc::new(Semaphore::new(settings.plan_requests_max)),
            store: Arc::clone(&store),
            settings,
            identity,
            projector: Arc::clone(&projector),
            hub: Arc::clone(&hub),
            clock,
            committer: Arc::new(GroupCommitter::new()),
            status: Arc::new(status),
            metrics: Arc::new(crate::metrics::ControlMetrics::new(
                &hub.fanout,
                &projector.lag,
            )),
            refusals,
            command_lock: Mutex::new(()),
            started_at_unix_ms: now,
            next_scheduler_review_unix_ms: AtomicU64::new(u64::MAX),
        });
        tokio::spawn(Arc::clone(&control).write_batches());
        tokio::spawn(Arc::clone(&control).write_back_status());
        tokio::spawn(Arc::clone(&projector).run(Arc::clone(&store), hub.subscribe()));
        tokio::spawn(Arc::clone(&control).follow_scheduling());
        if control.store.shared() == Sharing::SeveralWriters {
            tokio::spawn(Arc::clone(&control).follow_shared_log());
        }
        if control.settings.followers == Followers::Automatic {
            tokio::spawn(Arc::clone(&control).follow_liveness());
            tokio::spawn(Arc::clone(&control).follow_rollouts());
        }
        Ok(Started {
            control,
            kind,
            admin_token,
        })
    }

    /// Takes the command lock, then gives the views a moment to reach the durable log head so
    /// the command checks against current state. Commands staged before and not yet durable
    /// are not waited for: a command that writes what they write conflicts instead.
    pub async fn lock_commands(&self) -> CommandGuard<'_> {
        let lock = self.command_lock.lock().await;
        self.views_reach_head().await;
        CommandGuard {
            _lock: lock,
            validated_at: self.projector.checkpoint(),
        }
    }

    /// The command lock with nothing staged and the views at the log head: for commands that
    /// read everything (the scheduler, revocation, overlay reports, epoch rotation).
    pub async fn lock_commands_settled(&self) -> CommandGuard<'_> {
        let lock = self.command_lock.lock().await;
        self.committer.wait_idle().await;
        self.views_reach_head().await;
        CommandGuard {
            _lock: lock,
            validated_at: self.projector.checkpoint(),
        }
    }

    async fn views_reach_head(&self) {
        let head = self.hub.position().head;
        let patience = self.settings.projection_wait.min(Duration::from_secs(1));
        if self.projector.wait_for(head, patience).await.is_err() {
            tracing::warn!("views lag the log head {head}; the command checks against older views");
        }
    }

    /// After a conflict: waits until the writes staged before are durable and the views show
    /// them (and, with a shared store, other replicas' appends), so the command can validate
    /// again.
    pub async fn catch_up_after_conflict(&self) -> Result<(), ApiError> {
        self.committer.wait_idle().await;
        self.follow_log_once().await?;
        self.views_reach_head().await;
        Ok(())
    }

    /// Catches the feed tail (and so the projector) up with events other replicas appended,
    /// and with an epoch another replica set. Nothing to do for a store only this process writes.
    pub async fn follow_log_once(&self) -> Result<(), ApiError> {
        if self.store.shared() == Sharing::ThisProcessOnly {
            return Ok(());
        }
        let _guard = self.command_lock.lock().await;
        let store = Arc::clone(&self.store);
        let position = blocking(move || Ok(store.log_position()?)).await?;
        if position.log_epoch != self.hub.position().log_epoch {
            self.hub.set_epoch(position.log_epoch);
        }
        loop {
            let after = self.hub.position().head;
            if after >= position.head {
                return Ok(());
            }
            let store = Arc::clone(&self.store);
            let events = blocking(move || Ok(store.read_log(after, 1000)?)).await?;
            if events.is_empty() {
                return Ok(());
            }
            self.hub.publish(&events);
        }
    }

    async fn follow_shared_log(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SHARED_LOG_POLL).await;
            if let Err(error) = self.follow_log_once().await {
                tracing::warn!("cannot follow the shared log: {error}");
            }
        }
    }

    /// Stages a validated command's events (and table writes), releases the command lock, and
    /// waits until the batch holding them is durable and fanned out. Refused with
    /// [`ApiError::Conflict`] (nothing staged) when a key it writes changed after the views it
    /// validated against.
    pub async fn commit(
        &self,
        guard: CommandGuard<'_>,
        mut commit: Commit,
    ) -> Result<CommitOutcome, ApiError> {
        commit.at_unix_ms = self.clock.now_unix_ms();
        crate::audit::stamp(&mut commit.events);
        // Sealing happens here, on the command's own thread, not on the single writer.
        if let Err(error) = self.store.prepare_writes(&mut commit.config_writes) {
            drop(guard);
            return Err(group_commit::batch_error(&error));
        }
        let validated_at = guard.validated_at;
        let staged = self.committer.stage(commit, validated_at);
        drop(guard);
        let receiver = staged.map_err(|conflict| ApiError::Conflict {
            expected: validated_at,
            found: conflict.written_at.unwrap_or(validated_at + 1),
        })?;
        receiver
            .await
            .map_err(|_| ApiError::internal("the group commit writer stopped"))?
    }

    /// Records (bounded, coalesced; see `crate::audit`) that `principal` asked for `what`
    /// `name` which exists only in another org; the caller answers 404.
    pub fn record_refusal(&self, principal: &crate::api::auth::Principal, what: &str, name: &str) {
        self.refusals
            .record(&self.store, principal, what, name, self.clock.now_unix_ms());
    }

    /// Records that the enrollment token `token_id` of `org` named another org's `what` (a node
    /// or edge id) at registration.
    pub fn record_enrollment_refusal(&self, token_id: &str, org: &str, what: &str, name: &str) {
        let attempt = crate::audit::RefusedAttempt {
            actor: format!("enrollment/{token_id}"),
            org,
            what,
            name,
        };
        self.refusals
            .record_attempt(&self.store, attempt, self.clock.now_unix_ms());
    }

    /// The writer: appends each batch of staged commands in one store transaction, publishes
    /// the events in log order, then answers the commands in that same order.
    async fn write_batches(self: Arc<Self>) {
        loop {
            let batch = self.committer.next_batch().await;
            let count = batch.len();
            let mut commits = Vec::with_capacity(count);
            let mut waiters = Vec::with_capacity(count);
            for staged in batch {
                commits.push(staged.commit);
                waiters.push((staged.keys, staged.answer));
            }
            if self.store.shared() == Sharing::SeveralWriters
                && let Some(first) = commits.first_mut()
            {
                first.expected_head = Some(self.hub.position().head);
            }
            let store = Arc::clone(&self.store);
            let started = std::time::Instant::now();
            let written = tokio::task::spawn_blocking(move || store.commit_batch(commits))
                .await
                .unwrap_or_else(|error| {
                    Err(crate::store::StoreError::Backend(format!(
                        "group commit task failed: {error}"
                    )))
                });
            match written {
                Ok(outcomes) => {
                    {
                        let mut tracker = self.committer.tracker();
                        for ((keys, _), outcome) in waiters.iter().zip(&outcomes) {
                            let appended = match outcome {
                                CommitOutcome::Appended(events) => {
                                    events.last().map(|e| e.event_id)
                                }
                                CommitOutcome::Duplicate { .. } => None,
                            };
                            tracker.settle(keys, appended);
                        }
                    }
                    let events: Vec<crate::store::StoredEvent> = outcomes
                        .iter()
                        .flat_map(|outcome| match outcome {
                            CommitOutcome::Appended(events) => events.clone(),
                            CommitOutcome::Duplicate { .. } => Vec::new(),
                        })
                        .collect();
                    self.hub.publish(&events);
                    let metrics = &self.metrics;
                    metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    metrics.batch_commands.observe(count as f64);
                    metrics.batches.inc();
                    metrics.commands.inc_by(count as u64);
                    metrics.events_appended.inc_by(events.len() as u64);
                    self.committer
                        .batches_written
                        .fetch_add(1, Ordering::Relaxed);
                    self.committer
                        .commits_written
                        .fetch_add(count as u64, Ordering::Relaxed);
                    for ((_, answer), outcome) in waiters.into_iter().zip(outcomes) {
                        let _ = answer.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    self.metrics.batch_failures.inc();
                    tracing::warn!(
                        component = "group_commit",
                        action = "commit_batch",
                        duration_ms = started.elapsed().as_millis() as u64,
                        "a batch of {count} commands was not written: {error}"
                    );
                    let mut tracker = self.committer.tracker();
                    for (keys, answer) in waiters {
                        tracker.settle(&keys, None);
                        let _ = answer.send(Err(group_commit::batch_error(&error)));
                    }
                }
            }
            self.committer.answered(count);
        }
    }

    /// Writes the status board back to the store every [`STATUS_WRITE_BACK`].
    async fn write_back_status(self: Arc<Self>) {
        loop {
            tokio::time::sleep(STATUS_WRITE_BACK).await;
            if let Err(error) = self.write_back_status_once().await {
                tracing::warn!("cannot write node status back to the store: {error}");
            }
        }
    }

    /// One write-back of the status board (also on shutdown).
    pub async fn write_back_status_once(&self) -> Result<usize, ApiError> {
        let refresh = match self.store.shared() {
            Sharing::ThisProcessOnly => Refresh::ThisProcessOnly,
            Sharing::SeveralWriters => Refresh::FromSharedStore,
        };
        let store = Arc::clone(&self.store);
        let board = Arc::clone(&self.status);
        blocking(move || Ok(board.write_back(store.as_ref(), refresh)?)).await
    }

    /// Commits domain events with no idempotency key and no table writes.
    pub async fn append(&self, guard: CommandGuard<'_>, events: &[Event]) -> Result<u64, ApiError> {
        let commit = Commit {
            events: events.iter().map(Event::to_new_event).collect(),
            ..Commit::default()
        };
        let outcome = self.commit(guard, commit).await?;
        Ok(outcome
            .last_event_id()
            .unwrap_or_else(|| self.hub.position().head))
    }

    /// Settings every node plan carries.
    pub fn node_settings(&self) -> NodeSettings {
        NodeSettings {
            ttl_secs: self.settings.node_ttl_secs,
            control_url: self.settings.public_url.clone(),
            gateway_url: self.settings.gateway_url.clone(),
            epoch: self
                .settings
                .site
                .leader_epoch
                .unwrap_or(self.identity.leadership_epoch),
        }
    }

    /// One scheduler pass: when the views have reached the log head, computes placements and
    /// appends them in one transaction. Returns how many decisions were appended.
    pub async fn run_scheduler_once(&self) -> Result<usize, ApiError> {
        let guard = self.lock_commands_settled().await;
        let head = self.hub.position().head;
        if self.projector.projector_wait(head).await.is_err() {
            // The views lag (or are paused): the next projector pass wakes the scheduler again.
            return Ok(0);
        }
        // Built from a shared copy of the views on a blocking thread: on a big fleet it is
        // thousands of records, and neither the async threads nor the projector wait for it.
        let views = self.projector.views_shared();
        let cpu_overcommit_ratio = self.settings.cpu_overcommit_ratio;
        let mut input =
            blocking(move || Ok(views.scheduler_input(cpu_overcommit_ratio, head))).await?;
        input.now_unix_ms = self.clock.now_unix_ms();
        // Handovers (F1, F2) wait for the replacement to report running.
        input.running = read_running(&self.status, handover_candidates(&input.allocations));
        let review =
            next_review_unix_ms(&input, self.settings.liveness_interval.as_millis() as u64);
        self.next_scheduler_review_unix_ms
            .store(review.unwrap_or(u64::MAX), Ordering::SeqCst);
        // A pass over a large fleet is long CPU work: off the async threads, so requests
        // (heartbeats, long-polls) keep being served meanwhile.
        let started = std::time::Instant::now();
        let decisions = blocking(move || Ok(schedule(&input))).await?;
        if !decisions.is_empty() {
            tracing::info!(
                component = "scheduler",
                action = "schedule",
                generation = head,
                duration_ms = started.elapsed().as_millis() as u64,
                "scheduler pass at event {head}: {} decisions",
                decisions.len()
            );
        }
        if decisions.is_empty() {
            return Ok(0);
        }
        // Statuses of removed allocations are no longer shown; dropped once the removals land.
        let stale: Vec<TableWrite> = decisions
            .iter()
            .filter_map(|decision| match decision {
                Decision::Remove { allocation_id, .. } => Some(TableWrite::Delete {
                    key: Control::allocation_status_key(allocation_id),
                }),
                Decision::Place { .. } => None,
            })
            .collect();
        // The decisions become the events (moved, not copied: a fleet-wide change is thousands
        // of specs).
        let events: Vec<Event> = decisions
            .into_iter()
            .map(|decision| match decision {
                Decision::Place {
                    allocation_id,
                    org,
                    service,
                    node_id,
                    replica,
                    spec,
                } => Event::AllocationPlaced {
                    allocation_id,
                    org,
                    service,
                    node_id,
                    replica,
                    spec,
                },
                Decision::Remove {
                    allocation_id,
                    service,
                    node_id,
                    reason,
                } => Event::AllocationRemoved {
                    allocation_id,
                    service,
                    node_id,
                    reason,
                },
            })
            .collect();
        self.append(guard, &events).await?;
        self.status.put(stale);
        Ok(events.len())
    }

    async fn follow_scheduling(self: Arc<Self>) {
        // A first pass covers anything left from before a restart.
        loop {
            match self.run_scheduler_once().await {
                Ok(_) => {
                    // Placements, new secret versions and node keys change what nodes hold.
                    if let Err(error) = crate::secret::delivery::run_delivery_once(&self).await {
                        tracing::error!("secret delivery pass failed: {error}");
                    }
                }
                // Another replica scheduled first; catch up, and the projector wakes us again.
                Err(ApiError::Conflict { .. }) => {
                    let _ = self.follow_log_once().await;
                }
                Err(error) => {
                    tracing::error!("scheduler pass failed: {error}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // A down node's deadline or a waiting handover also wakes the scheduler.
            let review = self.next_scheduler_review_unix_ms.load(Ordering::SeqCst);
            let wait_ms = review.saturating_sub(self.clock.now_unix_ms());
            tokio::select! {
                _ = self.projector.scheduling.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)), if review != u64::MAX => {}
            }
        }
    }

    /// Marks ready nodes whose last heartbeat is older than the TTL as down. Returns how many.
    pub async fn check_liveness(&self) -> Result<usize, ApiError> {
        let now = self.clock.now_unix_ms();
        let ttl_ms = u64::from(self.settings.node_ttl_secs) * 1000;
        let ready: Vec<String> = {
            let views = self.projector.views();
            views
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Ready)
                .map(|n| n.node_id.clone())
                .collect()
        };
        if ready.is_empty() {
            return Ok(0);
        }
        let started = self.started_at_unix_ms;
        let last_seen: Vec<(String, u64)> = ready
            .into_iter()
            .map(|node_id| {
                let seen = read_last_heartbeat(&self.status, &node_id)?
                    .unwrap_or(0)
                    .max(started);
                Ok((node_id, seen))
            })
            .collect::<Result<_, ApiError>>()?;
        let stale: Vec<(String, u64)> = last_seen
            .into_iter()
            .filter(|(_, seen)| now.saturating_sub(*seen) > ttl_ms)
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let guard = self.lock_commands().await;
        // Check again under the lock: a heartbeat may have arrived meanwhile.
        let mut events = Vec::new();
        for (node_id, _) in stale {
            let seen = read_last_heartbeat(&self.status, &node_id)?
                .unwrap_or(0)
                .max(started);
            let still_ready = self
                .projector
                .views()
                .nodes
                .get(&node_id)
                .is_some_and(|n| n.state == NodeState::Ready);
            if still_ready && now.saturating_sub(seen) > ttl_ms {
                tracing::info!(
                    component = "liveness",
                    action = "mark_down",
                    node_id = node_id.as_str(),
                    "node {node_id} missed its heartbeats for over {} s; marking it down",
                    ttl_ms / 1000
                );
                events.push(Event::NodeMarkedDown {
                    node_id,
                    last_heartbeat_unix_ms: seen,
                });
            }
        }
        if events.is_empty() {
            return Ok(0);
        }
        self.append(guard, &events).await?;
        Ok(events.len())
    }

    async fn follow_liveness(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.settings.liveness_interval).await;
            if let Err(error) = self.check_liveness().await {
                tracing::error!("node liveness check failed: {error}");
            }
        }
    }

    /// The rollout driver (R3): while a rollout progresses, looks at its instances' reported
    /// states every [`ROLLOUT_POLL`] and appends its decisions; otherwise costs a map look.
    async fn follow_rollouts(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ROLLOUT_POLL).await;
            if self.projector.views().agent_upgrades.any_progressing() {
                match crate::rollout::agents::run_agent_upgrades_once(&self).await {
                    Ok(_) => {}
                    Err(ApiError::Conflict { .. }) => {
                        let _ = self.follow_log_once().await;
                    }
                    Err(error) => tracing::error!("agent upgrade pass failed: {error}"),
                }
            }
            if !self.projector.views().rollouts.any_progressing() {
                continue;
            }
            match crate::rollout::service::run_rollouts_once(&self).await {
                Ok(_) => {}
                Err(ApiError::Conflict { .. }) => {
                    let _ = self.follow_log_once().await;
                }
                Err(error) => tracing::error!("rollout pass failed: {error}"),
            }
        }
    }

    /// Volatile key of a node's last heartbeat.
    pub fn heartbeat_key(node_id: &str) -> String {
        format!("heartbeat/{node_id}")
    }

    pub fn allocation_status_key(allocation_id: &str) -> String {
        format!("allocation-status/{allocation_id}")
    }

    /// Table writes for a config record.
    pub fn config_put<T: serde::Serialize>(key: String, value: &T) -> TableWrite {
        TableWrite::Put {
            key,
            value: serde_json::to_vec(value).unwrap_or_default(),
        }
    }
}

/// Last heartbeat time of a node in unix ms, from the status board.
pub fn read_last_heartbeat(status: &StatusBoard, node_id: &str) -> Result<Option<u64>, ApiError> {
    let Some(bytes) = status.get(&Control::heartbeat_key(node_id)) else {
        return Ok(None);
    };
    let record: crate::api::views::HeartbeatRecord =
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::internal(format!(
                "heartbeat record of node {node_id} does not decode: {e}"
            ))
        })?;
    Ok(Some(record.at_unix_ms))
}

/// Which of `allocation_ids` their node last reported `running`, from the status board.
fn read_running(
    status: &StatusBoard,
    allocation_ids: Vec<String>,
) -> std::collections::BTreeSet<String> {
    allocation_ids
        .into_iter()
        .filter(|allocation_id| {
            status
                .get(&Control::allocation_status_key(allocation_id))
                .and_then(|bytes| {
                    serde_json::from_slice::<crate::api::views::AllocationStatusRecord>(&bytes).ok()
                })
                .is_some_and(|record| record.state == outpost_proto::node::AllocationState::Running)
        })
        .collect()
}

impl Projector {
    /// Waits briefly for the views to reach `event_id` (used under the command lock).
    pub async fn projector_wait(&self, event_id: u64) -> Result<(), u64> {
        self.wait_for(event_id, Duration::from_millis(500)).await
    }
}
