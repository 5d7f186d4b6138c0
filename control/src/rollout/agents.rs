//! Agent upgrades (U2): the rollout engine over nodes. `POST /v1/agents/upgrade` names a signed
//! agent binary (an artifact the org pushed) and the nodes it goes to (a selector); batches of
//! `max_parallel` nodes are admitted, and an admitted node that has not switched yet finds the
//! binary and its signature in its heartbeat answer. A node is updated and ready when its
//! heartbeat reports the new binary committed (it registered and got a heartbeat through); one
//! that reports the attempt refused or rolled back fails its batch, which halts the rollout.
//! There is nothing to roll back on control: a failing node goes back by itself, and nodes not
//! yet admitted never switch. Control relays the signature; the agents verify it with the key
//! they pinned.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use outpost_proto::release::{AgentBuild, AgentUpgrade};
use outpost_proto::rollout::RolloutPolicy;
use outpost_proto::service::Selector;
use serde::{Deserialize, Serialize};

use crate::api::auth::Scope;
use crate::api::error::ApiError;
use crate::api::views::HeartbeatRecord;
use crate::api::{authenticate, heartbeats, read_body};
use crate::app::Control;
use crate::log::Event;
use crate::projection::{NodeState, Views};

use super::RolloutState;
use super::engine::{Batch, Health, Step, Unit, next_step};

/// Default health deadline of a batch: the new binary must register and report in time.
pub const DEFAULT_HEALTH_DEADLINE_SECS: u32 = 120;

/// An org's latest agent upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpgradeRecord {
    /// 1, 2, … per org; events of an older upgrade change nothing.
    pub number: u64,
    pub artifact: String,
    pub signature: String,
    /// The nodes selected when it started.
    pub nodes: Vec<String>,
    pub policy: RolloutPolicy,
    pub state: RolloutState,
    pub batches: Vec<Batch>,
    pub halt_reason: Option<String>,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

/// A part of the views: each org's latest agent upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentUpgradeIndex {
    pub orgs: BTreeMap<String, AgentUpgradeRecord>,
}

impl AgentUpgradeIndex {
    /// Folds an agent-upgrade event; other events change nothing.
    pub fn apply(&mut self, event: &Event, at_unix_ms: u64) {
        match event {
            Event::AgentUpgradeStarted {
                org,
                number,
                artifact,
                signature,
                nodes,
                max_parallel,
                health_deadline_secs,
            } => {
                self.orgs.insert(
                    org.clone(),
                    AgentUpgradeRecord {
                        number: *number,
                        artifact: artifact.clone(),
                        signature: signature.clone(),
                        nodes: nodes.clone(),
                        policy: RolloutPolicy {
                            max_parallel: *max_parallel,
                            health_deadline_secs: *health_deadline_secs,
                            auto_rollback: false,
                        },
                        state: RolloutState::Progressing,
                        batches: Vec::new(),
                        halt_reason: None,
                        started_unix_ms: at_unix_ms,
                        updated_unix_ms: at_unix_ms,
                    },
                );
            }
            Event::AgentUpgradeBatchStarted {
                org,
                number,
                batch,
                nodes,
            } => {
                if let Some(r) = self.current_mut(org, *number) {
                    r.batches.push(Batch {
                        number: *batch,
                        members: nodes.clone(),
                        started_unix_ms: at_unix_ms,
                    });
                    r.updated_unix_ms = at_unix_ms;
                }
            }
            Event::AgentUpgradeHalted {
                org,
                number,
                reason,
                ..
            } => {
                if let Some(r) = self.current_mut(org, *number) {
                    r.state = RolloutState::Halted;
                    r.halt_reason = Some(reason.clone());
                    r.updated_unix_ms = at_unix_ms;
                }
            }
            Event::AgentUpgradeCompleted { org, number } => {
                if let Some(r) = self.current_mut(org, *number) {
                    r.state = RolloutState::Completed;
                    r.updated_unix_ms = at_unix_ms;
                }
            }
            _ => {}
        }
    }

    fn current_mut(&mut self, org: &str, number: u64) -> Option<&mut AgentUpgradeRecord> {
        self.orgs.get_mut(org).filter(|r| r.number == number)
    }

    pub fn any_progressing(&self) -> bool {
        self.orgs
            .values()
            .any(|r| r.state == RolloutState::Progressing)
    }

    /// What a heartbeat answer tells `node_id` of `org`: the binary to switch to, while the
    /// upgrade admits the node and the node (`build`, when known) does not run it yet. Also
    /// what lets the node download that artifact.
    pub fn offer(
        &self,
        org: &str,
        node_id: &str,
        build: Option<&AgentBuild>,
    ) -> Option<AgentUpgrade> {
        let record = self
            .orgs
            .get(org)
            .filter(|r| matches!(r.state, RolloutState::Progressing | RolloutState::Halted))?;
        if !super::engine::admitted(&record.batches).contains(node_id)
            || build.is_some_and(|b| b.sha256.as_deref() == Some(record.artifact.as_str()))
        {
            return None;
        }
        Some(AgentUpgrade {
            sha256: record.artifact.clone(),
            signature: record.signature.clone(),
        })
    }
}

/// The upgrade's nodes as the engine's units: updated once the node runs the new binary
/// committed (or reports the attempt failed), ready when it does and its heartbeat is fresh.
pub fn node_units(
    views: &Views,
    beats: &BTreeMap<String, HeartbeatRecord>,
    record: &AgentUpgradeRecord,
    now_unix_ms: u64,
    ttl_secs: u32,
) -> Vec<Unit> {
    record
        .nodes
        .iter()
        .map(|node_id| {
            let beat = beats.get(node_id);
            let build = beat.and_then(|b| b.agent.as_ref());
            let runs = build.is_some_and(|b| b.sha256.as_deref() == Some(record.artifact.as_str()));
            let report = build
                .and_then(|b| b.upgrade.as_ref())
                .filter(|u| u.target_sha256 == record.artifact);
            let fresh = beat.is_some_and(|b| {
                now_unix_ms.saturating_sub(b.at_unix_ms) <= u64::from(ttl_secs) * 1000
            });
            let health = match report {
                Some(u) if u.state.failed() => {
                    Health::Failed(format!("agent upgrade {}: {}", u.state.as_str(), u.message))
                }
                _ if runs && fresh => Health::Ready,
                Some(u) => Health::Waiting(u.state.as_str().to_string()),
                None => Health::Waiting(String::new()),
            };
            Unit {
                id: node_id.clone(),
                node_id: node_id.clone(),
                updated: runs || matches!(health, Health::Failed(_)),
                health,
                available: views
                    .nodes
                    .get(node_id)
                    .is_some_and(|n| n.state == NodeState::Ready),
            }
        })
        .collect()
}

/// The events the upgrade's next step appends.
pub fn decide(
    org: &str,
    record: &AgentUpgradeRecord,
    units: &[Unit],
    now_unix_ms: u64,
) -> Vec<Event> {
    if record.state != RolloutState::Progressing {
        return Vec::new();
    }
    let (org, number) = (org.to_string(), record.number);
    match next_step(&record.policy, &record.batches, units, now_unix_ms) {
        Step::Wait { .. } => Vec::new(),
        Step::StartBatch {
            number: batch,
            members,
        } => vec![Event::AgentUpgradeBatchStarted {
            org,
            number,
            batch,
            nodes: members,
        }],
        Step::Complete => vec![Event::AgentUpgradeCompleted { org, number }],
        Step::Halt { batch, reason } => vec![Event::AgentUpgradeHalted {
            org,
            number,
            batch,
            reason,
        }],
    }
}

fn decide_all(control: &Control, views: &Views, now_unix_ms: u64) -> Vec<Event> {
    let beats = heartbeats(control);
    let ttl = control.settings.node_ttl_secs;
    views
        .agent_upgrades
        .orgs
        .iter()
        .flat_map(|(org, record)| {
            let units = node_units(views, &beats, record, now_unix_ms, ttl);
            decide(org, record, &units, now_unix_ms)
        })
        .collect()
}

/// One driver pass over every progressing agent upgrade (as `service::run_rollouts_once`).
pub async fn run_agent_upgrades_once(control: &Control) -> Result<usize, ApiError> {
    let now = control.clock.now_unix_ms();
    if decide_all(control, &control.projector.views(), now).is_empty() {
        return Ok(0);
    }
    let guard = control.lock_commands_settled().await;
    let events = decide_all(control, &control.projector.views(), now);
    if events.is_empty() {
        return Ok(0);
    }
    for event in &events {
        if let Event::AgentUpgradeHalted { org, reason, .. } = event {
            tracing::warn!("agent upgrade of org {org} halted: {reason}");
        }
    }
    control.append(guard, &events).await?;
    Ok(events.len())
}

/// `POST /v1/agents/upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    pub artifact: String,
    /// The release signature (`outpostctl artifacts sign`), base64.
    pub signature: String,
    #[serde(default)]
    pub selector: Selector,
    #[serde(default = "one")]
    pub max_parallel: u32,
    #[serde(default = "default_deadline")]
    pub health_deadline_secs: u32,
}

fn one() -> u32 {
    1
}

fn default_deadline() -> u32 {
    DEFAULT_HEALTH_DEADLINE_SECS
}

/// One node in `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    pub node_id: String,
    pub state: String,
    pub arch: String,
    /// What the node last reported (`None` before its first report).
    pub agent: Option<AgentBuild>,
}

/// The org's latest upgrade in `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpgradeView {
    pub number: u64,
    pub artifact: String,
    /// `progressing`, `completed` or `halted`.
    pub state: String,
    pub nodes: Vec<String>,
    pub max_parallel: u32,
    pub health_deadline_secs: u32,
    pub batch: u32,
    /// Nodes running the new binary, healthy.
    pub updated: usize,
    pub halt_reason: Option<String>,
    pub started_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsView {
    pub nodes: Vec<AgentView>,
    pub upgrade: Option<AgentUpgradeView>,
}

fn agents_view(control: &Control, org: &str) -> AgentsView {
    let views = control.projector.views();
    let beats = heartbeats(control);
    let nodes = views
        .nodes
        .values()
        .filter(|n| n.org == org)
        .map(|n| AgentView {
            node_id: n.node_id.clone(),
            state: n.state.as_str().to_string(),
            arch: n.facts.arch.clone(),
            agent: beats.get(&n.node_id).and_then(|b| b.agent.clone()),
        })
        .collect();
    let upgrade = views.agent_upgrades.orgs.get(org).map(|r| {
        let units = node_units(
            &views,
            &beats,
            r,
            control.clock.now_unix_ms(),
            control.settings.node_ttl_secs,
        );
        AgentUpgradeView {
            number: r.number,
            artifact: r.artifact.clone(),
            state: r.state.as_str().to_string(),
            nodes: r.nodes.clone(),
            max_parallel: r.policy.max_parallel,
            health_deadline_secs: r.policy.health_deadline_secs,
            batch: r.batches.last().map_or(0, |b| b.number),
            updated: units.iter().filter(|u| u.health == Health::Ready).count(),
            halt_reason: r.halt_reason.clone(),
            started_at_unix_ms: r.started_unix_ms,
            updated_at_unix_ms: r.updated_unix_ms,
        }
    });
    AgentsView { nodes, upgrade }
}

/// `GET /v1/agents`: each node's agent build and the org's latest upgrade.
pub async fn list(
    State(control): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    Ok(axum::Json(agents_view(&control, &org)).into_response())
}

/// `POST /v1/agents/upgrade`: starts an upgrade of the selected nodes to a pushed artifact.
pub async fn upgrade(
    State(control): State<Arc<Control>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::NodesWrite)?.to_string();
    let request: UpgradeRequest = serde_json::from_slice(&read_body(body).await?)
        .map_err(|e| ApiError::invalid("body", format!("not an agent upgrade request: {e}"), ""))?;
    outpost_proto::artifact::check_sha256("artifact", &request.artifact)?;
    outpost_proto::validate::check_text("signature", &request.signature)?;
    if request.signature.is_empty() {
        return Err(ApiError::invalid(
            "signature",
            "is required (outpostctl artifacts sign --key FILE SHA256)",
            "",
        ));
    }
    let policy = RolloutPolicy {
        max_parallel: request.max_parallel,
        health_deadline_secs: request.health_deadline_secs,
        auto_rollback: false,
    };
    outpost_proto::validate::Validate::validate(&policy)?;
    let guard = control.lock_commands().await;
    let (number, nodes) = {
        let views = control.projector.views();
        if views.artifacts.held_by(&org, &request.artifact).is_none() {
            return Err(ApiError::NotFound {
                what: "artifact",
                value: request.artifact,
            });
        }
        if let Some(running) = views
            .agent_upgrades
            .orgs
            .get(&org)
            .filter(|r| r.state == RolloutState::Progressing)
        {
            return Err(ApiError::invalid(
                "artifact",
                format!(
                    "agent upgrade {} to {} is still progressing",
                    running.number, running.artifact
                ),
                &request.artifact,
            ));
        }
        let nodes: Vec<String> = views
            .nodes
            .values()
            .filter(|n| n.org == org && n.state != NodeState::Revoked)
            .filter(|n| request.selector.matches(&n.labels(), &n.facts.arch))
            .map(|n| n.node_id.clone())
            .collect();
        if nodes.is_empty() {
            return Err(ApiError::invalid(
                "selector",
                "selects no node of the org",
                serde_json::to_string(&request.selector).unwrap_or_default(),
            ));
        }
        let number = views
            .agent_upgrades
            .orgs
            .get(&org)
            .map_or(1, |r| r.number + 1);
        (number, nodes)
    };
    let event_id = control
        .append(
            guard,
            &[Event::AgentUpgradeStarted {
                org: org.clone(),
                number,
                artifact: request.artifact,
                signature: request.signature,
                nodes,
                max_parallel: policy.max_parallel,
                health_deadline_secs: policy.health_deadline_secs,
            }],
        )
        .await?;
    let _ = control
        .projector
        .wait_for(event_id, control.settings.projection_wait)
        .await;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(agents_view(&control, &org)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(id: &str, updated: bool, health: Health) -> Unit {
        Unit {
            id: id.into(),
            node_id: id.into(),
            updated,
            health,
            available: true,
        }
    }

    #[test]
    fn admitted_nodes_get_the_offer_until_they_run_it_and_a_rolled_back_node_halts() {
        let artifact = "ab".repeat(32);
        let mut index = AgentUpgradeIndex::default();
        index.apply(
            &Event::AgentUpgradeStarted {
                org: "o".into(),
                number: 1,
                artifact: artifact.clone(),
                signature: "c2ln".into(),
                nodes: vec!["n1".into(), "n2".into()],
                max_parallel: 1,
                health_deadline_secs: 10,
            },
            1_000,
        );
        assert!(index.any_progressing());
        assert_eq!(index.offer("o", "n1", None), None, "not admitted yet");
        let waiting = || Health::Waiting(String::new());
        let units = vec![unit("n1", false, waiting()), unit("n2", false, waiting())];
        let events = decide("o", &index.orgs["o"].clone(), &units, 1_000);
        assert_eq!(
            events,
            vec![Event::AgentUpgradeBatchStarted {
                org: "o".into(),
                number: 1,
                batch: 1,
                nodes: vec!["n1".into()],
            }]
        );
        index.apply(&events[0], 2_000);
        let offered = index.offer("o", "n1", None).unwrap();
        assert_eq!(
            (offered.sha256.as_str(), offered.signature.as_str()),
            (artifact.as_str(), "c2ln")
        );
        let on_it = AgentBuild {
            version: "0.1.0".into(),
            sha256: Some(artifact.clone()),
            upgrade: None,
        };
        assert_eq!(index.offer("o", "n1", Some(&on_it)), None);
        assert_eq!(index.offer("o", "n2", None), None);
        assert_eq!(index.offer("other", "n1", None), None);
        // The node rolled back: the batch fails at once and no further batch starts.
        let units = vec![
            unit(
                "n1",
                true,
                Health::Failed("agent upgrade rolled_back: stopped".into()),
            ),
            unit("n2", false, waiting()),
        ];
        let events = decide("o", &index.orgs["o"].clone(), &units, 2_500);
        let [
            Event::AgentUpgradeHalted {
                batch: 1, reason, ..
            },
        ] = events.as_slice()
        else {
            panic!("expected a halt, got {events:?}");
        };
        assert!(
            reason.contains("n1") && reason.contains("rolled_back"),
            "{reason}"
        );
        index.apply(&events[0], 3_000);
        assert_eq!(index.orgs["o"].state, RolloutState::Halted);
        assert!(!index.any_progressing());
        assert!(decide("o", &index.orgs["o"].clone(), &units, 4_000).is_empty());
        // Events of an older upgrade change nothing.
        index.apply(
            &Event::AgentUpgradeCompleted {
                org: "o".into(),
                number: 0,
            },
            5_000,
        );
        assert_eq!(index.orgs["o"].state, RolloutState::Halted);
    }
}
