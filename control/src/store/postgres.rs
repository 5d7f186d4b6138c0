//! The PostgreSQL store (P13, cargo feature `postgres`): the same contract as redb, in a
//! schema of one database. Each batch of commands (group commit) is one transaction that takes
//! an advisory lock, so event ids stay contiguous and per-aggregate sequences gap-free even with
//! several writers.
//!
//! Several control replicas may share a schema: it reports [`Sharing::SeveralWriters`], so the
//! core puts the expected log head on every commit (refused with a conflict when another
//! replica appended first) and polls the head for other replicas' appends. The synchronous
//! client blocks; call it from blocking threads (the core does), never from async tasks.

use std::sync::{Mutex, MutexGuard};

use outpost_proto::cursor::LogPosition;
use postgres::{Client, NoTls, Transaction};

use super::{
    Commit, CommitOutcome, Durability, STORE_SCHEMA_VERSION, Sharing, Store, StoreError,
    StoredEvent, TableWrite, check_expected_head, random_log_epoch,
};

/// Advisory lock key taken by every append ("outpost" in ASCII).
const APPEND_LOCK: i64 = 0x006f_7574_706f_7374;

pub struct PostgresStore {
    client: Mutex<Client>,
    schema: String,
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// Ids and sequences are u64 in the log and BIGINT in PostgreSQL.
fn to_sql(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Backend(format!("value {value} does not fit a BIGINT")))
}

fn from_sql(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what: what.to_string(),
        reason: format!("negative value {value}"),
    })
}

fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.as_bytes()[0].is_ascii_lowercase()
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "invalid schema name {schema:?}: use a-z, 0-9 and '_', starting with a letter"
        )))
    }
}

impl PostgresStore {
    /// Connects to `url` and creates the store's tables in `schema` if missing.
    pub fn open(url: &str, schema: &str) -> Result<Self, StoreError> {
        check_schema_name(schema)?;
        let mut client = Client::connect(url, NoTls).map_err(|error| {
            StoreError::Backend(format!("cannot connect to postgresql: {error}"))
        })?;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SET search_path TO {schema};
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS log (
                 event_id BIGINT PRIMARY KEY, aggregate TEXT NOT NULL, seq BIGINT NOT NULL,
                 kind TEXT NOT NULL, schema_version INTEGER NOT NULL, at_unix_ms BIGINT NOT NULL,
                 routing_keys TEXT[] NOT NULL, data BYTEA NOT NULL, UNIQUE (aggregate, seq));
             CREATE TABLE IF NOT EXISTS routing (
                 routing_key TEXT NOT NULL, event_id BIGINT NOT NULL, PRIMARY KEY (routing_key, event_id));
             CREATE TABLE IF NOT EXISTS idempotency (
                 key TEXT PRIMARY KEY, last_event_id BIGINT NOT NULL, answer BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS volatile (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS projections (name TEXT PRIMARY KEY, snapshot BYTEA NOT NULL);"
        );
        client.batch_execute(&ddl).map_err(backend)?;
        let store = Self {
            client: Mutex::new(client),
            schema: schema.to_string(),
        };
        store.init_meta()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Client> {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn init_meta(&self) -> Result<(), StoreError> {
        let mut client = self.lock();
        let mut txn = client.transaction().map_err(backend)?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
            .map_err(backend)?;
        let schema: Option<i64> = txn
            .query_opt(
                "SELECT value FROM meta WHERE key = 'store_schema_version'",
                &[],
            )
            .map_err(backend)?
            .map(|row| row.get(0));
        match schema {
            Some(found) if found > to_sql(STORE_SCHEMA_VERSION)? => {
                return Err(StoreError::NewerSchema {
                    path: format!("postgresql schema {}", self.schema),
                    found: from_sql(found, "store schema version")?,
                    known: STORE_SCHEMA_VERSION,
                });
            }
            Some(_) => {}
            None => {
                txn.execute(
                    "INSERT INTO meta VALUES ('store_schema_version', $1)",
                    &[&to_sql(STORE_SCHEMA_VERSION)?],
                )
                .map_err(backend)?;
            }
        }
        // The epoch is any u64; it is stored as the BIGINT with the same bits.
        txn.execute(
            "INSERT INTO meta VALUES ('log_epoch', $1) ON CONFLICT (key) DO NOTHING",
            &[&(random_log_epoch() as i64)],
        )
        .map_err(backend)?;
        txn.commit().map_err(backend)
    }

    fn read_events(
        &self,
        query: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self.lock().query(query, params).map_err(backend)?;
        rows.iter()
            .map(|row| {
                Ok(StoredEvent {
                    event_id: from_sql(row.get(0), "event id")?,
                    aggregate: row.get(1),
                    seq: from_sql(row.get(2), "sequence")?,
                    kind: row.get(3),
                    schema_version: u32::try_from(row.get::<_, i32>(4)).unwrap_or(u32::MAX),
                    at_unix_ms: from_sql(row.get(5), "time")?,
                    routing_keys: row.get(6),
                    data: row.get(7),
                })
            })
            .collect()
    }

    fn get_bytes(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let query = format!("SELECT value FROM {table} WHERE key = $1");
        Ok(self
            .lock()
            .query_opt(&query, &[&key])
            .map_err(backend)?
            .map(|row| row.get(0)))
    }

    /// Rewrites the config table (`VACUUM FULL`), so dead rows — what updates replaced —
    /// leave its files (the WAL keeps them until recycled).
    pub fn rewrite_config_table(&self) -> Result<(), StoreError> {
        self.lock()
            .batch_execute(&format!("VACUUM FULL {}.config", self.schema))
            .map_err(backend)
    }

    /// Entries of `table` (one of this module's table names) whose key starts with `prefix`.
    fn scan_bytes(&self, table: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // Prefix match without LIKE, so '%' and '_' in keys mean themselves.
        let query =
            format!("SELECT key, value FROM {table} WHERE left(key, length($1)) = $1 ORDER BY key");
        let rows = self.lock().query(&query, &[&prefix]).map_err(backend)?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
}

fn apply_writes(
    txn: &mut Transaction<'_>,
    table: &str,
    writes: Vec<TableWrite>,
) -> Result<(), StoreError> {
    let upsert = format!(
        "INSERT INTO {table} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    );
    let delete = format!("DELETE FROM {table} WHERE key = $1");
    for write in writes {
        match write {
            TableWrite::Put { key, value } => {
                txn.execute(&upsert, &[&key, &value]).map_err(backend)?
            }
            TableWrite::Delete { key } => txn.execute(&delete, &[&key]).map_err(backend)?,
        };
    }
    Ok(())
}

const EVENT_COLUMNS: &str =
    "event_id, aggregate, seq, kind, schema_version, at_unix_ms, routing_keys, data";

/// Prepared statements of one batch, so each commit of it costs only its round trips.
struct AppendStatements {
    find_idempotency: postgres::Statement,
    last_seq: postgres::Statement,
    insert_event: postgres::Statement,
    insert_routing: postgres::Statement,
    insert_idempotency: postgres::Statement,
}

impl AppendStatements {
    fn prepare(txn: &mut Transaction<'_>) -> Result<Self, StoreError> {
        Ok(Self {
            find_idempotency: txn
                .prepare("SELECT last_event_id, answer FROM idempotency WHERE key = $1")
                .map_err(backend)?,
            last_seq: txn
                .prepare("SELECT COALESCE(MAX(seq), 0) FROM log WHERE aggregate = $1")
                .map_err(backend)?,
            insert_event: txn
                .prepare(&format!(
                    "INSERT INTO log ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                ))
                .map_err(backend)?,
            insert_routing: txn
                .prepare("INSERT INTO routing VALUES ($1, $2)")
                .map_err(backend)?,
            insert_idempotency: txn
                .prepare("INSERT INTO idempotency VALUES ($1, $2, $3)")
                .map_err(backend)?,
        })
    }
}

/// Appends one commit of a batch at `next_id`; returns its outcome and the next free id.
/// `sequences` caches the last sequence of the aggregates the batch touched.
fn append_one(
    txn: &mut Transaction<'_>,
    statements: &AppendStatements,
    sequences: &mut std::collections::HashMap<String, u64>,
    commit: Commit,
    mut next_id: u64,
) -> Result<(CommitOutcome, u64), StoreError> {
    if let Some(record) = &commit.idempotency {
        let found = txn
            .query_opt(&statements.find_idempotency, &[&record.key])
            .map_err(backend)?;
        if let Some(row) = found {
            let outcome = CommitOutcome::Duplicate {
                last_event_id: from_sql(row.get(0), "idempotency event id")?,
                answer: row.get(1),
            };
            return Ok((outcome, next_id));
        }
    }
    check_expected_head(commit.expected_head, next_id - 1)?;
    let mut stored = Vec::with_capacity(commit.events.len());
    for new in commit.events {
        let last = match sequences.get(&new.aggregate) {
            Some(last) => *last,
            None => {
                let last: i64 = txn
                    .query_one(&statements.last_seq, &[&new.aggregate])
                    .map_err(backend)?
                    .get(0);
                from_sql(last, "sequence")?
            }
        };
        sequences.insert(new.aggregate.clone(), last + 1);
        let event = new.into_stored(next_id, last + 1, commit.at_unix_ms);
        txn.execute(
            &statements.insert_event,
            &[
                &to_sql(event.event_id)?,
                &event.aggregate,
                &to_sql(event.seq)?,
                &event.kind,
                &i32::try_from(event.schema_version).unwrap_or(i32::MAX),
                &to_sql(event.at_unix_ms)?,
                &event.routing_keys,
                &event.data,
            ],
        )
        .map_err(backend)?;
        for key in &event.routing_keys {
            txn.execute(&statements.insert_routing, &[key, &to_sql(event.event_id)?])
                .map_err(backend)?;
        }
        stored.push(event);
        next_id += 1;
    }
    if let Some(record) = &commit.idempotency {
        let last_event_id = stored.last().map_or(next_id - 1, |e| e.event_id);
        txn.execute(
            &statements.insert_idempotency,
            &[&record.key, &to_sql(last_event_id)?, &record.answer],
        )
        .map_err(backend)?;
    }
    apply_writes(txn, "config", commit.config_writes)?;
    Ok((CommitOutcome::Appended(stored), next_id))
}

impl Store for PostgresStore {
    fn commit_batch(&self, batch: Vec<Commit>) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut client = self.lock();
        let mut txn = client.transaction().map_err(backend)?;
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
            .map_err(backend)?;
        let statements = AppendStatements::prepare(&mut txn)?;
        let head: i64 = txn
            .query_one("SELECT COALESCE(MAX(event_id), 0) FROM log", &[])
            .map_err(backend)?
            .get(0);
        let mut next_id = from_sql(head, "log head")? + 1;
        let mut sequences = std::collections::HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for commit in batch {
            // An error returns early and drops the transaction: nothing of the batch is written.
            let (outcome, next) =
                append_one(&mut txn, &statements, &mut sequences, commit, next_id)?;
            next_id = next;
            outcomes.push(outcome);
        }
        txn.commit().map_err(backend)?;
        Ok(outcomes)
    }

    fn read_idempotency(&self, key: &str) -> Result<Option<CommitOutcome>, StoreError> {
        let row = self
            .lock()
            .query_opt(
                "SELECT last_event_id, answer FROM idempotency WHERE key = $1",
                &[&key],
            )
            .map_err(backend)?;
        row.map(|row| {
            Ok(CommitOutcome::Duplicate {
                last_event_id: from_sql(row.get(0), "idempotency event id")?,
                answer: row.get(1),
            })
        })
        .transpose()
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_events(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM log WHERE event_id > $1 ORDER BY event_id LIMIT $2"
            ),
            &[&to_sql(after)?, &limit],
        )
    }

    fn read_routed(
        &self,
        routing_key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_events(
            &format!(
                "SELECT {} FROM routing r JOIN log l ON l.event_id = r.event_id
                 WHERE r.routing_key = $1 AND r.event_id > $2 ORDER BY r.event_id LIMIT $3",
                EVENT_COLUMNS
                    .split(", ")
                    .map(|c| format!("l.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &[&routing_key, &to_sql(after)?, &limit],
        )
    }

    fn read_aggregate(&self, aggregate: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_events(
            &format!("SELECT {EVENT_COLUMNS} FROM log WHERE aggregate = $1 ORDER BY seq"),
            &[&aggregate],
        )
    }

    fn log_position(&self) -> Result<LogPosition, StoreError> {
        let row = self
            .lock()
            .query_one(
                "SELECT (SELECT value FROM meta WHERE key = 'log_epoch'),
                        COALESCE(MIN(event_id), 0), COALESCE(MAX(event_id), 0) FROM log",
                &[],
            )
            .map_err(backend)?;
        let log_epoch = row.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
        let head = from_sql(row.get(2), "log head")?;
        let floor = if head == 0 {
            1
        } else {
            from_sql(row.get(1), "log floor")?
        };
        Ok(LogPosition {
            log_epoch,
            floor,
            head,
        })
    }

    fn set_log_epoch(&self, log_epoch: u64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE meta SET value = $1 WHERE key = 'log_epoch'",
                &[&(log_epoch as i64)],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn get_config(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_bytes("config", key)
    }

    fn scan_config(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_bytes("config", prefix)
    }

    fn get_volatile(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_bytes("volatile", key)
    }

    fn put_volatile(
        &self,
        writes: Vec<TableWrite>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut client = self.lock();
        let mut txn = client.transaction().map_err(backend)?;
        if durability == Durability::Relaxed {
            txn.execute("SET LOCAL synchronous_commit TO OFF", &[])
                .map_err(backend)?;
        }
        apply_writes(&mut txn, "volatile", writes)?;
        txn.commit().map_err(backend)
    }

    fn scan_volatile(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_bytes("volatile", prefix)
    }

    fn save_projection(&self, name: &str, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO projections VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET snapshot = EXCLUDED.snapshot",
                &[&name, &snapshot],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn load_projection(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .lock()
            .query_opt("SELECT snapshot FROM projections WHERE name = $1", &[&name])
            .map_err(backend)?
            .map(|row| row.get(0)))
    }

    fn shared(&self) -> Sharing {
        Sharing::SeveralWriters
    }

    fn drop_projections(&self) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM projections", &[])
            .map_err(backend)?;
        Ok(())
    }
}
