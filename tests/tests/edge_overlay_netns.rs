//! The edge reaches a backend over the real WireGuard overlay (issue 13): two "hosts" as network
//! namespaces (tests/src/netns.rs), control and an agent with a userspace wireguard-go on the
//! first, an agent on the second running the workload, and `outpost-edge` on the first host. The
//! edge finds its host in the overlay and dials the instance at its node's overlay address; the
//! backend sees the connection arrive from the first host's overlay address, i.e. out of the
//! tunnel. With the second agent stopped and its tunnel daemon killed, the workload still
//! answers on the LAN but the route answers 503; once the agent is back, so are the tunnel and
//! the route.
//!
//! Needs root, iproute2, ping, curl and wireguard-go; without them the test fails with the
//! reason (or skips with `OUTPOST_NETNS_TESTS=skip`). Build the binaries first:
//! `cargo build --bins && cargo test -p outpost-fleet-tests --test edge_overlay_netns`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow};
use outpost_fleet_tests::edge::{BACKEND_SCRIPT, EDGE_BINARY, backend_service, route};
use outpost_fleet_tests::netns::require_lab_support;
use outpost_fleet_tests::overlay_lab::{CONVERGE, OverlayFleet};
use outpost_fleet_tests::{COMMAND_TIMEOUT, ProcessGuard, binary, wait_for};
use serde_json::Value;

const HOST: &str = "shop.overlay.test";

/// `outpost-edge run` inside a node's namespace; returns the guard and its HTTP listener.
fn start_edge(
    fleet: &OverlayFleet,
    node: usize,
    data_dir: &Path,
    token: &str,
) -> Result<(ProcessGuard, String)> {
    fs::create_dir_all(data_dir)?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &fleet.lab.node(node).namespace])
        .arg(binary(EDGE_BINARY)?)
        .arg("run")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--enroll", token])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
        ])
        .env("OUTPOST_LOG", "info,outpost_edge=debug");
    let mut guard = ProcessGuard::spawn(EDGE_BINARY, command, &data_dir.with_extension("log"))?;
    let http = wait_for("the edge to write its listeners", CONVERGE, || {
        if let Some(status) = guard.exited() {
            return Some(Err(anyhow!(
                "outpost-edge exited with {status}:\n{}",
                guard.log_tail()
            )));
        }
        let status = edge_status_file(data_dir)?;
        status["http_listen"].as_str().map(|s| Ok(s.to_string()))
    })??;
    Ok((guard, http))
}

fn edge_status_file(data_dir: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(data_dir.join("status.json")).ok()?).ok()
}

/// `GET http://ADDRESS/` with the route's Host from inside a node's namespace (curl): the status
/// code and the body.
fn get(fleet: &OverlayFleet, node: usize, address: &str) -> Result<(u16, String)> {
    let output = fleet
        .lab
        .exec(
            node,
            "curl",
            &[
                "--silent",
                "--max-time",
                "3",
                "--write-out",
                "\n%{http_code}",
                "-H",
                &format!("Host: {HOST}"),
                &format!("http://{address}/"),
            ],
            COMMAND_TIMEOUT,
        )
        .map_err(|e| anyhow!("{e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[test]
fn the_edge_reaches_a_backend_at_its_nodes_overlay_address_through_wireguard() -> Result<()> {
    if !require_lab_support(
        "the_edge_reaches_a_backend_at_its_nodes_overlay_address_through_wireguard",
        &["wireguard-go", "curl"],
    ) {
        return Ok(());
    }
    let mut fleet = OverlayFleet::create("eov", 2)?;
    fleet.start_agent(0, &[])?;
    fleet.start_agent(1, &[])?;
    fleet.wait_for_mesh(&[0, 1])?;
    fleet.wait_for_pings(&[0, 1])?;
    let edge_overlay = fleet.address(0)?;
    let backend_overlay = fleet.address(1)?;
    let backend_lan: IpAddr = fleet.lab.node(1).underlay_address.into();

    // The workload runs on n1 only (n0, the edge's host, is cordoned).
    let control = fleet.control();
    control
        .outpostctl(&["nodes", "cordon", "n0"])?
        .expect_success("nodes cordon n0")?;
    let script = fleet.dir.write("backend.py", BACKEND_SCRIPT)?;
    let service = fleet
        .dir
        .write("web.json", &backend_service("web", 1, &script, &[]))?;
    let route_file = fleet.dir.write("route.json", &route("shop", HOST, "web"))?;
    for (what, file) in [("services", &service), ("routes", &route_file)] {
        control
            .outpostctl(&[what, "apply", "-f", &file.display().to_string()])?
            .expect_success(&format!("{what} apply"))?;
    }
    let token = control.enrollment_token()?;
    let edge_dir = fleet.dir.path().join("edge");
    let (mut edge, http) = start_edge(&fleet, 0, &edge_dir, &token)?;

    let body = wait_for("shop to answer through the edge", CONVERGE, || {
        get(&fleet, 0, &http)
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body)
    })
    .with_context(|| format!("edge log:\n{}", edge.log_tail()))?;
    assert!(body.starts_with("hello from web-"), "{body}");
    // The backend saw the connection come out of the tunnel, from n0's overlay address.
    assert!(
        body.trim_end().ends_with(&format!("peer={edge_overlay}")),
        "the backend should see the edge's overlay address {edge_overlay}: {body}"
    );
    // And the edge says it dials the instance at n1's overlay address, not its LAN one.
    let status = edge_status_file(&edge_dir).context("no edge status")?;
    let dialled: Vec<String> = status["backends"]
        .as_array()
        .context("no backends in the edge's status")?
        .iter()
        .filter_map(|backend| backend["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(dialled.len(), 1, "{status}");
    assert!(
        dialled[0].starts_with(&format!("{backend_overlay}:")),
        "dialled {dialled:?}, expected n1's overlay address {backend_overlay} (its LAN address is {backend_lan})"
    );

    // n1's agent stopped (its workload keeps running) and its tunnel daemon killed: the LAN
    // still reaches the workload, but the edge's way to it is gone, so the route answers 503
    // once the checks fail.
    let backend_port = dialled[0].rsplit_once(':').unwrap().1.to_string();
    fleet.agents[1].stop();
    fleet.agents[1].kill_daemon();
    let (_, down) = wait_for(
        "the route to answer 503 without the tunnel",
        CONVERGE,
        || get(&fleet, 0, &http).ok().filter(|(code, _)| *code == 503),
    )
    .with_context(|| format!("edge log:\n{}", edge.log_tail()))?;
    assert!(down.contains("route shop"), "{down}");
    let (code, direct) = get(&fleet, 0, &format!("{backend_lan}:{backend_port}"))?;
    assert_eq!(
        code, 200,
        "the workload still answers on n1's LAN address: {direct}"
    );
    assert!(
        direct.contains(&format!("peer={}", fleet.lab.node(0).underlay_address)),
        "{direct}"
    );
    fleet.agents[1].restart(&[])?;
    // The restarted agent brings the tunnel back; the edge takes the backend back.
    let body = wait_for(
        "shop to answer again over the restored tunnel",
        CONVERGE,
        || {
            get(&fleet, 0, &http)
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body)
        },
    )
    .with_context(|| {
        format!(
            "agent n1 log:\n{}\nedge log:\n{}",
            fleet.agents[1].log_tail(),
            edge.log_tail()
        )
    })?;
    assert!(
        body.trim_end().ends_with(&format!("peer={edge_overlay}")),
        "{body}"
    );
    edge.stop(outpost_fleet_tests::StopMode::Kill);
    Ok(())
}
