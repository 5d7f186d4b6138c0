//! The domain events of the log: their kinds, schema versions, aggregates and routing keys, and
//! their conversion to and from the store's records.
//!
//! Events are facts and never change once written. A new field is added with a serde default;
//! a change of meaning gets a new schema version, and a reader refuses a version it does not know.

use outpost_proto::bootstrap::BootstrapEvent;
use outpost_proto::node::{NodeFacts, Role};
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::service::ServiceSpec;
use serde::{Deserialize, Serialize};

use crate::overlay::OverlayMember;
use crate::store::{NewEvent, StoredEvent};
use outpost_proto::overlay::OverlayPeerSpec;

/// Schema version of every event kind this control writes.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// How a node proved itself when registering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisteredWith {
    EnrollmentToken,
    NodeCredential,
    /// Proven with the site join secret (`outpost_proto::site::JoinProof`).
    JoinSecret,
}

/// Every fact the log records. The serde tag is the event's kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data")]
pub enum Event {
    ClusterInitialized {
        cluster_id: String,
        ca_fingerprint: String,
    },
    OrgCreated {
        org: String,
    },
    OperatorTokenIssued {
        token_id: String,
        org: String,
        scopes: Vec<String>,
        /// Absent in tokens issued before expiry existed (they never expire).
        #[serde(default)]
        expires_at_unix: Option<u64>,
    },
    /// An operator token was revoked (refused from the next request on).
    OperatorTokenRevoked {
        token_id: String,
        org: String,
        actor: String,
    },
    EnrollmentTokenIssued {
        token_id: String,
        org: String,
        expires_at_unix: u64,
    },
    EnrollmentTokenUsed {
        token_id: String,
        node_id: String,
    },
    NodeRegistered {
        node_id: String,
        org: String,
        facts: NodeFacts,
        with: RegisteredWith,
    },
    NodeMarkedDown {
        node_id: String,
        last_heartbeat_unix_ms: u64,
    },
    NodeMarkedReady {
        node_id: String,
    },
    NodeRevoked {
        node_id: String,
    },
    NodeRoleChanged {
        node_id: String,
        role: Role,
    },
    ServiceDefined {
        org: String,
        spec: ServiceSpec,
    },
    ServiceDeleted {
        org: String,
        name: String,
    },
    AllocationPlaced {
        allocation_id: String,
        org: String,
        service: String,
        node_id: String,
        replica: u32,
        spec: ServiceSpec,
    },
    AllocationRemoved {
        allocation_id: String,
        service: String,
        node_id: String,
        reason: String,
    },
    ProfileSet {
        profile: EnvironmentProfile,
        generation: String,
    },
    BootstrapReported {
        report: BootstrapEvent,
    },
    LogEpochRotated {
        log_epoch: u64,
    },
    /// A node entered its org's WireGuard mesh with a new overlay address (P9, P11: the IP
    /// allocation's audit record). `peers` is what the node gets; `notify` are the members that
    /// get it as a new peer.
    OverlayJoined {
        member: OverlayMember,
        peers: Vec<OverlayPeerSpec>,
        notify: Vec<String>,
    },
    /// A member's key (rotation), endpoints or port changed; `notify` update their peer.
    OverlayMemberChanged {
        member: OverlayMember,
        notify: Vec<String>,
    },
    /// A member left the mesh (revoked); its address is free again and `notify` drop it.
    OverlayLeft {
        node_id: String,
        org: String,
        address: String,
        notify: Vec<String>,
    },
    /// A route was defined or changed (E2); audited like every command.
    RouteDefined {
        org: String,
        spec: outpost_proto::route::RouteSpec,
        /// Who defined it (`opa.TOKEN_ID`); empty in events written before routes named one.
        #[serde(default)]
        actor: String,
    },
    RouteDeleted {
        org: String,
        name: String,
        #[serde(default)]
        actor: String,
    },
    /// An edge router enrolled (token) or registered again (credential).
    EdgeRegistered {
        edge_id: String,
        org: String,
        with: RegisteredWith,
        /// The edge's X25519 sealing key (hex): TLS secrets reach the edge sealed for it.
        #[serde(default)]
        sealing_public_key: Option<String>,
    },
    /// A secret's next version (P11): its key names and its values sealed under the version's
    /// own data key. The data key, wrapped by the master key, is kept outside the log.
    SecretVersionSet {
        org: String,
        name: String,
        version: u32,
        keys: Vec<String>,
        sealed: crate::secret::at_rest::SealedVersion,
        actor: String,
    },
    /// A secret and all its versions are gone (their data keys destroyed).
    SecretDeleted {
        org: String,
        name: String,
        actor: String,
    },
    /// A node's X25519 public key (hex), made on the node, that secrets are sealed to.
    NodeSealingKeySet {
        node_id: String,
        public_key: String,
    },
    /// A secret version sealed for a node because `allocations` there reference it.
    SecretDelivered {
        node_id: String,
        org: String,
        name: String,
        version: u32,
        public_key: String,
        sealed: outpost_proto::secret::SealedForNode,
        allocations: Vec<String>,
    },
    /// No allocation on the node references the secret any more; the node drops it.
    SecretWithdrawn {
        node_id: String,
        org: String,
        name: String,
        reason: String,
    },
    /// The master key was rotated: every data key is now wrapped by `to_key_id`.
    MasterKeyRotated {
        from_key_id: String,
        to_key_id: String,
        data_keys: usize,
        /// Credential records (and the CA key) re-sealed; absent before they were sealed.
        #[serde(default)]
        sealed_records: usize,
    },
    /// Credential records and the CA key an older store kept in plaintext were sealed under
    /// the master key `master_key_id` at start.
    RecordsSealedAtRest {
        records: usize,
        master_key_id: String,
    },
    /// The operator set (`set`) and removed (`remove`) labels of a node (F2).
    NodeLabeled {
        node_id: String,
        set: std::collections::BTreeMap<String, String>,
        remove: Vec<String>,
    },
    /// The operator cordoned, drained or uncordoned a node (F2).
    NodeSchedulingChanged {
        node_id: String,
        scheduling: crate::scheduler::NodeScheduling,
    },
    /// An org pushed an artifact (R1); its bytes are in the blob store under `sha256`.
    ArtifactStored {
        org: String,
        sha256: String,
        size_bytes: u64,
        name: String,
    },
    ArtifactRemoved {
        org: String,
        sha256: String,
    },
    /// A rollout (R3) admitted its next batch of instances to release `release`.
    RolloutBatchStarted {
        org: String,
        service: String,
        release: u64,
        batch: u32,
        allocations: Vec<String>,
    },
    /// Every instance of the service runs release `release`.
    RolloutCompleted {
        org: String,
        service: String,
        release: u64,
    },
    /// Batch `batch` of release `release` failed; no further batch starts.
    RolloutHalted {
        org: String,
        service: String,
        release: u64,
        batch: u32,
        reason: String,
    },
    /// After a halt with `auto_rollback`: the service's spec is release `restores_release`'s
    /// again, as a new release, and every instance takes it at once.
    RolloutRolledBack {
        org: String,
        service: String,
        release: u64,
        restores_release: u64,
        spec: ServiceSpec,
    },
    /// An agent upgrade (U2) of `org`'s nodes `nodes` to the signed agent binary `artifact`.
    AgentUpgradeStarted {
        org: String,
        number: u64,
        artifact: String,
        signature: String,
        nodes: Vec<String>,
        max_parallel: u32,
        health_deadline_secs: u32,
    },
    /// The agent upgrade admitted its next batch of nodes.
    AgentUpgradeBatchStarted {
        org: String,
        number: u64,
        batch: u32,
        nodes: Vec<String>,
    },
    /// Every selected node runs the new agent binary.
    AgentUpgradeCompleted {
        org: String,
        number: u64,
    },
    /// Batch `batch` failed (a node refused or rolled back, or missed the deadline).
    AgentUpgradeHalted {
        org: String,
        number: u64,
        batch: u32,
        reason: String,
    },
}

impl Event {
    /// The event's kind, as stored.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ClusterInitialized { .. } => "ClusterInitialized",
            Event::OrgCreated { .. } => "OrgCreated",
            Event::OperatorTokenIssued { .. } => "OperatorTokenIssued",
            Event::OperatorTokenRevoked { .. } => "OperatorTokenRevoked",
            Event::EnrollmentTokenIssued { .. } => "EnrollmentTokenIssued",
            Event::EnrollmentTokenUsed { .. } => "EnrollmentTokenUsed",
            Event::NodeRegistered { .. } => "NodeRegistered",
            Event::NodeMarkedDown { .. } => "NodeMarkedDown",
            Event::NodeMarkedReady { .. } => "NodeMarkedReady",
            Event::NodeRevoked { .. } => "NodeRevoked",
            Event::NodeRoleChanged { .. } => "NodeRoleChanged",
            Event::ServiceDefined { .. } => "ServiceDefined",
            Event::ServiceDeleted { .. } => "ServiceDeleted",
            Event::AllocationPlaced { .. } => "AllocationPlaced",
            Event::AllocationRemoved { .. } => "AllocationRemoved",
            Event::ProfileSet { .. } => "ProfileSet",
            Event::BootstrapReported { .. } => "BootstrapReported",
            Event::LogEpochRotated { .. } => "LogEpochRotated",
            Event::OverlayJoined { .. } => "OverlayJoined",
            Event::OverlayMemberChanged { .. } => "OverlayMemberChanged",
            Event::OverlayLeft { .. } => "OverlayLeft",
            Event::RouteDefined { .. } => "RouteDefined",
            Event::RouteDeleted { .. } => "RouteDeleted",
            Event::EdgeRegistered { .. } => "EdgeRegistered",
            Event::SecretVersionSet { .. } => "SecretVersionSet",
            Event::SecretDeleted { .. } => "SecretDeleted",
            Event::NodeSealingKeySet { .. } => "NodeSealingKeySet",
            Event::SecretDelivered { .. } => "SecretDelivered",
            Event::SecretWithdrawn { .. } => "SecretWithdrawn",
            Event::MasterKeyRotated { .. } => "MasterKeyRotated",
            Event::RecordsSealedAtRest { .. } => "RecordsSealedAtRest",
            Event::NodeLabeled { .. } => "NodeLabeled",
            Event::NodeSchedulingChanged { .. } => "NodeSchedulingChanged",
            Event::ArtifactStored { .. } => "ArtifactStored",
            Event::ArtifactRemoved { .. } => "ArtifactRemoved",
            Event::RolloutBatchStarted { .. } => "RolloutBatchStarted",
            Event::RolloutCompleted { .. } => "RolloutCompleted",
            Event::RolloutHalted { .. } => "RolloutHalted",
            Event::RolloutRolledBack { .. } => "RolloutRolledBack",
            Event::AgentUpgradeStarted { .. } => "AgentUpgradeStarted",
            Event::AgentUpgradeBatchStarted { .. } => "AgentUpgradeBatchStarted",
            Event::AgentUpgradeCompleted { .. } => "AgentUpgradeCompleted",
            Event::AgentUpgradeHalted { .. } => "AgentUpgradeHalted",
        }
    }

    /// The aggregate the event belongs to; its per-aggregate sequence orders its history.
    pub fn aggregate(&self) -> String {
        match self {
            Event::ClusterInitialized { .. } | Event::LogEpochRotated { .. } => {
                "cluster".to_string()
            }
            Event::OrgCreated { org } => format!("org/{org}"),
            Event::OperatorTokenIssued { token_id, .. }
            | Event::OperatorTokenRevoked { token_id, .. } => format!("operator-token/{token_id}"),
            Event::EnrollmentTokenIssued { token_id, .. }
            | Event::EnrollmentTokenUsed { token_id, .. } => {
                format!("enrollment-token/{token_id}")
            }
            Event::NodeRegistered { node_id, .. }
            | Event::NodeMarkedDown { node_id, .. }
            | Event::NodeMarkedReady { node_id }
            | Event::NodeRevoked { node_id }
            | Event::NodeRoleChanged { node_id, .. } => format!("node/{node_id}"),
            Event::ServiceDefined { org, spec } => org_scoped_aggregate("service", org, &spec.name),
            Event::ServiceDeleted { org, name } => org_scoped_aggregate("service", org, name),
            Event::RolloutBatchStarted { org, service, .. }
            | Event::RolloutCompleted { org, service, .. }
            | Event::RolloutHalted { org, service, .. }
            | Event::RolloutRolledBack { org, service, .. } => {
                org_scoped_aggregate("service", org, service)
            }
            Event::AllocationPlaced { allocation_id, .. }
            | Event::AllocationRemoved { allocation_id, .. } => {
                format!("allocation/{allocation_id}")
            }
            Event::ProfileSet { .. } => "profile".to_string(),
            Event::BootstrapReported { report } => format!("bootstrap/{}", report.node_id),
            Event::OverlayJoined { member, .. } | Event::OverlayMemberChanged { member, .. } => {
                format!("node/{}", member.node_id)
            }
            Event::RouteDefined { org, spec, .. } => org_scoped_aggregate("route", org, &spec.name),
            Event::RouteDeleted { org, name, .. } => org_scoped_aggregate("route", org, name),
            Event::EdgeRegistered { edge_id, .. } => format!("edge/{edge_id}"),
            Event::OverlayLeft { node_id, .. }
            | Event::NodeSealingKeySet { node_id, .. }
            | Event::NodeLabeled { node_id, .. }
            | Event::NodeSchedulingChanged { node_id, .. } => format!("node/{node_id}"),
            Event::SecretVersionSet { org, name, .. } | Event::SecretDeleted { org, name, .. } => {
                format!("secret/{org}/{name}")
            }
            Event::SecretDelivered { node_id, name, .. }
            | Event::SecretWithdrawn { node_id, name, .. } => {
                format!("node-secret/{node_id}/{name}")
            }
            Event::MasterKeyRotated { .. } | Event::RecordsSealedAtRest { .. } => {
                "cluster".to_string()
            }
            Event::ArtifactStored { sha256, .. } | Event::ArtifactRemoved { sha256, .. } => {
                crate::artifact::artifact_aggregate(sha256)
            }
            Event::AgentUpgradeStarted { org, .. }
            | Event::AgentUpgradeBatchStarted { org, .. }
            | Event::AgentUpgradeCompleted { org, .. }
            | Event::AgentUpgradeHalted { org, .. } => format!("agent-upgrade/{org}"),
        }
    }

    /// Routing keys computed at append time: who must see this event in a filtered feed.
    pub fn routing_keys(&self) -> Vec<String> {
        match self {
            Event::NodeRegistered { node_id, .. }
            | Event::NodeMarkedDown { node_id, .. }
            | Event::NodeMarkedReady { node_id }
            | Event::NodeRevoked { node_id }
            | Event::NodeRoleChanged { node_id, .. }
            | Event::AllocationPlaced { node_id, .. }
            | Event::AllocationRemoved { node_id, .. }
            | Event::SecretDelivered { node_id, .. }
            | Event::SecretWithdrawn { node_id, .. } => vec![node_routing_key(node_id)],
            Event::OverlayJoined { member, notify, .. }
            | Event::OverlayMemberChanged { member, notify } => std::iter::once(&member.node_id)
                .chain(notify)
                .map(|node_id| node_routing_key(node_id))
                .collect(),
            Event::OverlayLeft { notify, .. } => notify
                .iter()
                .map(|node_id| node_routing_key(node_id))
                .collect(),
            Event::RouteDefined { org, .. } | Event::RouteDeleted { org, .. } => {
                vec![crate::route::edge_routing_key(org)]
            }
            _ => Vec::new(),
        }
    }

    /// The record handed to the store.
    pub fn to_new_event(&self) -> NewEvent {
        // Serializing these plain data types to a JSON value cannot fail.
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut data = value
            .get("data")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        // Every event records who acted (P11): see `crate::audit`.
        crate::audit::stamp_data(self.kind(), &mut data);
        NewEvent {
            aggregate: self.aggregate(),
            kind: self.kind().to_string(),
            schema_version: EVENT_SCHEMA_VERSION,
            routing_keys: self.routing_keys(),
            data: serde_json::to_vec(&data).unwrap_or_default(),
        }
    }

    /// Reads an event back from the log.
    pub fn from_stored(stored: &StoredEvent) -> Result<Event, EventDecodeError> {
        if stored.schema_version > EVENT_SCHEMA_VERSION {
            return Err(EventDecodeError::NewerSchema {
                event_id: stored.event_id,
                kind: stored.kind.clone(),
                found: stored.schema_version,
            });
        }
        // The tagged form `{"kind": KIND, "data": DATA}` as bytes, with the tag first, so serde
        // decodes the data straight into the variant: no intermediate JSON value tree (which
        // cost an allocation per field and a map per object, for every event the projector
        // and every node's feed read).
        let malformed = |reason: String| EventDecodeError::Malformed {
            event_id: stored.event_id,
            kind: stored.kind.clone(),
            reason,
        };
        let kind = serde_json::to_string(&stored.kind).map_err(|e| malformed(e.to_string()))?;
        let mut tagged = Vec::with_capacity(stored.data.len() + kind.len() + 20);
        tagged.extend_from_slice(b"{\"kind\":");
        tagged.extend_from_slice(kind.as_bytes());
        tagged.extend_from_slice(b",\"data\":");
        tagged.extend_from_slice(&stored.data);
        tagged.push(b'}');
        serde_json::from_slice(&tagged).map_err(|source| malformed(source.to_string()))
    }
}

/// The aggregate of an object named within its org (a service, a route): `KIND/NAME` in the
/// `default` org, as before tenancy, so existing histories stay whole; `KIND/ORG/NAME` in any
/// other org, so two orgs' `web` have separate histories.
pub fn org_scoped_aggregate(kind: &str, org: &str, name: &str) -> String {
    if org == crate::init::DEFAULT_ORG {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{org}/{name}")
    }
}

/// Routing key of everything a node's feed must see.
pub fn node_routing_key(node_id: &str) -> String {
    format!("node:{node_id}")
}

/// An event as the store returns it (sequence 1, time 0), for tests of what reads the log.
#[cfg(test)]
pub(crate) fn stored_for_test(event: &Event, event_id: u64) -> StoredEvent {
    let new = event.to_new_event();
    StoredEvent {
        event_id,
        aggregate: new.aggregate,
        seq: 1,
        kind: new.kind,
        schema_version: new.schema_version,
        at_unix_ms: 0,
        routing_keys: new.routing_keys,
        data: new.data,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    #[error(
        "event {event_id} ({kind}) has schema version {found}, newer than {EVENT_SCHEMA_VERSION} which this control reads"
    )]
    NewerSchema {
        event_id: u64,
        kind: String,
        found: u32,
    },
    #[error("event {event_id} ({kind}) does not decode: {reason}")]
    Malformed {
        event_id: u64,
        kind: String,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::name::name;

    use super::stored_for_test as stored;

    #[test]
    fn events_round_trip_through_the_store_record() {
        let spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"web","command":"/bin/true"}"#).unwrap();
        let events = vec![
            Event::OrgCreated {
                org: "default".into(),
            },
            Event::ServiceDefined {
                org: "default".into(),
                spec: spec.clone(),
            },
            Event::AllocationPlaced {
                allocation_id: "web-0123abcd".into(),
                org: "default".into(),
                service: "web".into(),
                node_id: "n1".into(),
                replica: 0,
                spec,
            },
            Event::NodeMarkedDown {
                node_id: "n1".into(),
                last_heartbeat_unix_ms: 5,
            },
        ];
        for event in events {
            assert_eq!(Event::from_stored(&stored(&event, 1)).unwrap(), event);
        }
    }

    #[test]
    fn aggregates_and_routing_keys() {
        let placed = Event::AllocationRemoved {
            allocation_id: "web-1".into(),
            service: "web".into(),
            node_id: "n1".into(),
            reason: "scaled down".into(),
        };
        assert_eq!(placed.aggregate(), "allocation/web-1");
        assert_eq!(placed.routing_keys(), vec!["node:n1".to_string()]);
        let facts = NodeFacts {
            node_id: name("node_id", "n2").unwrap(),
            hostname: "h".into(),
            arch: "x86_64".into(),
            capacity: Default::default(),
            labels: Default::default(),
        };
        let registered = Event::NodeRegistered {
            node_id: "n2".into(),
            org: "default".into(),
            facts,
            with: RegisteredWith::NodeCredential,
        };
        assert_eq!(registered.aggregate(), "node/n2");
        assert!(
            Event::OrgCreated { org: "o".into() }
                .routing_keys()
                .is_empty()
        );
    }

    #[test]
    fn newer_schema_and_garbage_are_refused_with_the_event_id() {
        let mut record = stored(&Event::OrgCreated { org: "o".into() }, 7);
        record.schema_version = EVENT_SCHEMA_VERSION + 1;
        let error = Event::from_stored(&record).unwrap_err();
        assert!(error.to_string().contains("event 7"), "{error}");
        let mut record = stored(&Event::OrgCreated { org: "o".into() }, 8);
        record.data = b"{not json".to_vec();
        assert!(matches!(
            Event::from_stored(&record),
            Err(EventDecodeError::Malformed { event_id: 8, .. })
        ));
        // The data is spliced into the tagged form as bytes: data that would close it early
        // and add fields of its own is refused, never read as another event.
        for spliced in [
            r#"{"org":"o"},"kind":"org_created","data":{"org":"p"}"#,
            r#"{"org":"o"}},{"x":1"#,
            "",
        ] {
            record.data = spliced.as_bytes().to_vec();
            assert!(
                matches!(
                    Event::from_stored(&record),
                    Err(EventDecodeError::Malformed { event_id: 8, .. })
                ),
                "{spliced} was read"
            );
        }
    }
}
