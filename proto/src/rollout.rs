//! Rollout policy (R3): how control replaces a service's instances when its spec changes.

use serde::{Deserialize, Serialize};

use crate::validate::{Validate, ValidationError};

/// Most instances replaced at once.
pub const MAX_PARALLEL_MAX: u32 = 1_000;
/// Longest time a batch may take to become ready.
pub const HEALTH_DEADLINE_MAX_SECS: u32 = 3_600;

/// `rollout: {max_parallel, health_deadline_secs, auto_rollback}` in a service spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPolicy {
    /// Instances replaced per batch.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
    /// A batch's new instances must report ready within this many seconds.
    #[serde(default = "default_health_deadline_secs")]
    pub health_deadline_secs: u32,
    /// On a failed batch, return every instance to the previous release.
    #[serde(default)]
    pub auto_rollback: bool,
}

fn default_max_parallel() -> u32 {
    1
}
fn default_health_deadline_secs() -> u32 {
    60
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            max_parallel: default_max_parallel(),
            health_deadline_secs: default_health_deadline_secs(),
            auto_rollback: false,
        }
    }
}

impl Validate for RolloutPolicy {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.max_parallel == 0 || self.max_parallel > MAX_PARALLEL_MAX {
            return Err(ValidationError::new(
                "max_parallel",
                format!("must be 1 to {MAX_PARALLEL_MAX}"),
                self.max_parallel,
            ));
        }
        if self.health_deadline_secs == 0 || self.health_deadline_secs > HEALTH_DEADLINE_MAX_SECS {
            return Err(ValidationError::new(
                "health_deadline_secs",
                format!("must be 1 to {HEALTH_DEADLINE_MAX_SECS}"),
                self.health_deadline_secs,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_policies_name_the_field() {
        assert!(RolloutPolicy::default().validate().is_ok());
        let zero = RolloutPolicy {
            max_parallel: 0,
            ..RolloutPolicy::default()
        };
        assert_eq!(zero.validate().unwrap_err().field, "max_parallel");
        let long = RolloutPolicy {
            health_deadline_secs: HEALTH_DEADLINE_MAX_SECS + 1,
            ..RolloutPolicy::default()
        };
        assert_eq!(long.validate().unwrap_err().field, "health_deadline_secs");
    }
}
