//! Fetching an artifact from control: download into `partial/SHA`, resuming from the bytes
//! already there after a cut (a few quick attempts now; a later call resumes too, even after a
//! restart), then verify and unpack.

use std::time::Duration;

use super::{ArtifactCache, ArtifactError};
use crate::link::client::{CallError, ControlClient, Downloaded};

/// Resumptions tried within one fetch before giving up for this round.
pub const RESUME_ATTEMPTS: u32 = 5;
const RESUME_PAUSE: Duration = Duration::from_millis(200);

/// How a fetch went, for status and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchReport {
    /// Bytes received by this fetch.
    pub received_bytes: u64,
    /// Times the download was resumed after a cut.
    pub resumed: u32,
}

/// Makes `sha256` ready in the cache, fetching it from control when needed.
pub fn ensure(
    cache: &ArtifactCache,
    client: &ControlClient,
    sha256: &str,
) -> Result<FetchReport, ArtifactError> {
    if cache.is_ready(sha256) {
        return Ok(FetchReport::default());
    }
    let mut report = FetchReport::default();
    if !cache.blob_path(sha256).is_file() {
        report = download(cache, client, sha256)?;
        cache.accept_download(sha256)?;
    }
    cache.install(sha256)?;
    Ok(report)
}

fn download(
    cache: &ArtifactCache,
    client: &ControlClient,
    sha256: &str,
) -> Result<FetchReport, ArtifactError> {
    let partial = cache.partial_path(sha256);
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent).map_err(super::io("create", parent))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&partial)
        .map_err(super::io("open", &partial))?;
    let mut report = FetchReport::default();
    loop {
        let offset = file.metadata().map_err(super::io("stat", &partial))?.len();
        match client.download_artifact(sha256, offset, &mut file) {
            Ok(Downloaded::Complete { appended }) => {
                report.received_bytes += appended;
                let _ = file.sync_all();
                return Ok(report);
            }
            Ok(Downloaded::NothingLeft) => return Ok(report),
            Err(CallError::Transport(reason)) if report.resumed < RESUME_ATTEMPTS => {
                let now = file.metadata().map_or(offset, |m| m.len());
                report.received_bytes += now.saturating_sub(offset);
                report.resumed += 1;
                tracing::warn!(
                    component = "artifacts",
                    action = "resume",
                    attempt = report.resumed,
                    "{reason}; resuming artifact {sha256} from byte {now}"
                );
                std::thread::sleep(RESUME_PAUSE);
            }
            Err(error) => {
                return Err(ArtifactError::Download {
                    sha256: sha256.to_string(),
                    reason: error.to_string(),
                });
            }
        }
    }
}
