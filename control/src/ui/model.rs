//! What the dashboard pages show, gathered from the views and the status board of one org:
//! plain data the templates render. Pure over its inputs (views, a status lookup, the time), so
//! paging, filtering and org scoping are unit-tested without a server.

use std::collections::{BTreeMap, HashMap};

use outpost_proto::node::AllocationState;

use crate::api::views::{AllocationStatusRecord, HeartbeatRecord};
use crate::feed::NodeSettings;
use crate::projection::{AllocationRecord, NodeBootstrap, NodeRecord, NodeState, Views};

/// Nodes per page of the node list.
pub const NODES_PER_PAGE: usize = 50;
/// Longest raw query string a page accepts.
pub const QUERY_MAX_BYTES: usize = 512;
/// Longest node search text.
pub const SEARCH_MAX_CHARS: usize = 63;
/// Components a node reports through bootstrap events, shown even before the first report.
pub const BOOTSTRAP_COMPONENTS: [&str; 4] = ["storage", "broker", "index", "overlay"];

/// The component of a node's allocations (its own reconcile result and the reported states).
pub const ALLOCATIONS_COMPONENT: &str = "allocations";

/// Reads the status board's latest record under a key (`heartbeat/ID`, `allocation-status/ID`).
pub type StatusLookup<'a> = &'a dyn Fn(&str) -> Option<Vec<u8>>;

/// The node list's filter and page, from the query string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFilter {
    pub state: Option<NodeState>,
    /// Substring of the node id or hostname.
    pub search: String,
    /// 1-based.
    pub page: usize,
}

/// A refused query string: the parameter and the value seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query parameter {parameter}: {reason} (got {value:?})")]
pub struct QueryError {
    pub parameter: String,
    pub reason: String,
    pub value: String,
}

fn shortened(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Parses the raw query of a page. `allowed` names the parameters the page knows; any other,
/// a repeated one, an over-long query or a bad value is refused.
pub fn parse_query(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, QueryError> {
    let raw = raw.unwrap_or("");
    if raw.len() > QUERY_MAX_BYTES {
        return Err(QueryError {
            parameter: "(query string)".into(),
            reason: format!("is {} bytes, at most {QUERY_MAX_BYTES}", raw.len()),
            value: shortened(raw),
        });
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw).map_err(|error| QueryError {
            parameter: "(query string)".into(),
            reason: error.to_string(),
            value: shortened(raw),
        })?;
    let mut parsed = BTreeMap::new();
    for (key, value) in pairs {
        if !allowed.contains(&key.as_str()) {
            return Err(QueryError {
                parameter: shortened(&key),
                reason: format!("is not known here (known: {})", allowed.join(", ")),
                value: shortened(&value),
            });
        }
        if parsed.insert(key.clone(), value.clone()).is_some() {
            return Err(QueryError {
                parameter: key,
                reason: "is given twice".into(),
                value: shortened(&value),
            });
        }
    }
    Ok(parsed)
}

/// The node list's filter from parsed parameters `state`, `q` and `page`.
pub fn node_filter(parameters: &BTreeMap<String, String>) -> Result<NodeFilter, QueryError> {
    let invalid = |parameter: &str, reason: &str, value: &str| QueryError {
        parameter: parameter.into(),
        reason: reason.into(),
        value: shortened(value),
    };
    let state = match parameters.get("state").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("ready") => Some(NodeState::Ready),
        Some("down") => Some(NodeState::Down),
        Some("revoked") => Some(NodeState::Revoked),
        Some(other) => {
            return Err(invalid(
                "state",
                "must be all, ready, down or revoked",
                other,
            ));
        }
    };
    let search = parameters.get("q").cloned().unwrap_or_default();
    if search.chars().count() > SEARCH_MAX_CHARS {
        return Err(invalid(
            "q",
            &format!("is longer than {SEARCH_MAX_CHARS} characters"),
            &search,
        ));
    }
    let page = match parameters.get("page").map(String::as_str) {
        None | Some("") => 1,
        Some(text) => match text.parse::<usize>() {
            Ok(page) if (1..=1_000_000).contains(&page) => page,
            _ => return Err(invalid("page", "must be a whole number from 1", text)),
        },
    };
    Ok(NodeFilter {
        state,
        search: search.trim().to_string(),
        page,
    })
}

/// Node counts of one org, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FleetCounts {
    pub ready: usize,
    pub down: usize,
    pub revoked: usize,
    pub services: usize,
    pub allocations: usize,
}

impl FleetCounts {
    pub fn nodes(&self) -> usize {
        self.ready + self.down + self.revoked
    }
}

/// One component's last result on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentStatus {
    pub name: String,
    /// `ok`, `error`, or `unreported`.
    pub state: &'static str,
    /// What it applied (a generation) or how many of its items run.
    pub detail: String,
    pub last_error: Option<String>,
}

/// One row of the node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub hostname: String,
    pub state: NodeState,
    pub last_seen_unix_ms: Option<u64>,
    pub role: String,
    pub arch: String,
    pub labels: Vec<(String, String)>,
    pub agent_version: Option<String>,
    pub desired_generation: Option<String>,
    pub applied_generation: Option<String>,
    pub components: Vec<ComponentStatus>,
}

impl NodeRow {
    /// Whether the node reports running the plan control holds for it.
    pub fn in_sync(&self) -> bool {
        self.desired_generation.is_some() && self.desired_generation == self.applied_generation
    }
}

/// The fleet page: counts at the top, then one page of the node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetPage {
    pub counts: FleetCounts,
    pub filter: NodeFilter,
    /// Nodes that match the filter, on every page.
    pub matching: usize,
    pub pages: usize,
    pub rows: Vec<NodeRow>,
}

/// An allocation on the node page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRow {
    pub allocation_id: String,
    pub service: String,
    pub replica: u32,
    pub state: Option<AllocationState>,
    pub restarts: u32,
    pub message: String,
    pub reported_at_unix_ms: Option<u64>,
}

/// An overlay peer on the node page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub node_id: String,
    pub address: String,
    pub endpoints: Vec<String>,
    pub state: Option<NodeState>,
}

/// The node page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePage {
    pub row: NodeRow,
    pub scheduling: String,
    pub overlay_address: Option<String>,
    pub allocations: Vec<AllocationRow>,
    pub peers: Vec<PeerRow>,
}

/// A service on the services page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub name: String,
    pub release: u64,
    pub replicas: String,
    pub updated_at_unix_ms: u64,
    /// Allocations by reported state (`unreported` for none yet).
    pub states: BTreeMap<String, usize>,
    pub allocations: usize,
    /// The service's latest rollout, if it has one.
    pub rollout: Option<RolloutSummary>,
}

/// A rollout's progress as the services page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSummary {
    pub state: &'static str,
    pub from_release: u64,
    pub release: u64,
    /// Batches started and instances admitted to the new release so far.
    pub batches: usize,
    pub admitted: usize,
    pub halt_reason: Option<String>,
}

fn decode<T: serde::de::DeserializeOwned>(lookup: StatusLookup<'_>, key: &str) -> Option<T> {
    serde_json::from_slice(&lookup(key)?).ok()
}

/// The allocation statuses of `allocations`, each only when reported by the node that runs it.
fn allocation_rows(
    allocations: &[&AllocationRecord],
    lookup: StatusLookup<'_>,
) -> Vec<AllocationRow> {
    allocations
        .iter()
        .map(|allocation| {
            let status: Option<AllocationStatusRecord> = decode(
                lookup,
                &format!("allocation-status/{}", allocation.allocation_id),
            );
            let status = status.filter(|s| s.node_id == allocation.node_id);
            AllocationRow {
                allocation_id: allocation.allocation_id.clone(),
                service: allocation.service.clone(),
                replica: allocation.replica,
                state: status.as_ref().map(|s| s.state),
                restarts: status.as_ref().map_or(0, |s| s.restarts),
                message: status
                    .as_ref()
                    .map(|s| s.message.clone())
                    .unwrap_or_default(),
                reported_at_unix_ms: status.as_ref().map(|s| s.at_unix_ms),
            }
        })
        .collect()
}

fn components(
    allocations: &[AllocationRow],
    bootstrap: Option<&NodeBootstrap>,
) -> Vec<ComponentStatus> {
    let running = allocations
        .iter()
        .filter(|a| a.state == Some(AllocationState::Running))
        .count();
    let failing = allocations.iter().find(|a| {
        matches!(
            a.state,
            Some(AllocationState::Failed | AllocationState::Backoff | AllocationState::Unready)
        )
    });
    // The agent's own `allocations` reconcile result joins the reported allocation states.
    let reconcile_error = bootstrap.and_then(|b| b.errors.get(ALLOCATIONS_COMPONENT));
    let mut list = vec![ComponentStatus {
        name: ALLOCATIONS_COMPONENT.into(),
        state: if failing.is_some() || reconcile_error.is_some() {
            "error"
        } else if allocations.is_empty() || running == allocations.len() {
            "ok"
        } else {
            "pending"
        },
        detail: format!("{running}/{} running", allocations.len()),
        last_error: failing
            .map(|a| format!("{}: {}", a.allocation_id, a.message))
            .or_else(|| reconcile_error.cloned()),
    }];
    let mut names: Vec<String> = BOOTSTRAP_COMPONENTS.iter().map(|s| s.to_string()).collect();
    if let Some(bootstrap) = bootstrap {
        for name in bootstrap.applied.keys().chain(bootstrap.errors.keys()) {
            if !names.contains(name) && name != ALLOCATIONS_COMPONENT {
                names.push(name.clone());
            }
        }
    }
    for name in names {
        let applied = bootstrap.and_then(|b| b.applied.get(&name));
        let error = bootstrap.and_then(|b| b.errors.get(&name));
        list.push(ComponentStatus {
            state: match (applied, error) {
                (_, Some(_)) => "error",
                (Some(_), None) => "ok",
                (None, None) => "unreported",
            },
            detail: applied.map(|g| short_generation(g)).unwrap_or_default(),
            last_error: error.cloned(),
            name,
        });
    }
    list
}

/// The first 12 characters of a generation hash.
pub fn short_generation(generation: &str) -> String {
    generation.chars().take(12).collect()
}

/// Everything a node row needs, gathered for one node.
pub struct RowContext<'a> {
    pub views: &'a Views,
    pub lookup: StatusLookup<'a>,
    pub bootstrap: &'a dyn Fn(&str) -> Option<NodeBootstrap>,
    pub log_epoch: u64,
    pub settings: &'a NodeSettings,
}

/// The version a node runs, and a failed last upgrade (U2): `0.1.0 (upgrade rolled_back)`.
fn agent_version_text(build: &outpost_proto::release::AgentBuild) -> String {
    match &build.upgrade {
        Some(upgrade) if upgrade.state.failed() => {
            format!("{} (upgrade {})", build.version, upgrade.state.as_str())
        }
        _ => build.version.clone(),
    }
}

fn node_row(context: &RowContext<'_>, node: &NodeRecord, allocations: &[AllocationRow]) -> NodeRow {
    let heartbeat: Option<HeartbeatRecord> =
        decode(context.lookup, &format!("heartbeat/{}", node.node_id));
    let bootstrap = (context.bootstrap)(&node.node_id)
        .or_else(|| context.views.bootstrap.get(&node.node_id).cloned());
    let desired_generation = (node.state != NodeState::Revoked)
        .then(|| {
            context
                .views
                .plan(&node.node_id, context.log_epoch, context.settings)
        })
        .flatten()
        .map(|plan| plan.generation());
    NodeRow {
        node_id: node.node_id.clone(),
        hostname: node.facts.hostname.clone(),
        state: node.state,
        last_seen_unix_ms: heartbeat.as_ref().map(|h| h.at_unix_ms),
        role: node.role.as_str().to_string(),
        arch: node.facts.arch.clone(),
        labels: node.labels().into_iter().collect(),
        agent_version: heartbeat
            .as_ref()
            .and_then(|h| h.agent.as_ref())
            .map(agent_version_text),
        desired_generation,
        applied_generation: heartbeat.and_then(|h| h.plan_generation),
        components: components(allocations, bootstrap.as_ref()),
    }
}

fn matches(node: &NodeRecord, filter: &NodeFilter) -> bool {
    filter.state.is_none_or(|state| node.state == state)
        && (filter.search.is_empty()
            || node.node_id.contains(&filter.search)
            || node.facts.hostname.contains(&filter.search))
}

/// The fleet page of `org`: counts over all its nodes, and the rows of one page.
pub fn fleet_page(context: &RowContext<'_>, org: &str, filter: NodeFilter) -> FleetPage {
    let views = context.views;
    let mut counts = FleetCounts::default();
    let mut matching: Vec<&NodeRecord> = Vec::new();
    for node in views.nodes.values().filter(|n| n.org == org) {
        match node.state {
            NodeState::Ready => counts.ready += 1,
            NodeState::Down => counts.down += 1,
            NodeState::Revoked => counts.revoked += 1,
        }
        if matches(node, &filter) {
            matching.push(node);
        }
    }
    counts.services = views.services.values().filter(|s| s.org == org).count();
    let pages = matching.len().div_ceil(NODES_PER_PAGE).max(1);
    let shown: Vec<&NodeRecord> = matching
        .iter()
        .skip((filter.page - 1).saturating_mul(NODES_PER_PAGE))
        .take(NODES_PER_PAGE)
        .copied()
        .collect();
    let mut by_node: HashMap<&str, Vec<&AllocationRecord>> = shown
        .iter()
        .map(|n| (n.node_id.as_str(), Vec::new()))
        .collect();
    for allocation in views.allocations.values().filter(|a| a.org == org) {
        counts.allocations += 1;
        if let Some(list) = by_node.get_mut(allocation.node_id.as_str()) {
            list.push(allocation);
        }
    }
    let rows = shown
        .iter()
        .map(|node| {
            let allocations = by_node
                .get(node.node_id.as_str())
                .map(|list| allocation_rows(list, context.lookup))
                .unwrap_or_default();
            node_row(context, node, &allocations)
        })
        .collect();
    FleetPage {
        counts,
        filter,
        matching: matching.len(),
        pages,
        rows,
    }
}

/// The node page, or `None` when the node is unknown or of another org (both are a 404).
pub fn node_page(context: &RowContext<'_>, org: &str, node_id: &str) -> Option<NodePage> {
    let views = context.views;
    let node = views.nodes.get(node_id).filter(|n| n.org == org)?;
    let allocations = allocation_rows(&views.node_allocations(node_id), context.lookup);
    let peers = views
        .overlay
        .values()
        .filter(|member| member.org == org && member.node_id != node_id)
        .map(|member| PeerRow {
            node_id: member.node_id.clone(),
            address: member.address.clone(),
            endpoints: member.endpoints.clone(),
            state: views.nodes.get(&member.node_id).map(|n| n.state),
        })
        .collect();
    Some(NodePage {
        row: node_row(context, node, &allocations),
        scheduling: node.scheduling.as_str().to_string(),
        overlay_address: views.overlay.get(node_id).map(|m| m.address.clone()),
        allocations,
        peers,
    })
}

/// The services of `org` with their newest release and their allocations by reported state.
pub fn service_rows(views: &Views, lookup: StatusLookup<'_>, org: &str) -> Vec<ServiceRow> {
    let mut rows: BTreeMap<&str, ServiceRow> = views
        .services_of(org)
        .map(|record| {
            let name = record.spec.name.as_str();
            (
                name,
                ServiceRow {
                    name: name.to_string(),
                    release: views.releases.latest(org, name),
                    replicas: match record.spec.replicas {
                        outpost_proto::service::Replicas::Count(count) => count.to_string(),
                        outpost_proto::service::Replicas::All => "all".to_string(),
                    },
                    updated_at_unix_ms: record.updated_at_unix_ms,
                    states: BTreeMap::new(),
                    allocations: 0,
                    rollout: views
                        .rollouts
                        .services
                        .get(&crate::projection::org_scoped_key(org, name))
                        .map(|rollout| RolloutSummary {
                            state: rollout.state.as_str(),
                            from_release: rollout.from_release,
                            release: rollout.release,
                            batches: rollout.batches.len(),
                            admitted: rollout.batches.iter().map(|b| b.members.len()).sum(),
                            halt_reason: rollout.halt_reason.clone(),
                        }),
                },
            )
        })
        .collect();
    for allocation in views.allocations.values().filter(|a| a.org == org) {
        let Some(row) = rows.get_mut(allocation.service.as_str()) else {
            continue;
        };
        let status: Option<AllocationStatusRecord> = decode(
            lookup,
            &format!("allocation-status/{}", allocation.allocation_id),
        );
        let state = status
            .filter(|s| s.node_id == allocation.node_id)
            .map_or_else(
                || "unreported".to_string(),
                |s| s.state.as_str().to_string(),
            );
        *row.states.entry(state).or_default() += 1;
        row.allocations += 1;
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_bounded_and_strict() {
        let allowed = ["state", "q", "page"];
        let parsed = parse_query(Some("state=down&q=edge&page=2"), &allowed).unwrap();
        let filter = node_filter(&parsed).unwrap();
        assert_eq!(filter.state, Some(NodeState::Down));
        assert_eq!(filter.search, "edge");
        assert_eq!(filter.page, 2);
        assert_eq!(
            node_filter(&parse_query(None, &allowed).unwrap())
                .unwrap()
                .page,
            1
        );

        let long = format!("q={}", "a".repeat(QUERY_MAX_BYTES));
        let error = parse_query(Some(&long), &allowed).unwrap_err();
        assert!(error.to_string().contains("at most 512"), "{error}");
        let error = parse_query(Some("sort=x"), &allowed).unwrap_err();
        assert_eq!(error.parameter, "sort");
        let error = parse_query(Some("page=1&page=2"), &allowed).unwrap_err();
        assert!(error.reason.contains("twice"));
        for bad in ["page=0", "page=x", "page=-1", "state=gone"] {
            let parsed = parse_query(Some(bad), &allowed).unwrap();
            assert!(node_filter(&parsed).is_err(), "{bad}");
        }
        let parsed = parse_query(Some(&format!("q={}", "n".repeat(64))), &allowed).unwrap();
        assert_eq!(node_filter(&parsed).unwrap_err().parameter, "q");
    }
}
