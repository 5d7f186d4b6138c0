//! Change distribution (P8): one shared in-memory tail of recent events for fan-out, the
//! per-node filtered long-poll that maps log events to `NodeChange`s and ends every answer with
//! a bookmark, and the unfiltered admin feed.
//!
//! Fan-out costs what it touches: the tail indexes its events by routing key, and long-polls
//! wait in a [`WaiterIndex`] keyed by routing key, so a change wakes only the polls of the
//! nodes it routes to, and a woken poll reads its own events by id. Nothing scans the shared
//! tail once per waiter. A poll whose cursor is behind the tail reads the store's routing
//! index. Each waiter waits on its own key, so a slow consumer never blocks another.

pub mod edge;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::cursor::{CursorCheck, GoneReason, LogPosition, check_cursor};
use outpost_proto::feed::{ChangeBatch, FeedEvent, NodeChange};
use outpost_proto::name::Name;
use outpost_proto::plan::Allocation;
use tokio::sync::{Notify, watch};

use crate::log::{Event, node_routing_key};
use crate::store::{Store, StoreError, StoredEvent};

/// Events kept in the in-memory tail.
pub const TAIL_EVENTS: usize = 16384;

/// The recent events in id order, with the ids of each routing key's events.
struct Tail {
    events: VecDeque<Arc<StoredEvent>>,
    by_routing_key: HashMap<String, VecDeque<u64>>,
    capacity: usize,
}

impl Tail {
    fn push(&mut self, event: Arc<StoredEvent>) {
        if self.events.len() == self.capacity
            && let Some(evicted) = self.events.pop_front()
        {
            for key in &evicted.routing_keys {
                if let Some(ids) = self.by_routing_key.get_mut(key) {
                    ids.pop_front();
                    if ids.is_empty() {
                        self.by_routing_key.remove(key);
                    }
                }
            }
        }
        for key in &event.routing_keys {
            self.by_routing_key
                .entry(key.clone())
                .or_default()
                .push_back(event.event_id);
        }
        self.events.push_back(event);
    }

    fn get(&self, event_id: u64) -> Option<&Arc<StoredEvent>> {
        let index = self
            .events
            .binary_search_by_key(&event_id, |e| e.event_id)
            .ok()?;
        self.events.get(index)
    }
}

/// Long-polls waiting for changes, indexed by the routing key they wait on.
#[derive(Default)]
pub struct WaiterIndex {
    keys: Mutex<HashMap<String, Arc<Notify>>>,
}

/// One long-poll's place in the [`WaiterIndex`]; leaving it drops the key's entry when no
/// other poll waits on it.
pub struct KeyWatch<'a> {
    index: &'a WaiterIndex,
    key: String,
    notify: Arc<Notify>,
}

impl KeyWatch<'_> {
    /// A wake-up to wait for; enable it before reading, so no change between read and wait
    /// is missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for KeyWatch<'_> {
    fn drop(&mut self) {
        let mut keys = self.index.lock();
        // The map and this watch hold the last two references: no other poll waits here.
        if Arc::strong_count(&self.notify) == 2 {
            keys.remove(&self.key);
        }
    }
}

impl WaiterIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a poll waiting on `routing_key`.
    pub fn watch(&self, routing_key: &str) -> KeyWatch<'_> {
        let notify = Arc::clone(self.lock().entry(routing_key.to_string()).or_default());
        KeyWatch {
            index: self,
            key: routing_key.to_string(),
            notify,
        }
    }

    /// Wakes the polls waiting on any of the events' routing keys; returns the keys woken.
    pub fn wake<'e>(&self, events: impl IntoIterator<Item = &'e StoredEvent>) -> Vec<String> {
        let keys = self.lock();
        let mut woken = Vec::new();
        for event in events {
            for key in &event.routing_keys {
                if let Some(notify) = keys.get(key) {
                    notify.notify_waiters();
                    woken.push(key.clone());
                }
            }
        }
        woken.sort();
        woken.dedup();
        woken
    }

    /// Wakes every poll (a new epoch concerns everyone).
    pub fn wake_all(&self) {
        for notify in self.lock().values() {
            notify.notify_waiters();
        }
    }

    /// How many routing keys have a waiting poll.
    pub fn waiting_keys(&self) -> usize {
        self.lock().len()
    }
}

/// The shared tail of the log and its position.
pub struct FeedHub {
    tail: RwLock<Tail>,
    position: Mutex<LogPosition>,
    head: watch::Sender<u64>,
    /// Node long-polls by routing key.
    pub waiters: WaiterIndex,
    /// Commit → answer latency of long-polls that waited for their events.
    pub fanout: crate::metrics::LatencyHistogram,
}

impl FeedHub {
    pub fn new(position: LogPosition, capacity: usize) -> Self {
        Self {
            tail: RwLock::new(Tail {
                events: VecDeque::with_capacity(capacity.min(TAIL_EVENTS)),
                by_routing_key: HashMap::new(),
                capacity: capacity.max(1),
            }),
            position: Mutex::new(position),
            head: watch::channel(position.head).0,
            waiters: WaiterIndex::default(),
            fanout: Default::default(),
        }
    }

    pub fn position(&self) -> LogPosition {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that changes whenever the head moves or the epoch changes (the projector
    /// and the admin feed follow every event).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Adds freshly committed events (in id order) and wakes the polls they route to.
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
                tail.push(Arc::new(event.clone()));
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
        self.waiters.wake(events);
    }

    /// A new log epoch: every waiter wakes and sees its cursor gone.
    pub fn set_epoch(&self, log_epoch: u64) {
        self.position
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log_epoch = log_epoch;
        self.head.send_modify(|_| {});
        self.waiters.wake_all();
    }

    /// Events in `(after, head]` from the tail, filtered by routing key through the tail's
    /// index; `None` when the tail no longer holds event `after + 1`.
    fn read_tail(
        &self,
        routing_key: Option<&str>,
        after: u64,
        head: u64,
        limit: usize,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        let tail = self.tail.read().unwrap_or_else(|p| p.into_inner());
        let covered = match tail.events.front() {
            Some(front) => front.event_id <= after.saturating_add(1),
            None => after >= head,
        };
        if !covered {
            return None;
        }
        let wanted = |id: &u64| *id > after && *id <= head;
        Some(match routing_key {
            Some(key) => match tail.by_routing_key.get(key) {
                Some(ids) => {
                    let start = ids.partition_point(|id| *id <= after);
                    ids.range(start..)
                        .take_while(|id| wanted(id))
                        .take(limit)
                        .filter_map(|id| tail.get(*id).cloned())
                        .collect()
                }
                None => Vec::new(),
            },
            None => {
                let start = tail.events.partition_point(|e| e.event_id <= after);
                tail.events
                    .range(start..)
                    .take_while(|e| wanted(&e.event_id))
                    .take(limit)
                    .cloned()
                    .collect()
            }
        })
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("feed read task failed: {0}")]
    Task(String),
}

/// Reads events in `(after, head]` for a routing key (or all), from the tail or the store.
/// Returns the events and how far the read covered.
pub(crate) async fn read_range(
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

pub(crate) fn check(cursor: Cursor, position: LogPosition) -> Result<u64, FeedError> {
    match check_cursor(cursor, position) {
        CursorCheck::Serve { after } => Ok(after),
        CursorCheck::Gone(reason) => Err(FeedError::Gone { reason, position }),
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
    let watch = hub.waiters.watch(&key);
    let mut waited = false;
    loop {
        let woken = watch.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
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
            if waited && let Some(newest) = events.iter().map(|e| e.at_unix_ms).max() {
                hub.fanout
                    .observe_ms(crate::metrics::unix_ms_now().saturating_sub(newest));
            }
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
        // Woken by a change routed to this node, or at the deadline: either way read once
        // more, so the bookmark covers what was published meanwhile.
        let _ = tokio::time::timeout_at(deadline, woken).await;
        waited = true;
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

    fn routed_event(event_id: u64, nodes: &[u8]) -> StoredEvent {
        StoredEvent {
            event_id,
            aggregate: format!("test/{event_id}"),
            seq: 1,
            kind: "TestEvent".into(),
            schema_version: 1,
            at_unix_ms: 0,
            routing_keys: nodes
                .iter()
                .map(|n| node_routing_key(&format!("n{n}")))
                .collect(),
            data: b"{}".to_vec(),
        }
    }

    proptest! {
        /// A published change wakes exactly the polls of the nodes it routes to, and the tail's
        /// index gives each node exactly its own events.
        #[test]
        fn the_waiter_index_wakes_exactly_the_nodes_a_change_routes_to(
            waiting in proptest::collection::btree_set(0u8..24, 0..24),
            changes in proptest::collection::vec(proptest::collection::btree_set(0u8..24, 0..6), 1..8),
        ) {
            let hub = FeedHub::new(LogPosition { log_epoch: 1, floor: 1, head: 0 }, 64);
            let watches: Vec<(u8, KeyWatch<'_>)> = waiting
                .iter()
                .map(|n| (*n, hub.waiters.watch(&node_routing_key(&format!("n{n}")))))
                .collect();
            let mut futures: Vec<_> = watches
                .iter()
                .map(|(n, watch)| {
                    let mut notified = Box::pin(watch.notified());
                    notified.as_mut().enable();
                    (*n, notified)
                })
                .collect();
            let events: Vec<StoredEvent> = changes
                .iter()
                .enumerate()
                .map(|(index, nodes)| {
                    routed_event(index as u64 + 1, &nodes.iter().copied().collect::<Vec<_>>())
                })
                .collect();
            hub.publish(&events);
            let routed: std::collections::BTreeSet<u8> = changes.iter().flatten().copied().collect();
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            for (node, future) in &mut futures {
                let woken = future.as_mut().poll(&mut context).is_ready();
                prop_assert_eq!(woken, routed.contains(node), "node n{}", node);
            }
            for node in 0u8..24 {
                let key = node_routing_key(&format!("n{node}"));
                let read = hub.read_tail(Some(&key), 0, events.len() as u64, 100).unwrap();
                let expected: Vec<u64> = changes
                    .iter()
                    .enumerate()
                    .filter(|(_, nodes)| nodes.contains(&node))
                    .map(|(index, _)| index as u64 + 1)
                    .collect();
                prop_assert_eq!(read.iter().map(|e| e.event_id).collect::<Vec<_>>(), expected);
            }
            drop(futures);
            drop(watches);
            prop_assert_eq!(hub.waiters.waiting_keys(), 0, "finished polls leave the index");
        }
    }

    #[test]
    fn the_tail_index_forgets_evicted_events() {
        let hub = FeedHub::new(
            LogPosition {
                log_epoch: 1,
                floor: 1,
                head: 0,
            },
            2,
        );
        hub.publish(&[
            routed_event(1, &[1]),
            routed_event(2, &[2]),
            routed_event(3, &[1]),
        ]);
        let tail = hub.tail.read().unwrap();
        assert_eq!(tail.events.len(), 2);
        assert_eq!(
            tail.by_routing_key.get("node:n1").map(|ids| ids.len()),
            Some(1)
        );
        assert_eq!(
            tail.by_routing_key.get("node:n2").map(|ids| ids.len()),
            Some(1)
        );
        drop(tail);
        assert!(
            hub.read_tail(Some("node:n1"), 0, 3, 10).is_none(),
            "event 1 left the tail"
        );
        assert_eq!(hub.read_tail(Some("node:n1"), 1, 3, 10).unwrap().len(), 1);
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
            Err(FeedError::Gone {
                reason: GoneReason::PastHead { event_id: 9, .. },
                ..
            })
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
