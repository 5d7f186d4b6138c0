//! The pure plan diff: desired allocations against what runs → start, stop and restart actions,
//! wave by wave (B2). No clocks, no processes: the supervisor feeds it observations.

use std::collections::BTreeMap;

/// One allocation the plan wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub id: String,
    pub wave: u32,
    pub spec_hash: String,
    /// May a process be started for it now? False while it backs off or after its restart policy
    /// gave up.
    pub may_start: MayStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MayStart {
    Now,
    Later,
}

/// A live process of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub spec_hash: String,
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running, readiness not passed yet.
    Starting,
    /// Running and ready.
    Ready,
    /// Running, readiness did not pass before its timeout.
    Unready,
    /// Asked to stop, not gone yet.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Start a process for an allocation that has none.
    Start { id: String },
    /// Stop a process whose allocation left the plan.
    Stop { id: String },
    /// Stop a process whose spec changed; it starts again once gone and its wave is open.
    Restart { id: String },
}

/// The actions, plus which allocations wait for an earlier wave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    pub actions: Vec<Action>,
    /// Allocations without a process that wait for an earlier wave to be ready.
    pub held_by_wave: Vec<String>,
    /// The first wave that is not fully ready, if any.
    pub blocking_wave: Option<u32>,
}

/// Computes what to do. Rules:
/// - a process whose allocation left the plan is stopped;
/// - a process whose spec hash differs from the plan's is restarted (stopped first);
/// - an allocation without a process starts when it may, and only if every allocation of every
///   earlier wave runs the desired spec and is ready.
pub fn diff(desired: &[Desired], observed: &BTreeMap<String, Observed>) -> Diff {
    let mut out = Diff::default();
    let wanted: BTreeMap<&str, &Desired> = desired.iter().map(|d| (d.id.as_str(), d)).collect();
    for (id, process) in observed {
        if process.phase == Phase::Stopping {
            continue;
        }
        match wanted.get(id.as_str()) {
            None => out.actions.push(Action::Stop { id: id.clone() }),
            Some(want) if want.spec_hash != process.spec_hash => {
                out.actions.push(Action::Restart { id: id.clone() })
            }
            Some(_) => {}
        }
    }
    let is_ready = |d: &Desired| {
        observed
            .get(&d.id)
            .is_some_and(|o| o.phase == Phase::Ready && o.spec_hash == d.spec_hash)
    };
    out.blocking_wave = desired
        .iter()
        .filter(|d| !is_ready(d))
        .map(|d| d.wave)
        .min();
    for want in desired {
        if observed.contains_key(&want.id) {
            continue;
        }
        let gate_open = out
            .blocking_wave
            .is_none_or(|blocking| want.wave <= blocking);
        if !gate_open {
            out.held_by_wave.push(want.id.clone());
        } else if want.may_start == MayStart::Now {
            out.actions.push(Action::Start {
                id: want.id.clone(),
            });
        }
    }
    out.actions.sort();
    out.held_by_wave.sort();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn want(id: &str, wave: u32) -> Desired {
        Desired {
            id: id.into(),
            wave,
            spec_hash: "h1".into(),
            may_start: MayStart::Now,
        }
    }

    fn seen(hash: &str, phase: Phase) -> Observed {
        Observed {
            spec_hash: hash.into(),
            phase,
        }
    }

    #[test]
    fn first_wave_starts_alone() {
        let result = diff(&[want("db", 0), want("web", 1)], &BTreeMap::new());
        assert_eq!(result.actions, vec![Action::Start { id: "db".into() }]);
        assert_eq!(result.held_by_wave, vec!["web".to_string()]);
        assert_eq!(result.blocking_wave, Some(0));
    }

    #[test]
    fn next_wave_starts_once_the_first_is_ready() {
        let mut observed = BTreeMap::new();
        observed.insert("db".to_string(), seen("h1", Phase::Starting));
        assert!(
            diff(&[want("db", 0), want("web", 1)], &observed)
                .actions
                .is_empty()
        );
        observed.insert("db".to_string(), seen("h1", Phase::Ready));
        assert_eq!(
            diff(&[want("db", 0), want("web", 1)], &observed).actions,
            vec![Action::Start { id: "web".into() }]
        );
    }

    #[test]
    fn unready_wave_holds_later_waves() {
        let mut observed = BTreeMap::new();
        observed.insert("db".to_string(), seen("h1", Phase::Unready));
        let result = diff(&[want("db", 0), want("web", 1), want("edge", 2)], &observed);
        assert!(result.actions.is_empty());
        assert_eq!(
            result.held_by_wave,
            vec!["edge".to_string(), "web".to_string()]
        );
    }

    #[test]
    fn removed_are_stopped_and_changed_are_restarted() {
        let mut observed = BTreeMap::new();
        observed.insert("old".to_string(), seen("h1", Phase::Ready));
        observed.insert("web".to_string(), seen("h0", Phase::Ready));
        observed.insert("going".to_string(), seen("h1", Phase::Stopping));
        let result = diff(&[want("web", 0)], &observed);
        assert_eq!(
            result.actions,
            vec![
                Action::Stop { id: "old".into() },
                Action::Restart { id: "web".into() }
            ]
        );
    }

    #[test]
    fn backing_off_allocation_is_not_started() {
        let mut backing_off = want("web", 0);
        backing_off.may_start = MayStart::Later;
        assert!(diff(&[backing_off], &BTreeMap::new()).actions.is_empty());
    }

    fn phase() -> impl Strategy<Value = Phase> {
        prop_oneof![
            Just(Phase::Starting),
            Just(Phase::Ready),
            Just(Phase::Unready),
            Just(Phase::Stopping)
        ]
    }

    proptest! {
        #[test]
        fn diff_invariants(
            wanted in proptest::collection::btree_map(0u8..12, (0u32..4, 0u8..2, any::<bool>()), 0..12),
            running in proptest::collection::btree_map(0u8..12, (0u8..2, phase()), 0..12),
        ) {
            let desired: Vec<Desired> = wanted.iter().map(|(id, (wave, hash, now))| Desired {
                id: format!("a{id}"), wave: *wave, spec_hash: format!("h{hash}"),
                may_start: if *now { MayStart::Now } else { MayStart::Later },
            }).collect();
            let observed: BTreeMap<String, Observed> = running.iter()
                .map(|(id, (hash, phase))| (format!("a{id}"), Observed { spec_hash: format!("h{hash}"), phase: *phase }))
                .collect();
            let result = diff(&desired, &observed);
            let by_id: BTreeMap<&str, &Desired> = desired.iter().map(|d| (d.id.as_str(), d)).collect();
            let mut touched = std::collections::BTreeSet::new();
            for action in &result.actions {
                let id = match action { Action::Start { id } | Action::Stop { id } | Action::Restart { id } => id };
                // At most one action per allocation.
                prop_assert!(touched.insert(id.clone()));
                match action {
                    Action::Start { id } => {
                        let want = by_id[id.as_str()];
                        prop_assert!(!observed.contains_key(id));
                        prop_assert_eq!(want.may_start, MayStart::Now);
                        // Every allocation of an earlier wave runs the desired spec and is ready.
                        for earlier in desired.iter().filter(|d| d.wave < want.wave) {
                            let o = observed.get(&earlier.id);
                            let ready = o.is_some_and(|o| o.phase == Phase::Ready && o.spec_hash == earlier.spec_hash);
                            prop_assert!(ready, "earlier wave not ready");
                        }
                    }
                    Action::Stop { id } => {
                        prop_assert!(!by_id.contains_key(id.as_str()));
                        prop_assert!(observed[id].phase != Phase::Stopping);
                    }
                    Action::Restart { id } => {
                        prop_assert!(observed[id].spec_hash != by_id[id.as_str()].spec_hash);
                        prop_assert!(observed[id].phase != Phase::Stopping);
                    }
                }
            }
            // Every live process that left the plan is being stopped.
            for (id, o) in &observed {
                if !by_id.contains_key(id.as_str()) && o.phase != Phase::Stopping {
                    let stop = Action::Stop { id: id.clone() };
                    prop_assert!(result.actions.contains(&stop), "missing stop");
                }
            }
        }

        #[test]
        fn converged_state_needs_no_action(waves in proptest::collection::vec(0u32..4, 0..10)) {
            let desired: Vec<Desired> = waves.iter().enumerate().map(|(i, w)| want(&format!("a{i}"), *w)).collect();
            let observed: BTreeMap<String, Observed> =
                desired.iter().map(|d| (d.id.clone(), seen("h1", Phase::Ready))).collect();
            let result = diff(&desired, &observed);
            prop_assert!(result.actions.is_empty());
            prop_assert_eq!(result.blocking_wave, None);
        }
    }
}
