//! The copy of the last-good plan kept outside the redb file (`DIR/last-good.plan`), so a corrupt
//! or unreadable store never leaves the node without its plan (O2).
//!
//! Format: 8 magic bytes `OPLGOOD1`, the 32-byte sha256 of the payload, then the postcard plan.
//! Written atomically (temp file, fsync, rename, fsync folder).

use std::io;
use std::path::{Path, PathBuf};

use outpost_proto::codec::{Encoding, encode};
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::plan::Plan;
use sha2::{Digest, Sha256};

pub const LAST_GOOD_FILE_NAME: &str = "last-good.plan";
const MAGIC: &[u8; 8] = b"OPLGOOD1";
const HEADER_BYTES: usize = 8 + 32;

#[derive(Debug, thiserror::Error)]
pub enum LastGoodError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

pub fn last_good_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LAST_GOOD_FILE_NAME)
}

/// Frames a plan: magic, checksum, postcard.
pub fn frame(plan: &Plan) -> Vec<u8> {
    let payload = encode(Encoding::Postcard, plan);
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&Sha256::digest(&payload));
    bytes.extend_from_slice(&payload);
    bytes
}

/// Checks and decodes a framed plan; the error says what is wrong.
pub fn unframe(bytes: &[u8]) -> Result<Plan, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_BYTES}-byte header",
            bytes.len()
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err(format!(
            "magic is {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[..8]),
            "OPLGOOD1"
        ));
    }
    let payload = &bytes[HEADER_BYTES..];
    let sum = Sha256::digest(payload);
    if sum.as_slice() != &bytes[8..HEADER_BYTES] {
        return Err(format!(
            "checksum mismatch: header says {}, payload hashes to {}",
            crate::os::hex(&bytes[8..HEADER_BYTES]),
            crate::os::hex(&sum)
        ));
    }
    // Also a plan written before the overlay field existed.
    outpost_proto::plan::decode_postcard_plan(payload, FRAME_MAX_BYTES, "last-good plan")
        .map_err(|e| e.to_string())
}

pub fn write(data_dir: &Path, plan: &Plan) -> Result<(), LastGoodError> {
    let path = last_good_path(data_dir);
    // Private: service environments in the plan may carry secrets.
    crate::os::atomic_write_with_mode(&path, &frame(plan), 0o600)
        .map_err(|source| LastGoodError::Write { path, source })
}

/// `Ok(None)` when there is no copy yet.
pub fn read(data_dir: &Path) -> Result<Option<Plan>, LastGoodError> {
    let path = last_good_path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LastGoodError::Read { path, source }),
    };
    unframe(&bytes)
        .map(Some)
        .map_err(|reason| LastGoodError::Damaged { path, reason })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests::sample_plan;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let plan = sample_plan(3);
        write(dir.path(), &plan).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(plan));
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let bytes = frame(&sample_plan(2));
        for index in [0, 9, HEADER_BYTES, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x40;
            assert!(unframe(&damaged).is_err(), "flip at {index} not detected");
        }
        assert!(unframe(&bytes[..10]).unwrap_err().contains("shorter"));
    }
}
