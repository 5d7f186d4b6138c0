//! `GET /v1/services/{name}/rollout`: the service's latest rollout with live counts.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use outpost_proto::rollout::RolloutPolicy;
use serde::{Deserialize, Serialize};

use crate::api::auth::{Scope, org_service};
use crate::api::authenticate;
use crate::api::error::ApiError;
use crate::api::extract::ApiPath;
use crate::app::Control;

use super::service::{counts, service_units};

/// What `outpostctl rollout status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    pub service: String,
    /// `none` (the service has no rollout: its instances take every release at once),
    /// `progressing`, `completed`, `halted` or `rolled_back`.
    pub state: String,
    /// The release rolled out (the newest release when `none`).
    pub release: u64,
    /// The release it replaces.
    pub from_release: Option<u64>,
    /// The release a rollback made (a copy of `from_release`).
    pub rolled_back_as_release: Option<u64>,
    /// The newest release, which the counts are about.
    pub current_release: u64,
    pub policy: Option<RolloutPolicy>,
    /// The latest batch started (0: none yet) and how many a rollout of every instance takes.
    pub batch: u32,
    pub batches_total: u32,
    /// Instances of the service, those running the current release, those of them ready, and
    /// those of them failing (failed, unready or backing off).
    pub total: usize,
    pub updated: usize,
    pub healthy: usize,
    pub failed: usize,
    pub halt_reason: Option<String>,
    pub started_at_unix_ms: Option<u64>,
    pub updated_at_unix_ms: Option<u64>,
}

pub async fn status(
    State(control): State<Arc<Control>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let views = control.projector.views();
    let service = org_service(&views, &name, &org)
        .map_err(|e| crate::audit::audit_not_found(&control, &principal, e))?;
    let units = service_units(
        &views,
        &control.status,
        &org,
        &name,
        control.hub.position().log_epoch,
    );
    let counts = counts(&units);
    let current_release = views.releases.latest(&org, &name);
    let record = views
        .rollouts
        .services
        .get(&crate::projection::org_scoped_key(&org, &name));
    let batches_total = |max_parallel: u32| {
        u32::try_from(units.len().div_ceil(max_parallel.max(1) as usize)).unwrap_or(u32::MAX)
    };
    let view = match record {
        Some(record) => RolloutView {
            service: name.clone(),
            state: record.state.as_str().to_string(),
            release: record.release,
            from_release: Some(record.from_release),
            rolled_back_as_release: record.rolled_back_as_release,
            current_release,
            policy: Some(record.policy),
            batch: record.batches.last().map_or(0, |b| b.number),
            batches_total: batches_total(record.policy.max_parallel),
            total: counts.total,
            updated: counts.updated,
            healthy: counts.healthy,
            failed: counts.failed,
            halt_reason: record.halt_reason.clone(),
            started_at_unix_ms: Some(record.started_unix_ms),
            updated_at_unix_ms: Some(record.updated_unix_ms),
        },
        None => RolloutView {
            service: name.clone(),
            state: "none".into(),
            release: current_release,
            from_release: None,
            rolled_back_as_release: None,
            current_release,
            policy: service.spec.rollout,
            batch: 0,
            batches_total: 0,
            total: counts.total,
            updated: counts.updated,
            healthy: counts.healthy,
            failed: counts.failed,
            halt_reason: None,
            started_at_unix_ms: None,
            updated_at_unix_ms: None,
        },
    };
    Ok(axum::Json(view).into_response())
}
