//! Following control by cursor (P8, O3): long-poll the node's change feed from the last-good
//! plan's cursor, fold each batch into a copy of the plan, and hand the result to `promote`.
//! A 410 Gone (another log epoch, a cursor below the retained floor, or one past control's head
//! after a restore from an older copy or on a replica that is behind), or a batch from another
//! log epoch, fetches the plan snapshot and resumes from its `as_of`, even when that is behind
//! the cursor: control's log is the truth, and what it no longer holds is undone. Errors back off with full jitter; 401/403/404 register again. Healthy rounds start
//! at least [`ROUND_SPACING_MIN`] apart, so a control that answers at once (ignoring `wait`)
//! does not drive the loop round without pause.

use std::time::{Duration, Instant};

use outpost_proto::Cursor;
use outpost_proto::plan::FoldError;

use super::Backoff;
use super::SyncParts;
use super::promote::accept_plan;
use crate::enroll::RegisterError;
use crate::link::client::{CallError, Recovery};
use crate::status::ControlState;

/// What one round of the loop did.
#[derive(Debug)]
enum Round {
    Healthy,
    Failed(String),
    /// Control answered, but its batch or plan was refused (kept last-good; error in status).
    Refused(String),
    /// Control is overloaded and said when to come back (429/503 with Retry-After).
    Throttled {
        error: String,
        retry_after: Duration,
    },
}

/// Longest Retry-After honoured; beyond it the normal backoff applies.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// Least time from the start of one healthy round to the start of the next. A long poll that
/// control holds for its `wait` is followed at once; one answered at once (a burst of changes,
/// or a control that ignores `wait`) waits out the rest, so a node asks at most twice a second.
pub const ROUND_SPACING_MIN: Duration = Duration::from_millis(500);

/// The pause after a healthy round that started at `started` and ended at `now`.
pub fn pause_after_healthy_round(started: Instant, now: Instant) -> Duration {
    ROUND_SPACING_MIN.saturating_sub(now.saturating_duration_since(started))
}

/// Runs until the process exits.
pub fn run(agent: &SyncParts) {
    let mut backoff = Backoff::default();
    // Logged once per distinct error, with how many rounds failed in a row, and once on recovery:
    // an agent offline for a week writes a few lines, not one per retry.
    let mut failing = (String::new(), 0u32);
    loop {
        let started = Instant::now();
        let (error, floor, link) = match round(agent) {
            Round::Healthy => {
                let now = Instant::now();
                if failing.1 > 0 {
                    tracing::info!(
                        component = "sync",
                        action = "feed",
                        attempt = failing.1,
                        "feed healthy again after {} failed round(s)",
                        failing.1
                    );
                    failing = (String::new(), 0);
                }
                backoff.succeeded(now);
                std::thread::sleep(pause_after_healthy_round(started, now));
                continue;
            }
            Round::Failed(error) => (error, Duration::ZERO, Link::Down),
            Round::Refused(error) => (error, Duration::ZERO, Link::Up),
            Round::Throttled { error, retry_after } => {
                (error, retry_after.min(RETRY_AFTER_MAX), Link::Up)
            }
        };
        let delay = backoff.failed(crate::os::random_u64()).max(floor);
        failing.1 = failing.1.saturating_add(1);
        if failing.0 != error {
            tracing::warn!(
                component = "sync",
                action = "feed",
                attempt = failing.1,
                "{error} (retrying in {} ms)",
                delay.as_millis()
            );
            failing.0.clone_from(&error);
        }
        agent.board.update(|s| {
            if link == Link::Down && s.control.state != ControlState::Revoked {
                s.control.state = ControlState::Unreachable;
            }
            s.control.last_error = Some(format!("{error} (retrying in {} ms)", delay.as_millis()));
        });
        std::thread::sleep(delay);
    }
}

/// Whether control answered, for the status after a failed round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Down,
}

fn contact(agent: &SyncParts) {
    agent.board.update(|s| {
        s.control.state = ControlState::Connected;
        s.control.last_error = None;
        s.control.last_contact_unix = Some(crate::os::unix_now_secs());
    });
}

fn round(agent: &SyncParts) -> Round {
    let session = match agent.enrollment.session() {
        Ok(session) => session,
        Err(RegisterError::Revoked) => {
            agent
                .board
                .update(|s| s.control.state = ControlState::Revoked);
            return Round::Failed(RegisterError::Revoked.to_string());
        }
        Err(RegisterError::Call(error)) if error.recovery() == Recovery::Reenroll => {
            agent
                .board
                .update(|s| s.control.state = ControlState::Revoked);
            return Round::Failed(format!("registration: {error}"));
        }
        Err(error) => return Round::Failed(format!("registration: {error}")),
    };
    if !agent.plan.has_plan() {
        return snapshot(agent, &session.client, &session.node_id, None);
    }
    let current = agent.plan.current_plan();
    // One connection: a beat due before this poll could end goes first (sync::wire).
    let wait_secs = agent
        .beats
        .poll_wait_secs(agent.config.feed_wait_secs, || agent.heartbeat.ring());
    match session
        .client
        .changes(&session.node_id, current.as_of, wait_secs)
    {
        Ok(batch) => {
            contact(agent);
            let mut next = current.clone();
            match next.fold_batch(&batch) {
                Ok(_) => {}
                Err(FoldError::OtherEpoch { .. }) => {
                    let gone = format!(
                        "a change batch from another log epoch answered cursor {}",
                        current.as_of
                    );
                    return snapshot(agent, &session.client, &session.node_id, Some(gone));
                }
                Err(error) => return Round::Refused(format!("change batch refused: {error}")),
            }
            if next == current {
                return Round::Healthy;
            }
            tracing::info!(
                component = "sync",
                action = "plan",
                node_id = %session.node_id,
                generation = %next.as_of,
                "plan changed: {} allocation(s)",
                next.allocations.len()
            );
            match accept_plan(agent, next) {
                Ok(_) => Round::Healthy,
                Err(error) => Round::Refused(error.to_string()),
            }
        }
        Err(error) => recover(agent, &session.client, &session.node_id, error),
    }
}

fn recover(
    agent: &SyncParts,
    client: &crate::link::client::ControlClient,
    node_id: &str,
    error: CallError,
) -> Round {
    match error.recovery() {
        Recovery::Snapshot => {
            contact(agent);
            let how = match &error {
                CallError::Gone(_) => "got 410 Gone",
                _ => "was refused",
            };
            let gone = format!("cursor {} {how} ({error})", agent.plan.current_plan().as_of);
            snapshot(agent, client, node_id, Some(gone))
        }
        Recovery::Register | Recovery::Reenroll => {
            agent.enrollment.invalidate();
            Round::Failed(format!("{error}; registering again"))
        }
        Recovery::Backoff => match &error {
            CallError::Status {
                retry_after_secs: Some(secs),
                ..
            } => Round::Throttled {
                error: error.to_string(),
                retry_after: Duration::from_secs(*secs),
            },
            CallError::Transport(_) => Round::Failed(error.to_string()),
            // Control answered: an error status, or a garbled or oversized frame.
            _ => Round::Refused(error.to_string()),
        },
    }
}

/// Fetches the node's whole plan and resumes from its cursor. `gone` says why the feed could not
/// go on (a 410, or a batch of another log epoch); such a crossing is logged, since it is how an
/// agent follows control across a restore or a new leader's log.
fn snapshot(
    agent: &SyncParts,
    client: &crate::link::client::ControlClient,
    node_id: &str,
    gone: Option<String>,
) -> Round {
    match client.plan(node_id) {
        Ok(plan) => {
            contact(agent);
            if let Some(gone) = gone {
                tracing::warn!(
                    component = "sync",
                    action = "snapshot",
                    node_id,
                    generation = %plan.as_of,
                    "{gone}; resuming from the plan snapshot as of {} ({})",
                    plan.as_of,
                    crossing(agent.plan.current_plan().as_of, plan.as_of)
                );
            }
            match accept_plan(agent, plan) {
                Ok(_) => Round::Healthy,
                Err(error) => Round::Refused(error.to_string()),
            }
        }
        Err(error) if error.recovery() == Recovery::Snapshot => Round::Failed(error.to_string()),
        Err(error) => recover(agent, client, node_id, error),
    }
}

/// How a snapshot's cursor stands to the cursor the feed could not go on from, in words for the
/// log line of the crossing.
pub fn crossing(before: Cursor, snapshot: Cursor) -> &'static str {
    if before.log_epoch != snapshot.log_epoch {
        "into another log epoch"
    } else if snapshot.event_id < before.event_id {
        "back to a log behind this node's cursor: control was restored from an older copy or is a replica that lags; what its log does not hold is undone"
    } else {
        "forward past events control no longer retains"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossings_are_named_by_how_the_snapshot_stands_to_the_old_cursor() {
        assert_eq!(
            crossing(Cursor::new(1, 50), Cursor::new(2, 3)),
            "into another log epoch"
        );
        assert!(
            crossing(Cursor::new(1, 50), Cursor::new(1, 30)).starts_with("back to a log behind")
        );
        assert!(crossing(Cursor::new(1, 50), Cursor::new(1, 80)).starts_with("forward"));
        assert!(crossing(Cursor::new(1, 50), Cursor::new(1, 50)).starts_with("forward"));
    }

    #[test]
    fn quick_healthy_rounds_are_spaced_and_long_polls_are_followed_at_once() {
        let started = Instant::now();
        // Control answered at once (it ignored `wait`): the rest of the spacing is waited out.
        assert_eq!(
            pause_after_healthy_round(started, started),
            ROUND_SPACING_MIN
        );
        assert_eq!(
            pause_after_healthy_round(started, started + Duration::from_millis(120)),
            ROUND_SPACING_MIN - Duration::from_millis(120)
        );
        // A long poll held for its wait: the next round starts at once.
        assert_eq!(
            pause_after_healthy_round(started, started + Duration::from_secs(300)),
            Duration::ZERO
        );
        assert_eq!(
            pause_after_healthy_round(started, started + ROUND_SPACING_MIN),
            Duration::ZERO
        );
        // A clock that seems to run backwards never makes the pause longer than the spacing.
        assert_eq!(
            pause_after_healthy_round(started + Duration::from_secs(1), started),
            ROUND_SPACING_MIN
        );
    }
}
