//! Rollouts (R3): a new release of a service replaces its instances in batches of
//! `rollout.max_parallel`, moving on only when a batch's new instances report ready within
//! `rollout.health_deadline_secs`; a failed batch halts, and with `auto_rollback` every instance
//! returns to the previous release at once.
//!
//! Entry points (reusable by other rollouts, e.g. agent binaries or secret versions):
//! - [`engine`] — the pure decision `next_step(policy, batches, units, now)` over any units that
//!   report readiness.
//! - [`RolloutRecord`] / [`RolloutIndex`] — the per-service state in the views, folded from
//!   `ServiceDefined` (a new release with a policy starts a rollout) and the `Rollout*` events.
//! - [`service`] — the service adapter: instances as units (updated = runs the target spec;
//!   ready = reported `running` by a heartbeat whose plan cursor is at or past the instance's
//!   latest placement, so a report about the old spec never counts) and `run_rollouts_once`,
//!   the driver pass `Control` runs on a timer; its decisions are events.
//! - [`agents`] — agent upgrades (U2): nodes as units (updated = reports the new binary
//!   committed; failed = reports it refused or rolled back), offered in heartbeat answers.
//! - The scheduler's gate: while a rollout is progressing or halted, only admitted instances
//!   take the new spec in place ([`RolloutIndex::gate`]).

pub mod agents;
pub mod engine;
pub mod http;
pub mod service;

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::rollout::RolloutPolicy;
use outpost_proto::service::ServiceSpec;
use serde::{Deserialize, Serialize};

pub use engine::Batch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Progressing,
    Completed,
    /// Stopped after a failed batch; instances not yet replaced keep the previous release.
    Halted,
    /// Halted, then every instance was returned to the previous release.
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Progressing => "progressing",
            RolloutState::Completed => "completed",
            RolloutState::Halted => "halted",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// One service's latest rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub org: String,
    /// The release being rolled out.
    pub release: u64,
    /// The release it replaces, and its spec (what a rollback restores).
    pub from_release: u64,
    pub from_spec: ServiceSpec,
    pub policy: RolloutPolicy,
    pub state: RolloutState,
    pub batches: Vec<Batch>,
    pub halt_reason: Option<String>,
    /// The release a rollback made (a copy of `from_release`).
    pub rolled_back_as_release: Option<u64>,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

impl RolloutRecord {
    /// Whether only admitted instances may take the new spec.
    pub fn gates(&self) -> bool {
        matches!(self.state, RolloutState::Progressing | RolloutState::Halted)
    }
}

/// A part of the views: per service (by `crate::projection::org_scoped_key`), its latest
/// rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RolloutIndex {
    pub services: BTreeMap<String, RolloutRecord>,
}

impl RolloutIndex {
    /// A `ServiceDefined` of `spec` as release `release`, replacing `previous` (release
    /// `previous_release`). A new release with a rollout policy over an existing service starts
    /// a rollout; any other definition ends the gate (instances take the spec at once).
    pub fn record_defined(
        &mut self,
        key: &str,
        org: &str,
        previous: Option<(&ServiceSpec, u64)>,
        spec: &ServiceSpec,
        release: u64,
        at_unix_ms: u64,
    ) {
        let name = key.to_string();
        match (previous, spec.rollout) {
            (Some((previous, from_release)), Some(policy)) if previous != spec => {
                self.services.insert(
                    name,
                    RolloutRecord {
                        org: org.to_string(),
                        release,
                        from_release,
                        from_spec: previous.clone(),
                        policy,
                        state: RolloutState::Progressing,
                        batches: Vec::new(),
                        halt_reason: None,
                        rolled_back_as_release: None,
                        started_unix_ms: at_unix_ms,
                        updated_unix_ms: at_unix_ms,
                    },
                );
            }
            (Some((previous, _)), _) if previous == spec => {}
            _ => {
                self.services.remove(&name);
            }
        }
    }

    /// The rollout of service `key` for `release`, to apply a `Rollout*` event to; events of
    /// an older release (superseded by a newer definition) change nothing.
    pub fn record_mut(&mut self, key: &str, release: u64) -> Option<&mut RolloutRecord> {
        self.services
            .get_mut(key)
            .filter(|record| record.release == release)
    }

    pub fn record_deleted(&mut self, key: &str) {
        self.services.remove(key);
    }

    /// The scheduler's gate for service `key`: `None` when its instances take its spec at
    /// once, else the instances admitted so far.
    pub fn gate(&self, key: &str) -> Option<BTreeSet<String>> {
        let record = self.services.get(key).filter(|r| r.gates())?;
        Some(
            engine::admitted(&record.batches)
                .into_iter()
                .map(str::to_string)
                .collect(),
        )
    }

    /// Whether any rollout waits for decisions.
    pub fn any_progressing(&self) -> bool {
        self.services
            .values()
            .any(|r| r.state == RolloutState::Progressing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Event;
    use crate::projection::Views;
    use crate::store::StoredEvent;

    fn spec(version: &str, rollout: bool) -> ServiceSpec {
        let mut spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"web","command":"/bin/app"}"#).unwrap();
        spec.args = vec![version.to_string()];
        spec.rollout = rollout.then_some(RolloutPolicy {
            max_parallel: 1,
            health_deadline_secs: 5,
            auto_rollback: true,
        });
        spec
    }

    fn fold(events: &[Event]) -> Views {
        let mut views = Views::new();
        for (i, event) in events.iter().enumerate() {
            let new = event.to_new_event();
            views
                .apply(&StoredEvent {
                    event_id: i as u64 + 1,
                    aggregate: new.aggregate,
                    seq: i as u64 + 1,
                    kind: new.kind,
                    schema_version: new.schema_version,
                    at_unix_ms: (i as u64 + 1) * 1000,
                    routing_keys: new.routing_keys,
                    data: new.data,
                })
                .unwrap();
        }
        views
    }

    #[test]
    fn a_release_with_a_policy_starts_a_rollout_and_a_rollback_is_the_next_release() {
        let define = |spec: ServiceSpec| Event::ServiceDefined {
            org: "o".into(),
            spec,
        };
        // A first release is no rollout; a changed one with a policy is.
        let views = fold(&[define(spec("1", true))]);
        assert!(views.rollouts.services.is_empty());
        let key = crate::projection::org_scoped_key("o", "web");
        let key = key.as_str();
        let mut events = vec![define(spec("1", true)), define(spec("2", true))];
        let views = fold(&events);
        let record = &views.rollouts.services[key];
        assert_eq!((record.release, record.from_release), (2, 1));
        assert_eq!(record.state, RolloutState::Progressing);
        assert_eq!(views.rollouts.gate(key), Some(BTreeSet::new()));
        events.push(Event::RolloutBatchStarted {
            org: "o".into(),
            service: "web".into(),
            release: 2,
            batch: 1,
            allocations: vec!["web-1".into()],
        });
        // An event of another release changes nothing.
        events.push(Event::RolloutCompleted {
            org: "o".into(),
            service: "web".into(),
            release: 1,
        });
        let views = fold(&events);
        assert_eq!(
            views.rollouts.gate(key),
            Some(BTreeSet::from(["web-1".to_string()]))
        );
        assert_eq!(
            views.rollouts.services[key].batches[0].started_unix_ms,
            3000
        );
        events.push(Event::RolloutHalted {
            org: "o".into(),
            service: "web".into(),
            release: 2,
            batch: 1,
            reason: "not ready".into(),
        });
        events.push(Event::RolloutRolledBack {
            org: "o".into(),
            service: "web".into(),
            release: 2,
            restores_release: 1,
            spec: spec("1", true),
        });
        let views = fold(&events);
        let record = &views.rollouts.services[key];
        assert_eq!(record.state, RolloutState::RolledBack);
        assert_eq!(record.rolled_back_as_release, Some(3));
        assert_eq!(record.halt_reason.as_deref(), Some("not ready"));
        assert_eq!(views.rollouts.gate(key), None);
        assert_eq!(
            views.service("o", "web").unwrap().spec.args,
            vec!["1".to_string()]
        );
        assert_eq!(views.releases.latest("o", "web"), 3);
        // A release without a policy ends the gate.
        events.push(define(spec("4", false)));
        assert!(fold(&events).rollouts.services.is_empty());
    }
}
