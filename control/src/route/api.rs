//! The route and edge HTTP API (docs/api.md): `/v1/routes` for operators, `/v1/edges/...` for
//! edge routers (enrollment, snapshot, feed, report), and the JSON views `outpostctl routes ls`
//! renders.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_proto::Cursor;
use outpost_proto::limits::FEED_BATCH_EVENTS_MAX;
use outpost_proto::route::{Backend, BackendTable, EdgeReport, EdgeSnapshot, RouteSpec};
use outpost_proto::validate::Validate;
use serde::{Deserialize, Serialize};

use super::execute::verify_edge_credential;
use super::{EdgeReportRecord, ReportedState, RouteRecord, backends_of, edge_report_key};
use crate::api::auth::{Principal, Scope};
use crate::api::error::ApiError;
use crate::api::extract::{ApiPath, ApiQuery};
use crate::api::views::{AllocationStatusRecord, HeartbeatRecord};
use crate::api::{
    authenticate, document_format, feed_error, heartbeats, idempotency_key, read_body,
};
use crate::app::Control;
use crate::command::execute::execute;
use crate::command::{self};
use crate::feed::FeedError;

type AppState = Arc<Control>;

/// What an edge reported, as `outpostctl routes ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRouteStatus {
    pub edge_id: String,
    pub cursor: Option<Cursor>,
    pub route_count: u32,
    /// Backends of this route the edge counts healthy, and all it knows.
    pub healthy_backends: usize,
    pub backends: usize,
    pub refused: Option<String>,
    pub at_unix_ms: u64,
}

/// One route as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    pub name: String,
    pub org: String,
    pub spec: RouteSpec,
    pub event_id: u64,
    pub updated_at_unix_ms: u64,
    /// Who defined the current version (`opa.TOKEN_ID`).
    #[serde(default)]
    pub updated_by: String,
    /// The instances control knows behind the route.
    pub backends: Vec<Backend>,
    /// What each edge of the org applied.
    pub edges: Vec<EdgeRouteStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteAnswer {
    pub route: RouteView,
    pub event_id: u64,
}

pub fn route_view(
    record: &RouteRecord,
    backends: Vec<Backend>,
    edges: Vec<EdgeRouteStatus>,
) -> RouteView {
    RouteView {
        name: record.spec.name.to_string(),
        org: record.org.clone(),
        spec: record.spec.clone(),
        event_id: record.event_id,
        updated_at_unix_ms: record.updated_at_unix_ms,
        updated_by: record.updated_by.clone(),
        backends,
        edges,
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/routes", post(define_route).get(list_routes))
        .route("/v1/routes/{name}", axum::routing::delete(delete_route))
        .route("/v1/edges/register", post(register_edge))
        .route("/v1/edges/{edge_id}/routes", get(edge_snapshot))
        .route("/v1/edges/{edge_id}/changes", get(edge_changes))
        .route("/v1/edges/{edge_id}/report", post(edge_report))
}

async fn define_route(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let key = idempotency_key(&headers)?;
    let command = command::parse_define_route(&read_body(body).await?, document_format(&headers))?;
    Ok(execute(&control, Some(&principal), command, key.as_deref())
        .await?
        .into_response())
}

async fn delete_route(
    State(control): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let key = idempotency_key(&headers)?;
    let command = command::parse_delete_route(&name)?;
    Ok(execute(&control, Some(&principal), command, key.as_deref())
        .await?
        .into_response())
}

async fn register_edge(State(control): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let command = command::parse_register_edge(&read_body(body).await?)?;
    Ok(execute(&control, None, command, None)
        .await?
        .into_response())
}

/// The statuses and heartbeats the backends are computed from (the status board, in memory).
fn reported_state(control: &Control) -> ReportedState {
    let mut allocations = BTreeMap::new();
    for (key, bytes) in control.status.scan("allocation-status/") {
        if let Ok(record) = serde_json::from_slice::<AllocationStatusRecord>(&bytes) {
            allocations.insert(
                key.trim_start_matches("allocation-status/").to_string(),
                record,
            );
        }
    }
    let heartbeats: BTreeMap<String, HeartbeatRecord> = heartbeats(control);
    ReportedState {
        allocations,
        heartbeats,
    }
}

fn backend_table(control: &Control, org: &str) -> BackendTable {
    backends_of(&control.projector.views(), org, &reported_state(control))
}

/// The edge itself (by its credential), or an operator of its org with `read`.
async fn edge_caller(
    control: &Control,
    headers: &HeaderMap,
    edge_id: &str,
) -> Result<String, ApiError> {
    command::parse_node_id(edge_id)
        .map_err(|_| ApiError::invalid("edge_id", "is not a valid name", edge_id))?;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let token = authorization.trim().trim_start_matches("Bearer ").trim();
    if token.starts_with(super::EDGE_CREDENTIAL_PREFIX) {
        let (verified, org) = verify_edge_credential(control, token).await?;
        if verified != edge_id {
            return Err(ApiError::forbidden(
                "edge_id",
                edge_id,
                format!("edge {verified} may not act as edge {edge_id}"),
            ));
        }
        return Ok(org);
    }
    let principal: Principal = authenticate(control, headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let views = control.projector.views();
    match views.routes.edges.get(edge_id) {
        Some(edge) if edge.org == org => Ok(org),
        // Another org's edge is not found either, and the attempt is audited (P4).
        _ => Err(crate::audit::not_found_here(
            control, &views, &principal, "edge", edge_id,
        )),
    }
}

pub fn edge_routes_path(edge_id: &str) -> String {
    format!("/v1/edges/{edge_id}/routes")
}

async fn edge_snapshot(
    State(control): State<AppState>,
    ApiPath(edge_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let org = edge_caller(&control, &headers, &edge_id).await?;
    let _permit = control
        .plan_permits
        .try_acquire()
        .map_err(|_| ApiError::internal("too many snapshot requests at once; retry"))?;
    let reported = reported_state(&control);
    let tls = super::tls::edge_tls_table(&control, &org, &edge_id, None)
        .await?
        .unwrap_or_default();
    let views = control.projector.views();
    let as_of = Cursor::new(control.hub.position().log_epoch, views.checkpoint);
    let routes: Vec<RouteSpec> = views.routes.of_org(&org).map(|r| r.spec.clone()).collect();
    let mut route_seqs: BTreeMap<String, u64> = views
        .routes
        .of_org(&org)
        .map(|r| (r.spec.name.to_string(), r.seq))
        .collect();
    for (name, seq) in views.routes.deleted_of_org(&org) {
        route_seqs.entry(name.to_string()).or_insert(seq);
    }
    let snapshot = EdgeSnapshot {
        routes,
        route_seqs,
        backends: backends_of(&views, &org, &reported),
        tls,
        as_of,
    };
    Ok(axum::Json(snapshot).into_response())
}

async fn edge_changes(
    State(control): State<AppState>,
    ApiPath(edge_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let org = edge_caller(&control, &headers, &edge_id).await?;
    let cursor_text = query.get("cursor").ok_or_else(|| {
        ApiError::invalid(
            "cursor",
            "is required (EPOCH.ID, from the snapshot's as_of)",
            "",
        )
    })?;
    let cursor = command::parse_cursor(cursor_text)?;
    let wait = command::with_jitter(command::parse_wait(query.get("wait").map(String::as_str))?);
    let digest = query.get("backends").map(String::as_str);
    let tls_digest = query.get("tls").map(String::as_str);
    crate::api::release_request_buffer(headers);
    let batch = crate::feed::edge::edge_changes(
        &control.hub,
        &control.store,
        &org,
        cursor,
        digest,
        wait,
        FEED_BATCH_EVENTS_MAX,
        || async { Ok::<_, FeedError>(backend_table(&control, &org)) },
        || async {
            super::tls::edge_tls_table(&control, &org, &edge_id, tls_digest)
                .await
                .map_err(|error| FeedError::Task(error.to_string()))
        },
    )
    .await
    .map_err(|error| feed_error(error, &edge_routes_path(&edge_id)))?;
    Ok(axum::Json(batch).into_response())
}

async fn edge_report(
    State(control): State<AppState>,
    ApiPath(edge_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    edge_caller(&control, &headers, &edge_id).await?;
    let body = read_body(body).await?;
    let report: EdgeReport =
        serde_json::from_slice(&body).map_err(|error| ApiError::InvalidBody {
            reason: format!("not a valid edge report: {error}"),
            field: None,
        })?;
    report.validate()?;
    let record = EdgeReportRecord {
        edge_id: edge_id.clone(),
        at_unix_ms: control.clock.now_unix_ms(),
        report,
    };
    control.status.put(vec![Control::config_put(
        edge_report_key(&edge_id),
        &record,
    )]);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_routes(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let reported = reported_state(&control);
    let reports: Vec<EdgeReportRecord> = control
        .status
        .scan("edge-report/")
        .into_iter()
        .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
        .collect();
    let views = control.projector.views();
    let table = backends_of(&views, &org, &reported);
    let org_edges: Vec<&EdgeReportRecord> = reports
        .iter()
        .filter(|r| {
            views
                .routes
                .edges
                .get(&r.edge_id)
                .is_some_and(|e| e.org == org)
        })
        .collect();
    let routes: Vec<RouteView> = views
        .routes
        .of_org(&org)
        .map(|record| {
            let name = record.spec.name.as_str();
            let edges = org_edges
                .iter()
                .map(|r| {
                    let mine = r.report.backends.iter().filter(|b| b.route == name);
                    EdgeRouteStatus {
                        edge_id: r.edge_id.clone(),
                        cursor: r.report.cursor,
                        route_count: r.report.route_count,
                        healthy_backends: mine.clone().filter(|b| b.healthy).count(),
                        backends: mine.count(),
                        refused: r.report.refused.clone(),
                        at_unix_ms: r.at_unix_ms,
                    }
                })
                .collect();
            let backends = table.routes.get(name).cloned().unwrap_or_default();
            route_view(record, backends, edges)
        })
        .collect();
    Ok(axum::Json(routes).into_response())
}
