//! The edge feed (E1, P8): an org's route events by cursor (routing key `edge:ORG`), each answer
//! ending in a bookmark, plus the backend table whenever its digest differs from the one the edge
//! holds. Backends are reported state, not log events, so the long-poll also looks at them once
//! a second while it waits.

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::Name;
use outpost_proto::route::{BackendTable, EdgeBatch, EdgeChange, EdgeFeedEvent, EdgeTlsTable};

use super::{FeedError, FeedHub, check, read_range};
use crate::log::Event;
use crate::route::edge_routing_key;
use crate::store::{Store, StoredEvent};

/// How often a waiting edge long-poll looks at the backends.
pub const BACKENDS_POLL: Duration = Duration::from_secs(1);

/// Maps one log event to an edge change, if it is one.
pub fn to_edge_change(stored: &StoredEvent) -> Option<EdgeFeedEvent> {
    let change = match Event::from_stored(stored).ok()? {
        Event::RouteDefined { spec, .. } => EdgeChange::RouteUpserted(spec),
        Event::RouteDeleted { name, .. } => EdgeChange::RouteRemoved {
            name: Name::try_from(name.as_str()).ok()?,
        },
        _ => return None,
    };
    Some(EdgeFeedEvent {
        event_id: stored.event_id,
        aggregate: stored.aggregate.clone(),
        seq: stored.seq,
        change,
    })
}

/// The edge long-poll: answers when a route of the org changed past the cursor, when the
/// backends differ from `backends_digest`, when `tls` gives a TLS table (it does when the one the
/// edge holds is stale), or when `wait` ends.
#[allow(clippy::too_many_arguments)]
pub async fn edge_changes<F, Fut, T, TFut>(
    hub: &FeedHub,
    store: &Arc<dyn Store>,
    org: &str,
    cursor: Cursor,
    backends_digest: Option<&str>,
    wait: Duration,
    limit: usize,
    backends: F,
    tls: T,
) -> Result<EdgeBatch, FeedError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<BackendTable, FeedError>>,
    T: Fn() -> TFut,
    TFut: std::future::Future<Output = Result<Option<EdgeTlsTable>, FeedError>>,
{
    let key = edge_routing_key(org);
    let deadline = tokio::time::Instant::now() + wait;
    let mut after = check(cursor, hub.position())?;
    let watch = hub.waiters.watch(&key);
    loop {
        let woken = watch.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let position = hub.position();
        check(Cursor::new(cursor.log_epoch, after), position)?;
        let (events, covered) =
            read_range(hub, store, Some(&key), after, position.head, limit).await?;
        let changes: Vec<EdgeFeedEvent> = events.iter().filter_map(|e| to_edge_change(e)).collect();
        let table = backends().await?;
        let changed_backends = (backends_digest != Some(table.digest.as_str())).then_some(table);
        let changed_tls = tls().await?;
        let bookmark = Cursor::new(position.log_epoch, covered);
        if !changes.is_empty()
            || changed_backends.is_some()
            || changed_tls.is_some()
            || tokio::time::Instant::now() >= deadline
        {
            return Ok(EdgeBatch {
                events: changes,
                backends: changed_backends,
                tls: changed_tls,
                bookmark,
            });
        }
        after = covered;
        if covered < position.head {
            continue;
        }
        let tick = (tokio::time::Instant::now() + BACKENDS_POLL).min(deadline);
        let _ = tokio::time::timeout_at(tick, woken).await;
    }
}
