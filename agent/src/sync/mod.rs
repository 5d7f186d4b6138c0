//! Following control: the cursor-following change feed (`feed`), plan promotion (`promote`)
//! and heartbeats with the outbox flush (`heartbeat`), over the session `enroll` keeps; the
//! beat schedule keeps the feed and the heartbeat on one connection (`wire`).
//!
//! Runs on its own threads after boot; boot never waits for any of it. Those threads receive
//! [`SyncParts`], the handles they need, and nothing else of the agent.

pub mod artifacts;
pub mod feed;
pub mod heartbeat;
pub mod promote;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AgentConfig;
use crate::enroll::Enrollment;
use crate::node::{Bell, NodeState, PlanState, Workloads};
use crate::overlay::OverlayParts;
use crate::status::StatusBoard;
use crate::store::Store;
use artifacts::ArtifactParts;

/// The handles the feed and heartbeat threads (and plan promotion) work with.
#[derive(Clone)]
pub struct SyncParts {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub node: Arc<NodeState>,
    pub plan: Arc<PlanState>,
    pub workloads: Arc<Workloads>,
    pub enrollment: Enrollment,
    /// Rung when allocation states change: the heartbeat tells control at once.
    pub heartbeat: Arc<Bell>,
    /// When the next heartbeat is due: the feed's poll gives way to it (`wire`).
    pub beats: Arc<wire::BeatSchedule>,
    /// The overlay part of a heartbeat (public key, endpoints, LAN address).
    pub overlay: OverlayParts,
    /// Fetching what a new plan references before it is applied.
    pub artifacts: ArtifactParts,
    /// Self-update (crate::upgrade): what the heartbeat reports and starts.
    pub upgrades: Arc<crate::upgrade::Upgrades>,
}

use outpost_proto::backoff::{BACKOFF_RESET_AFTER_SECS, backoff_delay};

/// Retry pacing: exponential backoff with full jitter (0.8 s → 30 s), reset after two minutes of
/// health.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
    healthy_since: Option<Instant>,
}

impl Backoff {
    /// Records a failure and returns how long to wait.
    pub fn failed(&mut self, random: u64) -> Duration {
        self.healthy_since = None;
        let delay = backoff_delay(self.attempt, random);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Records a success at `now`; after two minutes of successes the attempt count resets.
    pub fn succeeded(&mut self, now: Instant) {
        let since = *self.healthy_since.get_or_insert(now);
        if now.duration_since(since) >= Duration::from_secs(BACKOFF_RESET_AFTER_SECS) {
            self.attempt = 0;
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_resets_after_two_healthy_minutes() {
        let mut backoff = Backoff::default();
        assert_eq!(
            backoff.failed(u64::MAX - 1),
            Duration::from_millis((u64::MAX - 1) % 801)
        );
        backoff.failed(0);
        assert_eq!(backoff.attempt(), 2);
        let start = Instant::now();
        backoff.succeeded(start);
        assert_eq!(backoff.attempt(), 2);
        backoff.succeeded(start + Duration::from_secs(121));
        assert_eq!(backoff.attempt(), 0);
    }
}
