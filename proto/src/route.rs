//! Routes and the edge feed (E1–E3): what an operator declares (`RouteSpec`), what control
//! serves the edge (route changes by cursor, the backends of every route, a snapshot), what the
//! edge reports back, and the pure fold of feed batches into the edge's route table.
//!
//! The edge feed travels as JSON only (the edge has no size budget that would call for postcard).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cursor::Cursor;
use crate::hash::sha256_hex;
use crate::limits::{EDGE_ROUTES_MAX, FEED_BATCH_EVENTS_MAX, ROUTE_BACKENDS_MAX, ROUTE_HOSTS_MAX};
use crate::name::{Name, check_name};
use crate::secret::{Redacted, SealedForNode, redacted_option};
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// How the edge treats TLS on a host route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain HTTP on the HTTP listener.
    #[default]
    None,
    /// The edge terminates TLS with the route's `tls_secret` and forwards plain HTTP.
    Terminate,
    /// The edge reads SNI from the ClientHello and forwards the TLS bytes untouched.
    Passthrough,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Terminate => "terminate",
            TlsMode::Passthrough => "passthrough",
        }
    }
}

/// The PROXY protocol header the edge sends to a route's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

impl ProxyProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::None => "none",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// An HTTP health check: `GET path` answers 2xx or 3xx.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHealthCheck {
    pub path: String,
}

/// Active health checks of a route's backends; without `http` a check is a TCP connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    #[serde(default)]
    pub http: Option<HttpHealthCheck>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive failures (active or passive) that take a backend out.
    #[serde(default = "default_threshold")]
    pub unhealthy_after: u32,
    /// Consecutive passed checks that put a backend (back) in.
    #[serde(default = "default_threshold")]
    pub healthy_after: u32,
}

fn default_interval_ms() -> u32 {
    1_000
}
fn default_timeout_ms() -> u32 {
    1_000
}
fn default_threshold() -> u32 {
    2
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            http: None,
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            unhealthy_after: default_threshold(),
            healthy_after: default_threshold(),
        }
    }
}

/// A route as submitted by an operator (`outpostctl routes apply -f route.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub name: Name,
    /// HTTP Host and TLS SNI names; empty for a TCP route.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The edge port of a TCP route; absent for a host route.
    #[serde(default)]
    pub listen_port: Option<u32>,
    /// The service whose instances serve the route.
    pub service: Name,
    /// The service's port name, e.g. `http`.
    pub port: Name,
    #[serde(default)]
    pub tls: TlsMode,
    /// A secret with keys `cert` and `key`, when terminating.
    #[serde(default)]
    pub tls_secret: Option<Name>,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    #[serde(default)]
    pub health: HealthSpec,
}

/// How a route is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Host,
    Tcp { listen_port: u16 },
}

impl RouteSpec {
    pub fn kind(&self) -> RouteKind {
        match self.listen_port {
            Some(port) => RouteKind::Tcp {
                listen_port: u16::try_from(port).unwrap_or(0),
            },
            None => RouteKind::Host,
        }
    }
}

/// Checks a DNS host name: lowercase labels of `[a-z0-9-]`, 1 to 63 bytes each, not starting or
/// ending with `-`, at most 253 bytes in all.
pub fn check_hostname(field: &str, host: &str) -> Result<(), ValidationError> {
    let bad = |reason: &str| Err(ValidationError::new(field, reason, host));
    if host.is_empty() || host.len() > 253 {
        return bad("must be 1 to 253 bytes");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("every dot-separated label must be 1 to 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("must be lowercase letters, digits, '-' and '.' only");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label must not start or end with '-'");
        }
    }
    Ok(())
}

/// Checks a port number given as a wider integer: 1 to 65535.
pub fn check_port(field: &str, port: u32) -> Result<u16, ValidationError> {
    match u16::try_from(port) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ValidationError::new(field, "must be 1 to 65535", port)),
    }
}

impl Validate for HealthSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(http) = &self.http {
            if !http.path.starts_with('/') {
                return Err(ValidationError::new(
                    "http.path",
                    "must start with '/'",
                    &http.path,
                ));
            }
            check_text("http.path", &http.path)?;
            if http
                .path
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_control())
            {
                return Err(ValidationError::new(
                    "http.path",
                    "must not contain spaces or control characters",
                    http.path.escape_debug(),
                ));
            }
        }
        for (field, value, min, max) in [
            ("interval_ms", self.interval_ms, 50, 3_600_000),
            ("timeout_ms", self.timeout_ms, 10, 60_000),
            ("unhealthy_after", self.unhealthy_after, 1, 100),
            ("healthy_after", self.healthy_after, 1, 100),
        ] {
            if !(min..=max).contains(&value) {
                return Err(ValidationError::new(
                    field,
                    format!("must be {min} to {max}"),
                    value,
                ));
            }
        }
        Ok(())
    }
}

impl Validate for RouteSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        check_name("service", &self.service)?;
        check_name("port", &self.port)?;
        check_count("hosts", self.hosts.len(), ROUTE_HOSTS_MAX)?;
        for (index, host) in self.hosts.iter().enumerate() {
            check_hostname(&format!("hosts[{index}]"), host)?;
        }
        let unique: BTreeSet<&String> = self.hosts.iter().collect();
        if unique.len() != self.hosts.len() {
            return Err(ValidationError::new(
                "hosts",
                "names a host twice",
                self.hosts.join(","),
            ));
        }
        match (self.hosts.is_empty(), self.listen_port) {
            (true, None) => {
                return Err(ValidationError::new(
                    "hosts",
                    "a route needs hosts (HTTP Host / TLS SNI) or a listen_port (TCP)",
                    "none",
                ));
            }
            (false, Some(port)) => {
                return Err(ValidationError::new(
                    "listen_port",
                    "a route has either hosts or a listen_port, not both",
                    port,
                ));
            }
            (true, Some(port)) => {
                check_port("listen_port", port)?;
                if self.tls != TlsMode::None {
                    return Err(ValidationError::new(
                        "tls",
                        "a TCP route forwards bytes as they come; tls must be none",
                        self.tls.as_str(),
                    ));
                }
            }
            (false, None) => {}
        }
        match (self.tls, &self.tls_secret) {
            (TlsMode::Terminate, None) => {
                return Err(ValidationError::new(
                    "tls_secret",
                    "tls: terminate needs a tls_secret with keys cert and key",
                    "none",
                ));
            }
            (TlsMode::Terminate, Some(secret)) => check_name("tls_secret", secret)?,
            (mode, Some(secret)) => {
                return Err(ValidationError::new(
                    "tls_secret",
                    format!(
                        "only tls: terminate uses a secret, this route has tls: {}",
                        mode.as_str()
                    ),
                    secret,
                ));
            }
            (_, None) => {}
        }
        self.health.validate().map_err(|e| e.within("health"))
    }
}

/// Checks a whole route table: at most [`EDGE_ROUTES_MAX`] routes, each valid, no two claiming a
/// name, a host or a listen port. `reserved_ports` are the edge's own listener ports.
pub fn check_route_table<'a>(
    routes: impl IntoIterator<Item = &'a RouteSpec>,
    reserved_ports: &[u16],
) -> Result<(), ValidationError> {
    let mut names = BTreeSet::new();
    let mut hosts: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ports: BTreeMap<u32, &str> = BTreeMap::new();
    let mut count = 0;
    for route in routes {
        count += 1;
        let field = format!("routes.{}", route.name);
        route.validate().map_err(|e| e.within(&field))?;
        if !names.insert(route.name.as_str()) {
            return Err(ValidationError::new(
                "routes",
                "names a route twice",
                &route.name,
            ));
        }
        for host in &route.hosts {
            if let Some(other) = hosts.insert(host, route.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.hosts"),
                    format!("is already claimed by route {other}"),
                    host,
                ));
            }
        }
        if let Some(port) = route.listen_port {
            if let Some(other) = ports.insert(port, route.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.listen_port"),
                    format!("is already claimed by route {other}"),
                    port,
                ));
            }
            if reserved_ports.iter().any(|p| u32::from(*p) == port) {
                return Err(ValidationError::new(
                    format!("{field}.listen_port"),
                    "is one of the edge's own HTTP/HTTPS listener ports",
                    port,
                ));
            }
        }
    }
    check_count("routes", count, EDGE_ROUTES_MAX)
}

/// One instance behind a route, as control sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub allocation_id: Name,
    pub node_id: Name,
    /// The node's advertised LAN address (IP).
    pub address: String,
    pub port: u16,
    /// The agent reported the instance running and ready.
    pub ready: bool,
    /// The node's overlay address with the overlay's prefix (`10.232.0.3/16`), when the node is
    /// in the overlay. An edge that is in the overlay itself (its host has a route to this
    /// address from a source inside the prefix) dials it; any other edge dials `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_address: Option<String>,
}

/// Parses `IP/PREFIX` (IPv4 or IPv6) into its address and prefix length.
pub fn parse_prefixed_address(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, prefix) = text.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

/// Whether `candidate` lies in the network `ip/prefix`.
pub fn in_network(candidate: std::net::IpAddr, ip: std::net::IpAddr, prefix: u8) -> bool {
    use std::net::IpAddr;
    match (candidate, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The backends of every route, with a digest the edge sends back so control answers only when
/// they changed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackendTable {
    pub digest: String,
    pub routes: BTreeMap<String, Vec<Backend>>,
}

impl BackendTable {
    /// Builds a table with its digest; backends are sorted so the digest is stable.
    pub fn new(mut routes: BTreeMap<String, Vec<Backend>>) -> Self {
        for backends in routes.values_mut() {
            backends.sort();
        }
        let digest = sha256_hex(&serde_json::to_vec(&routes).unwrap_or_default());
        Self { digest, routes }
    }
}

impl Validate for BackendTable {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("routes", self.routes.len(), EDGE_ROUTES_MAX)?;
        check_text("digest", &self.digest)?;
        for (route, backends) in &self.routes {
            let field = format!("routes.{route}");
            check_name(&field, route)?;
            check_count(&field, backends.len(), ROUTE_BACKENDS_MAX)?;
            for (index, backend) in backends.iter().enumerate() {
                let field = format!("{field}[{index}]");
                if backend.address.parse::<std::net::IpAddr>().is_err() {
                    return Err(ValidationError::new(
                        format!("{field}.address"),
                        "is not an IP address",
                        &backend.address,
                    ));
                }
                if backend.port == 0 {
                    return Err(ValidationError::new(
                        format!("{field}.port"),
                        "must be 1 to 65535",
                        0,
                    ));
                }
                if let Some(overlay) = &backend.overlay_address
                    && parse_prefixed_address(overlay).is_none()
                {
                    return Err(ValidationError::new(
                        format!("{field}.overlay_address"),
                        "is not IP/PREFIX",
                        overlay,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The keys a `tls_secret` must hold for the edge to terminate TLS with it.
pub const TLS_SECRET_KEYS: [&str; 2] = ["cert", "key"];

/// One `tls_secret` of a terminating route, sealed for the edge's X25519 key exactly as a
/// secret is sealed for a node (`seal_for_node` with the edge's id in place of the node's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeTlsSecret {
    pub name: Name,
    pub version: u32,
    pub sealed: SealedForNode,
}

/// The TLS secrets the edge's terminating routes reference, and only those, with a digest of
/// (edge key, names, versions) the edge sends back so control seals again only on a change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EdgeTlsTable {
    pub digest: String,
    pub secrets: Vec<EdgeTlsSecret>,
}

impl EdgeTlsTable {
    /// The digest of what a table holds for one edge key: it changes when a referenced secret
    /// gets a new version, a route starts or stops referencing one, or the edge's key changes.
    pub fn digest_of<'a>(
        edge_public_key: &str,
        versions: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> String {
        let mut text = format!("{edge_public_key}\n");
        for (name, version) in versions {
            text.push_str(&format!("{name}={version}\n"));
        }
        sha256_hex(text.as_bytes())
    }

    pub fn get(&self, name: &str) -> Option<&EdgeTlsSecret> {
        self.secrets.iter().find(|s| s.name.as_str() == name)
    }
}

impl Validate for EdgeTlsTable {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("secrets", self.secrets.len(), EDGE_ROUTES_MAX)?;
        check_text("digest", &self.digest)?;
        let mut names = BTreeSet::new();
        for (index, secret) in self.secrets.iter().enumerate() {
            let field = format!("secrets[{index}]");
            check_name(&format!("{field}.name"), &secret.name)?;
            if !names.insert(secret.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    "names a secret twice",
                    &secret.name,
                ));
            }
            if secret.version == 0 {
                return Err(ValidationError::new(
                    format!("{field}.version"),
                    "must be positive",
                    0,
                ));
            }
            secret
                .sealed
                .validate()
                .map_err(|e| e.within(&format!("{field}.sealed")))?;
        }
        Ok(())
    }
}

/// A change of the edge's route table. An upsert is the common change and is decoded once per
/// event; boxing it would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeChange {
    RouteUpserted(RouteSpec),
    RouteRemoved { name: Name },
}

/// One event of the edge feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeFeedEvent {
    pub event_id: u64,
    /// `route/NAME`.
    pub aggregate: String,
    pub seq: u64,
    pub change: EdgeChange,
}

/// One answer of `GET /v1/edges/{id}/changes`: route changes past the cursor, the backend table
/// when its digest differs from the one the edge sent, and a bookmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeBatch {
    pub events: Vec<EdgeFeedEvent>,
    #[serde(default)]
    pub backends: Option<BackendTable>,
    /// The TLS secrets of the edge's terminating routes, when their digest differs from the
    /// one the edge sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EdgeTlsTable>,
    pub bookmark: Cursor,
}

impl Validate for EdgeBatch {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("events", self.events.len(), FEED_BATCH_EVENTS_MAX)?;
        let mut previous = 0;
        for (index, event) in self.events.iter().enumerate() {
            let field = format!("events[{index}]");
            if event.event_id <= previous || event.event_id > self.bookmark.event_id {
                return Err(ValidationError::new(
                    format!("{field}.event_id"),
                    "event ids must increase within a batch and not pass its bookmark",
                    event.event_id,
                ));
            }
            previous = event.event_id;
            check_text(&format!("{field}.aggregate"), &event.aggregate)?;
            match &event.change {
                EdgeChange::RouteUpserted(route) => route
                    .validate()
                    .map_err(|e| e.within(&format!("{field}.route")))?,
                EdgeChange::RouteRemoved { name } => check_name(&format!("{field}.name"), name)?,
            }
        }
        if let Some(backends) = &self.backends {
            backends.validate().map_err(|e| e.within("backends"))?;
        }
        if let Some(tls) = &self.tls {
            tls.validate().map_err(|e| e.within("tls"))?;
        }
        Ok(())
    }
}

/// `GET /v1/edges/{id}/routes`: the whole table at `as_of` (after a 410, or on first start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeSnapshot {
    pub routes: Vec<RouteSpec>,
    /// Per-aggregate sequence of each route's latest event.
    #[serde(default)]
    pub route_seqs: BTreeMap<String, u64>,
    pub backends: BackendTable,
    #[serde(default)]
    pub tls: EdgeTlsTable,
    pub as_of: Cursor,
}

impl Validate for EdgeSnapshot {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("routes", self.routes.len(), EDGE_ROUTES_MAX)?;
        for route in &self.routes {
            route
                .validate()
                .map_err(|e| e.within(&format!("routes.{}", route.name)))?;
        }
        self.backends.validate().map_err(|e| e.within("backends"))?;
        self.tls.validate().map_err(|e| e.within("tls"))
    }
}

/// The edge's route table: what it serves, and what it keeps in its cache.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EdgeTable {
    pub routes: BTreeMap<String, RouteSpec>,
    pub route_seqs: BTreeMap<String, u64>,
    pub backends: BackendTable,
    /// Sealed for the edge's key; opened in memory only.
    #[serde(default)]
    pub tls: EdgeTlsTable,
    pub as_of: Cursor,
}

impl EdgeTable {
    pub fn from_snapshot(snapshot: EdgeSnapshot) -> Self {
        Self {
            routes: snapshot
                .routes
                .into_iter()
                .map(|route| (route.name.to_string(), route))
                .collect(),
            route_seqs: snapshot.route_seqs,
            backends: snapshot.backends,
            tls: snapshot.tls,
            as_of: snapshot.as_of,
        }
    }

    /// Folds a batch into a copy of the table. Idempotent: events at or below the cursor, and
    /// older per-route sequences, change nothing. The caller validates the result as a whole
    /// before serving it.
    pub fn folded(&self, batch: &EdgeBatch) -> EdgeTable {
        let mut next = self.clone();
        for event in &batch.events {
            if event.event_id <= self.as_of.event_id
                && batch.bookmark.log_epoch == self.as_of.log_epoch
            {
                continue;
            }
            let (name, upsert) = match &event.change {
                EdgeChange::RouteUpserted(route) => (route.name.to_string(), Some(route)),
                EdgeChange::RouteRemoved { name } => (name.to_string(), None),
            };
            if next
                .route_seqs
                .get(&name)
                .is_some_and(|seq| *seq >= event.seq)
            {
                continue;
            }
            next.route_seqs.insert(name.clone(), event.seq);
            match upsert {
                Some(route) => {
                    next.routes.insert(name, route.clone());
                }
                None => {
                    next.routes.remove(&name);
                }
            }
        }
        if let Some(backends) = &batch.backends {
            next.backends = backends.clone();
        }
        if let Some(tls) = &batch.tls {
            next.tls = tls.clone();
        }
        if batch.bookmark.log_epoch != next.as_of.log_epoch
            || batch.bookmark.event_id > next.as_of.event_id
        {
            next.as_of = batch.bookmark;
        }
        next
    }

    /// Checks the table as a whole before it is served.
    pub fn check(&self, reserved_ports: &[u16]) -> Result<(), ValidationError> {
        check_route_table(self.routes.values(), reserved_ports)?;
        self.backends.validate().map_err(|e| e.within("backends"))?;
        self.tls.validate().map_err(|e| e.within("tls"))
    }
}

/// `POST /v1/edges/register`: a new edge proves itself with an enrollment token, a known one
/// with its credential. Both are secrets: `Debug` prints them as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRegisterRequest {
    pub edge_id: Name,
    #[serde(default)]
    pub enrollment_token: Option<String>,
    #[serde(default)]
    pub edge_credential: Option<String>,
    /// The public half of the edge's X25519 sealing key (64 hex): control seals the TLS
    /// secrets of terminating routes for it.
    #[serde(default)]
    pub sealing_public_key: Option<String>,
}

impl std::fmt::Debug for EdgeRegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeRegisterRequest")
            .field("edge_id", &self.edge_id)
            .field("enrollment_token", &redacted_option(&self.enrollment_token))
            .field("edge_credential", &redacted_option(&self.edge_credential))
            .field("sealing_public_key", &self.sealing_public_key)
            .finish()
    }
}

impl Validate for EdgeRegisterRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("edge_id", &self.edge_id)?;
        if self.enrollment_token.is_none() && self.edge_credential.is_none() {
            return Err(ValidationError::new(
                "enrollment_token",
                "an enrollment token or an edge credential is required",
                "none",
            ));
        }
        if let Some(token) = &self.enrollment_token {
            check_text("enrollment_token", token)?;
        }
        if let Some(credential) = &self.edge_credential {
            check_text("edge_credential", credential)?;
        }
        if let Some(key) = &self.sealing_public_key
            && crate::secret::key_from_hex("sealing_public_key", key).is_err()
        {
            return Err(ValidationError::new(
                "sealing_public_key",
                "must be 64 hex characters (an X25519 public key)",
                crate::validate::shorten(key),
            ));
        }
        Ok(())
    }
}

/// Control's answer to a registration. `Debug` prints the credential as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRegisterResponse {
    pub edge_id: Name,
    /// Bearer credential `ope.EDGE_ID.SECRET` for every later call of this edge. Shown once.
    pub edge_credential: String,
    pub org: String,
}

impl std::fmt::Debug for EdgeRegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeRegisterResponse")
            .field("edge_id", &self.edge_id)
            .field("edge_credential", &Redacted)
            .field("org", &self.org)
            .finish()
    }
}

impl Validate for EdgeRegisterResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("edge_id", &self.edge_id)?;
        check_text("edge_credential", &self.edge_credential)?;
        check_text("org", &self.org)
    }
}

/// How one backend is doing, as the edge sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub route: Name,
    pub address: String,
    pub port: u16,
    pub healthy: bool,
}

/// `POST /v1/edges/{id}/report`: what the edge applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EdgeReport {
    #[serde(default)]
    pub cursor: Option<Cursor>,
    pub route_count: u32,
    #[serde(default)]
    pub backends: Vec<BackendHealth>,
    /// Why the last table from control was refused (the old one keeps serving), if it was.
    #[serde(default)]
    pub refused: Option<String>,
}

impl Validate for EdgeReport {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("backends", self.backends.len(), EDGE_ROUTES_MAX * 4)?;
        for (index, backend) in self.backends.iter().enumerate() {
            check_name(&format!("backends[{index}].route"), &backend.route)?;
            check_text(&format!("backends[{index}].address"), &backend.address)?;
        }
        if let Some(refused) = &self.refused {
            check_text("refused", refused)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn route(name: &str, host: &str) -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "hosts": [host], "service": "web", "port": "http"
        }))
        .unwrap()
    }

    #[test]
    fn the_issue_example_parses_and_validates() {
        let route: RouteSpec = serde_norway_free_yaml();
        assert_eq!(route.tls, TlsMode::Terminate);
        assert_eq!(route.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(route.health.http.as_ref().unwrap().path, "/healthz");
        route.validate().unwrap();
    }

    fn serde_norway_free_yaml() -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "name": "shop", "hosts": ["shop.example.com"], "service": "web", "port": "http",
            "tls": "terminate", "tls_secret": "shop-tls", "proxy_protocol": "v2",
            "health": {"http": {"path": "/healthz"}, "interval_ms": 1000, "unhealthy_after": 2, "healthy_after": 2}
        }))
        .unwrap()
    }

    #[test]
    fn bad_routes_name_the_field_and_value() {
        let mut bad = route("shop", "Shop.example.com");
        assert_eq!(bad.validate().unwrap_err().field, "hosts[0]");
        bad.hosts = vec!["a..b".into()];
        assert_eq!(bad.validate().unwrap_err().value, "a..b");
        let mut tcp = route("db", "x.example");
        tcp.hosts.clear();
        tcp.listen_port = Some(70_000);
        let error = tcp.validate().unwrap_err();
        assert_eq!(
            (error.field.as_str(), error.value.as_str()),
            ("listen_port", "70000")
        );
        let mut terminate = route("shop", "shop.example");
        terminate.tls = TlsMode::Terminate;
        assert_eq!(terminate.validate().unwrap_err().field, "tls_secret");
        let mut neither = route("x", "x.example");
        neither.hosts.clear();
        assert_eq!(neither.validate().unwrap_err().field, "hosts");
    }

    #[test]
    fn edge_registration_messages_print_no_token_or_credential() {
        let request = EdgeRegisterRequest {
            edge_id: Name::try_from("edge-1").unwrap(),
            enrollment_token: Some("opt1.TOKEN-SECRET".into()),
            edge_credential: Some("ope.edge-1.CRED-SECRET".into()),
            sealing_public_key: None,
        };
        let response = EdgeRegisterResponse {
            edge_id: Name::try_from("edge-1").unwrap(),
            edge_credential: "ope.edge-1.CRED-SECRET".into(),
            org: "default".into(),
        };
        for printed in [format!("{request:?}"), format!("{response:#?}")] {
            assert!(!printed.contains("SECRET"), "{printed}");
            assert!(printed.contains("edge-1") && printed.contains("<redacted>"));
        }
    }

    #[test]
    fn two_routes_claiming_one_host_or_port_are_refused() {
        let a = route("a", "one.example");
        let b = route("b", "one.example");
        let error = check_route_table([&a, &b], &[]).unwrap_err();
        assert!(error.reason.contains("route a"), "{error}");
        let mut c = route("c", "c.example");
        c.hosts.clear();
        c.listen_port = Some(9000);
        let mut d = c.clone();
        d.name = Name::try_from("d").unwrap();
        assert!(check_route_table([&c, &d], &[]).is_err());
        assert!(check_route_table([&c], &[9000]).is_err());
        assert!(check_route_table([&a, &c], &[80]).is_ok());
    }

    fn upsert(event_id: u64, seq: u64, route: RouteSpec) -> EdgeFeedEvent {
        EdgeFeedEvent {
            event_id,
            aggregate: format!("route/{}", route.name),
            seq,
            change: EdgeChange::RouteUpserted(route),
        }
    }

    #[test]
    fn the_fold_is_idempotent_and_keeps_newer_sequences() {
        let table = EdgeTable::default();
        let batch = EdgeBatch {
            events: vec![
                upsert(1, 1, route("a", "a.example")),
                upsert(2, 2, route("a", "a2.example")),
                EdgeFeedEvent {
                    event_id: 3,
                    aggregate: "route/b".into(),
                    seq: 1,
                    change: EdgeChange::RouteRemoved {
                        name: Name::try_from("b").unwrap(),
                    },
                },
            ],
            backends: None,
            tls: None,
            bookmark: Cursor::new(0, 5),
        };
        let once = table.folded(&batch);
        assert_eq!(once.routes["a"].hosts, vec!["a2.example".to_string()]);
        assert_eq!(once.as_of.event_id, 5);
        assert_eq!(once.folded(&batch), once, "redelivery changes nothing");
        let stale = EdgeBatch {
            events: vec![upsert(6, 1, route("a", "old.example"))],
            backends: None,
            tls: None,
            bookmark: Cursor::new(0, 6),
        };
        assert_eq!(once.folded(&stale).routes["a"].hosts[0], "a2.example");
    }

    #[test]
    fn prefixed_addresses_parse_and_networks_match() {
        let (ip, prefix) = parse_prefixed_address("10.232.0.3/16").unwrap();
        assert_eq!(prefix, 16);
        assert!(in_network("10.232.9.9".parse().unwrap(), ip, prefix));
        assert!(!in_network("10.233.0.1".parse().unwrap(), ip, prefix));
        assert!(!in_network("::1".parse().unwrap(), ip, prefix));
        assert!(in_network("8.8.8.8".parse().unwrap(), ip, 0));
        let (v6, p6) = parse_prefixed_address("fd00::1/64").unwrap();
        assert!(in_network("fd00::99".parse().unwrap(), v6, p6));
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "10.0.0.1/-1"] {
            assert!(parse_prefixed_address(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn backend_digest_is_stable_under_order() {
        let backend = |port| Backend {
            allocation_id: Name::try_from("web-1").unwrap(),
            node_id: Name::try_from("n1").unwrap(),
            address: "127.0.0.1".into(),
            port,
            ready: true,
            overlay_address: None,
        };
        let one = BackendTable::new([("a".to_string(), vec![backend(1), backend(2)])].into());
        let two = BackendTable::new([("a".to_string(), vec![backend(2), backend(1)])].into());
        assert_eq!(one.digest, two.digest);
        one.validate().unwrap();
    }
}
