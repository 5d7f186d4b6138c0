//! Projections (P2): the read views built by applying log events in order — nodes, services,
//! allocations (per node, the plans), enrollment tokens, the profile and bootstrap status —
//! with the checkpoint of the last event applied. Pure: [`Views::apply`] is a fold over events,
//! so replaying the log from scratch gives the same views as following it live.

pub mod projector;

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::bootstrap::{BootstrapStatus, BootstrapStepStatus};
use outpost_proto::node::{NodeFacts, Role};
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::service::ServiceSpec;
use serde::{Deserialize, Serialize};

use outpost_proto::limits::PLAN_ALLOCATIONS_MAX;
use outpost_proto::plan::{Allocation, Plan};
use outpost_proto::{Cursor, Name};

use crate::feed::NodeSettings;
use crate::log::{Event, EventDecodeError};
use crate::scheduler::{
    NodeAvailability, NodeScheduling, SchedulerAllocation, SchedulerInput, SchedulerNode,
    SchedulerService,
};
use crate::store::StoredEvent;

/// Name of the projection snapshot in the store.
pub const VIEWS_PROJECTION: &str = "views";
/// Version of the snapshot layout; an unknown version is dropped and rebuilt by replay.
/// 3: services and releases are keyed by org and name (P4), so two orgs can both have `web`.
pub const VIEWS_SNAPSHOT_VERSION: u32 = 3;
/// Most bootstrap errors kept per node.
pub const BOOTSTRAP_ERRORS_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Down,
    Revoked,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
            NodeState::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub org: String,
    pub facts: NodeFacts,
    pub state: NodeState,
    pub role: Role,
    pub registered_at_unix_ms: u64,
    pub updated_event_id: u64,
    // Placement and liveness (F1, F2).
    /// Labels the operator set (`outpostctl nodes label`); they win over the node's own.
    #[serde(default)]
    pub operator_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub scheduling: NodeScheduling,
    /// When the node was marked down; `None` while it is ready.
    #[serde(default)]
    pub down_since_unix_ms: Option<u64>,
}

impl NodeRecord {
    /// The labels selectors see: the node's own, with the operator's on top.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = self
            .facts
            .labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect();
        labels.extend(self.operator_labels.clone());
        labels
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub org: String,
    pub spec: ServiceSpec,
    /// Event that defined the current spec.
    pub event_id: u64,
    pub updated_at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRecord {
    pub allocation_id: String,
    pub org: String,
    pub service: String,
    pub node_id: String,
    pub replica: u32,
    /// Per-aggregate sequence of the allocation's latest event.
    pub seq: u64,
    pub spec: ServiceSpec,
    /// Log event that first placed it (a spec update in place keeps it).
    #[serde(default)]
    pub placed_event_id: u64,
    /// Log event that gave it its current spec (0 in older snapshots: then `placed_event_id`).
    #[serde(default)]
    pub spec_event_id: u64,
}

impl AllocationRecord {
    /// The log event that gave the allocation its current spec: a node reporting on it from a
    /// plan at or past this event reports on this spec.
    pub fn spec_since_event_id(&self) -> u64 {
        self.spec_event_id.max(self.placed_event_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenRecord {
    pub token_id: String,
    pub org: String,
    pub expires_at_unix: u64,
    pub used_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub profile: EnvironmentProfile,
    pub generation: String,
    pub event_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeBootstrap {
    pub applied: BTreeMap<String, String>,
    /// Latest error per component, cleared when the component next succeeds.
    pub errors: BTreeMap<String, String>,
}

impl NodeBootstrap {
    /// Folds one bootstrap report in: the latest generation applied and the latest error per
    /// component, at most [`BOOTSTRAP_ERRORS_MAX`] components of each, so a node's record stays
    /// bounded however long it reports.
    pub fn apply(&mut self, report: outpost_proto::bootstrap::BootstrapEvent) {
        match report.status {
            BootstrapStepStatus::Start => {}
            BootstrapStepStatus::Ok => {
                self.errors.remove(&report.component);
                if let Some(generation) = report.generation
                    && (self.applied.len() < BOOTSTRAP_ERRORS_MAX
                        || self.applied.contains_key(&report.component))
                {
                    self.applied.insert(report.component, generation);
                }
            }
            BootstrapStepStatus::Error => {
                let message = format!(
                    "{} {}: {}",
                    report.component,
                    report.action,
                    report.message.unwrap_or_default()
                );
                if self.errors.len() < BOOTSTRAP_ERRORS_MAX
                    || self.errors.contains_key(&report.component)
                {
                    self.errors.insert(report.component, message);
                }
            }
        }
    }

    pub fn status(&self) -> BootstrapStatus {
        BootstrapStatus {
            applied: self.applied.clone(),
            errors: self.errors.values().cloned().collect(),
        }
    }
}

/// The key of an object whose name is unique within its org (services, releases): `ORG/NAME`.
/// Names never hold `/` (`outpost_proto::name`), so the key is unambiguous.
pub fn org_scoped_key(org: &str, name: &str) -> String {
    format!("{org}/{name}")
}

/// Every read view, at `checkpoint`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Views {
    pub snapshot_version: u32,
    pub checkpoint: u64,
    pub cluster_id: String,
    pub orgs: BTreeSet<String>,
    // The maps that grow with the fleet are persistent (`imbl`): cloning the views for a
    // snapshot save is O(1), and changing them while the save holds that clone copies only the
    // paths changed, not every record.
    pub nodes: imbl::OrdMap<String, NodeRecord>,
    /// By [`org_scoped_key`]: a name is unique within its org only (P4).
    pub services: imbl::OrdMap<String, ServiceRecord>,
    pub allocations: imbl::OrdMap<String, AllocationRecord>,
    pub enrollment_tokens: BTreeMap<String, EnrollmentTokenRecord>,
    pub profile: Option<ProfileRecord>,
    pub bootstrap: imbl::OrdMap<String, NodeBootstrap>,
    /// The WireGuard mesh: one member per node with a key (P9). Absent in older snapshots.
    #[serde(default)]
    pub overlay: crate::overlay::Members,
    /// Routes and edges (E2). Absent in older snapshots.
    #[serde(default)]
    pub routes: crate::route::RouteViews,
    /// Secrets (P11): current versions, node sealing keys, deliveries. Absent in older snapshots.
    #[serde(default)]
    pub secrets: crate::secret::views::SecretViews,
    /// Operator tokens (ids, orgs, scopes, expiry, revocation; never secrets).
    #[serde(default)]
    pub tokens: crate::api::tokens::TokenViews,
    /// Artifacts by sha256 (R1). Absent in older snapshots.
    #[serde(default)]
    pub artifacts: crate::artifact::ArtifactIndex,
    /// Release numbers and the artifacts each service's releases reference (R2).
    #[serde(default)]
    pub releases: crate::release::ReleaseIndex,
    /// Each service's latest rollout (R3). Absent in older snapshots.
    #[serde(default)]
    pub rollouts: crate::rollout::RolloutIndex,
    /// Each org's latest agent upgrade (U2). Absent in older snapshots.
    #[serde(default)]
    pub agent_upgrades: crate::rollout::agents::AgentUpgradeIndex,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Decode(#[from] EventDecodeError),
    #[error("event {event_id} arrived after checkpoint {checkpoint} out of order")]
    OutOfOrder { event_id: u64, checkpoint: u64 },
}

/// What an applied batch touched, so followers know whether to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    pub scheduling: bool,
}

impl Views {
    pub fn new() -> Self {
        Self {
            snapshot_version: VIEWS_SNAPSHOT_VERSION,
            ..Self::default()
        }
    }

    /// Applies one stored event. Events at or below the checkpoint are skipped.
    pub fn apply(&mut self, stored: &StoredEvent) -> Result<Touched, ProjectionError> {
        if stored.event_id <= self.checkpoint {
            return Ok(Touched::default());
        }
        let event = Event::from_stored(stored)?;
        self.apply_decoded(stored, event)
    }

    /// Applies one stored event already decoded from `stored` (the projector decodes a batch
    /// before it takes the views' write lock). Events at or below the checkpoint are skipped.
    pub fn apply_decoded(
        &mut self,
        stored: &StoredEvent,
        event: Event,
    ) -> Result<Touched, ProjectionError> {
        if stored.event_id <= self.checkpoint {
            return Ok(Touched::default());
        }
        let mut touched = Touched::default();
        match event {
            Event::ClusterInitialized { cluster_id, .. } => self.cluster_id = cluster_id,
            route @ (Event::RouteDefined { .. }
            | Event::RouteDeleted { .. }
            | Event::EdgeRegistered { .. }) => self.routes.apply(&route, stored),
            Event::OrgCreated { org } => {
                self.orgs.insert(org);
            }
            Event::LogEpochRotated { .. } => {}
            token @ (Event::OperatorTokenIssued { .. } | Event::OperatorTokenRevoked { .. }) => {
                self.tokens.apply(&token, stored.at_unix_ms)
            }
            overlay @ (Event::OverlayJoined { .. }
            | Event::OverlayMemberChanged { .. }
            | Event::OverlayLeft { .. }) => {
                crate::overlay::apply_event(&mut self.overlay, &overlay)
            }
            secret @ (Event::SecretVersionSet { .. }
            | Event::SecretDeleted { .. }
            | Event::NodeSealingKeySet { .. }
            | Event::SecretDelivered { .. }
            | Event::SecretWithdrawn { .. }) => {
                // New versions, deletions and node keys wake the delivery pass (it runs after
                // each scheduler pass).
                touched.scheduling |= self.secrets.apply(&secret, stored);
            }
            Event::MasterKeyRotated { .. } | Event::RecordsSealedAtRest { .. } => {}
            Event::EnrollmentTokenIssued {
                token_id,
                org,
                expires_at_unix,
            } => {
                // Bounded: tokens expired at this event's time leave the view (the config
                // table keeps their hashes, so a late use still gets a clear refusal). Swept
                // every 1024th event id, so the cost per event stays small and replay agrees.
                if stored.event_id.is_multiple_of(1024) {
                    let now_unix = stored.at_unix_ms / 1000;
                    self.enrollment_tokens
                        .retain(|_, token| token.expires_at_unix >= now_unix);
                }
                self.enrollment_tokens.insert(
                    token_id.clone(),
                    EnrollmentTokenRecord {
                        token_id,
                        org,
                        expires_at_unix,
                        used_by: None,
                    },
                );
            }
            Event::EnrollmentTokenUsed { token_id, .. } => {
                // Bounded: a used token is done; the config table records who used it.
                self.enrollment_tokens.remove(&token_id);
            }
            Event::NodeRegistered {
                node_id,
                org,
                facts,
                ..
            } => {
                touched.scheduling = true;
                let registered_at_unix_ms = self
                    .nodes
                    .get(&node_id)
                    .map_or(stored.at_unix_ms, |n| n.registered_at_unix_ms);
                let role = self.nodes.get(&node_id).map_or(Role::Worker, |n| n.role);
                let (operator_labels, scheduling) = self
                    .nodes
                    .get(&node_id)
                    .map(|n| (n.operator_labels.clone(), n.scheduling))
                    .unwrap_or_default();
                self.nodes.insert(
                    node_id.clone(),
                    NodeRecord {
                        node_id,
                        org,
                        facts,
                        state: NodeState::Ready,
                        role,
                        registered_at_unix_ms,
                        updated_event_id: stored.event_id,
                        operator_labels,
                        scheduling,
                        down_since_unix_ms: None,
                    },
                );
            }
            Event::NodeMarkedDown { node_id, .. } => {
                touched.scheduling =
                    self.set_node_state(&node_id, NodeState::Down, stored.event_id);
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    node.down_since_unix_ms = Some(stored.at_unix_ms);
                }
            }
            Event::NodeLabeled {
                node_id,
                set,
                remove,
            } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    touched.scheduling = true;
                    for key in remove {
                        node.operator_labels.remove(&key);
                    }
                    node.operator_labels.extend(set);
                    node.updated_event_id = stored.event_id;
                }
            }
            Event::NodeSchedulingChanged {
                node_id,
                scheduling,
            } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    touched.scheduling = true;
                    node.scheduling = scheduling;
                    node.updated_event_id = stored.event_id;
                }
            }
            Event::NodeMarkedReady { node_id } => {
                touched.scheduling =
                    self.set_node_state(&node_id, NodeState::Ready, stored.event_id);
            }
            Event::NodeRevoked { node_id } => {
                touched.scheduling =
                    self.set_node_state(&node_id, NodeState::Revoked, stored.event_id);
            }
            Event::NodeRoleChanged { node_id, role } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    node.role = role;
                    node.updated_event_id = stored.event_id;
                }
            }
            Event::ServiceDefined { org, spec } => {
                touched.scheduling = true;
                let key = org_scoped_key(&org, &spec.name);
                let previous = self.services.get(&key).map(|s| &s.spec);
                let previous_release = self.releases.latest(&org, &spec.name);
                self.rollouts.record_defined(
                    &key,
                    &org,
                    previous.map(|p| (p, previous_release)),
                    &spec,
                    previous_release + u64::from(crate::release::is_new_release(previous, &spec)),
                    stored.at_unix_ms,
                );
                self.releases.record_defined(&org, previous, &spec);
                self.services.insert(
                    key,
                    ServiceRecord {
                        org,
                        spec,
                        event_id: stored.event_id,
                        updated_at_unix_ms: stored.at_unix_ms,
                    },
                );
            }
            Event::ServiceDeleted { org, name } => {
                touched.scheduling = true;
                self.releases.record_deleted(&org, &name);
                self.rollouts.record_deleted(&org_scoped_key(&org, &name));
                self.services.remove(&org_scoped_key(&org, &name));
            }
            Event::AllocationPlaced {
                allocation_id,
                org,
                service,
                node_id,
                replica,
                spec,
            } => {
                touched.scheduling = true;
                let placed_event_id = self
                    .allocations
                    .get(&allocation_id)
                    .map_or(stored.event_id, |a| a.placed_event_id);
                self.allocations.insert(
                    allocation_id.clone(),
                    AllocationRecord {
                        allocation_id,
                        org,
                        service,
                        node_id,
                        replica,
                        seq: stored.seq,
                        spec,
                        placed_event_id,
                        spec_event_id: stored.event_id,
                    },
                );
            }
            Event::AllocationRemoved { allocation_id, .. } => {
                touched.scheduling = true;
                self.allocations.remove(&allocation_id);
            }
            Event::RolloutBatchStarted {
                org,
                service,
                release,
                batch,
                allocations,
            } => {
                touched.scheduling = true;
                let key = org_scoped_key(&org, &service);
                if let Some(record) = self.rollouts.record_mut(&key, release) {
                    record.batches.push(crate::rollout::Batch {
                        number: batch,
                        members: allocations,
                        started_unix_ms: stored.at_unix_ms,
                    });
                    record.updated_unix_ms = stored.at_unix_ms;
                }
            }
            Event::RolloutCompleted {
                org,
                service,
                release,
            } => {
                let key = org_scoped_key(&org, &service);
                if let Some(record) = self.rollouts.record_mut(&key, release) {
                    record.state = crate::rollout::RolloutState::Completed;
                    record.updated_unix_ms = stored.at_unix_ms;
                }
            }
            Event::RolloutHalted {
                org,
                service,
                release,
                reason,
                ..
            } => {
                touched.scheduling = true;
                let key = org_scoped_key(&org, &service);
                if let Some(record) = self.rollouts.record_mut(&key, release) {
                    record.state = crate::rollout::RolloutState::Halted;
                    record.halt_reason = Some(reason);
                    record.updated_unix_ms = stored.at_unix_ms;
                }
            }
            Event::RolloutRolledBack {
                org,
                service,
                release,
                spec,
                ..
            } => {
                touched.scheduling = true;
                let key = org_scoped_key(&org, &service);
                let previous = self.services.get(&key).map(|s| &s.spec);
                self.releases.record_defined(&org, previous, &spec);
                let now_release = self.releases.latest(&org, &service);
                if let Some(record) = self.rollouts.record_mut(&key, release) {
                    record.state = crate::rollout::RolloutState::RolledBack;
                    record.rolled_back_as_release = Some(now_release);
                    record.updated_unix_ms = stored.at_unix_ms;
                }
                self.services.insert(
                    key,
                    ServiceRecord {
                        org,
                        spec,
                        event_id: stored.event_id,
                        updated_at_unix_ms: stored.at_unix_ms,
                    },
                );
            }
            artifact @ (Event::ArtifactStored { .. } | Event::ArtifactRemoved { .. }) => {
                self.artifacts.apply(&artifact, stored.at_unix_ms)
            }
            upgrade @ (Event::AgentUpgradeStarted { .. }
            | Event::AgentUpgradeBatchStarted { .. }
            | Event::AgentUpgradeCompleted { .. }
            | Event::AgentUpgradeHalted { .. }) => {
                self.agent_upgrades.apply(&upgrade, stored.at_unix_ms)
            }
            Event::ProfileSet {
                profile,
                generation,
            } => {
                self.profile = Some(ProfileRecord {
                    profile,
                    generation,
                    event_id: stored.event_id,
                });
            }
            Event::BootstrapReported { report } => {
                self.bootstrap
                    .entry(report.node_id.to_string())
                    .or_default()
                    .apply(report);
            }
        }
        self.checkpoint = stored.event_id;
        Ok(touched)
    }

    fn set_node_state(&mut self, node_id: &str, state: NodeState, event_id: u64) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.state = state;
                node.updated_event_id = event_id;
                if state != NodeState::Down {
                    node.down_since_unix_ms = None;
                }
                true
            }
            None => false,
        }
    }

    /// Allocations of one node, sorted by id.
    pub fn node_allocations(&self, node_id: &str) -> Vec<&AllocationRecord> {
        self.allocations
            .values()
            .filter(|a| a.node_id == node_id)
            .collect()
    }

    pub fn bootstrap_status(&self, node_id: &str) -> BootstrapStatus {
        self.bootstrap
            .get(node_id)
            .map(NodeBootstrap::status)
            .unwrap_or_default()
    }

    /// The scheduler's input as of this checkpoint, at time 0 with nothing known running; the
    /// scheduler's caller sets `now_unix_ms` and `running`.
    pub fn scheduler_input(&self, cpu_overcommit_ratio: f64, id_nonce: u64) -> SchedulerInput {
        SchedulerInput {
            nodes: self
                .nodes
                .values()
                .map(|n| SchedulerNode {
                    node_id: n.node_id.clone(),
                    org: n.org.clone(),
                    capacity: n.facts.capacity,
                    availability: match n.state {
                        NodeState::Ready => NodeAvailability::Ready,
                        NodeState::Down => NodeAvailability::Down {
                            since_unix_ms: n.down_since_unix_ms.unwrap_or(0),
                        },
                        NodeState::Revoked => NodeAvailability::Revoked,
                    },
                    arch: n.facts.arch.clone(),
                    labels: n.labels(),
                    scheduling: n.scheduling,
                })
                .collect(),
            services: self
                .services
                .values()
                .map(|s| SchedulerService {
                    org: s.org.clone(),
                    spec: s.spec.clone(),
                    rollout_gate: self.rollouts.gate(&org_scoped_key(&s.org, &s.spec.name)),
                })
                .collect(),
            allocations: self
                .allocations
                .values()
                .map(|a| SchedulerAllocation {
                    allocation_id: a.allocation_id.clone(),
                    org: a.org.clone(),
                    service: a.service.clone(),
                    node_id: a.node_id.clone(),
                    replica: a.replica,
                    spec: a.spec.clone(),
                    placed_event_id: a.placed_event_id,
                })
                .collect(),
            cpu_overcommit_ratio,
            id_nonce,
            now_unix_ms: 0,
            running: BTreeSet::new(),
        }
    }

    /// A node's plan as of this checkpoint; `None` for an unknown node. Allocations whose
    /// stored names do not fit a name are left out (they cannot be written by this control).
    // The struct update keeps plan parts this control does not declare (e.g. a newer proto's
    // overlay) at their defaults; with today's fields it has nothing left to fill.
    #[allow(clippy::needless_update)]
    pub fn plan(&self, node_id: &str, log_epoch: u64, settings: &NodeSettings) -> Option<Plan> {
        let node = self.nodes.get(node_id)?;
        let allocations = self
            .node_allocations(node_id)
            .into_iter()
            .filter_map(|record| {
                Some(Allocation {
                    id: Name::try_from(record.allocation_id.as_str()).ok()?,
                    node_id: Name::try_from(record.node_id.as_str()).ok()?,
                    service: Name::try_from(record.service.as_str()).ok()?,
                    seq: record.seq,
                    spec: record.spec.clone(),
                })
            })
            .take(PLAN_ALLOCATIONS_MAX)
            .collect();
        let node_name = Name::try_from(node_id).ok()?;
        // Parts of a plan this control does not declare keep their empty-plan defaults.
        Some(Plan {
            node_id: node_name.clone(),
            role: node.role,
            as_of: Cursor::new(log_epoch, self.checkpoint),
            control_url: settings.control_url.clone(),
            gateway_url: settings.gateway_url.clone(),
            ttl_secs: settings.ttl_secs,
            epoch: settings.epoch,
            allocations,
            overlay: self.overlay.get(node_id).map(|member| {
                member.own_spec(crate::overlay::peers_of(
                    &self.overlay,
                    node_id,
                    &member.org,
                ))
            }),
            secrets: self.secrets.node_secrets(node_id),
            ..Plan::empty(node_name)
        })
    }

    /// The service `name` of `org`; another org's service of that name is not there.
    pub fn service(&self, org: &str, name: &str) -> Option<&ServiceRecord> {
        self.services.get(&org_scoped_key(org, name))
    }

    /// The services of `org`, by name.
    pub fn services_of<'a>(&'a self, org: &'a str) -> impl Iterator<Item = &'a ServiceRecord> + 'a {
        self.services.values().filter(move |s| s.org == org)
    }

    pub fn to_snapshot(&self) -> Vec<u8> {
        self.to_snapshot_sized(0)
    }

    /// [`Views::to_snapshot`] into a buffer of `capacity` bytes to start with (the last
    /// snapshot's size), so a big snapshot is not built by doubling and copying its buffer.
    pub fn to_snapshot_sized(&self, capacity: usize) -> Vec<u8> {
        let mut buffer = Vec::with_capacity(capacity);
        match serde_json::to_writer(&mut buffer, self) {
            Ok(()) => buffer,
            Err(_) => Vec::new(),
        }
    }

    /// Reads a snapshot; `None` when it is unreadable or of another layout (then replay).
    pub fn from_snapshot(bytes: &[u8]) -> Option<Views> {
        let views: Views = serde_json::from_slice(bytes).ok()?;
        (views.snapshot_version == VIEWS_SNAPSHOT_VERSION).then_some(views)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Event, stored_for_test as stored};
    use proptest::prelude::*;

    fn placed(slot: u16, node: u16) -> Event {
        Event::AllocationPlaced {
            allocation_id: format!("web-{slot}"),
            org: "default".into(),
            service: "web".into(),
            node_id: format!("n{node}"),
            replica: u32::from(slot),
            spec: serde_json::from_str(r#"{"name":"web","command":"/bin/true"}"#).unwrap(),
        }
    }

    fn removed(slot: u16, node: u16) -> Event {
        Event::AllocationRemoved {
            allocation_id: format!("web-{slot}"),
            service: "web".into(),
            node_id: format!("n{node}"),
            reason: "test".into(),
        }
    }

    proptest! {
        /// What a snapshot save holds (a clone of the views, sharing the persistent maps) stays
        /// exactly as it was while the projector goes on applying, and its snapshot reads back
        /// equal; the live views end where a fresh replay of the whole log ends.
        #[test]
        fn a_held_clone_is_untouched_by_later_events(
            ops in proptest::collection::vec((any::<bool>(), 0u16..50, 0u16..8), 1..120),
            held_at in 0usize..120,
        ) {
            let events: Vec<StoredEvent> = ops
                .iter()
                .enumerate()
                .map(|(i, (place, slot, node))| {
                    let event = if *place { placed(*slot, *node) } else { removed(*slot, *node) };
                    stored(&event, i as u64 + 1)
                })
                .collect();
            let cut = held_at.min(events.len());
            let mut live = Views::new();
            for event in &events[..cut] {
                live.apply(event).unwrap();
            }
            let held = live.clone();
            let held_snapshot = held.to_snapshot();
            for event in &events[cut..] {
                live.apply(event).unwrap();
            }
            // The held clone did not move, and reads back from its own snapshot.
            prop_assert_eq!(held.to_snapshot(), held_snapshot.clone());
            prop_assert_eq!(Views::from_snapshot(&held_snapshot), Some(held.clone()));
            let mut replayed = Views::new();
            for event in &events {
                replayed.apply(event).unwrap();
            }
            prop_assert_eq!(&live, &replayed);
            prop_assert_eq!(live.to_snapshot_sized(7), replayed.to_snapshot());
        }
    }
}
