//! The store contract, run against every adapter: ids, sequences, indexes, idempotency,
//! atomic config writes, epochs and projection snapshots.

use super::memory::MemoryStore;
use super::redb::RedbStore;
use super::*;

fn event(aggregate: &str, routing: &[&str]) -> NewEvent {
    NewEvent {
        aggregate: aggregate.to_string(),
        kind: "TestEvent".to_string(),
        schema_version: 1,
        routing_keys: routing.iter().map(|k| k.to_string()).collect(),
        data: format!("{{\"aggregate\":\"{aggregate}\"}}").into_bytes(),
    }
}

fn commit(events: Vec<NewEvent>) -> Commit {
    Commit {
        events,
        at_unix_ms: 1_000,
        ..Commit::default()
    }
}

fn ids(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.event_id).collect()
}

fn ids_and_sequences_are_monotonic(store: &dyn Store) {
    let empty = store.log_position().unwrap();
    assert_eq!((empty.head, empty.floor), (0, 1));
    let first = store
        .commit(commit(vec![
            event("a/1", &[]),
            event("a/2", &[]),
            event("a/1", &[]),
        ]))
        .unwrap();
    let CommitOutcome::Appended(first) = first else {
        panic!("expected appended")
    };
    assert_eq!(ids(&first), vec![1, 2, 3]);
    assert_eq!(
        first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 1, 2]
    );
    let second = store.commit(commit(vec![event("a/1", &[])])).unwrap();
    assert_eq!(second.last_event_id(), Some(4));
    let position = store.log_position().unwrap();
    assert_eq!((position.head, position.floor), (4, 1));
    let log = store.read_log(0, 100).unwrap();
    assert_eq!(ids(&log), vec![1, 2, 3, 4]);
    assert_eq!(log[0].at_unix_ms, 1_000);
    assert_eq!(ids(&store.read_log(2, 1).unwrap()), vec![3]);
    let aggregate = store.read_aggregate("a/1").unwrap();
    assert_eq!(ids(&aggregate), vec![1, 3, 4]);
    assert_eq!(
        aggregate.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(store.read_aggregate("a/9").unwrap().is_empty());
}

fn routed_reads_see_only_their_key(store: &dyn Store) {
    store
        .commit(commit(vec![
            event("x/1", &["node:n1"]),
            event("x/2", &["node:n2"]),
            event("x/3", &["node:n1", "node:n2"]),
            event("x/4", &["node:n10"]),
        ]))
        .unwrap();
    assert_eq!(
        ids(&store.read_routed("node:n1", 0, 100).unwrap()),
        vec![1, 3]
    );
    assert_eq!(ids(&store.read_routed("node:n1", 1, 100).unwrap()), vec![3]);
    assert_eq!(ids(&store.read_routed("node:n2", 0, 1).unwrap()), vec![2]);
    assert_eq!(
        ids(&store.read_routed("node:n10", 0, 100).unwrap()),
        vec![4]
    );
    assert!(store.read_routed("node:n3", 0, 100).unwrap().is_empty());
}

fn repeated_idempotency_key_returns_first_answer_and_appends_nothing(store: &dyn Store) {
    let mut first = commit(vec![event("s/web", &[])]);
    first.idempotency = Some(IdempotencyRecord {
        key: "k1".into(),
        answer: b"first".to_vec(),
    });
    assert!(matches!(
        store.commit(first).unwrap(),
        CommitOutcome::Appended(_)
    ));
    let mut again = commit(vec![event("s/web", &[]), event("s/web", &[])]);
    again.idempotency = Some(IdempotencyRecord {
        key: "k1".into(),
        answer: b"second".to_vec(),
    });
    again.config_writes = vec![TableWrite::Put {
        key: "c".into(),
        value: b"v".to_vec(),
    }];
    assert_eq!(
        store.commit(again).unwrap(),
        CommitOutcome::Duplicate {
            answer: b"first".to_vec(),
            last_event_id: 1
        }
    );
    assert_eq!(store.log_position().unwrap().head, 1);
    assert_eq!(store.get_config("c").unwrap(), None);
    assert_eq!(
        store.read_idempotency("k1").unwrap(),
        Some(CommitOutcome::Duplicate {
            answer: b"first".to_vec(),
            last_event_id: 1
        })
    );
    assert_eq!(store.read_idempotency("k2").unwrap(), None);
}

fn config_writes_commit_with_events(store: &dyn Store) {
    let mut with_config = commit(vec![event("t/1", &[])]);
    with_config.config_writes = vec![
        TableWrite::Put {
            key: "token/1".into(),
            value: b"hash".to_vec(),
        },
        TableWrite::Put {
            key: "token/2".into(),
            value: b"other".to_vec(),
        },
    ];
    with_config.config_writes.push(TableWrite::Put {
        key: "tokens".into(),
        value: b"not under token/".to_vec(),
    });
    store.commit(with_config).unwrap();
    assert_eq!(
        store.get_config("token/1").unwrap().as_deref(),
        Some(&b"hash"[..])
    );
    // A scan sees the keys under the prefix only, in key order.
    assert_eq!(
        store.scan_config("token/").unwrap(),
        vec![
            ("token/1".to_string(), b"hash".to_vec()),
            ("token/2".to_string(), b"other".to_vec())
        ]
    );
    let mut delete = commit(vec![]);
    delete.config_writes = vec![TableWrite::Delete {
        key: "token/2".into(),
    }];
    store.commit(delete).unwrap();
    assert_eq!(store.get_config("token/2").unwrap(), None);
}

fn volatile_and_projection_tables(store: &dyn Store) {
    store
        .put_volatile(
            vec![
                TableWrite::Put {
                    key: "hb/n1".into(),
                    value: b"1".to_vec(),
                },
                TableWrite::Put {
                    key: "hb/n2".into(),
                    value: b"2".to_vec(),
                },
                TableWrite::Put {
                    key: "status/a".into(),
                    value: b"3".to_vec(),
                },
            ],
            Durability::Relaxed,
        )
        .unwrap();
    assert_eq!(
        store.get_volatile("hb/n2").unwrap().as_deref(),
        Some(&b"2"[..])
    );
    let scanned = store.scan_volatile("hb/").unwrap();
    assert_eq!(
        scanned.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        vec!["hb/n1", "hb/n2"]
    );
    assert_eq!(store.load_projection("views").unwrap(), None);
    store
        .save_projection("views", b"snapshot".to_vec())
        .unwrap();
    assert_eq!(
        store.load_projection("views").unwrap().as_deref(),
        Some(&b"snapshot"[..])
    );
    store.drop_projections().unwrap();
    assert_eq!(store.load_projection("views").unwrap(), None);
    // Volatile writes never touch the log.
    assert_eq!(store.log_position().unwrap().head, 0);
}

fn a_commit_expecting_another_head_is_refused(store: &dyn Store) {
    store.commit(commit(vec![event("h/1", &[])])).unwrap();
    let mut stale = commit(vec![event("h/1", &[])]);
    stale.expected_head = Some(0);
    stale.config_writes = vec![TableWrite::Put {
        key: "k".into(),
        value: b"v".to_vec(),
    }];
    match store.commit(stale) {
        Err(StoreError::Conflict {
            expected: 0,
            found: 1,
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.log_position().unwrap().head, 1);
    assert_eq!(store.get_config("k").unwrap(), None);
    let mut current = commit(vec![event("h/1", &[])]);
    current.expected_head = Some(1);
    assert_eq!(store.commit(current).unwrap().last_event_id(), Some(2));
}

fn epoch_changes_only_when_asked(store: &dyn Store) {
    let before = store.log_position().unwrap().log_epoch;
    assert_ne!(before, 0);
    store.commit(commit(vec![event("e/1", &[])])).unwrap();
    assert_eq!(store.log_position().unwrap().log_epoch, before);
    store.set_log_epoch(before.wrapping_add(1)).unwrap();
    let after = store.log_position().unwrap();
    assert_eq!(after.log_epoch, before.wrapping_add(1));
    assert_eq!(after.head, 1, "rotating the epoch keeps every event");
}

/// One command of a generated batch: how many events, which idempotency key (if any), and
/// whether it writes a config record.
#[derive(Debug, Clone)]
struct BatchCommand {
    events: usize,
    idempotency_key: Option<u8>,
    writes_config: bool,
}

fn batch_commit(index: usize, command: &BatchCommand) -> Commit {
    let mut commit = commit(
        (0..command.events)
            .map(|n| event(&format!("b/{}", n % 2), &[&format!("node:n{index}")]))
            .collect(),
    );
    commit.idempotency = command.idempotency_key.map(|key| IdempotencyRecord {
        key: format!("key-{key}"),
        answer: format!("answer-{index}").into_bytes(),
    });
    if command.writes_config {
        commit.config_writes = vec![TableWrite::Put {
            key: format!("cfg/{index}"),
            value: b"v".to_vec(),
        }];
    }
    commit
}

/// Commits `commands` as one batch after one commit that took `key-0`, and checks: each
/// command is all or nothing (a known key appends none of its events and none of its config
/// writes, and answers the first answer), appended ids follow the answers' order, and the log
/// is exactly the appended commands' events in that order.
fn check_batch(store: &dyn Store, commands: &[BatchCommand]) {
    let mut first = commit(vec![event("b/0", &[])]);
    first.idempotency = Some(IdempotencyRecord {
        key: "key-0".into(),
        answer: b"answer-first".to_vec(),
    });
    store.commit(first).unwrap();
    let batch = commands
        .iter()
        .enumerate()
        .map(|(index, command)| batch_commit(index, command))
        .collect();
    let outcomes = store.commit_batch(batch).unwrap();
    assert_eq!(outcomes.len(), commands.len());
    let mut known: std::collections::BTreeMap<u8, (Vec<u8>, u64)> =
        [(0, (b"answer-first".to_vec(), 1))].into();
    let mut next_id = 2;
    let mut expected_log = vec![1];
    for (index, (command, outcome)) in commands.iter().zip(&outcomes).enumerate() {
        let earlier = command
            .idempotency_key
            .and_then(|key| known.get(&key).cloned());
        match (earlier, outcome) {
            (
                Some((answer, last_event_id)),
                CommitOutcome::Duplicate {
                    answer: got,
                    last_event_id: got_id,
                },
            ) => {
                assert_eq!((&answer, last_event_id), (got, *got_id), "command {index}");
                assert_eq!(store.get_config(&format!("cfg/{index}")).unwrap(), None);
            }
            (None, CommitOutcome::Appended(events)) => {
                let expected: Vec<u64> = (next_id..next_id + command.events as u64).collect();
                assert_eq!(ids(events), expected, "command {index} takes the next ids");
                expected_log.extend(&expected);
                next_id += command.events as u64;
                if let Some(key) = command.idempotency_key {
                    known.insert(key, (format!("answer-{index}").into_bytes(), next_id - 1));
                }
                assert_eq!(
                    store.get_config(&format!("cfg/{index}")).unwrap().is_some(),
                    command.writes_config,
                    "command {index}"
                );
            }
            (earlier, outcome) => panic!("command {index}: expected {earlier:?}, got {outcome:?}"),
        }
    }
    assert_eq!(ids(&store.read_log(0, 1000).unwrap()), expected_log);
    assert_eq!(store.log_position().unwrap().head, next_id - 1);
}

fn a_batch_keeps_each_commands_outcome(store: &dyn Store) {
    let command = |events, idempotency_key, writes_config| BatchCommand {
        events,
        idempotency_key,
        writes_config,
    };
    check_batch(
        store,
        &[
            command(2, Some(1), true),
            // The same key again in the same batch: the first answer, nothing appended.
            command(1, Some(1), true),
            // A key stored before the batch.
            command(3, Some(0), true),
            command(0, None, true),
            command(1, None, false),
        ],
    );
}

fn a_conflicting_batch_writes_nothing(store: &dyn Store) {
    store.commit(commit(vec![event("h/1", &[])])).unwrap();
    let mut good = commit(vec![event("h/1", &[])]);
    good.config_writes = vec![TableWrite::Put {
        key: "k".into(),
        value: b"v".to_vec(),
    }];
    let mut stale = commit(vec![event("h/2", &[])]);
    stale.expected_head = Some(1);
    match store.commit_batch(vec![good, stale]) {
        Err(StoreError::Conflict {
            expected: 1,
            found: 2,
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.log_position().unwrap().head, 1);
    assert_eq!(store.get_config("k").unwrap(), None);
}

macro_rules! contract_tests {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn ids_and_sequences() {
                let (store, _dir) = $make;
                ids_and_sequences_are_monotonic(&store);
            }
            #[test]
            fn routed_reads() {
                let (store, _dir) = $make;
                routed_reads_see_only_their_key(&store);
            }
            #[test]
            fn idempotency() {
                let (store, _dir) = $make;
                repeated_idempotency_key_returns_first_answer_and_appends_nothing(&store);
            }
            #[test]
            fn config_writes() {
                let (store, _dir) = $make;
                config_writes_commit_with_events(&store);
            }
            #[test]
            fn volatile_and_projections() {
                let (store, _dir) = $make;
                volatile_and_projection_tables(&store);
            }
            #[test]
            fn expected_head() {
                let (store, _dir) = $make;
                a_commit_expecting_another_head_is_refused(&store);
            }
            #[test]
            fn batch_outcomes() {
                let (store, _dir) = $make;
                a_batch_keeps_each_commands_outcome(&store);
            }
            #[test]
            fn batch_conflict() {
                let (store, _dir) = $make;
                a_conflicting_batch_writes_nothing(&store);
            }
            #[test]
            fn epochs() {
                let (store, _dir) = $make;
                epoch_changes_only_when_asked(&store);
            }
        }
    };
}

fn redb_store() -> (RedbStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        RedbStore::open(&dir.path().join("control.redb")).unwrap(),
        dir,
    )
}

contract_tests!(memory, (MemoryStore::new(), ()));
contract_tests!(redb, redb_store());

fn batch_commands() -> impl proptest::strategy::Strategy<Value = Vec<BatchCommand>> {
    use proptest::prelude::*;
    proptest::collection::vec(
        (0usize..4, proptest::option::of(0u8..4), any::<bool>()).prop_map(
            |(events, idempotency_key, writes_config)| BatchCommand {
                events,
                idempotency_key,
                writes_config,
            },
        ),
        1..24,
    )
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// A batch commits all or nothing per command, and log order equals answer order.
    #[test]
    fn a_memory_batch_is_all_or_nothing_per_command_in_answer_order(commands in batch_commands()) {
        check_batch(&MemoryStore::new(), &commands);
    }

    #[test]
    fn a_redb_batch_is_all_or_nothing_per_command_in_answer_order(commands in batch_commands()) {
        let (store, _dir) = redb_store();
        check_batch(&store, &commands);
    }
}

/// A PostgreSQL schema of its own for one test, dropped afterwards. The database comes from
/// `OUTPOST_TEST_DATABASE_URL`, by default the local test database.
#[cfg(feature = "postgres")]
struct PostgresSchema {
    url: String,
    schema: String,
}

#[cfg(feature = "postgres")]
impl Drop for PostgresSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = ::postgres::Client::connect(&self.url, ::postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

#[cfg(feature = "postgres")]
fn postgres_store() -> (super::postgres::PostgresStore, PostgresSchema) {
    let url = std::env::var("OUTPOST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string());
    let schema = format!("outpost_test_{:016x}", rand::random::<u64>());
    let guard = PostgresSchema {
        url: url.clone(),
        schema: schema.clone(),
    };
    (
        super::postgres::PostgresStore::open(&url, &schema).unwrap(),
        guard,
    )
}

#[cfg(feature = "postgres")]
contract_tests!(postgres, postgres_store());

#[cfg(feature = "postgres")]
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

    #[test]
    fn a_postgres_batch_is_all_or_nothing_per_command_in_answer_order(commands in batch_commands()) {
        let (store, _schema) = postgres_store();
        check_batch(&store, &commands);
    }
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_keeps_everything_across_reconnect() {
    let (store, schema) = postgres_store();
    store
        .commit(commit(vec![event("a/1", &["node:n1"]), event("a/1", &[])]))
        .unwrap();
    let epoch = store.log_position().unwrap().log_epoch;
    drop(store);
    let store = super::postgres::PostgresStore::open(&schema.url, &schema.schema).unwrap();
    let position = store.log_position().unwrap();
    assert_eq!((position.log_epoch, position.head), (epoch, 2));
    let next = store.commit(commit(vec![event("a/1", &[])])).unwrap();
    let CommitOutcome::Appended(next) = next else {
        panic!("expected appended")
    };
    assert_eq!((next[0].event_id, next[0].seq), (3, 3));
}

#[test]
fn redb_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let epoch = {
        let store = RedbStore::open(&path).unwrap();
        store
            .commit(commit(vec![event("a/1", &["node:n1"]), event("a/1", &[])]))
            .unwrap();
        store.log_position().unwrap().log_epoch
    };
    let store = RedbStore::open(&path).unwrap();
    let position = store.log_position().unwrap();
    assert_eq!((position.log_epoch, position.head), (epoch, 2));
    assert_eq!(store.read_aggregate("a/1").unwrap().len(), 2);
    assert_eq!(ids(&store.read_routed("node:n1", 0, 10).unwrap()), vec![1]);
    let next = store.commit(commit(vec![event("a/1", &[])])).unwrap();
    let CommitOutcome::Appended(next) = next else {
        panic!("expected appended")
    };
    assert_eq!((next[0].event_id, next[0].seq), (3, 3));
}

#[test]
fn redb_refuses_a_second_opener_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let _first = RedbStore::open(&path).unwrap();
    match RedbStore::open(&path) {
        Err(StoreError::Locked { path: shown, .. }) => assert!(shown.ends_with("control.redb")),
        Err(other) => panic!("expected locked, got {other}"),
        Ok(_) => panic!("a second opener must be refused"),
    }
}

#[test]
fn redb_refuses_garbage_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    std::fs::write(
        &path,
        b"this is not a redb database at all, just some bytes",
    )
    .unwrap();
    let error = RedbStore::open(&path)
        .err()
        .expect("garbage must be refused");
    assert!(error.to_string().contains("control.redb"), "{error}");
}
