//! Client retry schedule: exponential backoff with full jitter, as DESIGN.md sets it.
//!
//! Pure arithmetic; the caller supplies the random number and keeps the attempt count.

use std::time::Duration;

/// First backoff ceiling.
pub const BACKOFF_BASE_MS: u64 = 800;
/// Largest backoff ceiling.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// A client that has been healthy this long resets its attempt count.
pub const BACKOFF_RESET_AFTER_SECS: u64 = 120;

/// The ceiling for retry number `attempt` (0-based): `base * 2^attempt`, capped.
pub fn backoff_ceiling_ms(attempt: u32) -> u64 {
    let factor = 1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX);
    BACKOFF_BASE_MS.saturating_mul(factor).min(BACKOFF_CAP_MS)
}

/// Full jitter: a delay drawn uniformly from `0..=ceiling` using `random`.
pub fn backoff_delay(attempt: u32, random: u64) -> Duration {
    let ceiling = backoff_ceiling_ms(attempt);
    Duration::from_millis(random % (ceiling + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        assert_eq!(backoff_ceiling_ms(0), 800);
        assert_eq!(backoff_ceiling_ms(1), 1600);
        assert_eq!(backoff_ceiling_ms(5), 25_600);
        assert_eq!(backoff_ceiling_ms(6), 30_000);
        assert_eq!(backoff_ceiling_ms(u32::MAX), 30_000);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_the_ceiling(attempt in any::<u32>(), random in any::<u64>()) {
            prop_assert!(backoff_delay(attempt, random).as_millis() as u64 <= backoff_ceiling_ms(attempt));
        }
    }
}
