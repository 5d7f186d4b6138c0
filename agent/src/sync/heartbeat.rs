//! Liveness (D5): a heartbeat every TTL/3 carrying the plan generation, the cursor and every
//! allocation's state; then the bounded outbox of bootstrap events is flushed to control.
//! 401/403/404 drop the session so the next call registers again (D6). A failed beat is retried
//! with full-jitter backoff (0.8 s → 30 s, reset after two healthy minutes; [`BeatPacing`]).

use std::time::{Duration, Instant};

use outpost_proto::bootstrap::BOOTSTRAP_EVENTS_MAX;
use outpost_proto::node::HeartbeatRequest;

use super::Backoff;
use crate::link::client::Recovery;

use super::SyncParts;

/// Beats closer together than this only come from nudges, which are held back to it.
const BEAT_SPACING_MIN: Duration = Duration::from_secs(1);

/// Whether a beat reached control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeatOutcome {
    Delivered,
    /// No session could be had, or control did not take the heartbeat.
    Failed,
}

/// Whether a nudge (allocation states changed) may bring the next beat forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NudgePolicy {
    /// Healthy: control hears about changes at once (held back to [`BEAT_SPACING_MIN`]).
    Honour,
    /// Backing off after a failure: a nudge waits for the retry, unless the session was dropped
    /// meanwhile (discovery pointed the node at another control, which is worth trying now).
    OnlyAfterInvalidation,
}

/// How long the heartbeat thread waits after a beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatWait {
    pub delay: Duration,
    pub nudge: NudgePolicy,
}

/// The heartbeat's pacing as plain data (no clock, no randomness inside): TTL/3 while healthy,
/// full-jitter backoff after failures (`proto::backoff`, through [`Backoff`]).
#[derive(Debug, Clone, Default)]
pub struct BeatPacing {
    backoff: Backoff,
}

impl BeatPacing {
    /// The wait after a beat that ended at `now` with `outcome`; `random` draws the jitter.
    pub fn after_beat(
        &mut self,
        outcome: BeatOutcome,
        ttl_secs: u32,
        now: Instant,
        random: u64,
    ) -> BeatWait {
        match outcome {
            BeatOutcome::Delivered => {
                self.backoff.succeeded(now);
                let ttl_secs = ttl_secs.max(outpost_proto::limits::TTL_MIN_SECS);
                BeatWait {
                    delay: Duration::from_millis(u64::from(ttl_secs) * 1000 / 3),
                    nudge: NudgePolicy::Honour,
                }
            }
            BeatOutcome::Failed => BeatWait {
                delay: self.backoff.failed(random),
                nudge: NudgePolicy::OnlyAfterInvalidation,
            },
        }
    }
}

/// Whether a nudge that arrived during `wait` ends it; `invalidated`: the session was dropped
/// since the beat.
pub fn nudge_ends_wait(wait: BeatWait, invalidated: bool) -> bool {
    match wait.nudge {
        NudgePolicy::Honour => true,
        NudgePolicy::OnlyAfterInvalidation => invalidated,
    }
}

/// Runs until the process exits. The first beat goes out at once, so control sees what a
/// rebooted node runs without waiting; then [`BeatPacing`] decides the wait, and a nudge may end
/// it early ([`nudge_ends_wait`]), never sooner than [`BEAT_SPACING_MIN`] after the last beat.
pub fn run(agent: &SyncParts) {
    let mut pacing = BeatPacing::default();
    loop {
        let invalidations = agent.enrollment.invalidations();
        let beat_at = Instant::now();
        agent.beats.beat_started();
        let outcome = beat(agent);
        let wait = pacing.after_beat(
            outcome,
            agent.plan.ttl_secs(),
            Instant::now(),
            crate::os::random_u64(),
        );
        let due = Instant::now() + wait.delay;
        agent
            .beats
            .beat_ended(due, outcome == BeatOutcome::Delivered);
        if outcome == BeatOutcome::Failed {
            agent.board.update(|s| {
                if let Some(error) = &mut s.control.last_error {
                    error.push_str(&format!(" (retrying in {} ms)", wait.delay.as_millis()));
                }
            });
        }
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::park_timeout(due - now);
            if agent.heartbeat.take()
                && nudge_ends_wait(wait, agent.enrollment.invalidations() != invalidations)
            {
                let since = beat_at.elapsed();
                if since < BEAT_SPACING_MIN {
                    std::thread::sleep(BEAT_SPACING_MIN - since);
                }
                break;
            }
        }
    }
}

/// One heartbeat and outbox flush. Errors land in status; the caller paces the retry.
pub fn beat(agent: &SyncParts) -> BeatOutcome {
    let session = match agent.enrollment.session() {
        Ok(session) => session,
        Err(error) => {
            agent
                .board
                .update(|s| s.control.last_error = Some(format!("heartbeat: {error}")));
            return BeatOutcome::Failed;
        }
    };
    let plan = agent.plan.current_plan();
    let mut request = HeartbeatRequest {
        plan_generation: agent.plan.has_plan().then(|| plan.generation()),
        cursor: agent.plan.has_plan().then_some(plan.as_of),
        allocations: agent.workloads.supervisor().statuses(),
        agent: Some(agent.upgrades.build()),
        ..HeartbeatRequest::default()
    };
    crate::overlay::fill_heartbeat(&agent.overlay, &mut request);
    request.lan_address = crate::overlay::lan_address(&agent.overlay, &request.endpoints);
    match session.client.heartbeat(&session.node_id, &request) {
        Ok(response) => {
            agent.plan.note_heartbeat(&response);
            flush_outbox(agent, &session.client);
            upgrade_after_beat(agent, &session, response.upgrade);
            BeatOutcome::Delivered
        }
        Err(error) => {
            if matches!(error.recovery(), Recovery::Register | Recovery::Reenroll) {
                agent.enrollment.invalidate();
            }
            agent
                .board
                .update(|s| s.control.last_error = Some(format!("heartbeat: {error}")));
            BeatOutcome::Failed
        }
    }
}

/// A delivered beat commits a binary on trial; an upgrade in the answer starts one (U2).
fn upgrade_after_beat(
    agent: &SyncParts,
    session: &crate::enroll::Session,
    upgrade: Option<outpost_proto::release::AgentUpgrade>,
) {
    let data_dir = agent.config.data_dir.clone();
    if agent.upgrades.commit_if_on_trial(&agent.store, &data_dir) {
        publish_upgrade(&agent.board, &agent.upgrades);
        agent.heartbeat.ring();
    }
    let Some(upgrade) = upgrade else { return };
    // R4: a switch is a boot, and boot drops a plan still on probation (its instances would be
    // stopped): the upgrade waits until the running plan is the last-good one.
    let status = agent.board.snapshot();
    if status.plan_generation.is_some() && status.last_good != status.plan_generation {
        return;
    }
    let client = session.client.clone();
    let (board, upgrades, bell) = (
        agent.board.clone(),
        agent.upgrades.clone(),
        agent.heartbeat.clone(),
    );
    let cache_dir = data_dir.clone();
    agent.upgrades.request(
        agent.store.clone(),
        data_dir,
        agent.node.identity().release_public_key,
        upgrade,
        move |sha256| crate::upgrade::fetch_through_cache(&cache_dir, &client, sha256),
        move || {
            publish_upgrade(&board, &upgrades);
            bell.ring();
        },
    );
}

/// Puts the last upgrade's outcome in status.
pub fn publish_upgrade(board: &crate::status::StatusBoard, upgrades: &crate::upgrade::Upgrades) {
    let report = upgrades.record().as_ref().map(crate::upgrade::describe);
    board.update(|s| s.upgrade = report);
}

fn flush_outbox(agent: &SyncParts, client: &crate::link::client::ControlClient) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use outpost_proto::backoff::backoff_ceiling_ms;

    const TTL_SECS: u32 = 30;

    #[test]
    fn healthy_beats_come_every_third_of_the_ttl_and_nudges_bring_them_forward() {
        let mut pacing = BeatPacing::default();
        let wait = pacing.after_beat(BeatOutcome::Delivered, TTL_SECS, Instant::now(), 12345);
        assert_eq!(wait.delay, Duration::from_secs(10));
        assert!(nudge_ends_wait(wait, false));
        // A TTL below the protocol's minimum is taken as the minimum.
        let wait = pacing.after_beat(BeatOutcome::Delivered, 0, Instant::now(), 0);
        assert_eq!(wait.delay, Duration::from_secs(1));
    }

    #[test]
    fn failures_back_off_with_full_jitter_up_to_thirty_seconds() {
        let mut pacing = BeatPacing::default();
        let now = Instant::now();
        for attempt in 0..10u32 {
            let ceiling = backoff_ceiling_ms(attempt);
            // The largest draw reaches the ceiling; the jitter spans 0..=ceiling.
            let wait = pacing.after_beat(BeatOutcome::Failed, TTL_SECS, now, ceiling);
            assert_eq!(
                wait.delay,
                Duration::from_millis(ceiling),
                "attempt {attempt}"
            );
            assert!(!nudge_ends_wait(wait, false), "nudges wait for the retry");
            assert!(
                nudge_ends_wait(wait, true),
                "unless the session was dropped"
            );
        }
        assert_eq!(backoff_ceiling_ms(9), 30_000);
        let mut pacing = BeatPacing::default();
        let wait = pacing.after_beat(BeatOutcome::Failed, TTL_SECS, now, 0);
        assert_eq!(wait.delay, Duration::ZERO, "full jitter may retry at once");
        let wait = pacing.after_beat(BeatOutcome::Failed, TTL_SECS, now, 2000);
        assert_eq!(wait.delay, Duration::from_millis(2000 % 1601));
    }

    #[test]
    fn backoff_resets_only_after_two_healthy_minutes() {
        let mut pacing = BeatPacing::default();
        let start = Instant::now();
        let failed = |pacing: &mut BeatPacing, at: Instant| {
            pacing
                .after_beat(BeatOutcome::Failed, TTL_SECS, at, u64::MAX)
                .delay
        };
        for _ in 0..6 {
            failed(&mut pacing, start);
        }
        // One healthy beat is not enough: the next failure still waits up to 30 s.
        pacing.after_beat(BeatOutcome::Delivered, TTL_SECS, start, 0);
        assert_eq!(
            failed(&mut pacing, start),
            Duration::from_millis(u64::MAX % 30_001)
        );
        // Two minutes of healthy beats reset it to the first step.
        pacing.after_beat(BeatOutcome::Delivered, TTL_SECS, start, 0);
        pacing.after_beat(
            BeatOutcome::Delivered,
            TTL_SECS,
            start + Duration::from_secs(121),
            0,
        );
        assert_eq!(
            failed(&mut pacing, start + Duration::from_secs(122)),
            Duration::from_millis(u64::MAX % 801)
        );
    }
}
