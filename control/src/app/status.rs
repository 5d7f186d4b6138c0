//! Status off the command path: heartbeats, allocation states and bootstrap reports (folded per
//! node into the latest generation and error per component) are latest-per-key records in
//! memory, written back to the store's volatile table in one relaxed transaction per second,
//! never one write per report. A report never waits behind commands, batches or snapshots, and
//! the table holds one record per node and per allocation, however long the fleet runs.
//!
//! Each node's heartbeats pass a token bucket: a node that floods is refused with 429 naming
//! it, and the others are not affected (their reports are a map insert each).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use crate::store::{Durability, Store, StoreError, TableWrite};

/// Heartbeats a node may send back to back.
pub const HEARTBEAT_BURST: f64 = 10.0;
/// Heartbeats per second a node earns back after a burst. The agent beats every TTL/3 and at
/// most once a second (when its allocations change), far below this.
pub const HEARTBEAT_REFILL_PER_SEC: f64 = 2.0;
/// Prefixes of the records the board holds.
pub const STATUS_PREFIXES: [&str; 3] = ["heartbeat/", "allocation-status/", "bootstrap/"];

/// Key of a node's bootstrap record (its folded bootstrap reports).
pub fn bootstrap_key(node_id: &str) -> String {
    format!("bootstrap/{node_id}")
}

/// One node's heartbeat allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at_unix_ms: u64,
}

impl TokenBucket {
    pub fn full(now_unix_ms: u64) -> Self {
        Self {
            tokens: HEARTBEAT_BURST,
            at_unix_ms: now_unix_ms,
        }
    }

    /// Takes one token at `now_unix_ms`; false when none is left.
    pub fn take(&mut self, now_unix_ms: u64) -> bool {
        let elapsed_secs = now_unix_ms.saturating_sub(self.at_unix_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_secs * HEARTBEAT_REFILL_PER_SEC).min(HEARTBEAT_BURST);
        self.at_unix_ms = self.at_unix_ms.max(now_unix_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Board {
    records: BTreeMap<String, Vec<u8>>,
    /// Keys changed since the last write-back.
    dirty: BTreeSet<String>,
}

/// Latest-per-key status records, written back to the store in the background.
#[derive(Default)]
pub struct StatusBoard {
    board: Mutex<Board>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl StatusBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the records the store kept from before a restart.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let board = StatusBoard::default();
        {
            let mut inner = board.lock();
            for prefix in STATUS_PREFIXES {
                inner.records.extend(store.scan_volatile(prefix)?);
            }
        }
        Ok(board)
    }

    /// Whether `node_id` may heartbeat now; a flood runs its bucket dry.
    pub fn admit_heartbeat(&self, node_id: &str, now_unix_ms: u64) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .entry(node_id.to_string())
            .or_insert_with(|| TokenBucket::full(now_unix_ms))
            .take(now_unix_ms)
    }

    /// Applies writes at once in memory; the store sees them at the next write-back.
    pub fn put(&self, writes: Vec<TableWrite>) {
        let mut board = self.lock();
        for write in writes {
            match write {
                TableWrite::Put { key, value } => {
                    board.dirty.insert(key.clone());
                    board.records.insert(key, value);
                }
                TableWrite::Delete { key } => {
                    board.records.remove(&key);
                    board.dirty.insert(key);
                }
            }
        }
    }

    /// Folds bootstrap reports into their nodes' records, starting a node's record from
    /// `earlier` (what the log's old `BootstrapReported` events built) the first time.
    pub fn report_bootstrap(
        &self,
        reports: Vec<outpost_proto::bootstrap::BootstrapEvent>,
        earlier: impl Fn(&str) -> crate::projection::NodeBootstrap,
    ) {
        let mut board = self.lock();
        for report in reports {
            let node_id = report.node_id.to_string();
            let key = bootstrap_key(&node_id);
            let mut record = board
                .records
                .get(&key)
                .and_then(|bytes| serde_json::from_slice(bytes).ok())
                .unwrap_or_else(|| earlier(&node_id));
            record.apply(report);
            let value = serde_json::to_vec(&record).unwrap_or_default();
            board.records.insert(key.clone(), value);
            board.dirty.insert(key);
        }
    }

    /// A node's folded bootstrap reports, if it reported since they moved off the log.
    pub fn bootstrap(&self, node_id: &str) -> Option<crate::projection::NodeBootstrap> {
        self.get(&bootstrap_key(node_id))
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().records.get(key).cloned()
    }

    /// Records whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.lock()
            .records
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// The writes that bring the store up to date, clearing the dirty set.
    pub fn take_dirty(&self) -> Vec<TableWrite> {
        let mut board = self.lock();
        let dirty = std::mem::take(&mut board.dirty);
        dirty
            .into_iter()
            .map(|key| match board.records.get(&key) {
                Some(value) => TableWrite::Put {
                    key,
                    value: value.clone(),
                },
                None => TableWrite::Delete { key },
            })
            .collect()
    }

    /// Writes changed records back to the store (one relaxed transaction); with `refresh`,
    /// then takes what other replicas wrote for keys this one did not change meanwhile.
    pub fn write_back(&self, store: &dyn Store, refresh: Refresh) -> Result<usize, StoreError> {
        let writes = self.take_dirty();
        let written = writes.len();
        if !writes.is_empty()
            && let Err(error) = store.put_volatile(writes.clone(), Durability::Relaxed)
        {
            // Keep them dirty for the next round, unless a newer report replaced them.
            let mut board = self.lock();
            for write in writes {
                let key = match write {
                    TableWrite::Put { key, .. } | TableWrite::Delete { key } => key,
                };
                board.dirty.insert(key);
            }
            return Err(error);
        }
        if refresh == Refresh::FromSharedStore {
            let mut stored = Vec::new();
            for prefix in STATUS_PREFIXES {
                stored.extend(store.scan_volatile(prefix)?);
            }
            let mut board = self.lock();
            for (key, value) in stored {
                if !board.dirty.contains(&key) {
                    board.records.insert(key, value);
                }
            }
        }
        Ok(written)
    }
}

/// Whether a write-back also reads what other replicas wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    ThisProcessOnly,
    FromSharedStore,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn put(key: &str, value: &str) -> TableWrite {
        TableWrite::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_flood_runs_dry_and_refills_while_others_are_untouched() {
        let board = StatusBoard::default();
        let now = 1_000_000;
        let admitted = (0..50)
            .filter(|_| board.admit_heartbeat("noisy", now))
            .count();
        assert_eq!(admitted, HEARTBEAT_BURST as usize);
        assert!(
            board.admit_heartbeat("quiet", now),
            "another node is not affected"
        );
        assert!(!board.admit_heartbeat("noisy", now + 100));
        assert!(
            board.admit_heartbeat("noisy", now + 1000),
            "refilled after a second"
        );
    }

    #[test]
    fn latest_record_wins_and_write_back_sends_each_key_once() {
        let store = MemoryStore::new();
        let board = StatusBoard::load(&store).unwrap();
        board.put(vec![put("heartbeat/n1", "1"), put("heartbeat/n2", "1")]);
        board.put(vec![put("heartbeat/n1", "2")]);
        assert_eq!(board.get("heartbeat/n1").as_deref(), Some(&b"2"[..]));
        assert_eq!(
            board.write_back(&store, Refresh::ThisProcessOnly).unwrap(),
            2
        );
        assert_eq!(
            store.get_volatile("heartbeat/n1").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            board.write_back(&store, Refresh::ThisProcessOnly).unwrap(),
            0
        );
        board.put(vec![TableWrite::Delete {
            key: "heartbeat/n2".into(),
        }]);
        board.write_back(&store, Refresh::ThisProcessOnly).unwrap();
        assert_eq!(store.get_volatile("heartbeat/n2").unwrap(), None);
        // Another replica's record arrives with a refresh; a restart loads what was stored.
        store
            .put_volatile(vec![put("heartbeat/n3", "3")], Durability::Relaxed)
            .unwrap();
        board.write_back(&store, Refresh::FromSharedStore).unwrap();
        assert_eq!(board.get("heartbeat/n3").as_deref(), Some(&b"3"[..]));
        let reloaded = StatusBoard::load(&store).unwrap();
        assert_eq!(
            reloaded
                .scan("heartbeat/")
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            vec!["heartbeat/n1", "heartbeat/n3"]
        );
    }
}
