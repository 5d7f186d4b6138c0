//! Active health checks (E2): one task per (route, backend) that checks every `interval_ms` —
//! an HTTP GET of the route's path answered 2xx/3xx, or a TCP connect when the route has no HTTP
//! check — each within `timeout_ms`, sending the route's PROXY header first like real traffic.
//! Tasks follow the table: new backends get one, removed ones lose theirs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use outpost_proto::route::RouteSpec;
use tokio::task::JoinHandle;

use crate::backend::dial;
use crate::health::HealthKey;
use crate::state::Shared;
use crate::table::{BackendAddress, CompiledRoute};

#[derive(Default)]
pub struct Checkers {
    running: HashMap<HealthKey, (RouteSpec, JoinHandle<()>)>,
}

impl Checkers {
    /// Starts checks for new backends (or backends whose route's check changed) and stops the
    /// checks of backends that left the table; forgets their health.
    pub fn reconcile(&mut self, shared: &Arc<Shared>) {
        let table = shared.table.load();
        let mut wanted: HashMap<HealthKey, (RouteSpec, BackendAddress)> = HashMap::new();
        for (spec, backend) in table.all_backends() {
            wanted.insert(
                (backend.route.clone(), backend.address),
                (spec.clone(), backend.clone()),
            );
        }
        self.running.retain(|key, (spec, task)| {
            let keep = wanted.get(key).is_some_and(|(wanted_spec, _)| {
                wanted_spec.health == spec.health
                    && wanted_spec.proxy_protocol == spec.proxy_protocol
                    && wanted_spec.hosts == spec.hosts
            });
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (spec, backend)) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(check_forever(Arc::clone(shared), spec.clone(), backend));
            self.running.insert(key, (spec, task));
        }
        let running: Vec<HealthKey> = self.running.keys().cloned().collect();
        shared.health.retain(|key| running.contains(key));
    }
}

async fn check_forever(shared: Arc<Shared>, spec: RouteSpec, backend: BackendAddress) {
    let key = (backend.route.clone(), backend.address);
    let interval = Duration::from_millis(u64::from(spec.health.interval_ms));
    let route = CompiledRoute::single(spec.clone(), backend.clone());
    loop {
        let passed = check_once(&route, &backend).await;
        let (state, changed) = shared.health.record(&key, &spec.health, passed.is_ok());
        if changed {
            match &passed {
                Ok(()) => tracing::info!(
                    component = "health",
                    action = "backend_up",
                    node_id = %backend.node_id,
                    allocation_id = %backend.allocation_id,
                    "backend {} of route {} is healthy",
                    backend.address,
                    spec.name
                ),
                Err(reason) => tracing::warn!(
                    component = "health",
                    action = "backend_down",
                    node_id = %backend.node_id,
                    allocation_id = %backend.allocation_id,
                    "backend {} of route {} is down after {} failed checks: {reason}",
                    backend.address,
                    spec.name,
                    state.consecutive_failures
                ),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One check of one backend.
pub async fn check_once(route: &CompiledRoute, backend: &BackendAddress) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(route.spec.health.timeout_ms));
    let check = async {
        let own: SocketAddr = SocketAddr::new(
            if backend.address.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            0,
        );
        let stream = dial(route, backend, own, own).await?;
        let Some(http) = &route.spec.health.http else {
            return Ok(());
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let host = route
            .spec
            .hosts
            .first()
            .cloned()
            .unwrap_or_else(|| backend.address.to_string());
        let request = Request::get(http.path.as_str())
            .header(hyper::header::HOST, host)
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
