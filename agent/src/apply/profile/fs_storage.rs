//! Default ObjectStorage adapter: a directory per bucket under `DATA_DIR/storage`, with prior
//! versions kept, lifecycle rules that expire objects, and merged tags (C2, C5).
//!
//! Layout (services read objects straight from the bucket directory, see the module docs of
//! `apply::profile` for the environment variables that name it):
//! - `storage/BUCKET/KEY` — the current version of each object (`/` in a key makes folders);
//! - `storage/.meta/BUCKET.json` — versioning, lifecycle rules and tags, written atomically;
//! - `storage/.versions/BUCKET/KEY/NANOS` — prior versions, kept while versioning is enabled.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_proto::profile::LifecycleRule;
use serde::{Deserialize, Serialize};

use super::ports::{
    AdapterIdentity, AdapterKind, BucketState, IdempotencyKey, ObjectStorage,
    ObservedLifecycleRule, PortError, VersioningChange, VersioningState, io_error,
};

/// Largest bucket metadata file read back.
const META_MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BucketMeta {
    #[serde(default)]
    versioning: VersioningState,
    #[serde(default)]
    lifecycle: Vec<ObservedLifecycleRule>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Idempotency key of the last mutation, for audit.
    #[serde(default)]
    last_mutation_key: Option<String>,
}

/// A bucket directory tree on the local file system.
#[derive(Debug, Clone)]
pub struct FsObjectStorage {
    root: PathBuf,
}

impl FsObjectStorage {
    /// `root` is `DATA_DIR/storage`; it is created on first use.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory that holds a bucket's current objects.
    pub fn bucket_path(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    fn meta_path(&self, bucket: &str) -> PathBuf {
        self.root.join(".meta").join(format!("{bucket}.json"))
    }

    fn versions_path(&self, bucket: &str, object: &str) -> PathBuf {
        self.root.join(".versions").join(bucket).join(object)
    }

    fn read_meta(&self, bucket: &str) -> Result<BucketMeta, PortError> {
        let path = self.meta_path(bucket);
        match fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(BucketMeta::default());
            }
            Err(error) => return Err(io_error("read bucket metadata", &path, error)),
            Ok(meta) if meta.len() > META_MAX_BYTES => {
                return Err(PortError::bad_answer(
                    "read bucket metadata",
                    path.display().to_string(),
                    format!("{} bytes, over the limit of {META_MAX_BYTES}", meta.len()),
                ));
            }
            Ok(_) => {}
        }
        let bytes =
            fs::read(&path).map_err(|error| io_error("read bucket metadata", &path, error))?;
        serde_json::from_slice(&bytes).map_err(|error| {
            PortError::bad_answer("read bucket metadata", path.display().to_string(), error)
        })
    }

    fn write_meta(&self, bucket: &str, meta: &BucketMeta) -> Result<(), PortError> {
        let path = self.meta_path(bucket);
        let bytes = serde_json::to_vec_pretty(meta).map_err(|error| {
            PortError::refused("write bucket metadata", path.display().to_string(), error)
        })?;
        write_atomically(&path, &bytes)
            .map_err(|error| io_error("write bucket metadata", &path, error))
    }

    fn require_bucket(&self, operation: &'static str, bucket: &str) -> Result<PathBuf, PortError> {
        check_bucket_name(operation, bucket)?;
        let path = self.bucket_path(bucket);
        if path.is_dir() {
            Ok(path)
        } else {
            Err(PortError::refused(operation, bucket, "no such bucket"))
        }
    }

    fn update_meta(
        &self,
        operation: &'static str,
        bucket: &str,
        key: &IdempotencyKey,
        change: impl FnOnce(&mut BucketMeta),
    ) -> Result<(), PortError> {
        self.require_bucket(operation, bucket)?;
        let mut meta = self.read_meta(bucket)?;
        change(&mut meta);
        meta.last_mutation_key = Some(key.as_str().to_string());
        self.write_meta(bucket, &meta)
    }

    /// Prior versions of an object, oldest first.
    pub fn list_versions(&self, bucket: &str, object: &str) -> Result<Vec<Vec<u8>>, PortError> {
        check_object_key("list versions", object)?;
        let dir = self.versions_path(bucket, object);
        let mut names: Vec<(u128, PathBuf)> = match fs::read_dir(&dir) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error("list versions", &dir, error)),
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let stamp = entry.file_name().to_str()?.parse::<u128>().ok()?;
                    Some((stamp, entry.path()))
                })
                .collect(),
        };
        names.sort();
        names
            .into_iter()
            .map(|(_, path)| {
                fs::read(&path).map_err(|error| io_error("read version", &path, error))
            })
            .collect()
    }

    /// Applies every bucket's lifecycle rules at time `now`: a current object older than a rule's
    /// `expire_days` under its prefix is removed (kept as a prior version when versioning is on).
    /// Returns how many objects expired.
    pub fn expire(&self, now: SystemTime) -> Result<usize, PortError> {
        let mut expired = 0;
        let entries = match fs::read_dir(&self.root) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(io_error("expire objects", &self.root, error)),
            Ok(entries) => entries,
        };
        for entry in entries.filter_map(Result::ok) {
            let Some(bucket) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if bucket.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let meta = self.read_meta(&bucket)?;
            let rules: Vec<(String, u32)> = meta
                .lifecycle
                .iter()
                .filter_map(|rule| {
                    Some((rule.prefix.clone().unwrap_or_default(), rule.expire_days?))
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            for object in self.objects(&bucket)? {
                let path = self.bucket_path(&bucket).join(&object);
                let modified = fs::metadata(&path)
                    .and_then(|meta| meta.modified())
                    .map_err(|error| io_error("expire objects", &path, error))?;
                let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
                let due = rules.iter().any(|(prefix, days)| {
                    object.starts_with(prefix.as_str())
                        && age >= Duration::from_secs(u64::from(*days) * 86_400)
                });
                if due {
                    if meta.versioning == VersioningState::Enabled {
                        self.keep_prior_version(&bucket, &object, &path)?;
                    } else {
                        fs::remove_file(&path)
                            .map_err(|error| io_error("expire objects", &path, error))?;
                    }
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    fn keep_prior_version(
        &self,
        bucket: &str,
        object: &str,
        current: &Path,
    ) -> Result<(), PortError> {
        let dir = self.versions_path(bucket, object);
        fs::create_dir_all(&dir).map_err(|error| io_error("keep prior version", &dir, error))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut target = dir.join(stamp.to_string());
        let mut bump = stamp;
        while target.exists() {
            bump += 1;
            target = dir.join(bump.to_string());
        }
        fs::rename(current, &target).map_err(|error| io_error("keep prior version", current, error))
    }
}

impl ObjectStorage for FsObjectStorage {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::Filesystem,
            location: self.root.display().to_string(),
        }
    }

    fn read_bucket(&mut self, bucket: &str) -> Result<Option<BucketState>, PortError> {
        check_bucket_name("read bucket", bucket)?;
        if !self.bucket_path(bucket).is_dir() {
            return Ok(None);
        }
        let meta = self.read_meta(bucket)?;
        Ok(Some(BucketState {
            versioning: meta.versioning,
            lifecycle: meta.lifecycle,
            tags: meta.tags,
        }))
    }

    fn create_bucket(&mut self, bucket: &str, key: &IdempotencyKey) -> Result<(), PortError> {
        check_bucket_name("create bucket", bucket)?;
        let path = self.bucket_path(bucket);
        fs::create_dir_all(&path).map_err(|error| io_error("create bucket", &path, error))?;
        if !self.meta_path(bucket).exists() {
            let meta = BucketMeta {
                last_mutation_key: Some(key.as_str().to_string()),
                ..BucketMeta::default()
            };
            self.write_meta(bucket, &meta)?;
        }
        Ok(())
    }

    fn set_versioning(
        &mut self,
        bucket: &str,
        change: VersioningChange,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.update_meta("set versioning", bucket, key, |meta| {
            meta.versioning = match change {
                VersioningChange::Enable => VersioningState::Enabled,
                VersioningChange::Suspend => VersioningState::Suspended,
            }
        })
    }

    fn merge_lifecycle_rules(
        &mut self,
        bucket: &str,
        rules: &[LifecycleRule],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.update_meta("merge lifecycle rules", bucket, key, |meta| {
            for rule in rules {
                match meta.lifecycle.iter_mut().find(|found| found.id == rule.id) {
                    Some(found) => *found = rule.into(),
                    None => meta.lifecycle.push(rule.into()),
                }
            }
        })
    }

    fn merge_tags(
        &mut self,
        bucket: &str,
        tags: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.update_meta("merge tags", bucket, key, |meta| {
            meta.tags.extend(tags.clone())
        })
    }

    fn put_object(
        &mut self,
        bucket: &str,
        object: &str,
        bytes: &[u8],
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let bucket_dir = self.require_bucket("put object", bucket)?;
        check_object_key("put object", object)?;
        let path = bucket_dir.join(object);
        if path.is_file() && self.read_meta(bucket)?.versioning == VersioningState::Enabled {
            let current = fs::read(&path).map_err(|error| io_error("put object", &path, error))?;
            if current == bytes {
                return Ok(());
            }
            self.keep_prior_version(bucket, object, &path)?;
        }
        write_atomically(&path, bytes).map_err(|error| io_error("put object", &path, error))
    }

    fn get_object(&mut self, bucket: &str, object: &str) -> Result<Option<Vec<u8>>, PortError> {
        let bucket_dir = self.require_bucket("get object", bucket)?;
        check_object_key("get object", object)?;
        let path = bucket_dir.join(object);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("get object", &path, error)),
        }
    }

    fn list_objects(&mut self, bucket: &str) -> Result<Vec<String>, PortError> {
        self.objects(bucket)
    }

    fn expire_objects(&mut self, now: SystemTime) -> Result<usize, PortError> {
        self.expire(now)
    }
}

impl FsObjectStorage {
    /// Keys of the current objects of a bucket, sorted.
    pub fn objects(&self, bucket: &str) -> Result<Vec<String>, PortError> {
        let bucket_dir = self.require_bucket("list objects", bucket)?;
        let mut found = Vec::new();
        let mut pending = vec![(bucket_dir.clone(), String::new())];
        while let Some((dir, prefix)) = pending.pop() {
            let entries =
                fs::read_dir(&dir).map_err(|error| io_error("list objects", &dir, error))?;
            for entry in entries.filter_map(Result::ok) {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with(".tmp-") {
                    continue;
                }
                let key = format!("{prefix}{name}");
                let kind = entry
                    .file_type()
                    .map_err(|error| io_error("list objects", &entry.path(), error))?;
                if kind.is_dir() {
                    pending.push((entry.path(), format!("{key}/")));
                } else if kind.is_file() {
                    found.push(key);
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

/// Bucket names follow the profile's name rules; checked again here so a path never escapes.
fn check_bucket_name(operation: &'static str, bucket: &str) -> Result<(), PortError> {
    outpost_proto::name::check_name("bucket", bucket)
        .map_err(|error| PortError::refused(operation, bucket, error))?;
    if bucket.starts_with('.') || bucket.len() < 3 {
        return Err(PortError::refused(
            operation,
            bucket,
            "bucket names need 3 characters and no leading '.'",
        ));
    }
    Ok(())
}

/// Object keys become paths: no empty, `.` or `..` segments, no leading `.` in a segment
/// (reserved for temporary files), at most 1024 bytes.
pub fn check_object_key(operation: &'static str, object: &str) -> Result<(), PortError> {
    let valid = !object.is_empty()
        && object.len() <= 1024
        && !object.contains('\0')
        && object
            .split('/')
            .all(|segment| !segment.is_empty() && !segment.starts_with('.'));
    if valid {
        Ok(())
    } else {
        Err(PortError::refused(
            operation,
            object,
            "object keys need non-empty '/'-separated segments that do not start with '.'",
        ))
    }
}

/// Writes a file through a temporary sibling, fsync and rename, so readers see all or nothing.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(parent)?;
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("file");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let temporary = parent.join(format!(".tmp-{file_name}-{}-{stamp}", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        if let Ok(dir) = fs::File::open(parent) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdempotencyKey {
        IdempotencyKey("test".into())
    }

    #[test]
    fn versioning_keeps_prior_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = FsObjectStorage::new(dir.path().join("storage"));
        storage.create_bucket("media", &key()).unwrap();
        storage
            .put_object("media", "a/b.txt", b"one", &key())
            .unwrap();
        storage
            .put_object("media", "a/b.txt", b"two", &key())
            .unwrap();
        assert!(
            storage
                .list_versions("media", "a/b.txt")
                .unwrap()
                .is_empty(),
            "unversioned overwrites"
        );
        storage
            .set_versioning("media", VersioningChange::Enable, &key())
            .unwrap();
        storage
            .put_object("media", "a/b.txt", b"three", &key())
            .unwrap();
        assert_eq!(
            storage.get_object("media", "a/b.txt").unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(
            storage.list_versions("media", "a/b.txt").unwrap(),
            vec![b"two".to_vec()]
        );
        assert_eq!(
            fs::read(storage.bucket_path("media").join("a/b.txt")).unwrap(),
            b"three"
        );
    }

    #[test]
    fn lifecycle_rules_expire_old_objects_under_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = FsObjectStorage::new(dir.path().join("storage"));
        storage.create_bucket("media", &key()).unwrap();
        storage
            .merge_lifecycle_rules(
                "media",
                &[LifecycleRule {
                    id: "tmp".into(),
                    prefix: "tmp/".into(),
                    expire_days: 7,
                }],
                &key(),
            )
            .unwrap();
        storage
            .put_object("media", "tmp/old", b"x", &key())
            .unwrap();
        storage
            .put_object("media", "tmp/new", b"x", &key())
            .unwrap();
        storage
            .put_object("media", "keep/old", b"x", &key())
            .unwrap();
        let now = SystemTime::now();
        let old = now - Duration::from_secs(8 * 86_400);
        for object in ["tmp/old", "keep/old"] {
            let file = fs::File::options()
                .write(true)
                .open(storage.bucket_path("media").join(object))
                .unwrap();
            file.set_modified(old).unwrap();
        }
        assert_eq!(storage.expire(now).unwrap(), 1);
        assert_eq!(
            storage.list_objects("media").unwrap(),
            ["keep/old", "tmp/new"]
        );
    }

    #[test]
    fn paths_cannot_escape_the_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = FsObjectStorage::new(dir.path().join("storage"));
        storage.create_bucket("media", &key()).unwrap();
        for bad in ["../x", "a/../../x", "/abs", "", "a//b", ".hidden"] {
            let error = storage.put_object("media", bad, b"x", &key()).unwrap_err();
            assert!(
                error.to_string().contains("object keys need"),
                "{bad}: {error}"
            );
        }
        assert!(storage.create_bucket("../up", &key()).is_err());
    }
}
