//! `outpost-control admin rotate-master-key`: re-wraps every data key under a new master key,
//! and re-seals the CA key and credentials (`sealed_records`), offline (control stopped). The new key is written first as `KEY.next` (0600), the store's
//! data keys are re-wrapped in one transaction with a `MasterKeyRotated` event, then `KEY.next`
//! replaces `KEY`. Interrupted at any point, the next start holds both keys and opens every
//! data key; running the rotation again finishes it.

use std::path::{Path, PathBuf};

use super::at_rest::{WrappedDataKey, data_key_record, unwrap_data_key, wrap_data_key};
use super::master_key::{
    MasterKey, MasterKeyError, MasterKeySource, MasterKeyring, load_or_create, next_key_path,
    write_new_key_file,
};
use crate::log::Event;
use crate::store::{Commit, Store, StoreError, TableWrite};

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Key(#[from] MasterKeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("replay failed: {0}")]
    Replay(String),
    #[error("data key {record} does not decode: {reason}")]
    Corrupt { record: String, reason: String },
    #[error("{0}")]
    Unwrap(#[from] super::at_rest::AtRestError),
    #[error("cannot put the new master key in place at {path}: {reason}")]
    Rename { path: String, reason: String },
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    pub from_key_id: String,
    pub to_key_id: String,
    pub data_keys: usize,
    /// Credential records and the CA key re-sealed.
    pub sealed_records: usize,
    pub key_file: PathBuf,
}

/// Rotates the master key in `source` (a file) for the store's secrets.
pub fn rotate_master_key(
    store: &dyn Store,
    source: &MasterKeySource,
) -> Result<RotationReport, RotateError> {
    let MasterKeySource::File(path) = source else {
        return Err(MasterKeyError::NotAFile {
            source_name: source.describe(),
        }
        .into());
    };
    let keys = load_or_create(source, &Default::default())?;
    let next_path = next_key_path(path);
    let from_key_id = keys.first().map(|k| k.id.clone()).unwrap_or_default();
    // A rotation that stopped half-way left KEY.next: finish with that key.
    let new_key = match keys.get(1) {
        Some(next) => next.clone(),
        None => {
            let key = MasterKey::generate();
            write_new_key_file(&next_path, &key)?;
            key
        }
    };
    let keyring = MasterKeyring::new(keys);
    let views = crate::projection::projector::replay(store).map_err(RotateError::Replay)?;
    let mut writes = Vec::new();
    for record in views.secrets.secrets.values() {
        for version in 1..=record.version {
            let key = data_key_record(&record.org, &record.name, version);
            let Some(bytes) = store.get_config(&key)? else {
                continue;
            };
            let wrapped: WrappedDataKey =
                serde_json::from_slice(&bytes).map_err(|e| RotateError::Corrupt {
                    record: key.clone(),
                    reason: e.to_string(),
                })?;
            let data_key = unwrap_data_key(&keyring, &record.org, &record.name, version, &wrapped)?;
            let rewrapped = wrap_data_key(&new_key, &record.org, &record.name, version, &data_key);
            writes.push(TableWrite::Put {
                key,
                value: serde_json::to_vec(&rewrapped).unwrap_or_default(),
            });
        }
    }
    let data_keys = writes.len();
    // The CA key and credentials, sealed under the same master key.
    let resealed = super::sealed_records::reseal_records(store, &keyring, &new_key)?;
    let sealed_records = resealed.len();
    writes.extend(resealed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    store.commit(Commit {
        events: vec![
            Event::MasterKeyRotated {
                from_key_id: from_key_id.clone(),
                to_key_id: new_key.id.clone(),
                data_keys,
                sealed_records,
            }
            .to_new_event(),
        ],
        config_writes: writes,
        at_unix_ms: now,
        ..Commit::default()
    })?;
    std::fs::rename(&next_path, path)
        .and_then(|()| {
            let parent = path.parent().unwrap_or(Path::new("."));
            std::fs::File::open(parent).and_then(|dir| dir.sync_all())
        })
        .map_err(|e| RotateError::Rename {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(RotationReport {
        from_key_id,
        to_key_id: new_key.id,
        data_keys,
        sealed_records,
        key_file: path.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::at_rest::{open_version, seal_version};
    use crate::store::memory::MemoryStore;
    use outpost_proto::secret::SecretValues;
    use std::collections::BTreeMap;

    fn store_with_secret(
        master: &MasterKey,
    ) -> (MemoryStore, crate::secret::at_rest::SealedVersion) {
        let store = MemoryStore::new();
        let values = SecretValues(BTreeMap::from([("password".into(), "v4lue".into())]));
        let (sealed, wrapped) = seal_version(master, "acme", "db", 1, &values);
        store
            .commit(Commit {
                events: vec![
                    Event::SecretVersionSet {
                        org: "acme".into(),
                        name: "db".into(),
                        version: 1,
                        keys: vec!["password".into()],
                        sealed: sealed.clone(),
                        actor: "opa.t".into(),
                    }
                    .to_new_event(),
                ],
                config_writes: vec![crate::app::Control::config_put(
                    data_key_record("acme", "db", 1),
                    &wrapped,
                )],
                ..Commit::default()
            })
            .unwrap();
        (store, sealed)
    }

    fn stored_data_key(store: &MemoryStore) -> WrappedDataKey {
        serde_json::from_slice(
            &store
                .get_config(&data_key_record("acme", "db", 1))
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn rotation_rewraps_every_data_key_and_replaces_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = MasterKeySource::default_file(dir.path());
        let old = load_or_create(&source, &Default::default())
            .unwrap()
            .remove(0);
        let (store, sealed) = store_with_secret(&old);
        let report = rotate_master_key(&store, &source).unwrap();
        assert_eq!(
            (report.from_key_id.as_str(), report.data_keys),
            (old.id.as_str(), 1)
        );
        let keys = load_or_create(&source, &Default::default()).unwrap();
        assert_eq!(keys.len(), 1, "the .next file is gone");
        assert_eq!(keys[0].id, report.to_key_id);
        assert_ne!(keys[0].id, old.id);
        let wrapped = stored_data_key(&store);
        assert_eq!(wrapped.master_key_id, report.to_key_id);
        let values = open_version(
            &MasterKeyring::new(keys),
            "acme",
            "db",
            1,
            &sealed,
            &wrapped,
        )
        .unwrap();
        assert_eq!(values.get("password"), Some("v4lue"));
        // The old key opens nothing any more.
        assert!(
            open_version(
                &MasterKeyring::new(vec![old]),
                "acme",
                "db",
                1,
                &sealed,
                &wrapped
            )
            .is_err()
        );
    }

    #[test]
    fn a_rotation_interrupted_after_the_commit_is_finished_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let source = MasterKeySource::default_file(dir.path());
        let old = load_or_create(&source, &Default::default())
            .unwrap()
            .remove(0);
        let (store, sealed) = store_with_secret(&old);
        // As if a rotation wrote KEY.next and re-wrapped, then stopped before the rename.
        let next = MasterKey::generate();
        let path = dir.path().join(crate::secret::master_key::MASTER_KEY_FILE);
        write_new_key_file(&next_key_path(&path), &next).unwrap();
        let data_key = unwrap_data_key(
            &MasterKeyring::new(vec![old.clone()]),
            "acme",
            "db",
            1,
            &stored_data_key(&store),
        )
        .unwrap();
        store
            .commit(Commit {
                config_writes: vec![crate::app::Control::config_put(
                    data_key_record("acme", "db", 1),
                    &wrap_data_key(&next, "acme", "db", 1, &data_key),
                )],
                events: vec![
                    Event::MasterKeyRotated {
                        from_key_id: old.id.clone(),
                        to_key_id: next.id.clone(),
                        data_keys: 1,
                        sealed_records: 0,
                    }
                    .to_new_event(),
                ],
                ..Commit::default()
            })
            .unwrap();
        // A start in between holds both keys and opens the secret.
        let both = MasterKeyring::new(load_or_create(&source, &Default::default()).unwrap());
        assert!(open_version(&both, "acme", "db", 1, &sealed, &stored_data_key(&store)).is_ok());
        let report = rotate_master_key(&store, &source).unwrap();
        assert_eq!(report.to_key_id, next.id);
        let keys = load_or_create(&source, &Default::default()).unwrap();
        assert_eq!(
            keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
            vec![next.id]
        );
    }

    #[test]
    fn a_key_in_the_environment_cannot_be_rotated_here() {
        let store = MemoryStore::new();
        let source = MasterKeySource::Environment {
            variable: "OUTPOST_MASTER_KEY".into(),
        };
        let error = rotate_master_key(&store, &source).unwrap_err();
        assert!(
            error.to_string().contains("needs the master key in a file"),
            "{error}"
        );
    }
}
