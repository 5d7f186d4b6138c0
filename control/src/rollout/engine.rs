//! The rollout engine (R3), pure: given a policy, the batches started so far and the units
//! being replaced (instances of a service; another caller may pass nodes or anything else with
//! a readiness signal), it says the next step — wait, start a batch, complete, or halt. No
//! clock and no I/O: the caller passes `now_unix_ms` and turns the step into events.
//!
//! Rules: a batch is at most `max_parallel` units not yet updated and not yet admitted, units
//! on available nodes first, then by id. The next batch starts only when every member of the
//! current batch that still exists is updated and ready. A member that failed for good halts at
//! once; a batch not ready `health_deadline_secs` after it started halts at the deadline. When
//! no unit is left to update, the rollout is complete.

use std::collections::BTreeSet;

use outpost_proto::rollout::RolloutPolicy;
use serde::{Deserialize, Serialize};

/// How a unit's new version is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not (yet) known ready: being placed, starting, waiting for readiness, backing off. The
    /// text says what was last reported.
    Waiting(String),
    Ready,
    /// Will not become ready without a new release (e.g. failed to start and not restarted).
    Failed(String),
}

/// One thing a rollout replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub id: String,
    /// Where it runs, for messages.
    pub node_id: String,
    /// Whether it already runs the rollout's target.
    pub updated: bool,
    /// Health of the target version; meaningful only when `updated`.
    pub health: Health,
    /// Whether its node is up (units on down nodes go last).
    pub available: bool,
}

/// A started batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// 1-based.
    pub number: u32,
    pub members: Vec<String>,
    pub started_unix_ms: u64,
}

/// What the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to decide before `until_unix_ms` (the current batch's deadline), or before the
    /// next report when `None`.
    Wait {
        until_unix_ms: Option<u64>,
    },
    StartBatch {
        number: u32,
        members: Vec<String>,
    },
    Complete,
    Halt {
        batch: u32,
        reason: String,
    },
}

/// Every unit admitted by the batches so far.
pub fn admitted(batches: &[Batch]) -> BTreeSet<&str> {
    batches
        .iter()
        .flat_map(|b| b.members.iter().map(String::as_str))
        .collect()
}

/// The deadline of a batch under `policy`.
pub fn deadline_unix_ms(policy: &RolloutPolicy, batch: &Batch) -> u64 {
    batch
        .started_unix_ms
        .saturating_add(u64::from(policy.health_deadline_secs) * 1000)
}

/// The next step (see module docs).
pub fn next_step(
    policy: &RolloutPolicy,
    batches: &[Batch],
    units: &[Unit],
    now_unix_ms: u64,
) -> Step {
    if let Some(batch) = batches.last() {
        let members: Vec<&Unit> = units
            .iter()
            .filter(|u| batch.members.contains(&u.id))
            .collect();
        let failed: Vec<String> = members
            .iter()
            .filter_map(|u| match (&u.health, u.updated) {
                (Health::Failed(why), true) => {
                    Some(format!("{} on node {}: {why}", u.id, u.node_id))
                }
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            return Step::Halt {
                batch: batch.number,
                reason: format!("batch {} failed: {}", batch.number, failed.join("; ")),
            };
        }
        let not_ready: Vec<String> = members
            .iter()
            .filter(|u| !(u.updated && u.health == Health::Ready))
            .map(|u| match (&u.health, u.updated) {
                (_, false) => format!("{} on node {} (not yet placed)", u.id, u.node_id),
                (Health::Waiting(why), true) if !why.is_empty() => {
                    format!("{} on node {} ({why})", u.id, u.node_id)
                }
                _ => format!("{} on node {}", u.id, u.node_id),
            })
            .collect();
        if !not_ready.is_empty() {
            let deadline = deadline_unix_ms(policy, batch);
            if now_unix_ms >= deadline {
                return Step::Halt {
                    batch: batch.number,
                    reason: format!(
                        "batch {}: {} of {} new instances not ready within health_deadline_secs {}: {}",
                        batch.number,
                        not_ready.len(),
                        members.len(),
                        policy.health_deadline_secs,
                        not_ready.join("; ")
                    ),
                };
            }
            return Step::Wait {
                until_unix_ms: Some(deadline),
            };
        }
    }
    let admitted = admitted(batches);
    let mut todo: Vec<&Unit> = units
        .iter()
        .filter(|u| !u.updated && !admitted.contains(u.id.as_str()))
        .collect();
    if todo.is_empty() {
        // Admitted earlier but not updated yet: the scheduler has not caught up.
        if units.iter().any(|u| !u.updated) {
            return Step::Wait {
                until_unix_ms: None,
            };
        }
        return Step::Complete;
    }
    todo.sort_by(|a, b| (!a.available, &a.id).cmp(&(!b.available, &b.id)));
    Step::StartBatch {
        number: batches.last().map_or(1, |b| b.number + 1),
        members: todo
            .into_iter()
            .take(policy.max_parallel as usize)
            .map(|u| u.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(max_parallel: u32) -> RolloutPolicy {
        RolloutPolicy {
            max_parallel,
            health_deadline_secs: 10,
            auto_rollback: true,
        }
    }

    fn unit(id: &str, updated: bool, health: Health) -> Unit {
        Unit {
            id: id.into(),
            node_id: format!("n-{id}"),
            updated,
            health,
            available: true,
        }
    }

    fn batch(number: u32, members: &[&str], started_unix_ms: u64) -> Batch {
        Batch {
            number,
            members: members.iter().map(|m| m.to_string()).collect(),
            started_unix_ms,
        }
    }

    #[test]
    fn batches_of_max_parallel_then_complete() {
        let waiting = || Health::Waiting(String::new());
        let units = vec![
            unit("a", false, waiting()),
            unit("b", false, waiting()),
            unit("c", false, waiting()),
        ];
        assert_eq!(
            next_step(&policy(2), &[], &units, 0),
            Step::StartBatch {
                number: 1,
                members: vec!["a".into(), "b".into()]
            }
        );
        let first = [batch(1, &["a", "b"], 0)];
        // Not placed yet: wait for the deadline.
        assert_eq!(
            next_step(&policy(2), &first, &units, 5),
            Step::Wait {
                until_unix_ms: Some(10_000)
            }
        );
        let units = vec![
            unit("a", true, Health::Ready),
            unit("b", true, Health::Ready),
            unit("c", false, waiting()),
        ];
        assert_eq!(
            next_step(&policy(2), &first, &units, 5),
            Step::StartBatch {
                number: 2,
                members: vec!["c".into()]
            }
        );
        let both = [batch(1, &["a", "b"], 0), batch(2, &["c"], 6)];
        let done = vec![
            unit("a", true, Health::Ready),
            unit("b", true, Health::Ready),
            unit("c", true, Health::Ready),
        ];
        assert_eq!(next_step(&policy(2), &both, &done, 7), Step::Complete);
    }

    #[test]
    fn a_batch_halts_at_its_deadline_or_at_once_on_failure() {
        let first = [batch(1, &["a"], 1_000)];
        let units = vec![
            unit("a", true, Health::Waiting("unready: probe refused".into())),
            unit("b", false, Health::Waiting(String::new())),
        ];
        assert!(matches!(
            next_step(&policy(1), &first, &units, 10_999),
            Step::Wait { .. }
        ));
        let Step::Halt { batch, reason } = next_step(&policy(1), &first, &units, 11_000) else {
            panic!("expected a halt");
        };
        assert_eq!(batch, 1);
        assert!(
            reason.contains("a on node n-a (unready: probe refused)"),
            "{reason}"
        );
        assert!(reason.contains("health_deadline_secs 10"), "{reason}");
        let failed = vec![unit("a", true, Health::Failed("exited 1".into()))];
        assert!(matches!(
            next_step(&policy(1), &first, &failed, 1_001),
            Step::Halt { batch: 1, .. }
        ));
    }

    #[test]
    fn units_on_down_nodes_go_last() {
        let mut down = unit("a", false, Health::Waiting(String::new()));
        down.available = false;
        let units = vec![down, unit("b", false, Health::Waiting(String::new()))];
        assert_eq!(
            next_step(&policy(1), &[], &units, 0),
            Step::StartBatch {
                number: 1,
                members: vec!["b".into()]
            }
        );
    }

    proptest! {
        /// Driving the engine with units that become ready as soon as they are admitted
        /// completes in ceil(n / max_parallel) batches, each of at most max_parallel units, and
        /// never admits a unit twice.
        #[test]
        fn healthy_rollouts_complete_in_bounded_batches(n in 0usize..40, max_parallel in 1u32..8) {
            let mut units: Vec<Unit> = (0..n)
                .map(|i| unit(&format!("u{i:02}"), false, Health::Waiting(String::new())))
                .collect();
            let mut batches: Vec<Batch> = Vec::new();
            for round in 0..100u64 {
                match next_step(&policy(max_parallel), &batches, &units, round) {
                    Step::StartBatch { number, members } => {
                        prop_assert!(members.len() <= max_parallel as usize && !members.is_empty());
                        let seen = admitted(&batches);
                        prop_assert!(members.iter().all(|m| !seen.contains(m.as_str())));
                        for unit in units.iter_mut().filter(|u| members.contains(&u.id)) {
                            unit.updated = true;
                            unit.health = Health::Ready;
                        }
                        batches.push(Batch { number, members, started_unix_ms: round });
                    }
                    Step::Complete => break,
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            }
            prop_assert!(units.iter().all(|u| u.updated));
            prop_assert_eq!(batches.len(), n.div_ceil(max_parallel as usize));
        }
    }
}
