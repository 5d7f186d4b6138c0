//! The artifact cache (`crate::artifact`) inside the running agent: the boot check of what the boot plan
//! references, fetching what a new plan references before it is applied (so a failed
//! download leaves the running release alone), and the `artifacts` thread that repairs what
//! the running plan misses (a corrupt file removed at boot, an offline boot) and collects
//! garbage. Each artifact's state is in status (`artifacts`).

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_proto::plan::Plan;

use std::sync::Arc;

use crate::artifact::{ArtifactCache, ArtifactError, fetch, plan_artifacts};
use crate::config::AgentConfig;
use crate::enroll::Enrollment;
use crate::node::PlanState;
use crate::status::StatusBoard;
use crate::store::Store;

/// What the `artifacts` thread and plan promotion need to fetch into the cache.
#[derive(Clone)]
pub struct ArtifactParts {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub plan: Arc<PlanState>,
    pub enrollment: Enrollment,
}

/// Serializes downloads, unpacks and garbage collection in the cache.
static FETCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How often the thread looks for missing artifacts and collects garbage.
const ROUND: Duration = Duration::from_secs(2);

/// Checks every cached artifact `plan` references; corrupt ones are removed (never run).
/// Returns notes for status.
pub fn check_at_boot(
    cache: &ArtifactCache,
    plan: &Plan,
    board: Option<&StatusBoard>,
) -> Vec<String> {
    let mut notes = Vec::new();
    for sha256 in plan_artifacts(plan) {
        let state = if !cache.is_ready(&sha256) {
            "missing: fetched once control answers".to_string()
        } else {
            match cache.verify(&sha256) {
                Ok(()) => "ready (verified at boot)".to_string(),
                Err(error) => {
                    notes.push(error.to_string());
                    format!(
                        "corrupt at boot, removed: fetched again once control answers ({error})"
                    )
                }
            }
        };
        if let Some(board) = board {
            board.update(|s| {
                s.artifacts.insert(sha256.clone(), state.clone());
            });
        }
    }
    notes
}

/// Fetches whatever `plan` references and the cache lacks. Without a session, a missing
/// artifact is an error: the plan cannot run yet.
pub fn ensure_for_plan(agent: &ArtifactParts, plan: &Plan) -> Result<(), ArtifactError> {
    let cache = ArtifactCache::new(&agent.config.data_dir);
    for sha256 in plan_artifacts(plan) {
        if cache.is_ready(&sha256) {
            continue;
        }
        let Some(session) = agent.enrollment.current_session() else {
            return Err(ArtifactError::Download {
                sha256,
                reason: "no session with control yet".into(),
            });
        };
        // The feed thread (a new plan) and the artifacts thread (repairs) may want the same
        // artifact: one download at a time, and the second finds it ready.
        let _one_at_a_time = crate::node::lock(&FETCH_LOCK);
        if cache.is_ready(&sha256) {
            continue;
        }
        set_state(&agent.board, &sha256, "fetching".into());
        match fetch::ensure(&cache, &session.client, &sha256) {
            Ok(report) => set_state(
                &agent.board,
                &sha256,
                format!(
                    "ready (fetched {} bytes, resumed {} times)",
                    report.received_bytes, report.resumed
                ),
            ),
            Err(error) => {
                set_state(&agent.board, &sha256, format!("failed: {error}"));
                return Err(error);
            }
        }
    }
    Ok(())
}

fn set_state(board: &StatusBoard, sha256: &str, state: String) {
    board.update(|s| {
        s.artifacts.insert(sha256.to_string(), state);
    });
}

/// What garbage collection must keep: the running plan's, the last-good and the candidate's.
fn referenced(agent: &ArtifactParts) -> BTreeSet<String> {
    let mut keep = plan_artifacts(&agent.plan.current_plan());
    if let Ok(state) = agent.store.state()
        && let Some(last_good) = &state.last_good
    {
        keep.extend(plan_artifacts(last_good));
    }
    if let Ok(candidate) = agent.store.read_candidate() {
        keep.extend(plan_artifacts(&candidate));
    }
    keep
}

/// One round of the thread: repair the running plan's artifacts, then collect garbage.
pub fn round(agent: &ArtifactParts) {
    let plan = agent.plan.current_plan();
    if let Err(error) = ensure_for_plan(agent, &plan)
        && agent.enrollment.current_session().is_some()
    {
        tracing::warn!(component = "artifacts", action = "ensure", "{error}");
    }
    let cache = ArtifactCache::new(&agent.config.data_dir);
    // Not while a download or an unpack is under way (collection clears unpack staging), and
    // with what the plans reference read under the same lock: a plan whose artifact was just
    // fetched is in the store as candidate or last-good by then.
    let (keep, report) = {
        let _no_fetch = crate::node::lock(&FETCH_LOCK);
        let keep = referenced(agent);
        let report = cache.collect_garbage(&keep, agent.config.artifact_cache_bytes);
        (keep, report)
    };
    agent.board.update(|s| {
        s.artifacts.retain(|sha, _| keep.contains(sha));
        s.notes.retain(|n| !n.starts_with("artifact cache is over"));
        if report.over_cap {
            s.note(format!(
                "artifact cache is over --artifact-cache-bytes {}: the plans reference {} bytes",
                agent.config.artifact_cache_bytes, report.kept_bytes
            ));
        }
    });
}

/// Starts the `artifacts` thread.
pub fn spawn(agent: &ArtifactParts) -> std::io::Result<()> {
    let agent = agent.clone();
    std::thread::Builder::new()
        .name("artifacts".into())
        .spawn(move || {
            loop {
                round(&agent);
                std::thread::sleep(ROUND);
            }
        })
        .map(|_| ())
}
