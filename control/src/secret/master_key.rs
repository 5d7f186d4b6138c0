//! The master key (P11): 32 random bytes kept outside the store — a 0600 file under the data
//! directory by default, a file the operator names, or hex in an environment variable — that
//! wraps every secret version's data key. A store file without it opens nothing.
//!
//! Rotation (`outpost-control admin rotate-master-key`) writes the new key beside the old one
//! as `master.key.next`, re-wraps every data key in one store transaction, then renames the new
//! key over the old. A crash between the two leaves both files; the next start uses whichever
//! key the stored data keys name.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use outpost_proto::hash::{sha256_hex, to_hex};

/// Default file name under the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// Environment variable that may hold the key as 64 hex characters instead of a file.
pub const MASTER_KEY_ENV: &str = "OUTPOST_MASTER_KEY";

/// A 32-byte master key and its public id (first 16 hex digits of its sha256). `Debug` shows
/// only the id.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub id: String,
    bytes: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            id: sha256_hex(&bytes)[..16].to_string(),
            bytes,
        }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut bytes);
        Self::from_bytes(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(source: &str, text: &str) -> Result<Self, MasterKeyError> {
        outpost_proto::secret::key_from_hex("master key", text.trim())
            .map(Self::from_bytes)
            .map_err(|_| MasterKeyError::Malformed {
                source_name: source.to_string(),
            })
    }
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file (created 0600 on first start when absent).
    File(PathBuf),
    /// Hex in the named environment variable, read once at start.
    Environment { variable: String },
}

impl MasterKeySource {
    pub fn default_file(data_dir: &Path) -> Self {
        MasterKeySource::File(data_dir.join(MASTER_KEY_FILE))
    }

    pub fn describe(&self) -> String {
        match self {
            MasterKeySource::File(path) => format!("file {}", path.display()),
            MasterKeySource::Environment { variable } => format!("environment variable {variable}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("master key in {source_name} is not 64 hex characters")]
    Malformed { source_name: String },
    #[error("master key file {path} cannot be read or written: {reason}")]
    Io { path: String, reason: String },
    #[error(
        "master key file {path} is readable by others (mode {mode:o}); it must be 0600 (chmod 600 {path})"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("environment variable {variable} holding the master key is not set")]
    MissingEnvironment { variable: String },
    #[error(
        "the store's secrets are wrapped by master key {wanted}, but {source_name} holds key {found}; start control with the key it was using"
    )]
    WrongKey {
        wanted: String,
        found: String,
        source_name: String,
    },
    #[error("rotation needs the master key in a file; {source_name} is not one")]
    NotAFile { source_name: String },
}

fn io_error(path: &Path, error: impl fmt::Display) -> MasterKeyError {
    MasterKeyError::Io {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

/// The file a rotation writes before the store is re-wrapped.
pub fn next_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

fn read_key_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
    let metadata = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MasterKeyError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    MasterKey::from_hex(&path.display().to_string(), &text)
}

/// Writes a key file with mode 0600, never over an existing file.
pub fn write_new_key_file(path: &Path, key: &MasterKey) -> Result<(), MasterKeyError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.write_all(format!("{}\n", to_hex(key.bytes())).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(path, e))
}

/// Loads the key; a missing default or named file is created (the first start). `environment`
/// is the process environment (a map in tests). With a `.next` file beside the key (a rotation
/// that stopped half-way), both are returned, the current first.
pub fn load_or_create(
    source: &MasterKeySource,
    environment: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<MasterKey>, MasterKeyError> {
    match source {
        MasterKeySource::Environment { variable } => {
            let text =
                environment
                    .get(variable)
                    .ok_or_else(|| MasterKeyError::MissingEnvironment {
                        variable: variable.clone(),
                    })?;
            Ok(vec![MasterKey::from_hex(
                &format!("environment variable {variable}"),
                text,
            )?])
        }
        MasterKeySource::File(path) => {
            let next = next_key_path(path);
            let mut keys = Vec::new();
            if path.exists() {
                keys.push(read_key_file(path)?);
            } else if !next.exists() {
                let key = MasterKey::generate();
                write_new_key_file(path, &key)?;
                tracing::info!(
                    "created master key {} in {} (mode 0600); back it up apart from the store",
                    key.id,
                    path.display()
                );
                keys.push(key);
            }
            if next.exists() {
                keys.push(read_key_file(&next)?);
            }
            Ok(keys)
        }
    }
}

/// The keys a control holds: the one new data keys are wrapped with, and any other it can still
/// unwrap with (a rotation that stopped half-way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyring {
    keys: Vec<MasterKey>,
}

impl MasterKeyring {
    pub fn new(keys: Vec<MasterKey>) -> Self {
        Self { keys }
    }

    /// A keyring of one fresh key, for tests and in-memory controls.
    pub fn ephemeral() -> Self {
        Self::new(vec![MasterKey::generate()])
    }

    /// The key new data keys are wrapped with.
    pub fn current(&self) -> Option<&MasterKey> {
        self.keys.first()
    }

    pub fn by_id(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|key| key.id == id)
    }

    /// Makes the key named `id` current (the stored data keys say which one is in use).
    pub fn prefer(&mut self, id: &str) {
        if let Some(index) = self.keys.iter().position(|key| key.id == id) {
            let key = self.keys.remove(index);
            self.keys.insert(0, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_file_is_created_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let source = MasterKeySource::default_file(dir.path());
        let created = load_or_create(&source, &Default::default()).unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_or_create(&source, &Default::default()).unwrap(),
            created
        );
        assert!(!format!("{:?}", created[0]).contains(&to_hex(created[0].bytes())));
    }

    #[test]
    fn an_open_or_malformed_key_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "00".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error =
            load_or_create(&MasterKeySource::File(path.clone()), &Default::default()).unwrap_err();
        assert!(matches!(error, MasterKeyError::TooOpen { .. }), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex").unwrap();
        let error = load_or_create(&MasterKeySource::File(path), &Default::default()).unwrap_err();
        assert!(error.to_string().contains("not 64 hex"), "{error}");
    }

    #[test]
    fn the_key_can_come_from_the_environment() {
        let source = MasterKeySource::Environment {
            variable: MASTER_KEY_ENV.into(),
        };
        let env = [(MASTER_KEY_ENV.to_string(), "ab".repeat(32))].into();
        assert_eq!(load_or_create(&source, &env).unwrap().len(), 1);
        assert!(matches!(
            load_or_create(&source, &Default::default()),
            Err(MasterKeyError::MissingEnvironment { .. })
        ));
    }
}
