//! The scheduler (P7): a pure function from views (nodes, services, current allocations) to
//! placements and removals. No I/O, no clock; the same input always gives the same decisions.
//!
//! Rules: memory is never oversubscribed on a node; CPU is soft up to a ratio; replicas are
//! declarative with soft anti-affinity (prefer the node with the fewest replicas of the service,
//! then the most free memory, then the lowest node id); what fits is placed and the rest waits
//! for a node to join or free memory; scaling down removes the highest-numbered replicas;
//! allocations on nodes that are down, revoked or unknown are removed and placed again elsewhere.
//! Services are placed only on nodes of their own org.

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::hash::sha256_parts_hex;
use outpost_proto::limits::{NAME_MAX_BYTES, PLAN_ALLOCATIONS_MAX};
use outpost_proto::node::Capacity;
use outpost_proto::service::ServiceSpec;

/// Default soft CPU oversubscription ratio.
pub const DEFAULT_CPU_OVERCOMMIT_RATIO: f64 = 4.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAvailability {
    Ready,
    Down,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerNode {
    pub node_id: String,
    pub org: String,
    pub capacity: Capacity,
    pub availability: NodeAvailability,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerService {
    pub org: String,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerAllocation {
    pub allocation_id: String,
    pub service: String,
    pub node_id: String,
    pub replica: u32,
    pub spec: ServiceSpec,
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

/// Computes what to place and remove so the allocations match the services.
pub fn schedule(input: &SchedulerInput) -> Vec<Decision> {
    let nodes: BTreeMap<&str, &SchedulerNode> = input
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n))
        .collect();
    let services: BTreeMap<&str, &SchedulerService> = input
        .services
        .iter()
        .map(|s| (s.spec.name.as_str(), s))
        .collect();
    let mut decisions = Vec::new();
    let mut usage: BTreeMap<&str, Usage> = BTreeMap::new();
    let mut used_ids: BTreeSet<String> = input
        .allocations
        .iter()
        .map(|a| a.allocation_id.clone())
        .collect();
    // Kept allocations per service: replica -> allocation.
    let mut kept: BTreeMap<&str, BTreeMap<u32, &SchedulerAllocation>> = BTreeMap::new();

    let mut sorted: Vec<&SchedulerAllocation> = input.allocations.iter().collect();
    sorted.sort_by(|a, b| a.allocation_id.cmp(&b.allocation_id));
    for allocation in sorted {
        let remove = |reason: String| Decision::Remove {
            allocation_id: allocation.allocation_id.clone(),
            service: allocation.service.clone(),
            node_id: allocation.node_id.clone(),
            reason,
        };
        let node = nodes.get(allocation.node_id.as_str());
        match node.map(|n| n.availability) {
            None => {
                decisions.push(remove(format!("node {} is unknown", allocation.node_id)));
                continue;
            }
            Some(NodeAvailability::Down) => {
                decisions.push(remove(format!("node {} is down", allocation.node_id)));
                continue;
            }
            Some(NodeAvailability::Revoked) => {
                decisions.push(remove(format!("node {} was revoked", allocation.node_id)));
                continue;
            }
            Some(NodeAvailability::Ready) => {}
        }
        let Some(service) = services.get(allocation.service.as_str()) else {
            decisions.push(remove(format!(
                "service {} was deleted",
                allocation.service
            )));
            continue;
        };
        if allocation.replica >= service.spec.replicas {
            decisions.push(remove(format!(
                "service {} scaled down to {} replicas",
                allocation.service, service.spec.replicas
            )));
            continue;
        }
        let replicas = kept.entry(allocation.service.as_str()).or_default();
        if replicas.contains_key(&allocation.replica) {
            decisions.push(remove(format!(
                "duplicate of replica {}",
                allocation.replica
            )));
            continue;
        }
        replicas.insert(allocation.replica, allocation);
        let entry = usage.entry(allocation.node_id.as_str()).or_default();
        entry.memory_bytes = entry
            .memory_bytes
            .saturating_add(allocation.spec.memory_bytes);
        entry.cpu_millis = entry
            .cpu_millis
            .saturating_add(u64::from(allocation.spec.cpu_millis));
        entry.allocations += 1;
    }

    // Spec updates in place where the node still fits the new spec.
    for (service_name, replicas) in kept.iter_mut() {
        let Some(service) = services.get(service_name) else {
            continue;
        };
        let stale: Vec<u32> = replicas
            .iter()
            .filter(|(_, a)| runs_differently(&a.spec, &service.spec))
            .map(|(replica, _)| *replica)
            .collect();
        for replica in stale {
            let Some(allocation) = replicas.get(&replica).copied() else {
                continue;
            };
            let Some(node) = nodes.get(allocation.node_id.as_str()) else {
                continue;
            };
            let entry = usage.entry(allocation.node_id.as_str()).or_default();
            let without = Usage {
                memory_bytes: entry
                    .memory_bytes
                    .saturating_sub(allocation.spec.memory_bytes),
                cpu_millis: entry
                    .cpu_millis
                    .saturating_sub(u64::from(allocation.spec.cpu_millis)),
                allocations: entry.allocations.saturating_sub(1),
            };
            *entry = without;
            if fits(node, without, &service.spec, input.cpu_overcommit_ratio) {
                entry.memory_bytes += service.spec.memory_bytes;
                entry.cpu_millis += u64::from(service.spec.cpu_millis);
                entry.allocations += 1;
                decisions.push(Decision::Place {
                    allocation_id: allocation.allocation_id.clone(),
                    org: service.org.clone(),
                    service: allocation.service.clone(),
                    node_id: allocation.node_id.clone(),
                    replica,
                    spec: service.spec.clone(),
                });
            } else {
                replicas.remove(&replica);
                decisions.push(Decision::Remove {
                    allocation_id: allocation.allocation_id.clone(),
                    service: allocation.service.clone(),
                    node_id: allocation.node_id.clone(),
                    reason: format!("new spec does not fit node {}", allocation.node_id),
                });
            }
        }
    }

    // Missing replicas, lowest first, on the least loaded fitting node.
    for (service_name, service) in &services {
        let placed_replicas: BTreeSet<u32> = kept
            .get(service_name)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        if let Some(replicas) = kept.get(service_name) {
            for allocation in replicas.values() {
                *per_node.entry(allocation.node_id.clone()).or_default() += 1;
            }
        }
        for replica in 0..service.spec.replicas {
            if placed_replicas.contains(&replica) {
                continue;
            }
            let chosen = nodes
                .values()
                .filter(|n| n.availability == NodeAvailability::Ready && n.org == service.org)
                .filter(|n| {
                    let current = usage.get(n.node_id.as_str()).copied().unwrap_or_default();
                    fits(n, current, &service.spec, input.cpu_overcommit_ratio)
                })
                .min_by_key(|n| {
                    let current = usage.get(n.node_id.as_str()).copied().unwrap_or_default();
                    let free = n.capacity.memory_bytes.saturating_sub(current.memory_bytes);
                    (
                        per_node.get(&n.node_id).copied().unwrap_or(0),
                        std::cmp::Reverse(free),
                        n.node_id.clone(),
                    )
                });
            let Some(node) = chosen else { continue };
            let entry = usage.entry(node.node_id.as_str()).or_default();
            entry.memory_bytes += service.spec.memory_bytes;
            entry.cpu_millis += u64::from(service.spec.cpu_millis);
            entry.allocations += 1;
            *per_node.entry(node.node_id.clone()).or_default() += 1;
            let mut attempt = 0;
            let mut id = allocation_id(service_name, replica, input.id_nonce, attempt);
            while used_ids.contains(&id) {
                attempt += 1;
                id = allocation_id(service_name, replica, input.id_nonce, attempt);
            }
            used_ids.insert(id.clone());
            decisions.push(Decision::Place {
                allocation_id: id,
                org: service.org.clone(),
                service: service_name.to_string(),
                node_id: node.node_id.clone(),
                replica,
                spec: service.spec.clone(),
            });
        }
    }
    decisions
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
    for decision in decisions {
        match decision {
            Decision::Place {
                allocation_id,
                service,
                node_id,
                replica,
                spec,
                ..
            } => {
                by_id.insert(
                    allocation_id.clone(),
                    SchedulerAllocation {
                        allocation_id: allocation_id.clone(),
                        service: service.clone(),
                        node_id: node_id.clone(),
                        replica: *replica,
                        spec: spec.clone(),
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
/// count is the service's business, not the instance's: scaling leaves running replicas alone.
fn runs_differently(current: &ServiceSpec, wanted: &ServiceSpec) -> bool {
    let as_instance = |spec: &ServiceSpec| ServiceSpec {
        replicas: 0,
        ..spec.clone()
    };
    as_instance(current) != as_instance(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::name::name;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn spec(service: &str, replicas: u32, memory_mib: u64, cpu_millis: u32) -> ServiceSpec {
        let mut spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"x","command":"/bin/true"}"#).unwrap();
        spec.name = name("name", service).unwrap();
        spec.replicas = replicas;
        spec.memory_bytes = memory_mib * MIB;
        spec.cpu_millis = cpu_millis;
        spec
    }

    fn node(id: &str, memory_mib: u64, cpu_millis: u32) -> SchedulerNode {
        SchedulerNode {
            node_id: id.into(),
            org: "default".into(),
            capacity: Capacity {
                memory_bytes: memory_mib * MIB,
                cpu_millis,
            },
            availability: NodeAvailability::Ready,
        }
    }

    fn service(spec: ServiceSpec) -> SchedulerService {
        SchedulerService {
            org: "default".into(),
            spec,
        }
    }

    fn input(
        nodes: Vec<SchedulerNode>,
        services: Vec<SchedulerService>,
        allocations: Vec<SchedulerAllocation>,
    ) -> SchedulerInput {
        SchedulerInput {
            nodes,
            services,
            allocations,
            cpu_overcommit_ratio: DEFAULT_CPU_OVERCOMMIT_RATIO,
            id_nonce: 1,
        }
    }

    fn nodes_of(allocations: &[SchedulerAllocation]) -> Vec<&str> {
        allocations.iter().map(|a| a.node_id.as_str()).collect()
    }

    #[test]
    fn replicas_spread_across_nodes() {
        let run = input(
            vec![node("n1", 1024, 1000), node("n2", 1024, 1000)],
            vec![service(spec("web", 2, 100, 100))],
            vec![],
        );
        let placed = apply_decisions(&[], &schedule(&run));
        let mut on: Vec<&str> = nodes_of(&placed);
        on.sort();
        assert_eq!(on, vec!["n1", "n2"]);
    }

    #[test]
    fn what_fits_is_placed_and_a_joining_node_gets_the_rest() {
        let web = service(spec("web", 3, 400, 0));
        let first = input(vec![node("n1", 1000, 1000)], vec![web.clone()], vec![]);
        let placed = apply_decisions(&[], &schedule(&first));
        assert_eq!(placed.len(), 2, "two of 400 MiB fit in 1000 MiB");
        let second = input(
            vec![node("n1", 1000, 1000), node("n2", 1000, 1000)],
            vec![web],
            placed.clone(),
        );
        let decisions = schedule(&second);
        assert_eq!(decisions.len(), 1);
        let placed = apply_decisions(&placed, &decisions);
        assert_eq!(placed.iter().filter(|a| a.node_id == "n2").count(), 1);
    }

    #[test]
    fn scale_down_removes_the_highest_replicas() {
        let three = input(
            vec![node("n1", 4096, 4000)],
            vec![service(spec("web", 3, 10, 0))],
            vec![],
        );
        let placed = apply_decisions(&[], &schedule(&three));
        let one = input(
            vec![node("n1", 4096, 4000)],
            vec![service(spec("web", 1, 10, 0))],
            placed.clone(),
        );
        let left = apply_decisions(&placed, &schedule(&one));
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].replica, 0);
    }

    #[test]
    fn allocations_of_a_down_node_move() {
        let web = service(spec("web", 1, 10, 0));
        let placed = apply_decisions(
            &[],
            &schedule(&input(
                vec![node("n1", 100, 100)],
                vec![web.clone()],
                vec![],
            )),
        );
        assert_eq!(nodes_of(&placed), vec!["n1"]);
        let mut down = node("n1", 100, 100);
        down.availability = NodeAvailability::Down;
        let moved = apply_decisions(
            &placed,
            &schedule(&input(
                vec![down, node("n2", 100, 100)],
                vec![web],
                placed.clone(),
            )),
        );
        assert_eq!(nodes_of(&moved), vec!["n2"]);
        assert_ne!(moved[0].allocation_id, placed[0].allocation_id);
    }

    #[test]
    fn spec_update_stays_on_its_node_with_the_same_id() {
        let v1 = spec("web", 1, 10, 0);
        let placed = apply_decisions(
            &[],
            &schedule(&input(
                vec![node("n1", 100, 100), node("n2", 100, 100)],
                vec![service(v1)],
                vec![],
            )),
        );
        let mut v2 = spec("web", 1, 20, 0);
        v2.command = "/bin/other".into();
        let decisions = schedule(&input(
            vec![node("n1", 100, 100), node("n2", 100, 100)],
            vec![service(v2.clone())],
            placed.clone(),
        ));
        assert_eq!(decisions.len(), 1);
        let Decision::Place {
            allocation_id,
            node_id,
            spec,
            ..
        } = &decisions[0]
        else {
            panic!("expected a placement")
        };
        assert_eq!(
            (allocation_id, node_id),
            (&placed[0].allocation_id, &placed[0].node_id)
        );
        assert_eq!(spec, &v2);
    }

    #[test]
    fn scaling_leaves_the_running_replicas_alone() {
        let nodes = vec![node("n1", 1024, 1000), node("n2", 1024, 1000)];
        let placed = apply_decisions(
            &[],
            &schedule(&input(
                nodes.clone(),
                vec![service(spec("web", 2, 10, 0))],
                vec![],
            )),
        );
        let up = schedule(&input(
            nodes.clone(),
            vec![service(spec("web", 3, 10, 0))],
            placed.clone(),
        ));
        assert_eq!(up.len(), 1, "only the new replica is placed: {up:?}");
        assert!(
            matches!(&up[0], Decision::Place { replica: 2, .. }),
            "{up:?}"
        );
        let three = apply_decisions(&placed, &up);
        let down = schedule(&input(nodes, vec![service(spec("web", 2, 10, 0))], three));
        assert_eq!(down.len(), 1, "only the highest replica goes: {down:?}");
        assert!(matches!(&down[0], Decision::Remove { .. }), "{down:?}");
    }

    #[test]
    fn cpu_is_soft_up_to_the_ratio() {
        let nodes = vec![node("n1", 10_000, 1000)];
        let placed = apply_decisions(
            &[],
            &schedule(&input(
                nodes,
                vec![service(spec("web", 10, 1, 1000))],
                vec![],
            )),
        );
        assert_eq!(placed.len(), 4, "4.0 x 1000 millis");
    }

    #[test]
    fn other_orgs_nodes_are_not_used() {
        let mut foreign = node("n1", 1000, 1000);
        foreign.org = "other".into();
        assert!(
            schedule(&input(
                vec![foreign],
                vec![service(spec("web", 1, 1, 0))],
                vec![]
            ))
            .is_empty()
        );
    }

    #[test]
    fn a_node_never_gets_more_allocations_than_a_plan_holds() {
        let run = input(
            vec![node("n1", 1 << 20, 1000)],
            vec![service(spec("tiny", 1000, 0, 0))],
            vec![],
        );
        let placed = apply_decisions(&[], &schedule(&run));
        assert_eq!(placed.len(), PLAN_ALLOCATIONS_MAX);
    }

    #[test]
    fn allocation_ids_fit_a_name() {
        let long = "a".repeat(63);
        let id = allocation_id(&long, 3, 9, 0);
        assert!(id.len() <= NAME_MAX_BYTES);
        assert!(outpost_proto::name::check_name("id", &id).is_ok());
    }

    #[test]
    fn specs_that_no_node_could_hold_are_named_by_field() {
        let ratio = 1.5;
        let nodes = vec![node("big-memory", 4096, 500), node("big-cpu", 512, 4000)];
        let check = |memory_mib: u64, cpu_millis: u32| {
            never_fits(
                &nodes,
                "default",
                &spec("web", 1, memory_mib, cpu_millis),
                ratio,
            )
            .map(|never| (never.field, never.value))
        };
        assert_eq!(check(4096, 750), None, "big-memory offers 500 x 1.5");
        assert_eq!(check(512, 6000), None, "big-cpu offers 4000 x 1.5");
        assert_eq!(check(4097, 0), Some(("memory_bytes", 4097 * MIB)));
        assert_eq!(check(1, 6001), Some(("cpu_millis", 6001)));
        // Each request fits some node, but no node holds both.
        assert_eq!(check(1024, 751), Some(("cpu_millis", 751)));
        assert_eq!(check(1024, 750), None);
        // No CPU request never fails on CPU.
        assert_eq!(check(4096, 0), None);
        // Revoked nodes and other orgs' nodes do not count; down nodes do.
        let mut revoked = node("gone", 1 << 20, 1 << 20);
        revoked.availability = NodeAvailability::Revoked;
        let mut foreign = node("theirs", 1 << 20, 1 << 20);
        foreign.org = "other".into();
        let mut down = node("down", 1024, 1000);
        down.availability = NodeAvailability::Down;
        let world = vec![revoked, foreign, down];
        assert_eq!(
            never_fits(&world, "default", &spec("web", 1, 2048, 0), ratio).map(|n| n.field),
            Some("memory_bytes")
        );
        assert_eq!(
            never_fits(&world, "default", &spec("web", 1, 1024, 1500), ratio),
            None
        );
        // An org with no nodes yet accepts anything and waits.
        assert_eq!(
            never_fits(&[], "default", &spec("web", 1, 1 << 30, u32::MAX), ratio),
            None
        );
    }

    fn arbitrary_world() -> impl Strategy<Value = (Vec<SchedulerNode>, Vec<SchedulerService>)> {
        let nodes =
            proptest::collection::vec((1u64..2048, 0u32..4000, 0u8..4), 0..6).prop_map(|nodes| {
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (memory, cpu, state))| SchedulerNode {
                        availability: match state {
                            0 => NodeAvailability::Down,
                            1 => NodeAvailability::Revoked,
                            _ => NodeAvailability::Ready,
                        },
                        ..node(&format!("n{i}"), memory, cpu)
                    })
                    .collect::<Vec<_>>()
            });
        let services = proptest::collection::vec((0u32..6, 0u64..700, 0u32..2000), 0..5).prop_map(
            |services| {
                services
                    .into_iter()
                    .enumerate()
                    .map(|(i, (replicas, memory, cpu))| {
                        service(spec(&format!("s{i}"), replicas, memory, cpu))
                    })
                    .collect::<Vec<_>>()
            },
        );
        (nodes, services)
    }

    fn check_invariants(
        nodes: &[SchedulerNode],
        services: &[SchedulerService],
        allocations: &[SchedulerAllocation],
    ) -> Result<(), TestCaseError> {
        for node in nodes {
            let used: u64 = allocations
                .iter()
                .filter(|a| a.node_id == node.node_id)
                .map(|a| a.spec.memory_bytes)
                .sum();
            prop_assert!(
                used <= node.capacity.memory_bytes,
                "node {} holds {} of {}",
                node.node_id,
                used,
                node.capacity.memory_bytes
            );
            if node.availability != NodeAvailability::Ready {
                prop_assert!(allocations.iter().all(|a| a.node_id != node.node_id));
            }
        }
        for service in services {
            let count = allocations
                .iter()
                .filter(|a| a.service == service.spec.name.as_str())
                .count();
            prop_assert!(count as u32 <= service.spec.replicas);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn never_oversubscribes_memory_nor_exceeds_replicas(
            (nodes, services) in arbitrary_world(),
            (later_nodes, later_services) in arbitrary_world(),
        ) {
            let first = input(nodes.clone(), services.clone(), vec![]);
            let placed = apply_decisions(&[], &schedule(&first));
            check_invariants(&nodes, &services, &placed)?;
            // The world changes: nodes go down, services scale or change size.
            let second = SchedulerInput { id_nonce: 2, ..input(later_nodes.clone(), later_services.clone(), placed.clone()) };
            let after = apply_decisions(&placed, &schedule(&second));
            check_invariants(&later_nodes, &later_services, &after)?;
            // And a settled world asks for nothing more.
            let settled = SchedulerInput { id_nonce: 3, ..input(later_nodes, later_services, after.clone()) };
            prop_assert_eq!(schedule(&settled), vec![]);
        }

        #[test]
        fn never_fits_is_exactly_what_an_empty_fleet_cannot_place(
            nodes in proptest::collection::vec((1u64..2048, 0u32..4000), 1..6),
            memory_mib in 0u64..2500,
            cpu_millis in 0u32..20_000,
            ratio in 1.0f64..8.0,
        ) {
            let nodes: Vec<SchedulerNode> = nodes
                .into_iter()
                .enumerate()
                .map(|(i, (memory, cpu))| node(&format!("n{i}"), memory, cpu))
                .collect();
            let web = spec("web", 1, memory_mib, cpu_millis);
            let run = SchedulerInput {
                cpu_overcommit_ratio: ratio,
                ..input(nodes.clone(), vec![service(web.clone())], vec![])
            };
            let refused = never_fits(&nodes, "default", &web, ratio);
            prop_assert_eq!(refused.is_some(), schedule(&run).is_empty(), "{:?}", refused);
        }

        #[test]
        fn placement_is_deterministic((nodes, services) in arbitrary_world()) {
            let run = input(nodes, services, vec![]);
            prop_assert_eq!(schedule(&run), schedule(&run.clone()));
        }
    }
}
