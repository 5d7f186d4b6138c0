//! The edge router against the real control and agent (E1–E3): a Host route reaches a workload
//! on a port the agent picked; with control killed, a restarted edge serves from its cache; a
//! backend that stops answering is taken out within its thresholds and back when it answers
//! again; bad routes (hostname, port range, unknown service or port name, a claimed host) are
//! refused by field and value while the good one keeps serving; and route changes under steady
//! load fail no request on the routes they did not touch.
//!
//! Build the binaries first: `cargo build --bins && cargo test -p outpost-fleet-tests`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use outpost_fleet_tests::edge::{
    EdgeProcess, Fleet, apply_route, backend_service, edge_status, fleet, http_connection,
    http_exchange, http_get, route, routes_ls, wait_for_answer,
};
use outpost_fleet_tests::{START_TIMEOUT, StopMode, wait_for, wait_until};

#[test]
fn a_host_route_reaches_a_workload_and_a_restarted_edge_serves_from_its_cache_offline() -> Result<()>
{
    let fleet = fleet("edge-host")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    apply_route(&fleet.control, &route("shop", "shop.test", "web"))?;
    let token = fleet.control.enrollment_token()?;
    let edge_dir = fleet.dir.path().join("edge");
    let mut edge = EdgeProcess::start(&edge_dir, &token, "127.0.0.1:0", "127.0.0.1:0", &[])?;
    let body = wait_for_answer(&edge, "shop.test", "shop.test to answer through the edge")?;
    assert!(body.starts_with("hello from web-"), "{body}");
    assert!(body.contains("host=shop.test"), "{body}");
    assert!(body.contains("xff=127.0.0.1"), "{body}");
    // An unknown host is a clear 404, not a hang or a wrong backend.
    let unknown = http_get(edge.http, "nobody.test", "/")?;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(
        unknown.body.contains("no route for host nobody.test"),
        "{unknown:?}"
    );

    // Bad routes are refused with the field and the value at fault; shop keeps serving.
    let bad_routes = [
        (
            serde_json::json!({"name": "bad", "hosts": ["Bad_Host!"], "service": "web", "port": "http"}),
            "Bad_Host!",
        ),
        (
            serde_json::json!({"name": "bad", "listen_port": 70000, "service": "web", "port": "http"}),
            "70000",
        ),
        (
            serde_json::json!({"name": "bad", "hosts": ["bad.test"], "service": "nosuch", "port": "http"}),
            "nosuch",
        ),
        (
            serde_json::json!({"name": "bad", "hosts": ["bad.test"], "service": "web", "port": "grpc"}),
            "grpc",
        ),
        (
            serde_json::json!({"name": "bad", "hosts": ["shop.test"], "service": "web", "port": "http"}),
            "shop.test",
        ),
    ];
    for (document, value) in bad_routes {
        let refused = fleet
            .control
            .outpostctl_with(
                &["routes", "apply", "-f", "-"],
                &[],
                Some(&document.to_string()),
            )?
            .expect_failure(&format!("the bad route {document}"))?;
        assert!(
            refused.stderr.contains(value),
            "the refusal of {document} should name {value:?}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        wait_for_answer(&edge, "shop.test", "shop.test after the refusals")?,
        body
    );

    // `routes ls` shows what the edge applied: its cursor and one healthy backend.
    wait_until(
        "routes ls to show the edge's healthy backend",
        START_TIMEOUT,
        || {
            routes_ls(&fleet.control).is_ok_and(|routes| {
                routes[0]["edges"]
                    .as_array()
                    .is_some_and(|edges| edges.len() == 1 && edges[0]["healthy_backends"] == 1)
            })
        },
    )?;
    let listed = fleet
        .control
        .outpostctl(&["routes", "ls"])?
        .expect_success("outpostctl routes ls")?;
    assert!(listed.stdout.contains("shop.test"), "{}", listed.stdout);
    assert!(listed.stdout.contains("1/1"), "{}", listed.stdout);

    // Control killed, then the edge restarted: it serves from its cache with no network.
    let Fleet {
        dir,
        control,
        agent: _agent,
        ..
    } = fleet;
    control.stop(StopMode::Kill);
    edge.guard.stop(StopMode::Kill);
    let offline = edge_status(&edge_dir)?;
    assert_eq!(offline["running"], false, "{offline}");
    assert_eq!(
        offline["cache"]["routes"],
        serde_json::json!(["shop"]),
        "{offline}"
    );
    let http = edge.http.to_string();
    let https = edge.https.to_string();
    let edge = EdgeProcess::start(&edge_dir, &token, &http, &https, &[])?;
    let body = wait_for_answer(
        &edge,
        "shop.test",
        "the restarted edge to serve from its cache",
    )?;
    assert!(body.starts_with("hello from web-"), "{body}");
    let status = edge.status()?;
    assert_eq!(status["status"]["boot_source"], "store", "{status}");
    assert!(
        status["status"]["last_error"].is_string(),
        "control is down: {status}"
    );
    drop(dir);
    Ok(())
}

#[test]
fn a_backend_that_stops_answering_is_taken_out_within_its_thresholds_and_back_after() -> Result<()>
{
    let fleet = fleet("edge-health")?;
    fleet
        .control
        .apply_services(&backend_service("web", 2, &fleet.script, &[]))?;
    apply_route(&fleet.control, &route("shop", "shop.test", "web"))?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )?;
    let answered_by = |edge: &EdgeProcess| -> Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for _ in 0..12 {
            let answer = http_get(edge.http, "shop.test", "/")?;
            if answer.status != 200 {
                bail!("answer {answer:?}");
            }
            seen.insert(
                answer
                    .body
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or("")
                    .to_string(),
            );
        }
        Ok(seen)
    };
    wait_until(
        "both replicas to answer through the edge",
        START_TIMEOUT,
        || answered_by(&edge).is_ok_and(|seen| seen.len() == 2),
    )
    .with_context(|| edge.guard.log_tail())?;

    // Stop one backend (SIGSTOP: it accepts connections but never answers).
    let allocations = fleet.control.allocations()?;
    let victim = allocations[0]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = wait_for("the victim's pid", START_TIMEOUT, || {
        outpost_fleet_tests::allocation_pids(fleet.dir.path(), &victim)
            .first()
            .copied()
    })?;
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    wait_until(
        "the edge to take the stopped backend out",
        START_TIMEOUT,
        || {
            edge.status().is_ok_and(|status| {
                status["status"]["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().filter(|b| b["healthy"] == true).count() == 1)
            })
        },
    )?;
    let seen = answered_by(&edge).with_context(|| edge.guard.log_tail())?;
    assert_eq!(seen.len(), 1, "only the live replica answers: {seen:?}");
    assert!(!seen.contains(&victim), "{seen:?}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    wait_until("the edge to take the backend back", START_TIMEOUT, || {
        answered_by(&edge).is_ok_and(|seen| seen.contains(&victim))
    })
    .with_context(|| edge.guard.log_tail())?;
    Ok(())
}

#[test]
fn route_changes_under_steady_load_fail_no_request_on_other_routes() -> Result<()> {
    let fleet = fleet("edge-load")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    apply_route(&fleet.control, &route("steady", "steady.test", "web"))?;
    apply_route(&fleet.control, &route("moving", "moving-0.test", "web"))?;
    let edge = EdgeProcess::start(
        &fleet.dir.path().join("edge"),
        &fleet.control.enrollment_token()?,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    )?;
    wait_for_answer(&edge, "steady.test", "steady.test to answer")?;
    wait_for_answer(&edge, "moving-0.test", "moving-0.test to answer")?;

    // Steady load: two keep-alive clients and one that opens a connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for keep_alive in [true, true, false] {
        let (stop, served, address) = (Arc::clone(&stop), Arc::clone(&served), edge.http);
        workers.push(std::thread::spawn(move || -> Result<()> {
            let mut connection = http_connection(address)?;
            while !stop.load(Ordering::Relaxed) {
                let answer = if keep_alive {
                    http_exchange(&mut connection, "steady.test", "/")?
                } else {
                    http_get(address, "steady.test", "/")?
                };
                if answer.status != 200 {
                    bail!("steady.test answered {answer:?} during route changes");
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    // Ten changes of the other route, each waited for at the edge.
    for round in 1..=10 {
        let host = format!("moving-{round}.test");
        apply_route(&fleet.control, &route("moving", &host, "web"))?;
        wait_for_answer(&edge, &host, &format!("{host} to answer"))?;
    }
    fleet
        .control
        .outpostctl(&["routes", "rm", "moving"])?
        .expect_success("outpostctl routes rm")?;
    wait_until("the removed route to answer 404", START_TIMEOUT, || {
        http_get(edge.http, "moving-10.test", "/").is_ok_and(|a| a.status == 404)
    })?;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap()?;
    }
    let served = served.load(Ordering::Relaxed);
    assert!(served > 30, "the load kept going: {served} requests");
    Ok(())
}

#[test]
fn a_tcp_route_goes_by_listen_port_and_a_corrupt_cache_boots_from_the_previous_copy() -> Result<()>
{
    let fleet = fleet("edge-tcp")?;
    fleet
        .control
        .apply_services(&backend_service("web", 1, &fleet.script, &[]))?;
    let tcp_port = outpost_fleet_tests::free_port()?;
    let tcp_route = serde_json::json!({
        "name": "raw", "listen_port": tcp_port, "service": "web", "port": "http",
        "health": {"interval_ms": 200, "timeout_ms": 500, "unhealthy_after": 2, "healthy_after": 2}
    })
    .to_string();
    apply_route(&fleet.control, &tcp_route)?;
    apply_route(&fleet.control, &route("shop", "shop.test", "web"))?;
    let token = fleet.control.enrollment_token()?;
    let edge_dir = fleet.dir.path().join("edge");
    let mut edge = EdgeProcess::start(&edge_dir, &token, "127.0.0.1:0", "127.0.0.1:0", &[])?;
    let tcp_address: std::net::SocketAddr = format!("127.0.0.1:{tcp_port}").parse()?;
    // The TCP route forwards bytes by port: whatever Host the client names, the service answers.
    let through_tcp = || {
        http_get(tcp_address, "anything.invalid", "/")
            .ok()
            .filter(|a| a.status == 200)
            .map(|a| a.body)
    };
    let body = wait_for("the TCP route to answer", START_TIMEOUT, through_tcp)
        .with_context(|| edge.guard.log_tail())?;
    assert!(body.contains("host=anything.invalid"), "{body}");
    wait_for_answer(&edge, "shop.test", "shop.test to answer")?;

    // One more change, so the last-good copy differs from the previous one.
    apply_route(&fleet.control, &route("extra", "extra.test", "web"))?;
    wait_for_answer(&edge, "extra.test", "extra.test to answer")?;

    // Control killed, the edge killed, its store corrupted and its last-good copy damaged.
    let Fleet {
        dir,
        control,
        agent: _agent,
        ..
    } = fleet;
    control.stop(StopMode::Kill);
    edge.guard.stop(StopMode::Kill);
    std::fs::write(edge_dir.join("edge.redb"), b"not a redb file at all")?;
    let last_good = edge_dir.join("routes.last-good");
    let mut damaged = std::fs::read(&last_good)?;
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x20;
    std::fs::write(&last_good, damaged)?;
    // Offline, `status` already tells which copy the edge would boot and what it holds.
    let offline = edge_status(&edge_dir)?;
    assert_eq!(offline["cache"]["copy"], "previous", "{offline}");
    let previous_routes = offline["cache"]["routes"].clone();
    let (http, https) = (edge.http.to_string(), edge.https.to_string());
    let edge = EdgeProcess::start(&edge_dir, &token, &http, &https, &[])?;
    let status = edge.status()?;
    assert_eq!(status["status"]["boot_source"], "previous-copy", "{status}");
    let notes = status["status"]["boot_notes"].to_string();
    assert!(
        notes.contains("corrupt"),
        "the store's corruption is named: {notes}"
    );
    assert!(
        notes.contains("last-good"),
        "the damaged copy is named: {notes}"
    );
    assert!(
        edge.guard.log_tail().contains("previous copy"),
        "the log says so:\n{}",
        edge.guard.log_tail()
    );
    // The previous table serves (it holds raw and shop, whichever save it was), control down.
    assert_eq!(status["status"]["routes"], previous_routes, "{status}");
    let body = wait_for(
        "the TCP route from the previous copy",
        START_TIMEOUT,
        through_tcp,
    )
    .with_context(|| edge.guard.log_tail())?;
    assert!(body.starts_with("hello from web-"), "{body}");
    wait_for_answer(&edge, "shop.test", "shop.test from the previous copy")?;
    drop(dir);
    Ok(())
}
