//! The default store: one redb file. Each batch of commands (group commit) is one durable write
//! transaction that appends every command's events, their aggregate and routing index entries,
//! idempotency keys and config writes together, with one fsync.

use std::path::{Path, PathBuf};

use outpost_proto::cursor::LogPosition;
use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableError, WriteTransaction,
};

use super::{
    Commit, CommitOutcome, Durability, STORE_SCHEMA_VERSION, Store, StoreError, StoredEvent,
    TableWrite, check_expected_head, decode_idempotency, encode_idempotency, random_log_epoch,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const AGGREGATE_SEQ: TableDefinition<&str, u64> = TableDefinition::new("aggregate_seq");
const AGGREGATE_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("aggregate_index");
const ROUTING_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("routing_index");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
const VOLATILE: TableDefinition<&str, &[u8]> = TableDefinition::new("volatile");
const PROJECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("projections");

const META_LOG_EPOCH: &str = "log_epoch";
const META_SCHEMA: &str = "store_schema_version";

pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl RedbStore {
    /// Opens or creates the store file, initialising its layout and log epoch on first use.
    /// Rewrites the file compactly, so pages freed by earlier commits (which may still hold
    /// what those commits replaced) are dropped from it where redb can.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        self.db.compact().map_err(backend)
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.display().to_string(),
                reason: error.to_string(),
            },
            other => StoreError::Backend(format!("cannot open store {}: {other}", path.display())),
        })?;
        let store = Self {
            db,
            path: path.to_path_buf(),
        };
        store.init_layout()?;
        Ok(store)
    }

    fn init_layout(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let schema = meta.get(META_SCHEMA).map_err(backend)?.map(|g| g.value());
            match schema {
                Some(found) if found > STORE_SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema {
                        path: self.path.display().to_string(),
                        found,
                        known: STORE_SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(META_SCHEMA, STORE_SCHEMA_VERSION)
                        .map_err(backend)?;
                }
            }
            if meta.get(META_LOG_EPOCH).map_err(backend)?.is_none() {
                meta.insert(META_LOG_EPOCH, random_log_epoch())
                    .map_err(backend)?;
            }
            // Create every table so readers never meet a missing one.
            txn.open_table(LOG).map_err(backend)?;
            txn.open_table(AGGREGATE_SEQ).map_err(backend)?;
            txn.open_table(AGGREGATE_INDEX).map_err(backend)?;
            txn.open_table(ROUTING_INDEX).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.open_table(CONFIG).map_err(backend)?;
            txn.open_table(VOLATILE).map_err(backend)?;
            txn.open_table(PROJECTIONS).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn begin_write(&self, durability: Durability) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        let level = match durability {
            Durability::Durable => redb::Durability::Immediate,
            Durability::Relaxed => redb::Durability::None,
        };
        txn.set_durability(level).map_err(backend)?;
        Ok(txn)
    }

    fn get_bytes(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = match txn.open_table(table) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(backend(error)),
        };
        Ok(table.get(key).map_err(backend)?.map(|g| g.value().to_vec()))
    }

    /// Entries of `table` whose key starts with `prefix`, in key order.
    fn scan_bytes(
        &self,
        table: TableDefinition<&str, &[u8]>,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = match txn.open_table(table) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(backend(error)),
        };
        let mut entries = Vec::new();
        for item in table.range(prefix..).map_err(backend)? {
            let (key, value) = item.map_err(backend)?;
            if !key.value().starts_with(prefix) {
                break;
            }
            entries.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(entries)
    }

    fn put_bytes(
        &self,
        table: TableDefinition<&str, &[u8]>,
        writes: Vec<TableWrite>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write(durability)?;
        {
            let mut table = txn.open_table(table).map_err(backend)?;
            apply_writes(&mut table, writes)?;
        }
        txn.commit().map_err(backend)
    }
}

fn apply_writes(
    table: &mut redb::Table<&str, &[u8]>,
    writes: Vec<TableWrite>,
) -> Result<(), StoreError> {
    for write in writes {
        match write {
            TableWrite::Put { key, value } => {
                table
                    .insert(key.as_str(), value.as_slice())
                    .map_err(backend)?;
            }
            TableWrite::Delete { key } => {
                table.remove(key.as_str()).map_err(backend)?;
            }
        }
    }
    Ok(())
}

fn encode_event(event: &StoredEvent) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(event).map_err(backend)
}

fn decode_event(id: u64, bytes: &[u8]) -> Result<StoredEvent, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        what: format!("log event {id}"),
        reason: error.to_string(),
    })
}

/// The tables one batch writes, opened once per transaction.
struct AppendTables<'txn> {
    idempotency: redb::Table<'txn, &'static str, &'static [u8]>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    aggregate_seq: redb::Table<'txn, &'static str, u64>,
    aggregate_index: redb::Table<'txn, (&'static str, u64), u64>,
    routing_index: redb::Table<'txn, (&'static str, u64), u64>,
    config: redb::Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> AppendTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            idempotency: txn.open_table(IDEMPOTENCY).map_err(backend)?,
            log: txn.open_table(LOG).map_err(backend)?,
            aggregate_seq: txn.open_table(AGGREGATE_SEQ).map_err(backend)?,
            aggregate_index: txn.open_table(AGGREGATE_INDEX).map_err(backend)?,
            routing_index: txn.open_table(ROUTING_INDEX).map_err(backend)?,
            config: txn.open_table(CONFIG).map_err(backend)?,
        })
    }

    /// Appends one commit of a batch at `next_id`; returns its outcome and the next free id.
    fn append(
        &mut self,
        commit: Commit,
        mut next_id: u64,
    ) -> Result<(CommitOutcome, u64), StoreError> {
        if let Some(record) = &commit.idempotency
            && let Some(bytes) = self.idempotency.get(record.key.as_str()).map_err(backend)?
        {
            return Ok((decode_idempotency(&record.key, bytes.value())?, next_id));
        }
        check_expected_head(commit.expected_head, next_id - 1)?;
        let mut stored = Vec::with_capacity(commit.events.len());
        for new in commit.events {
            let seq = self
                .aggregate_seq
                .get(new.aggregate.as_str())
                .map_err(backend)?
                .map_or(0, |g| g.value())
                + 1;
            let event = new.into_stored(next_id, seq, commit.at_unix_ms);
            self.log
                .insert(next_id, encode_event(&event)?.as_slice())
                .map_err(backend)?;
            self.aggregate_seq
                .insert(event.aggregate.as_str(), seq)
                .map_err(backend)?;
            self.aggregate_index
                .insert((event.aggregate.as_str(), seq), next_id)
                .map_err(backend)?;
            for key in &event.routing_keys {
                self.routing_index
                    .insert((key.as_str(), next_id), next_id)
                    .map_err(backend)?;
            }
            stored.push(event);
            next_id += 1;
        }
        if let Some(record) = &commit.idempotency {
            let last_event_id = stored
                .last()
                .map_or(next_id - 1, |e: &StoredEvent| e.event_id);
            let bytes = encode_idempotency(last_event_id, &record.answer);
            self.idempotency
                .insert(record.key.as_str(), bytes.as_slice())
                .map_err(backend)?;
        }
        apply_writes(&mut self.config, commit.config_writes)?;
        Ok((CommitOutcome::Appended(stored), next_id))
    }
}

impl Store for RedbStore {
    fn point_reads_in_place(&self) -> bool {
        true
    }

    fn commit_batch(&self, batch: Vec<Commit>) -> Result<Vec<CommitOutcome>, StoreError> {
        let txn = self.begin_write(Durability::Durable)?;
        let outcomes = {
            let mut tables = AppendTables::open(&txn)?;
            let mut next_id = tables
                .log
                .last()
                .map_err(backend)?
                .map_or(1, |(id, _)| id.value() + 1);
            let mut outcomes = Vec::with_capacity(batch.len());
            for commit in batch {
                let (outcome, next) = tables.append(commit, next_id)?;
                next_id = next;
                outcomes.push(outcome);
            }
            outcomes
        };
        // Returning early above drops the transaction: nothing of the batch is written.
        txn.commit().map_err(backend)?;
        Ok(outcomes)
    }

    fn read_idempotency(&self, key: &str) -> Result<Option<CommitOutcome>, StoreError> {
        self.get_bytes(IDEMPOTENCY, key)?
            .map(|bytes| decode_idempotency(key, &bytes))
            .transpose()
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let log = txn.open_table(LOG).map_err(backend)?;
        let mut events = Vec::new();
        for item in log
            .range(after.saturating_add(1)..)
            .map_err(backend)?
            .take(limit)
        {
            let (id, bytes) = item.map_err(backend)?;
            events.push(decode_event(id.value(), bytes.value())?);
        }
        Ok(events)
    }

    fn read_routed(
        &self,
        routing_key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let index = txn.open_table(ROUTING_INDEX).map_err(backend)?;
        let log = txn.open_table(LOG).map_err(backend)?;
        let mut events = Vec::new();
        let range = (routing_key, after.saturating_add(1))..=(routing_key, u64::MAX);
        for item in index.range(range).map_err(backend)?.take(limit) {
            let (_, id) = item.map_err(backend)?;
            let id = id.value();
            let bytes = log
                .get(id)
                .map_err(backend)?
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("routing index of {routing_key}"),
                    reason: format!("names event {id}, which the log does not hold"),
                })?;
            events.push(decode_event(id, bytes.value())?);
        }
        Ok(events)
    }

    fn read_aggregate(&self, aggregate: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let index = txn.open_table(AGGREGATE_INDEX).map_err(backend)?;
        let log = txn.open_table(LOG).map_err(backend)?;
        let mut events = Vec::new();
        for item in index
            .range((aggregate, 0)..=(aggregate, u64::MAX))
            .map_err(backend)?
        {
            let (_, id) = item.map_err(backend)?;
            let id = id.value();
            let bytes = log
                .get(id)
                .map_err(backend)?
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("aggregate index of {aggregate}"),
                    reason: format!("names event {id}, which the log does not hold"),
                })?;
            events.push(decode_event(id, bytes.value())?);
        }
        Ok(events)
    }

    fn log_position(&self) -> Result<LogPosition, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let log_epoch = meta
            .get(META_LOG_EPOCH)
            .map_err(backend)?
            .map_or(0, |g| g.value());
        let log = txn.open_table(LOG).map_err(backend)?;
        let head = log.last().map_err(backend)?.map_or(0, |(id, _)| id.value());
        let floor = log
            .first()
            .map_err(backend)?
            .map_or(head + 1, |(id, _)| id.value());
        Ok(LogPosition {
            log_epoch,
            floor,
            head,
        })
    }

    fn set_log_epoch(&self, log_epoch: u64) -> Result<(), StoreError> {
        let txn = self.begin_write(Durability::Durable)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(META_LOG_EPOCH, log_epoch).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn get_config(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_bytes(CONFIG, key)
    }

    fn scan_config(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_bytes(CONFIG, prefix)
    }

    fn get_volatile(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_bytes(VOLATILE, key)
    }

    fn put_volatile(
        &self,
        writes: Vec<TableWrite>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.put_bytes(VOLATILE, writes, durability)
    }

    fn scan_volatile(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_bytes(VOLATILE, prefix)
    }

    fn save_projection(&self, name: &str, snapshot: Vec<u8>) -> Result<(), StoreError> {
        let write = TableWrite::Put {
            key: name.to_string(),
            value: snapshot,
        };
        self.put_bytes(PROJECTIONS, vec![write], Durability::Durable)
    }

    fn load_projection(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_bytes(PROJECTIONS, name)
    }

    fn drop_projections(&self) -> Result<(), StoreError> {
        let txn = self.begin_write(Durability::Durable)?;
        txn.delete_table(PROJECTIONS).map_err(backend)?;
        txn.open_table(PROJECTIONS).map_err(backend)?;
        txn.commit().map_err(backend)
    }
}
