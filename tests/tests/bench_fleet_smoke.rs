//! A small run of `outpost-control bench-fleet` (docs/performance.md): the real control in its own
//! process and a dozen simulated agents over TLS. It checks that every agent saw the change and
//! its removal and that nothing failed, never how long anything took (tests assert no times).
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use outpost_fleet_tests::{binary, run_with_timeout};

#[test]
fn a_small_fleet_run_sees_every_change_on_every_agent() -> Result<()> {
    let mut command = Command::new(binary("outpost-control")?);
    command.args([
        "bench-fleet",
        "--agents",
        "12",
        "--node-ttl-secs",
        "6",
        "--wrk-secs",
        "0",
    ]);
    let output = run_with_timeout(command, None, Duration::from_secs(180))?
        .expect_success("bench-fleet with 12 agents")?;
    let stdout = &output.stdout;
    assert!(stdout.contains("agents: 12\n"), "{stdout}");
    for line in ["fan-out add", "fan-out remove"] {
        let found = stdout
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} line in:\n{stdout}"));
        assert!(found.contains("(12 samples)"), "{found}");
        assert!(!found.contains("never saw it"), "{found}");
    }
    assert!(stdout.contains("feed errors: 0\n"), "{stdout}");
    assert!(stdout.contains("(0 failed or refused)"), "{stdout}");
    Ok(())
}
