//! The store port: an append-only event log with indexes, idempotency keys, projection
//! checkpoints, and small config/secret and volatile tables, behind one trait.
//!
//! Two adapters: [`redb::RedbStore`] (the default, embedded, durable) and
//! [`memory::MemoryStore`] (tests). A PostgreSQL adapter implements the same trait. Logic never
//! sees which one it runs on. The log is never updated or deleted: [`Store::commit`] only appends.

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod redb;

#[cfg(test)]
mod contract;

use outpost_proto::cursor::LogPosition;
use serde::{Deserialize, Serialize};

/// Version of the store's own layout; a store written by a newer control is refused.
pub const STORE_SCHEMA_VERSION: u64 = 1;

/// An event as a command hands it to the store; the store assigns id and sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Aggregate the event belongs to, e.g. `node/n1` or `allocation/web-1a2b3c4d`.
    pub aggregate: String,
    /// Event kind, e.g. `NodeRegistered`.
    pub kind: String,
    pub schema_version: u32,
    /// Routing keys computed at append time, e.g. `node:n1`; indexed for filtered feeds.
    pub routing_keys: Vec<String>,
    /// The event's data as JSON bytes.
    pub data: Vec<u8>,
}

impl NewEvent {
    /// The event as the log holds it, at `event_id` with its aggregate's `seq`.
    pub fn into_stored(self, event_id: u64, seq: u64, at_unix_ms: u64) -> StoredEvent {
        StoredEvent {
            event_id,
            aggregate: self.aggregate,
            seq,
            kind: self.kind,
            schema_version: self.schema_version,
            at_unix_ms,
            routing_keys: self.routing_keys,
            data: self.data,
        }
    }
}

/// An event as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Global, monotonic, starting at 1.
    pub event_id: u64,
    pub aggregate: String,
    /// Per-aggregate sequence, starting at 1.
    pub seq: u64,
    pub kind: String,
    pub schema_version: u32,
    pub at_unix_ms: u64,
    pub routing_keys: Vec<String>,
    pub data: Vec<u8>,
}

/// A write to a small keyed table, done in the same transaction as the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableWrite {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// Everything one command writes, atomically.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub events: Vec<NewEvent>,
    /// With a key already stored, nothing is written and the stored answer is returned.
    pub idempotency: Option<IdempotencyRecord>,
    /// Writes to the config/secrets table (CA, token hashes, credentials).
    pub config_writes: Vec<TableWrite>,
    /// Time stamped on every event of this commit.
    pub at_unix_ms: u64,
    /// The log head the command validated against; with another head the commit is refused
    /// with [`StoreError::Conflict`] (several writers share the store).
    pub expected_head: Option<u64>,
}

/// The first answer given for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    /// The answer to repeat, as bytes the command chooses (JSON).
    pub answer: Vec<u8>,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The events were appended; they are returned with their ids.
    Appended(Vec<StoredEvent>),
    /// The idempotency key was seen before: nothing was written; here is the first answer and
    /// the id of the last event the first commit appended.
    Duplicate { answer: Vec<u8>, last_event_id: u64 },
}

impl CommitOutcome {
    /// Id of the last event the command appended (the first time, for a duplicate), if any.
    pub fn last_event_id(&self) -> Option<u64> {
        match self {
            CommitOutcome::Appended(events) => events.last().map(|e| e.event_id),
            CommitOutcome::Duplicate { last_event_id, .. } => Some(*last_event_id),
        }
    }
}

/// Which durability a volatile write needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before returning.
    Durable,
    /// Visible at once, persisted with the next durable commit (heartbeats, statuses).
    Relaxed,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("store record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "store at {path} was written by a newer control (store schema {found}, this control knows up to {known})"
    )]
    NewerSchema {
        path: String,
        found: u64,
        known: u64,
    },
    #[error("store at {path} is in use by another process: {reason}")]
    Locked { path: String, reason: String },
    #[error("the log moved on: the command expected head {expected}, the log is at {found}")]
    Conflict { expected: u64, found: u64 },
}

/// The store port.
pub trait Store: Send + Sync + 'static {
    /// Whether a point read (a config record by key) is cheap enough to run on the async
    /// threads: an embedded store answering from its page cache, not a network round trip.
    /// The request path then reads in place instead of hopping to a blocking thread, which
    /// under thousands of heartbeats costs more than the read itself.
    fn point_reads_in_place(&self) -> bool {
        false
    }

    /// Appends the events and applies the table writes in one transaction, unless the
    /// idempotency key is known.
    fn commit(&self, commit: Commit) -> Result<CommitOutcome, StoreError> {
        self.commit_batch(vec![commit])?
            .pop()
            .ok_or_else(|| StoreError::Backend("a batch of one commit answered nothing".into()))
    }

    /// Group commit: the commits in order, in ONE transaction with one fsync. Each commit keeps
    /// its own outcome (a known idempotency key appends nothing of that commit and never fails
    /// the others); the outcomes come back in the order given, which is log order. A commit
    /// whose `expected_head` is not the head at its turn fails the whole batch with
    /// [`StoreError::Conflict`], and then nothing of the batch is written.
    fn commit_batch(&self, batch: Vec<Commit>) -> Result<Vec<CommitOutcome>, StoreError>;

    /// Prepares a commit's table writes on the caller's thread, before the commit is queued
    /// for the group commit: a sealing store seals its records here, so that the one writer
    /// that every command waits on does not. `commit_batch` still prepares what was not.
    fn prepare_writes(&self, _writes: &mut [TableWrite]) -> Result<(), StoreError> {
        Ok(())
    }

    /// The first answer of an idempotency key, if it was used (as [`CommitOutcome::Duplicate`]).
    fn read_idempotency(&self, key: &str) -> Result<Option<CommitOutcome>, StoreError>;

    /// Events with ids greater than `after`, in id order, at most `limit`.
    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Events routed to `routing_key` with ids greater than `after`, at most `limit`; reads only
    /// the index entries of that key.
    fn read_routed(
        &self,
        routing_key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// All events of one aggregate in sequence order.
    fn read_aggregate(&self, aggregate: &str) -> Result<Vec<StoredEvent>, StoreError>;

    /// Epoch, floor and head of the log.
    fn log_position(&self) -> Result<LogPosition, StoreError>;

    /// Gives the log a new epoch (after a restore or by an operator): every cursor becomes gone.
    fn set_log_epoch(&self, log_epoch: u64) -> Result<(), StoreError>;

    fn get_config(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Config entries whose key starts with `prefix`, in key order.
    fn scan_config(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    fn get_volatile(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_volatile(
        &self,
        writes: Vec<TableWrite>,
        durability: Durability,
    ) -> Result<(), StoreError>;
    /// Volatile entries whose key starts with `prefix`.
    fn scan_volatile(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Saves a projection snapshot (its bytes carry its checkpoint).
    fn save_projection(&self, name: &str, snapshot: Vec<u8>) -> Result<(), StoreError>;
    fn load_projection(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Drops every projection snapshot; the next start replays the log.
    fn drop_projections(&self) -> Result<(), StoreError>;

    /// Whether other processes may append to this store; the core then follows the log head.
    fn shared(&self) -> Sharing {
        Sharing::ThisProcessOnly
    }
}

/// Who appends to a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    ThisProcessOnly,
    /// Several control replicas: commits carry the head they expect.
    SeveralWriters,
}

/// Refuses a commit whose expected head is not the log's head.
pub(crate) fn check_expected_head(expected: Option<u64>, head: u64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != head => Err(StoreError::Conflict {
            expected,
            found: head,
        }),
        _ => Ok(()),
    }
}

/// Log epoch for a fresh log: random, never 0.
pub fn random_log_epoch() -> u64 {
    loop {
        let epoch: u64 = rand::random();
        if epoch != 0 {
            return epoch;
        }
    }
}

/// Stored form of an idempotency record: the last event id (8 bytes, little endian), then the
/// answer.
pub(crate) fn encode_idempotency(last_event_id: u64, answer: &[u8]) -> Vec<u8> {
    let mut bytes = last_event_id.to_le_bytes().to_vec();
    bytes.extend_from_slice(answer);
    bytes
}

pub(crate) fn decode_idempotency(key: &str, bytes: &[u8]) -> Result<CommitOutcome, StoreError> {
    let (id, answer) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| StoreError::Corrupt {
            what: format!("idempotency record {key}"),
            reason: format!("{} bytes, shorter than 8", bytes.len()),
        })?;
    Ok(CommitOutcome::Duplicate {
        answer: answer.to_vec(),
        last_event_id: u64::from_le_bytes(*id),
    })
}
