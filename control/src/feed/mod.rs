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
