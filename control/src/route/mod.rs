//! Routes and edges on control's side (E1–E3): the route and edge views folded from the log,
//! the backends of every route (allocations × reported ports × node addresses), edge
//! credentials, and the commands and API behind `outpostctl routes` and the edge feed.
//!
//! Routes are org-scoped like services: a route name is unique within its org, and another
//! org's route answers 404 like an unknown name. The edge feed of an org is the log filtered by the routing
//! key `edge:ORG`; backends are state (reported readiness), served beside the cursor with a
//! digest so an edge gets them only when they changed.

pub mod api;
pub mod execute;
pub mod tls;

use std::collections::BTreeMap;

use outpost_proto::Name;
use outpost_proto::node::AllocationState;
use outpost_proto::route::{Backend, BackendTable, EdgeReport, RouteSpec};
use serde::{Deserialize, Serialize};

use crate::api::views::{AllocationStatusRecord, HeartbeatRecord};
use crate::log::Event;
use crate::projection::{NodeState, Views, org_scoped_key};
use crate::store::StoredEvent;

/// Prefix of an edge credential: `ope.EDGE_ID.SECRET`.
pub const EDGE_CREDENTIAL_PREFIX: &str = "ope";

/// Routing key of everything an org's edges must see.
pub fn edge_routing_key(org: &str) -> String {
    format!("edge:{org}")
}

/// Config key of an edge's stored credential.
pub fn edge_credential_key(edge_id: &str) -> String {
    format!("edge-credential/{edge_id}")
}

/// Volatile key of an edge's latest report.
pub fn edge_report_key(edge_id: &str) -> String {
    format!("edge-report/{edge_id}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub org: String,
    pub spec: RouteSpec,
    /// Per-aggregate sequence of the route's latest event.
    pub seq: u64,
    pub event_id: u64,
    pub updated_at_unix_ms: u64,
    /// Who defined the current version (`opa.TOKEN_ID`).
    #[serde(default)]
    pub updated_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRecord {
    pub edge_id: String,
    pub org: String,
    pub registered_at_unix_ms: u64,
    /// The edge's X25519 sealing key (hex), from its latest registration that sent one.
    #[serde(default)]
    pub sealing_public_key: Option<String>,
}

/// The route and edge views (a part of [`Views`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteViews {
    /// By `crate::projection::org_scoped_key`: a route name is unique within its org (P4).
    pub routes: BTreeMap<String, RouteRecord>,
    /// Sequences of deleted routes (by org-scoped key), so a snapshot tells the edge how far
    /// each route went.
    pub deleted_seqs: BTreeMap<String, u64>,
    pub edges: BTreeMap<String, EdgeRecord>,
}

impl RouteViews {
    /// Folds one route or edge event.
    pub fn apply(&mut self, event: &Event, stored: &StoredEvent) {
        match event {
            Event::RouteDefined { org, spec, actor } => {
                let key = org_scoped_key(org, &spec.name);
                self.deleted_seqs.remove(&key);
                self.routes.insert(
                    key,
                    RouteRecord {
                        org: org.clone(),
                        spec: spec.clone(),
                        seq: stored.seq,
                        event_id: stored.event_id,
                        updated_at_unix_ms: stored.at_unix_ms,
                        updated_by: actor.clone(),
                    },
                );
            }
            Event::RouteDeleted { org, name, .. } => {
                let key = org_scoped_key(org, name);
                self.routes.remove(&key);
                self.deleted_seqs.insert(key, stored.seq);
            }
            Event::EdgeRegistered {
                edge_id,
                org,
                sealing_public_key,
                ..
            } => {
                let earlier = self.edges.get(edge_id);
                let registered_at_unix_ms =
                    earlier.map_or(stored.at_unix_ms, |e| e.registered_at_unix_ms);
                let sealing_public_key = sealing_public_key
                    .clone()
                    .or_else(|| earlier.and_then(|e| e.sealing_public_key.clone()));
                self.edges.insert(
                    edge_id.clone(),
                    EdgeRecord {
                        edge_id: edge_id.clone(),
                        org: org.clone(),
                        registered_at_unix_ms,
                        sealing_public_key,
                    },
                );
            }
            _ => {}
        }
    }

    /// Routes of one org, by name.
    pub fn of_org<'a>(&'a self, org: &'a str) -> impl Iterator<Item = &'a RouteRecord> + 'a {
        self.routes.values().filter(move |r| r.org == org)
    }

    /// The route `name` of `org`; another org's route of that name is not there.
    pub fn get(&self, org: &str, name: &str) -> Option<&RouteRecord> {
        self.routes.get(&org_scoped_key(org, name))
    }

    /// Sequences of `org`'s deleted routes, by name.
    pub fn deleted_of_org<'a>(&'a self, org: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        let prefix = org_scoped_key(org, "");
        self.deleted_seqs
            .iter()
            .filter_map(move |(key, seq)| Some((key.strip_prefix(prefix.as_str())?, *seq)))
    }
}

/// What the backends are computed from besides the views: the latest reported allocation
/// statuses and heartbeats (volatile state).
#[derive(Debug, Clone, Default)]
pub struct ReportedState {
    pub allocations: BTreeMap<String, AllocationStatusRecord>,
    pub heartbeats: BTreeMap<String, HeartbeatRecord>,
}

/// The backends of every route of `org`. Pure. An instance is a backend once its node reported
/// a LAN address and the instance a port of the route's name (or the service fixes the port);
/// it is `ready` when it runs and passed readiness on a node that is not down or revoked.
/// Each backend carries the node's LAN address and, when the node is in the overlay, its
/// overlay address; the edge picks (overlay when it is in the overlay itself).
pub fn backends_of(views: &Views, org: &str, reported: &ReportedState) -> BackendTable {
    let mut routes = BTreeMap::new();
    for route in views.routes.of_org(org) {
        let mut backends = Vec::new();
        let fixed_port = views
            .service(org, &route.spec.service)
            .and_then(|s| s.spec.ports.iter().find(|p| p.name == route.spec.port))
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|p| *p != 0);
        for allocation in views
            .allocations
            .values()
            .filter(|a| a.org == org && a.service == route.spec.service.as_str())
        {
            let status = reported.allocations.get(&allocation.allocation_id);
            let port = fixed_port.or_else(|| {
                status.and_then(|s| {
                    s.ports
                        .iter()
                        .find(|p| p.name == route.spec.port)
                        .map(|p| p.port)
                })
            });
            let address = reported
                .heartbeats
                .get(&allocation.node_id)
                .and_then(|h| h.lan_address.clone());
            let (Some(port), Some(address)) = (port, address) else {
                continue;
            };
            let node_up = views
                .nodes
                .get(&allocation.node_id)
                .is_some_and(|n| n.state == NodeState::Ready);
            let running = status.is_some_and(|s| {
                s.state == AllocationState::Running && s.node_id == allocation.node_id
            });
            let (Ok(allocation_id), Ok(node_id)) = (
                Name::try_from(allocation.allocation_id.as_str()),
                Name::try_from(allocation.node_id.as_str()),
            ) else {
                continue;
            };
            let overlay_address = views
                .overlay
                .get(&allocation.node_id)
                .filter(|member| member.org == org)
                .map(|member| member.address.clone());
            backends.push(Backend {
                allocation_id,
                node_id,
                address,
                port,
                ready: node_up && running,
                overlay_address,
            });
        }
        routes.insert(route.spec.name.to_string(), backends);
    }
    BackendTable::new(routes)
}

/// An edge's latest report as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeReportRecord {
    pub edge_id: String,
    pub at_unix_ms: u64,
    pub report: EdgeReport,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OverlayMember;
    use outpost_proto::node::{BoundPort, NodeFacts};

    fn views(events: Vec<Event>) -> Views {
        let mut views = Views::default();
        for (index, event) in events.into_iter().enumerate() {
            let new = event.to_new_event();
            let id = index as u64 + 1;
            let stored = StoredEvent {
                event_id: id,
                aggregate: new.aggregate,
                seq: id,
                kind: new.kind,
                schema_version: new.schema_version,
                at_unix_ms: 0,
                routing_keys: new.routing_keys,
                data: new.data,
            };
            views.apply(&stored).unwrap();
        }
        views
    }

    fn node(node_id: &str) -> Event {
        let facts: NodeFacts = serde_json::from_value(serde_json::json!({
            "node_id": node_id, "hostname": node_id, "arch": "x86_64",
            "capacity": {"memory_bytes": 1 << 30, "cpu_millis": 1000}
        }))
        .unwrap();
        Event::NodeRegistered {
            node_id: node_id.into(),
            org: "acme".into(),
            facts,
            with: crate::log::RegisteredWith::EnrollmentToken,
        }
    }

    fn placed(allocation_id: &str, node_id: &str) -> Event {
        Event::AllocationPlaced {
            allocation_id: allocation_id.into(),
            org: "acme".into(),
            service: "web".into(),
            node_id: node_id.into(),
            replica: 0,
            spec: serde_json::from_value(serde_json::json!({
                "name": "web", "command": "/bin/true", "ports": [{"name": "http", "port": 0}]
            }))
            .unwrap(),
        }
    }

    #[test]
    fn backends_carry_the_lan_address_and_the_overlay_address_of_nodes_in_the_overlay() {
        let service = serde_json::from_value(serde_json::json!({
            "name": "web", "command": "/bin/true", "ports": [{"name": "http", "port": 0}]
        }))
        .unwrap();
        let route: RouteSpec = serde_json::from_value(serde_json::json!({
            "name": "shop", "hosts": ["shop.test"], "service": "web", "port": "http"
        }))
        .unwrap();
        let member = OverlayMember {
            node_id: "n1".into(),
            org: "acme".into(),
            address: "10.232.0.3/16".into(),
            public_key: "k".into(),
            endpoints: vec![],
            listen_port: 51820,
            interface_name: "outpost0".into(),
            keepalive_secs: 25,
        };
        let views = views(vec![
            node("n1"),
            node("n2"),
            Event::ServiceDefined {
                org: "acme".into(),
                spec: service,
            },
            placed("web-1", "n1"),
            placed("web-2", "n2"),
            Event::OverlayJoined {
                member,
                peers: vec![],
                notify: vec![],
            },
            Event::RouteDefined {
                org: "acme".into(),
                spec: route,
                actor: "opa.t".into(),
            },
        ]);
        let mut reported = ReportedState::default();
        for (allocation, node, lan, port) in [
            ("web-1", "n1", "192.0.2.1", 8001),
            ("web-2", "n2", "192.0.2.2", 8002),
        ] {
            reported.allocations.insert(
                allocation.into(),
                AllocationStatusRecord {
                    node_id: node.into(),
                    state: AllocationState::Running,
                    restarts: 0,
                    message: String::new(),
                    at_unix_ms: 0,
                    ports: vec![BoundPort {
                        name: "http".try_into().unwrap(),
                        port,
                    }],
                    plan_cursor: None,
                },
            );
            reported.heartbeats.insert(
                node.into(),
                HeartbeatRecord {
                    at_unix_ms: 0,
                    plan_generation: None,
                    cursor: None,
                    lan_address: Some(lan.into()),
                    agent: None,
                },
            );
        }
        let table = backends_of(&views, "acme", &reported);
        let backends = &table.routes["shop"];
        let summary: Vec<(&str, &str, u16, Option<&str>)> = backends
            .iter()
            .map(|b| {
                (
                    b.allocation_id.as_str(),
                    b.address.as_str(),
                    b.port,
                    b.overlay_address.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("web-1", "192.0.2.1", 8001, Some("10.232.0.3/16")),
                ("web-2", "192.0.2.2", 8002, None),
            ]
        );
        assert!(
            backends_of(&views, "other", &reported).routes.is_empty(),
            "another org sees none of them"
        );
    }
}
