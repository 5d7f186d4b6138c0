//! Delivery (P11, DESIGN "Secrets"): control seals a secret version for a node only while an
//! allocation on that node references it, and withdraws it when none does. The decision is the
//! pure [`plan_deliveries`] over the views; [`run_delivery_once`] opens each version with the
//! master key, seals it for the node's X25519 key and appends the deliveries in one commit.
//! It runs after every scheduler pass (placements, new versions and new node keys all wake it).

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_proto::secret::seal_for_node;

use super::at_rest::{WrappedDataKey, data_key_record, open_version};
use crate::api::error::ApiError;
use crate::app::{Control, blocking};
use crate::log::Event;
use crate::projection::{NodeState, Views};

/// One change to what a node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryDecision {
    /// Seal `version` of `org/name` for the node's key `public_key`.
    Deliver {
        node_id: String,
        org: String,
        name: String,
        version: u32,
        public_key: String,
        allocations: Vec<String>,
    },
    Withdraw {
        node_id: String,
        org: String,
        name: String,
        reason: String,
    },
}

/// What one node should hold of one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    org: String,
    version: u32,
    public_key: String,
    allocations: Vec<String>,
}

/// What each node should hold, by (node, secret name): the org, current version and the
/// allocations that reference it. Only live (not revoked) nodes with a sealing key of the same
/// org as the allocation, and only secrets that exist.
fn wanted(views: &Views) -> BTreeMap<(String, String), Wanted> {
    let mut wanted: BTreeMap<(String, String), Wanted> = BTreeMap::new();
    for allocation in views.allocations.values() {
        let Some(node) = views.nodes.get(&allocation.node_id) else {
            continue;
        };
        if node.state == NodeState::Revoked || node.org != allocation.org {
            continue;
        }
        let Some(public_key) = views.secrets.node_keys.get(&allocation.node_id) else {
            continue;
        };
        for reference in &allocation.spec.secrets {
            let Some(secret) = views.secrets.get(&allocation.org, &reference.name) else {
                continue;
            };
            wanted
                .entry((allocation.node_id.clone(), reference.name.to_string()))
                .or_insert_with(|| Wanted {
                    org: allocation.org.clone(),
                    version: secret.version,
                    public_key: public_key.clone(),
                    allocations: Vec::new(),
                })
                .allocations
                .push(allocation.allocation_id.clone());
        }
    }
    wanted
}

/// The deliveries and withdrawals that bring every node to what its allocations reference.
pub fn plan_deliveries(views: &Views) -> Vec<DeliveryDecision> {
    let wanted = wanted(views);
    let mut decisions = Vec::new();
    for ((node_id, name), want) in &wanted {
        let current = views
            .secrets
            .delivered
            .get(node_id)
            .and_then(|node| node.get(name));
        let up_to_date = current.is_some_and(|delivered| {
            delivered.version == want.version && delivered.public_key == want.public_key
        });
        if !up_to_date {
            decisions.push(DeliveryDecision::Deliver {
                node_id: node_id.clone(),
                org: want.org.clone(),
                name: name.clone(),
                version: want.version,
                public_key: want.public_key.clone(),
                allocations: want.allocations.clone(),
            });
        }
    }
    for (node_id, held) in &views.secrets.delivered {
        for (name, delivered) in held {
            if !wanted.contains_key(&(node_id.clone(), name.clone())) {
                let reason = if views.secrets.get(&delivered.org, name).is_none() {
                    "the secret was deleted"
                } else if views
                    .nodes
                    .get(node_id)
                    .is_none_or(|n| n.state == NodeState::Revoked)
                {
                    "the node was revoked"
                } else {
                    "no allocation on the node references it any more"
                };
                decisions.push(DeliveryDecision::Withdraw {
                    node_id: node_id.clone(),
                    org: delivered.org.clone(),
                    name: name.clone(),
                    reason: reason.to_string(),
                });
            }
        }
    }
    decisions
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    bytes
}

/// One delivery pass: when the views have reached the log head, seals what nodes need and
/// withdraws what they no longer need, in one commit. Returns how many events it appended.
pub async fn run_delivery_once(control: &Control) -> Result<usize, ApiError> {
    let guard = control.lock_commands_settled().await;
    let head = control.hub.position().head;
    if control.projector.projector_wait(head).await.is_err() {
        return Ok(0);
    }
    let (decisions, versions) = {
        let views = control.projector.views();
        let decisions = plan_deliveries(&views);
        let versions: BTreeMap<(String, String), super::views::SecretRecord> = decisions
            .iter()
            .filter_map(|decision| match decision {
                DeliveryDecision::Deliver { org, name, .. } => views
                    .secrets
                    .get(org, name)
                    .map(|record| ((org.clone(), name.clone()), record.clone())),
                DeliveryDecision::Withdraw { .. } => None,
            })
            .collect();
        (decisions, versions)
    };
    if decisions.is_empty() {
        return Ok(0);
    }
    let store = Arc::clone(&control.store);
    let keys: Vec<(String, String, u32)> = versions
        .values()
        .map(|record| (record.org.clone(), record.name.clone(), record.version))
        .collect();
    let wrapped: BTreeMap<(String, String), Option<WrappedDataKey>> = blocking(move || {
        keys.into_iter()
            .map(|(org, name, version)| {
                let bytes = store.get_config(&data_key_record(&org, &name, version))?;
                let record = bytes.and_then(|b| serde_json::from_slice(&b).ok());
                Ok(((org, name), record))
            })
            .collect()
    })
    .await?;
    let mut events = Vec::new();
    for decision in decisions {
        match decision {
            DeliveryDecision::Deliver {
                node_id,
                org,
                name,
                version,
                public_key,
                allocations,
            } => {
                let secret = (org.clone(), name.clone());
                let (Some(record), Some(Some(wrapped))) =
                    (versions.get(&secret), wrapped.get(&secret))
                else {
                    tracing::error!(
                        "secret {org}/{name} version {version} has no data key in the store; not delivered to node {node_id}"
                    );
                    continue;
                };
                let values = match open_version(
                    &control.settings.master_keys,
                    &org,
                    &name,
                    version,
                    &record.sealed,
                    wrapped,
                ) {
                    Ok(values) => values,
                    Err(error) => {
                        tracing::error!("{error}; not delivered to node {node_id}");
                        continue;
                    }
                };
                let Ok(node_key) = outpost_proto::secret::key_from_hex("node key", &public_key)
                else {
                    tracing::error!(
                        "node {node_id} has a malformed sealing key; secret {org}/{name} not delivered"
                    );
                    continue;
                };
                let sealed = seal_for_node(
                    &node_key,
                    &node_id,
                    &name,
                    version,
                    &values,
                    random::<32>(),
                    random::<24>(),
                );
                tracing::info!(
                    component = "secrets",
                    action = "deliver",
                    node_id = node_id.as_str(),
                    generation = version,
                    "secret {org}/{name} version {version} sealed for node {node_id} (allocations {})",
                    allocations.join(", ")
                );
                events.push(Event::SecretDelivered {
                    node_id,
                    org,
                    name,
                    version,
                    public_key,
                    sealed,
                    allocations,
                });
            }
            DeliveryDecision::Withdraw {
                node_id,
                org,
                name,
                reason,
            } => {
                tracing::info!(
                    component = "secrets",
                    action = "withdraw",
                    node_id = node_id.as_str(),
                    "secret {org}/{name} withdrawn from node {node_id}: {reason}"
                );
                events.push(Event::SecretWithdrawn {
                    node_id,
                    org,
                    name,
                    reason,
                });
            }
        }
    }
    if events.is_empty() {
        return Ok(0);
    }
    control.append(guard, &events).await?;
    Ok(events.len())
}

/// Records a node's sealing key from its registration, when it is new or changed (a re-enrolled
/// node may bring a new one; its secrets are then sealed again for the new key).
pub async fn record_sealing_key(
    control: &Control,
    node_id: &str,
    public_key: &str,
) -> Result<(), ApiError> {
    let guard = control.lock_commands().await;
    let known = control
        .projector
        .views()
        .secrets
        .node_keys
        .get(node_id)
        .is_some_and(|key| key == public_key);
    if known {
        return Ok(());
    }
    control
        .append(
            guard,
            &[Event::NodeSealingKeySet {
                node_id: node_id.to_string(),
                public_key: public_key.to_string(),
            }],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::at_rest::SealedVersion;
    use crate::store::StoredEvent;
    use outpost_proto::node::NodeFacts;
    use outpost_proto::secret::SealedForNode;

    struct Log {
        views: Views,
        next_id: u64,
    }

    impl Log {
        fn push(&mut self, event: Event) {
            self.next_id += 1;
            let new = event.to_new_event();
            let stored = StoredEvent {
                event_id: self.next_id,
                aggregate: new.aggregate,
                seq: self.next_id,
                kind: new.kind,
                schema_version: new.schema_version,
                at_unix_ms: 0,
                routing_keys: new.routing_keys,
                data: new.data,
            };
            self.views.apply(&stored).unwrap();
        }

        fn node(&mut self, node_id: &str, org: &str) {
            let facts: NodeFacts = serde_json::from_value(serde_json::json!({
                "node_id": node_id, "hostname": node_id, "arch": "x86_64",
                "capacity": {"memory_bytes": 1 << 30, "cpu_millis": 1000}
            }))
            .unwrap();
            self.push(Event::NodeRegistered {
                node_id: node_id.into(),
                org: org.into(),
                facts,
                with: crate::log::RegisteredWith::EnrollmentToken,
            });
            self.push(Event::NodeSealingKeySet {
                node_id: node_id.into(),
                public_key: format!("{node_id}-key"),
            });
        }

        fn version(&mut self, org: &str, version: u32) {
            self.push(Event::SecretVersionSet {
                org: org.into(),
                name: "db".into(),
                version,
                keys: vec!["password".into()],
                sealed: SealedVersion {
                    nonce: String::new(),
                    ciphertext: String::new(),
                },
                actor: "opa.t".into(),
            });
        }

        fn place(&mut self, allocation_id: &str, node_id: &str, org: &str) {
            let spec = serde_json::from_value(serde_json::json!({
                "name": "web", "command": "/bin/true",
                "secrets": [{"name": "db", "env": {"DB_PASSWORD": "password"}}]
            }))
            .unwrap();
            self.push(Event::AllocationPlaced {
                allocation_id: allocation_id.into(),
                org: org.into(),
                service: "web".into(),
                node_id: node_id.into(),
                replica: 0,
                spec,
            });
        }

        /// Applies what the delivery pass would append for `decisions`.
        fn deliver(&mut self, decisions: Vec<DeliveryDecision>) {
            for decision in decisions {
                match decision {
                    DeliveryDecision::Deliver {
                        node_id,
                        org,
                        name,
                        version,
                        public_key,
                        allocations,
                    } => self.push(Event::SecretDelivered {
                        node_id,
                        org,
                        name,
                        version,
                        public_key,
                        sealed: SealedForNode {
                            ephemeral_public_key: String::new(),
                            nonce: String::new(),
                            ciphertext: String::new(),
                        },
                        allocations,
                    }),
                    DeliveryDecision::Withdraw {
                        node_id,
                        org,
                        name,
                        reason,
                    } => self.push(Event::SecretWithdrawn {
                        node_id,
                        org,
                        name,
                        reason,
                    }),
                }
            }
        }
    }

    fn delivered_to(decisions: &[DeliveryDecision]) -> Vec<(String, u32)> {
        decisions
            .iter()
            .filter_map(|d| match d {
                DeliveryDecision::Deliver {
                    node_id, version, ..
                } => Some((node_id.clone(), *version)),
                DeliveryDecision::Withdraw { .. } => None,
            })
            .collect()
    }

    #[test]
    fn only_nodes_whose_allocations_reference_a_secret_get_it_and_lose_it_after() {
        let mut log = Log {
            views: Views::new(),
            next_id: 0,
        };
        log.node("n1", "acme");
        log.node("n2", "acme");
        log.node("n3", "other");
        log.version("acme", 1);
        log.version("other", 1);
        assert!(
            plan_deliveries(&log.views).is_empty(),
            "nothing references db"
        );
        log.place("web-1", "n1", "acme");
        let decisions = plan_deliveries(&log.views);
        assert_eq!(delivered_to(&decisions), vec![("n1".to_string(), 1)]);
        log.deliver(decisions);
        assert!(plan_deliveries(&log.views).is_empty(), "delivered once");
        assert_eq!(log.views.secrets.node_secrets("n1").len(), 1);
        assert!(log.views.secrets.node_secrets("n2").is_empty());

        // A new version is sealed again; a new node key too.
        log.version("acme", 2);
        let decisions = plan_deliveries(&log.views);
        assert_eq!(delivered_to(&decisions), vec![("n1".to_string(), 2)]);
        log.deliver(decisions);
        log.push(Event::NodeSealingKeySet {
            node_id: "n1".into(),
            public_key: "n1-new-key".into(),
        });
        let decisions = plan_deliveries(&log.views);
        assert_eq!(delivered_to(&decisions), vec![("n1".to_string(), 2)]);
        log.deliver(decisions);

        // The instance moves: withdrawn from n1, delivered to n2.
        log.push(Event::AllocationRemoved {
            allocation_id: "web-1".into(),
            service: "web".into(),
            node_id: "n1".into(),
            reason: "moved".into(),
        });
        log.place("web-2", "n2", "acme");
        let decisions = plan_deliveries(&log.views);
        assert_eq!(delivered_to(&decisions), vec![("n2".to_string(), 2)]);
        assert!(decisions.iter().any(|d| matches!(d,
            DeliveryDecision::Withdraw { node_id, reason, .. }
                if node_id == "n1" && reason.contains("no allocation"))));
        log.deliver(decisions);
        assert!(log.views.secrets.node_secrets("n1").is_empty());

        // A revoked node loses it.
        log.push(Event::NodeRevoked {
            node_id: "n2".into(),
        });
        let decisions = plan_deliveries(&log.views);
        assert!(matches!(&decisions[..],
            [DeliveryDecision::Withdraw { node_id, reason, .. }]
                if node_id == "n2" && reason.contains("revoked")));
    }

    #[test]
    fn an_allocation_never_gets_another_orgs_secret_or_lands_on_another_orgs_node() {
        let mut log = Log {
            views: Views::new(),
            next_id: 0,
        };
        log.node("n1", "acme");
        log.version("other", 1);
        // acme's web references db, which only org other has.
        log.place("web-1", "n1", "acme");
        assert!(plan_deliveries(&log.views).is_empty());
        // An allocation of org other on acme's node (never placed so) gets nothing.
        log.place("web-2", "n1", "other");
        assert!(plan_deliveries(&log.views).is_empty());
    }
}
