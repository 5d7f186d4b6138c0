//! The environment profile end to end (issue 6, SPEC C1–C10, B1): the operator applies a
//! profile with `outpostctl profile apply`; a real `outpost-agent` fetches it, caches it and
//! applies it with the default adapters (a directory per bucket, the in-process bus, the
//! in-memory index); the agent's status and control's `GET /v1/bootstrap/status` show the same
//! generation per component; applying again changes nothing; a bucket deleted by hand comes
//! back when the agent restarts (boot verifies actual state); `outpost-agent reconcile
//! --dry-run` prints the diff.
//!
//! The agent runs with the default adapters only when `MINIO_ENDPOINT`, `AMQP_URL` and
//! `WEAVIATE_URL` are unset in the test's environment (they select external adapters).
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AGENT_BINARY, AgentProcess, COMMAND_TIMEOUT, ControlProcess, START_TIMEOUT, StopMode, TestDir,
    binary, run_with_timeout, wait_for, wait_until,
};
use serde_json::Value;

const PROFILE_YAML: &str = "\
apiVersion: outpost/v1
kind: EnvironmentProfile
metadata:
  name: site
spec:
  storage:
    buckets:
      - name: media
        versioning: true
        tags:
          team: edge
  broker:
    exchanges:
      - name: events
        kind: topic
    queues:
      - name: thumbnails
        message_ttl_ms: 60000
    bindings:
      - exchange: events
        queue: thumbnails
        routing_key: media.#
  index:
    classes:
      - name: article
        properties:
          - name: title
            data_type: text
";

const COMPONENTS: [&str; 3] = ["storage", "broker", "index"];

/// The agent's component records (`outpost-agent status --json`).
fn component<'a>(status: &'a Value, name: &str) -> &'a Value {
    &status["components"][name]
}

fn generation(status: &Value, name: &str) -> Option<String> {
    component(status, name)["generation"]
        .as_str()
        .map(str::to_string)
}

fn all_ok(status: &Value, names: &[&str]) -> bool {
    names
        .iter()
        .all(|name| component(status, name)["status"] == "ok")
}

fn apply_profile(control: &ControlProcess, file: &Path) -> Result<String> {
    let answer = control
        .outpostctl(&["--json", "profile", "apply", "-f", file.to_str().unwrap()])?
        .expect_success("outpostctl profile apply")?
        .json()?;
    answer["generation"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no generation in {answer}"))
}

/// `GET /v1/bootstrap/status?node_id=NODE` as the operator.
fn control_status(control: &ControlProcess, node_id: &str) -> Result<Value> {
    let (code, body) = control.http()?.get(
        &format!("/v1/bootstrap/status?node_id={node_id}"),
        Some(&control.admin.token),
    )?;
    if code != 200 {
        bail!("bootstrap status answered {code}: {body}");
    }
    Ok(body)
}

/// `outpost-agent reconcile ARGS --data-dir DIR` with the default adapters.
fn reconcile(data_dir: &Path, args: &[&str]) -> Result<outpost_fleet_tests::CommandOutput> {
    let mut command = Command::new(binary(AGENT_BINARY)?);
    command
        .arg("reconcile")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args);
    for variable in [
        "MINIO_ENDPOINT",
        "AMQP_URL",
        "WEAVIATE_URL",
        "OUTPOST_NODE_ID",
        "OUTPOST_PROFILE_COMPONENTS",
    ] {
        command.env_remove(variable);
    }
    run_with_timeout(command, None, COMMAND_TIMEOUT)
}

#[test]
fn an_agent_applies_the_profile_control_publishes() -> Result<()> {
    let dir = TestDir::new("profile-fleet")?;
    let control = ControlProcess::start(&dir.path().join("control"))?;
    let token = control
        .outpostctl(&["enroll", "create", "--ttl", "10m", "--json"])?
        .expect_success("enroll")?
        .json()?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    let data_dir = dir.path().join("edge-a");
    let agent_args = ["--node-id", "edge-a", "--profile-poll-secs", "1"];
    let mut agent = AgentProcess::start(&data_dir, &token, &agent_args)?;
    agent.wait_for_status("edge-a to reach control", |status| {
        status["control"]["state"] == "connected"
    })?;

    // The operator applies a profile; the agent fetches and applies it.
    let profile_file = dir.write("profile.yaml", PROFILE_YAML)?;
    let profile_generation = apply_profile(&control, &profile_file)?;
    let status = agent.wait_for_status("the agent to apply the profile", |status| {
        generation(status, "profile").as_deref() == Some(profile_generation.as_str())
            && all_ok(status, &COMPONENTS)
            && all_ok(status, &["profile"])
    })?;
    let bucket = data_dir.join("storage").join("media");
    assert!(bucket.is_dir(), "{} is not a directory", bucket.display());
    let cached: Value = serde_json::from_slice(&std::fs::read(data_dir.join("profile.json"))?)?;
    assert_eq!(cached["metadata"]["name"], "site");
    let agent_generations: Vec<(String, String)> = COMPONENTS
        .iter()
        .chain(&["profile"])
        .map(|name| (name.to_string(), generation(&status, name).unwrap()))
        .collect();

    // Control shows the same generation per component, from the agent's bootstrap events.
    let shown = wait_for(
        "control's bootstrap status to show the agent's generations",
        START_TIMEOUT,
        || {
            let shown = control_status(&control, "edge-a").ok()?;
            agent_generations
                .iter()
                .all(|(name, generation)| shown["applied"][name] == generation.as_str())
                .then_some(shown)
        },
    )?;
    assert_eq!(shown["errors"], Value::Array(Vec::new()), "{shown}");

    // The agent's own status port says the same (C10).
    let address = std::fs::read_to_string(data_dir.join("status.addr"))?;
    let bootstrap = http_get(address.trim(), "/internal/bootstrap/status")?;
    for (name, generation) in &agent_generations {
        assert_eq!(
            bootstrap["applied"][name],
            generation.as_str(),
            "{bootstrap}"
        );
    }

    // A second apply is a no-op: the same document keeps its generation, and a profile that
    // changes nothing the components apply (only its name) is skipped component by component.
    std::fs::write(bucket.join("kept.txt"), b"left alone")?;
    assert_eq!(apply_profile(&control, &profile_file)?, profile_generation);
    let renamed_file = dir.write(
        "profile-renamed.yaml",
        &PROFILE_YAML.replace("name: site", "name: site-renamed"),
    )?;
    let renamed_generation = apply_profile(&control, &renamed_file)?;
    assert_ne!(renamed_generation, profile_generation);
    let after = agent.wait_for_status("the agent to take the renamed profile", |status| {
        generation(status, "profile").as_deref() == Some(renamed_generation.as_str())
    })?;
    for name in COMPONENTS {
        assert_eq!(
            component(&after, name),
            component(&status, name),
            "{name} was applied again"
        );
    }
    let detail: Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("profile-status.json"))?)?;
    for name in COMPONENTS {
        assert_eq!(
            detail["components"][name]["outcome"], "skipped",
            "{name}: {detail}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(bucket.join("kept.txt"))?,
        "left alone"
    );
    wait_until(
        "control to show the renamed profile applied",
        START_TIMEOUT,
        || {
            control_status(&control, "edge-a").is_ok_and(|shown| {
                shown["applied"]["profile"] == renamed_generation.as_str()
                    && shown["applied"]["storage"] == agent_generations[0].1.as_str()
            })
        },
    )?;

    // A bucket deleted by hand: the dry run shows it, a restart (boot verifies actual state)
    // brings it back without control.
    agent.stop(StopMode::Graceful);
    std::fs::remove_dir_all(&bucket)?;
    let dry_run = reconcile(&data_dir, &["--dry-run"])?.expect_success("reconcile --dry-run")?;
    assert!(
        dry_run.stdout.contains("create bucket media") && dry_run.stdout.contains("diff hash:"),
        "{}",
        dry_run.stdout
    );
    assert!(!bucket.exists(), "a dry run changes nothing");
    // Control is gone: the restarted agent repairs from its cache (O2).
    drop(control);
    let mut agent = AgentProcess::start(&data_dir, &token, &agent_args)?;
    let restarted =
        agent.wait_for_status("the restarted agent to verify the profile", |status| {
            status["agent"] == "running"
                && status["pid"].is_u64()
                && status["pid"] != after["pid"]
                && all_ok(status, &COMPONENTS)
        })?;
    assert!(
        bucket.is_dir(),
        "{} was not re-created; agent status: {restarted}",
        bucket.display()
    );
    assert_eq!(
        generation(&restarted, "storage"),
        Some(agent_generations[0].1.clone())
    );
    Ok(())
}

/// A plain HTTP GET to the agent's local status port, answered as JSON.
fn http_get(address: &str, path: &str) -> Result<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("connecting to the status port {address}"))?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .with_context(|| format!("no body in {answer:?}"))?;
    Ok(serde_json::from_str(body)?)
}
