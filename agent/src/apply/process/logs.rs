//! Size-capped log files for allocations. Processes write straight to `stdout.log` and
//! `stderr.log` (opened O_APPEND), so they keep running when the agent is gone; the supervisor
//! caps them by copy-truncate into `.1` when they pass the cap, checking at every supervision tick
//! (250 ms). Lines written between the copy and the truncate are lost; a file never grows past the
//! cap plus what its process writes between two ticks, so disk use per allocation stays below
//! twice that. An exact cap (never past the cap plus one line) would need a process between the
//! workload and its file, which would have to outlive the agent as the workload does; not built.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

pub fn stdout_path(allocation_dir: &Path) -> PathBuf {
    allocation_dir.join("stdout.log")
}

pub fn stderr_path(allocation_dir: &Path) -> PathBuf {
    allocation_dir.join("stderr.log")
}

/// Whether a log was rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capped {
    Unchanged,
    Rotated,
}

/// Rotates `path` to `path.1` (replacing it) and truncates `path` when it is over `cap_bytes`.
pub fn cap_log(path: &Path, cap_bytes: u64) -> io::Result<Capped> {
    let size = match fs::metadata(path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Capped::Unchanged),
        Err(error) => return Err(error),
    };
    if size <= cap_bytes {
        return Ok(Capped::Unchanged);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    fs::copy(path, PathBuf::from(rotated))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(Capped::Rotated)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn over_cap_rotates_and_appending_writer_continues_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = stdout_path(dir.path());
        let mut writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        writer.write_all(&vec![b'a'; 5000]).unwrap();
        assert_eq!(cap_log(&path, 8192).unwrap(), Capped::Unchanged);
        writer.write_all(&vec![b'b'; 5000]).unwrap();
        assert_eq!(cap_log(&path, 8192).unwrap(), Capped::Rotated);
        assert_eq!(
            fs::metadata(dir.path().join("stdout.log.1")).unwrap().len(),
            10_000
        );
        writer.write_all(b"after").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"after");
        assert_eq!(
            cap_log(&dir.path().join("missing.log"), 1).unwrap(),
            Capped::Unchanged
        );
    }
}
