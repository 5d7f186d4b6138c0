//! `outpost-control admin rotate-master-key`: re-wraps every data key under a new master key,
//! offline (control stopped). The new key is written first as `KEY.next` (0600), the store's
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
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    store.commit(Commit {
        events: vec![
            Event::MasterKeyRotated {
                from_key_id: from_key_id.clone(),
                to_key_id: new_key.id.clone(),
                data_keys,
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
        key_file: path.clone(),
    })
}
