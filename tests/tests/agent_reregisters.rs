//! D6 at fleet level: when control stops knowing a node (here: control restored from a backup
//! taken before the node enrolled), the agent's heartbeat gets 401 and its plan 404, and the
//! agent registers again (the credential is unknown, so it falls back to its enrollment token,
//! which the restored control holds unused) instead of staying disconnected.

use std::path::Path;

use anyhow::Result;
use outpost_fleet_tests::{AgentProcess, ControlProcess, StopMode, TestDir, free_port, wait_until};

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn node_known(control: &ControlProcess, node_id: &str) -> bool {
    control
        .outpostctl(&["nodes", "--json"])
        .and_then(|output| output.json())
        .is_ok_and(|nodes| {
            nodes
                .as_array()
                .is_some_and(|nodes| nodes.iter().any(|n| n["node_id"] == node_id))
        })
}

#[test]
fn an_agent_registers_again_when_a_restored_control_does_not_know_it() -> Result<()> {
    let dir = TestDir::new("reregister")?;
    let control_dir = dir.path().join("control");
    let backup_dir = dir.path().join("control-backup");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let control = ControlProcess::start_with(&control_dir, &listen, &[])?;
    let token = control.enrollment_token()?;
    control.stop(StopMode::Graceful);
    // The backup: the token exists and is unused, the node is unknown.
    copy_dir(&control_dir, &backup_dir)?;
    let control = ControlProcess::start_with(&control_dir, &listen, &[])?;
    let mut agent = AgentProcess::start(
        &dir.path().join("agent"),
        &token,
        &["--node-id", "edge-r", "--control", &control.url],
    )?;
    agent.wait_for_status("the agent to connect", |s| {
        s["control"]["state"] == "connected"
    })?;
    wait_until(
        "control to know edge-r",
        outpost_fleet_tests::START_TIMEOUT,
        || node_known(&control, "edge-r"),
    )?;

    // Restore: control comes back from the backup on the same address.
    control.stop(StopMode::Graceful);
    std::fs::remove_dir_all(&control_dir)?;
    copy_dir(&backup_dir, &control_dir)?;
    let restored = ControlProcess::start_with(&control_dir, &listen, &[])?;
    assert!(
        !node_known(&restored, "edge-r"),
        "the backup predates the node"
    );
    wait_until(
        "the agent to register again with the restored control",
        outpost_fleet_tests::START_TIMEOUT,
        || node_known(&restored, "edge-r"),
    )?;
    agent.wait_for_status("the agent to be connected again", |s| {
        s["control"]["state"] == "connected" && s["control"]["last_error"].is_null()
    })?;
    Ok(())
}
