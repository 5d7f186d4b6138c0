//! Change distribution (P8): one shared in-memory tail of recent events for fan-out, the
//! per-node filtered long-poll that maps log events to `NodeChange`s and ends every answer with
//! a bookmark, and the unfiltered admin feed.
//!
//! A long-poll whose cursor is still inside the tail is served from memory; one that is behind
//! reads the store's routing index. Each waiter holds its own watch receiver, so a slow consumer
//! never blocks another.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::cursor::{CursorCheck, GoneReason, LogPosition, check_cursor};
use outpost_proto::feed::{ChangeBatch, FeedEvent, NodeChange};
use outpost_proto::name::Name;
use outpost_proto::plan::Allocation;
use tokio::sync::watch;

use crate::log::{Event, node_routing_key};
use crate::store::{Store, StoreError, StoredEvent};

/// Events kept in the in-memory tail.
pub const TAIL_EVENTS: usize = 4096;

/// The shared tail of the log and its position.
pub struct FeedHub {
    tail: RwLock<VecDeque<Arc<StoredEvent>>>,
    capacity: usize,
    position: Mutex<LogPosition>,
    head: watch::Sender<u64>,
}

impl FeedHub {
    pub fn new(position: LogPosition, capacity: usize) -> Self {
        Self {
            tail: RwLock::new(VecDeque::with_capacity(capacity.min(TAIL_EVENTS))),
            capacity: capacity.max(1),
            position: Mutex::new(position),
            head: watch::channel(position.head).0,
        }
    }

    pub fn position(&self) -> LogPosition {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that changes whenever the head moves or the epoch changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Adds freshly committed events (in id order) and wakes every waiter.
    pub fn publish(&self, events: &[StoredEvent]) {
        // Idempotent: events the tail already announced are skipped.
        let known_head = self.position().head;
        let fresh = events
            .iter()
            .position(|e| e.event_id > known_head)
            .unwrap_or(events.len());
        let events = &events[fresh..];
        let Some(last) = events.last() else { return };
        {
            let mut tail = self.tail.write().unwrap_or_else(|p| p.into_inner());
            for event in events {
                if tail.len() == self.capacity {
                    tail.pop_front();
                }
                tail.push_back(Arc::new(event.clone()));
            }
        }
        {
            let mut position = self.position.lock().unwrap_or_else(|p| p.into_inner());
            position.head = last.event_id;
            if position.floor > position.head {
                position.floor = events[0].event_id;
            }
        }
        self.head.send_replace(last.event_id);
    }

    /// A new log epoch: every waiter wakes and sees its cursor gone.
    pub fn set_epoch(&self, log_epoch: u64) {
        self.position
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log_epoch = log_epoch;
        self.head.send_modify(|_| {});
    }

    /// Events in `(after, head]` from the tail, filtered by routing key; `None` when the tail
    /// no longer holds event `after + 1`.
    fn read_tail(
        &self,
        routing_key: Option<&str>,
        after: u64,
        head: u64,
        limit: usize,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        let tail = self.tail.read().unwrap_or_else(|p| p.into_inner());
        let covered = match tail.front() {
            Some(front) => front.event_id <= after.saturating_add(1),
            None => after >= head,
        };
        if !covered {
            return None;
        }
        Some(
            tail.iter()
                .filter(|e| e.event_id > after && e.event_id <= head)
                .filter(|e| routing_key.is_none_or(|key| e.routing_keys.iter().any(|k| k == key)))
                .take(limit)
                .cloned()
                .collect(),
        )
    }
}

/// Settings a node's plan carries; a registration shows up in its feed as `SettingsChanged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub ttl_secs: u32,
    pub control_url: String,
    pub gateway_url: String,
    pub epoch: u64,
}

/// Maps one log event to what it means for `node_id`, if anything.
pub fn to_node_change(
    stored: &StoredEvent,
    node_id: &str,
    settings: &NodeSettings,
) -> Option<FeedEvent> {
    let event = match Event::from_stored(stored) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!("feed skips an undecodable event: {error}");
            return None;
        }
    };
    let change = match event {
        Event::AllocationPlaced {
            allocation_id,
            node_id: on,
            service,
            spec,
            ..
        } if on == node_id => NodeChange::AllocationUpserted(Allocation {
            id: Name::try_from(allocation_id.as_str()).ok()?,
            node_id: Name::try_from(on.as_str()).ok()?,
            service: Name::try_from(service.as_str()).ok()?,
            seq: stored.seq,
            spec,
        }),
        Event::AllocationRemoved {
            allocation_id,
            node_id: on,
            ..
        } if on == node_id => NodeChange::AllocationRemoved {
            allocation_id: Name::try_from(allocation_id.as_str()).ok()?,
            seq: stored.seq,
        },
        Event::NodeRegistered { node_id: on, .. } if on == node_id => NodeChange::SettingsChanged {
            ttl_secs: settings.ttl_secs,
            control_url: settings.control_url.clone(),
            gateway_url: settings.gateway_url.clone(),
            epoch: settings.epoch,
        },
        Event::NodeRoleChanged { node_id: on, role } if on == node_id => {
            NodeChange::RoleChanged { role }
        }
        Event::OverlayJoined { member, peers, .. } => {
            if member.node_id == node_id {
                NodeChange::OverlayReplaced(member.own_spec(peers))
            } else {
                NodeChange::PeerUpserted(member.peer_spec())
            }
        }
        Event::OverlayMemberChanged { member, .. } => {
            if member.node_id == node_id {
                NodeChange::OverlayChanged {
                    interface_name: member.interface_name,
                    address: member.address,
                    listen_port: member.listen_port,
                }
            } else {
                NodeChange::PeerUpserted(member.peer_spec())
            }
        }
        Event::OverlayLeft { node_id: left, .. } if left != node_id => NodeChange::PeerRemoved {
            node_id: Name::try_from(left.as_str()).ok()?,
        },
        Event::SecretDelivered {
            node_id: on,
            name,
            version,
            sealed,
            ..
        } if on == node_id => NodeChange::SecretUpserted(outpost_proto::secret::NodeSecret {
            name: Name::try_from(name.as_str()).ok()?,
            version,
            seq: stored.seq,
            sealed,
        }),
        Event::SecretWithdrawn {
            node_id: on, name, ..
        } if on == node_id => NodeChange::SecretRemoved {
            name: Name::try_from(name.as_str()).ok()?,
            seq: stored.seq,
        },
        _ => return None,
    };
    Some(FeedEvent {
        event_id: stored.event_id,
        aggregate: stored.aggregate.clone(),
        seq: stored.seq,
        change,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{reason}")]
    Gone {
        reason: GoneReason,
        position: LogPosition,
    },
    #[error("cursor {cursor} is past the log head {head}")]
    FromFuture { cursor: Cursor, head: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("feed read task failed: {0}")]
    Task(String),
}

/// Reads events in `(after, head]` for a routing key (or all), from the tail or the store.
/// Returns the events and how far the read covered.
async fn read_range(
    hub: &FeedHub,
    store: &Arc<dyn Store>,
    routing_key: Option<&str>,
    after: u64,
    head: u64,
    limit: usize,
) -> Result<(Vec<Arc<StoredEvent>>, u64), FeedError> {
    let events = match hub.read_tail(routing_key, after, head, limit) {
        Some(events) => events,
        None => {
            let reader = Arc::clone(store);
            let key = routing_key.map(str::to_string);
            let read = tokio::task::spawn_blocking(move || match key {
                Some(key) => reader.read_routed(&key, after, limit),
                None => reader.read_log(after, limit),
            })
            .await
            .map_err(|e| FeedError::Task(e.to_string()))??;
            read.into_iter()
                .filter(|e| e.event_id <= head)
                .map(Arc::new)
                .collect()
        }
    };
    let covered = if events.len() >= limit {
        events.last().map_or(head, |e| e.event_id)
    } else {
        head
    };
    Ok((events, covered))
}

fn check(cursor: Cursor, position: LogPosition) -> Result<u64, FeedError> {
    match check_cursor(cursor, position) {
        CursorCheck::Serve { after } => Ok(after),
        CursorCheck::Gone(reason) => Err(FeedError::Gone { reason, position }),
        CursorCheck::Future { head } => Err(FeedError::FromFuture { cursor, head }),
    }
}

/// The per-node long-poll: answers as soon as at least one event past the cursor concerns the
/// node, or when `wait` ends; the bookmark says how far everything concerning the node was sent.
pub async fn node_changes(
    hub: &FeedHub,
    store: &Arc<dyn Store>,
    node_id: &str,
    cursor: Cursor,
    wait: Duration,
    settings: &NodeSettings,
    limit: usize,
) -> Result<ChangeBatch, FeedError> {
    let key = node_routing_key(node_id);
    let deadline = tokio::time::Instant::now() + wait;
    let mut after = check(cursor, hub.position())?;
    loop {
        let mut woken = hub.subscribe();
        woken.borrow_and_update();
        let position = hub.position();
        // The epoch may have changed while waiting: the cursor is gone then.
        check(Cursor::new(cursor.log_epoch, after), position)?;
        let (events, covered) =
            read_range(hub, store, Some(&key), after, position.head, limit).await?;
        let changes: Vec<FeedEvent> = events
            .iter()
            .filter_map(|e| to_node_change(e, node_id, settings))
            .collect();
        let bookmark = Cursor::new(position.log_epoch, covered);
        if !changes.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(ChangeBatch {
                events: changes,
                bookmark,
            });
        }
        after = covered;
        if covered < position.head {
            // The batch limit cut the read; keep reading without waiting.
            continue;
        }
        if tokio::time::timeout_at(deadline, woken.changed())
            .await
            .is_err()
        {
            return Ok(ChangeBatch {
                events: Vec::new(),
                bookmark,
            });
        }
    }
}

/// The unfiltered admin feed: events past the cursor, waiting up to `wait` for the first one.
pub async fn log_events(
    hub: &FeedHub,
    store: &Arc<dyn Store>,
    cursor: Cursor,
    wait: Duration,
    limit: usize,
) -> Result<(Vec<Arc<StoredEvent>>, Cursor), FeedError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let mut woken = hub.subscribe();
        woken.borrow_and_update();
        let position = hub.position();
        let after = check(cursor, position)?;
        let (events, covered) = read_range(hub, store, None, after, position.head, limit).await?;
        let bookmark = Cursor::new(position.log_epoch, covered);
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok((events, bookmark));
        }
        if tokio::time::timeout_at(deadline, woken.changed())
            .await
            .is_err()
        {
            return Ok((events, bookmark));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::RegisteredWith;
    use crate::projection::Views;
    use outpost_proto::node::NodeFacts;
    use outpost_proto::service::ServiceSpec;
    use proptest::prelude::*;

    fn settings() -> NodeSettings {
        NodeSettings {
            ttl_secs: 30,
            control_url: "https://c".into(),
            gateway_url: String::new(),
            epoch: 1,
        }
    }

    fn spec(version: u32) -> ServiceSpec {
        let mut spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"web","command":"/bin/true"}"#).unwrap();
        spec.args = vec![version.to_string()];
        spec
    }

    /// A log of events with ids, per-aggregate sequences and routing keys, as the store makes.
    struct Log {
        events: Vec<StoredEvent>,
        seqs: std::collections::BTreeMap<String, u64>,
    }

    impl Log {
        fn push(&mut self, event: Event) {
            let new = event.to_new_event();
            let seq = self.seqs.entry(new.aggregate.clone()).or_default();
            *seq += 1;
            self.events.push(StoredEvent {
                event_id: self.events.len() as u64 + 1,
                aggregate: new.aggregate,
                seq: *seq,
                kind: new.kind,
                schema_version: new.schema_version,
                at_unix_ms: 0,
                routing_keys: new.routing_keys,
                data: new.data,
            });
        }
    }

    fn registered(node: &str) -> Event {
        let facts: NodeFacts = serde_json::from_value(serde_json::json!({
            "node_id": node, "hostname": node, "arch": "x86_64", "capacity": {"memory_bytes": 1, "cpu_millis": 1}
        }))
        .unwrap();
        Event::NodeRegistered {
            node_id: node.into(),
            org: "default".into(),
            facts,
            with: RegisteredWith::EnrollmentToken,
        }
    }

    proptest! {
        /// Folding the node's feed from an old plan snapshot gives the same plan as a fresh
        /// snapshot, whatever happened in between (placements, spec updates, moves, removals).
        #[test]
        fn feed_folded_onto_an_old_snapshot_matches_a_fresh_snapshot(
            ops in proptest::collection::vec((0u8..4, 0u8..2, 0u32..3), 1..40),
            snapshot_at in 0usize..40,
        ) {
            let mut log = Log { events: Vec::new(), seqs: Default::default() };
            log.push(registered("n1"));
            log.push(registered("n2"));
            // allocation slot -> node it is on
            let mut placed: std::collections::BTreeMap<u8, String> = Default::default();
            for (slot, node, version) in ops {
                let id = format!("web-{slot}");
                let node = if node == 0 { "n1" } else { "n2" }.to_string();
                match placed.get(&slot).cloned() {
                    Some(on) if version == 0 => {
                        log.push(Event::AllocationRemoved { allocation_id: id, service: "web".into(), node_id: on, reason: "r".into() });
                        placed.remove(&slot);
                    }
                    Some(on) => log.push(Event::AllocationPlaced {
                        allocation_id: id, org: "default".into(), service: "web".into(), node_id: on, replica: 0, spec: spec(version),
                    }),
                    None => {
                        log.push(Event::AllocationPlaced {
                            allocation_id: id, org: "default".into(), service: "web".into(), node_id: node.clone(), replica: 0, spec: spec(version),
                        });
                        placed.insert(slot, node);
                    }
                }
            }
            let cut = (2 + snapshot_at).min(log.events.len());
            for node in ["n1", "n2"] {
                let mut views = Views::new();
                for event in &log.events[..cut] {
                    views.apply(event).unwrap();
                }
                let mut plan = views.plan(node, 7, &settings()).unwrap();
                for event in &log.events[cut..] {
                    views.apply(event).unwrap();
                }
                let fresh = views.plan(node, 7, &settings()).unwrap();
                let key = node_routing_key(node);
                let feed: Vec<FeedEvent> = log.events[cut..]
                    .iter()
                    .filter(|e| e.routing_keys.contains(&key))
                    .filter_map(|e| to_node_change(e, node, &settings()))
                    .collect();
                let batch = ChangeBatch { events: feed, bookmark: Cursor::new(7, log.events.len() as u64) };
                plan.fold_batch(&batch).unwrap();
                prop_assert_eq!(&plan.allocations, &fresh.allocations);
                prop_assert_eq!(plan.as_of, fresh.as_of);
            }
        }
    }

    #[tokio::test]
    async fn tail_serves_recent_events_and_the_store_serves_older_ones() {
        use crate::store::memory::MemoryStore;
        use crate::store::{Commit, CommitOutcome};
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let position = store.log_position().unwrap();
        let hub = FeedHub::new(position, 2);
        for node in ["n1", "n2", "n1", "n1"] {
            let outcome = store
                .commit(Commit {
                    events: vec![registered(node).to_new_event()],
                    ..Commit::default()
                })
                .unwrap();
            let CommitOutcome::Appended(events) = outcome else {
                panic!()
            };
            hub.publish(&events);
        }
        // The tail holds events 3 and 4 only; a cursor at 0 reads the store's index.
        assert!(hub.read_tail(Some("node:n1"), 0, 4, 10).is_none());
        let epoch = hub.position().log_epoch;
        let batch = node_changes(
            &hub,
            &store,
            "n1",
            Cursor::new(epoch, 0),
            Duration::ZERO,
            &settings(),
            10,
        )
        .await
        .unwrap();
        assert_eq!(
            batch.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
        assert_eq!(batch.bookmark, Cursor::new(epoch, 4));
        let batch = node_changes(
            &hub,
            &store,
            "n2",
            Cursor::new(epoch, 2),
            Duration::ZERO,
            &settings(),
            10,
        )
        .await
        .unwrap();
        assert!(batch.events.is_empty());
        assert_eq!(
            batch.bookmark.event_id, 4,
            "the bookmark moves past events of other nodes"
        );
        // A limit cuts the batch and the bookmark stays at the last event sent.
        let batch = node_changes(
            &hub,
            &store,
            "n1",
            Cursor::new(epoch, 0),
            Duration::ZERO,
            &settings(),
            1,
        )
        .await
        .unwrap();
        assert_eq!((batch.events.len(), batch.bookmark.event_id), (1, 1));
        assert!(matches!(
            node_changes(
                &hub,
                &store,
                "n1",
                Cursor::new(epoch, 9),
                Duration::ZERO,
                &settings(),
                10
            )
            .await,
            Err(FeedError::FromFuture { .. })
        ));
        assert!(matches!(
            node_changes(
                &hub,
                &store,
                "n1",
                Cursor::new(epoch ^ 1, 1),
                Duration::ZERO,
                &settings(),
                10
            )
            .await,
            Err(FeedError::Gone { .. })
        ));
    }
}
