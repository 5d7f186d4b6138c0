//! Taking a new plan (P8, O2, R4): written as candidate with its checksum, read back and
//! verified (checksum, decode, validation, invariants), applied, and promoted to last-good (the
//! boot fallback) only once it is healthy, with the cursor saved in the same redb transaction.
//! A plan whose instances are all unchanged from the last-good plan is promoted when applied;
//! otherwise it waits on probation until each new instance passed its readiness check, or, with
//! no check, stayed up `--healthy-after-secs` (default 10 s, Nomad's `min_healthy_time`
//! default; 0 counts such an instance healthy once applied); a release that crashes on start
//! never becomes last-good. A plan that fails verification or apply leaves the running plan and the error in
//! status.

use std::path::Path;
use std::time::Instant;

use outpost_proto::bootstrap::{BootstrapEvent, BootstrapStepStatus};
use outpost_proto::plan::Plan;
use outpost_proto::validate::Validate;

use super::SyncParts;
use crate::node::PlanState;
use crate::status::StatusBoard;
use crate::store::{ApplyOutcome, COMPONENT_ALLOCATIONS, ComponentApply, Store, last_good};

/// Starts the note status shows while the applied plan is on probation.
const PROBATION_NOTE: &str = "plan on probation";

/// An applied plan that is not last-good yet: its generation and the allocations that are new
/// or changed against the last-good plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probation {
    pub generation: String,
    pub new: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanRejected {
    #[error("plan is for node {plan_node}, this node is {node}")]
    WrongNode { plan_node: String, node: String },
    #[error("plan is invalid: {0}")]
    Invalid(String),
    #[error("candidate plan did not verify: {0}")]
    Candidate(String),
    #[error("plan generation {generation} failed to apply, keeping the last-good plan: {reason}")]
    Apply { generation: String, reason: String },
    #[error("plan applied but could not be promoted: {0}")]
    Promote(String),
    #[error("plan not applied, the running release stays: {0}")]
    Artifact(String),
}

/// What happened to an accepted plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Same generation: only the cursor moved.
    CursorOnly,
    /// A new generation was applied and promoted.
    Applied,
}

fn short(generation: &str) -> &str {
    generation.get(..12).unwrap_or(generation)
}

/// Verifies, applies and promotes `plan` (see module docs).
pub fn accept_plan(agent: &SyncParts, plan: Plan) -> Result<Accepted, PlanRejected> {
    let result = accept(agent, plan);
    if let Err(error) = &result {
        agent
            .board
            .update(|s| s.last_plan_error = Some(error.to_string()));
    }
    result
}

fn accept(agent: &SyncParts, plan: Plan) -> Result<Accepted, PlanRejected> {
    let node = agent.node.node_id();
    if plan.node_id.as_str() != node {
        return Err(PlanRejected::WrongNode {
            plan_node: plan.node_id.to_string(),
            node,
        });
    }
    plan.validate()
        .map_err(|e| PlanRejected::Invalid(e.to_string()))?;
    agent
        .store
        .write_candidate(&plan)
        .map_err(|e| PlanRejected::Candidate(e.to_string()))?;
    let candidate = match agent.store.read_candidate() {
        Ok(candidate) if candidate == plan => candidate,
        Ok(_) => {
            return Err(discard(
                agent,
                PlanRejected::Candidate("read back differs from what was written".into()),
            ));
        }
        Err(error) => return Err(discard(agent, PlanRejected::Candidate(error.to_string()))),
    };
    // R1: everything the plan runs from is fetched and verified before anything changes.
    if let Err(error) = crate::sync::artifacts::ensure_for_plan(&agent.artifacts, &candidate) {
        return Err(discard(agent, PlanRejected::Artifact(error.to_string())));
    }
    let generation = candidate.generation();
    let previous = agent.plan.current_plan();
    let changed = previous.generation() != generation || !agent.plan.has_plan();
    if changed {
        let applied = agent
            .workloads
            .supervisor()
            .apply(&candidate, Instant::now());
        if let Err(error) = applied {
            // Back to the last-good plan: stop what the rejected plan started.
            let _ = agent
                .workloads
                .supervisor()
                .apply(&previous, Instant::now());
            let rejected = PlanRejected::Apply {
                generation: short(&generation).to_string(),
                reason: error.to_string(),
            };
            record_event(
                agent,
                BootstrapStepStatus::Error,
                &generation,
                &rejected.to_string(),
            );
            let _ = agent.store.record_component(
                COMPONENT_ALLOCATIONS,
                &ComponentApply {
                    generation: generation.clone(),
                    status: ApplyOutcome::Error,
                    message: rejected.to_string(),
                    at_unix: crate::os::unix_now_secs(),
                },
            );
            return Err(discard(agent, rejected));
        }
    }
    let apply = ComponentApply {
        generation: generation.clone(),
        status: ApplyOutcome::Ok,
        message: format!("{} allocations", candidate.allocations.len()),
        at_unix: crate::os::unix_now_secs(),
    };
    // R4: what is new against the last-good plan must prove healthy first.
    let last_good = agent.store.state().ok().and_then(|s| s.last_good);
    let checks_up = agent.config.healthy_after_secs > 0;
    let new: Vec<String> = candidate
        .allocations
        .iter()
        .filter(|a| {
            (checks_up || a.spec.readiness.is_some())
                && !last_good
                    .iter()
                    .flat_map(|p| &p.allocations)
                    .any(|old| old == *a)
        })
        .map(|a| a.id.to_string())
        .collect();
    if new.is_empty() {
        agent
            .store
            .promote_candidate(&apply)
            .map_err(|e| PlanRejected::Promote(e.to_string()))?;
        *agent.plan.probation() = None;
        now_last_good(&agent.board, &agent.config.data_dir, &candidate);
    } else {
        agent
            .store
            .hold_candidate(&apply)
            .map_err(|e| PlanRejected::Promote(e.to_string()))?;
        *agent.plan.probation() = Some(Probation {
            generation: generation.clone(),
            new,
        });
    }
    agent.plan.settle_plan(&candidate, "control");
    agent.board.update(|s| {
        s.components
            .insert(COMPONENT_ALLOCATIONS.into(), apply.clone());
        s.last_plan_error = None;
    });
    if changed {
        record_event(agent, BootstrapStepStatus::Ok, &generation, &apply.message);
        Ok(Accepted::Applied)
    } else {
        Ok(Accepted::CursorOnly)
    }
}

/// Records `plan` as last-good in status and writes its copy beside the store.
fn now_last_good(board: &StatusBoard, data_dir: &Path, plan: &Plan) {
    let copy_error = last_good::write(data_dir, plan).err();
    tracing::info!(
        component = "sync",
        action = "last_good",
        generation = %plan.generation(),
        "plan is last-good: {} allocation(s)",
        plan.allocations.len()
    );
    board.update(|s| {
        s.last_good = Some(plan.generation());
        s.notes.retain(|n| {
            !n.starts_with("cannot write last-good copy") && !n.starts_with(PROBATION_NOTE)
        });
        if let Some(error) = &copy_error {
            s.note(format!("cannot write last-good copy: {error}"));
        }
    });
}

/// What the supervision round checks: the plan on probation and its new allocations.
pub fn on_probation(plan: &PlanState) -> Option<Probation> {
    plan.probation().clone()
}

/// After a supervision round judged the plan `checked` (`healthy`: see
/// `Supervisor::healthy`): promotes it to last-good, or says in status what it waits for.
pub fn settle_probation(
    plan: &PlanState,
    store: &Store,
    board: &StatusBoard,
    data_dir: &Path,
    checked: &Probation,
    healthy: Result<(), String>,
) {
    let mut probation = plan.probation();
    if probation.as_ref() != Some(checked) {
        return;
    }
    let short = short(&checked.generation);
    let waiting = match healthy {
        Ok(()) => match store.promote_probation(&checked.generation) {
            Ok(Some(promoted)) => {
                *probation = None;
                now_last_good(board, data_dir, &promoted);
                return;
            }
            Ok(None) => "it is no longer in the store".to_string(),
            Err(error) => format!("cannot promote it: {error}"),
        },
        Err(why) => why,
    };
    let note = format!("{PROBATION_NOTE}: generation {short} is not last-good yet: {waiting}");
    board.update(|s| {
        if !s.notes.contains(&note) {
            tracing::info!(
                component = "sync",
                action = "probation",
                generation = %short,
                "{note}"
            );
            s.notes.retain(|n| !n.starts_with(PROBATION_NOTE));
            s.note(note);
        }
    });
}

fn discard(agent: &SyncParts, error: PlanRejected) -> PlanRejected {
    let _ = agent.store.discard_candidate();
    error
}

/// Queues a bootstrap event for control (C9) in the bounded outbox.
pub fn record_event(
    agent: &SyncParts,
    status: BootstrapStepStatus,
    generation: &str,
    message: &str,
) {
    let Ok(node_id) = outpost_proto::name::name("node_id", &agent.node.node_id()) else {
        return;
    };
    let event = BootstrapEvent {
        node_id,
        component: COMPONENT_ALLOCATIONS.into(),
        action: "apply".into(),
        status,
        message: Some(outpost_proto::validate::shorten(message)),
        generation: Some(generation.to_string()),
    };
    let _ = agent.store.push_outbox(&event);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::apply::process::Supervisor;
    use crate::apply::process::runtime::ExitReason;
    use crate::apply::process::runtime::recording::{Call, RecordingSyscalls};
    use crate::boot::agent_for_test;
    use crate::config::{AgentConfig, Settings};
    use crate::store::Store;
    use crate::store::tests::{sample_allocation, sample_plan};
    use std::sync::Arc;
    use std::time::Duration;

    struct Fixture {
        _dir: tempfile::TempDir,
        data_dir: std::path::PathBuf,
        kernel: RecordingSyscalls,
        agent: SyncParts,
    }

    fn fixture(running: Option<Plan>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_path_buf();
        let mut settings = Settings::new();
        settings.insert("data_dir".into(), data_dir.display().to_string());
        settings.insert("node_id".into(), "n1".into());
        let config = AgentConfig::from_settings(&settings).unwrap();
        let (store, _) = Store::open_for_boot(&data_dir).unwrap();
        let store = Arc::new(store);
        let kernel = RecordingSyscalls::default();
        let supervisor = Supervisor::new(
            "n1",
            data_dir.clone(),
            Box::new(kernel.clone()),
            Box::new(store.clone()),
        );
        let agent = agent_for_test(config, store, supervisor, running).sync_parts();
        Fixture {
            _dir: dir,
            data_dir,
            kernel,
            agent,
        }
    }

    fn spawned(kernel: &RecordingSyscalls) -> usize {
        kernel
            .kernel()
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Spawn { .. }))
            .count()
    }

    /// One supervision round's probation check, as the supervisor thread does it, with
    /// instances counted healthy after `healthy_after`.
    fn supervise(f: &Fixture, healthy_after: Duration) {
        let Some(checked) = on_probation(&f.agent.plan) else {
            return;
        };
        let healthy = {
            let mut supervisor = f.agent.workloads.supervisor();
            supervisor.tick(Instant::now());
            supervisor.healthy(&checked.new, healthy_after, Instant::now())
        };
        settle_probation(
            &f.agent.plan,
            &f.agent.store,
            &f.agent.board,
            &f.data_dir,
            &checked,
            healthy,
        );
    }

    #[test]
    fn new_plan_is_applied_then_promoted_with_its_cursor_and_copy() {
        let f = fixture(None);
        let plan = sample_plan(2);
        assert_eq!(accept_plan(&f.agent, plan.clone()), Ok(Accepted::Applied));
        assert_eq!(spawned(&f.kernel), 2);
        // R4: applied, but not last-good until its new instances have been up long enough.
        let state = f.agent.store.state().unwrap();
        assert_eq!(state.last_good, None);
        assert_eq!(state.probation, Some(plan.generation()));
        assert_eq!(last_good::read(&f.data_dir).unwrap(), None);
        supervise(&f, Duration::from_secs(3600));
        assert_eq!(f.agent.store.state().unwrap().last_good, None);
        let notes = f.agent.board.snapshot().notes;
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(PROBATION_NOTE) && n.contains("up 0 s of 3600 s")),
            "{notes:?}"
        );
        supervise(&f, Duration::ZERO);
        let state = f.agent.store.state().unwrap();
        assert_eq!(state.probation, None);
        assert!(
            !f.agent
                .board
                .snapshot()
                .notes
                .iter()
                .any(|n| n.starts_with(PROBATION_NOTE))
        );
        assert_eq!(f.agent.board.snapshot().last_good, Some(plan.generation()));
        assert_eq!(state.last_good, Some(plan.clone()));
        assert_eq!(state.cursor, Some(plan.as_of));
        assert!(!state.has_candidate);
        assert_eq!(state.outbox_len, 1, "an apply event waits for control");
        assert_eq!(last_good::read(&f.data_dir).unwrap(), Some(plan.clone()));
        assert_eq!(
            f.agent.board.snapshot().cursor,
            Some(plan.as_of.to_string())
        );
        // The same plan again (an at-least-once redelivery) changes nothing.
        assert_eq!(accept_plan(&f.agent, plan), Ok(Accepted::CursorOnly));
        assert_eq!(spawned(&f.kernel), 2);
    }

    #[test]
    fn moved_cursor_alone_is_promoted_without_touching_processes() {
        let f = fixture(None);
        let plan = sample_plan(1);
        accept_plan(&f.agent, plan.clone()).unwrap();
        supervise(&f, Duration::ZERO);
        let mut later = plan.clone();
        later.as_of.event_id += 5;
        assert_eq!(
            accept_plan(&f.agent, later.clone()),
            Ok(Accepted::CursorOnly)
        );
        assert_eq!(spawned(&f.kernel), 1);
        assert_eq!(f.agent.store.state().unwrap().cursor, Some(later.as_of));
    }

    #[test]
    fn a_plan_whose_new_instance_keeps_crashing_never_becomes_last_good() {
        let f = fixture(None);
        let good = sample_plan(1);
        accept_plan(&f.agent, good.clone()).unwrap();
        supervise(&f, Duration::ZERO);
        let mut crashing = good.clone();
        crashing.as_of.event_id += 1;
        crashing.allocations[0].spec.args = vec!["crash".into()];
        assert_eq!(
            accept_plan(&f.agent, crashing.clone()),
            Ok(Accepted::Applied)
        );
        // Its process exits at once, again and again: never up, never promoted.
        let id = crashing.allocations[0].id.to_string();
        for _ in 0..3 {
            let pid = f.kernel.pid_of(&id).unwrap();
            f.kernel.exit(pid, ExitReason::Code(1));
            supervise(&f, Duration::from_secs(60));
            let notes = f.agent.board.snapshot().notes;
            assert!(
                notes
                    .iter()
                    .any(|n| n.starts_with(PROBATION_NOTE) && n.contains(&id)),
                "{notes:?}"
            );
        }
        let state = f.agent.store.state().unwrap();
        assert_eq!(state.last_good, Some(good.clone()));
        assert_eq!(state.probation, Some(crashing.generation()));
        assert_eq!(last_good::read(&f.data_dir).unwrap(), Some(good.clone()));
        assert_eq!(f.agent.board.snapshot().last_good, Some(good.generation()));
        // The cursor stays with the last-good plan, so a reboot asks control for the rest again.
        assert_eq!(state.cursor, Some(good.as_of));
    }

    #[test]
    fn failed_apply_keeps_the_last_good_plan_and_says_why() {
        let f = fixture(None);
        let good = sample_plan(1);
        accept_plan(&f.agent, good.clone()).unwrap();
        supervise(&f, Duration::ZERO);
        f.kernel.kernel().missing_programs.push("/nope".into());
        let mut bad = good.clone();
        bad.as_of.event_id += 1;
        let mut broken = sample_allocation("broken", 0);
        broken.spec.command = "/nope".into();
        bad.allocations.insert(0, broken);
        let error = accept_plan(&f.agent, bad).unwrap_err();
        assert!(matches!(error, PlanRejected::Apply { .. }), "{error}");
        let state = f.agent.store.state().unwrap();
        assert_eq!(state.last_good, Some(good.clone()));
        assert_eq!(
            state.cursor,
            Some(good.as_of),
            "the cursor does not move past a refused plan"
        );
        assert!(!state.has_candidate);
        assert_eq!(
            state.components[COMPONENT_ALLOCATIONS].status,
            ApplyOutcome::Error
        );
        assert!(
            f.agent
                .board
                .snapshot()
                .last_plan_error
                .unwrap()
                .contains("broken")
        );
        assert_eq!(f.agent.plan.current_plan(), good);
    }

    #[test]
    fn plans_for_other_nodes_or_invalid_plans_are_refused_before_anything_is_written() {
        let f = fixture(None);
        let mut other = sample_plan(1);
        other.node_id = outpost_proto::name::name("n", "n2").unwrap();
        assert!(matches!(
            accept_plan(&f.agent, other),
            Err(PlanRejected::WrongNode { .. })
        ));
        let mut invalid = sample_plan(2);
        invalid.allocations.swap(0, 1);
        assert!(matches!(
            accept_plan(&f.agent, invalid),
            Err(PlanRejected::Invalid(_))
        ));
        let state = f.agent.store.state().unwrap();
        assert!(state.last_good.is_none() && !state.has_candidate);
        assert_eq!(spawned(&f.kernel), 0);
    }
}
