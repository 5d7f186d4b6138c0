//! Taking a new plan (P8, O2): written as candidate with its checksum, read back and verified
//! (checksum, decode, validation, invariants), applied, and promoted to last-good only when the
//! apply succeeds, with the cursor saved in the same redb transaction. A plan that fails
//! verification or apply leaves the last-good plan running and the error in status.

use std::time::Instant;

use outpost_proto::bootstrap::{BootstrapEvent, BootstrapStepStatus};
use outpost_proto::plan::Plan;
use outpost_proto::validate::Validate;

use crate::boot::Agent;
use crate::store::{ApplyOutcome, COMPONENT_ALLOCATIONS, ComponentApply, last_good};

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
pub fn accept_plan(agent: &Agent, plan: Plan) -> Result<Accepted, PlanRejected> {
    let result = accept(agent, plan);
    if let Err(error) = &result {
        agent
            .board
            .update(|s| s.last_plan_error = Some(error.to_string()));
    }
    result
}

fn accept(agent: &Agent, plan: Plan) -> Result<Accepted, PlanRejected> {
    let node = agent.node_id();
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
    let generation = candidate.generation();
    let previous = agent.current_plan();
    let changed = previous.generation() != generation || !agent.has_plan();
    if changed {
        let applied = agent.supervisor().apply(&candidate, Instant::now());
        if let Err(error) = applied {
            // Back to the last-good plan: stop what the rejected plan started.
            let _ = agent.supervisor().apply(&previous, Instant::now());
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
    agent
        .store
        .promote_candidate(&apply)
        .map_err(|e| PlanRejected::Promote(e.to_string()))?;
    let copy_error = last_good::write(&agent.config.data_dir, &candidate)
        .err()
        .map(|e| e.to_string());
    agent.settle_plan(&candidate, "control");
    agent.board.update(|s| {
        s.components
            .insert(COMPONENT_ALLOCATIONS.into(), apply.clone());
        s.last_plan_error = None;
        s.notes
            .retain(|n| !n.starts_with("cannot write last-good copy"));
        if let Some(error) = &copy_error {
            s.notes
                .push(format!("cannot write last-good copy: {error}"));
        }
    });
    if changed {
        record_event(agent, BootstrapStepStatus::Ok, &generation, &apply.message);
        Ok(Accepted::Applied)
    } else {
        Ok(Accepted::CursorOnly)
    }
}

fn discard(agent: &Agent, error: PlanRejected) -> PlanRejected {
    let _ = agent.store.discard_candidate();
    error
}

/// Queues a bootstrap event for control (C9) in the bounded outbox.
pub fn record_event(agent: &Agent, status: BootstrapStepStatus, generation: &str, message: &str) {
    let Ok(node_id) = outpost_proto::name::name("node_id", &agent.node_id()) else {
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
