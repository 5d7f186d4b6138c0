//! Backend health (E2): a pure state machine per (backend address, check spec) — consecutive
//! failures (active checks, connect failures, 5xx answers) take it out after `unhealthy_after`,
//! consecutive passed checks put it back after `healthy_after` — and the board the proxy and the
//! checkers share. Routes with the same check spec share one state per backend. A new backend
//! starts out of service until it passes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use outpost_proto::route::{HealthSpec, ProxyProtocol, RouteSpec};

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

/// What one active check of a backend does and how its results count: the route's health spec
/// (HTTP path or TCP connect, interval, timeout, thresholds) and the PROXY header sent first.
/// Routes whose check specs are equal share one check of a backend and one health state; routes
/// with different thresholds or paths get their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub health: HealthSpec,
    pub proxy_protocol: ProxyProtocol,
}

impl CheckSpec {
    /// The check spec of a route.
    pub fn of(route: &RouteSpec) -> Self {
        Self {
            health: route.health.clone(),
            proxy_protocol: route.proxy_protocol,
        }
    }

    /// Whether `route` checks its backends this way (without building a spec).
    pub fn is_of(&self, route: &RouteSpec) -> bool {
        self.proxy_protocol == route.proxy_protocol && self.health == route.health
    }
}

/// The check specs of one backend address and the state each gives it.
type BackendChecks = Vec<(CheckSpec, HealthState)>;

/// Health of every (backend address, check spec), shared by the proxy (reads, passive failures)
/// and the checkers. Kept by address, then by check spec (a backend has one or a few), so the
/// proxy looks a backend up without allocating a key.
#[derive(Debug, Default, Clone)]
pub struct HealthBoard {
    states: Arc<RwLock<HashMap<SocketAddr, BackendChecks>>>,
}

impl HealthBoard {
    /// Whether the backend at `address` takes traffic for `route` (by the route's check spec).
    pub fn is_healthy(&self, address: SocketAddr, route: &RouteSpec) -> bool {
        self.get(address, route).health == Health::Healthy
    }

    /// The state of the backend at `address` under `route`'s check spec (a backend not checked
    /// yet is out).
    pub fn get(&self, address: SocketAddr, route: &RouteSpec) -> HealthState {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&address)
            .and_then(|checks| checks.iter().find(|(spec, _)| spec.is_of(route)))
            .map(|(_, state)| *state)
            .unwrap_or_default()
    }

    /// Records a passive result (connect failure, 5xx) seen on `route`: it counts for every
    /// route that shares the route's check of this backend. Returns the new state and whether
    /// the health changed.
    pub fn record_for_route(
        &self,
        address: SocketAddr,
        route: &RouteSpec,
        passed: bool,
    ) -> (HealthState, bool) {
        self.record_where(
            address,
            |spec| spec.is_of(route),
            || CheckSpec::of(route),
            passed,
        )
    }

    /// Records an active check's result.
    pub fn record(
        &self,
        address: SocketAddr,
        check: &CheckSpec,
        passed: bool,
    ) -> (HealthState, bool) {
        self.record_where(address, |spec| spec == check, || check.clone(), passed)
    }

    /// Records a result for the check of `address` that `is` picks (made by `make` if missing).
    fn record_where(
        &self,
        address: SocketAddr,
        is: impl Fn(&CheckSpec) -> bool,
        make: impl FnOnce() -> CheckSpec,
        passed: bool,
    ) -> (HealthState, bool) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        let checks = states.entry(address).or_default();
        let index = match checks.iter().position(|(spec, _)| is(spec)) {
            Some(index) => index,
            None => {
                checks.push((make(), HealthState::new()));
                checks.len() - 1
            }
        };
        let (spec, state) = &mut checks[index];
        let before = *state;
        *state = if passed {
            before.passed(&spec.health)
        } else {
            before.failed(&spec.health)
        };
        (*state, state.health != before.health)
    }

    /// Forgets the checks that stopped (their backends or check specs left the table).
    pub fn retain(&self, keep: impl Fn(SocketAddr, &CheckSpec) -> bool) {
        let mut states = self.states.write().unwrap_or_else(|p| p.into_inner());
        for (address, checks) in states.iter_mut() {
            checks.retain(|(spec, _)| keep(*address, spec));
        }
        states.retain(|_, checks| !checks.is_empty());
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
