//! The artifact cache (R1): what the plans reference, fetched from control over the pinned TLS
//! with the node credential, resumed after a cut (HTTP `Range`), verified against its sha256,
//! unpacked into a fresh directory and renamed into place, so a half-written artifact is never
//! run. Layout under `DATA_DIR/artifacts/`:
//!
//! - `partial/SHA` — a download in progress (kept across cuts and restarts, to resume);
//! - `blobs/SHA` — a verified download waiting to be unpacked;
//! - `staging/SHA.RANDOM/` — an unpack in progress;
//! - `unpacked/SHA/` and `unpacked/SHA.manifest` — the ready tree and what it must hold.
//!
//! At boot every cached artifact the plan references is checked against its manifest; a
//! corrupt one is removed (never run) and fetched again once control answers. Garbage
//! collection keeps the cache under `--artifact-cache-bytes` but never removes what the
//! last-good or candidate plan references.

pub mod fetch;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fetch_tests;
pub mod unpack;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use outpost_proto::plan::Plan;
use sha2::{Digest, Sha256};

use unpack::{Manifest, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {sha256}: download failed: {reason}")]
    Download { sha256: String, reason: String },
    #[error("artifact {sha256}: the download hashes to {found}; it was discarded")]
    HashMismatch { sha256: String, found: String },
    #[error("artifact {sha256}: {source}")]
    Unpack {
        sha256: String,
        #[source]
        source: UnpackError,
    },
    #[error("artifact {sha256} in the cache is corrupt ({reason}); it was removed and is not run")]
    Corrupt { sha256: String, reason: String },
    #[error("artifact cache: cannot {what} {path}: {reason}")]
    Io {
        what: &'static str,
        path: String,
        reason: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ArtifactError + 'a {
    move |error| ArtifactError::Io {
        what,
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

/// The sha256s of the artifacts a plan's allocations reference.
pub fn plan_artifacts(plan: &Plan) -> BTreeSet<String> {
    plan.allocations
        .iter()
        .filter_map(|a| a.spec.artifact.as_ref().map(|r| r.sha256.clone()))
        .collect()
}

/// The cache under `DATA_DIR/artifacts`.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    root: PathBuf,
}

/// What garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub kept_bytes: u64,
    /// The referenced artifacts alone are over the cap.
    pub over_cap: bool,
}

impl ArtifactCache {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("artifacts"),
        }
    }

    /// Where the ready tree of `sha256` lives (what `OUTPOST_ARTIFACT_DIR` names).
    pub fn dir(&self, sha256: &str) -> PathBuf {
        self.root.join("unpacked").join(sha256)
    }

    fn manifest_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("unpacked")
            .join(format!("{sha256}.manifest"))
    }

    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.root.join("partial").join(sha256)
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }

    /// Whether `sha256` is unpacked and may run.
    pub fn is_ready(&self, sha256: &str) -> bool {
        self.dir(sha256).is_dir() && self.manifest_path(sha256).is_file()
    }

    fn read_manifest(&self, sha256: &str) -> Result<Manifest, String> {
        let bytes = std::fs::read(self.manifest_path(sha256)).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("manifest: {e}"))
    }

    /// Checks the ready tree against its manifest; a corrupt tree is removed.
    pub fn verify(&self, sha256: &str) -> Result<(), ArtifactError> {
        let checked = self
            .read_manifest(sha256)
            .and_then(|manifest| unpack::check_tree(&self.dir(sha256), &manifest));
        match checked {
            Ok(()) => {
                self.touch(sha256);
                Ok(())
            }
            Err(reason) => {
                self.discard(sha256);
                Err(ArtifactError::Corrupt {
                    sha256: sha256.to_string(),
                    reason,
                })
            }
        }
    }

    /// Marks `sha256` as just used (garbage collection removes the least recently used first).
    fn touch(&self, sha256: &str) {
        if let Ok(file) = std::fs::File::options()
            .append(true)
            .open(self.manifest_path(sha256))
        {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }

    /// Removes everything cached for `sha256`.
    pub fn discard(&self, sha256: &str) {
        // The manifest first: without it the tree is not ready, whatever is left of it.
        let _ = std::fs::remove_file(self.manifest_path(sha256));
        let _ = std::fs::remove_dir_all(self.dir(sha256));
        let _ = std::fs::remove_file(self.blob_path(sha256));
    }

    /// Verifies a finished download and moves it to `blobs/`.
    pub fn accept_download(&self, sha256: &str) -> Result<(), ArtifactError> {
        let partial = self.partial_path(sha256);
        let found = sha256_of_file(&partial)?;
        if found != sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(ArtifactError::HashMismatch {
                sha256: sha256.to_string(),
                found,
            });
        }
        let blobs = self.root.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io("create", &blobs))?;
        let blob = self.blob_path(sha256);
        std::fs::rename(&partial, &blob).map_err(io("rename", &blob))
    }

    /// Unpacks the verified blob into a fresh directory and renames it into place.
    pub fn install(&self, sha256: &str) -> Result<(), ArtifactError> {
        let blob = self.blob_path(sha256);
        let staging = self.root.join("staging");
        let unpacked = self.root.join("unpacked");
        for dir in [&staging, &unpacked] {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        let name = format!("{sha256}.{:016x}", crate::os::random_u64());
        let fresh = staging.join(&name);
        // Garbage collection (another thread: the artifacts thread, while an agent upgrade
        // installs on its own) leaves a staging dir alone while it is registered here.
        let _unpacking = Unpacking::register(name);
        std::fs::create_dir(&fresh).map_err(io("create", &fresh))?;
        let manifest = match unpack::unpack(&blob, &fresh) {
            Ok(manifest) => manifest,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&fresh);
                return Err(ArtifactError::Unpack {
                    sha256: sha256.to_string(),
                    source,
                });
            }
        };
        let target = self.dir(sha256);
        let _ = std::fs::remove_file(self.manifest_path(sha256));
        let _ = std::fs::remove_dir_all(&target);
        // The manifest is written before the tree appears: a tree without one is not ready,
        // and one with it is whole (the rename is the commit point).
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let manifest_path = self.manifest_path(sha256);
        crate::os::atomic_write(&manifest_path, &manifest_bytes)
            .map_err(io("write", &manifest_path))?;
        std::fs::rename(&fresh, &target).map_err(io("rename", &target))?;
        let _ = std::fs::remove_file(&blob);
        Ok(())
    }

    /// Bytes each cached artifact takes (unpacked files, blobs and partial downloads).
    fn usage(&self) -> BTreeMap<String, (u64, std::time::SystemTime)> {
        let mut usage: BTreeMap<String, (u64, std::time::SystemTime)> = BTreeMap::new();
        let mut add = |sha: String, bytes: u64, at: std::time::SystemTime| {
            let entry = usage.entry(sha).or_insert((0, std::time::UNIX_EPOCH));
            entry.0 += bytes;
            entry.1 = entry.1.max(at);
        };
        if let Ok(entries) = std::fs::read_dir(self.root.join("unpacked")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(sha) = name.strip_suffix(".manifest") else {
                    continue;
                };
                let at = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let bytes = self.read_manifest(sha).map_or(0, |m| m.total_bytes());
                add(sha.to_string(), bytes, at);
            }
        }
        for folder in ["blobs", "partial"] {
            if let Ok(entries) = std::fs::read_dir(self.root.join(folder)) {
                for entry in entries.flatten() {
                    let Ok(meta) = entry.metadata() else { continue };
                    add(
                        entry.file_name().to_string_lossy().into_owned(),
                        meta.len(),
                        meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    );
                }
            }
        }
        usage
    }

    /// Removes unreferenced artifacts, least recently used first, until the cache fits
    /// `cap_bytes`. What `keep` names is never removed. Leftover unpack staging goes too.
    pub fn collect_garbage(&self, keep: &BTreeSet<String>, cap_bytes: u64) -> GcReport {
        self.remove_leftover_staging();
        let usage = self.usage();
        let mut total: u64 = usage.values().map(|(bytes, _)| bytes).sum();
        let mut candidates: Vec<(&String, &(u64, std::time::SystemTime))> = usage
            .iter()
            .filter(|(sha, _)| !keep.contains(*sha))
            .collect();
        candidates.sort_by_key(|(_, (_, at))| *at);
        let mut report = GcReport::default();
        for (sha, (bytes, _)) in candidates {
            if total <= cap_bytes {
                break;
            }
            self.discard(sha);
            let _ = std::fs::remove_file(self.partial_path(sha));
            total = total.saturating_sub(*bytes);
            report.removed.push(sha.clone());
        }
        report.kept_bytes = total;
        report.over_cap = total > cap_bytes;
        report
    }
}

/// The staging dirs of unpacks under way in this process (by name under `staging/`).
static UNPACKING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// An unpack under way: registered while it lives.
struct Unpacking(String);

impl Unpacking {
    fn register(name: String) -> Self {
        crate::node::lock(&UNPACKING).insert(name.clone());
        Self(name)
    }
}

impl Drop for Unpacking {
    fn drop(&mut self) {
        crate::node::lock(&UNPACKING).remove(&self.0);
    }
}

impl ArtifactCache {
    /// Removes what is under `staging/` except the unpacks under way (leftovers of a crash or
    /// a failed unpack).
    fn remove_leftover_staging(&self) {
        let staging = self.root.join("staging");
        let Ok(entries) = std::fs::read_dir(&staging) else {
            return;
        };
        let busy = crate::node::lock(&UNPACKING);
        for entry in entries.flatten() {
            if !busy.contains(&*entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// sha256 of a file, streamed.
pub fn sha256_of_file(path: &Path) -> Result<String, ArtifactError> {
    let file = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(
        &mut std::io::BufReader::new(file),
        &mut unpack::HashWriter(&mut hasher),
    )
    .map_err(io("read", path))?;
    Ok(outpost_proto::hash::to_hex(&hasher.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cached(cache: &ArtifactCache, content: &[u8]) -> String {
        let sha = outpost_proto::hash::sha256_hex(content);
        let partial = cache.partial_path(&sha);
        std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
        std::fs::write(&partial, content).unwrap();
        cache.accept_download(&sha).unwrap();
        cache.install(&sha).unwrap();
        sha
    }

    #[test]
    fn garbage_collection_leaves_an_unpack_under_way_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path());
        let staging = dir.path().join("artifacts").join("staging");
        let (busy, leftover) = (staging.join("a.1"), staging.join("b.2"));
        for path in [&busy, &leftover] {
            std::fs::create_dir_all(path).unwrap();
        }
        let unpacking = Unpacking::register("a.1".into());
        cache.collect_garbage(&BTreeSet::new(), u64::MAX);
        assert!(busy.is_dir() && !leftover.exists());
        drop(unpacking);
        cache.collect_garbage(&BTreeSet::new(), u64::MAX);
        assert!(!busy.exists());
    }

    #[test]
    fn a_download_that_does_not_hash_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path());
        let sha = outpost_proto::hash::sha256_hex(b"the real bytes");
        std::fs::create_dir_all(cache.partial_path(&sha).parent().unwrap()).unwrap();
        std::fs::write(cache.partial_path(&sha), b"other bytes").unwrap();
        let error = cache.accept_download(&sha).unwrap_err();
        assert!(
            matches!(error, ArtifactError::HashMismatch { .. }),
            "{error}"
        );
        assert!(!cache.partial_path(&sha).exists());
        assert!(!cache.is_ready(&sha));
    }

    #[test]
    fn a_corrupt_tree_is_removed_and_never_ready() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path());
        let sha = cached(&cache, b"binary v1");
        assert!(cache.is_ready(&sha));
        cache.verify(&sha).unwrap();
        std::fs::write(cache.dir(&sha).join("artifact"), b"tampered").unwrap();
        let error = cache.verify(&sha).unwrap_err();
        assert!(error.to_string().contains("corrupt"), "{error}");
        assert!(!cache.is_ready(&sha));
    }

    #[test]
    fn garbage_collection_keeps_what_the_plans_reference() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path());
        let old = cached(&cache, &[1u8; 4000]);
        let kept = cached(&cache, &[2u8; 4000]);
        let newer = cached(&cache, &[3u8; 4000]);
        let keep: BTreeSet<String> = [kept.clone()].into();
        let report = cache.collect_garbage(&keep, 5000);
        assert!(cache.is_ready(&kept));
        assert!(!report.over_cap);
        assert_eq!(report.removed.len(), 2, "{report:?}");
        assert!(!cache.is_ready(&old) && !cache.is_ready(&newer));
        // Referenced artifacts over the cap stay, and the report says so.
        let report = cache.collect_garbage(&keep, 100);
        assert!(cache.is_ready(&kept) && report.over_cap);
    }
}
