//! The scheduler (P7): a pure function from views (nodes, services, current allocations) to
//! placements and removals. No I/O, no clock; the same input always gives the same decisions.
//!
//! Rules: memory is never oversubscribed on a node; CPU is soft up to a ratio; replicas are
//! declarative with soft anti-affinity (prefer the node with the fewest replicas of the service,
//! then the most free memory, then the lowest node id); what fits is placed and the rest waits
//! for a node to join or free memory; scaling down removes the highest-numbered replicas;
//! allocations on revoked or unknown nodes are removed and placed again elsewhere. Services are
//! placed only on nodes of their own org that are ready, not cordoned or draining, and match the
//! service's selector (F2); `replicas: all` places one instance on every such node.
//!
//! Liveness (F1): `down` is an observation, not a decision. A down node keeps its instances
//! until the service's `reschedule_after_secs` has passed since it was marked down (never, for
//! `reschedule: never` and for `replicas: all`). Moving is a handover, so no replica is ever left
//! without a copy: the replacement is placed first, and the old copy (on the lost, draining or no
//! longer selected node) is removed only once the replacement reports `running`. A draining node
//! hands over in wave order: a wave moves only when every lower wave has left the node. A node
//! that re-registers with less memory than its instances need loses the excess at once (the
//! memory invariant), highest wave first, then the largest.

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::hash::sha256_parts_hex;
use outpost_proto::limits::{NAME_MAX_BYTES, PLAN_ALLOCATIONS_MAX};
use outpost_proto::node::Capacity;
use outpost_proto::service::{LostNodePolicy, Replicas, ServiceSpec};
use serde::{Deserialize, Serialize};

/// Default soft CPU oversubscription ratio.
pub const DEFAULT_CPU_OVERCOMMIT_RATIO: f64 = 4.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAvailability {
    Ready,
    /// Silent past its TTL since this time (the `NodeMarkedDown` event).
    Down {
        since_unix_ms: u64,
    },
    Revoked,
}

/// Whether new instances may land on a node (F2). Set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeScheduling {
    #[default]
    Schedulable,
    /// Keeps what it runs, gets nothing new.
    Cordoned,
    /// Gets nothing new; its counted instances move off in wave order and its every-node
    /// instances stop.
    Draining,
}

impl NodeScheduling {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeScheduling::Schedulable => "schedulable",
            NodeScheduling::Cordoned => "cordoned",
            NodeScheduling::Draining => "draining",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerNode {
    pub node_id: String,
    pub org: String,
    pub capacity: Capacity,
    pub availability: NodeAvailability,
    pub arch: String,
    /// The node's own labels with the operator's on top.
    pub labels: BTreeMap<String, String>,
    pub scheduling: NodeScheduling,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerService {
    pub org: String,
    pub spec: ServiceSpec,
    /// While a rollout (R3) holds the service: the instances admitted to its spec so far. Only
    /// those take a changed spec in place; the others keep theirs. `None`: all at once.
    pub rollout_gate: Option<BTreeSet<String>>,
}

/// A service's identity: its org and its name (two orgs may both have `web`, P4).
type ServiceId<'a> = (&'a str, &'a str);

impl SchedulerService {
    fn service_id(&self) -> ServiceId<'_> {
        (self.org.as_str(), self.spec.name.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerAllocation {
    pub allocation_id: String,
    pub org: String,
    pub service: String,
    pub node_id: String,
    pub replica: u32,
    pub spec: ServiceSpec,
    /// Log event that first placed it: of two copies of a replica, the newer is the holder.
    pub placed_event_id: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerInput {
    pub nodes: Vec<SchedulerNode>,
    pub services: Vec<SchedulerService>,
    pub allocations: Vec<SchedulerAllocation>,
    pub cpu_overcommit_ratio: f64,
    /// Mixed into new allocation ids so a replica placed again gets a new id; callers pass the
    /// log head, which keeps the function deterministic.
    pub id_nonce: u64,
    /// The time the decisions are for; compared with down nodes' deadlines.
    pub now_unix_ms: u64,
    /// Allocations whose node last reported them `running`, among [`handover_candidates`].
    pub running: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // short-lived values, built and consumed in one pass
pub enum Decision {
    /// Place a new allocation, or place an existing one again with a new spec on the same node.
    Place {
        allocation_id: String,
        org: String,
        service: String,
        node_id: String,
        replica: u32,
        spec: ServiceSpec,
    },
    Remove {
        allocation_id: String,
        service: String,
        node_id: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    memory_bytes: u64,
    cpu_millis: u64,
    allocations: usize,
}

fn fits(node: &SchedulerNode, usage: Usage, spec: &ServiceSpec, cpu_overcommit_ratio: f64) -> bool {
    // A node's plan holds at most PLAN_ALLOCATIONS_MAX allocations.
    if usage.allocations >= PLAN_ALLOCATIONS_MAX {
        return false;
    }
    let memory_after = usage.memory_bytes.saturating_add(spec.memory_bytes);
    if memory_after > node.capacity.memory_bytes {
        return false;
    }
    let cpu_after = usage.cpu_millis.saturating_add(u64::from(spec.cpu_millis));
    spec.cpu_millis == 0 || cpu_after <= cpu_limit_millis(node, cpu_overcommit_ratio)
}

/// The CPU a node may be promised: its capacity times the soft oversubscription ratio.
fn cpu_limit_millis(node: &SchedulerNode, cpu_overcommit_ratio: f64) -> u64 {
    (f64::from(node.capacity.cpu_millis) * cpu_overcommit_ratio).floor() as u64
}

/// Why a spec could never be placed on any of its org's nodes: the request field, its value and
/// what the nodes offer at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeverFits {
    /// `memory_bytes` or `cpu_millis`.
    pub field: &'static str,
    pub value: u64,
    /// What the nodes offer, e.g. "exceeds the largest node memory capacity 536870912".
    pub reason: String,
}

/// Whether `spec` could never fit any registered (not revoked) node of `org`, even an empty one:
/// its memory exceeds every node's memory, or its CPU exceeds every node's CPU capacity times
/// `cpu_overcommit_ratio`, or no single node has room for both. Down nodes count (they may come
/// back). An org with no nodes yet gives `None`: replicas are declarative, so the spec waits for
/// a node to join.
pub fn never_fits(
    nodes: &[SchedulerNode],
    org: &str,
    spec: &ServiceSpec,
    cpu_overcommit_ratio: f64,
) -> Option<NeverFits> {
    let eligible: Vec<&SchedulerNode> = nodes
        .iter()
        .filter(|n| n.org == org && n.availability != NodeAvailability::Revoked)
        .collect();
    let largest_memory_bytes = eligible.iter().map(|n| n.capacity.memory_bytes).max()?;
    if spec.memory_bytes > largest_memory_bytes {
        return Some(NeverFits {
            field: "memory_bytes",
            value: spec.memory_bytes,
            reason: format!("exceeds the largest node memory capacity {largest_memory_bytes}"),
        });
    }
    if spec.cpu_millis == 0 {
        return None;
    }
    let cpu_millis = u64::from(spec.cpu_millis);
    // The most CPU a node may be promised: of all nodes, and of those with room for the memory.
    let cpu_offered_millis = |needs_memory_room: bool| {
        eligible
            .iter()
            .filter(|n| !needs_memory_room || n.capacity.memory_bytes >= spec.memory_bytes)
            .map(|n| cpu_limit_millis(n, cpu_overcommit_ratio))
            .max()
            .unwrap_or_default()
    };
    let (largest, with_memory_room) = (cpu_offered_millis(false), cpu_offered_millis(true));
    let reason = if cpu_millis > largest {
        format!(
            "exceeds the largest node cpu capacity times the oversubscription ratio {cpu_overcommit_ratio} ({largest} millis)"
        )
    } else if cpu_millis > with_memory_room {
        format!(
            "exceeds what any node with room for memory_bytes {} offers at the oversubscription ratio {cpu_overcommit_ratio} ({with_memory_room} millis)",
            spec.memory_bytes
        )
    } else {
        return None;
    };
    Some(NeverFits {
        field: "cpu_millis",
        value: cpu_millis,
        reason,
    })
}

/// New allocation id `{service}-{8 hex}`, within the name length limit.
pub fn allocation_id(service: &str, replica: u32, nonce: u64, attempt: u32) -> String {
    let hash = sha256_parts_hex(&[
        service.as_bytes(),
        &replica.to_le_bytes(),
        &nonce.to_le_bytes(),
        &attempt.to_le_bytes(),
    ]);
    let mut prefix_len = service.len().min(NAME_MAX_BYTES - 9);
    while !service.is_char_boundary(prefix_len) {
        prefix_len -= 1;
    }
    format!("{}-{}", &service[..prefix_len], &hash[..8])
}

impl SchedulerAllocation {
    fn service_id(&self) -> ServiceId<'_> {
        (self.org.as_str(), self.service.as_str())
    }
}

/// Where a kept copy of an instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Its node may keep it.
    Stays,
    /// Its node has been down longer than the service allows: a replacement is wanted.
    Lost,
    /// Its node is draining or no longer selected: a replacement is wanted.
    Leaving,
}

/// A service's slot: a replica number, or a node for `replicas: all`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Replica(u32),
    Node(String),
}

fn slot_of(spec: &ServiceSpec, allocation: &SchedulerAllocation) -> Slot {
    match spec.replicas {
        Replicas::Count(_) => Slot::Replica(allocation.replica),
        Replicas::All => Slot::Node(allocation.node_id.clone()),
    }
}

/// Whether the service's selector and org take the node, whatever its state.
fn selects(service: &SchedulerService, node: &SchedulerNode) -> bool {
    node.org == service.org && service.spec.selector.matches(&node.labels, &node.arch)
}

/// Whether a new instance of the service may land on the node (memory aside).
fn may_place(service: &SchedulerService, node: &SchedulerNode) -> bool {
    node.availability == NodeAvailability::Ready
        && node.scheduling == NodeScheduling::Schedulable
        && selects(service, node)
}

/// When a counted instance on a down node may be placed elsewhere; `None` when it never moves
/// for being down (`reschedule: never`, `replicas: all`) or the node is not down.
fn lost_deadline_unix_ms(spec: &ServiceSpec, node: &SchedulerNode) -> Option<u64> {
    match (node.availability, spec.lost_node_policy(), spec.replicas) {
        (
            NodeAvailability::Down { since_unix_ms },
            LostNodePolicy::MoveAfterSecs(after_secs),
            Replicas::Count(_),
        ) => Some(since_unix_ms.saturating_add(u64::from(after_secs) * 1000)),
        _ => None,
    }
}

fn standing(service: &SchedulerService, node: &SchedulerNode, now_unix_ms: u64) -> Standing {
    if lost_deadline_unix_ms(&service.spec, node).is_some_and(|deadline| now_unix_ms >= deadline) {
        return Standing::Lost;
    }
    let leaves = node.scheduling == NodeScheduling::Draining || !selects(service, node);
    if node.availability == NodeAvailability::Ready && leaves {
        return Standing::Leaving;
    }
    Standing::Stays
}

fn add_usage(usage: &mut Usage, spec: &ServiceSpec) {
    usage.memory_bytes = usage.memory_bytes.saturating_add(spec.memory_bytes);
    usage.cpu_millis = usage.cpu_millis.saturating_add(u64::from(spec.cpu_millis));
    usage.allocations += 1;
}

fn remove_usage(usage: &mut Usage, spec: &ServiceSpec) {
    usage.memory_bytes = usage.memory_bytes.saturating_sub(spec.memory_bytes);
    usage.cpu_millis = usage.cpu_millis.saturating_sub(u64::from(spec.cpu_millis));
    usage.allocations = usage.allocations.saturating_sub(1);
}

fn removal(allocation: &SchedulerAllocation, reason: String) -> Decision {
    Decision::Remove {
        allocation_id: allocation.allocation_id.clone(),
        service: allocation.service.clone(),
        node_id: allocation.node_id.clone(),
        reason,
    }
}

/// Allocations whose `running` state decides a handover: every copy of a replica that has more
/// than one. The caller reads their status and passes the running ones in
/// [`SchedulerInput::running`].
pub fn handover_candidates(allocations: &[SchedulerAllocation]) -> Vec<String> {
    let mut copies: BTreeMap<(ServiceId<'_>, u32), Vec<&str>> = BTreeMap::new();
    for allocation in allocations {
        copies
            .entry((allocation.service_id(), allocation.replica))
            .or_default()
            .push(allocation.allocation_id.as_str());
    }
    copies
        .into_values()
        .filter(|ids| ids.len() > 1)
        .flatten()
        .map(str::to_string)
        .collect()
}

/// When the scheduler must look again though nothing was appended: the next deadline of an
/// instance on a down node, or `now + handover_poll_ms` while a handover waits for its
/// replacement to run. `None`: only a new event can change the decisions.
pub fn next_review_unix_ms(input: &SchedulerInput, handover_poll_ms: u64) -> Option<u64> {
    let (nodes, services) = index(input);
    let deadline = input
        .allocations
        .iter()
        .filter_map(|allocation| {
            let node = nodes.get(allocation.node_id.as_str())?;
            let service = services.get(&allocation.service_id())?;
            lost_deadline_unix_ms(&service.spec, node)
        })
        .filter(|deadline| *deadline > input.now_unix_ms)
        .min();
    let handover = (!handover_candidates(&input.allocations).is_empty())
        .then(|| input.now_unix_ms.saturating_add(handover_poll_ms));
    deadline.into_iter().chain(handover).min()
}

/// Nodes by id and services by org and name.
#[allow(clippy::type_complexity)] // two plain indexes, named at the call sites
fn index(
    input: &SchedulerInput,
) -> (
    BTreeMap<&str, &SchedulerNode>,
    BTreeMap<ServiceId<'_>, &SchedulerService>,
) {
    let nodes = input
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n))
        .collect();
    let services = input.services.iter().map(|s| (s.service_id(), s)).collect();
    (nodes, services)
}

/// Computes what to place and remove so the allocations match the services.
pub fn schedule(input: &SchedulerInput) -> Vec<Decision> {
    let (nodes, services) = index(input);
    let mut decisions = Vec::new();
    let mut usage: BTreeMap<&str, Usage> = BTreeMap::new();
    let mut used_ids: BTreeSet<String> = input
        .allocations
        .iter()
        .map(|a| a.allocation_id.clone())
        .collect();

    // What can never stay goes at once: allocations of unknown or revoked nodes, of deleted
    // services and above a lowered count.
    let mut sorted: Vec<&SchedulerAllocation> = input.allocations.iter().collect();
    sorted.sort_by(|a, b| a.allocation_id.cmp(&b.allocation_id));
    let mut kept: Vec<&SchedulerAllocation> = Vec::new();
    for allocation in sorted {
        let remove = |reason: String| removal(allocation, reason);
        match nodes
            .get(allocation.node_id.as_str())
            .map(|n| n.availability)
        {
            None => {
                decisions.push(remove(format!("node {} is unknown", allocation.node_id)));
                continue;
            }
            Some(NodeAvailability::Revoked) => {
                decisions.push(remove(format!("node {} was revoked", allocation.node_id)));
                continue;
            }
            Some(NodeAvailability::Ready | NodeAvailability::Down { .. }) => {}
        }
        let Some(service) = services.get(&allocation.service_id()) else {
            decisions.push(remove(format!(
                "service {} was deleted",
                allocation.service
            )));
            continue;
        };
        if let Replicas::Count(count) = service.spec.replicas
            && allocation.replica >= count
        {
            decisions.push(remove(format!(
                "service {} scaled down to {count} replicas",
                allocation.service
            )));
            continue;
        }
        add_usage(
            usage.entry(allocation.node_id.as_str()).or_default(),
            &allocation.spec,
        );
        kept.push(allocation);
    }

    // A node that came back with less memory than its instances need sheds the excess,
    // highest wave first, then the largest: memory is never oversubscribed.
    let wave_of = |allocation: &SchedulerAllocation| {
        services
            .get(&allocation.service_id())
            .map_or(0, |s| s.spec.wave)
    };
    let mut shed: BTreeSet<&str> = BTreeSet::new();
    for node in nodes.values() {
        let Some(used) = usage.get_mut(node.node_id.as_str()) else {
            continue;
        };
        if used.memory_bytes <= node.capacity.memory_bytes {
            continue;
        }
        let mut on_node: Vec<&SchedulerAllocation> = kept
            .iter()
            .copied()
            .filter(|a| a.node_id == node.node_id)
            .collect();
        on_node.sort_by_key(|a| {
            (
                std::cmp::Reverse(wave_of(a)),
                std::cmp::Reverse(a.spec.memory_bytes),
                std::cmp::Reverse(a.allocation_id.clone()),
            )
        });
        for allocation in on_node {
            if used.memory_bytes <= node.capacity.memory_bytes {
                break;
            }
            remove_usage(used, &allocation.spec);
            shed.insert(allocation.allocation_id.as_str());
            decisions.push(removal(
                allocation,
                format!(
                    "node {} offers memory_bytes {}, less than its instances need",
                    node.node_id, node.capacity.memory_bytes
                ),
            ));
        }
    }
    kept.retain(|a| !shed.contains(a.allocation_id.as_str()));

    // Spec updates in place where the node still fits the new spec.
    let mut outgrown: BTreeSet<&str> = BTreeSet::new();
    for allocation in &kept {
        let (Some(service), Some(node)) = (
            services.get(&allocation.service_id()),
            nodes.get(allocation.node_id.as_str()),
        ) else {
            continue;
        };
        if !runs_differently(&allocation.spec, &service.spec) {
            continue;
        }
        if service
            .rollout_gate
            .as_ref()
            .is_some_and(|admitted| !admitted.contains(&allocation.allocation_id))
        {
            continue;
        }
        let entry = usage.entry(allocation.node_id.as_str()).or_default();
        remove_usage(entry, &allocation.spec);
        if fits(node, *entry, &service.spec, input.cpu_overcommit_ratio) {
            add_usage(entry, &service.spec);
            decisions.push(Decision::Place {
                allocation_id: allocation.allocation_id.clone(),
                org: service.org.clone(),
                service: allocation.service.clone(),
                node_id: allocation.node_id.clone(),
                replica: allocation.replica,
                spec: service.spec.clone(),
            });
        } else {
            outgrown.insert(allocation.allocation_id.as_str());
            decisions.push(removal(
                allocation,
                format!("new spec does not fit node {}", allocation.node_id),
            ));
        }
    }
    kept.retain(|a| !outgrown.contains(a.allocation_id.as_str()));

    // A draining node hands over in wave order: only its lowest wave still present may move.
    let mut draining_wave: BTreeMap<&str, u32> = BTreeMap::new();
    for allocation in &kept {
        let draining = nodes
            .get(allocation.node_id.as_str())
            .is_some_and(|n| n.scheduling == NodeScheduling::Draining);
        if draining {
            let wave = draining_wave
                .entry(allocation.node_id.as_str())
                .or_insert(u32::MAX);
            *wave = (*wave).min(wave_of(allocation));
        }
    }
    let wave_open = |allocation: &SchedulerAllocation| {
        draining_wave
            .get(allocation.node_id.as_str())
            .is_none_or(|lowest| wave_of(allocation) <= *lowest)
    };

    // Copies per slot; a slot without a copy that stays gets a replacement, and the other copies
    // leave once the newest copy that stays runs.
    let mut slots: BTreeMap<(ServiceId<'_>, Slot), Vec<&SchedulerAllocation>> = BTreeMap::new();
    let mut per_node: BTreeMap<(ServiceId<'_>, &str), u32> = BTreeMap::new();
    let mut used_replicas: BTreeMap<ServiceId<'_>, BTreeSet<u32>> = BTreeMap::new();
    for allocation in &kept {
        let Some(service) = services.get(&allocation.service_id()) else {
            continue;
        };
        slots
            .entry((allocation.service_id(), slot_of(&service.spec, allocation)))
            .or_default()
            .push(allocation);
        *per_node
            .entry((allocation.service_id(), allocation.node_id.as_str()))
            .or_default() += 1;
        used_replicas
            .entry(allocation.service_id())
            .or_default()
            .insert(allocation.replica);
    }
    let mut wanted: Vec<(ServiceId<'_>, u32)> = Vec::new();
    for ((service_name, slot), copies) in &slots {
        let Some(service) = services.get(service_name) else {
            continue;
        };
        let standing_of = |allocation: &SchedulerAllocation| {
            nodes
                .get(allocation.node_id.as_str())
                .map_or(Standing::Stays, |node| {
                    standing(service, node, input.now_unix_ms)
                })
        };
        match slot {
            Slot::Node(node_id) => {
                let mut by_age = copies.clone();
                by_age.sort_by_key(|a| (a.placed_event_id, a.allocation_id.clone()));
                for (index, allocation) in by_age.into_iter().enumerate() {
                    if standing_of(allocation) == Standing::Leaving {
                        if wave_open(allocation) {
                            decisions.push(removal(
                                allocation,
                                format!("node {node_id} is draining or no longer selected"),
                            ));
                        }
                    } else if index > 0 {
                        decisions.push(removal(
                            allocation,
                            format!("duplicate of service {} on node {node_id}", service_name.1),
                        ));
                    }
                }
            }
            Slot::Replica(replica) => {
                let holder = copies
                    .iter()
                    .filter(|a| standing_of(a) == Standing::Stays)
                    .max_by_key(|a| (a.placed_event_id, a.allocation_id.clone()));
                match holder {
                    Some(holder) if input.running.contains(&holder.allocation_id) => {
                        for allocation in copies
                            .iter()
                            .filter(|a| a.allocation_id != holder.allocation_id)
                        {
                            decisions.push(removal(
                                allocation,
                                format!(
                                    "replaced by {} on node {}, which is running",
                                    holder.allocation_id, holder.node_id
                                ),
                            ));
                        }
                    }
                    Some(_) => {}
                    None => {
                        let may_move = copies
                            .iter()
                            .all(|a| standing_of(a) == Standing::Lost || wave_open(a));
                        if may_move {
                            wanted.push((*service_name, *replica));
                        }
                    }
                }
            }
        }
    }
    for (service_name, service) in &services {
        if let Replicas::Count(count) = service.spec.replicas {
            for replica in 0..count {
                if !slots.contains_key(&(*service_name, Slot::Replica(replica))) {
                    wanted.push((*service_name, replica));
                }
            }
        }
    }
    wanted.sort();

    let mut placer = Placer {
        id_nonce: input.id_nonce,
        used_ids: &mut used_ids,
        usage: &mut usage,
        decisions: &mut decisions,
    };

    // Counted replicas, lowest first, on the least loaded eligible node that fits.
    for (service_name, replica) in wanted {
        let Some(service) = services.get(&service_name) else {
            continue;
        };
        let chosen = nodes
            .values()
            .filter(|n| may_place(service, n))
            .filter(|n| {
                fits(
                    n,
                    placer.usage_of(n),
                    &service.spec,
                    input.cpu_overcommit_ratio,
                )
            })
            .min_by_key(|n| {
                let current = placer.usage_of(n);
                let free = n.capacity.memory_bytes.saturating_sub(current.memory_bytes);
                (
                    per_node
                        .get(&(service_name, n.node_id.as_str()))
                        .copied()
                        .unwrap_or(0),
                    std::cmp::Reverse(free),
                    n.node_id.clone(),
                )
            });
        let Some(node) = chosen else { continue };
        *per_node
            .entry((service_name, node.node_id.as_str()))
            .or_default() += 1;
        placer.place(service, node, replica);
    }

    // `replicas: all`: one instance on every eligible node that has none and fits it.
    for (service_name, service) in &services {
        if service.spec.replicas != Replicas::All {
            continue;
        }
        // Replica numbers are handed out in rising order, so the search for a free one resumes
        // where the last one ended: linear in the fleet, not quadratic.
        let mut next_replica = 0u32;
        for node in nodes.values() {
            let has_one = slots.contains_key(&(*service_name, Slot::Node(node.node_id.clone())));
            if has_one
                || !may_place(service, node)
                || !fits(
                    node,
                    placer.usage_of(node),
                    &service.spec,
                    input.cpu_overcommit_ratio,
                )
            {
                continue;
            }
            let taken = used_replicas.entry(*service_name).or_default();
            while taken.contains(&next_replica) {
                next_replica += 1;
            }
            let replica = next_replica;
            taken.insert(replica);
            placer.place(service, node, replica);
        }
    }
    decisions
}

/// Places new allocations: a fresh id, the node's usage, the decision.
struct Placer<'a, 'n> {
    id_nonce: u64,
    used_ids: &'a mut BTreeSet<String>,
    usage: &'a mut BTreeMap<&'n str, Usage>,
    decisions: &'a mut Vec<Decision>,
}

impl<'n> Placer<'_, 'n> {
    fn usage_of(&self, node: &SchedulerNode) -> Usage {
        self.usage
            .get(node.node_id.as_str())
            .copied()
            .unwrap_or_default()
    }

    fn place(&mut self, service: &SchedulerService, node: &'n SchedulerNode, replica: u32) {
        add_usage(
            self.usage.entry(node.node_id.as_str()).or_default(),
            &service.spec,
        );
        let name = service.spec.name.as_str();
        let mut attempt = 0;
        let mut id = allocation_id(name, replica, self.id_nonce, attempt);
        while self.used_ids.contains(&id) {
            attempt += 1;
            id = allocation_id(name, replica, self.id_nonce, attempt);
        }
        self.used_ids.insert(id.clone());
        self.decisions.push(Decision::Place {
            allocation_id: id,
            org: service.org.clone(),
            service: name.to_string(),
            node_id: node.node_id.clone(),
            replica,
            spec: service.spec.clone(),
        });
    }
}

/// Applies decisions to a list of allocations (what the projections do with the events).
pub fn apply_decisions(
    allocations: &[SchedulerAllocation],
    decisions: &[Decision],
) -> Vec<SchedulerAllocation> {
    let mut by_id: BTreeMap<String, SchedulerAllocation> = allocations
        .iter()
        .map(|a| (a.allocation_id.clone(), a.clone()))
        .collect();
    // New placements get event ids after every existing one, in decision order.
    let mut next_event_id = allocations
        .iter()
        .map(|a| a.placed_event_id)
        .max()
        .unwrap_or(0);
    for decision in decisions {
        match decision {
            Decision::Place {
                allocation_id,
                org,
                service,
                node_id,
                replica,
                spec,
            } => {
                let placed_event_id = match by_id.get(allocation_id) {
                    Some(existing) => existing.placed_event_id,
                    None => {
                        next_event_id += 1;
                        next_event_id
                    }
                };
                by_id.insert(
                    allocation_id.clone(),
                    SchedulerAllocation {
                        allocation_id: allocation_id.clone(),
                        org: org.clone(),
                        service: service.clone(),
                        node_id: node_id.clone(),
                        replica: *replica,
                        spec: spec.clone(),
                        placed_event_id,
                    },
                );
            }
            Decision::Remove { allocation_id, .. } => {
                by_id.remove(allocation_id);
            }
        }
    }
    by_id.into_values().collect()
}

/// Whether an allocation running `current` must take `wanted` (and so restart). The replica
/// count, selector and reschedule policy are the service's business, not the instance's:
/// changing them leaves running instances alone.
fn runs_differently(current: &ServiceSpec, wanted: &ServiceSpec) -> bool {
    current.as_instance() != wanted.as_instance()
}

#[cfg(test)]
mod tests;
