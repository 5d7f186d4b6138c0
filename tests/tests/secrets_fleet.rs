//! Secrets end to end (P11, issue 12): a real control and two real agents on loopback. A secret
//! set with a random value reaches the one workload that references it — as an environment
//! variable and as a 0400 file — and its bytes appear nowhere else: not in control's data dir,
//! not in either agent's data dir outside that workload's own log, not in the event log, not in
//! any log of control or agent; no node credential's or admin token's secret is in control's
//! store either (sealed at rest). The node that does not run the service never receives it, and
//! its valid credential opens nothing. A new version restarts the workload with the new value;
//! removing the service withdraws the secret and leaves no file behind.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{AgentProcess, ControlProcess, START_TIMEOUT, TestDir, wait_for};
use serde_json::Value;

const NODE_TTL_SECS: &str = "9";

fn random_value() -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!(
        "pw-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn set_secret(control: &ControlProcess, name: &str, key: &str, value: &str) -> Result<Value> {
    control
        .outpostctl_with(
            &["secrets", "set", name, "--from-stdin", key, "--json"],
            &[],
            Some(&format!("{value}\n")),
        )?
        .expect_success("outpostctl secrets set")?
        .json()
}

const SERVICE: &str = r#"name: vault-reader
command: /bin/sh
args: ["-c", "echo \"env=$DB_PASSWORD\"; echo \"file=$(cat \"$OUTPOST_SECRETS_DIR/password.txt\")\"; exec sleep 3600"]
memory_bytes: 1048576
secrets:
  - name: db
    env: {DB_PASSWORD: password}
    files: {password.txt: password}
"#;

/// Every file under `root` (recursively) but those `skip` says to leave out.
fn files_under(root: &Path, skip: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() && !skip(&path) {
                found.push(path);
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Fails naming every file under `root` whose bytes hold `value`.
fn assert_absent_under(root: &Path, value: &str, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    let leaks: Vec<String> = files_under(root, skip)
        .into_iter()
        .filter(|path| fs::read(path).is_ok_and(|bytes| contains(&bytes, value.as_bytes())))
        .map(|path| path.display().to_string())
        .collect();
    if !leaks.is_empty() {
        bail!("the secret value leaked into {leaks:?}");
    }
    Ok(())
}

fn assert_absent_in_file(path: &Path, value: &str) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if contains(&bytes, value.as_bytes()) {
        bail!("the secret value leaked into {}", path.display());
    }
    Ok(())
}

/// The node credential an agent keeps in its identity copy.
fn node_credential(agent_dir: &Path) -> Result<String> {
    let identity: Value = serde_json::from_slice(&fs::read(agent_dir.join("identity.json"))?)?;
    identity["node_credential"]
        .as_str()
        .map(str::to_string)
        .context("identity.json holds no node credential")
}

/// (node id, allocation id) of the vault-reader allocation once control placed it.
fn placement(control: &ControlProcess) -> Result<(String, String)> {
    wait_for("control to place vault-reader", START_TIMEOUT, || {
        let allocations = control.allocations().ok()?;
        let allocation = allocations
            .iter()
            .find(|a| a["service"] == "vault-reader")?;
        Some((
            allocation["node_id"].as_str()?.to_string(),
            allocation["allocation_id"].as_str()?.to_string(),
        ))
    })
}

fn stdout_log(agent_dir: &Path, allocation_id: &str) -> PathBuf {
    agent_dir
        .join("allocations")
        .join(allocation_id)
        .join("stdout.log")
}

fn wait_for_log_line(log: &Path, line: &str) -> Result<()> {
    wait_for(
        &format!("{} to show {line:?}", log.display()),
        START_TIMEOUT,
        || {
            let text = fs::read_to_string(log).ok()?;
            text.lines().any(|l| l == line).then_some(())
        },
    )
}

#[test]
fn a_secret_reaches_only_the_workload_that_references_it() -> Result<()> {
    let dir = TestDir::new("fleet-secrets")?;
    // JSON log lines (issue 15): structured fields are searched for the value too.
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", NODE_TTL_SECS, "--log-format", "json"],
    )?;
    let agent_a = AgentProcess::start(
        &dir.path().join("edge-a"),
        &control.enrollment_token()?,
        &["--node-id", "edge-a"],
    )?;
    let agent_b = AgentProcess::start(
        &dir.path().join("edge-b"),
        &control.enrollment_token()?,
        &["--node-id", "edge-b"],
    )?;
    control.wait_for_nodes_ready(&["edge-a", "edge-b"])?;

    let value = random_value()?;
    let set = set_secret(&control, "db", "password", &value)?;
    assert_eq!(
        (set["version"].as_u64(), set["keys"][0].as_str()),
        (Some(1), Some("password"))
    );

    // A reference to a missing secret or key is refused naming the field; nothing is stored.
    let apply = |document: &str| {
        control.outpostctl_with(&["services", "apply", "-f", "-"], &[], Some(document))
    };
    let missing = apply(&SERVICE.replace("name: db", "name: nope"))?
        .expect_failure("a service referencing a missing secret")?;
    assert!(
        missing.stderr.contains("secrets[0].name"),
        "{}",
        missing.stderr
    );
    let missing_key = apply(&SERVICE.replace("{DB_PASSWORD: password}", "{DB_PASSWORD: passwd}"))?
        .expect_failure("a service referencing a missing key")?;
    assert!(
        missing_key.stderr.contains("secrets[0].env.DB_PASSWORD"),
        "{}",
        missing_key.stderr
    );
    let bad_variable = apply(&SERVICE.replace("{DB_PASSWORD: password}", "{1DB: password}"))?
        .expect_failure("a service with an invalid variable name")?;
    assert!(
        bad_variable.stderr.contains("1DB"),
        "{}",
        bad_variable.stderr
    );
    assert!(
        control.allocations()?.is_empty(),
        "a refused service was placed"
    );

    control
        .apply_services(SERVICE)?
        .expect_success("services apply")?;
    let (runner, allocation_id) = placement(&control)?;
    let (runner_dir, other_id, other_dir) = if runner == "edge-a" {
        (agent_a.data_dir.clone(), "edge-b", agent_b.data_dir.clone())
    } else {
        (agent_b.data_dir.clone(), "edge-a", agent_a.data_dir.clone())
    };

    // The workload saw the value, as env and as a 0400 file.
    let log = stdout_log(&runner_dir, &allocation_id);
    wait_for_log_line(&log, &format!("env={value}"))?;
    wait_for_log_line(&log, &format!("file={value}"))?;

    // A secret in use cannot be removed.
    let refused = control
        .outpostctl(&["secrets", "rm", "db"])?
        .expect_failure("secrets rm of a used secret")?;
    assert!(
        refused.stderr.contains("vault-reader"),
        "{}",
        refused.stderr
    );

    // The other node holds nothing, and its own valid credential opens nothing.
    let http = control.http()?;
    let other_credential = node_credential(&other_dir)?;
    let (status, other_plan) = http.get(
        &format!("/v1/nodes/{other_id}/plan"),
        Some(&other_credential),
    )?;
    assert_eq!(status, 200, "{other_plan}");
    assert_eq!(other_plan["secrets"], serde_json::json!([]), "{other_plan}");
    let (status, _) = http.get(&format!("/v1/nodes/{runner}/plan"), Some(&other_credential))?;
    assert_eq!(status, 403, "another node's plan");
    let (status, _) = http.get("/v1/secrets", Some(&other_credential))?;
    assert_eq!(status, 403, "a node listing secrets");
    let (status, runner_plan) = http.get(
        &format!("/v1/nodes/{runner}/plan"),
        Some(&node_credential(&runner_dir)?),
    )?;
    assert_eq!(status, 200);
    assert_eq!(runner_plan["secrets"][0]["name"], "db", "{runner_plan}");

    // The value appears nowhere but in the workload's own log.
    let events = control
        .outpostctl(&["events", "--json"])?
        .expect_success("outpostctl events --json")?;
    assert!(
        !events.stdout.contains(&value),
        "the value is in events --json"
    );
    assert!(
        events.stdout.contains("SecretDelivered"),
        "no delivery event"
    );
    let listed = control
        .outpostctl(&["secrets", "ls", "--json"])?
        .expect_success("secrets ls")?;
    assert!(!listed.stdout.contains(&value));
    assert_absent_under(&control.data_dir, &value, &|_| false)?;
    // Nor the secret part of either node's credential or of the admin token: control's store
    // keeps credentials sealed under the master key (and the CA key with them).
    for credential in [
        node_credential(&agent_a.data_dir)?,
        node_credential(&agent_b.data_dir)?,
        control.admin.token.clone(),
    ] {
        let secret = credential.rsplit('.').next().unwrap_or_default();
        assert_absent_in_file(&control.data_dir.join("control.redb"), secret)
            .context("a credential's secret is in control's store")?;
    }
    assert_absent_under(&runner_dir, &value, &|path| path == log)?;
    assert_absent_under(&other_dir, &value, &|_| false)?;
    for log_file in [
        control.data_dir.with_extension("log"),
        agent_a.data_dir.with_extension("log"),
        agent_b.data_dir.with_extension("log"),
    ] {
        assert_absent_in_file(&log_file, &value)?;
    }
    // The delivery was logged, as a JSON line with the shared fields, without the value.
    let control_log = fs::read_to_string(control.data_dir.with_extension("log"))?;
    let delivered = control_log
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|record| record["component"] == "secrets" && record["action"] == "deliver")
        .with_context(|| {
            format!("no secrets/deliver JSON line in control's log:\n{control_log}")
        })?;
    assert_eq!(delivered["node_id"], runner.as_str(), "{delivered}");

    // A new version restarts the workload with the new value.
    let second = random_value()?;
    let set = set_secret(&control, "db", "password", &second)?;
    assert_eq!(set["version"].as_u64(), Some(2));
    wait_for_log_line(&log, &format!("env={second}"))?;

    // The service goes: the secret is withdrawn and no secret file is left on the node.
    control
        .remove_service("vault-reader")?
        .expect_success("services rm")?;
    let runner_credential = node_credential(&runner_dir)?;
    wait_for(
        "the runner's plan to drop the secret",
        START_TIMEOUT,
        || {
            let (status, plan) = http
                .get(
                    &format!("/v1/nodes/{runner}/plan"),
                    Some(&runner_credential),
                )
                .ok()?;
            (status == 200 && plan["secrets"] == serde_json::json!([])).then_some(())
        },
    )?;
    wait_for("no secret file left on the runner", START_TIMEOUT, || {
        let leftovers = files_under(Path::new("/dev/shm"), &|path| {
            !path.to_string_lossy().contains(&allocation_id)
        });
        let on_disk = files_under(&runner_dir.join("secrets"), &|_| false);
        (leftovers.is_empty() && on_disk.is_empty()).then_some(())
    })?;
    control
        .outpostctl(&["secrets", "rm", "db"])?
        .expect_success("secrets rm")?;
    let listed = control
        .outpostctl(&["secrets", "ls", "--json"])?
        .expect_success("secrets ls")?;
    assert_eq!(listed.json()?, serde_json::json!([]));
    Ok(())
}

#[test]
fn tokens_are_scoped_to_their_org_and_refused_at_once_when_revoked() -> Result<()> {
    let dir = TestDir::new("fleet-tokens")?;
    let control = ControlProcess::start(&dir.path().join("control"))?;
    set_secret(&control, "db", "password", &random_value()?)?;
    let created = control
        .outpostctl(&[
            "tokens",
            "create",
            "--org",
            "acme",
            "--scopes",
            "secrets:read",
            "secrets:write",
            "--json",
        ])?
        .expect_success("tokens create")?
        .json()?;
    let token = created["token"].as_str().context("no token")?.to_string();
    let token_id = created["token_id"]
        .as_str()
        .context("no token id")?
        .to_string();
    let as_acme = |args: &[&str], stdin: Option<&str>| {
        control.outpostctl_with(args, &[("OUTPOST_TOKEN", token.as_str())], stdin)
    };

    // acme has its own `db`; the default org's stays invisible and untouchable (404).
    let acme_value = random_value()?;
    as_acme(
        &["secrets", "set", "db", "--from-stdin", "password"],
        Some(&acme_value),
    )?
    .expect_success("acme secrets set")?;
    let listed = as_acme(&["secrets", "ls", "--json"], None)?
        .expect_success("acme secrets ls")?
        .json()?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(
        (listed[0]["org"].as_str(), listed[0]["version"].as_u64()),
        (Some("acme"), Some(1))
    );
    let default_listed = control.outpostctl(&["secrets", "ls", "--json"])?.json()?;
    assert_eq!(default_listed[0]["org"], "default", "{default_listed}");
    assert_eq!(default_listed.as_array().map(Vec::len), Some(1));
    as_acme(&["secrets", "rm", "other"], None)?.expect_failure("rm of an unknown secret")?;

    // A token without the scope is refused; the token list names every token, no secret.
    let tokens = control
        .outpostctl(&["tokens", "ls", "--json"])?
        .expect_success("tokens ls")?;
    assert!(tokens.stdout.contains(&token_id));
    assert!(!tokens.stdout.contains(token.rsplit('.').next().unwrap()));
    let refused = as_acme(&["services", "ls"], None)?.expect_failure("services ls without read")?;
    assert!(
        refused.stderr.contains("lacks the scope read"),
        "{}",
        refused.stderr
    );

    // Revoked: the very next request is refused.
    control
        .outpostctl(&["tokens", "revoke", &token_id])?
        .expect_success("tokens revoke")?;
    let refused = as_acme(&["secrets", "ls"], None)?.expect_failure("a revoked token")?;
    assert!(
        refused
            .stderr
            .contains("unauthorized: this operator token was revoked"),
        "{}",
        refused.stderr
    );

    // A token with a lifetime is refused once it is over.
    let short = control
        .outpostctl(&[
            "tokens",
            "create",
            "--org",
            "acme",
            "--scopes",
            "secrets:read",
            "--ttl",
            "1s",
            "--json",
        ])?
        .expect_success("tokens create --ttl 1s")?
        .json()?;
    let short_token = short["token"].as_str().context("no token")?.to_string();
    wait_for("the 1 s token to expire", START_TIMEOUT, || {
        let answer = control
            .outpostctl_with(
                &["secrets", "ls"],
                &[("OUTPOST_TOKEN", short_token.as_str())],
                None,
            )
            .ok()?;
        (!answer.success() && answer.stderr.contains("expired")).then_some(())
    })?;
    Ok(())
}
