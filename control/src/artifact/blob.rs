//! The blob-store port: where artifact bytes live, content-addressed by sha256. Uploads are
//! written to a staging place no reader sees and published under their hash only after the
//! caller verified it; reads start at any offset, so downloads resume. Both stream.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store {what} failed at {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("blob store request {what} failed: {reason}")]
    Remote { what: String, reason: String },
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// A blob being read from `offset`, with the blob's whole size.
pub struct BlobReader {
    pub reader: Box<dyn Read + Send>,
    pub size_bytes: u64,
}

/// Where artifact bytes are kept.
pub trait BlobStore: Send + Sync {
    /// Starts an upload of what the client declared as `sha256` into a staging place.
    fn stage(&self, sha256: &str) -> Result<Box<dyn StagedBlob>, BlobError>;
    /// Opens the blob `sha256` at `offset`; `None` when it is not stored.
    fn open(&self, sha256: &str, offset: u64) -> Result<Option<BlobReader>, BlobError>;
    /// Size of the stored blob, `None` when absent.
    fn size(&self, sha256: &str) -> Result<Option<u64>, BlobError>;
    /// Removes the blob; removing an absent one is not an error.
    fn remove(&self, sha256: &str) -> Result<(), BlobError>;
}

/// An upload in progress. Dropped without [`StagedBlob::publish`], it leaves nothing behind.
pub trait StagedBlob: Send {
    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), BlobError>;
    /// Makes the staged bytes the blob named at [`BlobStore::stage`]; the caller has verified
    /// that they hash to it.
    fn publish(self: Box<Self>) -> Result<(), BlobError>;
}

/// Blobs as files: `ROOT/blobs/SHA256`, uploads staged in `ROOT/staging/`.
#[derive(Debug, Clone)]
pub struct DirBlobStore {
    root: PathBuf,
}

impl DirBlobStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256)
    }
}

impl BlobStore for DirBlobStore {
    fn stage(&self, sha256: &str) -> Result<Box<dyn StagedBlob>, BlobError> {
        let staging = self.root.join("staging");
        std::fs::create_dir_all(&staging).map_err(io_error("create", &staging))?;
        std::fs::create_dir_all(self.root.join("blobs")).map_err(io_error("create", &self.root))?;
        let path = staging.join(format!("upload-{}", crate::api::auth::random_hex(8)));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("create", &path))?;
        Ok(Box::new(StagedFile {
            file: Some(file),
            path,
            blobs: self.root.join("blobs"),
            sha256: sha256.to_string(),
        }))
    }

    fn open(&self, sha256: &str, offset: u64) -> Result<Option<BlobReader>, BlobError> {
        let path = self.blob_path(sha256);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error("open", &path)(error)),
        };
        let size_bytes = file.metadata().map_err(io_error("stat", &path))?.len();
        file.seek(SeekFrom::Start(offset.min(size_bytes)))
            .map_err(io_error("seek", &path))?;
        Ok(Some(BlobReader {
            reader: Box::new(file),
            size_bytes,
        }))
    }

    fn size(&self, sha256: &str) -> Result<Option<u64>, BlobError> {
        let path = self.blob_path(sha256);
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("stat", &path)(error)),
        }
    }

    fn remove(&self, sha256: &str) -> Result<(), BlobError> {
        let path = self.blob_path(sha256);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }
}

struct StagedFile {
    file: Option<File>,
    path: PathBuf,
    blobs: PathBuf,
    sha256: String,
}

impl StagedBlob for StagedFile {
    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        match self.file.as_mut() {
            Some(file) => file.write_all(bytes).map_err(io_error("write", &self.path)),
            None => Ok(()),
        }
    }

    fn publish(mut self: Box<Self>) -> Result<(), BlobError> {
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(io_error("sync", &self.path))?;
        }
        let target = self.blobs.join(&self.sha256);
        std::fs::rename(&self.path, &target).map_err(io_error("rename", &target))?;
        if let Ok(dir) = File::open(&self.blobs) {
            let _ = dir.sync_all();
        }
        // Renamed: nothing left for drop to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The store contract every [`BlobStore`] keeps, run against the directory store and S3
/// (moto): staged bytes are invisible until published and gone when dropped, reads start at
/// any offset, a blob larger than one S3 part streams whole, removing is idempotent.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn check_contract(store: &dyn BlobStore) {
    let read = |sha256: &str, offset: u64| {
        let mut opened = store.open(sha256, offset).unwrap().unwrap();
        let mut bytes = Vec::new();
        opened.reader.read_to_end(&mut bytes).unwrap();
        (bytes, opened.size_bytes)
    };
    let mut staged = store.stage("abc").unwrap();
    staged.write_chunk(b"hello ").unwrap();
    staged.write_chunk(b"world").unwrap();
    assert!(store.size("abc").unwrap().is_none());
    assert!(store.open("abc", 0).unwrap().is_none());
    staged.publish().unwrap();
    assert_eq!(store.size("abc").unwrap(), Some(11));
    assert_eq!(read("abc", 6), (b"world".to_vec(), 11));
    assert_eq!(read("abc", 11), (Vec::new(), 11));

    // Larger than one S3 part, in 64 KiB chunks as the HTTP handler writes them.
    let big: Vec<u8> = (0..super::s3::PART_BYTES + 100_000)
        .map(|i| (i % 251) as u8)
        .collect();
    let mut staged = store.stage("big").unwrap();
    for chunk in big.chunks(64 * 1024) {
        staged.write_chunk(chunk).unwrap();
    }
    assert!(
        store.size("big").unwrap().is_none(),
        "not visible before publish"
    );
    staged.publish().unwrap();
    assert_eq!(read("big", 0).0, big);
    assert_eq!(read("big", 5_000_000).0, big[5_000_000..]);

    // Dropped before publish: nothing, and the earlier blob of that name is untouched.
    for name in ["def", "big"] {
        let mut abandoned = store.stage(name).unwrap();
        for chunk in big.chunks(64 * 1024).take(140) {
            abandoned.write_chunk(chunk).unwrap();
        }
        drop(abandoned);
    }
    assert!(store.size("def").unwrap().is_none());
    assert_eq!(store.size("big").unwrap(), Some(big.len() as u64));

    store.remove("abc").unwrap();
    store.remove("abc").unwrap();
    assert!(store.open("abc", 0).unwrap().is_none());
    assert!(store.size("abc").unwrap().is_none());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_store_keeps_the_contract_and_leaves_no_staging_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirBlobStore::new(dir.path().to_path_buf());
        check_contract(&store);
        let staging: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .collect();
        assert!(staging.is_empty(), "{staging:?}");
    }
}
