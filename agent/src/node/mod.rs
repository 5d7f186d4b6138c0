//! The running node's shared state, as narrow handles (built once by `boot`, the composition
//! root, and handed to each thread that needs them): who the node is ([`NodeState`]), the plan
//! it runs and its cluster.json ([`PlanState`]), its supervised workloads ([`Workloads`]) and
//! the wake-ups between threads ([`Bell`]). Each handle has its own lock; none is held across a
//! network call. Nothing here starts a thread or talks to control.

pub mod cluster;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_proto::node::HeartbeatResponse;
use outpost_proto::plan::Plan;

use crate::apply::process::Supervisor;
use crate::status::{ControlState, StatusBoard};
use crate::store::{ComponentApply, Identity, Store};
use cluster::{ClusterFile, write_cluster_file};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Wakes one parked thread early: a flag that survives a ring before the thread parks, and
/// the thread to unpark.
#[derive(Default)]
pub struct Bell {
    thread: Mutex<Option<std::thread::Thread>>,
    rung: AtomicBool,
}

impl Bell {
    /// The thread that waits on this bell.
    pub fn attach(&self, thread: std::thread::Thread) {
        *lock(&self.thread) = Some(thread);
    }

    pub fn ring(&self) {
        self.rung.store(true, Ordering::SeqCst);
        if let Some(thread) = lock(&self.thread).as_ref() {
            thread.unpark();
        }
    }

    /// Whether the bell rang since the last call (clears it).
    pub fn take(&self) -> bool {
        self.rung.swap(false, Ordering::SeqCst)
    }
}

/// Who this node is: its id and its enrolled identity (credential, CA, keys).
pub struct NodeState {
    node_id: Mutex<String>,
    identity: Mutex<Identity>,
    board: StatusBoard,
}

impl NodeState {
    pub fn new(node_id: String, identity: Identity, board: StatusBoard) -> Self {
        Self {
            node_id: Mutex::new(node_id),
            identity: Mutex::new(identity),
            board,
        }
    }

    pub fn node_id(&self) -> String {
        lock(&self.node_id).clone()
    }

    pub fn set_node_id(&self, node_id: &str) {
        *lock(&self.node_id) = node_id.to_string();
        self.board.update(|s| s.node_id = node_id.to_string());
    }

    /// A copy of the identity as it is now.
    pub fn identity(&self) -> Identity {
        lock(&self.identity).clone()
    }

    /// The identity under its lock, for a read-change-store that must not interleave.
    pub fn identity_lock(&self) -> MutexGuard<'_, Identity> {
        lock(&self.identity)
    }
}

/// The plan that runs (the last-good plan) and cluster.json, which follows it and heartbeats.
pub struct PlanState {
    plan: Mutex<Plan>,
    has_plan: AtomicBool,
    cluster: Mutex<Option<ClusterFile>>,
    data_dir: PathBuf,
    board: StatusBoard,
    store: Arc<Store>,
    /// Rung when a plan is settled (the overlay thread applies it at once).
    settled: Arc<Bell>,
    /// The applied plan waiting to become last-good (R4, `sync::promote`).
    probation: Mutex<Option<crate::sync::promote::Probation>>,
}

impl PlanState {
    /// `plan` is `None` when boot found none (an empty plan runs until control sends one).
    pub fn new(
        plan: Option<Plan>,
        empty: Plan,
        cluster: Option<ClusterFile>,
        store: Arc<Store>,
        board: StatusBoard,
        settled: Arc<Bell>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            has_plan: AtomicBool::new(plan.is_some()),
            plan: Mutex::new(plan.unwrap_or(empty)),
            cluster: Mutex::new(cluster),
            data_dir,
            board,
            store,
            settled,
            probation: Mutex::new(None),
        }
    }

    /// The applied plan that is not last-good yet, if any; held while a plan is taken.
    pub fn probation(&self) -> MutexGuard<'_, Option<crate::sync::promote::Probation>> {
        lock(&self.probation)
    }

    /// The plan that runs: the last-good plan, or an applied one on probation.
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
        self.settled.ring();
        let now = crate::os::unix_now_secs();
        self.board.update(|s| {
            s.role = plan.role;
            s.plan_generation = Some(plan.generation());
            s.plan_source = source.to_string();
            s.cursor = Some(plan.as_of.to_string());
            s.last_sync_unix = Some(now);
        });
        let cluster = lock(&self.cluster).clone();
        if let Some(mut cluster) = cluster {
            cluster.role = plan.role;
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
        if let Err(error) = write_cluster_file(&self.data_dir, &cluster) {
            self.board
                .update(|s| s.note(format!("cannot write cluster.json: {error}")));
        }
        *current = Some(cluster);
    }

    /// A heartbeat reached control: cluster.json and the control part of status follow it.
    pub fn note_heartbeat(&self, response: &HeartbeatResponse) {
        let cluster = lock(&self.cluster).clone();
        if let Some(mut cluster) = cluster {
            cluster.ttl_secs = response.ttl_secs;
            cluster.epoch = response.epoch;
            cluster.role = response.role;
            self.update_cluster(cluster);
        }
        let outbox_len = self.store.state().map(|s| s.outbox_len).unwrap_or(0);
        self.board.update(|s| {
            s.control.state = ControlState::Connected;
            s.control.last_error = None;
            s.control.last_contact_unix = Some(crate::os::unix_now_secs());
            s.outbox_len = outbox_len;
        });
    }
}

/// The supervised workloads. Readiness probes take the lock themselves (`OffLockProbes`).
pub struct Workloads {
    supervisor: Mutex<Supervisor>,
}

impl Workloads {
    pub fn new(supervisor: Supervisor) -> Self {
        Self {
            supervisor: Mutex::new(supervisor),
        }
    }

    pub fn supervisor(&self) -> MutexGuard<'_, Supervisor> {
        lock(&self.supervisor)
    }

    pub fn mutex(&self) -> &Mutex<Supervisor> {
        &self.supervisor
    }
}

/// Records the apply of a component (C10): in the store, and on the status port's
/// `/internal/bootstrap/status`. Profile reconcilers and the overlay report through this.
pub fn record_component(
    store: &Store,
    board: &StatusBoard,
    component: &str,
    apply: ComponentApply,
) {
    if let Err(error) = store.record_component(component, &apply) {
        board.update(|s| s.note(format!("cannot record {component} apply: {error}")));
    }
    board.update(|s| {
        s.components.insert(component.to_string(), apply);
    });
}
