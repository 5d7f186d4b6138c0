//! The control service's core: the store, views, feed tail and settings held together, the one
//! path every write takes (serialized commands, one store transaction, then fan-out), and the
//! background followers (projector, scheduler, node liveness).

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
        }
    }
}

/// Proof that the caller holds the command lock: writes are serialized, so a command's checks
/// against the store and its append see the same state.
pub struct CommandGuard<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

pub struct Control {
    pub store: Arc<dyn Store>,
    pub settings: ControlSettings,
    pub identity: ClusterIdentity,
    pub projector: Arc<Projector>,
    pub hub: Arc<FeedHub>,
    pub clock: Arc<dyn Clock>,
    /// Caps concurrent plan (snapshot) requests.
    pub plan_permits: Arc<Semaphore>,
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
        let init_store = Arc::clone(&store);
        let now = clock.now_unix_ms();
        let (identity, kind, admin_token, position, projector) =
            tokio::task::spawn_blocking(move || {
                let (identity, kind, admin_token) =
                    crate::init::initialize_or_load(init_store.as_ref(), now)?;
                let position = init_store.log_position()?;
                let projector = Projector::load(init_store.as_ref());
                Ok::<_, InitError>((identity, kind, admin_token, position, projector))
            })
            .await
            .map_err(|e| InitError::Task(e.to_string()))??;
        let hub = Arc::new(FeedHub::new(position, TAIL_EVENTS));
        let control = Arc::new(Control {
            plan_permits: Arc::new(Semaphore::new(settings.plan_requests_max)),
            store: Arc::clone(&store),
            settings,
            identity,
            projector: Arc::clone(&projector),
            hub: Arc::clone(&hub),
            clock,
            command_lock: Mutex::new(()),
            started_at_unix_ms: now,
            next_scheduler_review_unix_ms: AtomicU64::new(u64::MAX),
        });
        tokio::spawn(Arc::clone(&projector).run(Arc::clone(&store), hub.subscribe()));
        tokio::spawn(Arc::clone(&control).follow_scheduling());
        if control.store.shared() == Sharing::SeveralWriters {
            tokio::spawn(Arc::clone(&control).follow_shared_log());
        }
        if control.settings.followers == Followers::Automatic {
            tokio::spawn(Arc::clone(&control).follow_liveness());
        }
        Ok(Started {
            control,
            kind,
            admin_token,
        })
    }

    /// Takes the command lock, then gives the views a moment to reach the log head so the
    /// command checks against current state.
    pub async fn lock_commands(&self) -> CommandGuard<'_> {
        let guard = CommandGuard(self.command_lock.lock().await);
        let head = self.hub.position().head;
        let patience = self.settings.projection_wait.min(Duration::from_secs(1));
        if self.projector.wait_for(head, patience).await.is_err() {
            tracing::warn!("views lag the log head {head}; the command checks against older views");
        }
        guard
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

    /// Appends a command's events (and table writes) in one transaction, then fans them out.
    pub async fn commit(
        &self,
        _guard: &CommandGuard<'_>,
        mut commit: Commit,
    ) -> Result<CommitOutcome, ApiError> {
        commit.at_unix_ms = self.clock.now_unix_ms();
        if self.store.shared() == Sharing::SeveralWriters {
            commit.expected_head = Some(self.hub.position().head);
        }
        let store = Arc::clone(&self.store);
        let outcome = blocking(move || Ok(store.commit(commit)?)).await?;
        if let CommitOutcome::Appended(events) = &outcome {
            self.hub.publish(events);
        }
        Ok(outcome)
    }

    /// Commits domain events with no idempotency key and no table writes.
    pub async fn append(
        &self,
        guard: &CommandGuard<'_>,
        events: &[Event],
    ) -> Result<u64, ApiError> {
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
        let guard = self.lock_commands().await;
        let head = self.hub.position().head;
        if self.projector.projector_wait(head).await.is_err() {
            // The views lag (or are paused): the next projector pass wakes the scheduler again.
            return Ok(0);
        }
        let mut input = self
            .projector
            .views()
            .scheduler_input(self.settings.cpu_overcommit_ratio, head);
        input.now_unix_ms = self.clock.now_unix_ms();
        // Handovers (F1, F2) wait for the replacement to report running.
        let candidates = handover_candidates(&input.allocations);
        if !candidates.is_empty() {
            let store = Arc::clone(&self.store);
            input.running = blocking(move || read_running(store.as_ref(), candidates)).await?;
        }
        let decisions = schedule(&input);
        let review =
            next_review_unix_ms(&input, self.settings.liveness_interval.as_millis() as u64);
        self.next_scheduler_review_unix_ms
            .store(review.unwrap_or(u64::MAX), Ordering::SeqCst);
        if decisions.is_empty() {
            return Ok(0);
        }
        let events: Vec<Event> = decisions
            .iter()
            .map(|decision| match decision.clone() {
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
        self.append(&guard, &events).await?;
        drop(guard);
        // Statuses of removed allocations are no longer shown; drop them.
        let stale: Vec<TableWrite> = decisions
            .iter()
            .filter_map(|decision| match decision {
                Decision::Remove { allocation_id, .. } => Some(TableWrite::Delete {
                    key: Control::allocation_status_key(allocation_id),
                }),
                Decision::Place { .. } => None,
            })
            .collect();
        if !stale.is_empty() {
            let store = Arc::clone(&self.store);
            blocking(move || Ok(store.put_volatile(stale, crate::store::Durability::Relaxed)?))
                .await?;
        }
        Ok(events.len())
    }

    async fn follow_scheduling(self: Arc<Self>) {
        // A first pass covers anything left from before a restart.
        loop {
            match self.run_scheduler_once().await {
                Ok(_) => {}
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
        let store = Arc::clone(&self.store);
        let started = self.started_at_unix_ms;
        let last_seen: Vec<(String, u64)> = blocking(move || {
            ready
                .into_iter()
                .map(|node_id| {
                    let seen = read_last_heartbeat(store.as_ref(), &node_id)?
                        .unwrap_or(0)
                        .max(started);
                    Ok((node_id, seen))
                })
                .collect()
        })
        .await?;
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
            let store = Arc::clone(&self.store);
            let id = node_id.clone();
            let seen = blocking(move || read_last_heartbeat(store.as_ref(), &id))
                .await?
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
        self.append(&guard, &events).await?;
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

/// Last heartbeat time of a node in unix ms, from the volatile table.
pub fn read_last_heartbeat(store: &dyn Store, node_id: &str) -> Result<Option<u64>, ApiError> {
    let Some(bytes) = store.get_volatile(&Control::heartbeat_key(node_id))? else {
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

/// Which of `allocation_ids` their node last reported `running`, from the volatile table.
fn read_running(
    store: &dyn Store,
    allocation_ids: Vec<String>,
) -> Result<std::collections::BTreeSet<String>, ApiError> {
    let mut running = std::collections::BTreeSet::new();
    for allocation_id in allocation_ids {
        let Some(bytes) = store.get_volatile(&Control::allocation_status_key(&allocation_id))?
        else {
            continue;
        };
        let is_running =
            serde_json::from_slice::<crate::api::views::AllocationStatusRecord>(&bytes)
                .is_ok_and(|record| record.state == outpost_proto::node::AllocationState::Running);
        if is_running {
            running.insert(allocation_id);
        }
    }
    Ok(running)
}

impl Projector {
    /// Waits briefly for the views to reach `event_id` (used under the command lock).
    pub async fn projector_wait(&self, event_id: u64) -> Result<(), u64> {
        self.wait_for(event_id, Duration::from_millis(500)).await
    }
}
