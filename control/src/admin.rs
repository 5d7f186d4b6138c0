//! Offline admin commands on a stopped control's data directory (P12): rebuild projections by
//! replay, rotate the log epoch, inspect an aggregate's events, and measure append throughput.
//!
//! A running control holds the redb file's lock, so these refuse its data directory with
//! [`AdminError::StoreInUse`]; the online equivalents go through the API (docs/operations.md).

use std::path::Path;
use std::time::Instant;

use crate::api::views::LogEventView;
use crate::log::Event;
use crate::projection::VIEWS_PROJECTION;
use crate::projection::projector::replay;
use crate::server::STORE_FILE;
use crate::store::redb::RedbStore;
use crate::store::{Commit, NewEvent, Store, StoreError, random_log_epoch};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("data directory {0} holds no control store (expected {STORE_FILE} inside)")]
    NoStore(String),
    #[error(
        "store {path} is in use by another process, most likely a running outpost-control; stop it first, or use the online equivalent (docs/operations.md)"
    )]
    StoreInUse { path: String },
    #[error("replay failed: {0}")]
    Replay(String),
    #[error("master key rotation failed: {0}")]
    Secrets(String),
}

fn open_existing(data_dir: &Path) -> Result<RedbStore, AdminError> {
    let path = data_dir.join(STORE_FILE);
    if !path.exists() {
        return Err(AdminError::NoStore(data_dir.display().to_string()));
    }
    RedbStore::open(&path).map_err(|error| match error {
        StoreError::Locked { path, .. } => AdminError::StoreInUse { path },
        other => AdminError::Store(other),
    })
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub checkpoint: u64,
    pub nodes: usize,
    pub services: usize,
    pub allocations: usize,
}

/// Drops the projection snapshots and replays the whole log into fresh views.
pub fn rebuild_projections_in(store: &dyn Store) -> Result<RebuildReport, AdminError> {
    store.drop_projections()?;
    let views = replay(store).map_err(AdminError::Replay)?;
    store.save_projection(VIEWS_PROJECTION, views.to_snapshot())?;
    Ok(RebuildReport {
        checkpoint: views.checkpoint,
        nodes: views.nodes.len(),
        services: views.services.len(),
        allocations: views.allocations.len(),
    })
}

pub fn rebuild_projections(data_dir: &Path) -> Result<RebuildReport, AdminError> {
    rebuild_projections_in(&open_existing(data_dir)?)
}

/// Gives the log a new epoch: every consumer's cursor becomes gone (410) and it fetches a plan.
pub fn rotate_epoch(data_dir: &Path) -> Result<u64, AdminError> {
    let store = open_existing(data_dir)?;
    let current = store.log_position()?.log_epoch;
    let mut log_epoch = random_log_epoch();
    while log_epoch == current {
        log_epoch = random_log_epoch();
    }
    store.set_log_epoch(log_epoch)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    store.commit(Commit {
        events: vec![Event::LogEpochRotated { log_epoch }.to_new_event()],
        at_unix_ms: now,
        ..Commit::default()
    })?;
    Ok(log_epoch)
}

/// Re-wraps every secret data key and re-seals the CA key and credentials under a new master
/// key (`secret::rotate`); `key_file` is the master key file (`DATA_DIR/master.key` when
/// absent). The store is redb in `data_dir`, or the PostgreSQL `(url, schema)` given.
pub fn rotate_master_key(
    data_dir: &Path,
    key_file: Option<&Path>,
    database: Option<(String, String)>,
) -> Result<crate::secret::rotate::RotationReport, AdminError> {
    let store: Box<dyn Store> = match database {
        None => Box::new(open_existing(data_dir)?),
        #[cfg(feature = "postgres")]
        Some((url, schema)) => {
            Box::new(crate::store::postgres::PostgresStore::open(&url, &schema)?)
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => {
            return Err(AdminError::Secrets(
                "this outpost-control was built without the postgres feature".into(),
            ));
        }
    };
    let source = match key_file {
        Some(path) => crate::secret::MasterKeySource::File(path.to_path_buf()),
        None => crate::secret::MasterKeySource::default_file(data_dir),
    };
    crate::secret::rotate::rotate_master_key(store.as_ref(), &source)
        .map_err(|e| AdminError::Secrets(e.to_string()))
}

/// The events of one aggregate, e.g. `node/n1` or `service/web`.
pub fn aggregate_events(data_dir: &Path, aggregate: &str) -> Result<Vec<LogEventView>, AdminError> {
    let store = open_existing(data_dir)?;
    Ok(store
        .read_aggregate(aggregate)?
        .iter()
        .map(|event| LogEventView {
            event_id: event.event_id,
            aggregate: event.aggregate.clone(),
            seq: event.seq,
            schema_version: event.schema_version,
            kind: event.kind.clone(),
            at_unix: event.at_unix_ms / 1000,
            data: serde_json::from_slice(&event.data).unwrap_or(serde_json::Value::Null),
        })
        .collect())
}

/// Durable append throughput of the redb store.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub events: usize,
    pub single_events_per_sec: f64,
    pub batch_size: usize,
    pub batched_events_per_sec: f64,
}

fn bench_event(index: usize) -> NewEvent {
    NewEvent {
        aggregate: format!("bench/{}", index % 64),
        kind: "BenchEvent".into(),
        schema_version: 1,
        routing_keys: vec![format!("node:bench-{}", index % 16)],
        data: format!("{{\"index\":{index},\"payload\":\"{}\"}}", "x".repeat(96)).into_bytes(),
    }
}

/// Appends `events` events one per committed (fsynced) transaction, then again in batches.
pub fn bench_append(
    data_dir: &Path,
    events: usize,
    batch_size: usize,
) -> Result<BenchReport, AdminError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", data_dir.display())))?;
    let store = RedbStore::open(&data_dir.join("bench.redb"))?;
    bench_append_on(&store, events, batch_size)
}

/// The same measurement on PostgreSQL, in a fresh schema that is dropped afterwards.
#[cfg(feature = "postgres")]
pub fn bench_append_postgres(
    url: &str,
    events: usize,
    batch_size: usize,
) -> Result<BenchReport, AdminError> {
    let schema = format!("outpost_bench_{:016x}", rand::random::<u64>());
    let store = crate::store::postgres::PostgresStore::open(url, &schema)?;
    let report = bench_append_on(&store, events, batch_size);
    drop(store);
    if let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls) {
        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
    report
}

/// Appends `events` events one per committed transaction, then again in batches.
pub fn bench_append_on(
    store: &dyn Store,
    events: usize,
    batch_size: usize,
) -> Result<BenchReport, AdminError> {
    let started = Instant::now();
    for index in 0..events {
        store.commit(Commit {
            events: vec![bench_event(index)],
            at_unix_ms: 1,
            ..Commit::default()
        })?;
    }
    let single = events as f64 / started.elapsed().as_secs_f64();
    let batch_size = batch_size.max(1);
    let started = Instant::now();
    let mut index = 0;
    while index < events {
        let end = (index + batch_size).min(events);
        store.commit(Commit {
            events: (index..end).map(bench_event).collect(),
            at_unix_ms: 1,
            ..Commit::default()
        })?;
        index = end;
    }
    let batched = events as f64 / started.elapsed().as_secs_f64();
    Ok(BenchReport {
        events,
        single_events_per_sec: single,
        batch_size,
        batched_events_per_sec: batched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_held_by_a_running_control_is_refused_naming_it() {
        let data_dir = tempfile::tempdir().unwrap();
        let path = data_dir.path().join(STORE_FILE);
        // What a running control holds for as long as it serves.
        let running = RedbStore::open(&path).unwrap();
        let refusals = [
            rebuild_projections(data_dir.path()).map(|_| ()),
            rotate_epoch(data_dir.path()).map(|_| ()),
            aggregate_events(data_dir.path(), "cluster").map(|_| ()),
        ];
        for refusal in refusals {
            let error = refusal.unwrap_err();
            assert!(matches!(error, AdminError::StoreInUse { .. }), "{error:?}");
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("running outpost-control"), "{message}");
        }
        drop(running);
        // Stopped, the same commands work.
        assert!(rebuild_projections(data_dir.path()).is_ok());
        assert!(aggregate_events(data_dir.path(), "cluster").is_ok());
    }
}
