//! Records the agent keeps in its redb store, besides plans: identity, supervised processes,
//! per-component applies and outbox entries. Stored as JSON so older agents' records stay readable
//! when fields are added.

use serde::{Deserialize, Serialize};

/// Who this node is to control. The node key never leaves the node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub node_credential: Option<String>,
    /// 32 random bytes generated on the node, lowercase hex.
    #[serde(default)]
    pub node_key_hex: Option<String>,
    /// The control CA pinned at enrollment, PEM.
    #[serde(default)]
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub control_url: Option<String>,
    /// Set when control answered `node_revoked`; a fresh enrollment token is needed.
    #[serde(default)]
    pub revoked: bool,
    /// The WireGuard private key (32 bytes, lowercase hex), made on this node; only its public
    /// key is ever sent.
    #[serde(default)]
    pub wireguard_private_key_hex: Option<String>,
    /// The X25519 key control seals this node's secrets to (32 bytes, lowercase hex), made on
    /// this node; only its public key is ever sent (P11).
    #[serde(default)]
    pub sealing_private_key_hex: Option<String>,
    /// The release public key (base64 ed25519) pinned at enrollment: every agent binary this
    /// node switches to must be signed with it (U2).
    #[serde(default)]
    pub release_public_key: Option<String>,
}

/// The agent's last self-update (crate::upgrade): what it switched to, from what, and how it
/// went. `boots` counts the starts of the new binary while it is on trial, so one that keeps
/// stopping before it reports healthy is caught by the previous binary that the service manager
/// starts again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub target_sha256: String,
    /// The slot the new binary was written to.
    pub target_path: std::path::PathBuf,
    /// The binary that ran before (what a rollback starts) and its artifact sha256 when it
    /// came from an earlier upgrade.
    pub previous_path: std::path::PathBuf,
    #[serde(default)]
    pub previous_sha256: Option<String>,
    pub state: outpost_proto::release::UpgradeState,
    #[serde(default)]
    pub message: String,
    pub boots: u32,
    /// The new binary must report healthy by then (unix seconds).
    pub deadline_unix: u64,
}

/// A process the agent started, so a restarted agent adopts it instead of starting a twin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub allocation_id: String,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: tells a reused pid from ours.
    pub start_ticks: u64,
    pub spec_hash: String,
    #[serde(default)]
    pub restarts: u32,
    /// The ports the process was given, by name (`OUTPOST_PORT_<NAME>`), so an adopted process
    /// keeps reporting them.
    #[serde(default)]
    pub ports: std::collections::BTreeMap<String, u16>,
}

/// The last apply of one component (C10): `allocations`, or a profile reconciler's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentApply {
    pub generation: String,
    pub status: ApplyOutcome,
    #[serde(default)]
    pub message: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Ok,
    Error,
}
