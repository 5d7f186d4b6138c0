//! Liveness (D5): a heartbeat every TTL/3 carrying the plan generation, the cursor and every
//! allocation's state; then the bounded outbox of bootstrap events is flushed to control.
//! 401/403/404 drop the session so the next call registers again (D6).

use std::time::{Duration, Instant};

use outpost_proto::bootstrap::BOOTSTRAP_EVENTS_MAX;
use outpost_proto::node::HeartbeatRequest;

use super::client::Recovery;
use super::registration::{invalidate, session};
use crate::boot::Agent;

/// Runs until the process exits.
/// Beats closer together than this only come from nudges, which are held back to it.
const BEAT_SPACING_MIN: Duration = Duration::from_secs(1);

/// The first beat goes out at once, so control sees what a rebooted node runs without waiting.
/// Between beats the thread parks for TTL/3; a nudge (allocation states changed) wakes it
/// early, but never more than once per [`BEAT_SPACING_MIN`].
pub fn run(agent: &Agent) {
    loop {
        let beat_at = Instant::now();
        beat(agent);
        let ttl_secs = agent.ttl_secs().max(outpost_proto::limits::TTL_MIN_SECS);
        std::thread::park_timeout(Duration::from_millis(u64::from(ttl_secs) * 1000 / 3));
        let since = beat_at.elapsed();
        if since < BEAT_SPACING_MIN {
            std::thread::sleep(BEAT_SPACING_MIN - since);
        }
    }
}

/// One heartbeat and outbox flush. Errors land in status; the next beat retries.
pub fn beat(agent: &Agent) {
    let Ok(session) = session(agent) else { return };
    let plan = agent.current_plan();
    let mut request = HeartbeatRequest {
        plan_generation: agent.has_plan().then(|| plan.generation()),
        cursor: agent.has_plan().then_some(plan.as_of),
        allocations: agent.supervisor().statuses(),
        ..HeartbeatRequest::default()
    };
    crate::overlay::fill_heartbeat(agent, &mut request);
    match session.client.heartbeat(&session.node_id, &request) {
        Ok(response) => {
            agent.note_heartbeat(&response);
            flush_outbox(agent, &session.client);
        }
        Err(error) => {
            if matches!(error.recovery(), Recovery::Register | Recovery::Reenroll) {
                invalidate(agent);
            }
            agent
                .board
                .update(|s| s.control.last_error = Some(format!("heartbeat: {error}")));
        }
    }
}

fn flush_outbox(agent: &Agent, client: &super::client::ControlClient) {
    loop {
        let Ok(batch) = agent.store.peek_outbox(BOOTSTRAP_EVENTS_MAX) else {
            return;
        };
        let Some((last_key, _)) = batch.last() else {
            return;
        };
        let last_key = *last_key;
        let events: Vec<_> = batch.into_iter().map(|(_, event)| event).collect();
        match client.post_events(&events) {
            Ok(()) => {
                if agent.store.remove_outbox_through(last_key).is_err() {
                    return;
                }
            }
            Err(error) => {
                agent
                    .board
                    .update(|s| s.control.last_error = Some(format!("bootstrap events: {error}")));
                return;
            }
        }
    }
}
