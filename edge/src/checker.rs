//! Active health checks (E2): one task per distinct (backend address, check spec), shared by every
//! route whose check of that backend is the same — an HTTP GET of the path answered 2xx/3xx, or a
//! TCP connect when the spec has no HTTP check — every `interval_ms`, each within `timeout_ms`,
//! sending the spec's PROXY header first like real traffic. Tasks follow the table: new
//! (address, spec) pairs get one, pairs no route uses any more lose theirs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use crate::backend::dial_address;
use crate::health::{CheckSpec, HealthBoard};
use crate::table::RouteTable;

/// One running check: its spec, the routes that use it (for logs, kept current), its task.
struct Running {
    spec: CheckSpec,
    routes: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

/// One check the table wants, with what its logs name.
pub struct WantedCheck {
    pub address: SocketAddr,
    pub spec: CheckSpec,
    /// The routes sharing it, sorted.
    pub routes: Vec<String>,
    /// The instance behind the address (node and allocation, for logs).
    pub node_id: String,
    pub allocation_id: String,
}

/// The distinct (address, check spec) pairs of a table: what [`Checkers::reconcile`] runs.
pub fn wanted_checks(table: &RouteTable) -> Vec<WantedCheck> {
    let mut by_address: HashMap<SocketAddr, Vec<WantedCheck>> = HashMap::new();
    for (spec, backend) in table.all_backends() {
        let checks = by_address.entry(backend.address).or_default();
        match checks.iter_mut().find(|check| check.spec.is_of(spec)) {
            Some(check) => check.routes.push(spec.name.to_string()),
            None => checks.push(WantedCheck {
                address: backend.address,
                spec: CheckSpec::of(spec),
                routes: vec![spec.name.to_string()],
                node_id: backend.node_id.clone(),
                allocation_id: backend.allocation_id.clone(),
            }),
        }
    }
    let mut wanted: Vec<WantedCheck> = by_address.into_values().flatten().collect();
    for check in &mut wanted {
        check.routes.sort();
        check.routes.dedup();
    }
    wanted
}

#[derive(Default)]
pub struct Checkers {
    running: HashMap<SocketAddr, Vec<Running>>,
}

impl Checkers {
    /// Starts a check for each new (address, check spec) pair of the table, stops the checks no
    /// route uses any more and forgets their health; checks that stay keep running, and their
    /// state, whatever routes came or went.
    pub fn reconcile(&mut self, table: &RouteTable, health: &HealthBoard) {
        let mut wanted: HashMap<SocketAddr, Vec<WantedCheck>> = HashMap::new();
        for check in wanted_checks(table) {
            wanted.entry(check.address).or_default().push(check);
        }
        for (address, running) in self.running.iter_mut() {
            running.retain(|check| {
                let keep = wanted
                    .get(address)
                    .is_some_and(|checks| checks.iter().any(|w| w.spec == check.spec));
                if !keep {
                    check.task.abort();
                }
                keep
            });
        }
        self.running.retain(|_, running| !running.is_empty());
        for (address, checks) in wanted {
            let running = self.running.entry(address).or_default();
            for check in checks {
                if let Some(existing) = running.iter().find(|r| r.spec == check.spec) {
                    *existing.routes.lock().unwrap_or_else(|p| p.into_inner()) = check.routes;
                    continue;
                }
                let routes = Arc::new(Mutex::new(check.routes.clone()));
                let spec = check.spec.clone();
                let task = tokio::spawn(check_forever(health.clone(), check, Arc::clone(&routes)));
                running.push(Running { spec, routes, task });
            }
        }
        health.retain(|address, spec| {
            self.running
                .get(&address)
                .is_some_and(|running| running.iter().any(|r| &r.spec == spec))
        });
    }

    /// How many checks run (one per distinct backend address and check spec).
    pub fn count(&self) -> usize {
        self.running.values().map(Vec::len).sum()
    }
}

/// "r1" or "r1, r2 and 998 more routes": the routes a check serves, for a log line.
fn describe(routes: &Mutex<Vec<String>>) -> String {
    let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
    match routes.len() {
        0..=3 => format!("route {}", routes.join(", ")),
        n => format!("routes {}, {} and {} more", routes[0], routes[1], n - 2),
    }
}

async fn check_forever(health: HealthBoard, check: WantedCheck, routes: Arc<Mutex<Vec<String>>>) {
    let interval = Duration::from_millis(u64::from(check.spec.health.interval_ms));
    loop {
        let passed = check_once(check.address, &check.spec).await;
        let (state, changed) = health.record(check.address, &check.spec, passed.is_ok());
        if changed {
            match &passed {
                Ok(()) => tracing::info!(
                    component = "health",
                    action = "backend_up",
                    node_id = %check.node_id,
                    allocation_id = %check.allocation_id,
                    "backend {} of {} is healthy",
                    check.address,
                    describe(&routes)
                ),
                Err(reason) => tracing::warn!(
                    component = "health",
                    action = "backend_down",
                    node_id = %check.node_id,
                    allocation_id = %check.allocation_id,
                    "backend {} of {} is down after {} failed checks: {reason}",
                    check.address,
                    describe(&routes),
                    state.consecutive_failures
                ),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One check of one backend. An HTTP check sends `Host: <backend address>`: the check is shared
/// by routes with different hosts, so it names none of them.
pub async fn check_once(address: SocketAddr, spec: &CheckSpec) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(spec.health.timeout_ms));
    let check = async {
        let own: SocketAddr = SocketAddr::new(
            if address.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            0,
        );
        let stream = dial_address(
            address,
            spec.health.timeout_ms,
            spec.proxy_protocol,
            own,
            own,
        )
        .await?;
        let Some(http) = &spec.health.http else {
            return Ok(());
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::get(http.path.as_str())
            .header(hyper::header::HOST, address.to_string())
            .header(hyper::header::USER_AGENT, "outpost-edge-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("GET {}: {e}", http.path))?;
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {} answered {status}", http.path))
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::route::{Backend, BackendTable, EdgeTable, RouteSpec};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A real HTTP/1.1 backend on loopback that answers every request with `status` and counts
    /// the requests by path, remembering the Host headers it saw.
    struct TestBackend {
        address: SocketAddr,
        requests: Arc<Mutex<Vec<(String, String)>>>,
        connections: Arc<AtomicUsize>,
    }

    async fn backend(status: u16) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (Arc::clone(&requests), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&buffer).to_string();
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    let host = text
                        .lines()
                        .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push((path, host));
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        TestBackend {
            address,
            requests,
            connections,
        }
    }

    fn route(name: &str, health: serde_json::Value) -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "hosts": [format!("{name}.example.com")], "service": "web",
            "port": "http", "health": health
        }))
        .unwrap()
    }

    fn table(routes: &[RouteSpec], address: SocketAddr) -> RouteTable {
        let mut source = EdgeTable::default();
        let mut backends = std::collections::BTreeMap::new();
        for route in routes {
            source.routes.insert(route.name.to_string(), route.clone());
            backends.insert(
                route.name.to_string(),
                vec![Backend {
                    allocation_id: "web-1".try_into().unwrap(),
                    node_id: "n1".try_into().unwrap(),
                    address: address.ip().to_string(),
                    port: address.port(),
                    ready: true,
                    overlay_address: None,
                }],
            );
        }
        source.backends = BackendTable::new(backends);
        RouteTable::build(source, &[]).unwrap()
    }

    /// Waits up to 10 s for `condition`.
    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One check a minute, healthy after one pass: a route is healthy only once a check ran.
    fn slow() -> serde_json::Value {
        serde_json::json!({"http": {"path": "/healthz"}, "interval_ms": 60000,
                           "healthy_after": 1, "unhealthy_after": 1})
    }

    #[tokio::test]
    async fn two_routes_to_one_backend_share_one_check_and_its_result() {
        let backend = backend(200).await;
        let (a, b) = (route("a", slow()), route("b", slow()));
        let table = table(&[a.clone(), b.clone()], backend.address);
        let health = HealthBoard::default();
        let mut checkers = Checkers::default();
        checkers.reconcile(&table, &health);
        assert_eq!(checkers.count(), 1, "one check for one (address, spec)");
        wait_until("both routes healthy", || {
            health.is_healthy(backend.address, &a) && health.is_healthy(backend.address, &b)
        })
        .await;
        // Unshared, each route would have needed its own passed check first.
        let requests = backend.requests.lock().unwrap().clone();
        assert_eq!(
            requests,
            vec![("/healthz".to_string(), backend.address.to_string())],
            "one check, naming the backend and neither route's host"
        );
        assert_eq!(backend.connections.load(Ordering::SeqCst), 1);

        // A passive failure seen on route a counts for route b: it is the same backend and check.
        let (_, changed) = health.record_for_route(backend.address, &a, false);
        assert!(changed);
        assert!(!health.is_healthy(backend.address, &b));
    }

    #[tokio::test]
    async fn routes_with_other_paths_or_thresholds_get_their_own_checks() {
        let backend = backend(200).await;
        let other_path = route(
            "c",
            serde_json::json!({"http": {"path": "/ready"}, "interval_ms": 60000,
                               "healthy_after": 1, "unhealthy_after": 1}),
        );
        let other_thresholds = route(
            "d",
            serde_json::json!({"http": {"path": "/healthz"}, "interval_ms": 60000,
                               "healthy_after": 1, "unhealthy_after": 3}),
        );
        let routes = [
            route("a", slow()),
            route("b", slow()),
            other_path.clone(),
            other_thresholds.clone(),
        ];
        let health = HealthBoard::default();
        let mut checkers = Checkers::default();
        checkers.reconcile(&table(&routes, backend.address), &health);
        assert_eq!(checkers.count(), 3);
        wait_until("every route healthy", || {
            routes.iter().all(|r| health.is_healthy(backend.address, r))
        })
        .await;
        let mut paths: Vec<String> = backend
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|(path, _)| path.clone())
            .collect();
        paths.sort();
        assert_eq!(paths, vec!["/healthz", "/healthz", "/ready"]);

        // Route d's own thresholds: one passive failure is below its unhealthy_after of 3, while
        // it takes a and b (unhealthy_after 1) out.
        health.record_for_route(backend.address, &other_thresholds, false);
        assert!(health.is_healthy(backend.address, &other_thresholds));
        health.record_for_route(backend.address, &routes[0], false);
        assert!(!health.is_healthy(backend.address, &routes[1]));
        assert!(health.is_healthy(backend.address, &other_path));
    }

    #[tokio::test]
    async fn a_new_backend_is_not_used_until_it_passes() {
        let failing = backend(503).await;
        let a = route(
            "a",
            serde_json::json!({"http": {"path": "/healthz"}, "interval_ms": 50,
                               "healthy_after": 1, "unhealthy_after": 1}),
        );
        let health = HealthBoard::default();
        let mut checkers = Checkers::default();
        checkers.reconcile(&table(std::slice::from_ref(&a), failing.address), &health);
        assert!(!health.is_healthy(failing.address, &a), "before any check");
        wait_until("three failed checks", || {
            failing.requests.lock().unwrap().len() >= 3
        })
        .await;
        assert!(!health.is_healthy(failing.address, &a));
        assert!(health.get(failing.address, &a).consecutive_failures >= 2);
    }

    #[tokio::test]
    async fn a_check_outlives_a_route_that_leaves_and_stops_with_the_last_one() {
        let backend = backend(200).await;
        let (a, b) = (route("a", slow()), route("b", slow()));
        let health = HealthBoard::default();
        let mut checkers = Checkers::default();
        checkers.reconcile(&table(&[a.clone(), b.clone()], backend.address), &health);
        wait_until("route b healthy", || health.is_healthy(backend.address, &b)).await;

        checkers.reconcile(&table(std::slice::from_ref(&b), backend.address), &health);
        assert_eq!(checkers.count(), 1);
        assert!(
            health.is_healthy(backend.address, &b),
            "the shared check and its state stay"
        );

        checkers.reconcile(&table(&[], backend.address), &health);
        assert_eq!(checkers.count(), 0);
        assert!(
            !health.is_healthy(backend.address, &b),
            "a check nobody uses is forgotten"
        );
        assert_eq!(backend.requests.lock().unwrap().len(), 1);
    }
}
