//! The route table the edge serves: an [`EdgeTable`] checked as a whole and compiled into maps by
//! host and by listen port, swapped in atomically (`arc-swap`) so a request reads one table from
//! start to end. Pure: building and matching do no I/O.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_proto::ValidationError;
use outpost_proto::route::{EdgeTable, RouteKind, RouteSpec};

use crate::certs::{Certificates, EdgeKey};

/// One backend of a route as the edge dials it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddress {
    pub route: String,
    pub address: SocketAddr,
    /// The node and allocation of the instance (for logs and status).
    pub node_id: String,
    pub allocation_id: String,
    /// Control reported the instance ready.
    pub ready: bool,
}

/// A route with its backends, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    pub spec: RouteSpec,
    pub backends: Vec<BackendAddress>,
    /// Round-robin position.
    next: AtomicUsize,
}

impl CompiledRoute {
    /// The next backend in round-robin order for which `usable` holds.
    pub fn pick(&self, usable: impl Fn(&BackendAddress) -> bool) -> Option<&BackendAddress> {
        let count = self.backends.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| &self.backends[(start + offset) % count])
            .find(|backend| usable(backend))
    }
}

/// The compiled table.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub source: EdgeTable,
    by_host: HashMap<String, Arc<CompiledRoute>>,
    by_port: HashMap<u16, Arc<CompiledRoute>>,
    /// The opened certificates of the terminating routes (in memory only).
    pub certificates: Certificates,
}

impl RouteTable {
    /// Checks `source` as a whole and compiles it; a table that fails is refused with the field
    /// and value at fault. `reserved_ports` are the edge's own listener ports.
    pub fn build(source: EdgeTable, reserved_ports: &[u16]) -> Result<RouteTable, ValidationError> {
        Self::build_with(source, reserved_ports, &overlay_source)
    }

    /// [`RouteTable::build`] with the overlay probe given: `probe(ip)` is the source address
    /// this host would use toward `ip`, or `None` when it has no route there.
    pub fn build_with(
        source: EdgeTable,
        reserved_ports: &[u16],
        probe: &dyn Fn(IpAddr) -> Option<IpAddr>,
    ) -> Result<RouteTable, ValidationError> {
        source.check(reserved_ports)?;
        let mut reach: HashMap<String, Option<IpAddr>> = HashMap::new();
        let mut by_host = HashMap::new();
        let mut by_port = HashMap::new();
        for (name, spec) in &source.routes {
            let backends = source
                .backends
                .routes
                .get(name)
                .map(|list| {
                    list.iter()
                        .filter_map(|b| {
                            let overlay_ip = b.overlay_address.as_ref().and_then(|overlay| {
                                *reach
                                    .entry(overlay.clone())
                                    .or_insert_with(|| reachable_in_overlay(overlay, probe))
                            });
                            let ip = match overlay_ip {
                                Some(ip) => ip,
                                None => b.address.parse().ok()?,
                            };
                            Some(BackendAddress {
                                route: name.clone(),
                                address: SocketAddr::new(ip, b.port),
                                node_id: b.node_id.to_string(),
                                allocation_id: b.allocation_id.to_string(),
                                ready: b.ready,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let compiled = Arc::new(CompiledRoute {
                spec: spec.clone(),
                backends,
                next: AtomicUsize::new(0),
            });
            match spec.kind() {
                RouteKind::Host => {
                    for host in &spec.hosts {
                        by_host.insert(host.clone(), Arc::clone(&compiled));
                    }
                }
                RouteKind::Tcp { listen_port } => {
                    by_port.insert(listen_port, compiled);
                }
            }
        }
        Ok(RouteTable {
            source,
            by_host,
            by_port,
            certificates: Certificates::default(),
        })
    }

    /// Opens the certificates of the terminating routes with the edge's key, reusing what
    /// `previous` opened from the same sealed secrets.
    pub fn with_certificates(mut self, key: Option<&EdgeKey>, previous: &Certificates) -> Self {
        self.certificates =
            Certificates::open(self.source.routes.values(), &self.source.tls, key, previous);
        for problem in &self.certificates.problems {
            if previous.problems.contains(problem) {
                continue;
            }
            tracing::warn!(
                component = "tls",
                action = "open_certificate",
                "{problem}; TLS connections for the route are closed"
            );
        }
        self
    }

    /// The route of an HTTP Host header or TLS SNI name (port and case ignored).
    pub fn for_host(&self, host: &str) -> Option<&Arc<CompiledRoute>> {
        // Most clients send the name as it is kept: look it up without making a copy.
        let kept_as_is = !host.is_empty()
            && !host.ends_with('.')
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if kept_as_is {
            return self.by_host.get(host);
        }
        self.by_host.get(&normalize_host(host))
    }

    pub fn for_port(&self, port: u16) -> Option<&Arc<CompiledRoute>> {
        self.by_port.get(&port)
    }

    /// The listen ports of the TCP routes.
    pub fn tcp_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    /// Every backend of every route.
    pub fn all_backends(&self) -> Vec<(&RouteSpec, &BackendAddress)> {
        let mut all = Vec::new();
        for route in self.by_host.values().chain(self.by_port.values()) {
            for backend in &route.backends {
                all.push((&route.spec, backend));
            }
        }
        all.sort_by(|a, b| a.1.cmp(b.1));
        all.dedup_by(|a, b| a.1 == b.1);
        all
    }

    pub fn route_count(&self) -> usize {
        self.source.routes.len()
    }
}

/// The source address this host would use toward `ip` (a UDP `connect` picks the route and
/// sends nothing), or `None` when it has no route there.
pub fn overlay_source(ip: IpAddr) -> Option<IpAddr> {
    let unspecified: SocketAddr = if ip.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(SocketAddr::new(ip, 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The overlay IP of `overlay_address` (`IP/PREFIX`) when this edge is in that overlay: the
/// route toward it leaves from an address inside the prefix (the WireGuard interface an agent
/// on this host brought up). Otherwise the backend is dialled at its LAN address.
fn reachable_in_overlay(
    overlay_address: &str,
    probe: &dyn Fn(IpAddr) -> Option<IpAddr>,
) -> Option<IpAddr> {
    let (ip, prefix) = outpost_proto::route::parse_prefixed_address(overlay_address)?;
    let source = probe(ip)?;
    outpost_proto::route::in_network(source, ip, prefix).then_some(ip)
}

/// A Host header or SNI name as a table key: lowercase, without a port or a trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::route::{Backend, BackendTable};

    fn route(name: &str, hosts: &[&str], listen_port: Option<u32>) -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "hosts": hosts, "listen_port": listen_port, "service": "web", "port": "http"
        }))
        .unwrap()
    }

    fn backend(port: u16) -> Backend {
        Backend {
            allocation_id: "web-1".try_into().unwrap(),
            node_id: "n1".try_into().unwrap(),
            address: "127.0.0.1".into(),
            port,
            ready: true,
            overlay_address: None,
        }
    }

    fn table() -> EdgeTable {
        let mut source = EdgeTable::default();
        source
            .routes
            .insert("shop".into(), route("shop", &["shop.example.com"], None));
        source
            .routes
            .insert("db".into(), route("db", &[], Some(9000)));
        source.backends =
            BackendTable::new([("shop".to_string(), vec![backend(8001), backend(8002)])].into());
        source
    }

    #[test]
    fn hosts_match_without_port_or_case_and_ports_match_tcp_routes() {
        let table = RouteTable::build(table(), &[80]).unwrap();
        assert_eq!(
            table
                .for_host("Shop.Example.com:8080")
                .unwrap()
                .spec
                .name
                .as_str(),
            "shop"
        );
        assert!(table.for_host("other.example.com").is_none());
        assert_eq!(table.for_port(9000).unwrap().spec.name.as_str(), "db");
        assert_eq!(table.tcp_ports(), vec![9000]);
    }

    #[test]
    fn an_invalid_table_is_refused_naming_the_field() {
        let mut source = table();
        source
            .routes
            .insert("copy".into(), route("copy", &["shop.example.com"], None));
        let error = RouteTable::build(source, &[]).unwrap_err();
        assert!(error.field.contains("hosts"), "{error}");
        assert!(
            RouteTable::build(table(), &[9000]).is_err(),
            "listener port"
        );
    }

    #[test]
    fn pick_goes_round_robin_over_usable_backends() {
        let table = RouteTable::build(table(), &[]).unwrap();
        let shop = table.for_host("shop.example.com").unwrap();
        let first = shop.pick(|_| true).unwrap().address.port();
        let second = shop.pick(|_| true).unwrap().address.port();
        assert_ne!(first, second);
        assert_eq!(
            shop.pick(|b| b.address.port() == 8002)
                .unwrap()
                .address
                .port(),
            8002
        );
        assert!(shop.pick(|_| false).is_none());
    }

    #[test]
    fn a_backend_is_dialled_in_the_overlay_only_when_this_edge_is_in_it() {
        let mut source = table();
        let mut in_overlay = backend(8001);
        in_overlay.address = "192.0.2.10".into();
        in_overlay.overlay_address = Some("10.232.0.3/16".into());
        let mut lan_only = backend(8002);
        lan_only.address = "192.0.2.11".into();
        source.backends =
            BackendTable::new([("shop".to_string(), vec![in_overlay, lan_only])].into());
        let dialled = |probe: &dyn Fn(IpAddr) -> Option<IpAddr>| -> Vec<String> {
            let table = RouteTable::build_with(source.clone(), &[], probe).unwrap();
            let mut addresses: Vec<String> = table
                .for_host("shop.example.com")
                .unwrap()
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect();
            addresses.sort();
            addresses
        };
        // This host has an address in 10.232.0.0/16 toward the node: the overlay address.
        assert_eq!(
            dialled(&|_| Some("10.232.0.9".parse().unwrap())),
            ["10.232.0.3:8001", "192.0.2.11:8002"]
        );
        // A route there, but from outside the overlay (the default route): the LAN address.
        assert_eq!(
            dialled(&|_| Some("192.0.2.50".parse().unwrap())),
            ["192.0.2.10:8001", "192.0.2.11:8002"]
        );
        // No route at all: the LAN address.
        assert_eq!(dialled(&|_| None), ["192.0.2.10:8001", "192.0.2.11:8002"]);
    }

    #[test]
    fn the_real_probe_sees_loopback_as_reachable_from_inside_and_a_stray_network_not() {
        // 127.0.0.0/8 stands for an overlay this host is in: the source toward 127.0.0.5 is a
        // loopback address, inside the prefix.
        assert_eq!(
            reachable_in_overlay("127.0.0.5/8", &overlay_source),
            Some("127.0.0.5".parse().unwrap())
        );
        // A /32 elsewhere: whatever route the host has (if any) leaves from outside it.
        assert_eq!(
            reachable_in_overlay("198.51.100.77/32", &overlay_source),
            None
        );
        assert_eq!(
            reachable_in_overlay("not-an-address", &overlay_source),
            None
        );
    }

    #[test]
    fn normalize_host_strips_port_and_trailing_dot() {
        assert_eq!(normalize_host("A.example.COM.:443"), "a.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]:80");
    }
}
