//! The edge's local state (E1): one redb file with the identity and the last-good route table
//! (its cursor inside, so both change in one transaction), plus sealed copies beside it
//! (`routes.last-good`, `routes.previous`, `identity.json`) so a corrupt or deleted store loses
//! neither the routes nor the credential. Boot never needs the network: it reads redb, then the
//! copies, and says which one it used.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use outpost_proto::route::EdgeTable;
use redb::{Database, DatabaseError, ReadableDatabase, StorageError, TableDefinition};
use serde::{Deserialize, Serialize};

pub const STORE_FILE_NAME: &str = "edge.redb";
pub const LAST_GOOD_FILE_NAME: &str = "routes.last-good";
pub const PREVIOUS_FILE_NAME: &str = "routes.previous";
pub const IDENTITY_FILE_NAME: &str = "identity.json";

const CACHE: TableDefinition<&str, &[u8]> = TableDefinition::new("cache");
const KEY_IDENTITY: &str = "identity";
const KEY_TABLE: &str = "table";
const SEAL_MAGIC: &str = "OPEDGE1";

/// Who this edge is to control. The credential and the sealing key are secrets: never logged or
/// printed (its `Debug` shows them as `<redacted>`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeIdentity {
    pub edge_id: String,
    pub credential: String,
    pub control_url: String,
    pub ca_sha256: String,
    pub org: String,
    /// The edge's X25519 sealing key (64 hex; a secret like the credential): TLS secrets arrive
    /// sealed for its public half and are opened in memory only.
    #[serde(default)]
    pub sealing_key: Option<String>,
}

impl std::fmt::Debug for EdgeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeIdentity")
            .field("edge_id", &self.edge_id)
            .field("credential", &"<redacted>")
            .field("control_url", &self.control_url)
            .field("ca_sha256", &self.ca_sha256)
            .field("org", &self.org)
            .field(
                "sealing_key",
                &self.sealing_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl EdgeIdentity {
    /// The sealing key, when the identity has a well-formed one.
    pub fn edge_key(&self) -> Option<crate::certs::EdgeKey> {
        let hex = self.sealing_key.as_deref()?;
        let private_key = outpost_proto::secret::key_from_hex("sealing key", hex).ok()?;
        Some(crate::certs::EdgeKey {
            edge_id: self.edge_id.clone(),
            private_key,
        })
    }
}

/// Where the table served at boot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootSource {
    Store,
    LastGoodCopy,
    PreviousCopy,
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("edge store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("edge store {path} is in use by another outpost-edge")]
    Locked { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn store_error(path: &Path, error: impl std::fmt::Display) -> CacheError {
    CacheError::Store {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// Seals bytes with their sha256 so a torn or altered copy is recognised.
pub fn seal(json: &[u8]) -> Vec<u8> {
    let mut sealed = format!("{SEAL_MAGIC} {}\n", crate::control::hex_sha256(json)).into_bytes();
    sealed.extend_from_slice(json);
    sealed
}

/// The JSON of sealed bytes, or why they are not intact.
pub fn unseal(sealed: &[u8]) -> Result<&[u8], String> {
    let newline = sealed
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no seal line")?;
    let line = std::str::from_utf8(&sealed[..newline]).map_err(|_| "seal line is not text")?;
    let digest = line
        .strip_prefix(SEAL_MAGIC)
        .map(str::trim)
        .ok_or("unknown seal")?;
    let json = &sealed[newline + 1..];
    if crate::control::hex_sha256(json) != digest {
        return Err("checksum mismatch".into());
    }
    Ok(json)
}

fn decode_table(sealed: &[u8]) -> Result<EdgeTable, String> {
    let json = unseal(sealed)?;
    serde_json::from_slice(json).map_err(|e| format!("does not decode: {e}"))
}

/// Writes a file atomically: a temporary file, fsync, rename, fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CacheError> {
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| CacheError::Write {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&temporary, path).map_err(error)?;
    if let Some(folder) = path.parent()
        && let Ok(folder) = fs::File::open(folder)
    {
        let _ = folder.sync_all();
    }
    Ok(())
}

/// The open store and how boot found it.
pub struct Cache {
    dir: PathBuf,
    db: Database,
    /// A note for status and the log when the store was recovered.
    pub recovery_note: Option<String>,
}

fn is_corruption(error: &DatabaseError) -> bool {
    match error {
        DatabaseError::Storage(StorageError::Corrupted(_)) => true,
        DatabaseError::Storage(StorageError::Io(e)) => matches!(
            e.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        DatabaseError::RepairAborted | DatabaseError::UpgradeRequired(_) => true,
        _ => false,
    }
}

impl Cache {
    /// Opens the store; a corrupt one is moved aside (kept for forensics) and replaced by an
    /// empty one, and the copies fill in.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(dir).map_err(|source| CacheError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(STORE_FILE_NAME);
        let empty_file = path.metadata().map(|m| m.len() == 0).unwrap_or(false);
        let opened = if path.exists() && !empty_file {
            Database::builder()
                .set_check_integrity_on_open(true)
                .open(&path)
        } else {
            Database::builder().create(&path)
        };
        match opened {
            Ok(db) => Ok(Cache {
                dir: dir.to_path_buf(),
                db,
                recovery_note: None,
            }),
            Err(DatabaseError::DatabaseAlreadyOpen) => Err(CacheError::Locked { path }),
            Err(error) if is_corruption(&error) => {
                let moved_to = dir.join(format!(
                    "{STORE_FILE_NAME}.corrupt-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                fs::rename(&path, &moved_to).map_err(|e| store_error(&path, e))?;
                let db = Database::builder()
                    .create(&path)
                    .map_err(|e| store_error(&path, e))?;
                Ok(Cache {
                    dir: dir.to_path_buf(),
                    db,
                    recovery_note: Some(format!(
                        "the store was corrupt ({error}); moved aside to {}",
                        moved_to.display()
                    )),
                })
            }
            Err(error) => Err(store_error(&path, error)),
        }
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let rtx = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = match rtx.open_table(CACHE) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let value = table.get(key).map_err(|e| e.to_string())?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn write(&self, key: &str, value: &[u8]) -> Result<(), CacheError> {
        let path = self.dir.join(STORE_FILE_NAME);
        let wtx = self.db.begin_write().map_err(|e| store_error(&path, e))?;
        {
            let mut table = wtx.open_table(CACHE).map_err(|e| store_error(&path, e))?;
            table
                .insert(key, value)
                .map_err(|e| store_error(&path, e))?;
        }
        wtx.commit().map_err(|e| store_error(&path, e))
    }

    /// The identity from the store, else from its copy.
    pub fn identity(&self) -> Option<EdgeIdentity> {
        if let Ok(Some(bytes)) = self.read(KEY_IDENTITY)
            && let Ok(identity) = serde_json::from_slice(&bytes)
        {
            return Some(identity);
        }
        let bytes = fs::read(self.dir.join(IDENTITY_FILE_NAME)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_identity(&self, identity: &EdgeIdentity) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(identity).unwrap_or_default();
        self.write(KEY_IDENTITY, &bytes)?;
        write_atomically(&self.dir.join(IDENTITY_FILE_NAME), &bytes, 0o600)
    }

    /// The table to serve at boot: the store's, else the last-good copy, else the previous copy,
    /// else empty; with notes on every source that was skipped and why.
    pub fn boot_table(&self) -> (EdgeTable, BootSource, Vec<String>) {
        let mut notes = Vec::new();
        match self.read(KEY_TABLE) {
            Ok(Some(sealed)) => match decode_table(&sealed) {
                Ok(table) => return (table, BootSource::Store, notes),
                Err(reason) => notes.push(format!("the store's route table {reason}")),
            },
            Ok(None) => notes.push("the store holds no route table".into()),
            Err(reason) => notes.push(format!("the store's route table is unreadable: {reason}")),
        }
        for (file, source) in [
            (LAST_GOOD_FILE_NAME, BootSource::LastGoodCopy),
            (PREVIOUS_FILE_NAME, BootSource::PreviousCopy),
        ] {
            let path = self.dir.join(file);
            match fs::read(&path) {
                Ok(sealed) => match decode_table(&sealed) {
                    Ok(table) => return (table, source, notes),
                    Err(reason) => notes.push(format!("{} {reason}", path.display())),
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => notes.push(format!("{}: {error}", path.display())),
            }
        }
        (EdgeTable::default(), BootSource::Empty, notes)
    }

    /// Keeps a table that validated and now serves: in the store (table and cursor in one
    /// transaction), then as the last-good copy, the copy before it kept as previous.
    pub fn save_table(&self, table: &EdgeTable) -> Result<(), CacheError> {
        let sealed = seal(&serde_json::to_vec(table).unwrap_or_default());
        self.write(KEY_TABLE, &sealed)?;
        let last_good = self.dir.join(LAST_GOOD_FILE_NAME);
        if let Ok(current) = fs::read(&last_good)
            && unseal(&current).is_ok()
        {
            write_atomically(&self.dir.join(PREVIOUS_FILE_NAME), &current, 0o600)?;
        }
        write_atomically(&last_good, &sealed, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::Cursor;

    fn table(event_id: u64) -> EdgeTable {
        EdgeTable {
            as_of: Cursor::new(7, event_id),
            ..EdgeTable::default()
        }
    }

    #[test]
    fn an_identity_prints_neither_its_credential_nor_its_sealing_key() {
        let identity = EdgeIdentity {
            edge_id: "edge-1".into(),
            credential: "cred-SECRET-0123".into(),
            control_url: "https://127.0.0.1:7443".into(),
            ca_sha256: "ab".repeat(32),
            org: "default".into(),
            sealing_key: Some("5e".repeat(32)),
        };
        for printed in [format!("{identity:?}"), format!("{identity:#?}")] {
            assert!(!printed.contains("cred-SECRET-0123"), "{printed}");
            assert!(!printed.contains(&"5e".repeat(32)), "{printed}");
            assert!(printed.contains("edge-1") && printed.contains("<redacted>"));
        }
    }

    #[test]
    fn a_saved_table_comes_back_from_the_store_and_survives_its_loss() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            assert_eq!(cache.boot_table().1, BootSource::Empty);
            cache.save_table(&table(1)).unwrap();
            cache.save_table(&table(2)).unwrap();
            let (booted, source, _) = cache.boot_table();
            assert_eq!((booted.as_of.event_id, source), (2, BootSource::Store));
        }
        // A corrupt store file: moved aside, the last-good copy serves.
        fs::write(dir.path().join(STORE_FILE_NAME), b"garbage garbage garbage").unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.recovery_note.is_some());
        let (booted, source, _) = cache.boot_table();
        assert_eq!(
            (booted.as_of.event_id, source),
            (2, BootSource::LastGoodCopy)
        );
        drop(cache);
        // A damaged last-good copy too: the previous copy serves, and the notes say why.
        fs::remove_file(dir.path().join(STORE_FILE_NAME)).unwrap();
        let mut damaged = fs::read(dir.path().join(LAST_GOOD_FILE_NAME)).unwrap();
        let last = damaged.len() - 2;
        damaged[last] ^= 1;
        fs::write(dir.path().join(LAST_GOOD_FILE_NAME), damaged).unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (booted, source, notes) = cache.boot_table();
        assert_eq!(
            (booted.as_of.event_id, source),
            (1, BootSource::PreviousCopy)
        );
        assert!(notes.iter().any(|n| n.contains("checksum")), "{notes:?}");
    }

    #[test]
    fn seals_detect_changes() {
        let sealed = seal(b"{\"a\":1}");
        assert_eq!(unseal(&sealed).unwrap(), b"{\"a\":1}");
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() = b'2';
        assert!(unseal(&changed).is_err());
        assert!(unseal(b"nothing").is_err());
    }
}
