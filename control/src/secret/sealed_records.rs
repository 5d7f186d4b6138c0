//! Credentials and the CA key at rest (P11, issue 12 item 6): the config records that hold the
//! cluster identity (with the CA's private key), node and edge credentials, operator tokens and
//! enrollment tokens are sealed under the master key — XChaCha20-Poly1305, associated data =
//! the record's key, so a record cannot be moved to another key — by [`SealingStore`], a
//! decorator of the store port that seals these writes and opens these reads. Logic above it
//! never sees a sealed record; a stolen store file (redb or PostgreSQL) opens none of them.
//!
//! An older store's plaintext records are sealed in place at start ([`seal_plaintext_records`],
//! with a `RecordsSealedAtRest` event), and `admin rotate-master-key` re-seals them under the
//! new key ([`reseal_records`]).

use std::sync::Arc;

use outpost_proto::cursor::LogPosition;
use outpost_proto::hash::{from_hex, to_hex};
use outpost_proto::secret::{open_with_key, seal_with_key};
use serde::{Deserialize, Serialize};

use super::at_rest::random;
use super::master_key::{MasterKey, MasterKeyring};
use crate::log::Event;
use crate::store::{
    Commit, CommitOutcome, Durability, Sharing, Store, StoreError, StoredEvent, TableWrite,
};

/// Config key of the cluster identity (CA certificate and private key).
const CLUSTER_RECORD: &str = crate::init::CLUSTER_KEY;

/// Key prefixes of the credential records sealed at rest.
const CREDENTIAL_PREFIXES: [&str; 4] = [
    "node-credential/",
    "edge-credential/",
    "operator-token/",
    "enrollment-token/",
];

/// What a sealed record starts with; a plaintext record (JSON) starts with `{`.
const SEALED_MAGIC: &[u8] = b"outpost-sealed-record-v1\n";

/// Whether the config record `key` is kept sealed.
pub fn is_sealed_record(key: &str) -> bool {
    key == CLUSTER_RECORD
        || CREDENTIAL_PREFIXES
            .iter()
            .any(|prefix| key.starts_with(prefix))
}

/// A record sealed under a master key, after [`SEALED_MAGIC`] in the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SealedRecord {
    master_key_id: String,
    nonce: String,
    ciphertext: String,
}

fn record_aad(key: &str) -> Vec<u8> {
    format!("outpost sealed record v1\0{key}").into_bytes()
}

fn corrupt(key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: format!("config record {key}"),
        reason: reason.into(),
    }
}

/// Seals `plaintext` as the record `key` under `master`.
pub fn seal_record(master: &MasterKey, key: &str, plaintext: &[u8]) -> Vec<u8> {
    let nonce = random::<24>();
    let sealed = SealedRecord {
        master_key_id: master.id.clone(),
        nonce: to_hex(&nonce),
        ciphertext: to_hex(&seal_with_key(
            master.bytes(),
            &nonce,
            &record_aad(key),
            plaintext,
        )),
    };
    let mut bytes = SEALED_MAGIC.to_vec();
    // Serializing three strings cannot fail.
    bytes.extend(serde_json::to_vec(&sealed).unwrap_or_default());
    bytes
}

/// Whether stored bytes are a sealed record (rather than an older store's plaintext).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(SEALED_MAGIC)
}

/// Opens the stored record `key` with whichever key of `keyring` sealed it; plaintext (an older
/// store not yet migrated) is returned as it is.
pub fn open_record(
    keyring: &MasterKeyring,
    key: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let Some(body) = bytes.strip_prefix(SEALED_MAGIC) else {
        return Ok(bytes.to_vec());
    };
    let sealed: SealedRecord = serde_json::from_slice(body)
        .map_err(|e| corrupt(key, format!("sealed record does not decode: {e}")))?;
    let master = keyring.by_id(&sealed.master_key_id).ok_or_else(|| {
        corrupt(
            key,
            format!(
                "sealed under master key {}, which this control does not hold; start control with the key it was using",
                sealed.master_key_id
            ),
        )
    })?;
    let does_not_open = || corrupt(key, "sealed record does not open: it was changed or moved");
    let nonce: [u8; 24] = from_hex(&sealed.nonce)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(does_not_open)?;
    let ciphertext = from_hex(&sealed.ciphertext).ok_or_else(does_not_open)?;
    open_with_key(master.bytes(), &nonce, &record_aad(key), &ciphertext)
        .map_err(|_| does_not_open())
}

/// Every record kept sealed, as stored (sealed or, in an older store, plaintext).
fn sealed_records_of(store: &dyn Store) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut records: Vec<(String, Vec<u8>)> = store
        .get_config(CLUSTER_RECORD)?
        .map(|bytes| (CLUSTER_RECORD.to_string(), bytes))
        .into_iter()
        .collect();
    for prefix in CREDENTIAL_PREFIXES {
        records.extend(store.scan_config(prefix)?);
    }
    Ok(records)
}

fn current_key(keyring: &MasterKeyring) -> Result<&MasterKey, StoreError> {
    keyring
        .current()
        .ok_or_else(|| StoreError::Backend("no master key to seal credentials with".into()))
}

/// Seals in place the records an older store kept in plaintext, in one commit with a
/// `RecordsSealedAtRest` event; returns how many. Runs on the undecorated store at start.
pub fn seal_plaintext_records(
    store: &dyn Store,
    keyring: &MasterKeyring,
    now_unix_ms: u64,
) -> Result<usize, StoreError> {
    let writes: Vec<TableWrite> = sealed_records_of(store)?
        .into_iter()
        .filter(|(_, bytes)| !is_sealed(bytes))
        .map(|(key, bytes)| {
            Ok(TableWrite::Put {
                value: seal_record(current_key(keyring)?, &key, &bytes),
                key,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let records = writes.len();
    if records == 0 {
        return Ok(0);
    }
    let event = Event::RecordsSealedAtRest {
        records,
        master_key_id: current_key(keyring)?.id.clone(),
    };
    store.commit(Commit {
        events: vec![event.to_new_event()],
        config_writes: writes,
        at_unix_ms: now_unix_ms,
        ..Commit::default()
    })?;
    Ok(records)
}

/// The writes that re-seal every sealed record (and seal any plaintext one) under `new_key`,
/// for a master key rotation's commit.
pub fn reseal_records(
    store: &dyn Store,
    keyring: &MasterKeyring,
    new_key: &MasterKey,
) -> Result<Vec<TableWrite>, StoreError> {
    sealed_records_of(store)?
        .into_iter()
        .map(|(key, bytes)| {
            let plaintext = open_record(keyring, &key, &bytes)?;
            Ok(TableWrite::Put {
                value: seal_record(new_key, &key, &plaintext),
                key,
            })
        })
        .collect()
}

/// The store port with the credential records sealed: writes of [`is_sealed_record`] keys are
/// sealed under the keyring's current key, reads of them opened. Everything else passes through.
pub struct SealingStore {
    inner: Arc<dyn Store>,
    keyring: MasterKeyring,
}

impl SealingStore {
    pub fn new(inner: Arc<dyn Store>, keyring: MasterKeyring) -> Self {
        Self { inner, keyring }
    }

    fn seal_writes(&self, writes: &mut [TableWrite]) -> Result<(), StoreError> {
        for write in writes {
            // Already sealed by `prepare_writes` (plaintext records are JSON, never the magic).
            if let TableWrite::Put { key, value } = write
                && is_sealed_record(key)
                && !is_sealed(value)
            {
                *value = seal_record(current_key(&self.keyring)?, key, value);
            }
        }
        Ok(())
    }

    fn open(&self, key: &str, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        if is_sealed_record(key) {
            open_record(&self.keyring, key, &bytes)
        } else {
            Ok(bytes)
        }
    }
}

impl Store for SealingStore {
    fn point_reads_in_place(&self) -> bool {
        self.inner.point_reads_in_place()
    }

    fn commit_batch(&self, mut batch: Vec<Commit>) -> Result<Vec<CommitOutcome>, StoreError> {
        for commit in &mut batch {
            self.seal_writes(&mut commit.config_writes)?;
        }
        self.inner.commit_batch(batch)
    }

    fn prepare_writes(&self, writes: &mut [TableWrite]) -> Result<(), StoreError> {
        self.seal_writes(writes)?;
        self.inner.prepare_writes(writes)
    }

    fn read_idempotency(&self, key: &str) -> Result<Option<CommitOutcome>, StoreError> {
        self.inner.read_idempotency(key)
    }

    fn read_log(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_log(after, limit)
    }

    fn read_routed(
        &self,
        routing_key: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_routed(routing_key, after, limit)
    }

    fn read_aggregate(&self, aggregate: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_aggregate(aggregate)
    }

    fn log_position(&self) -> Result<LogPosition, StoreError> {
        self.inner.log_position()
    }

    fn set_log_epoch(&self, log_epoch: u64) -> Result<(), StoreError> {
        self.inner.set_log_epoch(log_epoch)
    }

    fn get_config(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner
            .get_config(key)?
            .map(|bytes| self.open(key, bytes))
            .transpose()
    }

    fn scan_config(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner
            .scan_config(prefix)?
            .into_iter()
            .map(|(key, bytes)| Ok((key.clone(), self.open(&key, bytes)?)))
            .collect()
    }

    fn get_volatile(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_volatile(key)
    }

    fn put_volatile(
        &self,
        writes: Vec<TableWrite>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.inner.put_volatile(writes, durability)
    }

    fn scan_volatile(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_volatile(prefix)
    }

    fn save_projection(&self, name: &str, snapshot: Vec<u8>) -> Result<(), StoreError> {
        self.inner.save_projection(name, snapshot)
    }

    fn load_projection(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.load_projection(name)
    }

    fn drop_projections(&self) -> Result<(), StoreError> {
        self.inner.drop_projections()
    }

    fn shared(&self) -> Sharing {
        self.inner.shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn put(key: &str, value: &[u8]) -> TableWrite {
        TableWrite::Put {
            key: key.into(),
            value: value.to_vec(),
        }
    }

    fn commit_writes(store: &dyn Store, writes: Vec<TableWrite>) {
        store
            .commit(Commit {
                config_writes: writes,
                ..Commit::default()
            })
            .unwrap();
    }

    #[test]
    fn credential_records_are_sealed_below_and_open_above() {
        let raw = Arc::new(MemoryStore::new());
        let keyring = MasterKeyring::ephemeral();
        let sealing = SealingStore::new(raw.clone(), keyring.clone());
        let credential = br#"{"org":"acme","secret_sha256":"c0ffee"}"#;
        commit_writes(
            &sealing,
            vec![
                put("node-credential/n1", credential),
                put("cluster", b"{\"ca\":\"-----BEGIN PRIVATE KEY-----\"}"),
                put("secret-data-key/acme/db/1", b"{\"wrapped\":\"ab\"}"),
            ],
        );
        let below = raw.get_config("node-credential/n1").unwrap().unwrap();
        assert!(is_sealed(&below));
        assert!(!String::from_utf8_lossy(&below).contains("c0ffee"));
        assert!(is_sealed(&raw.get_config("cluster").unwrap().unwrap()));
        // Records that are not credentials pass through as they are.
        assert_eq!(
            raw.get_config("secret-data-key/acme/db/1")
                .unwrap()
                .unwrap(),
            b"{\"wrapped\":\"ab\"}"
        );
        assert_eq!(
            sealing.get_config("node-credential/n1").unwrap().unwrap(),
            credential
        );
        assert_eq!(
            sealing.scan_config("node-credential/").unwrap(),
            vec![("node-credential/n1".to_string(), credential.to_vec())]
        );
        // Another master key opens nothing, and says which key it needs.
        let stranger = SealingStore::new(raw.clone(), MasterKeyring::ephemeral());
        let error = stranger.get_config("node-credential/n1").unwrap_err();
        assert!(
            error.to_string().contains(&keyring.current().unwrap().id),
            "{error}"
        );
        // A record copied under another key does not open.
        commit_writes(raw.as_ref(), vec![put("node-credential/n2", &below)]);
        let error = sealing.get_config("node-credential/n2").unwrap_err();
        assert!(error.to_string().contains("does not open"), "{error}");
    }

    #[test]
    fn plaintext_records_are_sealed_in_place_once_and_rotation_reseals_them() {
        let raw = Arc::new(MemoryStore::new());
        let credential = br#"{"org":"acme","secret_sha256":"c0ffee"}"#;
        commit_writes(
            raw.as_ref(),
            vec![
                put("operator-token/t1", credential),
                put("edge-credential/e1", credential),
                put("route-tls/other", b"left alone"),
            ],
        );
        let old = MasterKeyring::ephemeral();
        assert_eq!(seal_plaintext_records(raw.as_ref(), &old, 1).unwrap(), 2);
        assert_eq!(seal_plaintext_records(raw.as_ref(), &old, 2).unwrap(), 0);
        let events = raw.read_log(0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "RecordsSealedAtRest");
        assert!(is_sealed(
            &raw.get_config("operator-token/t1").unwrap().unwrap()
        ));
        assert_eq!(
            raw.get_config("route-tls/other").unwrap().unwrap(),
            b"left alone"
        );
        let new = MasterKey::generate();
        let writes = reseal_records(raw.as_ref(), &old, &new).unwrap();
        assert_eq!(writes.len(), 2);
        commit_writes(raw.as_ref(), writes);
        let rotated = SealingStore::new(raw.clone(), MasterKeyring::new(vec![new]));
        assert_eq!(
            rotated.get_config("edge-credential/e1").unwrap().unwrap(),
            credential
        );
        assert!(
            SealingStore::new(raw, old)
                .get_config("edge-credential/e1")
                .is_err()
        );
    }
}
