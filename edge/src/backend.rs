//! Dialing a route's backends: pick a usable one (control says ready, health checks pass),
//! connect with a deadline, send the route's PROXY header first, and count connect failures as
//! passive health failures. Shared by the HTTP, TLS-passthrough and TCP paths.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::route::{ProxyProtocol, RouteSpec};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::health::HealthBoard;
use crate::proxy_protocol::header_for_backend;
use crate::table::{BackendAddress, CompiledRoute};

/// Why no backend took the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend is out (or there are none); the route answers 503.
    AllDown { route: String, known: usize },
    /// Backends were tried and none accepted the connection.
    ConnectFailed { route: String, last_error: String },
}

impl NoBackend {
    /// The body a client sees.
    pub fn message(&self) -> String {
        match self {
            NoBackend::AllDown { route, known: 0 } => {
                format!("503 service unavailable: route {route} has no backends yet\n")
            }
            NoBackend::AllDown { route, known } => format!(
                "503 service unavailable: all {known} backends of route {route} are down (failing health checks)\n"
            ),
            NoBackend::ConnectFailed { route, last_error } => format!(
                "503 service unavailable: no backend of route {route} accepted the connection ({last_error})\n"
            ),
        }
    }
}

/// Whether the proxy may send a new connection to this backend of `route`.
pub fn usable(health: &HealthBoard, route: &RouteSpec, backend: &BackendAddress) -> bool {
    backend.ready && health.is_healthy(backend.address, route)
}

/// Connects to one backend and sends the route's PROXY header.
pub async fn dial(
    route: &CompiledRoute,
    backend: &BackendAddress,
    client: SocketAddr,
    edge: SocketAddr,
) -> Result<TcpStream, String> {
    dial_address(
        backend.address,
        route.spec.health.timeout_ms,
        route.spec.proxy_protocol,
        client,
        edge,
    )
    .await
}

/// Connects to `address` within `timeout_ms` (at least 100 ms) and sends the PROXY header
/// `proxy_protocol` asks for.
pub async fn dial_address(
    address: SocketAddr,
    timeout_ms: u32,
    proxy_protocol: ProxyProtocol,
    client: SocketAddr,
    edge: SocketAddr,
) -> Result<TcpStream, String> {
    let timeout = Duration::from_millis(u64::from(timeout_ms).max(100));
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect to {address} timed out"))?
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    if let Some(header) = header_for_backend(proxy_protocol, client, edge) {
        stream
            .write_all(&header)
            .await
            .map_err(|e| format!("PROXY header to {address}: {e}"))?;
    }
    Ok(stream)
}

/// Picks usable backends in round-robin order and connects to the first that accepts, trying
/// at most three; each refusal is a passive health failure.
pub async fn connect(
    route: &Arc<CompiledRoute>,
    health: &HealthBoard,
    client: SocketAddr,
    edge: SocketAddr,
) -> Result<(TcpStream, BackendAddress), NoBackend> {
    let name = route.spec.name.to_string();
    let mut last_error = None;
    let attempts = route.backends.len().clamp(1, 3);
    for _ in 0..attempts {
        let Some(backend) = route.pick(|b| usable(health, &route.spec, b)).cloned() else {
            break;
        };
        match dial(route, &backend, client, edge).await {
            Ok(stream) => return Ok((stream, backend)),
            Err(error) => {
                health.record_for_route(backend.address, &route.spec, false);
                last_error = Some(error);
            }
        }
    }
    Err(match last_error {
        Some(last_error) => NoBackend::ConnectFailed {
            route: name,
            last_error,
        },
        None => NoBackend::AllDown {
            route: name,
            known: route.backends.len(),
        },
    })
}
