//! Allocations as supervised processes: start in waves behind readiness gates (B2), stop with
//! SIGTERM then SIGKILL after the grace, restart by policy with backoff, adopt processes a
//! previous agent started, cap logs, apply cgroup limits where the host allows.
//!
//! The supervisor is a level-triggered state machine: `apply` sets what is desired, `tick`
//! observes processes and converges, never blocking for a grace period. All system calls go
//! through [`runtime::Syscalls`]; the decisions come from the pure [`crate::apply::diff`].

pub mod cgroup;
pub mod launcher;
pub mod logs;
pub mod probes;
pub mod procfs;
pub mod readiness;
pub mod runtime;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::backoff::{BACKOFF_RESET_AFTER_SECS, backoff_delay};
use outpost_proto::node::{AllocationState, AllocationStatus};
use outpost_proto::plan::{Allocation, Plan};
use outpost_proto::service::RestartPolicy;
use serde::{Deserialize, Serialize};

use crate::apply::diff::{Action, Desired, MayStart, Observed, Phase, diff};
use crate::store::{ProcessRecord, Store};
use runtime::{ExitCheck, ExitReason, Launch, Origin, Prober, Spawned, StopSignal, Syscalls};

/// Grace for adopted processes whose allocation left the plan before this agent saw its spec.
const DEFAULT_STOP_GRACE_MS: u64 = 5_000;
/// Longest single readiness probe attempt. An attempt may take the check's own `timeout_ms`
/// (the time the instance has to become ready), bounded by this; attempts run off the
/// supervisor's lock ([`probes`]), so a slow one holds up nothing but its own allocation.
pub const PROBE_ATTEMPT_TIMEOUT_MAX: Duration = Duration::from_secs(30);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the supervisor remembers the processes it started, so a restarted agent adopts them.
pub trait ProcessLedger: Send {
    fn save(&mut self, record: &ProcessRecord) -> Result<(), String>;
    fn remove(&mut self, allocation_id: &str) -> Result<(), String>;
    /// Records several at once, all or none where the ledger can (the store: one commit).
    fn save_all(&mut self, records: &[ProcessRecord]) -> Result<(), String> {
        records.iter().try_for_each(|record| self.save(record))
    }
    /// Forgets several at once.
    fn remove_all(&mut self, allocation_ids: &[&str]) -> Result<(), String> {
        allocation_ids.iter().try_for_each(|id| self.remove(id))
    }
}

impl ProcessLedger for Arc<Store> {
    fn save(&mut self, record: &ProcessRecord) -> Result<(), String> {
        self.save_process(record).map_err(|e| e.to_string())
    }
    fn remove(&mut self, allocation_id: &str) -> Result<(), String> {
        self.remove_process(allocation_id)
            .map_err(|e| e.to_string())
    }
    fn save_all(&mut self, records: &[ProcessRecord]) -> Result<(), String> {
        self.save_processes(records).map_err(|e| e.to_string())
    }
    fn remove_all(&mut self, allocation_ids: &[&str]) -> Result<(), String> {
        self.remove_processes(allocation_ids)
            .map_err(|e| e.to_string())
    }
}

/// An in-memory ledger, for tests and for running without a store.
#[derive(Clone, Default)]
pub struct MemoryLedger(pub Arc<std::sync::Mutex<BTreeMap<String, ProcessRecord>>>);

impl ProcessLedger for MemoryLedger {
    fn save(&mut self, record: &ProcessRecord) -> Result<(), String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(record.allocation_id.clone(), record.clone());
        Ok(())
    }
    fn remove(&mut self, allocation_id: &str) -> Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(allocation_id);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} allocation(s) could not start: {}", failures.len(), failures.iter().map(|(id, why)| format!("{id}: {why}")).collect::<Vec<_>>().join("; "))]
pub struct ApplyError {
    pub failures: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Waiting {
        deadline: Instant,
        next_probe: Instant,
    },
    Ready,
    Unready {
        next_probe: Instant,
    },
}

#[derive(Debug, Clone)]
struct Instance {
    process: Spawned,
    origin: Origin,
    spec_hash: String,
    stop_grace: Duration,
    started_at: Instant,
    readiness: Readiness,
    /// Set once SIGTERM was sent: when SIGKILL follows, and whether it was sent.
    stopping: Option<(Instant, StopSignal)>,
    /// Why a start was called off before its program ran (it could not be recorded); kept as
    /// the allocation's message once the launcher is reaped.
    called_off: Option<String>,
    /// A readiness probe of this process is running (at most one at a time).
    probing: bool,
}

/// A readiness probe attempt that is due; run it with the supervisor's [`Prober`] (on any
/// thread) and hand the result to [`Supervisor::probe_finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeJob {
    pub allocation_id: String,
    /// The process probed: a result for a process since replaced is dropped.
    process: Spawned,
    pub probe: outpost_proto::service::ReadinessProbe,
    pub timeout: Duration,
    started_at: Instant,
}

/// The timeout of one probe attempt of `check`: its own `timeout_ms`, at most
/// [`PROBE_ATTEMPT_TIMEOUT_MAX`].
pub fn probe_attempt_timeout(check: &outpost_proto::service::ReadinessCheck) -> Duration {
    Duration::from_millis(u64::from(check.timeout_ms)).min(PROBE_ATTEMPT_TIMEOUT_MAX)
}

#[derive(Debug, Clone, Default)]
struct Slot {
    instance: Option<Instance>,
    restarts: u32,
    /// Backoff attempt number; reset after a healthy run.
    attempt: u32,
    retry_at: Option<Instant>,
    /// The spec hash the restart policy gave up on.
    gave_up_on: Option<String>,
    /// The wave an unstarted allocation waits for.
    waiting_for_wave: Option<u32>,
    message: String,
    /// The spec hash the restart budget (attempt, retry_at, gave_up_on) belongs to.
    budget_for: Option<String>,
    /// Ports given to the allocation by name; a port 0 of the spec is picked once and kept
    /// across restarts of the process (E2).
    ports: BTreeMap<String, u16>,
}

/// One allocation as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationReport {
    pub allocation_id: String,
    pub service: String,
    pub wave: u32,
    pub state: AllocationState,
    pub pid: Option<i32>,
    pub adopted: bool,
    pub restarts: u32,
    pub message: String,
}

/// Desired versus running.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Drift {
    pub desired: usize,
    pub running: usize,
    /// In the plan without a ready process running the planned spec.
    pub missing: Vec<String>,
    /// Running without being in the plan (stopping).
    pub unexpected: Vec<String>,
}

/// What the environment profile adds to allocations' environments (S4), from
/// `apply::profile::{bucket_environment, service_environment}`. It reaches a process when it
/// starts; a running process keeps the environment it started with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileEnvironment {
    /// For every allocation: where each profile bucket is.
    pub shared: BTreeMap<String, String>,
    /// Per service: its own modules, migrations and parameters.
    pub per_service: BTreeMap<String, BTreeMap<String, String>>,
}

pub struct Supervisor {
    node_id: String,
    data_dir: PathBuf,
    sys: Box<dyn Syscalls>,
    prober: Arc<dyn Prober>,
    ledger: Box<dyn ProcessLedger>,
    /// Desired allocations in plan order, with their spec hashes.
    desired: Vec<(Allocation, String)>,
    slots: BTreeMap<String, Slot>,
    ledger_error: Option<String>,
    profile_environment: ProfileEnvironment,
    /// The node's X25519 sealing key, and the plan's sealed secrets (P11): opened only to
    /// start a process (`crate::apply::secret`).
    sealing_key: Option<[u8; 32]>,
    plan_secrets: Vec<outpost_proto::secret::NodeSecret>,
    secrets_root: crate::apply::secret::SecretsRoot,
}

impl Supervisor {
    pub fn new(
        node_id: &str,
        data_dir: PathBuf,
        sys: Box<dyn Syscalls>,
        ledger: Box<dyn ProcessLedger>,
    ) -> Self {
        let data_dir_for_secrets = data_dir.clone();
        Self {
            node_id: node_id.to_string(),
            data_dir,
            prober: sys.prober(),
            sys,
            ledger,
            desired: Vec::new(),
            slots: BTreeMap::new(),
            ledger_error: None,
            profile_environment: ProfileEnvironment::default(),
            sealing_key: None,
            plan_secrets: Vec::new(),
            secrets_root: crate::apply::secret::SecretsRoot {
                dir: data_dir_for_secrets.join("secrets"),
                on_tmpfs: false,
            },
        }
    }

    /// Sets the node's sealing key and where instances' secret files go.
    pub fn set_secrets(&mut self, sealing_key: [u8; 32], root: crate::apply::secret::SecretsRoot) {
        self.sealing_key = Some(sealing_key);
        self.secrets_root = root;
    }

    /// Sets what the environment profile adds to the environment of processes started from now
    /// on. Precedence: the plan's `env` over the profile's, and `OUTPOST_ALLOCATION_ID`,
    /// `OUTPOST_NODE_ID` and `OUTPOST_SERVICE` over both.
    pub fn set_profile_environment(&mut self, environment: ProfileEnvironment) {
        self.profile_environment = environment;
    }

    /// Takes over processes a previous agent started: those still alive with the recorded start
    /// time are watched through /proc; the others are forgotten. `plan` supplies readiness and
    /// grace. Returns (adopted, gone) allocation ids.
    pub fn adopt(
        &mut self,
        records: Vec<ProcessRecord>,
        plan: &Plan,
        now: Instant,
    ) -> (Vec<String>, Vec<String>) {
        let (mut adopted, mut gone) = (Vec::new(), Vec::new());
        for record in records {
            let alive = self.sys.live_start_ticks(record.pid) == Some(record.start_ticks)
                && record.start_ticks != 0;
            if !alive {
                gone.push(record.allocation_id);
                continue;
            }
            let spec = plan.allocation(&record.allocation_id).map(|a| &a.spec);
            let stop_grace = Duration::from_millis(
                spec.map_or(DEFAULT_STOP_GRACE_MS, |s| u64::from(s.stop_grace_ms)),
            );
            let readiness = initial_readiness(spec.and_then(|s| s.readiness.as_ref()), now);
            let slot = self.slots.entry(record.allocation_id.clone()).or_default();
            slot.restarts = record.restarts;
            slot.budget_for = Some(record.spec_hash.clone());
            slot.ports = record.ports.clone();
            slot.instance = Some(Instance {
                process: Spawned {
                    pid: record.pid,
                    start_ticks: record.start_ticks,
                },
                origin: Origin::Adopted,
                spec_hash: record.spec_hash,
                stop_grace,
                started_at: now,
                readiness,
                stopping: None,
                called_off: None,
                probing: false,
            });
            slot.message = format!("adopted pid {}", record.pid);
            adopted.push(record.allocation_id);
        }
        if !gone.is_empty() {
            let ids: Vec<&str> = gone.iter().map(String::as_str).collect();
            self.ledger_result(|ledger| ledger.remove_all(&ids));
        }
        (adopted, gone)
    }

    /// Makes `plan` the desired state and takes the first steps towards it. Fails when an
    /// allocation that can start now could not be started.
    pub fn apply(&mut self, plan: &Plan, now: Instant) -> Result<(), ApplyError> {
        self.node_id = plan.node_id.to_string();
        self.plan_secrets = plan.secrets.clone();
        self.desired = plan
            .allocations
            .iter()
            .map(|a| {
                (
                    a.clone(),
                    crate::apply::secret::desired_hash(a, &plan.secrets),
                )
            })
            .collect();
        for (allocation, hash) in &self.desired {
            if let Some(slot) = self.slots.get_mut(allocation.id.as_str()) {
                // A new spec gets a fresh restart budget: a fix starts at once.
                if slot.budget_for.as_ref() != Some(hash) {
                    slot.budget_for = Some(hash.clone());
                    slot.gave_up_on = None;
                    slot.attempt = 0;
                    slot.retry_at = None;
                }
            }
        }
        let failures = self.reconcile(now);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ApplyError { failures })
        }
    }

    /// Stops everything: the desired state becomes empty. Call `tick` until `is_idle`.
    pub fn stop_all(&mut self, now: Instant) {
        self.desired.clear();
        self.reconcile(now);
    }

    /// No process is running or stopping.
    pub fn is_idle(&self) -> bool {
        self.slots.values().all(|slot| slot.instance.is_none())
    }

    /// Observes processes and converges: reaps exits, escalates stops, probes readiness, caps
    /// logs, starts what may start. Probes run here, inline; a supervisor shared between
    /// threads uses [`Supervisor::tick_deferring_probes`] instead (see [`probes`]).
    pub fn tick(&mut self, now: Instant) {
        self.observe_exits(now);
        self.escalate_stops(now);
        for job in self.due_probes(now) {
            let result = self
                .prober
                .probe(&job.allocation_id, &job.probe, job.timeout);
            self.probe_finished(job, result, now);
        }
        self.cap_logs();
        self.reconcile(now);
    }

    /// [`Supervisor::tick`] without running probes: returns the probes that are due (marked as
    /// running), for the caller to run without holding the supervisor.
    pub fn tick_deferring_probes(&mut self, now: Instant) -> Vec<ProbeJob> {
        self.observe_exits(now);
        self.escalate_stops(now);
        self.cap_logs();
        self.reconcile(now);
        self.due_probes(now)
    }

    /// What runs the probes [`Supervisor::tick_deferring_probes`] hands out.
    pub fn prober(&self) -> Arc<dyn Prober> {
        self.prober.clone()
    }

    /// Every tick (a `stat` per log): a log passes its cap by at most what its process writes
    /// in one tick.
    fn cap_logs(&mut self) {
        for id in self.slots.keys() {
            self.sys.cap_logs(&self.allocation_dir(id));
        }
    }

    fn allocation_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("allocations").join(id)
    }

    fn desired_entry(&self, id: &str) -> Option<&(Allocation, String)> {
        self.desired.iter().find(|(a, _)| a.id.as_str() == id)
    }

    fn ledger_result(&mut self, op: impl FnOnce(&mut dyn ProcessLedger) -> Result<(), String>) {
        match op(self.ledger.as_mut()) {
            Ok(()) => {}
            Err(why) => self.ledger_error = Some(format!("cannot record processes: {why}")),
        }
    }

    fn observe_exits(&mut self, now: Instant) {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            let Some(instance) = self.slots.get(&id).and_then(|s| s.instance.clone()) else {
                continue;
            };
            let ExitCheck::Exited(reason) = self.sys.check_exit(instance.process, instance.origin)
            else {
                continue;
            };
            self.sys.release(&id);
            self.secrets_root.remove_instance(&id);
            self.ledger_result(|ledger| ledger.remove(&id));
            let policy = self.desired_entry(&id).map(|(a, _)| a.spec.restart);
            let random = self.sys.random_u64();
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            slot.instance = None;
            if let Some(why) = instance.called_off {
                slot.message = why;
                continue;
            }
            if instance.stopping.is_some() {
                slot.message = format!("stopped ({reason})");
                tracing::info!(
                    component = "allocations",
                    action = "stopped",
                    allocation_id = %id,
                    "pid {} {}",
                    instance.process.pid,
                    slot.message
                );
                continue;
            }
            let Some(policy) = policy else { continue };
            slot.restarts += 1;
            if now.duration_since(instance.started_at)
                >= Duration::from_secs(BACKOFF_RESET_AFTER_SECS)
            {
                slot.attempt = 0;
            }
            let clean = reason == ExitReason::Code(0);
            let restart = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !clean,
                RestartPolicy::Never => false,
            };
            if restart {
                let delay = backoff_delay(slot.attempt, random);
                slot.attempt = slot.attempt.saturating_add(1);
                slot.retry_at = Some(now + delay);
                slot.message = format!("{reason}; restarting in {} ms", delay.as_millis());
            } else {
                slot.gave_up_on = Some(instance.spec_hash.clone());
                slot.retry_at = None;
                slot.message = format!("{reason}; restart policy {policy:?} does not restart it");
            }
            tracing::warn!(
                component = "allocations",
                action = "exited",
                allocation_id = %id,
                attempt = slot.attempt,
                restarts = slot.restarts,
                "pid {} {}",
                instance.process.pid,
                slot.message
            );
        }
    }

    fn escalate_stops(&mut self, now: Instant) {
        let mut kills = Vec::new();
        for slot in self.slots.values_mut() {
            if let Some(instance) = &mut slot.instance
                && let Some((kill_at, StopSignal::Terminate)) = instance.stopping
                && now >= kill_at
            {
                instance.stopping = Some((kill_at, StopSignal::Kill));
                kills.push(instance.process.pid);
            }
        }
        for pid in kills {
            let _ = self.sys.signal_group(pid, StopSignal::Kill);
        }
    }

    /// The probe attempts due at `now`, marked as running: at most one per process, for
    /// processes of the plan that are not ready and not stopping.
    fn due_probes(&mut self, now: Instant) -> Vec<ProbeJob> {
        let mut jobs = Vec::new();
        for (allocation, _) in &self.desired {
            let Some(check) = &allocation.spec.readiness else {
                continue;
            };
            let Some(instance) = self
                .slots
                .get_mut(allocation.id.as_str())
                .and_then(|slot| slot.instance.as_mut())
            else {
                continue;
            };
            if instance.stopping.is_some() || instance.probing {
                continue;
            }
            let next_probe = match instance.readiness {
                Readiness::Ready => continue,
                Readiness::Waiting { next_probe, .. } | Readiness::Unready { next_probe } => {
                    next_probe
                }
            };
            if now < next_probe {
                continue;
            }
            instance.probing = true;
            jobs.push(ProbeJob {
                allocation_id: allocation.id.to_string(),
                process: instance.process,
                probe: check.probe.clone(),
                timeout: probe_attempt_timeout(check),
                started_at: now,
            });
        }
        jobs
    }

    /// Records the result of a probe attempt that ended at `now`. A result for a process that
    /// is gone, replaced or stopping changes nothing.
    pub fn probe_finished(&mut self, job: ProbeJob, result: Result<(), String>, now: Instant) {
        let check = self
            .desired_entry(&job.allocation_id)
            .and_then(|(a, _)| a.spec.readiness.clone());
        let Some(slot) = self.slots.get_mut(&job.allocation_id) else {
            return;
        };
        let Some(instance) = slot
            .instance
            .as_mut()
            .filter(|instance| instance.process == job.process)
        else {
            return;
        };
        instance.probing = false;
        let Some(check) = check else { return };
        if instance.stopping.is_some() {
            return;
        }
        let next_probe = job.started_at + Duration::from_millis(u64::from(check.interval_ms));
        instance.readiness = match (result, instance.readiness) {
            (Ok(()), _) => {
                slot.message = "ready".into();
                Readiness::Ready
            }
            (Err(why), Readiness::Waiting { deadline, .. }) if now < deadline => {
                slot.message = format!("not ready yet: {why}");
                Readiness::Waiting {
                    deadline,
                    next_probe,
                }
            }
            (Err(why), _) => {
                slot.message = format!(
                    "readiness did not pass within {} ms: {why}",
                    check.timeout_ms
                );
                Readiness::Unready { next_probe }
            }
        };
    }

    /// Runs the diff until no more starts happen (allocations without readiness checks open the
    /// next wave at once). Returns the allocations that could not start.
    fn reconcile(&mut self, now: Instant) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for _round in 0..=self.desired.len() {
            let views: Vec<Desired> = self
                .desired
                .iter()
                .map(|(allocation, hash)| {
                    let slot = self.slots.get(allocation.id.as_str());
                    let gave_up = slot
                        .and_then(|s| s.gave_up_on.as_ref())
                        .is_some_and(|h| h == hash);
                    let waiting = slot.and_then(|s| s.retry_at).is_some_and(|at| now < at);
                    let may_start = if gave_up || waiting {
                        MayStart::Later
                    } else {
                        MayStart::Now
                    };
                    Desired {
                        id: allocation.id.to_string(),
                        wave: allocation.spec.wave,
                        spec_hash: hash.clone(),
                        may_start,
                    }
                })
                .collect();
            let observed: BTreeMap<String, Observed> = self
                .slots
                .iter()
                .filter_map(|(id, slot)| {
                    let instance = slot.instance.as_ref()?;
                    let phase = match (instance.stopping, instance.readiness) {
                        (Some(_), _) => Phase::Stopping,
                        (None, Readiness::Ready) => Phase::Ready,
                        (None, Readiness::Waiting { .. }) => Phase::Starting,
                        (None, Readiness::Unready { .. }) => Phase::Unready,
                    };
                    Some((
                        id.clone(),
                        Observed {
                            spec_hash: instance.spec_hash.clone(),
                            phase,
                        },
                    ))
                })
                .collect();
            let result = diff(&views, &observed);
            for slot in self.slots.values_mut() {
                slot.waiting_for_wave = None;
            }
            for id in &result.held_by_wave {
                self.slots.entry(id.clone()).or_default().waiting_for_wave = result.blocking_wave;
            }
            let mut pending = Vec::new();
            for action in result.actions {
                match action {
                    Action::Start { id } => match self.start(&id, now) {
                        Ok(Some(record)) => pending.push(record),
                        Ok(None) => {}
                        Err(why) => failures.push((id, why)),
                    },
                    Action::Stop { id } | Action::Restart { id } => self.stop(&id, now),
                }
            }
            if pending.is_empty() {
                break;
            }
            // The round's starts are recorded together before any of them may run.
            let recorded = self.record_starts(&pending, now);
            let any_confirmed = recorded.len() < pending.len();
            failures.extend(recorded);
            if !any_confirmed {
                break;
            }
        }
        let desired_ids: Vec<String> = self.desired.iter().map(|(a, _)| a.id.to_string()).collect();
        self.slots
            .retain(|id, slot| slot.instance.is_some() || desired_ids.contains(id));
        // An instance that moved away leaves no secret files behind.
        let running: Vec<String> = self.slots.keys().cloned().collect();
        self.secrets_root.sweep(&running);
        failures
    }

    fn launch_for(&self, allocation: &Allocation, ports: &BTreeMap<String, u16>) -> Launch {
        let id = allocation.id.to_string();
        let log_dir = self.allocation_dir(&id);
        let working_dir = allocation
            .spec
            .working_dir
            .as_ref()
            .map_or_else(|| log_dir.join("work"), PathBuf::from);
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.extend(self.profile_environment.shared.clone());
        if let Some(own) = self
            .profile_environment
            .per_service
            .get(allocation.service.as_str())
        {
            env.extend(own.clone());
        }
        env.extend(
            allocation
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        env.insert("OUTPOST_ALLOCATION_ID".to_string(), id.clone());
        env.insert("OUTPOST_NODE_ID".to_string(), self.node_id.clone());
        env.insert(
            "OUTPOST_SERVICE".to_string(),
            allocation.service.to_string(),
        );
        for (name, port) in ports {
            env.insert(
                outpost_proto::service::port_env_name(name),
                port.to_string(),
            );
        }
        let mut program = allocation.spec.command.clone();
        if let Some(artifact) = &allocation.spec.artifact {
            // R1: a relative command resolves inside the unpacked artifact.
            let dir = crate::artifact::ArtifactCache::new(&self.data_dir).dir(&artifact.sha256);
            if !program.starts_with('/') {
                program = dir.join(&program).display().to_string();
            }
            env.insert(
                "OUTPOST_ARTIFACT_DIR".to_string(),
                dir.display().to_string(),
            );
        }
        Launch {
            allocation_id: id,
            program,
            args: allocation.spec.args.clone(),
            env,
            working_dir,
            log_dir,
            memory_bytes: allocation.spec.memory_bytes,
            cpu_millis: allocation.spec.cpu_millis,
        }
    }

    /// Spawns the allocation's process held at its launcher's gate and returns the record to
    /// make before it may run (see [`Supervisor::record_starts`]).
    fn start(&mut self, id: &str, now: Instant) -> Result<Option<ProcessRecord>, String> {
        let Some((allocation, hash)) = self.desired_entry(id).cloned() else {
            return Ok(None);
        };
        let kept = self
            .slots
            .get(id)
            .map(|slot| slot.ports.clone())
            .unwrap_or_default();
        let ports = assign_ports(&allocation.spec.ports, &kept, pick_free_port);
        let mut launch = self.launch_for(&allocation, &ports);
        let spawned = match &allocation.spec.artifact {
            Some(artifact)
                if !crate::artifact::ArtifactCache::new(&self.data_dir)
                    .is_ready(&artifact.sha256) =>
            {
                Err(format!(
                    "artifact {} is not in the cache yet (see status artifacts)",
                    artifact.sha256
                ))
            }
            // Secrets are opened only now, to start the process; a version that does not
            // open (tampered, another node's) or has not arrived keeps it from starting.
            _ => match crate::apply::secret::materialize(
                self.sealing_key.as_ref(),
                &self.node_id,
                &allocation,
                &self.plan_secrets,
                &self.secrets_root,
            ) {
                Ok(secret_env) => {
                    launch.env.extend(secret_env);
                    self.sys.spawn(&launch)
                }
                Err(refusal) => Err(refusal.to_string()),
            },
        };
        let random = self.sys.random_u64();
        let slot = self.slots.entry(id.to_string()).or_default();
        slot.ports = ports.clone();
        slot.budget_for = Some(hash.clone());
        let process = match spawned {
            Ok(process) => process,
            Err(why) => {
                let delay = backoff_delay(slot.attempt, random);
                slot.attempt = slot.attempt.saturating_add(1);
                slot.retry_at = Some(now + delay);
                slot.message = format!(
                    "could not start: {why}; retrying in {} ms",
                    delay.as_millis()
                );
                tracing::warn!(
                    component = "allocations",
                    action = "start",
                    allocation_id = id,
                    attempt = slot.attempt,
                    "{}",
                    slot.message
                );
                return Err(why);
            }
        };
        slot.message = format!("starting pid {}", process.pid);
        slot.instance = Some(Instance {
            process,
            origin: Origin::Child,
            spec_hash: hash.clone(),
            stop_grace: Duration::from_millis(u64::from(allocation.spec.stop_grace_ms)),
            started_at: now,
            readiness: initial_readiness(allocation.spec.readiness.as_ref(), now),
            stopping: None,
            called_off: None,
            probing: false,
        });
        Ok(Some(ProcessRecord {
            allocation_id: id.to_string(),
            pid: process.pid,
            start_ticks: process.start_ticks,
            spec_hash: hash,
            restarts: slot.restarts,
            ports,
        }))
    }

    /// Records the starts of one round in one ledger write, then lets their launchers go. Only
    /// a recorded process may run its program: a restarted agent adopts it. Starts that cannot
    /// be recorded are called off (the launcher never execs) and retried with backoff; no
    /// workload runs unrecorded. Returns the starts called off, with why.
    fn record_starts(&mut self, pending: &[ProcessRecord], now: Instant) -> Vec<(String, String)> {
        let saved = self.ledger.save_all(pending);
        let mut called_off = Vec::new();
        for record in pending {
            let random = self.sys.random_u64();
            let Some(slot) = self.slots.get_mut(&record.allocation_id) else {
                continue;
            };
            let Some(instance) = slot.instance.as_mut() else {
                continue;
            };
            match &saved {
                Ok(()) => {
                    slot.retry_at = None;
                    slot.message = format!("started pid {}", record.pid);
                    tracing::info!(
                        component = "allocations",
                        action = "start",
                        allocation_id = %record.allocation_id,
                        attempt = slot.attempt,
                        restarts = slot.restarts,
                        "{}",
                        slot.message
                    );
                    self.sys.confirm_start(record.pid);
                }
                Err(why) => {
                    let why = format!("cannot record the start of pid {}: {why}", record.pid);
                    let delay = backoff_delay(slot.attempt, random);
                    slot.attempt = slot.attempt.saturating_add(1);
                    slot.retry_at = Some(now + delay);
                    slot.message =
                        format!("not started: {why}; retrying in {} ms", delay.as_millis());
                    // Reaped like any stopped process; nothing left to escalate.
                    instance.stopping = Some((now, StopSignal::Kill));
                    instance.called_off = Some(slot.message.clone());
                    self.ledger_error = Some(format!("cannot record processes: {why}"));
                    self.sys.abort_start(record.pid);
                    called_off.push((record.allocation_id.clone(), why));
                }
            }
        }
        called_off
    }

    fn stop(&mut self, id: &str, now: Instant) {
        let Some(instance) = self.slots.get_mut(id).and_then(|s| s.instance.as_mut()) else {
            return;
        };
        if instance.stopping.is_some() {
            return;
        }
        instance.stopping = Some((now + instance.stop_grace, StopSignal::Terminate));
        let pid = instance.process.pid;
        tracing::info!(
            component = "allocations",
            action = "stop",
            allocation_id = id,
            "stopping pid {pid} (SIGTERM, then SIGKILL after {} ms)",
            instance.stop_grace.as_millis()
        );
        let _ = self.sys.signal_group(pid, StopSignal::Terminate);
    }

    /// Status of every allocation in the plan, plus those still stopping.
    pub fn reports(&self) -> Vec<AllocationReport> {
        let mut reports = Vec::new();
        for (allocation, hash) in &self.desired {
            let slot = self.slots.get(allocation.id.as_str());
            let instance = slot.and_then(|s| s.instance.as_ref());
            let state = match (slot, instance) {
                (_, Some(i)) if i.called_off.is_some() => AllocationState::Backoff,
                (_, Some(i)) if i.stopping.is_some() => AllocationState::Starting,
                (_, Some(i)) if &i.spec_hash != hash => AllocationState::Starting,
                (_, Some(i)) => match i.readiness {
                    Readiness::Ready => AllocationState::Running,
                    Readiness::Waiting { .. } => AllocationState::Starting,
                    Readiness::Unready { .. } => AllocationState::Unready,
                },
                (Some(s), None) if s.gave_up_on.as_ref() == Some(hash) => AllocationState::Failed,
                (Some(s), None) if s.retry_at.is_some() => AllocationState::Backoff,
                _ => AllocationState::Pending,
            };
            let message = match slot {
                Some(s) if instance.is_none() && state == AllocationState::Pending => {
                    match s.waiting_for_wave {
                        Some(wave) => format!("waiting for wave {wave} to be ready"),
                        None => s.message.clone(),
                    }
                }
                Some(s) => s.message.clone(),
                None => String::new(),
            };
            reports.push(AllocationReport {
                allocation_id: allocation.id.to_string(),
                service: allocation.service.to_string(),
                wave: allocation.spec.wave,
                state,
                pid: instance.map(|i| i.process.pid),
                adopted: instance.is_some_and(|i| i.origin == Origin::Adopted),
                restarts: slot.map_or(0, |s| s.restarts),
                message,
            });
        }
        for (id, slot) in &self.slots {
            if self.desired_entry(id).is_some() {
                continue;
            }
            if let Some(instance) = &slot.instance {
                reports.push(AllocationReport {
                    allocation_id: id.clone(),
                    service: String::new(),
                    wave: 0,
                    state: AllocationState::Stopped,
                    pid: Some(instance.process.pid),
                    adopted: instance.origin == Origin::Adopted,
                    restarts: slot.restarts,
                    message: "left the plan; stopping".into(),
                });
            }
        }
        reports
    }

    /// What control sees in heartbeats.
    pub fn statuses(&self) -> Vec<AllocationStatus> {
        self.reports()
            .into_iter()
            .filter_map(|r| {
                let ports = self
                    .slots
                    .get(&r.allocation_id)
                    .filter(|slot| slot.instance.is_some())
                    .map(|slot| {
                        slot.ports
                            .iter()
                            .filter_map(|(name, port)| {
                                Some(outpost_proto::node::BoundPort {
                                    name: outpost_proto::Name::try_from(name.as_str()).ok()?,
                                    port: *port,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(AllocationStatus {
                    allocation_id: outpost_proto::Name::try_from(r.allocation_id.as_str()).ok()?,
                    state: r.state,
                    restarts: r.restarts,
                    message: outpost_proto::validate::shorten(&r.message),
                    ports,
                })
            })
            .collect()
    }

    pub fn drift(&self) -> Drift {
        let reports = self.reports();
        let desired: Vec<&AllocationReport> = reports
            .iter()
            .filter(|r| r.state != AllocationState::Stopped)
            .collect();
        Drift {
            desired: desired.len(),
            running: desired
                .iter()
                .filter(|r| r.state == AllocationState::Running)
                .count(),
            missing: desired
                .iter()
                .filter(|r| r.state != AllocationState::Running)
                .map(|r| r.allocation_id.clone())
                .collect(),
            unexpected: reports
                .iter()
                .filter(|r| r.state == AllocationState::Stopped)
                .map(|r| r.allocation_id.clone())
                .collect(),
        }
    }

    /// Notes for status: limits unavailable, ledger trouble.
    pub fn notes(&self) -> Vec<String> {
        self.sys
            .limits_unavailable()
            .into_iter()
            .chain(self.ledger_error.clone())
            .collect()
    }

    /// Whether each allocation of `ids` in the plan is healthy (R4): a process of its planned
    /// spec passed its readiness check, or, with no check, has been up for `min_up`. `Err`
    /// names the first that is not and its state.
    pub fn healthy(&self, ids: &[String], min_up: Duration, now: Instant) -> Result<(), String> {
        for id in ids {
            let Some((allocation, hash)) = self.desired_entry(id) else {
                continue;
            };
            let instance = self.slots.get(id).and_then(|s| s.instance.as_ref());
            let up = match instance {
                Some(i) if &i.spec_hash == hash && i.stopping.is_none() => {
                    Some((i.readiness, now.saturating_duration_since(i.started_at)))
                }
                _ => None,
            };
            match up {
                Some((Readiness::Ready, _)) if allocation.spec.readiness.is_some() => {}
                Some((Readiness::Ready, up)) if up >= min_up => {}
                Some((Readiness::Ready, up)) => {
                    return Err(format!(
                        "{id} up {} s of {} s",
                        up.as_secs(),
                        min_up.as_secs()
                    ));
                }
                _ => {
                    let state = self
                        .reports()
                        .into_iter()
                        .find(|r| &r.allocation_id == id)
                        .map(|r| format!("{:?}", r.state).to_lowercase())
                        .unwrap_or_default();
                    return Err(format!("{id} {state}"));
                }
            }
        }
        Ok(())
    }

    /// Every allocation in the plan has a process: started, adopted or spawned and waiting for
    /// readiness (used by the boot benchmark).
    pub fn all_spawned(&self) -> bool {
        self.desired.iter().all(|(a, _)| {
            self.slots
                .get(a.id.as_str())
                .is_some_and(|s| s.instance.is_some())
        })
    }
}

fn initial_readiness(
    check: Option<&outpost_proto::service::ReadinessCheck>,
    now: Instant,
) -> Readiness {
    match check {
        None => Readiness::Ready,
        Some(check) => Readiness::Waiting {
            deadline: now + Duration::from_millis(u64::from(check.timeout_ms)),
            next_probe: now,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// The ports of an allocation: fixed ones as the spec says, and for each port 0 the one kept
/// from an earlier start, else a fresh pick. Pure but for `pick`.
pub fn assign_ports(
    declared: &[outpost_proto::service::ServicePort],
    kept: &BTreeMap<String, u16>,
    mut pick: impl FnMut() -> Option<u16>,
) -> BTreeMap<String, u16> {
    declared
        .iter()
        .filter_map(|port| {
            let name = port.name.to_string();
            let chosen = match u16::try_from(port.port) {
                Ok(fixed) if fixed != 0 => Some(fixed),
                _ => kept.get(&name).copied().or_else(&mut pick),
            }?;
            Some((name, chosen))
        })
        .collect()
}

/// A port the kernel says is free now (bound on all addresses, then released).
pub fn pick_free_port() -> Option<u16> {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .ok()
}
