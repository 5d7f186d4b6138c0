//! The reconcile engine (C1, C5–C10): storage → broker → index, each read → diff → apply
//! additions and safe updates, with per-component generations, bounded retries, idempotency
//! keys, bootstrap events, structured log lines and a persisted "last apply per component".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_proto::bootstrap::{BootstrapEvent, BootstrapStatus, BootstrapStepStatus};
use outpost_proto::hash::{sha256_hex, sha256_parts_hex};
use outpost_proto::name::Name;
use outpost_proto::profile::{EnvironmentProfile, ExchangeKind, ExchangeSpec};
use serde::{Deserialize, Serialize};

use super::diff::{
    self, BrokerActual, Component, DestructivePolicy, IndexActual, Safety, Step, StorageActual,
    binding_key, diff_hash,
};
use super::fs_storage::{FsObjectStorage, write_atomically};
use super::ports::{
    AdapterIdentity, EventBus, IdempotencyKey, ObjectStorage, PortError, VectorIndex,
    normalize_class_name,
};

/// The exchange bootstrap events are published on, routing key `overlay.bootstrap.STATUS`.
pub const BOOTSTRAP_EXCHANGE: &str = "outpost.bootstrap";
/// File under the data dir holding the last apply per component.
pub const APPLY_STATUS_FILE: &str = "profile-status.json";
/// Longest message carried by one bootstrap event.
const EVENT_MESSAGE_MAX_BYTES: usize = 1024;
/// Largest apply-status file read back.
const APPLY_STATUS_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Where bootstrap events go besides the bus: the agent's bounded outbox, which sends them to
/// `POST /v1/bootstrap/events`. Must not block for long; a full outbox may drop the oldest.
pub trait BootstrapSink {
    fn accept(&mut self, event: &BootstrapEvent);
}

/// A sink that keeps events in memory (the reconcile command prints them; tests read them).
#[derive(Debug, Default)]
pub struct CollectingSink {
    pub events: Vec<BootstrapEvent>,
}

impl BootstrapSink for CollectingSink {
    fn accept(&mut self, event: &BootstrapEvent) {
        self.events.push(event.clone());
    }
}

/// The adapters behind the three ports, chosen by [`super::build_adapters`].
pub struct Adapters {
    pub storage: Box<dyn ObjectStorage>,
    pub bus: Box<dyn EventBus>,
    pub index: Box<dyn VectorIndex>,
    /// The default file-system storage when an external one serves the port: objects in its
    /// buckets are copied to the external store once (fall forward, C5).
    pub fall_forward_from: Option<FsObjectStorage>,
}

/// Bounded retries with exponential backoff and full jitter (C6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub cap_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay_ms: 200,
            cap_delay_ms: 5_000,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry `attempt` (1-based count of failures so far), drawn with `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let factor = 1u64
            .checked_shl(attempt.saturating_sub(1).min(32))
            .unwrap_or(u64::MAX);
        let ceiling = self
            .base_delay_ms
            .saturating_mul(factor)
            .min(self.cap_delay_ms);
        Duration::from_millis(random % (ceiling + 1))
    }
}

/// What to do with a component whose generation did not change since its last good apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnchangedPolicy {
    /// Do nothing (after each plan/profile fetch).
    Skip,
    /// Read actual state and repair drift such as a bucket deleted by hand (boot, periodic, the
    /// reconcile command).
    VerifyActual,
}

/// Apply, or only compute and show the diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    Apply,
    DryRun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Mutations ran and the component converged.
    Applied,
    /// Actual state already matched; nothing was mutated, except that what the adapter cannot
    /// observe (AMQP bindings) was re-asserted idempotently (the message counts them).
    Unchanged,
    /// Generation unchanged since the last good apply; not even read.
    Skipped,
    /// Not this node's concern (S2).
    OutOfScope,
    /// Safe parts applied; drift or needed migrations withheld (see the lists).
    NeedsAttention,
    /// Failed after bounded retries; later components were not applied (fail closed).
    Failed,
    /// Not run because an earlier component failed.
    Blocked,
}

impl Outcome {
    fn is_good(self) -> bool {
        matches!(
            self,
            Outcome::Applied | Outcome::Unchanged | Outcome::Skipped | Outcome::NeedsAttention
        )
    }
}

/// The last apply of one component, as `/internal/bootstrap/status` and `outpost-agent status`
/// show it (C10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentApply {
    pub component: Component,
    pub outcome: Outcome,
    /// Generation of this attempt.
    pub generation: String,
    /// Generation of the last good apply, kept across failures.
    #[serde(default)]
    pub applied_generation: Option<String>,
    pub adapter: Option<AdapterIdentity>,
    #[serde(default)]
    pub steps_applied: Vec<String>,
    /// Existing resources that differ from the profile and were left alone (broker drift).
    #[serde(default)]
    pub drift: Vec<String>,
    /// Incompatible index changes left alone (C4).
    #[serde(default)]
    pub needs_migration: Vec<String>,
    /// Other destructive steps withheld (C7).
    #[serde(default)]
    pub withheld: Vec<String>,
    #[serde(default)]
    pub objects_copied: usize,
    /// Objects the default storage expired by lifecycle rules during this apply.
    #[serde(default)]
    pub objects_expired: usize,
    #[serde(default)]
    pub message: Option<String>,
    pub finished_at_unix: u64,
    pub duration_ms: u64,
}

/// Every component's last apply, persisted at `DATA_DIR/profile-status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ApplyStatus {
    pub components: BTreeMap<Component, ComponentApply>,
}

impl ApplyStatus {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(APPLY_STATUS_FILE)
    }

    /// Reads the status file; a missing file is an empty status, a damaged one an error.
    pub fn read(data_dir: &Path) -> Result<Self, ReconcileError> {
        let path = Self::path(data_dir);
        let meta = match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => {
                return Err(ReconcileError::Status {
                    path,
                    message: error.to_string(),
                });
            }
            Ok(meta) => meta,
        };
        if meta.len() > APPLY_STATUS_MAX_BYTES {
            return Err(ReconcileError::Status {
                path,
                message: format!("{} bytes is too large", meta.len()),
            });
        }
        let bytes = std::fs::read(&path).map_err(|error| ReconcileError::Status {
            path: path.clone(),
            message: error.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|error| ReconcileError::Status {
            path,
            message: error.to_string(),
        })
    }

    pub fn write(&self, data_dir: &Path) -> Result<(), ReconcileError> {
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|error| ReconcileError::Status {
            path: path.clone(),
            message: error.to_string(),
        })?;
        write_atomically(&path, &bytes).map_err(|error| ReconcileError::Status {
            path,
            message: error.to_string(),
        })
    }

    /// The B1 shape control shows: component → last good generation, plus current errors.
    pub fn to_bootstrap_status(&self) -> BootstrapStatus {
        let mut status = BootstrapStatus::default();
        for (component, apply) in &self.components {
            if let Some(generation) = &apply.applied_generation {
                status
                    .applied
                    .insert(component.as_str().to_string(), generation.clone());
            }
            if !apply.outcome.is_good() {
                status.errors.push(format!(
                    "{}: {:?}: {}",
                    component.as_str(),
                    apply.outcome,
                    apply.message.as_deref().unwrap_or("")
                ));
            }
            for item in apply.drift.iter().chain(&apply.needs_migration) {
                status
                    .errors
                    .push(format!("{}: {item}", component.as_str()));
            }
        }
        status
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("apply status file {path}: {message}")]
    Status { path: PathBuf, message: String },
    #[error(
        "the diff has {count} destructive step(s) and destructive changes need allow_destructive: true in the profile"
    )]
    DestructiveNotAllowed { count: usize },
    #[error(
        "acknowledged diff hash {acknowledged} does not match the current dry-run diff hash {current}"
    )]
    AcknowledgementMismatch {
        acknowledged: String,
        current: String,
    },
    #[error("the profile was not applied, nothing changed: {0}")]
    InvalidProfile(#[from] outpost_proto::validate::ValidationError),
}

/// Everything one run decided.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileReport {
    pub components: Vec<ComponentApply>,
    /// The full diff, destructive steps included (dry-run shows it).
    pub diff: Vec<Step>,
    /// The hash a destructive apply must acknowledge.
    pub diff_hash: String,
    /// True when every component converged or was skipped: the caller may start services (C1).
    pub services_may_start: bool,
}

/// One reconcile run's inputs.
#[derive(Debug, Clone)]
pub struct ReconcileRequest<'a> {
    pub profile: &'a EnvironmentProfile,
    /// Components that concern this node (S2).
    pub components: &'a std::collections::BTreeSet<Component>,
    pub unchanged: UnchangedPolicy,
    pub destructive: DestructivePolicy,
    pub mode: RunMode,
}

/// Runs reconciles for one node.
pub struct Engine<'a> {
    pub node_id: Name,
    pub data_dir: PathBuf,
    pub adapters: &'a mut Adapters,
    pub sink: &'a mut dyn BootstrapSink,
    pub retry: RetryPolicy,
    random_state: u64,
}

enum ComponentActual {
    Storage(StorageActual),
    Broker(BrokerActual),
    Index(IndexActual),
}

struct Prepared {
    component: Component,
    generation: String,
    adapter: AdapterIdentity,
    steps: Vec<Step>,
    started: Instant,
}

impl<'a> Engine<'a> {
    pub fn new(
        node_id: Name,
        data_dir: &Path,
        adapters: &'a mut Adapters,
        sink: &'a mut dyn BootstrapSink,
    ) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            node_id,
            data_dir: data_dir.to_path_buf(),
            adapters,
            sink,
            retry: RetryPolicy::default(),
            random_state: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: jitter only, not security.
        let mut x = self.random_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random_state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn adapter_identity(&self, component: Component) -> AdapterIdentity {
        match component {
            Component::Storage => self.adapters.storage.identity(),
            Component::Broker => self.adapters.bus.identity(),
            Component::Index => self.adapters.index.identity(),
        }
    }

    /// Component generation: its desired part and the adapter it goes to.
    pub fn generation(
        profile: &EnvironmentProfile,
        component: Component,
        adapter: &AdapterIdentity,
    ) -> String {
        let desired = desired_json(profile, component);
        let adapter = serde_json::to_vec(adapter).unwrap_or_default();
        sha256_parts_hex(&[component.as_str().as_bytes(), &desired, &adapter])
    }

    /// C8: `sha256(node_id + component + generation + desired_hash)`.
    pub fn idempotency_key(
        &self,
        component: Component,
        generation: &str,
        desired_hash: &str,
    ) -> IdempotencyKey {
        IdempotencyKey(sha256_parts_hex(&[
            self.node_id.as_bytes(),
            component.as_str().as_bytes(),
            generation.as_bytes(),
            desired_hash.as_bytes(),
        ]))
    }

    fn emit(
        &mut self,
        component: Component,
        action: &str,
        status: BootstrapStepStatus,
        message: Option<String>,
        generation: &str,
    ) {
        let event = BootstrapEvent {
            node_id: self.node_id.clone(),
            component: component.as_str().to_string(),
            action: action.to_string(),
            status,
            message: message.map(|text| truncate(&text, EVENT_MESSAGE_MAX_BYTES)),
            generation: Some(generation.to_string()),
        };
        self.sink.accept(&event);
        let routing_key = format!(
            "overlay.bootstrap.{}",
            match status {
                BootstrapStepStatus::Start => "start",
                BootstrapStepStatus::Ok => "ok",
                BootstrapStepStatus::Error => "error",
            }
        );
        let payload = serde_json::to_vec(&event).unwrap_or_default();
        let key = self.idempotency_key(component, generation, &sha256_hex(routing_key.as_bytes()));
        if let Err(error) =
            self.adapters
                .bus
                .publish(BOOTSTRAP_EXCHANGE, &routing_key, &payload, &key)
        {
            log_line(&[
                ("component", component.as_str()),
                ("action", "publish_event"),
                ("status", "error"),
                ("message", &error.to_string()),
            ]);
        }
    }

    /// Runs `operation` with bounded retries; only transient errors are retried. `key` is the
    /// idempotency key a mutation carries (none for reads); it goes on each attempt's log line.
    fn with_retries<T>(
        &mut self,
        component: Component,
        action: &str,
        target: &str,
        generation: &str,
        key: Option<&IdempotencyKey>,
        mut operation: impl FnMut(&mut Adapters) -> Result<T, PortError>,
    ) -> Result<T, PortError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = operation(self.adapters);
            let call = CallLog {
                component,
                action,
                target,
                attempt,
                generation,
                duration_ms: started.elapsed().as_millis(),
                key,
            };
            match result {
                Ok(value) => {
                    call.emit("ok", None);
                    return Ok(value);
                }
                Err(error) => {
                    let retry = error.is_transient() && attempt < self.retry.max_attempts;
                    let status = if retry { "retry" } else { "error" };
                    call.emit(status, Some(&error.to_string()));
                    if !retry {
                        return Err(error);
                    }
                    let random = self.next_random();
                    std::thread::sleep(self.retry.delay(attempt, random));
                }
            }
        }
    }

    fn read_actual(
        &mut self,
        profile: &EnvironmentProfile,
        component: Component,
        generation: &str,
    ) -> Result<ComponentActual, PortError> {
        match component {
            Component::Storage => {
                let mut actual = StorageActual::default();
                for bucket in &profile.spec.storage.buckets {
                    let name = bucket.name.to_string();
                    let state = self.with_retries(
                        component,
                        "read_bucket",
                        &name,
                        generation,
                        None,
                        |adapters| adapters.storage.read_bucket(&name),
                    )?;
                    actual.buckets.insert(name, state);
                }
                Ok(ComponentActual::Storage(actual))
            }
            Component::Broker => {
                let broker = &profile.spec.broker;
                let mut actual = BrokerActual::default();
                for exchange in &broker.exchanges {
                    let check = self.with_retries(
                        component,
                        "check_exchange",
                        &exchange.name,
                        generation,
                        None,
                        |adapters| adapters.bus.check_exchange(exchange),
                    )?;
                    actual.exchanges.insert(exchange.name.to_string(), check);
                }
                for queue in &broker.queues {
                    let check = self.with_retries(
                        component,
                        "check_queue",
                        &queue.name,
                        generation,
                        None,
                        |adapters| adapters.bus.check_queue(queue),
                    )?;
                    actual.queues.insert(queue.name.to_string(), check);
                }
                for binding in &broker.bindings {
                    let target = format!("{}->{}", binding.exchange, binding.queue);
                    let check = self.with_retries(
                        component,
                        "check_binding",
                        &target,
                        generation,
                        None,
                        |adapters| adapters.bus.check_binding(binding),
                    )?;
                    actual.bindings.insert(binding_key(binding), check);
                }
                Ok(ComponentActual::Broker(actual))
            }
            Component::Index => {
                let mut actual = IndexActual::default();
                for class in &profile.spec.index.classes {
                    let name = normalize_class_name(&class.name);
                    let state = self.with_retries(
                        component,
                        "read_class",
                        &name,
                        generation,
                        None,
                        |adapters| adapters.index.read_class(&name),
                    )?;
                    actual.classes.insert(name, state);
                }
                Ok(ComponentActual::Index(actual))
            }
        }
    }

    /// Runs one reconcile: reads and diffs every component in order, checks the destructive
    /// policy against the whole diff, then applies in order and records the outcome.
    pub fn reconcile(
        &mut self,
        request: &ReconcileRequest<'_>,
    ) -> Result<ReconcileReport, ReconcileError> {
        // Bad input never reaches an adapter: what was applied before stays as it is.
        outpost_proto::validate::Validate::validate(request.profile)?;
        let mut status = ApplyStatus::read(&self.data_dir).unwrap_or_else(|error| {
            log_line(&[
                ("action", "read_status"),
                ("status", "error"),
                ("message", &error.to_string()),
            ]);
            ApplyStatus::default()
        });
        let unchanged = match request.destructive {
            DestructivePolicy::Withhold => request.unchanged,
            DestructivePolicy::Acknowledged { .. } => UnchangedPolicy::VerifyActual,
        };
        let unchanged = if request.mode == RunMode::DryRun {
            UnchangedPolicy::VerifyActual
        } else {
            unchanged
        };

        if request.mode == RunMode::Apply {
            self.ensure_bootstrap_exchange();
        }
        // Phase 1: read and diff, in order; a read failure blocks the components after it.
        let mut results: Vec<ComponentApply> = Vec::new();
        let mut prepared: Vec<Prepared> = Vec::new();
        let mut blocked_by: Option<Component> = None;
        for component in Component::ORDER {
            let started = Instant::now();
            let adapter = self.adapter_identity(component);
            let generation = Self::generation(request.profile, component, &adapter);
            let previous = status.components.get(&component).cloned();
            let previous_good = previous
                .as_ref()
                .and_then(|apply| apply.applied_generation.clone());
            let record = |outcome: Outcome, message: Option<String>| ComponentApply {
                component,
                outcome,
                generation: generation.clone(),
                applied_generation: previous_good.clone(),
                adapter: Some(adapter.clone()),
                steps_applied: Vec::new(),
                drift: Vec::new(),
                needs_migration: Vec::new(),
                withheld: Vec::new(),
                objects_copied: 0,
                objects_expired: 0,
                message,
                finished_at_unix: unix_now(),
                duration_ms: started.elapsed().as_millis() as u64,
            };
            if let Some(failed) = blocked_by {
                results.push(record(
                    Outcome::Blocked,
                    Some(format!("{} failed first", failed.as_str())),
                ));
                continue;
            }
            if !request.components.contains(&component) {
                results.push(record(
                    Outcome::OutOfScope,
                    Some("not applied on this node".into()),
                ));
                continue;
            }
            let unchanged_since_good = previous.as_ref().is_some_and(|apply| {
                apply.applied_generation.as_deref() == Some(generation.as_str())
                    && apply.outcome.is_good()
            });
            if unchanged == UnchangedPolicy::Skip && unchanged_since_good {
                let mut skipped = previous
                    .clone()
                    .unwrap_or_else(|| record(Outcome::Skipped, None));
                skipped.outcome = Outcome::Skipped;
                results.push(skipped);
                continue;
            }
            if request.mode == RunMode::Apply {
                self.emit(
                    component,
                    "reconcile",
                    BootstrapStepStatus::Start,
                    None,
                    &generation,
                );
            }
            let actual = match self.read_actual(request.profile, component, &generation) {
                Ok(actual) => actual,
                Err(error) => {
                    let message = format!("reading actual state failed: {error}");
                    if request.mode == RunMode::Apply {
                        self.emit(
                            component,
                            "read_actual",
                            BootstrapStepStatus::Error,
                            Some(message.clone()),
                            &generation,
                        );
                    }
                    results.push(record(Outcome::Failed, Some(message)));
                    blocked_by = Some(component);
                    continue;
                }
            };
            let steps = match &actual {
                ComponentActual::Storage(actual) => {
                    diff::diff_storage(&request.profile.spec.storage, actual)
                }
                ComponentActual::Broker(actual) => {
                    diff::diff_broker(&request.profile.spec.broker, actual)
                }
                ComponentActual::Index(actual) => {
                    diff::diff_index(&request.profile.spec.index, actual)
                }
            };
            prepared.push(Prepared {
                component,
                generation,
                adapter,
                steps,
                started,
            });
        }
        let full_diff: Vec<Step> = prepared
            .iter()
            .flat_map(|prepared| prepared.steps.clone())
            .collect();
        let full_hash = diff_hash(&full_diff);
        let destructive_count = full_diff
            .iter()
            .filter(|step| step.safety() == Safety::Destructive)
            .count();
        let destructive_allowed = match &request.destructive {
            DestructivePolicy::Withhold => false,
            DestructivePolicy::Acknowledged {
                diff_hash: acknowledged,
            } => {
                if request.mode == RunMode::Apply {
                    if !request.profile.spec.allow_destructive {
                        return Err(ReconcileError::DestructiveNotAllowed {
                            count: destructive_count,
                        });
                    }
                    if *acknowledged != full_hash {
                        return Err(ReconcileError::AcknowledgementMismatch {
                            acknowledged: acknowledged.clone(),
                            current: full_hash,
                        });
                    }
                }
                true
            }
        };

        if request.mode == RunMode::DryRun {
            for prepared in prepared {
                let outcome = if prepared.steps.iter().all(Step::is_reassertion) {
                    Outcome::Unchanged
                } else {
                    Outcome::NeedsAttention
                };
                results.push(ComponentApply {
                    component: prepared.component,
                    outcome,
                    generation: prepared.generation,
                    applied_generation: status
                        .components
                        .get(&prepared.component)
                        .and_then(|apply| apply.applied_generation.clone()),
                    adapter: Some(prepared.adapter),
                    steps_applied: Vec::new(),
                    drift: Vec::new(),
                    needs_migration: Vec::new(),
                    withheld: prepared.steps.iter().map(Step::describe).collect(),
                    objects_copied: 0,
                    objects_expired: 0,
                    message: Some("dry run: nothing applied".into()),
                    finished_at_unix: unix_now(),
                    duration_ms: prepared.started.elapsed().as_millis() as u64,
                });
            }
            results.sort_by_key(|apply| apply.component);
            return Ok(ReconcileReport {
                components: results,
                diff: full_diff,
                diff_hash: full_hash,
                services_may_start: false,
            });
        }

        // Phase 2: apply in order.
        for prepared in prepared {
            let component = prepared.component;
            if let Some(failed) = blocked_by {
                results.push(ComponentApply {
                    component,
                    outcome: Outcome::Blocked,
                    generation: prepared.generation,
                    applied_generation: status
                        .components
                        .get(&component)
                        .and_then(|a| a.applied_generation.clone()),
                    adapter: Some(prepared.adapter),
                    steps_applied: Vec::new(),
                    drift: Vec::new(),
                    needs_migration: Vec::new(),
                    withheld: Vec::new(),
                    objects_copied: 0,
                    objects_expired: 0,
                    message: Some(format!("{} failed first", failed.as_str())),
                    finished_at_unix: unix_now(),
                    duration_ms: 0,
                });
                continue;
            }
            let previous_good = status
                .components
                .get(&component)
                .and_then(|apply| apply.applied_generation.clone());
            let apply = self.apply_component(
                request.profile,
                prepared,
                destructive_allowed,
                previous_good,
            );
            if apply.outcome == Outcome::Failed {
                blocked_by = Some(component);
            }
            results.push(apply);
        }
        results.sort_by_key(|apply| apply.component);
        for apply in &results {
            status.components.insert(apply.component, apply.clone());
        }
        if let Err(error) = status.write(&self.data_dir) {
            log_line(&[
                ("action", "write_status"),
                ("status", "error"),
                ("message", &error.to_string()),
            ]);
        }
        let services_may_start = results
            .iter()
            .all(|apply| apply.outcome.is_good() || apply.outcome == Outcome::OutOfScope);
        Ok(ReconcileReport {
            components: results,
            diff: full_diff,
            diff_hash: full_hash,
            services_may_start,
        })
    }

    fn ensure_bootstrap_exchange(&mut self) {
        let exchange = ExchangeSpec {
            name: Name::try_from(BOOTSTRAP_EXCHANGE).unwrap_or_default(),
            kind: ExchangeKind::Topic,
        };
        let key = IdempotencyKey(sha256_parts_hex(&[
            self.node_id.as_bytes(),
            BOOTSTRAP_EXCHANGE.as_bytes(),
        ]));
        let result = match self.adapters.bus.check_exchange(&exchange) {
            Ok(super::ports::DeclareCheck::Missing) => {
                self.adapters.bus.declare_exchange(&exchange, &key)
            }
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            log_line(&[
                ("action", "declare_bootstrap_exchange"),
                ("status", "error"),
                ("message", &error.to_string()),
            ]);
        }
    }

    fn apply_component(
        &mut self,
        profile: &EnvironmentProfile,
        prepared: Prepared,
        destructive_allowed: bool,
        previous_good: Option<String>,
    ) -> ComponentApply {
        let Prepared {
            component,
            generation,
            adapter,
            steps,
            started,
        } = prepared;
        let (to_run, withheld) = diff::partition(steps, destructive_allowed);
        let mut apply = ComponentApply {
            component,
            outcome: Outcome::Applied,
            generation: generation.clone(),
            applied_generation: previous_good,
            adapter: Some(adapter),
            steps_applied: Vec::new(),
            drift: Vec::new(),
            needs_migration: Vec::new(),
            withheld: Vec::new(),
            objects_copied: 0,
            objects_expired: 0,
            message: None,
            finished_at_unix: 0,
            duration_ms: 0,
        };
        for step in &withheld {
            match step {
                Step::RedeclareExchange { .. } | Step::RedeclareQueue { .. } => {
                    apply.drift.push(step.describe())
                }
                Step::RetypeProperty { .. } => apply.needs_migration.push(step.describe()),
                _ => apply.withheld.push(step.describe()),
            }
            log_line(&[
                ("component", component.as_str()),
                ("action", step.action()),
                ("target", &step.target()),
                ("status", "withheld"),
                (
                    "message",
                    "destructive; needs allow_destructive and an acknowledged dry-run hash",
                ),
            ]);
        }
        let mut failure: Option<String> = None;
        let mut reasserted = 0usize;
        for step in &to_run {
            let desired_hash = sha256_hex(&serde_json::to_vec(step).unwrap_or_default());
            let key = self.idempotency_key(component, &generation, &desired_hash);
            let target = step.target();
            match self.with_retries(
                component,
                step.action(),
                &target,
                &generation,
                Some(&key),
                |adapters| run_step(adapters, step, &key),
            ) {
                // A re-assertion (queue.bind of a binding the broker cannot list) may or may not
                // have changed anything; it is counted in the message, not as a step applied.
                Ok(()) if step.is_reassertion() => reasserted += 1,
                Ok(()) => apply.steps_applied.push(step.describe()),
                Err(PortError::Refused { message, .. }) if is_drift(step) => {
                    apply.drift.push(format!("{}: {message}", step.describe()));
                }
                Err(error @ PortError::Unsupported { .. })
                    if matches!(step, Step::RetypeProperty { .. }) =>
                {
                    apply
                        .needs_migration
                        .push(format!("{}: {error}", step.describe()));
                }
                Err(error) => {
                    failure = Some(format!("{} failed: {error}", step.describe()));
                    break;
                }
            }
        }
        if failure.is_none() && component == Component::Storage {
            match self.adapters.storage.expire_objects(SystemTime::now()) {
                Ok(expired) => apply.objects_expired = expired,
                Err(error) => log_line(&[
                    ("component", component.as_str()),
                    ("action", "expire_objects"),
                    ("status", "error"),
                    ("message", &error.to_string()),
                ]),
            }
            match self.fall_forward(profile, &generation) {
                Ok(copied) => apply.objects_copied = copied,
                Err(error) => {
                    failure = Some(format!(
                        "copying local objects to the external store failed: {error}"
                    ))
                }
            }
        }
        apply.outcome = if failure.is_some() {
            Outcome::Failed
        } else if !apply.drift.is_empty()
            || !apply.needs_migration.is_empty()
            || !apply.withheld.is_empty()
        {
            Outcome::NeedsAttention
        } else if apply.steps_applied.is_empty() && apply.objects_copied == 0 {
            Outcome::Unchanged
        } else {
            Outcome::Applied
        };
        if apply.outcome.is_good() {
            apply.applied_generation = Some(generation.clone());
        }
        apply.message = failure.clone().or_else(|| summary(&apply, reasserted));
        apply.finished_at_unix = unix_now();
        apply.duration_ms = started.elapsed().as_millis() as u64;
        let action = match apply.outcome {
            Outcome::Unchanged => "noop",
            _ => "apply",
        };
        let status = if failure.is_some() {
            BootstrapStepStatus::Error
        } else {
            BootstrapStepStatus::Ok
        };
        self.emit(
            component,
            action,
            status,
            apply.message.clone(),
            &generation,
        );
        log_line(&[
            ("component", component.as_str()),
            ("action", action),
            ("attempt", "1"),
            (
                "idempotent",
                if apply.outcome == Outcome::Unchanged {
                    "true"
                } else {
                    "false"
                },
            ),
            ("generation", &generation[..16]),
            ("duration_ms", &apply.duration_ms.to_string()),
            ("status", &format!("{:?}", apply.outcome).to_lowercase()),
        ]);
        apply
    }

    /// Fall forward (C5): copies objects from the default storage's buckets to the external
    /// store once, idempotently. A marker per object records the content hash it copied.
    fn fall_forward(
        &mut self,
        profile: &EnvironmentProfile,
        generation: &str,
    ) -> Result<usize, PortError> {
        let Some(local) = self.adapters.fall_forward_from.clone() else {
            return Ok(0);
        };
        let target = self.adapters.storage.identity();
        let target_id = sha256_hex(&serde_json::to_vec(&target).unwrap_or_default());
        let marker_root = local.root().join(".fall-forward").join(&target_id[..16]);
        let mut copied = 0;
        let mut local = local;
        for bucket in &profile.spec.storage.buckets {
            let bucket = bucket.name.as_str();
            if !local.bucket_path(bucket).is_dir() {
                continue;
            }
            for object in super::ports::ObjectStorage::list_objects(&mut local, bucket)? {
                let Some(bytes) =
                    super::ports::ObjectStorage::get_object(&mut local, bucket, &object)?
                else {
                    continue;
                };
                let content_hash = sha256_hex(&bytes);
                let marker = marker_root.join(bucket).join(sha256_hex(object.as_bytes()));
                if std::fs::read_to_string(&marker).is_ok_and(|found| found.trim() == content_hash)
                {
                    continue;
                }
                let key = self.idempotency_key(Component::Storage, generation, &content_hash);
                let label = format!("{bucket}/{object}");
                self.with_retries(
                    Component::Storage,
                    "copy_object",
                    &label,
                    generation,
                    Some(&key),
                    |adapters| adapters.storage.put_object(bucket, &object, &bytes, &key),
                )?;
                write_atomically(&marker, content_hash.as_bytes()).map_err(|error| {
                    super::ports::io_error("write fall-forward marker", &marker, error)
                })?;
                copied += 1;
            }
        }
        Ok(copied)
    }
}

fn is_drift(step: &Step) -> bool {
    matches!(
        step,
        Step::DeclareExchange { .. } | Step::DeclareQueue { .. }
    )
}

fn summary(apply: &ComponentApply, reasserted: usize) -> Option<String> {
    let mut parts = Vec::new();
    if !apply.steps_applied.is_empty() {
        parts.push(format!("{} step(s) applied", apply.steps_applied.len()));
    }
    if reasserted > 0 {
        parts.push(format!(
            "{reasserted} binding(s) re-asserted (the broker cannot list bindings; queue.bind is idempotent)"
        ));
    }
    if apply.objects_copied > 0 {
        parts.push(format!(
            "{} object(s) copied to the external store",
            apply.objects_copied
        ));
    }
    if !apply.drift.is_empty() {
        parts.push(format!("drift: {}", apply.drift.join("; ")));
    }
    if !apply.needs_migration.is_empty() {
        parts.push(format!(
            "needs migration: {}",
            apply.needs_migration.join("; ")
        ));
    }
    if !apply.withheld.is_empty() {
        parts.push(format!(
            "withheld (destructive): {}",
            apply.withheld.join("; ")
        ));
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("; "))
    }
}

/// Carries out one step on the adapters.
fn run_step(adapters: &mut Adapters, step: &Step, key: &IdempotencyKey) -> Result<(), PortError> {
    match step {
        Step::CreateBucket { bucket } => adapters.storage.create_bucket(bucket, key),
        Step::SetVersioning { bucket, change } => {
            adapters.storage.set_versioning(bucket, *change, key)
        }
        Step::MergeLifecycleRules { bucket, rules, .. } => {
            adapters.storage.merge_lifecycle_rules(bucket, rules, key)
        }
        Step::MergeTags { bucket, tags, .. } => adapters.storage.merge_tags(bucket, tags, key),
        Step::DeclareExchange { exchange } => adapters.bus.declare_exchange(exchange, key),
        Step::RedeclareExchange {
            exchange, rebind, ..
        } => {
            adapters.bus.delete_exchange(&exchange.name, key)?;
            adapters.bus.declare_exchange(exchange, key)?;
            rebind
                .iter()
                .try_for_each(|binding| adapters.bus.bind(binding, key))
        }
        Step::DeclareQueue { queue } => adapters.bus.declare_queue(queue, key),
        Step::RedeclareQueue { queue, rebind, .. } => {
            adapters.bus.delete_queue(&queue.name, key)?;
            adapters.bus.declare_queue(queue, key)?;
            rebind
                .iter()
                .try_for_each(|binding| adapters.bus.bind(binding, key))
        }
        Step::Bind { binding } | Step::EnsureBinding { binding } => adapters.bus.bind(binding, key),
        Step::CreateClass { class } => adapters.index.create_class(class, key),
        Step::AddProperty { class, property } => adapters.index.add_property(class, property, key),
        Step::RetypeProperty {
            class, property, ..
        } => adapters.index.retype_property(class, property, key),
    }
}

/// The desired part of the profile for one component, as canonical JSON.
fn desired_json(profile: &EnvironmentProfile, component: Component) -> Vec<u8> {
    let result = match component {
        Component::Storage => serde_json::to_vec(&profile.spec.storage),
        Component::Broker => serde_json::to_vec(&profile.spec.broker),
        Component::Index => serde_json::to_vec(&profile.spec.index),
    };
    let allow = if profile.spec.allow_destructive {
        b"1"
    } else {
        b"0"
    };
    let mut bytes = result.unwrap_or_default();
    bytes.extend_from_slice(allow);
    bytes
}

fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// One port call attempt, as its structured log line shows it.
struct CallLog<'a> {
    component: Component,
    action: &'a str,
    target: &'a str,
    attempt: u32,
    generation: &'a str,
    duration_ms: u128,
    key: Option<&'a IdempotencyKey>,
}

impl CallLog<'_> {
    /// `component action target attempt idempotent generation duration_ms
    /// [idempotency_key] status [message]`. `idempotent=true` means the call changed nothing
    /// (a read); a mutation logs false and the full idempotency key it carried, which for AMQP
    /// declares and binds (no field for it on the wire) is the only place the key appears.
    fn emit(&self, status: &str, message: Option<&str>) {
        let idempotent = if self.action.starts_with("read_") || self.action.starts_with("check_") {
            "true"
        } else {
            "false"
        };
        let attempt = self.attempt.to_string();
        let duration_ms = self.duration_ms.to_string();
        let mut fields = vec![
            ("component", self.component.as_str()),
            ("action", self.action),
            ("target", self.target),
            ("attempt", attempt.as_str()),
            ("idempotent", idempotent),
            (
                "generation",
                &self.generation[..self.generation.len().min(16)],
            ),
            ("duration_ms", duration_ms.as_str()),
        ];
        if let Some(key) = self.key {
            fields.push(("idempotency_key", key.as_str()));
        }
        fields.push(("status", status));
        if let Some(message) = message {
            fields.push(("message", message));
        }
        log_line(&fields);
    }
}

/// One structured log event (logging.rs) from a port call's fields: `component`, `action`,
/// `target`, `attempt`, `idempotent`, `generation`, `duration_ms`, `idempotency_key`, `status`
/// and `message`; an `error`, `retry` or `withheld` status is a warning, any other (`ok`,
/// `unchanged`, …) is info.
pub fn log_line(fields: &[(&str, &str)]) {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| *value)
    };
    let number = |name: &str| field(name).and_then(|value| value.parse::<u64>().ok());
    let status = field("status").unwrap_or("ok");
    let message = field("message").unwrap_or("profile call");
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(
                component = field("component"),
                action = field("action"),
                target = field("target"),
                attempt = number("attempt"),
                idempotent = field("idempotent"),
                generation = field("generation"),
                duration_ms = number("duration_ms"),
                idempotency_key = field("idempotency_key"),
                status,
                "{message}"
            )
        };
    }
    match status {
        "error" | "retry" | "withheld" => emit!(warn),
        _ => emit!(info),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_under_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 100,
            cap_delay_ms: 1000,
        };
        assert!(policy.delay(1, u64::MAX) <= Duration::from_millis(100));
        assert_eq!(policy.delay(2, 200), Duration::from_millis(200));
        assert!(policy.delay(40, u64::MAX) <= Duration::from_millis(1000));
    }

    #[test]
    fn mutation_log_lines_carry_the_idempotency_key_and_reads_do_not() {
        let key = IdempotencyKey("ab".repeat(32));
        let mut call = CallLog {
            component: Component::Broker,
            action: "declare_queue",
            target: "ingest",
            attempt: 2,
            generation: "0123456789abcdef0123",
            duration_ms: 7,
            key: Some(&key),
        };
        let settings = crate::logging::LogSettings::default();
        let mutation =
            crate::logging::capture(settings, || call.emit("retry", Some("connection reset")));
        assert!(
            mutation.contains(&format!(
                " WARN outpost_agent::apply::profile::engine: connection reset component=broker action=declare_queue target=ingest attempt=2 idempotent=false generation=0123456789abcdef duration_ms=7 idempotency_key={} status=retry\n",
                key.as_str()
            )),
            "{mutation}"
        );
        call.action = "check_queue";
        call.key = None;
        let read = crate::logging::capture(settings, || call.emit("ok", None));
        assert!(
            read.contains("idempotent=true") && !read.contains("idempotency_key"),
            "{read}"
        );
    }
}
