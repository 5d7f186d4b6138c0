//! Group commit: commands are validated one at a time under the command lock and staged here;
//! one writer task appends everything staged meanwhile in ONE store transaction (one fsync),
//! publishes the events in log order and then answers each command in that same order.
//!
//! A command validates against views at some checkpoint while earlier commands may still be
//! staged (not yet durable, not yet in the views). The [`ConflictTracker`] makes that safe: a
//! commit conflicts when a key it writes (an aggregate, a config record, the overlay address
//! space) was written by a staged commit or by a commit past the checkpoint it validated at.
//! A conflicting command appends nothing; the caller waits for the writes before it to settle
//! and validates again. Commands that read everything (the scheduler, revocation, overlay
//! reports, epoch rotation) take the settled lock instead: nothing staged, views at the head.

use std::collections::HashMap;

use tokio::sync::{Notify, oneshot, watch};

use crate::api::error::ApiError;
use crate::store::{Commit, CommitOutcome, StoreError};

/// Most commits appended in one transaction.
pub const BATCH_COMMITS_MAX: usize = 4096;

/// Conflict key of the overlay's address space: every overlay event reads and writes it.
const OVERLAY_CONFLICT_KEY: &str = "overlay";

/// The keys a commit writes, for conflict checks: each event's aggregate, each config record,
/// the overlay address space for overlay events, and the artifact a service definition
/// references (so `artifacts rm` and a define naming that artifact, validated at the same
/// checkpoint, cannot both commit: the later one validates again and is refused).
pub fn conflict_keys(commit: &Commit) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for event in &commit.events {
        keys.push(event.aggregate.clone());
        if event.kind.starts_with("Overlay") {
            keys.push(OVERLAY_CONFLICT_KEY.to_string());
        }
        if matches!(event.kind.as_str(), "ServiceDefined" | "RolloutRolledBack")
            && let Some(sha256) = serde_json::from_slice::<serde_json::Value>(&event.data)
                .ok()
                .as_ref()
                .and_then(|data| data.pointer("/spec/artifact/sha256"))
                .and_then(serde_json::Value::as_str)
        {
            keys.push(crate::artifact::artifact_aggregate(sha256));
        }
    }
    for write in &commit.config_writes {
        let key = match write {
            crate::store::TableWrite::Put { key, .. }
            | crate::store::TableWrite::Delete { key } => key,
        };
        keys.push(format!("config:{key}"));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Who last wrote a key that the views may not show yet.
#[derive(Debug, Default)]
pub struct ConflictTracker {
    /// Keys of staged commits not yet durable, with how many staged commits write each.
    staged: HashMap<String, usize>,
    /// Keys of durable commits, with the last event id that wrote each; forgotten once every
    /// later validation is known to see them.
    committed: HashMap<String, u64>,
}

/// A key written after the views a command validated against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConflict {
    pub key: String,
    /// The last event id that wrote the key; `None` while that write is still staged.
    pub written_at: Option<u64>,
}

impl ConflictTracker {
    /// The first of `keys` written by a staged commit or by one past `validated_at`.
    pub fn conflict(&self, keys: &[String], validated_at: u64) -> Option<KeyConflict> {
        keys.iter().find_map(|key| {
            if self.staged.contains_key(key) {
                return Some(KeyConflict {
                    key: key.clone(),
                    written_at: None,
                });
            }
            match self.committed.get(key) {
                Some(&id) if id > validated_at => Some(KeyConflict {
                    key: key.clone(),
                    written_at: Some(id),
                }),
                _ => None,
            }
        })
    }

    pub fn stage(&mut self, keys: &[String]) {
        for key in keys {
            *self.staged.entry(key.clone()).or_default() += 1;
        }
    }

    /// A staged commit finished: durable with its last event id, or wrote nothing.
    pub fn settle(&mut self, keys: &[String], last_event_id: Option<u64>) {
        for key in keys {
            if let Some(count) = self.staged.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.staged.remove(key);
                }
            }
            if let Some(id) = last_event_id {
                let entry = self.committed.entry(key.clone()).or_default();
                *entry = (*entry).max(id);
            }
        }
    }

    /// Forgets durable writes at or below `checkpoint`: every validation from now on sees them
    /// (validations happen under the command lock, at checkpoints that only grow).
    pub fn forget_through(&mut self, checkpoint: u64) {
        self.committed.retain(|_, id| *id > checkpoint);
    }

    pub fn staged_keys(&self) -> usize {
        self.staged.len()
    }
}

/// One staged command waiting for its batch.
pub struct Staged {
    pub commit: Commit,
    pub keys: Vec<String>,
    pub answer: oneshot::Sender<Result<CommitOutcome, ApiError>>,
}

/// The queue between the command lock and the writer task.
pub struct GroupCommitter {
    queue: std::sync::Mutex<Vec<Staged>>,
    wake: Notify,
    pub tracker: std::sync::Mutex<ConflictTracker>,
    /// Commands staged so far, and answered so far (batches are answered in staging order).
    staged_total: std::sync::atomic::AtomicU64,
    answered_total: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    /// Batches and commits written so far (for tests and the benchmark).
    pub batches_written: std::sync::atomic::AtomicU64,
    pub commits_written: std::sync::atomic::AtomicU64,
}

impl Default for GroupCommitter {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupCommitter {
    pub fn new() -> Self {
        Self {
            queue: std::sync::Mutex::new(Vec::new()),
            wake: Notify::new(),
            tracker: std::sync::Mutex::new(ConflictTracker::default()),
            staged_total: Default::default(),
            answered_total: watch::channel(0).0,
            paused: watch::channel(false).0,
            batches_written: Default::default(),
            commits_written: Default::default(),
        }
    }

    pub fn tracker(&self) -> std::sync::MutexGuard<'_, ConflictTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stages a commit validated at `validated_at`, unless a key it writes conflicts. The
    /// caller holds the command lock, so staging order is log order.
    pub fn stage(
        &self,
        commit: Commit,
        validated_at: u64,
    ) -> Result<oneshot::Receiver<Result<CommitOutcome, ApiError>>, KeyConflict> {
        let keys = conflict_keys(&commit);
        {
            let mut tracker = self.tracker();
            tracker.forget_through(validated_at);
            if let Some(conflict) = tracker.conflict(&keys, validated_at) {
                return Err(conflict);
            }
            tracker.stage(&keys);
        }
        let (answer, receiver) = oneshot::channel();
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.staged_total
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        queue.push(Staged {
            commit,
            keys,
            answer,
        });
        drop(queue);
        self.wake.notify_one();
        Ok(receiver)
    }

    /// Takes what is staged (at most [`BATCH_COMMITS_MAX`]), waiting for something.
    pub async fn next_batch(&self) -> Vec<Staged> {
        let mut paused = self.paused.subscribe();
        loop {
            let notified = self.wake.notified();
            if !*paused.borrow_and_update() {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !queue.is_empty() {
                    let take = queue.len().min(BATCH_COMMITS_MAX);
                    let rest = queue.split_off(take);
                    return std::mem::replace(&mut *queue, rest);
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = paused.changed() => {}
            }
        }
    }

    /// A batch was answered.
    pub fn answered(&self, commits: usize) {
        self.answered_total.send_modify(|n| *n += commits as u64);
    }

    /// Waits until every command staged so far is answered (later ones are not waited for, so
    /// this ends under any load). Holding the command lock, that is: nothing staged remains.
    pub async fn wait_idle(&self) {
        let staged = self.staged_total.load(std::sync::atomic::Ordering::SeqCst);
        let mut answered = self.answered_total.subscribe();
        let _ = answered.wait_for(|n| *n >= staged).await;
    }

    /// Staged commands not yet answered.
    pub fn outstanding(&self) -> usize {
        let staged = self.staged_total.load(std::sync::atomic::Ordering::SeqCst);
        staged.saturating_sub(*self.answered_total.borrow()) as usize
    }

    /// Test hook: the writer takes nothing until [`GroupCommitter::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
        self.wake.notify_one();
    }
}

/// The same store error for each command of a failed batch.
pub fn batch_error(error: &StoreError) -> ApiError {
    match error {
        StoreError::Conflict { expected, found } => ApiError::Conflict {
            expected: *expected,
            found: *found,
        },
        other => ApiError::internal(format!("group commit failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEvent, TableWrite};

    fn commit_on(aggregates: &[&str]) -> Commit {
        Commit {
            events: aggregates
                .iter()
                .map(|aggregate| NewEvent {
                    aggregate: aggregate.to_string(),
                    kind: "TestEvent".into(),
                    schema_version: 1,
                    routing_keys: Vec::new(),
                    data: b"{}".to_vec(),
                })
                .collect(),
            ..Commit::default()
        }
    }

    #[test]
    fn a_service_definition_conflicts_with_its_artifact() {
        let spec: outpost_proto::service::ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "app",
            "command": "bin/app",
            "artifact": {"sha256": "ab".repeat(32)},
        }))
        .unwrap();
        let define = crate::log::Event::ServiceDefined {
            org: "o".into(),
            spec,
        };
        let remove = crate::log::Event::ArtifactRemoved {
            org: "o".into(),
            sha256: "ab".repeat(32),
        };
        let keys_of = |event: &crate::log::Event| {
            conflict_keys(&Commit {
                events: vec![event.to_new_event()],
                ..Commit::default()
            })
        };
        let (define, remove) = (keys_of(&define), keys_of(&remove));
        assert!(
            define.iter().any(|key| remove.contains(key)),
            "{define:?} {remove:?}"
        );
        let mut tracker = ConflictTracker::default();
        tracker.stage(&define);
        assert!(tracker.conflict(&remove, 0).is_some());
    }

    #[test]
    fn keys_cover_aggregates_config_records_and_the_overlay() {
        let mut commit = commit_on(&["node/n1", "node/n1"]);
        commit.events[1].kind = "OverlayJoined".into();
        commit.config_writes = vec![TableWrite::Delete {
            key: "token/t".into(),
        }];
        assert_eq!(
            conflict_keys(&commit),
            vec!["config:token/t", "node/n1", "overlay"]
        );
    }

    #[test]
    fn a_staged_or_newer_write_conflicts_and_an_older_one_does_not() {
        let mut tracker = ConflictTracker::default();
        let keys = vec!["service/web".to_string()];
        tracker.stage(&keys);
        assert_eq!(
            tracker.conflict(&keys, 100),
            Some(KeyConflict {
                key: "service/web".into(),
                written_at: None
            })
        );
        assert_eq!(tracker.conflict(&["service/api".to_string()], 0), None);
        tracker.settle(&keys, Some(7));
        assert_eq!(tracker.staged_keys(), 0);
        // Validated against views at 6: event 7 is newer.
        assert!(tracker.conflict(&keys, 6).is_some());
        assert_eq!(tracker.conflict(&keys, 7), None);
        tracker.forget_through(7);
        assert_eq!(tracker.conflict(&keys, 0), None, "forgotten once seen");
        // A commit that wrote nothing (a duplicate) leaves no mark.
        tracker.stage(&keys);
        tracker.settle(&keys, None);
        assert_eq!(tracker.conflict(&keys, 0), None);
    }

    #[tokio::test]
    async fn staging_order_is_batch_order_and_a_conflict_stages_nothing() {
        let committer = GroupCommitter::new();
        let _first = committer.stage(commit_on(&["a/1"]), 0).unwrap();
        let _second = committer.stage(commit_on(&["a/2"]), 0).unwrap();
        assert!(committer.stage(commit_on(&["a/1"]), 0).is_err());
        let batch = committer.next_batch().await;
        assert_eq!(
            batch.iter().map(|s| s.keys.clone()).collect::<Vec<_>>(),
            vec![vec!["a/1".to_string()], vec!["a/2".to_string()]]
        );
    }
}
