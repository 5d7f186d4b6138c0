//! The release routes: `GET /v1/services/{name}/releases` and
//! `POST /v1/services/{name}/rollback` (`{"to": N}`, optional).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::api::auth::Scope;
use crate::api::error::ApiError;
use crate::api::extract::ApiPath;
use crate::api::{authenticate, read_body};
use crate::app::{Control, blocking};
use crate::command::Command;
use crate::command::execute::execute;

use super::{fold_releases, service_aggregate};

/// One row of `outpostctl services history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub release: u64,
    pub event_id: u64,
    pub at_unix_ms: u64,
    /// Whether this is the release the service runs now.
    pub current: bool,
    pub artifact_sha256: Option<String>,
    pub spec: outpost_proto::service::ServiceSpec,
}

/// The body of a rollback request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    #[serde(default)]
    pub to: Option<u64>,
}

pub async fn history(
    State(control): State<Arc<Control>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    // Another org's service of that name is not found either (P4).
    {
        let views = control.projector.views();
        if views.service(&org, &name).is_none() {
            return Err(crate::audit::not_found_here(
                &control, &views, &principal, "service", &name,
            ));
        }
    }
    let store = Arc::clone(&control.store);
    let aggregate = service_aggregate(&org, &name);
    let events = blocking(move || Ok(store.read_aggregate(&aggregate)?)).await?;
    let releases = fold_releases(&events).map_err(ApiError::internal)?;
    let newest = releases.last().map_or(0, |r| r.release);
    let views: Vec<ReleaseView> = releases
        .into_iter()
        .map(|release| ReleaseView {
            current: release.release == newest,
            release: release.release,
            event_id: release.event_id,
            at_unix_ms: release.at_unix_ms,
            artifact_sha256: release.spec.artifact.as_ref().map(|a| a.sha256.clone()),
            spec: release.spec,
        })
        .collect();
    Ok(axum::Json(views).into_response())
}

/// Parses a rollback body; an empty body rolls back to the release before the newest.
pub fn parse_rollback(bytes: &[u8]) -> Result<RollbackRequest, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RollbackRequest::default());
    }
    serde_json::from_slice(bytes).map_err(|error| ApiError::InvalidBody {
        reason: format!("not a rollback request ({{\"to\": N}}): {error}"),
        field: Some("to".into()),
    })
}

pub async fn rollback(
    State(control): State<Arc<Control>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let request = parse_rollback(&read_body(body).await?)?;
    outpost_proto::name::check_name("name", &name)?;
    Ok(execute(
        &control,
        Some(&principal),
        Command::RollbackService {
            name,
            to: request.to,
        },
        None,
    )
    .await?
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_bodies() {
        assert_eq!(parse_rollback(b"").unwrap().to, None);
        assert_eq!(parse_rollback(br#"{"to":3}"#).unwrap().to, Some(3));
        let error = parse_rollback(br#"{"to":"x"}"#).unwrap_err();
        assert!(error.to_string().contains("to"), "{error}");
        assert!(parse_rollback(br#"{"too":1}"#).is_err());
    }
}
