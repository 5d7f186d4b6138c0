//! When to look for control again (D6): soon after losing it, then less and less often while
//! nothing changes, never less often than once a minute. Pure.

use std::time::Duration;

pub const REDISCOVERY_MIN: Duration = Duration::from_secs(2);
pub const REDISCOVERY_MAX: Duration = Duration::from_secs(60);

/// The pause before the next look, growing ×2 from [`REDISCOVERY_MIN`] to [`REDISCOVERY_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rediscovery {
    interval: Duration,
}

impl Default for Rediscovery {
    fn default() -> Self {
        Self {
            interval: REDISCOVERY_MIN,
        }
    }
}

impl Rediscovery {
    /// The pause to take now; the next one is twice as long (up to the maximum).
    pub fn next_pause(&mut self) -> Duration {
        let now = self.interval;
        self.interval = (self.interval * 2).min(REDISCOVERY_MAX);
        now
    }

    /// Control was lost or changed: look again soon.
    pub fn reset(&mut self) {
        self.interval = REDISCOVERY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_a_minute_and_resets() {
        let mut pacing = Rediscovery::default();
        let taken: Vec<u64> = (0..7).map(|_| pacing.next_pause().as_secs()).collect();
        assert_eq!(taken, [2, 4, 8, 16, 32, 60, 60]);
        pacing.reset();
        assert_eq!(pacing.next_pause(), REDISCOVERY_MIN);
    }
}
