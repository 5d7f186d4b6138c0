//! Rollouts of service releases: a service's instances as the engine's units, and the driver
//! pass that turns the engine's steps into events. Readiness is reported state on the status
//! board (`app/status.rs`), never an event, so the driver looks on a timer while a rollout
//! progresses (`Control::follow_rollouts`).

use outpost_proto::node::AllocationState;
use outpost_proto::service::ServiceSpec;

use crate::api::error::ApiError;
use crate::api::views::AllocationStatusRecord;
use crate::app::Control;
use crate::app::status::StatusBoard;
use crate::log::Event;
use crate::projection::{NodeState, Views};

use super::engine::{Health, Step, Unit, next_step};
use super::{RolloutRecord, RolloutState};

/// Whether an instance running `current` runs `target` (placement and rollout fields aside).
pub fn runs(current: &ServiceSpec, target: &ServiceSpec) -> bool {
    current.as_instance() == target.as_instance()
}

/// The service's instances as units of a rollout to its current spec. An instance is ready
/// when its node reported it `running` from a plan at or past the event that gave it its
/// spec (in the log epoch `log_epoch`): a report about the spec before never counts.
pub fn service_units(
    views: &Views,
    status: &StatusBoard,
    org: &str,
    service: &str,
    log_epoch: u64,
) -> Vec<Unit> {
    let Some(target) = views.service(org, service).map(|s| &s.spec) else {
        return Vec::new();
    };
    views
        .allocations
        .values()
        .filter(|a| a.org == org && a.service == service)
        .map(|allocation| {
            let record = status
                .get(&Control::allocation_status_key(&allocation.allocation_id))
                .and_then(|bytes| serde_json::from_slice::<AllocationStatusRecord>(&bytes).ok());
            let current = record.filter(|r| {
                r.plan_cursor.is_some_and(|cursor| {
                    cursor.log_epoch == log_epoch
                        && cursor.event_id >= allocation.spec_since_event_id()
                })
            });
            let health = match current {
                None => Health::Waiting("no report on the new spec yet".into()),
                Some(r) => {
                    let state = r.state.as_str();
                    let said = if r.message.is_empty() {
                        state.to_string()
                    } else {
                        format!("{state}: {}", r.message)
                    };
                    match r.state {
                        AllocationState::Running => Health::Ready,
                        AllocationState::Failed => Health::Failed(said),
                        _ => Health::Waiting(said),
                    }
                }
            };
            Unit {
                id: allocation.allocation_id.clone(),
                node_id: allocation.node_id.clone(),
                updated: runs(&allocation.spec, target),
                health,
                available: views
                    .nodes
                    .get(&allocation.node_id)
                    .is_some_and(|n| n.state == NodeState::Ready),
            }
        })
        .collect()
}

/// Counts shown by `outpostctl rollout status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub updated: usize,
    pub healthy: usize,
    pub failed: usize,
}

pub fn counts(units: &[Unit]) -> Counts {
    let updated: Vec<&Unit> = units.iter().filter(|u| u.updated).collect();
    Counts {
        total: units.len(),
        updated: updated.len(),
        healthy: updated.iter().filter(|u| u.health == Health::Ready).count(),
        failed: updated
            .iter()
            .filter(|u| match &u.health {
                Health::Failed(_) => true,
                Health::Waiting(said) => said.starts_with("unready") || said.starts_with("backoff"),
                Health::Ready => false,
            })
            .count(),
    }
}

/// The events one rollout's next step appends, and when to look again without new reports.
pub fn decide(
    service: &str,
    record: &RolloutRecord,
    units: &[Unit],
    now_unix_ms: u64,
) -> (Vec<Event>, Option<u64>) {
    if record.state != RolloutState::Progressing {
        return (Vec::new(), None);
    }
    let org = record.org.clone();
    let service = service.to_string();
    let release = record.release;
    match next_step(&record.policy, &record.batches, units, now_unix_ms) {
        Step::Wait { until_unix_ms } => (Vec::new(), until_unix_ms),
        Step::StartBatch { number, members } => (
            vec![Event::RolloutBatchStarted {
                org,
                service,
                release,
                batch: number,
                allocations: members,
            }],
            None,
        ),
        Step::Complete => (
            vec![Event::RolloutCompleted {
                org,
                service,
                release,
            }],
            None,
        ),
        Step::Halt { batch, reason } => {
            let mut events = vec![Event::RolloutHalted {
                org: org.clone(),
                service: service.clone(),
                release,
                batch,
                reason,
            }];
            if record.policy.auto_rollback {
                events.push(Event::RolloutRolledBack {
                    org,
                    service,
                    release,
                    restores_release: record.from_release,
                    spec: record.from_spec.clone(),
                });
            }
            (events, None)
        }
    }
}

/// The decisions of every progressing rollout at these views.
fn decide_all(control: &Control, views: &Views, now_unix_ms: u64) -> Vec<Event> {
    let log_epoch = control.hub.position().log_epoch;
    views
        .rollouts
        .services
        .values()
        .filter(|record| record.state == RolloutState::Progressing)
        .flat_map(|record| {
            let service = record.from_spec.name.as_str();
            let units = service_units(views, &control.status, &record.org, service, log_epoch);
            decide(service, record, &units, now_unix_ms).0
        })
        .collect()
}

/// One driver pass: looks at every progressing rollout and appends its decisions (batch
/// started, completed, halted, rolled back) in one commit, decided again under the settled
/// command lock. Returns how many events were appended.
pub async fn run_rollouts_once(control: &Control) -> Result<usize, ApiError> {
    let now = control.clock.now_unix_ms();
    // A look without the lock first: most passes decide nothing.
    if decide_all(control, &control.projector.views(), now).is_empty() {
        return Ok(0);
    }
    let guard = control.lock_commands_settled().await;
    let events = decide_all(control, &control.projector.views(), now);
    if events.is_empty() {
        return Ok(0);
    }
    for event in &events {
        match event {
            Event::RolloutHalted {
                service, reason, ..
            } => tracing::warn!("rollout of {service} halted: {reason}"),
            Event::RolloutRolledBack {
                service,
                restores_release,
                ..
            } => tracing::warn!("rollout of {service}: rolling back to release {restores_release}"),
            other => tracing::info!("rollout: {}", other.kind()),
        }
    }
    control.append(guard, &events).await?;
    Ok(events.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredEvent;
    use outpost_proto::Cursor;

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
                    at_unix_ms: i as u64 + 1,
                    routing_keys: new.routing_keys,
                    data: new.data,
                })
                .unwrap();
        }
        views
    }

    fn report(board: &StatusBoard, state: AllocationState, cursor_event_id: u64) {
        board.put(vec![Control::config_put(
            Control::allocation_status_key("web-1"),
            &AllocationStatusRecord {
                node_id: "n1".into(),
                state,
                restarts: 0,
                message: String::new(),
                at_unix_ms: 0,
                ports: Vec::new(),
                plan_cursor: Some(Cursor::new(7, cursor_event_id)),
            },
        )]);
    }

    /// A `running` report counts for the new spec only when it was sent from a plan holding
    /// the placement that gave the instance that spec (event 4 here), in the same log epoch.
    #[test]
    fn a_report_about_the_old_spec_never_counts_as_ready() {
        let spec = |version: &str| -> ServiceSpec {
            let mut spec: ServiceSpec =
                serde_json::from_str(r#"{"name":"web","command":"/bin/app"}"#).unwrap();
            spec.args = vec![version.into()];
            spec
        };
        let placed = |spec: ServiceSpec| Event::AllocationPlaced {
            allocation_id: "web-1".into(),
            org: "default".into(),
            service: "web".into(),
            node_id: "n1".into(),
            replica: 0,
            spec,
        };
        let define = |spec: ServiceSpec| Event::ServiceDefined {
            org: "default".into(),
            spec,
        };
        let views = fold(&[
            define(spec("1")),
            placed(spec("1")),
            define(spec("2")),
            placed(spec("2")),
        ]);
        let board = StatusBoard::default();
        let health = |epoch: u64| service_units(&views, &board, "default", "web", epoch)[0].clone();
        report(&board, AllocationState::Running, 3);
        let unit = health(7);
        assert!(unit.updated);
        assert!(matches!(unit.health, Health::Waiting(_)), "{unit:?}");
        report(&board, AllocationState::Running, 4);
        assert_eq!(health(7).health, Health::Ready);
        assert!(
            matches!(health(8).health, Health::Waiting(_)),
            "another epoch"
        );
        report(&board, AllocationState::Failed, 5);
        assert!(matches!(health(7).health, Health::Failed(_)));
    }
}
