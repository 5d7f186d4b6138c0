//! The secrets part of the views: each secret's current version (key names and ciphertext,
//! never values), each node's sealing key, and what is delivered to each node. A pure fold of
//! the secret events, like the rest of [`crate::projection::Views`].

use std::collections::BTreeMap;

use outpost_proto::Name;
use outpost_proto::secret::{NODE_SECRETS_MAX, NodeSecret, SealedForNode};
use serde::{Deserialize, Serialize};

use super::at_rest::SealedVersion;
use crate::log::Event;
use crate::store::StoredEvent;

/// A secret's current version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub org: String,
    pub name: String,
    pub version: u32,
    pub keys: Vec<String>,
    pub sealed: SealedVersion,
    pub updated_at_unix_ms: u64,
    /// Who set the current version (`opa.TOKEN_ID`).
    pub updated_by: String,
    pub event_id: u64,
}

/// A secret version sealed for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredSecret {
    pub org: String,
    pub version: u32,
    /// The node key it was sealed to.
    pub public_key: String,
    pub seq: u64,
    pub sealed: SealedForNode,
    pub allocations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretViews {
    /// By `org/name`.
    pub secrets: BTreeMap<String, SecretRecord>,
    /// A node's sealing public key (hex), by node id.
    pub node_keys: BTreeMap<String, String>,
    /// By node id, then secret name (a node belongs to one org).
    pub delivered: BTreeMap<String, BTreeMap<String, DeliveredSecret>>,
}

/// The views key of a secret.
pub fn secret_key(org: &str, name: &str) -> String {
    format!("{org}/{name}")
}

impl SecretViews {
    pub fn get(&self, org: &str, name: &str) -> Option<&SecretRecord> {
        self.secrets.get(&secret_key(org, name))
    }

    /// Applies a secret event; true when deliveries may need to change (a new version, a
    /// deleted secret, a new node key).
    pub fn apply(&mut self, event: &Event, stored: &StoredEvent) -> bool {
        match event {
            Event::SecretVersionSet {
                org,
                name,
                version,
                keys,
                sealed,
                actor,
            } => {
                self.secrets.insert(
                    secret_key(org, name),
                    SecretRecord {
                        org: org.clone(),
                        name: name.clone(),
                        version: *version,
                        keys: keys.clone(),
                        sealed: sealed.clone(),
                        updated_at_unix_ms: stored.at_unix_ms,
                        updated_by: actor.clone(),
                        event_id: stored.event_id,
                    },
                );
                true
            }
            Event::SecretDeleted { org, name, .. } => {
                self.secrets.remove(&secret_key(org, name));
                true
            }
            Event::NodeSealingKeySet {
                node_id,
                public_key,
            } => {
                self.node_keys.insert(node_id.clone(), public_key.clone());
                true
            }
            Event::SecretDelivered {
                node_id,
                org,
                name,
                version,
                public_key,
                sealed,
                allocations,
            } => {
                self.delivered.entry(node_id.clone()).or_default().insert(
                    name.clone(),
                    DeliveredSecret {
                        org: org.clone(),
                        version: *version,
                        public_key: public_key.clone(),
                        seq: stored.seq,
                        sealed: sealed.clone(),
                        allocations: allocations.clone(),
                    },
                );
                false
            }
            Event::SecretWithdrawn { node_id, name, .. } => {
                if let Some(node) = self.delivered.get_mut(node_id) {
                    node.remove(name);
                    if node.is_empty() {
                        self.delivered.remove(node_id);
                    }
                }
                false
            }
            _ => false,
        }
    }

    /// What a node's plan carries: its delivered secrets, sorted by name.
    pub fn node_secrets(&self, node_id: &str) -> Vec<NodeSecret> {
        self.delivered
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|(name, delivered)| {
                Some(NodeSecret {
                    name: Name::try_from(name.as_str()).ok()?,
                    version: delivered.version,
                    seq: delivered.seq,
                    sealed: delivered.sealed.clone(),
                })
            })
            .take(NODE_SECRETS_MAX)
            .collect()
    }
}
