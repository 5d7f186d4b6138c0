//! In-process tests of credentials at rest (P11, issue 12 item 6): after enrolling a node and
//! issuing tokens, the raw bytes of the store — the redb file, every row of the PostgreSQL
//! schema — hold neither the CA's private key nor any credential's secret or its digest; an
//! older store's plaintext records are sealed in place at start.

use super::*;
use crate::api::auth::sha256_hex;
use crate::secret::sealed_records::{SealingStore, is_sealed};

/// What must never be found in a store's bytes, and one thing that must (so the search works).
struct Needles {
    forbidden: Vec<(String, String)>,
    /// Written in the clear by design (the CA fingerprint of `ClusterInitialized`).
    present: String,
}

/// Drives a control through the acts that write credentials: a node enrolled (its credential),
/// an operator token issued, an enrollment token left unused, the cold start's admin token.
async fn write_credentials(h: &Harness) -> Needles {
    let node_credential = h.enroll("n1", 256).await;
    let operator_token = h.org_token("acme", json!(["admin"])).await;
    let enrollment_token = h.enrollment_token().await;
    let mut forbidden = Vec::new();
    for (what, token) in [
        ("node credential", &node_credential),
        ("operator token", &operator_token),
        ("admin token", &h.admin),
        ("enrollment token", &enrollment_token),
    ] {
        let secret = token.rsplit('.').next().unwrap().to_string();
        assert!(secret.len() >= 32, "{what} {token} has no secret part");
        forbidden.push((format!("the {what} secret"), secret.clone()));
        forbidden.push((
            format!("the sha256 of the {what} secret"),
            sha256_hex(&secret),
        ));
    }
    let key_pem = &h.control.identity.ca.key_pem;
    assert!(key_pem.contains("PRIVATE KEY"));
    for line in key_pem.lines().filter(|line| !line.starts_with("-----")) {
        forbidden.push(("a line of the CA key PEM".into(), line.to_string()));
    }
    Needles {
        forbidden,
        present: h.control.identity.ca.fingerprint.clone(),
    }
}

/// Asserts `haystack` (a store's bytes, as text) holds no needle, naming what was found.
fn assert_none_in(haystack: &str, needles: &Needles, store: &str) {
    assert!(
        haystack.contains(&needles.present),
        "{store}: the search finds the CA fingerprint written in the clear"
    );
    for (what, needle) in &needles.forbidden {
        assert!(!haystack.contains(needle.as_str()), "{store} holds {what}");
        assert!(
            !haystack.contains(&hex::encode(needle)),
            "{store} holds {what} as hex"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_file_holds_neither_the_ca_key_nor_any_credential_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let store: Arc<dyn Store> = Arc::new(crate::store::redb::RedbStore::open(&path).unwrap());
    let h = harness_with(store, settings()).await;
    let needles = write_credentials(&h).await;
    // The node's credential works through the sealed record.
    let reply = h.call("GET", "/v1/audit", Some(&h.admin), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let bytes = std::fs::read(&path).unwrap();
    assert_none_in(&String::from_utf8_lossy(&bytes), &needles, "the redb file");
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_postgresql_row_holds_the_ca_key_or_any_credential_secret() {
    let url = std::env::var("OUTPOST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string());
    let schema = format!("outpost_at_rest_{:016x}", rand::random::<u64>());
    let store = {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::task::spawn_blocking(move || {
            crate::store::postgres::PostgresStore::open(&url, &schema).unwrap()
        })
        .await
        .unwrap()
    };
    struct DropSchema(String, String);
    impl Drop for DropSchema {
        fn drop(&mut self) {
            let (url, schema) = (self.0.clone(), self.1.clone());
            // The sync client must not run on an async worker thread.
            let _ = std::thread::spawn(move || {
                if let Ok(mut client) = ::postgres::Client::connect(&url, ::postgres::NoTls) {
                    let _ =
                        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                }
            })
            .join();
        }
    }
    let _guard = DropSchema(url.clone(), schema.clone());
    let h = harness_with(Arc::new(store), settings()).await;
    let needles = write_credentials(&h).await;
    // Every row of every table of the schema, as text (bytea as hex).
    let rows = tokio::task::spawn_blocking(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        let tables: Vec<String> = client
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
                &[&schema],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert!(tables.contains(&"config".to_string()), "{tables:?}");
        let mut text = String::new();
        for table in tables {
            for row in client
                .query(&format!("SELECT t::text FROM {schema}.{table} t"), &[])
                .unwrap()
            {
                text.push_str(row.get::<_, &str>(0));
                text.push('\n');
            }
        }
        text
    })
    .await
    .unwrap();
    // PostgreSQL shows bytea as hex: search the hex of the rows' bytes too.
    let decoded: String = rows
        .split("\\\\x")
        .flat_map(|part| part.split("\\x"))
        .map(|part| {
            let hex_run: String = part.chars().take_while(char::is_ascii_hexdigit).collect();
            String::from_utf8_lossy(&hex::decode(&hex_run).unwrap_or_default()).into_owned()
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_none_in(
        &format!("{rows}\n{decoded}"),
        &needles,
        "the PostgreSQL schema",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_stores_plaintext_records_are_sealed_in_place_at_start() {
    let raw = Arc::new(MemoryStore::new());
    // An older control: the cluster identity, CA key and admin token written in the clear.
    let (identity, _, admin) = crate::init::initialize_or_load(raw.as_ref(), 1).unwrap();
    let admin = admin.unwrap();
    assert!(!is_sealed(
        &raw.get_config(crate::init::CLUSTER_KEY).unwrap().unwrap()
    ));
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let started = Control::start(raw.clone(), settings(), clock.clone())
        .await
        .unwrap();
    assert!(started.admin_token.is_none(), "a warm start");
    let h = Harness {
        router: crate::api::router(Arc::clone(&started.control)),
        control: started.control,
        admin: admin.clone(),
        clock,
    };
    assert_eq!(h.control.identity, identity, "the same CA, opened");
    for (key, bytes) in raw.scan_config("").unwrap() {
        if crate::secret::sealed_records::is_sealed_record(&key) {
            assert!(is_sealed(&bytes), "{key} is still in plaintext");
        }
    }
    // The old admin token still authenticates; the audit shows the sealing by the system.
    let reply = h.call("GET", "/v1/audit", Some(&admin), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let entry = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["act"] == "RecordsSealedAtRest")
        .cloned()
        .unwrap_or_else(|| panic!("no RecordsSealedAtRest in {}", reply.json()));
    assert_eq!(entry["actor"], "system: sealing credentials at rest");
    assert!(
        entry["detail"].as_str().unwrap().starts_with("2 records"),
        "{entry}"
    );
    // A second start seals nothing more.
    let head = h.head();
    let again = SealingStore::new(raw.clone(), test_master_keys());
    let started = Control::start(
        raw.clone(),
        settings(),
        Arc::new(ManualClock::new(1_800_000_000_000)),
    )
    .await
    .unwrap();
    assert_eq!(started.control.store.log_position().unwrap().head, head);
    assert!(
        again
            .get_config(crate::init::CLUSTER_KEY)
            .unwrap()
            .is_some()
    );
}

/// An older redb store (CA key and admin token in the clear) opened as `serve` opens it: the
/// records are sealed and the file compacted, so its bytes no longer hold the CA key.
#[test]
fn a_migrated_redb_file_keeps_no_plaintext_ca_key_in_freed_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let (identity, admin) = {
        let raw = crate::store::redb::RedbStore::open(&path).unwrap();
        let (identity, _, admin) = crate::init::initialize_or_load(&raw, 1).unwrap();
        (identity, admin.unwrap())
    };
    let lines: Vec<String> = identity
        .ca
        .key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::to_string)
        .collect();
    let file_text = || String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
    assert!(lines.iter().all(|line| file_text().contains(line.as_str())));
    let store = crate::server::open_redb(&path, &test_master_keys()).unwrap();
    let sealed = SealingStore::new(Arc::new(store), test_master_keys());
    let principal =
        crate::api::auth::authenticate(&sealed, Some(&format!("Bearer {admin}"))).unwrap();
    assert_eq!(principal.org(), "default");
    drop(sealed);
    let text = file_text();
    for line in &lines {
        assert!(
            !text.contains(line.as_str()),
            "the redb file still holds {line}"
        );
    }
}
