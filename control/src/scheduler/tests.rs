//! Unit and property tests of the scheduler's rules.

use super::*;
use outpost_proto::name::name;
use outpost_proto::service::Reschedule;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn spec(service: &str, replicas: u32, memory_mib: u64, cpu_millis: u32) -> ServiceSpec {
    let mut spec: ServiceSpec =
        serde_json::from_str(r#"{"name":"x","command":"/bin/true"}"#).unwrap();
    spec.name = name("name", service).unwrap();
    spec.replicas = Replicas::Count(replicas);
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
        arch: "x86_64".into(),
        labels: BTreeMap::new(),
        scheduling: NodeScheduling::Schedulable,
    }
}

fn service(spec: ServiceSpec) -> SchedulerService {
    SchedulerService {
        rollout_gate: None,
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
        now_unix_ms: NOW_UNIX_MS,
        running: BTreeSet::new(),
    }
}

/// The time of every test world unless it says otherwise.
const NOW_UNIX_MS: u64 = 1_000_000_000;

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

fn down_since(id: &str, secs_ago: u64) -> SchedulerNode {
    SchedulerNode {
        availability: NodeAvailability::Down {
            since_unix_ms: NOW_UNIX_MS - secs_ago * 1000,
        },
        ..node(id, 100, 100)
    }
}

fn removed_ids(decisions: &[Decision]) -> Vec<&str> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Remove { allocation_id, .. } => Some(allocation_id.as_str()),
            Decision::Place { .. } => None,
        })
        .collect()
}

fn placed_on(decisions: &[Decision]) -> Vec<(&str, &str)> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place {
                service, node_id, ..
            } => Some((service.as_str(), node_id.as_str())),
            Decision::Remove { .. } => None,
        })
        .collect()
}

/// `web` (one replica, 10 MiB) placed on n1 while n1 was the only node.
fn web_on_n1(
    reschedule: impl Fn(&mut ServiceSpec),
) -> (SchedulerService, Vec<SchedulerAllocation>) {
    let mut web = spec("web", 1, 10, 0);
    reschedule(&mut web);
    let web = service(web);
    let placed = apply_decisions(
        &[],
        &schedule(&input(
            vec![node("n1", 100, 100)],
            vec![web.clone()],
            vec![],
        )),
    );
    assert_eq!(nodes_of(&placed), vec!["n1"]);
    (web, placed)
}

#[test]
fn a_node_down_shorter_than_reschedule_after_keeps_its_instances() {
    let (web, placed) = web_on_n1(|_| {});
    let world = input(
        vec![down_since("n1", 299), node("n2", 100, 100)],
        vec![web],
        placed,
    );
    assert_eq!(
        schedule(&world),
        vec![],
        "down is an observation, nothing moves"
    );
    assert_eq!(
        next_review_unix_ms(&world, 1000),
        Some(NOW_UNIX_MS + 1000),
        "looks again when the 300 s have passed"
    );
}

#[test]
fn reschedule_never_and_every_node_services_stay_with_a_lost_node() {
    let (web, placed) = web_on_n1(|web| web.reschedule = Reschedule::Never);
    let world = input(
        vec![down_since("n1", 86_400), node("n2", 100, 100)],
        vec![web],
        placed,
    );
    assert_eq!(schedule(&world), vec![]);
    assert_eq!(next_review_unix_ms(&world, 1000), None);
    let (agent, placed) = web_on_n1(|web| web.replicas = Replicas::All);
    let world = input(
        vec![down_since("n1", 86_400), node("n2", 100, 100)],
        vec![agent],
        placed,
    );
    // n2 gets its own every-node instance; n1's stays.
    let decisions = schedule(&world);
    assert_eq!(placed_on(&decisions), vec![("web", "n2")]);
    assert!(removed_ids(&decisions).is_empty(), "{decisions:?}");
}

#[test]
fn past_reschedule_after_the_replacement_is_placed_first_and_the_copy_leaves_once_it_runs() {
    let (web, placed) = web_on_n1(|web| web.reschedule_after_secs = Some(60));
    let old = placed[0].allocation_id.clone();
    let lost = input(
        vec![down_since("n1", 61), node("n2", 100, 100)],
        vec![web.clone()],
        placed.clone(),
    );
    let decisions = schedule(&lost);
    assert_eq!(placed_on(&decisions), vec![("web", "n2")]);
    assert!(removed_ids(&decisions).is_empty(), "no gap: {decisions:?}");
    let both = apply_decisions(&placed, &decisions);
    let new = both
        .iter()
        .find(|a| a.node_id == "n2")
        .unwrap()
        .allocation_id
        .clone();
    assert_eq!(handover_candidates(&both).len(), 2);
    // Until the replacement runs, nothing more happens, and the scheduler polls.
    let waiting = input(
        vec![down_since("n1", 62), node("n2", 100, 100)],
        vec![web.clone()],
        both.clone(),
    );
    assert_eq!(schedule(&waiting), vec![]);
    assert_eq!(next_review_unix_ms(&waiting, 500), Some(NOW_UNIX_MS + 500));
    // The box comes back before the replacement runs: it keeps its copy.
    let back = input(
        vec![node("n1", 100, 100), node("n2", 100, 100)],
        vec![web.clone()],
        both.clone(),
    );
    assert_eq!(schedule(&back), vec![]);
    // Once the replacement runs, the returning box's copy is stopped.
    let running = SchedulerInput {
        running: [new.clone()].into(),
        ..back
    };
    let decisions = schedule(&running);
    assert_eq!(removed_ids(&decisions), vec![old.as_str()]);
    let after = apply_decisions(&both, &decisions);
    assert_eq!(nodes_of(&after), vec!["n2"]);
    assert_eq!(after[0].allocation_id, new);
}

#[test]
fn a_replacement_that_does_not_fit_anywhere_leaves_the_lost_copy_alone() {
    let (web, placed) = web_on_n1(|web| web.reschedule_after_secs = Some(0));
    let world = input(
        vec![down_since("n1", 1), node("n2", 5, 100)],
        vec![web],
        placed,
    );
    assert_eq!(schedule(&world), vec![]);
}

fn labeled(id: &str, site: &str, arch: &str) -> SchedulerNode {
    SchedulerNode {
        labels: [("site".to_string(), site.to_string())].into(),
        arch: arch.into(),
        ..node(id, 1000, 1000)
    }
}

fn select_site(spec: &mut ServiceSpec, site: &str) {
    spec.selector
        .labels
        .insert(name("site", "site").unwrap(), site.to_string());
}

#[test]
fn selectors_pick_nodes_by_label_and_arch() {
    let nodes = vec![
        labeled("a", "north", "x86_64"),
        labeled("b", "south", "x86_64"),
        labeled("c", "north", "aarch64"),
    ];
    let mut north = spec("north", 4, 10, 0);
    select_site(&mut north, "north");
    let mut arm = spec("arm", 2, 10, 0);
    arm.selector.arch = vec!["aarch64".into()];
    let decisions = schedule(&input(nodes, vec![service(north), service(arm)], vec![]));
    let mut on = placed_on(&decisions);
    on.sort();
    assert_eq!(
        on,
        vec![
            ("arm", "c"),
            ("arm", "c"),
            ("north", "a"),
            ("north", "a"),
            ("north", "c"),
            ("north", "c")
        ]
    );
}

#[test]
fn replicas_all_lands_on_every_eligible_node_including_later_ones() {
    let mut agent = spec("agent", 1, 10, 0);
    agent.replicas = Replicas::All;
    select_site(&mut agent, "north");
    let agent = service(agent);
    let mut cordoned = labeled("d", "north", "x86_64");
    cordoned.scheduling = NodeScheduling::Cordoned;
    let nodes = vec![
        labeled("a", "north", "x86_64"),
        labeled("b", "south", "x86_64"),
        cordoned,
    ];
    let placed = apply_decisions(
        &[],
        &schedule(&input(nodes.clone(), vec![agent.clone()], vec![])),
    );
    assert_eq!(nodes_of(&placed), vec!["a"]);
    // A node that joins later gets its own; the others are left alone.
    let mut grown = nodes.clone();
    grown.push(labeled("e", "north", "aarch64"));
    let decisions = schedule(&input(grown.clone(), vec![agent.clone()], placed.clone()));
    assert_eq!(placed_on(&decisions), vec![("agent", "e")]);
    let placed = apply_decisions(&placed, &decisions);
    assert_ne!(placed[0].replica, placed[1].replica);
    // Relabeling a node away from the selector stops its instance.
    grown[0].labels.insert("site".into(), "south".into());
    let decisions = schedule(&input(grown, vec![agent], placed.clone()));
    assert_eq!(placed_on(&decisions), vec![]);
    assert_eq!(removed_ids(&decisions).len(), 1);
    assert_eq!(
        apply_decisions(&placed, &decisions)
            .iter()
            .map(|a| a.node_id.as_str())
            .collect::<Vec<_>>(),
        vec!["e"]
    );
}

#[test]
fn cordon_keeps_what_runs_and_takes_nothing_new() {
    let (web, placed) = web_on_n1(|_| {});
    let mut n1 = node("n1", 100, 100);
    n1.scheduling = NodeScheduling::Cordoned;
    assert_eq!(
        schedule(&input(vec![n1.clone()], vec![web.clone()], placed.clone())),
        vec![]
    );
    let two = service(spec("web", 2, 10, 0));
    assert_eq!(schedule(&input(vec![n1], vec![two], placed)), vec![]);
}

#[test]
fn drain_moves_counted_instances_in_wave_order_and_stops_every_node_ones() {
    let mut db = spec("db", 1, 10, 0);
    db.wave = 0;
    let mut api = spec("api", 1, 10, 0);
    api.wave = 1;
    let mut agent = spec("agent", 1, 10, 0);
    agent.wave = 1;
    agent.replicas = Replicas::All;
    let services = vec![service(db), service(api), service(agent)];
    let placed = apply_decisions(
        &[],
        &schedule(&input(vec![node("n1", 100, 100)], services.clone(), vec![])),
    );
    assert_eq!(placed.len(), 3);
    let mut n1 = node("n1", 100, 100);
    n1.scheduling = NodeScheduling::Draining;
    let mut n2 = node("n2", 100, 100);
    n2.scheduling = NodeScheduling::Cordoned;
    // Nowhere to go: nothing leaves.
    let stuck = input(
        vec![n1.clone(), n2.clone()],
        services.clone(),
        placed.clone(),
    );
    assert_eq!(schedule(&stuck), vec![]);
    n2.scheduling = NodeScheduling::Schedulable;
    let nodes = vec![n1, n2];
    // Wave 0 first: db's replacement (and n2's own every-node agent), nothing else.
    let first = schedule(&input(nodes.clone(), services.clone(), placed.clone()));
    assert_eq!(placed_on(&first), vec![("db", "n2"), ("agent", "n2")]);
    assert!(removed_ids(&first).is_empty());
    let mut world = apply_decisions(&placed, &first);
    assert_eq!(
        schedule(&input(nodes.clone(), services.clone(), world.clone())),
        vec![],
        "wave 1 waits until db has left n1"
    );
    let run_all = |world: &[SchedulerAllocation]| SchedulerInput {
        running: world.iter().map(|a| a.allocation_id.clone()).collect(),
        ..input(nodes.clone(), services.clone(), world.to_vec())
    };
    let second = schedule(&run_all(&world));
    assert_eq!(placed_on(&second), vec![]);
    assert_eq!(removed_ids(&second).len(), 1, "db's old copy: {second:?}");
    world = apply_decisions(&world, &second);
    // Then wave 1: api moves, the every-node agent on n1 stops.
    let third = schedule(&run_all(&world));
    assert_eq!(placed_on(&third), vec![("api", "n2")]);
    assert_eq!(removed_ids(&third).len(), 1, "the agent on n1: {third:?}");
    world = apply_decisions(&world, &third);
    let fourth = schedule(&run_all(&world));
    world = apply_decisions(&world, &fourth);
    assert!(world.iter().all(|a| a.node_id == "n2"), "{world:?}");
    assert_eq!(world.len(), 3);
    assert_eq!(schedule(&run_all(&world)), vec![]);
}

#[test]
fn a_node_back_with_less_memory_sheds_the_highest_wave_first() {
    let mut services = Vec::new();
    for (name, wave, memory_mib) in [("base", 0, 64), ("big", 1, 128), ("top", 2, 32)] {
        let mut spec = spec(name, 1, memory_mib, 0);
        spec.wave = wave;
        services.push(service(spec));
    }
    let placed = apply_decisions(
        &[],
        &schedule(&input(vec![node("n1", 256, 100)], services.clone(), vec![])),
    );
    assert_eq!(placed.len(), 3);
    let decisions = schedule(&input(
        vec![node("n1", 100, 100), node("n2", 1000, 100)],
        services,
        placed.clone(),
    ));
    let after = apply_decisions(&placed, &decisions);
    let on = |node: &str| {
        let mut names: Vec<&str> = after
            .iter()
            .filter(|a| a.node_id == node)
            .map(|a| a.service.as_str())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        on("n1"),
        vec!["base"],
        "top (wave 2) then big (wave 1) left"
    );
    assert_eq!(on("n2"), vec!["big", "top"], "and were placed again");
}

#[test]
fn placement_fields_alone_restart_nothing() {
    let (web, placed) = web_on_n1(|_| {});
    let mut changed = web.spec.clone();
    changed.reschedule_after_secs = Some(30);
    changed.selector.arch = vec!["x86_64".into()];
    assert_eq!(
        schedule(&input(
            vec![node("n1", 100, 100)],
            vec![service(changed)],
            placed
        )),
        vec![]
    );
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
    down.availability = NodeAvailability::Down { since_unix_ms: 0 };
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
    let nodes = proptest::collection::vec(
        (
            1u64..2048,
            0u32..4000,
            0u8..4,
            0u32..700,
            0u8..6,
            any::<bool>(),
        ),
        0..6,
    )
    .prop_map(|nodes| {
        nodes
            .into_iter()
            .enumerate()
            .map(
                |(i, (memory, cpu, state, down_secs_ago, scheduling, labeled))| SchedulerNode {
                    availability: match state {
                        0 => NodeAvailability::Down {
                            since_unix_ms: NOW_UNIX_MS - 1000 * u64::from(down_secs_ago),
                        },
                        1 => NodeAvailability::Revoked,
                        _ => NodeAvailability::Ready,
                    },
                    scheduling: match scheduling {
                        0 => NodeScheduling::Cordoned,
                        1 => NodeScheduling::Draining,
                        _ => NodeScheduling::Schedulable,
                    },
                    labels: if labeled {
                        [("site".to_string(), "north".to_string())].into()
                    } else {
                        BTreeMap::new()
                    },
                    ..node(&format!("n{i}"), memory, cpu)
                },
            )
            .collect::<Vec<_>>()
    });
    (nodes, arbitrary_services(0..4))
}

/// Services of every kind: counts and `replicas: all`, with and without a selector, each lost
/// node policy (`policies` picks from 0 s, 60 s, 300 s and never), in waves 0 to 2.
fn arbitrary_services(
    policies: std::ops::Range<u8>,
) -> impl Strategy<Value = Vec<SchedulerService>> {
    proptest::collection::vec(
        (
            0u32..6,
            0u64..700,
            0u32..2000,
            0u8..5,
            any::<bool>(),
            policies,
            0u32..3,
        ),
        0..5,
    )
    .prop_map(|services| {
        services
            .into_iter()
            .enumerate()
            .map(|(i, (replicas, memory, cpu, kind, north, policy, wave))| {
                let mut spec = spec(&format!("s{i}"), replicas, memory, cpu);
                if kind == 0 {
                    spec.replicas = Replicas::All;
                }
                if north {
                    select_site(&mut spec, "north");
                }
                match policy {
                    0 => spec.reschedule_after_secs = Some(0),
                    1 => spec.reschedule_after_secs = Some(60),
                    2 => spec.reschedule_after_secs = None,
                    _ => spec.reschedule = Reschedule::Never,
                }
                spec.wave = wave;
                service(spec)
            })
            .collect()
    })
}

/// Whether a copy on `node` keeps its slot, said plainly (the test's own oracle).
fn keeps(node: &SchedulerNode, service: &SchedulerService, now_unix_ms: u64) -> bool {
    let selected =
        node.org == service.org && service.spec.selector.matches(&node.labels, &node.arch);
    match node.availability {
        NodeAvailability::Revoked => false,
        NodeAvailability::Ready => selected && node.scheduling != NodeScheduling::Draining,
        NodeAvailability::Down { since_unix_ms } => {
            match (service.spec.replicas, service.spec.lost_node_policy()) {
                (Replicas::All, _) | (_, LostNodePolicy::Stay) => true,
                (Replicas::Count(_), LostNodePolicy::MoveAfterSecs(secs)) => {
                    now_unix_ms < since_unix_ms + u64::from(secs) * 1000
                }
            }
        }
    }
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
        if node.availability == NodeAvailability::Revoked {
            prop_assert!(allocations.iter().all(|a| a.node_id != node.node_id));
        }
    }
    for allocation in allocations {
        let service = services
            .iter()
            .find(|s| s.spec.name.as_str() == allocation.service);
        prop_assert!(
            service.is_some(),
            "{} has no service",
            allocation.allocation_id
        );
        if let Some(Replicas::Count(count)) = service.map(|s| s.spec.replicas) {
            prop_assert!(allocation.replica < count, "{allocation:?}");
        }
    }
    Ok(())
}

/// Checks one pass: new instances land only where they may, and never beside a copy that
/// keeps its slot.
fn check_decisions(world: &SchedulerInput, decisions: &[Decision]) -> Result<(), TestCaseError> {
    let removed: BTreeSet<&str> = removed_ids(decisions).into_iter().collect();
    for decision in decisions {
        let Decision::Place {
            allocation_id,
            service: name,
            node_id,
            replica,
            ..
        } = decision
        else {
            continue;
        };
        if world
            .allocations
            .iter()
            .any(|a| &a.allocation_id == allocation_id)
        {
            continue; // a spec update in place
        }
        let node = world.nodes.iter().find(|n| &n.node_id == node_id).unwrap();
        let service = world
            .services
            .iter()
            .find(|s| s.spec.name.as_str() == name)
            .unwrap();
        prop_assert!(
            node.availability == NodeAvailability::Ready
                && node.scheduling == NodeScheduling::Schedulable
                && keeps(node, service, world.now_unix_ms),
            "{decision:?} on {node:?}"
        );
        let slot_taken = world.allocations.iter().any(|a| {
            let same_slot = match service.spec.replicas {
                Replicas::Count(_) => a.replica == *replica,
                Replicas::All => a.node_id == *node_id,
            };
            let on = world.nodes.iter().find(|n| n.node_id == a.node_id);
            a.service == *name
                && same_slot
                && !removed.contains(a.allocation_id.as_str())
                && on.is_some_and(|n| keeps(n, service, world.now_unix_ms))
        });
        prop_assert!(
            !slot_taken,
            "{decision:?} beside a copy that keeps its slot"
        );
    }
    Ok(())
}

/// Whether every allocation is reported running after each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reports {
    NothingRuns,
    EverythingRuns,
}

/// Runs passes until the scheduler asks for nothing more, checking each; fails if it does not
/// settle.
fn settle(
    mut world: SchedulerInput,
    reports: Reports,
) -> Result<Vec<SchedulerAllocation>, TestCaseError> {
    for _ in 0..32 {
        if reports == Reports::EverythingRuns {
            world.running = world
                .allocations
                .iter()
                .map(|a| a.allocation_id.clone())
                .collect();
        }
        let decisions = schedule(&world);
        if decisions.is_empty() {
            return Ok(world.allocations);
        }
        check_decisions(&world, &decisions)?;
        world.allocations = apply_decisions(&world.allocations, &decisions);
        check_invariants(&world.nodes, &world.services, &world.allocations)?;
        world.id_nonce += 1;
    }
    Err(TestCaseError::fail(
        "the scheduler did not settle in 32 passes",
    ))
}

/// Counted replicas that have at least one copy.
fn held_replicas(
    services: &[SchedulerService],
    allocations: &[SchedulerAllocation],
) -> BTreeSet<(String, u32)> {
    allocations
        .iter()
        .filter(|a| {
            services
                .iter()
                .any(|s| s.spec.name.as_str() == a.service && s.spec.replicas != Replicas::All)
        })
        .map(|a| (a.service.clone(), a.replica))
        .collect()
}

proptest! {
    #[test]
    fn never_oversubscribes_memory_and_always_settles(
        (nodes, services) in arbitrary_world(),
        (later_nodes, later_services) in arbitrary_world(),
    ) {
        let placed = settle(input(nodes.clone(), services.clone(), vec![]), Reports::NothingRuns)?;
        check_invariants(&nodes, &services, &placed)?;
        // The world changes: nodes go down, get drained or relabeled, services change.
        let second = SchedulerInput { id_nonce: 100, ..input(later_nodes.clone(), later_services.clone(), placed.clone()) };
        let decisions = schedule(&second);
        check_decisions(&second, &decisions)?;
        let after = apply_decisions(&placed, &decisions);
        check_invariants(&later_nodes, &later_services, &after)?;
        // It settles whether or not the replacements run.
        settle(SchedulerInput { id_nonce: 200, ..input(later_nodes.clone(), later_services.clone(), after.clone()) }, Reports::NothingRuns)?;
        let settled = settle(SchedulerInput { id_nonce: 300, ..input(later_nodes.clone(), later_services.clone(), after) }, Reports::EverythingRuns)?;
        // Settled with everything running, every slot has one copy at most.
        let mut slots = BTreeSet::new();
        for allocation in &settled {
            let every_node = later_services.iter().any(|s| s.spec.name.as_str() == allocation.service && s.spec.replicas == Replicas::All);
            let slot = if every_node { (allocation.service.clone(), allocation.node_id.clone()) } else { (allocation.service.clone(), allocation.replica.to_string()) };
            prop_assert!(slots.insert(slot), "two copies of one slot: {settled:?}");
        }
    }

    #[test]
    fn a_moving_replica_is_never_left_without_a_copy(
        (nodes, services) in arbitrary_world(),
        changes in proptest::collection::vec((0u8..4, 0u32..700, 0u8..6, any::<bool>()), 6),
        reports_running in any::<bool>(),
    ) {
        // Nodes come and go, drain and change labels; none is revoked or shrinks, and the
        // services stay as they are.
        let nodes: Vec<SchedulerNode> = nodes
            .into_iter()
            .map(|n| SchedulerNode { availability: match n.availability { NodeAvailability::Revoked => NodeAvailability::Ready, other => other }, ..n })
            .collect();
        let placed = settle(input(nodes.clone(), services.clone(), vec![]), Reports::EverythingRuns)?;
        let later: Vec<SchedulerNode> = nodes
            .iter()
            .zip(&changes)
            .map(|(n, (state, down_secs_ago, scheduling, labeled))| SchedulerNode {
                availability: if *state == 0 { NodeAvailability::Down { since_unix_ms: NOW_UNIX_MS - 1000 * u64::from(*down_secs_ago) } } else { NodeAvailability::Ready },
                scheduling: match scheduling { 0 => NodeScheduling::Cordoned, 1 => NodeScheduling::Draining, _ => NodeScheduling::Schedulable },
                labels: if *labeled { [("site".to_string(), "north".to_string())].into() } else { BTreeMap::new() },
                ..n.clone()
            })
            .collect();
        let held = held_replicas(&services, &placed);
        let mut world = SchedulerInput { id_nonce: 100, ..input(later, services.clone(), placed) };
        for _ in 0..32 {
            if reports_running {
                world.running = world.allocations.iter().map(|a| a.allocation_id.clone()).collect();
            }
            let decisions = schedule(&world);
            if decisions.is_empty() {
                break;
            }
            check_decisions(&world, &decisions)?;
            world.allocations = apply_decisions(&world.allocations, &decisions);
            let now_held = held_replicas(&services, &world.allocations);
            prop_assert!(held.is_subset(&now_held), "a replica lost its last copy: {:?}", held.difference(&now_held).collect::<Vec<_>>());
            world.id_nonce += 1;
        }
    }

    #[test]
    fn a_node_down_within_every_grace_moves_nothing(
        (nodes, _) in arbitrary_world(),
        services in arbitrary_services(1..4),
        down in proptest::collection::vec((any::<bool>(), 0u64..60), 6),
    ) {
        let nodes: Vec<SchedulerNode> = nodes
            .into_iter()
            .map(|n| SchedulerNode { availability: NodeAvailability::Ready, ..n })
            .collect();
        let placed = settle(input(nodes.clone(), services.clone(), vec![]), Reports::EverythingRuns)?;
        let later: Vec<SchedulerNode> = nodes
            .iter()
            .zip(&down)
            .map(|(n, (is_down, secs_ago))| SchedulerNode {
                availability: if *is_down { NodeAvailability::Down { since_unix_ms: NOW_UNIX_MS - 1000 * secs_ago } } else { NodeAvailability::Ready },
                ..n.clone()
            })
            .collect();
        let world = SchedulerInput {
            running: placed.iter().map(|a| a.allocation_id.clone()).collect(),
            ..input(later, services, placed)
        };
        prop_assert_eq!(schedule(&world), vec![]);
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

#[test]
fn a_changed_rollout_policy_alone_restarts_nothing() {
    let old = spec("web", 2, 100, 100);
    let run = input(
        vec![node("n1", 1024, 1000), node("n2", 1024, 1000)],
        vec![service(old.clone())],
        vec![],
    );
    let placed = apply_decisions(&[], &schedule(&run));
    let mut new = old;
    new.rollout = Some(outpost_proto::rollout::RolloutPolicy {
        max_parallel: 1,
        health_deadline_secs: 30,
        auto_rollback: true,
    });
    let again = input(
        vec![node("n1", 1024, 1000), node("n2", 1024, 1000)],
        vec![service(new)],
        placed,
    );
    assert_eq!(schedule(&again), vec![]);
}

#[test]
fn a_rollout_gate_lets_only_admitted_instances_take_a_new_spec() {
    let nodes = || vec![node("n1", 1024, 1000), node("n2", 1024, 1000)];
    let old = spec("web", 2, 100, 100);
    let placed = apply_decisions(
        &[],
        &schedule(&input(nodes(), vec![service(old.clone())], vec![])),
    );
    let mut new = old;
    new.args = vec!["v2".into()];
    let admitted = placed[0].allocation_id.clone();
    let mut gated = service(new.clone());
    gated.rollout_gate = Some(BTreeSet::from([admitted.clone()]));
    let decisions = schedule(&input(nodes(), vec![gated], placed.clone()));
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert!(
        matches!(&decisions[0], Decision::Place { allocation_id, spec, .. } if *allocation_id == admitted && spec.args == vec!["v2".to_string()]),
        "{decisions:?}"
    );
    // Without a gate every instance takes it at once.
    let decisions = schedule(&input(nodes(), vec![service(new)], placed));
    assert_eq!(decisions.len(), 2, "{decisions:?}");
}

#[test]
fn two_orgs_services_of_one_name_are_two_services() {
    let mut acme_node = node("a1", 1024, 1000);
    acme_node.org = "acme".into();
    let ours = service(spec("web", 2, 100, 0));
    let theirs = SchedulerService {
        rollout_gate: None,
        org: "acme".into(),
        spec: spec("web", 1, 100, 0),
    };
    let run = input(
        vec![node("n1", 1024, 1000), acme_node],
        vec![ours, theirs.clone()],
        vec![],
    );
    let placed = apply_decisions(&[], &schedule(&run));
    let mut on: Vec<(&str, &str, u32)> = placed
        .iter()
        .map(|a| (a.org.as_str(), a.node_id.as_str(), a.replica))
        .collect();
    on.sort();
    assert_eq!(
        on,
        vec![
            ("acme", "a1", 0),
            ("default", "n1", 0),
            ("default", "n1", 1)
        ]
    );
    let ids: BTreeSet<&str> = placed.iter().map(|a| a.allocation_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "allocation ids are unique across orgs");
    // Deleting the default org's `web` removes only its own instances.
    let mut run = run;
    run.services = vec![theirs];
    run.allocations = placed;
    let decisions = schedule(&run);
    let removed: Vec<&str> = decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Remove { node_id, .. } => Some(node_id.as_str()),
            Decision::Place { .. } => None,
        })
        .collect();
    assert_eq!(removed, vec!["n1", "n1"]);
}
