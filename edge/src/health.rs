//! Backend health (E2): a pure state machine per backend — consecutive failures (active checks,
//! connect failures, 5xx answers) take it out after `unhealthy_after`, consecutive passed checks
//! put it back after `healthy_after` — and the board the proxy and the checkers share. A new
//! backend starts out of service until it passes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use outpost_proto::route::HealthSpec;

/// Whether a backend takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
}

/// The counters behind one backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub health: Health,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

impl HealthState {
    /// A backend not yet checked: out of service.
    pub fn new() -> Self {
        Self {
            health: Health::Unhealthy,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }

    /// One passed check.
    pub fn passed(mut self, spec: &HealthSpec) -> Self {
        self.consecutive_failures = 0;
        self.consecutive_successes = self.consecutive_successes.saturating_add(1);
        if self.consecutive_successes >= spec.healthy_after {
            self.health = Health::Healthy;
        }
        self
    }

    /// One failed check, connect failure or 5xx.
    pub fn failed(mut self, spec: &HealthSpec) -> Self {
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= spec.unhealthy_after {
            self.health = Health::Unhealthy;
        }
        self
    }
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

/// Key of a backend's health: the route and the backend's address (two routes may share an
/// instance with different thresholds).
pub type HealthKey = (String, SocketAddr);

/// Health of every backend, shared by the proxy (reads, passive failures) and the checkers.
/// Kept by address, then route, so the proxy looks a backend up without allocating a key.
#[derive(Debug, Default, Clone)]
pub struct HealthBoard {
    states: Arc<RwLock<HashMap<SocketAddr, HashMap<String, HealthState>>>>,
}

impl HealthBoard {
    pub fn is_healthy(&self, key: &HealthKey) -> bool {
        self.is_healthy_at(&key.0, key.1)
    }

    /// Whether the backend at `address` takes traffic for `route`.
    pub fn is_healthy_at(&self, route: &str, address: SocketAddr) -> bool {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&address)
            .and_then(|routes| routes.get(route))
            .is_some_and(|s| s.health == Health::Healthy)
    }

    pub fn get(&self, key: &HealthKey) -> HealthState {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.1)
            .and_then(|routes| routes.get(&key.0))
            .copied()
            .unwrap_or_default()
    }

    /// Records a result; returns the new state and whether the health changed.
    pub fn record(&self, key: &HealthKey, spec: &HealthSpec, passed: bool) -> (HealthState, bool) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        let routes = states.entry(key.1).or_default();
        let before = routes.get(&key.0).copied().unwrap_or_default();
        let after = if passed {
            before.passed(spec)
        } else {
            before.failed(spec)
        };
        routes.insert(key.0.clone(), after);
        (after, after.health != before.health)
    }

    /// Forgets backends that left the table.
    pub fn retain(&self, keep: impl Fn(&HealthKey) -> bool) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        for (address, routes) in states.iter_mut() {
            routes.retain(|route, _| keep(&(route.clone(), *address)));
        }
        states.retain(|_, routes| !routes.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(unhealthy_after: u32, healthy_after: u32) -> HealthSpec {
        HealthSpec {
            unhealthy_after,
            healthy_after,
            ..HealthSpec::default()
        }
    }

    #[test]
    fn a_new_backend_waits_for_its_checks_then_leaves_after_the_threshold() {
        let spec = spec(2, 2);
        let state = HealthState::new();
        assert_eq!(state.health, Health::Unhealthy);
        let state = state.passed(&spec);
        assert_eq!(state.health, Health::Unhealthy);
        let state = state.passed(&spec);
        assert_eq!(state.health, Health::Healthy);
        let state = state.failed(&spec);
        assert_eq!(
            state.health,
            Health::Healthy,
            "one failure is below the threshold"
        );
        let state = state.failed(&spec);
        assert_eq!(state.health, Health::Unhealthy);
    }

    proptest! {
        /// Health only changes after the threshold of consecutive results of the other kind.
        #[test]
        fn health_changes_only_at_thresholds(results in proptest::collection::vec(any::<bool>(), 0..60), down in 1u32..5, up in 1u32..5) {
            let spec = spec(down, up);
            let mut state = HealthState::new();
            let mut run_pass = 0u32;
            let mut run_fail = 0u32;
            for passed in results {
                let before = state.health;
                state = if passed { state.passed(&spec) } else { state.failed(&spec) };
                if passed { run_pass += 1; run_fail = 0; } else { run_fail += 1; run_pass = 0; }
                if before != state.health {
                    if state.health == Health::Healthy { prop_assert!(run_pass >= up); }
                    else { prop_assert!(run_fail >= down); }
                }
            }
        }
    }
}
