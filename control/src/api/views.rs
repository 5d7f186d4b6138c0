//! JSON shapes of the API's answers (and of the volatile records behind them). `outpostctl`
//! reuses these types to read answers.

use std::collections::BTreeMap;

use outpost_proto::Cursor;
use outpost_proto::node::{AllocationState, Capacity};
use outpost_proto::service::ServiceSpec;
use serde::{Deserialize, Serialize};

/// `GET /v1/nodes` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: String,
    pub org: String,
    pub hostname: String,
    pub arch: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `ready`, `down` or `revoked`.
    pub state: String,
    pub role: String,
    pub registered_at_unix_ms: u64,
    #[serde(default)]
    pub last_heartbeat_unix_ms: Option<u64>,
    pub allocations: usize,
    /// The node's overlay address with the overlay prefix, once it is in the mesh (P9).
    #[serde(default)]
    pub overlay_address: Option<String>,
    /// `schedulable`, `cordoned` or `draining` (F2).
    #[serde(default)]
    pub scheduling: String,
    /// When the node was marked down (F1); its instances stay until their service's
    /// `reschedule_after_secs` has passed since.
    #[serde(default)]
    pub down_since_unix_ms: Option<u64>,
    /// The agent version the node last reported (U2).
    #[serde(default)]
    pub agent_version: Option<String>,
}

/// `GET /v1/services` entry and the `service` of a create/update answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub org: String,
    pub spec: ServiceSpec,
    /// Event that defined the current spec.
    pub event_id: u64,
    pub updated_at_unix_ms: u64,
    /// Replicas placed on nodes right now.
    pub placed: usize,
    /// The current release number (R2): every accepted change of the spec is the next one.
    #[serde(default)]
    pub release: u64,
}

/// `GET /v1/allocations` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    pub allocation_id: String,
    pub service: String,
    pub node_id: String,
    pub replica: u32,
    pub seq: u64,
    pub memory_bytes: u64,
    pub cpu_millis: u32,
    /// Latest state the node reported, if any.
    #[serde(default)]
    pub state: Option<AllocationState>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub reported_at_unix_ms: Option<u64>,
}

/// One log event as the admin feed and aggregate inspection show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEventView {
    pub event_id: u64,
    pub aggregate: String,
    pub seq: u64,
    pub schema_version: u32,
    pub kind: String,
    pub at_unix: u64,
    pub data: serde_json::Value,
}

/// `GET /v1/events` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<LogEventView>,
    pub bookmark: Cursor,
}

/// `POST /v1/services` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAnswer {
    pub service: ServiceView,
    pub event_id: u64,
}

/// Answer of writes that only name their event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventIdAnswer {
    pub event_id: u64,
}

/// `POST /v1/enrollment-tokens` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenAnswer {
    pub token: String,
    pub token_id: String,
    pub expires_at_unix: u64,
    pub ca_fingerprint: String,
}

/// `POST /v1/admin/tokens` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenAnswer {
    pub token: String,
    pub token_id: String,
    pub org: String,
    pub scopes: Vec<String>,
    #[serde(default)]
    pub expires_at_unix: Option<u64>,
}

/// `PUT /v1/bootstrap/profile` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileAnswer {
    pub event_id: u64,
    pub generation: String,
}

/// `POST /v1/bootstrap/events` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedAnswer {
    pub accepted: usize,
}

/// `POST /v1/admin/rotate-epoch` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochAnswer {
    pub log_epoch: u64,
}

/// `GET /v1/health` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    pub status: String,
    pub log_epoch: u64,
    pub head: u64,
    pub floor: u64,
    #[serde(default)]
    pub checkpoint: u64,
    #[serde(default)]
    pub cluster_id: String,
    /// Why the projections are stuck, when they are (status `degraded`).
    #[serde(default)]
    pub projection_error: Option<String>,
}

/// Volatile record of a node's last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    pub at_unix_ms: u64,
    #[serde(default)]
    pub plan_generation: Option<String>,
    #[serde(default)]
    pub cursor: Option<Cursor>,
    /// The node's LAN address as it reported it (backends of routes, E2).
    #[serde(default)]
    pub lan_address: Option<String>,
    /// The agent binary the node runs and its last upgrade, as it reported them (U2).
    #[serde(default)]
    pub agent: Option<outpost_proto::release::AgentBuild>,
}

/// Volatile record of an allocation's latest reported status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationStatusRecord {
    pub node_id: String,
    pub state: AllocationState,
    pub restarts: u32,
    pub message: String,
    pub at_unix_ms: u64,
    /// The ports the instance was given (E2).
    #[serde(default)]
    pub ports: Vec<outpost_proto::node::BoundPort>,
    /// The cursor of the plan the node ran when it reported: the report is about the spec the
    /// allocation had at that event (R3 counts only reports about the new spec).
    #[serde(default)]
    pub plan_cursor: Option<outpost_proto::Cursor>,
}

/// The contents of `DATA_DIR/admin/outpostctl.json`, read by `outpostctl` via `OUTPOST_CONFIG`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfigFile {
    pub control_url: String,
    pub ca_file: String,
    pub token: String,
}
