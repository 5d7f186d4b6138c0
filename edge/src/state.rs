//! What the serving tasks share: the current route table (swapped whole with `arc-swap`), the
//! health board, and the listener settings. Each connection loads the table once per request or
//! connection, so a swap never disturbs a connection in flight.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::health::HealthBoard;
use crate::table::RouteTable;
use crate::workers::Workers;

/// Whether listeners expect a PROXY header from an upstream load balancer first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProxy {
    Expect,
    None,
}

pub struct Shared {
    pub table: ArcSwap<RouteTable>,
    pub health: HealthBoard,
    pub upstream_proxy: UpstreamProxy,
    /// The IP the TCP route listeners bind (the HTTP listener's).
    pub tcp_listen_ip: std::net::IpAddr,
    /// The edge's own listener ports (a TCP route may not claim them).
    pub reserved_ports: Vec<u16>,
    /// The HTTPS listener's port (plain requests for terminating routes are redirected to it).
    pub https_port: u16,
    /// The threads that serve client connections.
    pub workers: Workers,
}

impl Shared {
    pub fn new(
        table: RouteTable,
        upstream_proxy: UpstreamProxy,
        tcp_listen_ip: std::net::IpAddr,
        reserved_ports: Vec<u16>,
        https_port: u16,
        workers: Workers,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: ArcSwap::from_pointee(table),
            health: HealthBoard::default(),
            upstream_proxy,
            tcp_listen_ip,
            reserved_ports,
            https_port,
            workers,
        })
    }
}

/// The addresses of one client connection: who the client is (from the PROXY header when
/// upstream sends one) and which edge address it reached.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAddresses {
    pub client: SocketAddr,
    pub edge: SocketAddr,
}
