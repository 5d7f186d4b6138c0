//! Runs a short helper command (`ip`, `wg`) with a deadline: output is read on threads so a
//! chatty command cannot block, and a command still running at the deadline is killed.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The most output kept from one command; the rest is read and dropped.
const OUTPUT_MAX_BYTES: usize = 4 * 1024 * 1024;
const POLL_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{command}`: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout_ms} ms and was killed")]
    Timeout { command: String, timeout_ms: u128 },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot wait for `{command}`: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
}

/// Runs `program args…`, feeding `stdin`, and returns its stdout when it exits with 0.
pub fn run_command(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>, CommandError> {
    let command_text = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Start {
            command: command_text.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs (a key) fit the pipe buffer; a failed write shows up as the exit status.
        let _ = pipe.write_all(input);
    }
    let stdout_reader = child
        .stdout
        .take()
        .map(|pipe| thread::spawn(move || read_bounded(pipe)));
    let stderr_reader = child
        .stderr
        .take()
        .map(|pipe| thread::spawn(move || read_bounded(pipe)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Timeout {
                    command: command_text,
                    timeout_ms: timeout.as_millis(),
                });
            }
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Wait {
                    command: command_text,
                    source,
                });
            }
        }
    };
    let stdout = stdout_reader
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    let stderr = stderr_reader
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(CommandError::Failed {
            command: command_text,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr)
                .trim()
                .chars()
                .take(512)
                .collect(),
        })
    }
}

fn read_bounded(mut pipe: impl Read) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) | Err(_) => return kept,
            Ok(count) => {
                let room = OUTPUT_MAX_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..count.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_failure_and_timeout() {
        let out = run_command(
            "sh",
            &["-c", "cat; echo done"],
            Some(b"in\n"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out, b"in\ndone\n");
        let error = run_command(
            "sh",
            &["-c", "echo bad >&2; exit 3"],
            None,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            matches!(&error, CommandError::Failed { stderr, .. } if stderr == "bad"),
            "{error}"
        );
        let error = run_command("sleep", &["30"], None, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(error, CommandError::Timeout { .. }), "{error}");
        let error =
            run_command("/nonexistent/program", &[], None, Duration::from_secs(1)).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/program"),
            "{error}"
        );
    }

    #[test]
    fn large_output_does_not_block() {
        let out = run_command(
            "sh",
            &["-c", "head -c 300000 /dev/zero"],
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.len(), 300_000);
    }
}
