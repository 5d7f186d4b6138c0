//! Tenancy with the real binaries (P4, issue 12): one control, and one agent enrolled by each of
//! two orgs. Both orgs run a `web` (service, secret `db`, route `web`) on their own node, and
//! each has a name the other does not (a service, a secret, a route, an artifact, a node).
//! Through `outpostctl`, neither org lists, reads or deletes the other's: every attempt on the
//! other's name is the 404 an unknown name gets (never a 403 that would say it exists), the
//! other's objects are untouched, and the cluster admin's `outpostctl audit` shows each refused
//! attempt with the tenant token that made it.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::{
    AgentProcess, CommandOutput, ControlProcess, START_TIMEOUT, TestDir, wait_for,
};
use serde_json::Value;

/// One org's `web`: a service with a port and the secret `db`, plus a service only this org
/// has (`only`).
fn services(only: &str) -> String {
    format!(
        r#"name: web
command: /bin/sleep
args: ["3600"]
memory_bytes: 1048576
ports: [{{name: http, port: 0}}]
secrets:
  - name: db
    env: {{DB_PASSWORD: password}}
---
name: {only}
command: /bin/sleep
args: ["3600"]
memory_bytes: 1048576
"#
    )
}

fn route(name: &str, host: &str) -> String {
    format!(r#"{{"name": "{name}", "hosts": ["{host}"], "service": "web", "port": "http"}}"#)
}

/// The names of one org's objects, and how to run `outpostctl` as that org.
struct Org<'a> {
    control: &'a ControlProcess,
    /// `None`: the cluster admin's token from the control's config.
    token: Option<String>,
    node: &'static str,
    service: &'static str,
    secret: &'static str,
    route: &'static str,
    artifact_sha256: String,
}

impl Org<'_> {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<CommandOutput> {
        let environment: Vec<(&str, &str)> = self
            .token
            .iter()
            .map(|token| ("OUTPOST_TOKEN", token.as_str()))
            .collect();
        self.control.outpostctl_with(args, &environment, stdin)
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> Result<CommandOutput> {
        self.run(args, stdin)?
            .expect_success(&format!("outpostctl {}", args.join(" ")))
    }

    /// The names of this org's own objects.
    fn names(&self) -> [&str; 5] {
        [
            self.node,
            self.service,
            self.secret,
            self.route,
            &self.artifact_sha256,
        ]
    }

    /// Everything this org's `ls --json` commands print, as one text.
    fn listings(&self) -> Result<String> {
        let mut text = String::new();
        for what in [
            "services",
            "secrets",
            "routes",
            "nodes",
            "artifacts",
            "allocations",
        ] {
            let args: Vec<&str> = match what {
                "allocations" => vec!["allocations", "--json"],
                other => vec![other, "ls", "--json"],
            };
            text.push_str(&self.ok(&args, None)?.stdout);
        }
        Ok(text)
    }
}

/// Asserts `output` failed with a 404 naming `name`, not a 403.
fn assert_not_found(output: CommandOutput, what: &str, name: &str) -> Result<()> {
    let refused = output.expect_failure(what)?;
    if !refused.stderr.contains("not_found") || !refused.stderr.contains(name) {
        bail!(
            "{what}: expected a 404 naming {name}, got: {}",
            refused.stderr
        );
    }
    if refused.stderr.contains("forbidden") || refused.stderr.contains("another org") {
        bail!(
            "{what}: the refusal says the object exists: {}",
            refused.stderr
        );
    }
    Ok(())
}

fn set_up<'a>(org: &Org<'a>, host: &str) -> Result<()> {
    org.ok(
        &["secrets", "set", "db", "--from-stdin", "password"],
        Some("pw\n"),
    )?;
    org.ok(
        &["secrets", "set", org.secret, "--from-stdin", "key"],
        Some("v\n"),
    )?;
    org.ok(
        &["services", "apply", "-f", "-"],
        Some(&services(org.service)),
    )?;
    org.ok(&["routes", "apply", "-f", "-"], Some(&route("web", host)))?;
    org.ok(
        &["routes", "apply", "-f", "-"],
        Some(&route(org.route, &format!("{}.{host}", org.route))),
    )?;
    Ok(())
}

#[test]
fn two_orgs_each_run_a_web_and_neither_sees_the_others() -> Result<()> {
    let dir = TestDir::new("fleet-tenancy")?;
    let control = ControlProcess::start(&dir.path().join("control"))?;
    let created = control
        .outpostctl(&[
            "tokens", "create", "--org", "acme", "--scopes", "admin", "--json",
        ])?
        .expect_success("tokens create")?
        .json()?;
    let acme_token = created["token"].as_str().context("no token")?.to_string();
    let acme_actor = format!(
        "opa.{}",
        created["token_id"].as_str().context("no token id")?
    );

    let artifact = dir.write("default-app.tar", "the default org's artifact")?;
    let acme_artifact = dir.write("acme-app.tar", "acme's artifact")?;
    let mut ours = Org {
        control: &control,
        token: None,
        node: "node-ours",
        service: "ours-ledger",
        secret: "ours-ledger-key",
        route: "ours-books",
        artifact_sha256: String::new(),
    };
    let mut acme = Org {
        control: &control,
        token: Some(acme_token),
        node: "node-acme",
        service: "acme-jobs",
        secret: "acme-jobs-key",
        route: "acme-shop",
        artifact_sha256: String::new(),
    };
    for (org, file) in [(&mut ours, &artifact), (&mut acme, &acme_artifact)] {
        let pushed = org.ok(
            &["artifacts", "push", &file.display().to_string(), "--json"],
            None,
        )?;
        org.artifact_sha256 = pushed.json()?["sha256"]
            .as_str()
            .context("push printed no sha256")?
            .to_string();
    }

    // Each org enrolls its own node with its own enrollment token.
    let mut agents = Vec::new();
    for org in [&ours, &acme] {
        let enrollment = org
            .ok(&["enroll", "create", "--ttl", "1h", "--json"], None)?
            .json()?;
        let token = enrollment["token"]
            .as_str()
            .context("no enrollment token")?;
        agents.push(AgentProcess::start(
            &dir.path().join(org.node),
            token,
            &["--node-id", org.node],
        )?);
    }
    for org in [&ours, &acme] {
        wait_for(&format!("{} ready", org.node), START_TIMEOUT, || {
            let nodes: Value = org.ok(&["nodes", "ls", "--json"], None).ok()?.json().ok()?;
            nodes
                .as_array()?
                .iter()
                .any(|n| n["node_id"] == org.node && n["state"] == "ready")
                .then_some(())
        })?;
    }
    set_up(&ours, "web.default.test")?;
    set_up(&acme, "web.acme.test")?;

    // Each org's `web` (and its own service) runs on its own org's node.
    for org in [&ours, &acme] {
        wait_for(
            &format!("{}'s services placed", org.node),
            START_TIMEOUT,
            || {
                let allocations: Value =
                    org.ok(&["allocations", "--json"], None).ok()?.json().ok()?;
                let placed = allocations.as_array()?;
                (placed.len() == 2 && placed.iter().all(|a| a["node_id"] == org.node)).then_some(())
            },
        )?;
    }

    // Neither lists the other's names.
    for (org, other) in [(&ours, &acme), (&acme, &ours)] {
        let listed = org.listings()?;
        if let Some(missing) = org.names().into_iter().find(|own| !listed.contains(*own)) {
            bail!("{} does not list its own {missing}", org.node);
        }
        for theirs in other.names() {
            if listed.contains(theirs) {
                bail!("{} lists the other org's {theirs}: {listed}", org.node);
            }
        }
        // `web` is each org's own.
        let web: Value = org
            .ok(&["services", "ls", "--json"], None)?
            .json()?
            .as_array()
            .and_then(|all| all.iter().find(|s| s["spec"]["name"] == "web").cloned())
            .context("no web listed")?;
        let own_org = if org.token.is_none() {
            "default"
        } else {
            "acme"
        };
        if web["org"] != own_org {
            bail!("{own_org} lists a web of {}", web["org"]);
        }
    }

    // acme can neither read nor delete nor use the default org's objects: 404 like an unknown
    // name. Then the other way round, for what the default org's admin cannot name either.
    for (org, other) in [(&acme, &ours), (&ours, &acme)] {
        let attempts: Vec<(Vec<&str>, &str, &str)> = vec![
            (
                vec!["services", "rm", other.service],
                "service",
                other.service,
            ),
            (vec!["secrets", "rm", other.secret], "secret", other.secret),
            (vec!["routes", "rm", other.route], "route", other.route),
            (vec!["nodes", "revoke", other.node], "node", other.node),
            (
                vec!["artifacts", "rm", &other.artifact_sha256],
                "artifact",
                &other.artifact_sha256,
            ),
            (
                vec!["rollout", "status", other.service],
                "service",
                other.service,
            ),
        ];
        for (args, what, name) in attempts {
            assert_not_found(
                org.run(&args, None)?,
                &format!("{what} {name} of the other org"),
                name,
            )?;
        }
    }

    // Nothing of either org was touched: each still lists all its own.
    for org in [&ours, &acme] {
        let listed = org.listings()?;
        if let Some(gone) = org.names().into_iter().find(|own| !listed.contains(*own)) {
            bail!(
                "{}'s {gone} is gone after the other org's attempts",
                org.node
            );
        }
    }

    // The cluster admin's audit shows acme's refused attempts, with acme's token as the actor.
    let audit: Value = ours.ok(&["audit", "--json"], None)?.json()?;
    let refusals: Vec<(String, String)> = audit
        .as_array()
        .context("audit is not a list")?
        .iter()
        .filter(|entry| entry["act"] == "AccessRefused")
        .map(|entry| {
            (
                entry["actor"].as_str().unwrap_or_default().to_string(),
                entry["subject"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for subject in [
        format!("service/{}", ours.service),
        format!("secret/{}", ours.secret),
        format!("route/{}", ours.route),
        format!("node/{}", ours.node),
        format!("artifact/{}", ours.artifact_sha256),
    ] {
        if !refusals.contains(&(acme_actor.clone(), subject.clone())) {
            bail!("the audit shows no refusal of {subject} by {acme_actor}: {refusals:?}");
        }
    }
    // acme's own audit shows its own org's acts only.
    let theirs: Value = acme.ok(&["audit", "--json"], None)?.json()?;
    let entries = theirs.as_array().context("audit is not a list")?;
    if entries.is_empty() || entries.iter().any(|entry| entry["org"] == "default") {
        bail!("acme's audit is empty or shows the default org's acts: {theirs}");
    }
    drop(agents);
    Ok(())
}
