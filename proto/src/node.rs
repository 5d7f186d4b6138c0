//! Node registration, heartbeat and allocation status reports (D3, D5, P9).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cursor::Cursor;
use crate::limits::{HEARTBEAT_ALLOCATIONS_MAX, LABELS_MAX, TTL_MAX_SECS, TTL_MIN_SECS};
use crate::name::{Name, check_name};
use crate::overlay::{check_endpoints, check_wireguard_key};
use crate::secret::{Redacted, redacted_option};
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// What a node does in the cluster (D3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    #[default]
    Worker,
    Proxy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Worker => "worker",
            Role::Proxy => "proxy",
        }
    }
}

/// What a node offers to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub memory_bytes: u64,
    pub cpu_millis: u32,
}

/// Facts a node reports about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub node_id: Name,
    pub hostname: String,
    pub arch: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<Name, String>,
}

/// `POST /v1/nodes/register`. A new node proves itself with an enrollment token; a known node
/// re-registers with its credential (after a 401/403/404, D6). Both are secrets: `Debug`
/// prints them as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    #[serde(default)]
    pub enrollment_token: Option<String>,
    #[serde(default)]
    pub node_credential: Option<String>,
    pub facts: NodeFacts,
    /// The node's WireGuard public key (base64), when it takes part in the overlay (P9). The
    /// private key never leaves the node.
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
    /// Where peers can reach the node's WireGuard port: `IP:PORT` candidates, best first.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The UDP port the node's WireGuard interface listens on (control's default when absent).
    #[serde(default)]
    pub wireguard_listen_port: Option<u16>,
    /// The node's X25519 public key (64 hex) that control seals its secrets to (P11). The
    /// private key never leaves the node.
    #[serde(default)]
    pub sealing_public_key: Option<String>,
    /// The agent binary the node runs (U2).
    #[serde(default)]
    pub agent: Option<crate::release::AgentBuild>,
}

/// Control's answer to a registration. `Debug` prints the credential as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: Name,
    /// Bearer credential for every later call of this node. Shown once.
    pub node_credential: String,
    pub role: Role,
    pub control_url: String,
    pub gateway_url: String,
    pub ttl_secs: u32,
    /// Leadership epoch of the control service that answered.
    pub epoch: u64,
    /// The release public key (base64 ed25519) agent binaries must be signed with; the node
    /// pins it at enrollment (U2). `None` when control was given none.
    #[serde(default)]
    pub release_public_key: Option<String>,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("enrollment_token", &redacted_option(&self.enrollment_token))
            .field("node_credential", &redacted_option(&self.node_credential))
            .field("facts", &self.facts)
            .field("wireguard_public_key", &self.wireguard_public_key)
            .field("endpoints", &self.endpoints)
            .field("wireguard_listen_port", &self.wireguard_listen_port)
            .field("sealing_public_key", &self.sealing_public_key)
            .field("agent", &self.agent)
            .finish()
    }
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("node_id", &self.node_id)
            .field("node_credential", &Redacted)
            .field("role", &self.role)
            .field("control_url", &self.control_url)
            .field("gateway_url", &self.gateway_url)
            .field("ttl_secs", &self.ttl_secs)
            .field("epoch", &self.epoch)
            .field("release_public_key", &self.release_public_key)
            .finish()
    }
}

/// `POST /v1/nodes/{id}/heartbeat`, every TTL/3.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Generation of the plan the node runs (sha256 hex), if any.
    #[serde(default)]
    pub plan_generation: Option<String>,
    #[serde(default)]
    pub cursor: Option<Cursor>,
    #[serde(default)]
    pub allocations: Vec<AllocationStatus>,
    /// The node's current WireGuard public key; a different one than control knows is a key
    /// rotation (P9).
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
    /// The node's current endpoint candidates; different ones update its peers (P9).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The address the node's instances are reached at on its LAN (an IP), when known.
    #[serde(default)]
    pub lan_address: Option<String>,
    /// The agent binary the node runs and how its last self-update went (U2).
    #[serde(default)]
    pub agent: Option<crate::release::AgentBuild>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub ttl_secs: u32,
    pub epoch: u64,
    pub role: Role,
    /// A signed agent binary to switch to, while an agent upgrade admits this node (U2).
    #[serde(default)]
    pub upgrade: Option<crate::release::AgentUpgrade>,
}

/// How one allocation is doing on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationStatus {
    pub allocation_id: Name,
    pub state: AllocationState,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub message: String,
    /// The ports the instance was given, by name (E2).
    #[serde(default)]
    pub ports: Vec<BoundPort>,
}

/// A named port an instance was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundPort {
    pub name: Name,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationState {
    /// In the plan, waiting for an earlier wave.
    Pending,
    /// Running, readiness not yet passed.
    Starting,
    /// Running and ready (or has no readiness check).
    Running,
    /// Readiness did not pass within its timeout.
    Unready,
    /// Exited and waiting for a restart with backoff.
    Backoff,
    /// Exited and will not be restarted (policy), or could not be started.
    Failed,
    /// Stopped because it left the plan.
    Stopped,
}

impl AllocationState {
    pub fn as_str(self) -> &'static str {
        match self {
            AllocationState::Pending => "pending",
            AllocationState::Starting => "starting",
            AllocationState::Running => "running",
            AllocationState::Unready => "unready",
            AllocationState::Backoff => "backoff",
            AllocationState::Failed => "failed",
            AllocationState::Stopped => "stopped",
        }
    }
}

impl Validate for NodeFacts {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("node_id", &self.node_id)?;
        check_text("hostname", &self.hostname)?;
        check_text("arch", &self.arch)?;
        check_labels("labels", &self.labels)
    }
}

impl Validate for RegisterRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.enrollment_token.is_none() && self.node_credential.is_none() {
            return Err(ValidationError::new(
                "enrollment_token",
                "an enrollment token or a node credential is required",
                "none",
            ));
        }
        if let Some(token) = &self.enrollment_token {
            check_text("enrollment_token", token)?;
        }
        if let Some(credential) = &self.node_credential {
            check_text("node_credential", credential)?;
        }
        self.facts.validate().map_err(|e| e.within("facts"))?;
        if let Some(agent) = &self.agent {
            agent.validate().map_err(|e| e.within("agent"))?;
        }
        if let Some(key) = &self.wireguard_public_key {
            check_wireguard_key("wireguard_public_key", key)?;
        }
        if self.wireguard_listen_port == Some(0) {
            return Err(ValidationError::new(
                "wireguard_listen_port",
                "must be 1 to 65535",
                0,
            ));
        }
        if let Some(key) = &self.sealing_public_key
            && crate::secret::key_from_hex("sealing_public_key", key).is_err()
        {
            return Err(ValidationError::new(
                "sealing_public_key",
                "must be 64 hex characters (an X25519 public key)",
                key,
            ));
        }
        check_endpoints("endpoints", &self.endpoints)
    }
}

impl Validate for RegisterResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("node_id", &self.node_id)?;
        check_text("node_credential", &self.node_credential)?;
        check_text("control_url", &self.control_url)?;
        check_text("gateway_url", &self.gateway_url)?;
        check_ttl(self.ttl_secs)
    }
}

impl Validate for HeartbeatRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count(
            "allocations",
            self.allocations.len(),
            HEARTBEAT_ALLOCATIONS_MAX,
        )?;
        for (index, status) in self.allocations.iter().enumerate() {
            check_name(
                &format!("allocations[{index}].allocation_id"),
                &status.allocation_id,
            )?;
            check_text(&format!("allocations[{index}].message"), &status.message)?;
            check_count(
                &format!("allocations[{index}].ports"),
                status.ports.len(),
                crate::limits::SERVICE_PORTS_MAX,
            )?;
        }
        if let Some(generation) = &self.plan_generation {
            check_text("plan_generation", generation)?;
        }
        if let Some(key) = &self.wireguard_public_key {
            check_wireguard_key("wireguard_public_key", key)?;
        }
        if let Some(address) = &self.lan_address
            && address.parse::<std::net::IpAddr>().is_err()
        {
            return Err(ValidationError::new(
                "lan_address",
                "is not an IP address",
                address,
            ));
        }
        if let Some(agent) = &self.agent {
            agent.validate().map_err(|e| e.within("agent"))?;
        }
        check_endpoints("endpoints", &self.endpoints)
    }
}

impl Validate for HeartbeatResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(upgrade) = &self.upgrade {
            crate::artifact::check_sha256("upgrade.sha256", &upgrade.sha256)?;
            check_text("upgrade.signature", &upgrade.signature)?;
        }
        check_ttl(self.ttl_secs)
    }
}

/// Checks a set of node labels (F2): at most [`LABELS_MAX`], each a [`check_label`].
pub fn check_labels(field: &str, labels: &BTreeMap<Name, String>) -> Result<(), ValidationError> {
    check_count(field, labels.len(), LABELS_MAX)?;
    labels
        .iter()
        .try_for_each(|(key, value)| check_label(field, key, value))
}

/// Checks one label: the key is a name (`[a-z0-9._-]`, at most 63 bytes); the value is 1 to 63
/// bytes of `[A-Za-z0-9._-]`, so it prints in a table and on a command line as it is.
pub fn check_label(field: &str, key: &str, value: &str) -> Result<(), ValidationError> {
    check_name(field, key)?;
    let value_field = format!("{field}.{key}");
    if value.is_empty() || value.len() > crate::limits::NAME_MAX_BYTES {
        return Err(ValidationError::new(
            value_field,
            format!("must be 1 to {} bytes", crate::limits::NAME_MAX_BYTES),
            value,
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            value_field,
            format!("may only contain A-Z, a-z, 0-9, '-', '_' and '.', found {bad:?}"),
            value,
        ));
    }
    Ok(())
}

/// A TTL control may hand out.
pub fn check_ttl(ttl_secs: u32) -> Result<(), ValidationError> {
    if !(TTL_MIN_SECS..=TTL_MAX_SECS).contains(&ttl_secs) {
        return Err(ValidationError::new(
            "ttl_secs",
            format!("must be between {TTL_MIN_SECS} and {TTL_MAX_SECS}"),
            ttl_secs,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_messages_print_no_token_or_credential() {
        let node_id = Name::try_from("node-1").unwrap_or_else(|error| panic!("{error}"));
        let request = RegisterRequest {
            enrollment_token: Some("opt1.TOKEN-SECRET".into()),
            node_credential: Some("opn.node-1.CRED-SECRET".into()),
            facts: NodeFacts {
                node_id: node_id.clone(),
                hostname: "box".into(),
                arch: "x86_64".into(),
                capacity: Capacity::default(),
                labels: BTreeMap::new(),
            },
            wireguard_public_key: None,
            endpoints: Vec::new(),
            wireguard_listen_port: None,
            sealing_public_key: None,
            agent: None,
        };
        let response = RegisterResponse {
            node_id,
            node_credential: "opn.node-1.CRED-SECRET".into(),
            role: Role::default(),
            control_url: "https://127.0.0.1:7443".into(),
            gateway_url: "https://127.0.0.1:7443".into(),
            ttl_secs: 30,
            epoch: 1,
            release_public_key: None,
        };
        for printed in [format!("{request:?}"), format!("{response:#?}")] {
            assert!(!printed.contains("SECRET"), "{printed}");
            assert!(
                printed.contains("node-1") && printed.contains("<redacted>"),
                "{printed}"
            );
        }
    }
}
