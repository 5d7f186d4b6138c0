//! The real `outpost-control` over TLS, driven by the real `outpostctl` (and, for node
//! registration, by direct HTTPS calls that pin the CA from the CA file).
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use anyhow::{Context, Result};
use outpost_fleet_tests::{
    COMMAND_TIMEOUT, ControlProcess, StopMode, TestDir, ca_fingerprint, free_port, wait_for,
    wait_until,
};
use outpost_proto::enroll::EnrollmentClaims;
use serde_json::{Value, json};

const WEB_SERVICE_YAML: &str = "\
# A service as an operator writes it.
name: web
command: /bin/sleep
args: [\"3600\"]
replicas: 1
memory_bytes: 67108864
cpu_millis: 100
";

const WORKER_SERVICE_JSON: &str =
    r#"[{"name": "worker", "command": "/bin/sleep", "args": ["60"], "memory_bytes": 33554432}]"#;

const SITE_PROFILE_YAML: &str = "\
apiVersion: outpost/v1
kind: EnvironmentProfile
metadata:
  name: site
spec:
  storage:
    buckets:
      - name: media
        versioning: true
  broker:
    exchanges:
      - name: events
        kind: topic
    queues:
      - name: ingest
    bindings:
      - exchange: events
        queue: ingest
        routing_key: sensor.#
";

/// True when `needle` appears as a string anywhere inside `value`.
fn contains_string(value: &Value, needle: &str) -> bool {
    match value {
        Value::String(text) => text == needle,
        Value::Array(items) => items.iter().any(|item| contains_string(item, needle)),
        Value::Object(fields) => fields.values().any(|item| contains_string(item, needle)),
        _ => false,
    }
}

fn as_list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The log epoch from `outpostctl status --json`, as the 16 hex digits of a cursor.
fn log_epoch(control: &ControlProcess) -> Result<String> {
    let health = control
        .outpostctl(&["status", "--json"])?
        .expect_success("status --json")?
        .json()?;
    let epoch = match &health["log_epoch"] {
        Value::Number(number) => number.as_u64().map(|epoch| format!("{epoch:016x}")),
        Value::String(text) => Some(text.clone()),
        _ => None,
    };
    epoch.with_context(|| format!("health has no log_epoch: {health}"))
}

/// Registers a node straight over HTTPS with an enrollment token, trusting only the CA file.
fn register_node(control: &ControlProcess, token: &str, node_id: &str) -> Result<Value> {
    let request = json!({
        "enrollment_token": token,
        "facts": {
            "node_id": node_id,
            "hostname": format!("{node_id}.test"),
            "arch": std::env::consts::ARCH,
            "capacity": { "memory_bytes": 1u64 << 30, "cpu_millis": 2000 },
            "labels": {}
        }
    });
    let (status, answer) = control
        .http()?
        .send("POST", "/v1/nodes/register", None, &request)?;
    anyhow::ensure!(status == 200, "register answered {status}: {answer}");
    Ok(answer)
}

#[test]
fn operator_drives_control_over_tls_with_outpostctl() -> Result<()> {
    let dir = TestDir::new("control-cli")?;
    let control = ControlProcess::start(&dir.path().join("control"))?;

    // Health, for people and for tools.
    let status = control.outpostctl(&["status"])?.expect_success("status")?;
    assert!(status.stdout.contains(&control.url), "{}", status.stdout);
    assert!(
        status
            .stdout
            .lines()
            .any(|line| line.starts_with("status") && line.ends_with("ok")),
        "{}",
        status.stdout
    );
    let epoch = log_epoch(&control)?;

    // An enrollment token pins the CA that outpostctl was told to trust.
    let enroll = control
        .outpostctl(&["enroll", "create", "--ttl", "10m", "--json"])?
        .expect_success("enroll")?;
    let token = enroll.json()?["token"]
        .as_str()
        .context("no token")?
        .to_string();
    assert!(token.starts_with("opt1."), "{token}");
    let claims = EnrollmentClaims::parse(&token).map_err(|error| anyhow::anyhow!("{error}"))?;
    assert_eq!(
        claims.ca_fingerprint,
        ca_fingerprint(&control.admin.ca_file)?
    );
    let human = control
        .outpostctl(&["enroll", "create", "--ttl", "1h"])?
        .expect_success("enroll human")?;
    assert!(
        human
            .stdout
            .lines()
            .next()
            .unwrap_or_default()
            .contains("opt1."),
        "{}",
        human.stdout
    );
    let bad_ttl = control
        .outpostctl(&["enroll", "create", "--ttl", "soon"])?
        .expect_failure("bad ttl")?;
    assert!(
        bad_ttl.stderr.contains("invalid duration \"soon\""),
        "{}",
        bad_ttl.stderr
    );

    // A node joins with the token.
    let registered = register_node(&control, &token, "edge-1")?;
    assert!(
        registered["node_credential"]
            .as_str()
            .unwrap_or_default()
            .starts_with("opn."),
        "{registered}"
    );
    let reused = control.http()?.send(
        "POST",
        "/v1/nodes/register",
        None,
        &json!({"enrollment_token": token, "facts": {"node_id": "edge-2", "hostname": "h", "arch": "x", "capacity": {"memory_bytes": 1, "cpu_millis": 1}}}),
    )?;
    assert_eq!(reused.0, 401, "a used token is refused: {}", reused.1);

    // Services from a YAML file.
    let web_file = dir.write("web.yaml", WEB_SERVICE_YAML)?;
    let applied = control
        .outpostctl(&["services", "apply", "-f", web_file.to_str().unwrap()])?
        .expect_success("services apply")?;
    assert!(
        applied.stdout.contains("service web applied"),
        "{}",
        applied.stdout
    );
    let listed = control
        .outpostctl(&["services", "ls"])?
        .expect_success("services ls")?;
    let header = listed.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("REPLICAS"),
        "{}",
        listed.stdout
    );
    assert!(
        listed
            .stdout
            .lines()
            .skip(1)
            .any(|line| line.starts_with("web ")),
        "{}",
        listed.stdout
    );
    let services = control
        .outpostctl(&["services", "ls", "--json"])?
        .expect_success("services ls --json")?
        .json()?;
    assert!(
        as_list(&services)
            .iter()
            .any(|service| contains_string(service, "web")),
        "{services}"
    );

    // The node and the allocation placed on it.
    let nodes = control.outpostctl(&["nodes"])?.expect_success("nodes")?;
    assert!(
        nodes
            .stdout
            .lines()
            .skip(1)
            .any(|line| line.starts_with("edge-1 ")),
        "{}",
        nodes.stdout
    );
    let nodes_json = control
        .outpostctl(&["nodes", "--json"])?
        .expect_success("nodes --json")?
        .json()?;
    assert!(
        as_list(&nodes_json)
            .iter()
            .any(|node| contains_string(node, "edge-1")),
        "{nodes_json}"
    );
    let allocation = wait_for("an allocation of web on edge-1", COMMAND_TIMEOUT, || {
        let allocations = control
            .outpostctl(&["allocations", "--json"])
            .ok()?
            .json()
            .ok()?;
        as_list(&allocations)
            .iter()
            .find(|allocation| {
                contains_string(allocation, "web") && contains_string(allocation, "edge-1")
            })
            .cloned()
    })?;
    let table = control
        .outpostctl(&["allocations"])?
        .expect_success("allocations")?;
    let row = table
        .stdout
        .lines()
        .skip(1)
        .find(|line| line.contains("edge-1"))
        .unwrap_or_default();
    assert!(
        row.contains("web"),
        "allocation {allocation} not shown:\n{}",
        table.stdout
    );

    // The environment profile round-trips, from YAML on stdin.
    let profile_applied = control
        .outpostctl_with(
            &["profile", "apply", "-f", "-"],
            &[],
            Some(SITE_PROFILE_YAML),
        )?
        .expect_success("profile apply")?;
    assert!(
        profile_applied.stdout.contains("profile \"site\" applied"),
        "{}",
        profile_applied.stdout
    );
    let shown = control
        .outpostctl(&["profile", "show", "--json"])?
        .expect_success("profile show")?
        .json()?;
    assert_eq!(shown["metadata"]["name"], "site");
    assert_eq!(shown["spec"]["storage"]["buckets"][0]["name"], "media");
    assert_eq!(
        shown["spec"]["broker"]["bindings"][0]["routing_key"],
        "sensor.#"
    );
    let shown_yaml = control
        .outpostctl(&["profile", "show"])?
        .expect_success("profile show yaml")?;
    assert!(
        shown_yaml.stdout.contains("apiVersion: outpost/v1"),
        "{}",
        shown_yaml.stdout
    );

    // Bad profiles are refused with the field named, and the stored one stays.
    let misspelt = dir.write(
        "misspelt.yaml",
        &SITE_PROFILE_YAML.replace("versioning", "versoning"),
    )?;
    let refused = control
        .outpostctl(&["profile", "apply", "-f", misspelt.to_str().unwrap()])?
        .expect_failure("misspelt profile")?;
    assert!(
        refused.stderr.contains("misspelt.yaml"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("spec.storage.buckets[0].versoning"),
        "{}",
        refused.stderr
    );
    let wrong_kind = dir.write(
        "plan.json",
        r#"{"apiVersion": "outpost/v1", "kind": "Plan"}"#,
    )?;
    let refused = control
        .outpostctl(&["profile", "apply", "-f", wrong_kind.to_str().unwrap()])?
        .expect_failure("wrong kind")?;
    assert!(
        refused.stderr.contains("invalid kind") && refused.stderr.contains("Plan"),
        "{}",
        refused.stderr
    );
    // Control checks on its own too: the same document sent past outpostctl.
    let (status, body) = control.http()?.send(
        "PUT",
        "/v1/bootstrap/profile",
        Some(&control.admin.token),
        &json!({"apiVersion": "outpost/v1", "kind": "Plan"}),
    )?;
    assert!(
        (400..500).contains(&status),
        "wrong kind answered {status}: {body}"
    );
    assert_eq!(body["field"], "kind", "{body}");
    let misspelt_json = json!({"apiVersion": "outpost/v1", "kind": "EnvironmentProfile",
        "spec": {"storage": {"buckets": [{"name": "media", "versoning": true}]}}});
    let (status, body) = control.http()?.send(
        "PUT",
        "/v1/bootstrap/profile",
        Some(&control.admin.token),
        &misspelt_json,
    )?;
    assert!(
        (400..500).contains(&status),
        "misspelt answered {status}: {body}"
    );
    assert_eq!(body["field"], "spec.storage.buckets[0].versoning", "{body}");
    let still = control
        .outpostctl(&["profile", "show", "--json"])?
        .expect_success("profile show after")?
        .json()?;
    assert_eq!(
        still, shown,
        "a refused profile must not replace the stored one"
    );

    // The event log shows what happened, from the start of the epoch.
    let from = format!("{epoch}.0");
    let events = control
        .outpostctl(&["events", "--from", &from, "--json"])?
        .expect_success("events")?
        .json()?;
    let service_event = as_list(&events["events"]).iter().find(|event| {
        event["kind"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("service")
            && contains_string(event, "web")
    });
    assert!(
        service_event.is_some(),
        "no service event for web in {events}"
    );
    let bookmark = events["bookmark"]
        .as_str()
        .context("no bookmark")?
        .to_string();
    let human_events = control
        .outpostctl(&["events"])?
        .expect_success("events human")?;
    assert!(
        human_events.stdout.lines().any(|line| line.contains("web")),
        "{}",
        human_events.stdout
    );

    // --follow prints new events as they come.
    let mut follower =
        control.outpostctl_streaming(&["events", "--from", &bookmark, "--follow", "--json"])?;
    let worker_file = dir.write("worker.json", WORKER_SERVICE_JSON)?;
    control
        .outpostctl(&["services", "apply", "-f", worker_file.to_str().unwrap()])?
        .expect_success("apply worker")?;
    wait_until(
        "events --follow to print the worker event",
        COMMAND_TIMEOUT,
        || follower.stdout().contains("worker"),
    )
    .with_context(|| format!("follower printed:\n{}", follower.stdout()))?;
    for line in follower.stdout().lines() {
        serde_json::from_str::<Value>(line)
            .with_context(|| format!("--follow --json line is not JSON: {line}"))?;
    }
    assert!(
        follower.guard().exited().is_none(),
        "--follow must keep running"
    );
    follower.guard().stop(StopMode::Kill);

    // What only control can know comes back through outpostctl with field and value.
    let huge = dir.write(
        "huge.yaml",
        "name: huge\ncommand: /bin/sleep\nmemory_bytes: 68719476736\n",
    )?;
    let refused = control
        .outpostctl(&["services", "apply", "-f", huge.to_str().unwrap()])?
        .expect_failure("unschedulable service")?;
    assert!(
        refused
            .stderr
            .contains("service \"huge\" from services file")
            && refused.stderr.contains("unschedulable")
            && refused
                .stderr
                .contains("field memory_bytes, value \"68719476736\""),
        "{}",
        refused.stderr
    );

    // Removing a service.
    let removed = control
        .outpostctl(&["services", "rm", "worker"])?
        .expect_success("services rm")?;
    assert!(
        removed.stdout.contains("service worker removed"),
        "{}",
        removed.stdout
    );
    let services = control
        .outpostctl(&["services", "ls", "--json"])?
        .expect_success("ls after rm")?
        .json()?;
    assert!(
        !as_list(&services)
            .iter()
            .any(|service| contains_string(service, "worker")),
        "{services}"
    );

    // A revoked node is shown as such and may not register again.
    let revoked = control
        .outpostctl(&["nodes", "revoke", "edge-1"])?
        .expect_success("nodes revoke")?;
    assert!(
        revoked.stdout.starts_with("node edge-1 revoked"),
        "{}",
        revoked.stdout
    );
    let nodes = control
        .outpostctl(&["nodes"])?
        .expect_success("nodes after revoke")?;
    let row = nodes
        .stdout
        .lines()
        .find(|line| line.starts_with("edge-1 "))
        .unwrap_or_default();
    assert!(row.contains("revoked"), "{}", nodes.stdout);
    let credential = registered["node_credential"].as_str().unwrap_or_default();
    let again = control.http()?.send(
        "POST",
        "/v1/nodes/register",
        None,
        &json!({"node_credential": credential, "facts": {"node_id": "edge-1", "hostname": "h", "arch": "x",
            "capacity": {"memory_bytes": 1u64 << 30, "cpu_millis": 2000}}}),
    )?;
    assert_eq!(again.0, 403, "a revoked node registers again: {}", again.1);
    assert_eq!(again.1["error"], "node_revoked", "{}", again.1);

    // Wrong credentials and wrong addresses say what to do.
    let refused = control
        .outpostctl(&["nodes", "--token", "opa.not-a-token"])?
        .expect_failure("wrong token")?;
    assert!(
        refused.stderr.contains("the token was refused"),
        "{}",
        refused.stderr
    );
    let refused = control.outpostctl_with(&["nodes"], &[("OUTPOST_TOKEN", "opa.wrong")], None)?;
    let refused = refused.expect_failure("environment token beats the file")?;
    assert!(
        refused.stderr.contains("the token was refused"),
        "{}",
        refused.stderr
    );
    control
        .outpostctl_with(
            &["nodes", "--token", &control.admin.token],
            &[("OUTPOST_TOKEN", "opa.wrong")],
            None,
        )?
        .expect_success("flag token beats the environment")?;
    let closed = format!("https://127.0.0.1:{}", free_port()?);
    let unreachable = control
        .outpostctl(&["status", "--control-url", &closed])?
        .expect_failure("unreachable")?;
    assert!(
        unreachable.stderr.contains(&format!(
            "cannot reach control at {closed}: connection refused"
        )) && unreachable.stderr.contains("OUTPOST_CONTROL_URL"),
        "{}",
        unreachable.stderr
    );
    let not_a_ca = dir.write("not-a-ca.pem", "hello")?;
    let bad_ca = control
        .outpostctl(&["status", "--ca-file", not_a_ca.to_str().unwrap()])?
        .expect_failure("bad CA file")?;
    assert!(
        bad_ca.stderr.contains("not-a-ca.pem") && bad_ca.stderr.contains("no certificate"),
        "{}",
        bad_ca.stderr
    );
    let missing_file = dir.path().join("missing.yaml");
    let missing = control
        .outpostctl(&["services", "apply", "-f", missing_file.to_str().unwrap()])?
        .expect_failure("missing file")?;
    assert!(
        missing.stderr.contains("cannot read services file")
            && missing.stderr.contains("missing.yaml"),
        "{}",
        missing.stderr
    );

    // A follower whose cursor is no longer served stops and says so; it never skips silently.
    let mut follower = control.outpostctl_streaming(&["events", "--follow"])?;
    wait_until(
        "the follower to print the event table",
        COMMAND_TIMEOUT,
        || follower.stdout().contains("ServiceRemoved") || follower.stdout().contains("worker"),
    )?;
    let (status, body) = control.http()?.send(
        "POST",
        "/v1/admin/rotate-epoch",
        Some(&control.admin.token),
        &json!({}),
    )?;
    assert_eq!(status, 200, "rotate-epoch answered {status}: {body}");
    let exit = wait_for(
        "the follower to stop on the gone cursor",
        COMMAND_TIMEOUT,
        || follower.guard().exited(),
    )?;
    assert!(!exit.success(), "a follower with a gone cursor must fail");
    let stderr = std::fs::read_to_string(follower.guard().log_path())?;
    assert!(stderr.contains("is no longer served"), "{stderr}");
    let new_epoch = log_epoch(&control)?;
    assert_ne!(new_epoch, epoch, "rotate-epoch kept the epoch");
    control
        .outpostctl(&["events"])?
        .expect_success("events in the new epoch")?;
    Ok(())
}

#[test]
fn warm_restart_keeps_the_admin_token_the_ca_and_the_state() -> Result<()> {
    let dir = TestDir::new("control-restart")?;
    let data_dir = dir.path().join("control");
    let control = ControlProcess::start(&data_dir)?;
    let first_admin = control.admin.clone();
    let first_fingerprint = ca_fingerprint(&first_admin.ca_file)?;
    let first_epoch = log_epoch(&control)?;
    let web_file = dir.write("web.yaml", WEB_SERVICE_YAML)?;
    control
        .outpostctl(&["services", "apply", "-f", web_file.to_str().unwrap()])?
        .expect_success("apply")?;
    let events_before = control
        .outpostctl(&["events", "--json"])?
        .expect_success("events before")?
        .json()?["events"]
        .clone();
    // What cold start wrote: every event before the first service event.
    let cold_start_kinds: Vec<&str> = as_list(&events_before)
        .iter()
        .take_while(|event| !contains_string(event, "web"))
        .filter_map(|event| event["kind"].as_str())
        .collect();
    assert!(
        !cold_start_kinds.is_empty(),
        "cold start wrote no events: {events_before}"
    );
    let first_health = control
        .outpostctl(&["status", "--json"])?
        .expect_success("status")?
        .json()?;
    // A follower that outlives the restarts: it retries with backoff and resumes from its cursor.
    let listen = control.listen_address().to_string();
    let mut follower = control.outpostctl_streaming(&["events", "--follow", "--json"])?;
    wait_until(
        "the follower to print the web event",
        COMMAND_TIMEOUT,
        || follower.stdout().contains("web"),
    )?;
    control.stop(StopMode::Graceful);

    for (round, stop) in [(1, StopMode::Graceful), (2, StopMode::Kill)] {
        let control = ControlProcess::start_with(&data_dir, &listen, &[])?;
        let health = control
            .outpostctl(&["status", "--json"])?
            .expect_success("status")?
            .json()?;
        assert_eq!(
            health["cluster_id"], first_health["cluster_id"],
            "round {round}: a new cluster id"
        );
        assert_eq!(
            control.admin.token, first_admin.token,
            "round {round}: the admin token changed"
        );
        assert_eq!(
            ca_fingerprint(&control.admin.ca_file)?,
            first_fingerprint,
            "round {round}: the CA changed"
        );
        assert_eq!(
            log_epoch(&control)?,
            first_epoch,
            "round {round}: the log was re-initialized"
        );
        // The token from before the restart still works, given explicitly.
        let services = control
            .outpostctl(&["services", "ls", "--json", "--token", &first_admin.token])?
            .expect_success("services after restart")?
            .json()?;
        assert!(
            as_list(&services)
                .iter()
                .any(|service| contains_string(service, "web")),
            "round {round}: {services}"
        );
        // Every event from before is still there, unchanged, and cold start did not run again.
        let events_after = control
            .outpostctl(&["events", "--json"])?
            .expect_success("events after")?
            .json()?["events"]
            .clone();
        let after = as_list(&events_after);
        assert_eq!(
            &after[..as_list(&events_before).len()],
            as_list(&events_before),
            "round {round}"
        );
        for event in &after[as_list(&events_before).len()..] {
            let kind = event["kind"].as_str().unwrap_or_default();
            assert!(
                !cold_start_kinds.contains(&kind),
                "round {round}: cold start ran again ({kind}): {event}"
            );
        }
        let enroll = control
            .outpostctl(&["enroll", "create", "--ttl", "5m", "--json"])?
            .expect_success("enroll")?;
        let token = enroll.json()?["token"]
            .as_str()
            .context("no token")?
            .to_string();
        let claims = EnrollmentClaims::parse(&token).map_err(|error| anyhow::anyhow!("{error}"))?;
        assert_eq!(claims.ca_fingerprint, first_fingerprint, "round {round}");
        // The follower, started before the restart, sees what happens after it.
        let marker = format!("after-restart-{round}");
        let marker_file = dir.write(
            &format!("{marker}.yaml"),
            &format!("name: {marker}\ncommand: /bin/true\n"),
        )?;
        control
            .outpostctl(&["services", "apply", "-f", marker_file.to_str().unwrap()])?
            .expect_success("apply after restart")?;
        wait_until(
            "the follower to resume after the restart",
            COMMAND_TIMEOUT,
            || follower.stdout().contains(&marker),
        )
        .with_context(|| format!("follower printed:\n{}", follower.stdout()))?;
        assert!(
            follower.guard().exited().is_none(),
            "round {round}: the follower gave up"
        );
        let exit = control.stop(stop);
        assert!(exit.is_some(), "round {round}: control had already exited");
    }
    Ok(())
}
