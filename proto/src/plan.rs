//! A node's plan: its role, settings and allocations at a known event id, and the pure fold of
//! change-feed events into a plan.
//!
//! The fold is idempotent: an event at or below the plan's cursor, or whose per-aggregate
//! sequence the plan already holds, changes nothing. Folding the feed from a snapshot gives the
//! same plan as a later snapshot (tested in control).

use serde::{Deserialize, Serialize};

use crate::codec::{Encoding, encode};
use crate::cursor::Cursor;
use crate::feed::{ChangeBatch, FeedEvent, NodeChange};
use crate::hash::sha256_hex;
use crate::limits::PLAN_ALLOCATIONS_MAX;
use crate::name::{Name, check_name};
use crate::node::{Role, check_ttl};
use crate::overlay::OverlaySpec;
use crate::secret::{NODE_SECRETS_MAX, NodeSecret};
use crate::service::ServiceSpec;
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// One instance of a service placed on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: Name,
    pub node_id: Name,
    pub service: Name,
    /// Per-aggregate sequence of this allocation's latest event.
    pub seq: u64,
    pub spec: ServiceSpec,
}

impl Allocation {
    /// Hash of what the process runs; a change means restart.
    pub fn spec_hash(&self) -> String {
        sha256_hex(&encode(Encoding::Postcard, &self.spec))
    }
}

/// Everything a node needs to run, as of `as_of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub node_id: Name,
    pub role: Role,
    /// The plan includes every event up to and including this cursor.
    pub as_of: Cursor,
    pub control_url: String,
    pub gateway_url: String,
    pub ttl_secs: u32,
    /// Leadership epoch of the control service that produced the plan.
    pub epoch: u64,
    /// Sorted by id.
    pub allocations: Vec<Allocation>,
    /// The node's WireGuard overlay (P9); `None` when the node takes no part in it (no key yet,
    /// or the plan predates the overlay). Last field: postcard is positional.
    #[serde(default)]
    pub overlay: Option<OverlaySpec>,
    /// The secret versions this node's allocations reference, each sealed for this node (P11),
    /// sorted by name. After `overlay`: postcard is positional.
    #[serde(default)]
    pub secrets: Vec<NodeSecret>,
}

/// The result of folding one event into a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    Changed,
    /// Already applied: at or below the cursor, or an older per-aggregate sequence.
    AlreadyApplied,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error(
        "change batch is from log epoch {batch_epoch:016x}, the plan is at epoch {plan_epoch:016x}; fetch a snapshot"
    )]
    OtherEpoch { batch_epoch: u64, plan_epoch: u64 },
    #[error("change batch for node {event_node} reached node {plan_node}")]
    WrongNode {
        event_node: String,
        plan_node: String,
    },
    #[error("plan would exceed {PLAN_ALLOCATIONS_MAX} allocations")]
    TooManyAllocations,
    #[error("overlay would exceed {} peers", crate::overlay::OVERLAY_PEERS_MAX)]
    TooManyPeers,
    #[error("plan would exceed {NODE_SECRETS_MAX} secrets")]
    TooManySecrets,
}

impl Plan {
    /// An empty plan, as a node has before its first sync.
    pub fn empty(node_id: Name) -> Self {
        Self {
            node_id,
            role: Role::Worker,
            as_of: Cursor::default(),
            control_url: String::new(),
            gateway_url: String::new(),
            ttl_secs: 30,
            epoch: 0,
            allocations: Vec::new(),
            overlay: None,
            secrets: Vec::new(),
        }
    }

    /// Content hash of what the node must run (role and allocations), independent of the cursor:
    /// two plans with the same generation need no reapply.
    /// Secret versions count too (a new version restarts the instances using it); a plan
    /// without secrets hashes as it did before secrets existed.
    pub fn generation(&self) -> String {
        if self.secrets.is_empty() {
            return sha256_hex(&encode(
                Encoding::Postcard,
                &(&self.role, &self.allocations),
            ));
        }
        let versions: Vec<(&str, u32, u64)> = self
            .secrets
            .iter()
            .map(|s| (s.name.as_str(), s.version, s.seq))
            .collect();
        sha256_hex(&encode(
            Encoding::Postcard,
            &(&self.role, &self.allocations, versions),
        ))
    }

    pub fn secret(&self, name: &str) -> Option<&NodeSecret> {
        self.secrets.iter().find(|s| s.name.as_str() == name)
    }

    pub fn allocation(&self, id: &str) -> Option<&Allocation> {
        self.allocations.iter().find(|a| a.id.as_str() == id)
    }

    /// Folds a whole batch and moves the cursor to its bookmark.
    pub fn fold_batch(&mut self, batch: &ChangeBatch) -> Result<usize, FoldError> {
        if batch.bookmark.log_epoch != self.as_of.log_epoch {
            return Err(FoldError::OtherEpoch {
                batch_epoch: batch.bookmark.log_epoch,
                plan_epoch: self.as_of.log_epoch,
            });
        }
        let mut changed = 0;
        for event in &batch.events {
            if self.fold_event(event)? == Folded::Changed {
                changed += 1;
            }
        }
        if batch.bookmark.event_id > self.as_of.event_id {
            self.as_of = batch.bookmark;
        }
        Ok(changed)
    }

    /// Folds one event. Does not move the cursor past the event; [`Plan::fold_batch`] does.
    pub fn fold_event(&mut self, event: &FeedEvent) -> Result<Folded, FoldError> {
        if event.event_id <= self.as_of.event_id {
            return Ok(Folded::AlreadyApplied);
        }
        match &event.change {
            NodeChange::AllocationUpserted(allocation) => {
                if allocation.node_id != self.node_id {
                    return Err(FoldError::WrongNode {
                        event_node: allocation.node_id.to_string(),
                        plan_node: self.node_id.to_string(),
                    });
                }
                match self
                    .allocations
                    .binary_search_by(|a| a.id.as_str().cmp(allocation.id.as_str()))
                {
                    Ok(index) => {
                        if self.allocations[index].seq >= allocation.seq {
                            return Ok(Folded::AlreadyApplied);
                        }
                        self.allocations[index] = allocation.clone();
                    }
                    Err(index) => {
                        if self.allocations.len() >= PLAN_ALLOCATIONS_MAX {
                            return Err(FoldError::TooManyAllocations);
                        }
                        self.allocations.insert(index, allocation.clone());
                    }
                }
            }
            NodeChange::AllocationRemoved { allocation_id, seq } => {
                match self
                    .allocations
                    .binary_search_by(|a| a.id.as_str().cmp(allocation_id.as_str()))
                {
                    Ok(index) if self.allocations[index].seq < *seq => {
                        self.allocations.remove(index);
                    }
                    _ => return Ok(Folded::AlreadyApplied),
                }
            }
            NodeChange::RoleChanged { role } => {
                if self.role == *role {
                    return Ok(Folded::AlreadyApplied);
                }
                self.role = *role;
            }
            NodeChange::SettingsChanged {
                ttl_secs,
                control_url,
                gateway_url,
                epoch,
            } => {
                self.ttl_secs = *ttl_secs;
                self.control_url.clone_from(control_url);
                self.gateway_url.clone_from(gateway_url);
                self.epoch = *epoch;
            }
            NodeChange::OverlayReplaced(overlay) => {
                if self.overlay.as_ref() == Some(overlay) {
                    return Ok(Folded::AlreadyApplied);
                }
                self.overlay = Some(overlay.clone());
            }
            NodeChange::OverlayChanged {
                interface_name,
                address,
                listen_port,
            } => {
                let overlay = self.overlay.get_or_insert_with(|| OverlaySpec {
                    interface_name: String::new(),
                    address: String::new(),
                    listen_port: *listen_port,
                    peers: Vec::new(),
                });
                let same = overlay.interface_name == *interface_name
                    && overlay.address == *address
                    && overlay.listen_port == *listen_port;
                if same {
                    return Ok(Folded::AlreadyApplied);
                }
                overlay.interface_name.clone_from(interface_name);
                overlay.address.clone_from(address);
                overlay.listen_port = *listen_port;
            }
            NodeChange::PeerUpserted(peer) => {
                if peer.node_id == self.node_id.as_str() {
                    return Err(FoldError::WrongNode {
                        event_node: peer.node_id.clone(),
                        plan_node: format!("a peer of {}", self.node_id),
                    });
                }
                // Control sends a node its whole overlay (OverlayReplaced) before any peer
                // change, so a peer for a node without an overlay has nothing to join.
                let Some(overlay) = self.overlay.as_mut() else {
                    return Ok(Folded::AlreadyApplied);
                };
                if overlay.peer(&peer.node_id).is_none()
                    && overlay.peers.len() >= crate::overlay::OVERLAY_PEERS_MAX
                {
                    return Err(FoldError::TooManyPeers);
                }
                if !overlay.upsert_peer(peer) {
                    return Ok(Folded::AlreadyApplied);
                }
            }
            NodeChange::PeerRemoved { node_id } => {
                let removed = self
                    .overlay
                    .as_mut()
                    .is_some_and(|overlay| overlay.remove_peer(node_id));
                if !removed {
                    return Ok(Folded::AlreadyApplied);
                }
            }
            NodeChange::SecretUpserted(secret) => {
                match self
                    .secrets
                    .binary_search_by(|s| s.name.as_str().cmp(secret.name.as_str()))
                {
                    Ok(index) => {
                        if self.secrets[index].seq >= secret.seq {
                            return Ok(Folded::AlreadyApplied);
                        }
                        self.secrets[index] = secret.clone();
                    }
                    Err(index) => {
                        if self.secrets.len() >= NODE_SECRETS_MAX {
                            return Err(FoldError::TooManySecrets);
                        }
                        self.secrets.insert(index, secret.clone());
                    }
                }
            }
            NodeChange::SecretRemoved { name, seq } => {
                match self
                    .secrets
                    .binary_search_by(|s| s.name.as_str().cmp(name.as_str()))
                {
                    Ok(index) if self.secrets[index].seq < *seq => {
                        self.secrets.remove(index);
                    }
                    _ => return Ok(Folded::AlreadyApplied),
                }
            }
        }
        Ok(Folded::Changed)
    }
}

impl Validate for Allocation {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("id", &self.id)?;
        check_name("node_id", &self.node_id)?;
        check_name("service", &self.service)?;
        self.spec.validate().map_err(|e| e.within("spec"))
    }
}

impl Validate for Plan {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("node_id", &self.node_id)?;
        check_text("control_url", &self.control_url)?;
        check_text("gateway_url", &self.gateway_url)?;
        check_ttl(self.ttl_secs)?;
        check_count("allocations", self.allocations.len(), PLAN_ALLOCATIONS_MAX)?;
        for (index, allocation) in self.allocations.iter().enumerate() {
            let field = format!("allocations[{index}]");
            allocation.validate().map_err(|e| e.within(&field))?;
            if allocation.node_id != self.node_id {
                return Err(ValidationError::new(
                    format!("{field}.node_id"),
                    format!("belongs to another node than {}", self.node_id),
                    &allocation.node_id,
                ));
            }
            if index > 0 && self.allocations[index - 1].id >= allocation.id {
                return Err(ValidationError::new(
                    format!("{field}.id"),
                    "allocations must be sorted by id without duplicates",
                    &allocation.id,
                ));
            }
        }
        check_count("secrets", self.secrets.len(), NODE_SECRETS_MAX)?;
        for (index, secret) in self.secrets.iter().enumerate() {
            let field = format!("secrets[{index}]");
            secret.validate().map_err(|e| e.within(&field))?;
            if index > 0 && self.secrets[index - 1].name >= secret.name {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    "secrets must be sorted by name without duplicates",
                    &secret.name,
                ));
            }
        }
        if let Some(overlay) = &self.overlay {
            overlay.validate().map_err(|e| e.within("overlay"))?;
            if overlay.peer(&self.node_id).is_some() {
                return Err(ValidationError::new(
                    "overlay.peers",
                    "a node is not its own peer",
                    &self.node_id,
                ));
            }
        }
        Ok(())
    }
}

/// Decodes a postcard plan, also one written before the `overlay` field existed (its bytes end
/// where `overlay` would start; postcard encodes `None` as one zero byte), and one in the layout
/// of wire version 1 (before the service spec's placement block, `plan_v1`). For plans an agent
/// kept in its store or last-good copy across an upgrade.
pub fn decode_postcard_plan(
    bytes: &[u8],
    limit_bytes: usize,
    what: &'static str,
) -> Result<Plan, crate::codec::DecodeError> {
    let error = match crate::codec::decode::<Plan>(Encoding::Postcard, bytes, limit_bytes, what) {
        Ok(plan) => return Ok(plan),
        Err(error) => error,
    };
    let mut with_overlay = bytes.to_vec();
    with_overlay.push(0);
    for candidate in [bytes, with_overlay.as_slice()] {
        if candidate.len() > limit_bytes.saturating_add(1) {
            continue;
        }
        if let Ok(plan) = postcard::from_bytes::<Plan>(candidate)
            .or_else(|_| postcard::from_bytes::<crate::plan_v1::PlanV1>(candidate).map(Plan::from))
            && plan.validate().is_ok()
        {
            return Ok(plan);
        }
    }
    Err(error)
}

#[cfg(test)]
pub(crate) fn sample_allocation(node: &str, id: &str, seq: u64) -> Allocation {
    Allocation {
        id: Name::try_from(id).unwrap(),
        node_id: Name::try_from(node).unwrap(),
        service: Name::try_from("web").unwrap(),
        seq,
        spec: crate::service::sample_spec("web"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node() -> Name {
        Name::try_from("n1").unwrap()
    }

    fn upsert(event_id: u64, id: &str, seq: u64) -> FeedEvent {
        FeedEvent {
            event_id,
            aggregate: format!("allocation/{id}"),
            seq,
            change: NodeChange::AllocationUpserted(sample_allocation("n1", id, seq)),
        }
    }

    fn remove(event_id: u64, id: &str, seq: u64) -> FeedEvent {
        FeedEvent {
            event_id,
            aggregate: format!("allocation/{id}"),
            seq,
            change: NodeChange::AllocationRemoved {
                allocation_id: Name::try_from(id).unwrap(),
                seq,
            },
        }
    }

    fn batch(events: Vec<FeedEvent>, bookmark: u64) -> ChangeBatch {
        ChangeBatch {
            events,
            bookmark: Cursor::new(0, bookmark),
        }
    }

    #[test]
    fn fold_adds_updates_and_removes() {
        let mut plan = Plan::empty(node());
        plan.fold_batch(&batch(
            vec![upsert(1, "a", 1), upsert(2, "b", 1), upsert(3, "a", 2)],
            3,
        ))
        .unwrap();
        assert_eq!(plan.allocations.len(), 2);
        assert_eq!(plan.allocation("a").unwrap().seq, 2);
        plan.fold_batch(&batch(vec![remove(4, "a", 3)], 10))
            .unwrap();
        assert!(plan.allocation("a").is_none());
        assert_eq!(plan.as_of.event_id, 10);
        assert!(plan.validate().is_ok());
    }

    #[test]
    fn redelivered_batch_changes_nothing() {
        let mut plan = Plan::empty(node());
        let events = batch(
            vec![upsert(1, "a", 1), remove(2, "a", 2), upsert(3, "b", 1)],
            3,
        );
        plan.fold_batch(&events).unwrap();
        let before = plan.clone();
        assert_eq!(plan.fold_batch(&events).unwrap(), 0);
        assert_eq!(plan, before);
    }

    #[test]
    fn another_nodes_allocation_is_refused() {
        let mut plan = Plan::empty(node());
        let mut event = upsert(1, "a", 1);
        if let NodeChange::AllocationUpserted(allocation) = &mut event.change {
            allocation.node_id = Name::try_from("n2").unwrap();
        }
        assert!(matches!(
            plan.fold_batch(&batch(vec![event], 1)),
            Err(FoldError::WrongNode { .. })
        ));
    }

    #[test]
    fn batch_from_another_epoch_is_refused() {
        let mut plan = Plan::empty(node());
        let other = ChangeBatch {
            events: vec![],
            bookmark: Cursor::new(9, 1),
        };
        assert!(matches!(
            plan.fold_batch(&other),
            Err(FoldError::OtherEpoch { .. })
        ));
    }

    #[test]
    fn generation_ignores_the_cursor() {
        let mut plan = Plan::empty(node());
        let generation = plan.generation();
        plan.as_of.event_id = 99;
        assert_eq!(plan.generation(), generation);
        plan.role = Role::Leader;
        assert_ne!(plan.generation(), generation);
    }

    fn overlay_event(event_id: u64, change: NodeChange) -> FeedEvent {
        FeedEvent {
            event_id,
            aggregate: "node/x".into(),
            seq: event_id,
            change,
        }
    }

    fn joined() -> NodeChange {
        NodeChange::OverlayReplaced(OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/16".into(),
            listen_port: 51820,
            peers: vec![crate::overlay::sample_peer("n2", 2)],
        })
    }

    #[test]
    fn overlay_changes_fold_into_the_plan() {
        let mut plan = Plan::empty(node());
        // A peer change before the node has an overlay has nothing to join.
        let early = overlay_event(
            1,
            NodeChange::PeerUpserted(crate::overlay::sample_peer("n3", 3)),
        );
        assert_eq!(plan.fold_event(&early).unwrap(), Folded::AlreadyApplied);
        let mut moved = crate::overlay::sample_peer("n2", 2);
        moved.endpoints = vec!["192.168.7.2:51820".into()];
        let events = vec![
            overlay_event(2, joined()),
            overlay_event(
                3,
                NodeChange::PeerUpserted(crate::overlay::sample_peer("n3", 3)),
            ),
            overlay_event(4, NodeChange::PeerUpserted(moved.clone())),
            overlay_event(
                5,
                NodeChange::PeerRemoved {
                    node_id: Name::try_from("n3").unwrap(),
                },
            ),
            overlay_event(
                6,
                NodeChange::OverlayChanged {
                    interface_name: "outpost0".into(),
                    address: "10.232.0.1/16".into(),
                    listen_port: 51999,
                },
            ),
        ];
        assert_eq!(plan.fold_batch(&batch(events.clone(), 6)).unwrap(), 5);
        let overlay = plan.overlay.clone().unwrap();
        assert_eq!(overlay.listen_port, 51999);
        assert_eq!(overlay.peers, vec![moved]);
        plan.validate().unwrap();
        // Redelivered: nothing changes.
        let before = plan.clone();
        assert_eq!(plan.fold_batch(&batch(events, 6)).unwrap(), 0);
        assert_eq!(plan, before);
        // A plan whose generation is only about processes: the overlay does not restart them.
        assert_eq!(plan.generation(), Plan::empty(node()).generation());
    }

    #[test]
    fn a_node_is_never_its_own_peer() {
        let mut plan = Plan::empty(node());
        plan.fold_event(&overlay_event(1, joined())).unwrap();
        let own = overlay_event(
            2,
            NodeChange::PeerUpserted(crate::overlay::sample_peer("n1", 1)),
        );
        assert!(matches!(
            plan.fold_event(&own),
            Err(FoldError::WrongNode { .. })
        ));
    }

    #[test]
    fn plans_written_before_the_overlay_field_still_decode() {
        let plan = Plan::empty(node());
        let mut bytes = encode(Encoding::Postcard, &plan);
        assert_eq!(bytes.pop(), Some(0), "None is one zero byte at the end");
        let decoded = decode_postcard_plan(&bytes, 1 << 20, "plan").unwrap();
        assert_eq!(decoded, plan);
        assert!(decode_postcard_plan(&[1, 2, 3], 1 << 20, "plan").is_err());
    }

    proptest! {
        /// However a stream of events is split into batches, and whatever prefix is delivered
        /// twice, the plan ends the same.
        #[test]
        fn fold_is_idempotent_under_redelivery(
            ops in proptest::collection::vec((0u8..4, any::<bool>()), 1..40),
            split in 1usize..40,
            replay in 0usize..40,
        ) {
            let mut seqs = [0u64; 4];
            let events: Vec<FeedEvent> = ops.iter().enumerate().map(|(i, (slot, add))| {
                let id = format!("a{slot}");
                seqs[*slot as usize] += 1;
                let seq = seqs[*slot as usize];
                if *add { upsert(i as u64 + 1, &id, seq) } else { remove(i as u64 + 1, &id, seq) }
            }).collect();
            let mut once = Plan::empty(node());
            once.fold_batch(&batch(events.clone(), events.len() as u64)).unwrap();

            let mut chunked = Plan::empty(node());
            let mut delivered = 0;
            for chunk in events.chunks(split) {
                delivered += chunk.len();
                chunked.fold_batch(&batch(chunk.to_vec(), delivered as u64)).unwrap();
                // Redeliver an overlapping window, as an at-least-once feed may.
                let start = delivered.saturating_sub(replay);
                chunked.fold_batch(&batch(events[start..delivered].to_vec(), delivered as u64)).unwrap();
            }
            prop_assert_eq!(&once, &chunked);
            prop_assert!(once.validate().is_ok());
        }

        /// Peer changes (joins, key or endpoint changes, removals) folded once or split into
        /// batches with redelivered windows end in the same overlay.
        #[test]
        fn overlay_fold_is_idempotent_under_redelivery(
            ops in proptest::collection::vec((0u8..4, 0u8..3), 1..40),
            split in 1usize..40,
            replay in 0usize..40,
        ) {
            let mut events = vec![overlay_event(1, joined())];
            for (slot, op) in ops {
                let node_id = format!("p{slot}");
                let event_id = events.len() as u64 + 1;
                let change = if op == 0 {
                    NodeChange::PeerRemoved { node_id: Name::try_from(node_id.as_str()).unwrap() }
                } else {
                    let mut peer = crate::overlay::sample_peer(&node_id, slot + 10);
                    peer.endpoints = vec![format!("10.231.{op}.{slot}:51820")];
                    NodeChange::PeerUpserted(peer)
                };
                events.push(overlay_event(event_id, change));
            }
            let total = events.len() as u64;
            let mut once = Plan::empty(node());
            once.fold_batch(&batch(events.clone(), total)).unwrap();
            let mut chunked = Plan::empty(node());
            let mut delivered = 0;
            for chunk in events.chunks(split) {
                delivered += chunk.len();
                chunked.fold_batch(&batch(chunk.to_vec(), delivered as u64)).unwrap();
                let start = delivered.saturating_sub(replay);
                chunked.fold_batch(&batch(events[start..delivered].to_vec(), delivered as u64)).unwrap();
            }
            prop_assert_eq!(&once, &chunked);
            prop_assert!(once.validate().is_ok());
        }
    }
}
