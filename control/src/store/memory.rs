//! In-memory store: the same contract as redb, held in maps behind one mutex. For tests and
//! for benchmarks of the logic without disk; it stands in for the durable store and loses
//! everything when dropped.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use outpost_proto::cursor::LogPosition;

use super::{
    Commit, CommitOutcome, Durability, Sharing, Store, StoreError, StoredEvent, TableWrite,
    check_expected_head, decode_idempotency, encode_idempotency, random_log_epoch,
};

#[derive(Default)]
struct Tables {
    log_epoch: u64,
    log: BTreeMap<u64, StoredEvent>,
    aggregate_seq: BTreeMap<String, u64>,
    aggregate_index: BTreeMap<(String, u64), u64>,
    routing_index: BTreeMap<(String, u64), ()>,
    idempotency: BTreeMap<String, Vec<u8>>,
    config: BTreeMap<String, Vec<u8>>,
    volatile: BTreeMap<String, Vec<u8>>,
    projections: BTreeMap<String, Vec<u8>>,
}

pub struct MemoryStore {
    tables: Mutex<Tables>,
    sharing: Sharing,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_sharing(Sharing::ThisProcessOnly)
    }

    /// A store that tests share between several control cores, as replicas share PostgreSQL.
    pub fn with_sharing(sharing: Sharing) -> Self {
        Self {
            tables: Mutex::new(Tables {
                log_epoch: random_log_epoch(),
                ..Tables::default()
            }),
            sharing,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave half a commit: commits build their
        // changes first and apply them without fallible steps.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn apply_writes(table: &mut BTreeMap<String, Vec<u8>>, writes: Vec<TableWrite>) {
    for write in writes {
        match write {
            TableWrite::Put { key, value } => {
                table.insert(key, value);
            }
            TableWrite::Delete { key } => {
                table.remove(&key);
            }
        }
    }
}

impl Tables {
    /// Whether a commit's idempotency key is known: stored, or taken earlier in this batch.
    fn duplicate(&self, commit: &Commit) -> Result<Option<CommitOutcome>, StoreError> {
        match &commit.idempotency {
            Some(record) => self
                .idempotency
                .get(&record.key)
                .map(|bytes| decode_idempotency(&record.key, bytes))
                .transpose(),
            None => Ok(None),
        }
    }

    fn append(&mut self, commit: Commit) -> Result<CommitOutcome, StoreError> {
        if let Some(duplicate) = self.duplicate(&commit)? {
            return Ok(duplicate);
        }
        let mut next_id = self.log.last_key_value().map_or(1, |(id, _)| id + 1);
        let mut stored = Vec::with_capacity(commit.events.len());
        for new in commit.events {
            let seq = self.aggregate_seq.get(&new.aggregate).copied().unwrap_or(0) + 1;
            let aggregate = new.aggregate.clone();
            let event = new.into_stored(next_id, seq, commit.at_unix_ms);
            self.aggregate_seq.insert(aggregate.clone(), seq);
            self.aggregate_index.insert((aggregate, seq), next_id);
            for key in &event.routing_keys {
                self.routing_index.insert((key.clone(), next_id), ());
            }
            self.log.insert(next_id, event.clone());
            stored.push(event);
            next_id += 1;
        }
        if let Some(record) = commit.idempotency {
            let last_event_id = stored
                .last()
                .map_or(next_id - 1, |e: &StoredEvent| e.event_id);
            self.idempotency.insert(
                record.key,
                encode_idempotency(last_event_id, &record.answer),
            );
        }
        apply_writes(&mut self.config, commit.config_writes);
        Ok(CommitOutcome::Appended(stored))
    }
}

impl Store for MemoryStore {
    fn point_reads_in_place(&self) -> bool {
        true
    }

    fn commit_batch(&self, batch: Vec<Commit>) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut tables = self.lock();
        // Check every expected head before writing anything: a conflict writes nothing.
        let mut head = tables.log.last_key_value().map_or(0, |(id, _)| *id);
        let mut batch_keys = std::collections::BTreeSet::new();
        for commit in &batch {
            let known = commit.idempotency.as_ref().is_some_and(|record| {
                batch_keys.contains(&record.key) || tables.idempotency.contains_key(&record.key)
            });
            if known {
                continue;
            }
            check_expected_head(commit.expected_head, head)?;
            if let Some(record) = &commit.idempotency {
                batch_keys.insert(record.key.clone());
            }
            head += commit.events.len() as u64;
        }
        batch
            .into_iter()
            .map(|commit| tables.append(commit))
            .collect()
    }

    fn read_idempotency(&self, key: &str) -> Result<Option<CommitOutcome>, StoreError> {
        self.lock()
            .idempotency
            .get(key)
            .map(|bytes| decode_idempotency(key, bytes))
            .transpose()
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let tables = self.lock();
        Ok(tables
            .log
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn read_routed(
        &self,
        routing_key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let tables = self.lock();
        let start = (routing_key.to_string(), after.saturating_add(1));
        let end = (routing_key.to_string(), u64::MAX);
        Ok(tables
            .routing_index
            .range(start..=end)
            .take(limit)
            .filter_map(|((_, id), ())| tables.log.get(id).cloned())
            .collect())
    }

    fn read_aggregate(&self, aggregate: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let tables = self.lock();
        let start = (aggregate.to_string(), 0);
        let end = (aggregate.to_string(), u64::MAX);
        Ok(tables
            .aggregate_index
            .range(start..=end)
            .filter_map(|(_, id)| tables.log.get(id).cloned())
            .collect())
    }

    fn log_position(&self) -> Result<LogPosition, StoreError> {
        let tables = self.lock();
        let head = tables.log.last_key_value().map_or(0, |(id, _)| *id);
        let floor = tables.log.first_key_value().map_or(head + 1, |(id, _)| *id);
        Ok(LogPosition {
            log_epoch: tables.log_epoch,
            floor,
            head,
        })
    }

    fn set_log_epoch(&self, log_epoch: u64) -> Result<(), StoreError> {
        self.lock().log_epoch = log_epoch;
        Ok(())
    }

    fn get_config(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().config.get(key).cloned())
    }

    fn scan_config(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(scan(&self.lock().config, prefix))
    }

    fn get_volatile(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().volatile.get(key).cloned())
    }

    fn put_volatile(
        &self,
        writes: Vec<TableWrite>,
        _durability: Durability,
    ) -> Result<(), StoreError> {
        apply_writes(&mut self.lock().volatile, writes);
        Ok(())
    }

    fn scan_volatile(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(scan(&self.lock().volatile, prefix))
    }

    fn save_projection(&self, name: &str, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.lock().projections.insert(name.to_string(), snapshot);
        Ok(())
    }

    fn load_projection(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().projections.get(name).cloned())
    }

    fn drop_projections(&self) -> Result<(), StoreError> {
        self.lock().projections.clear();
        Ok(())
    }

    fn shared(&self) -> Sharing {
        self.sharing
    }
}

/// Entries of `table` whose key starts with `prefix`, in key order.
fn scan(table: &BTreeMap<String, Vec<u8>>, prefix: &str) -> Vec<(String, Vec<u8>)> {
    table
        .range(prefix.to_string()..)
        .take_while(|(key, _)| key.starts_with(prefix))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}
