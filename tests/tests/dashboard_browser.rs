//! The dashboard in a real browser (M2, issue 15): headless Chromium driven over WebDriver
//! (`chromedriver` from Debian's `chromium-driver`, through fantoccini) against a real control
//! and two real agents on loopback. A wrong token gets the login page with an error; a read
//! token logs in and sees both nodes ready with their component status; one agent is killed and
//! the open page shows its node `down` without a reload. Screenshots of the fleet page and a
//! node page are saved under `target/ci-artifacts/dashboard/` for CI to keep.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use outpost_fleet_tests::{
    AgentProcess, ControlProcess, ProcessGuard, START_TIMEOUT, StopMode, TestDir, free_port,
    wait_until,
};
use serde_json::{Value, json};

/// Short, so a silent node is marked down quickly; long enough for a loaded machine.
const NODE_TTL_SECS: u64 = 6;

fn artifacts_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ci-artifacts/dashboard")
        .canonicalize()
        .or_else(|_| {
            let dir =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ci-artifacts/dashboard");
            std::fs::create_dir_all(&dir)?;
            dir.canonicalize()
        })?;
    Ok(dir)
}

fn chromedriver_binary() -> Result<PathBuf> {
    for candidate in ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"] {
        if Path::new(candidate).exists() {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("chromedriver not found: install Debian's chromium and chromium-driver (scripts/setup)")
}

/// Starts chromedriver on a free port and waits until it answers `/status`.
fn start_chromedriver(dir: &Path) -> Result<(ProcessGuard, String)> {
    let port = free_port()?;
    let mut command = Command::new(chromedriver_binary()?);
    command.arg(format!("--port={port}"));
    let guard = ProcessGuard::spawn("chromedriver", command, &dir.join("chromedriver.log"))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_until("chromedriver to answer /status", START_TIMEOUT, || {
        ureq::get(&format!("{url}/status")).call().is_ok()
    })?;
    Ok((guard, url))
}

async fn browser(webdriver: &str, profile: &Path) -> Result<Client> {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    // Control's certificate comes from its own CA, made for this test: the browser is not
    // given that CA, so it is told to accept it (loopback only).
    capabilities.insert("acceptInsecureCerts".into(), json!(true));
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(webdriver)
        .await
        .map_err(|error| anyhow!("cannot start a Chromium session: {error}"))
}

/// Waits until `condition` holds for the page as it is now (no reload), polling every 200 ms.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text_of(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn log_in(client: &Client, base: &str, token: &str) -> Result<()> {
    client.goto(&format!("{base}/ui/")).await?;
    let field = client
        .wait()
        .at_most(START_TIMEOUT)
        .for_element(Locator::Css("input#token"))
        .await?;
    field.send_keys(token).await?;
    client
        .find(Locator::Css("form.login button[type=submit]"))
        .await?
        .click()
        .await?;
    Ok(())
}

async fn screenshot(client: &Client, name: &str) -> Result<PathBuf> {
    let path = artifacts_dir()?.join(name);
    let png = client.screenshot().await?;
    std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn read_token(control: &ControlProcess) -> Result<String> {
    let (status, body): (u16, Value) = control.http()?.send(
        "POST",
        "/v1/admin/tokens",
        Some(&control.admin.token),
        &json!({"org": "default", "scopes": ["read"]}),
    )?;
    if status != 200 {
        bail!("issuing a read token answered {status}: {body}");
    }
    body["token"]
        .as_str()
        .map(str::to_string)
        .context("no token in the answer")
}

#[test]
fn the_dashboard_shows_the_fleet_live_in_chromium() -> Result<()> {
    let dir = TestDir::new("dashboard-browser")?;
    let control = ControlProcess::start_with(
        &dir.path().join("control"),
        "127.0.0.1:0",
        &["--node-ttl-secs", &NODE_TTL_SECS.to_string()],
    )?;
    let mut agents = Vec::new();
    for node_id in ["ui-a", "ui-b"] {
        agents.push(AgentProcess::start(
            &dir.path().join(node_id),
            &control.enrollment_token()?,
            &["--node-id", node_id],
        )?);
    }
    control.wait_for_nodes_ready(&["ui-a", "ui-b"])?;
    control.apply_services(
        "name: ui-sleeper\ncommand: /bin/sleep\nargs: [\"3600\"]\nreplicas: all\nmemory_bytes: 1048576\n",
    )?;
    let token = read_token(&control)?;
    let (_chromedriver, webdriver) = start_chromedriver(dir.path())?;
    let profile = dir.subdir("chromium-profile")?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = browser(&webdriver, &profile).await?;
        let outcome = drive(&client, &control, &token, &mut agents).await;
        let _ = client.close().await;
        outcome
    })
}

async fn drive(
    client: &Client,
    control: &ControlProcess,
    token: &str,
    agents: &mut [AgentProcess],
) -> Result<()> {
    let base = control.url.as_str();

    // A wrong token: the login page again, with an error, and no session.
    log_in(client, base, "opa.0000.wrong-secret").await?;
    eventually("the login error", START_TIMEOUT, || async {
        text_of(client, "p.error[role=alert]")
            .await
            .contains("Wrong or expired operator token")
    })
    .await?;
    let url = client.current_url().await?;
    assert_eq!(url.path(), "/ui/login", "still on the login page");
    assert!(!text_of(client, "main").await.contains("wrong-secret"));

    // The right token: the fleet page, both nodes ready, their components shown.
    log_in(client, base, token).await?;
    client
        .wait()
        .at_most(START_TIMEOUT)
        .for_element(Locator::Css("#count-ready"))
        .await?;
    eventually(
        "both nodes ready, each running its ui-sleeper",
        START_TIMEOUT,
        || async {
            let mut all = true;
            for node in ["ui-a", "ui-b"] {
                let row = text_of(client, &format!("#node-{node}")).await;
                all &= row.contains("ready") && row.contains("1/1 running");
            }
            all
        },
    )
    .await?;
    let row = text_of(client, "#node-ui-a").await;
    for component in ["allocations", "storage", "broker", "index", "overlay"] {
        assert!(row.contains(component), "component {component} in {row}");
    }
    assert_eq!(text_of(client, "#count-ready").await, "2");
    let fleet_png = screenshot(client, "fleet.png").await?;

    // A node page.
    client.goto(&format!("{base}/ui/nodes/ui-a")).await?;
    eventually("the node page's allocation", START_TIMEOUT, || async {
        text_of(client, "#allocations").await.contains("ui-sleeper")
    })
    .await?;
    assert!(text_of(client, "#node-state").await.contains("ready"));
    let node_png = screenshot(client, "node.png").await?;

    // Back to the fleet; mark the page so a reload would show, then silence ui-b.
    client.goto(&format!("{base}/ui/")).await?;
    client
        .wait()
        .at_most(START_TIMEOUT)
        .for_element(Locator::Css("#node-ui-b"))
        .await?;
    client
        .execute(
            "window.__outpostNoReload = 'still here'; return true;",
            vec![],
        )
        .await?;
    agents[1].guard.stop(StopMode::Kill);
    eventually(
        "ui-b to turn down on the open page",
        Duration::from_secs(NODE_TTL_SECS * 6),
        || async {
            client
                .find(Locator::Css("#node-ui-b[data-state=down]"))
                .await
                .is_ok()
        },
    )
    .await?;
    let marker = client
        .execute("return window.__outpostNoReload || null;", vec![])
        .await?;
    assert_eq!(marker, json!("still here"), "the page was not reloaded");
    assert_eq!(text_of(client, "#count-down").await, "1");
    assert!(text_of(client, "#node-ui-a").await.contains("ready"));
    screenshot(client, "fleet-node-down.png").await?;
    eprintln!(
        "screenshots: {} {}",
        fleet_png.display(),
        node_png.display()
    );
    Ok(())
}
