//! The HTTP API (docs/api.md): routes, request reading (bounded bodies, auth, negotiation) and
//! the read endpoints. Writes are parsed into [`crate::command::Command`]s and executed there.

pub mod auth;
pub mod error;
pub mod extract;
pub mod tokens;
pub mod views;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use outpost_proto::api::node_plan_path;
use outpost_proto::codec::{Encoding, WIRE_VERSION_HEADER, encode};
use outpost_proto::cursor::Cursor;
use outpost_proto::feed::GoneBody;
use outpost_proto::limits::REQUEST_BODY_MAX_BYTES;
use outpost_proto::plan::Plan;
use outpost_proto::profile::EnvironmentProfile;

use crate::app::{Control, blocking};
use crate::command::execute::{execute, service_view};
use crate::command::{self, DocumentFormat};
use crate::feed::{self, FeedError};
use crate::store::StoredEvent;
use auth::{Principal, Scope};
use error::ApiError;
use extract::{ApiPath, ApiQuery};
use views::{
    AllocationStatusRecord, AllocationView, EventsPage, HealthView, HeartbeatRecord, LogEventView,
    NodeView, ServiceView,
};

pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

use crate::scheduler::NodeScheduling;

type AppState = Arc<Control>;

/// The API router over a running control.
pub fn router(control: Arc<Control>) -> Router {
    let dashboard = crate::ui::router(Arc::clone(&control));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/agents", get(crate::rollout::agents::list))
        .route("/v1/agents/upgrade", post(crate::rollout::agents::upgrade))
        .route("/v1/nodes/register", post(register))
        .route("/v1/nodes/{node_id}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{node_id}/plan", get(plan))
        .route("/v1/nodes/{node_id}/changes", get(changes))
        .route("/v1/nodes/{node_id}/revoke", post(revoke))
        .route("/v1/nodes/{node_id}/role", post(set_node_role))
        .route("/v1/nodes/{node_id}/wireguard-key", post(set_wireguard_key))
        .route("/v1/nodes/{node_id}/labels", post(label_node))
        .route(
            "/v1/nodes/{node_id}/cordon",
            set_node_scheduling(NodeScheduling::Cordoned),
        )
        .route(
            "/v1/nodes/{node_id}/uncordon",
            set_node_scheduling(NodeScheduling::Schedulable),
        )
        .route(
            "/v1/nodes/{node_id}/drain",
            set_node_scheduling(NodeScheduling::Draining),
        )
        .route("/v1/enrollment-tokens", post(issue_enrollment_token))
        .route("/v1/services", post(define_service).get(list_services))
        .route(
            "/v1/services/{name}",
            axum::routing::delete(delete_service).get(get_service),
        )
        .route("/v1/allocations", get(list_allocations))
        .route("/v1/secrets", get(crate::secret::api::list_secrets_handler))
        .route(
            "/v1/secrets/{name}",
            axum::routing::put(crate::secret::api::put_secret_handler)
                .delete(crate::secret::api::delete_secret_handler),
        )
        .route("/v1/artifacts", get(crate::artifact::http::list))
        .route(
            "/v1/artifacts/{sha256}",
            get(crate::artifact::http::download)
                .put(crate::artifact::http::upload)
                .delete(crate::artifact::http::remove),
        )
        .route(
            "/v1/services/{name}/releases",
            get(crate::release::http::history),
        )
        .route(
            "/v1/services/{name}/rollback",
            post(crate::release::http::rollback),
        )
        .route(
            "/v1/services/{name}/rollout",
            get(crate::rollout::http::status),
        )
        .route("/v1/bootstrap/profile", get(get_profile).put(set_profile))
        .route("/v1/bootstrap/status", get(bootstrap_status))
        .route("/v1/bootstrap/events", post(bootstrap_events))
        .route("/v1/events", get(events))
        .route("/v1/audit", get(crate::audit::http::audit_handler))
        .route(
            crate::discovery::join::PATH_STANDBY_TOKEN,
            post(crate::discovery::join::standby_token),
        )
        .route("/v1/admin/rotate-epoch", post(rotate_epoch))
        .route(
            "/v1/admin/tokens",
            post(issue_operator_token).get(tokens::list_tokens_handler),
        )
        .route(
            "/v1/admin/tokens/{token_id}/revoke",
            post(tokens::revoke_token_handler),
        )
        .route(
            "/v1/admin/aggregates/{*aggregate_events}",
            get(aggregate_events),
        )
        .merge(crate::route::api::router())
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: uri.path().to_string(),
            }
        })
        .fallback(|uri: Uri| async move {
            ApiError::NotFound {
                what: "path",
                value: uri.path().to_string(),
            }
        })
        // Every event a request appends records the request's credential as its actor.
        .layer(axum::middleware::from_fn(crate::audit::with_request_actor))
        .with_state(control)
        .merge(dashboard)
}

/// Reads a request body up to the API limit.
pub(crate) async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match Limited::new(body, REQUEST_BODY_MAX_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge {
                limit_bytes: REQUEST_BODY_MAX_BYTES,
            })
        }
        Err(error) => Err(ApiError::InvalidBody {
            reason: format!("cannot read the body: {error}"),
            field: None,
        }),
    }
}

pub(crate) fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) async fn authenticate(
    control: &Control,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    let authorization = header_text(headers, header::AUTHORIZATION.as_str()).map(str::to_string);
    let store = Arc::clone(&control.store);
    let now_unix_secs = control.clock.now_unix_secs();
    if store.point_reads_in_place() {
        return auth::authenticate_at(store.as_ref(), authorization.as_deref(), now_unix_secs);
    }
    blocking(move || auth::authenticate_at(store.as_ref(), authorization.as_deref(), now_unix_secs))
        .await
}

fn negotiated(headers: &HeaderMap) -> Encoding {
    Encoding::negotiate(
        header_text(headers, header::ACCEPT.as_str()),
        header_text(headers, WIRE_VERSION_HEADER),
    )
}

fn encoded<T: serde::Serialize>(encoding: Encoding, value: &T) -> Response {
    let mut response = encode(encoding, value).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(encoding.content_type()),
    );
    response
}

pub(crate) fn document_format(headers: &HeaderMap) -> DocumentFormat {
    DocumentFormat::from_content_type(header_text(headers, header::CONTENT_TYPE.as_str()))
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => Ok(None),
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::invalid(IDEMPOTENCY_KEY_HEADER, "must be visible ascii", "(binary)")
            })?;
            if text.is_empty() || text.len() > 255 {
                return Err(ApiError::invalid(
                    IDEMPOTENCY_KEY_HEADER,
                    "must be 1 to 255 characters",
                    text,
                ));
            }
            Ok(Some(text.to_string()))
        }
    }
}

async fn health(State(control): State<AppState>) -> Response {
    let position = control.hub.position();
    let projection_error = control.projector.last_error();
    axum::Json(HealthView {
        status: if projection_error.is_some() {
            "degraded".into()
        } else {
            "ok".into()
        },
        projection_error,
        log_epoch: position.log_epoch,
        head: position.head,
        floor: position.floor,
        checkpoint: control.projector.checkpoint(),
        cluster_id: control.identity.cluster_id.clone(),
    })
    .into_response()
}

async fn register(State(control): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let command = command::parse_register(&read_body(body).await?)?;
    Ok(execute(&control, None, command, None)
        .await?
        .into_response())
}

async fn heartbeat(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_heartbeat(&node_id, &read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

/// The node's org once the views know it, waiting briefly for a just-registered node.
async fn known_node_org(control: &Control, node_id: &str) -> Result<String, ApiError> {
    if let Some(node) = control.projector.views().nodes.get(node_id) {
        return Ok(node.org.clone());
    }
    let head = control.hub.position().head;
    let _ = control
        .projector
        .wait_for(head, control.settings.projection_wait)
        .await;
    control
        .projector
        .views()
        .nodes
        .get(node_id)
        .map(|n| n.org.clone())
        .ok_or_else(|| ApiError::NotFound {
            what: "node",
            value: node_id.to_string(),
        })
}

/// Builds a node's plan from the views: consistent at the checkpoint it names.
pub fn build_plan(control: &Control, node_id: &str) -> Result<Plan, ApiError> {
    let views = control.projector.views();
    views
        .plan(
            node_id,
            control.hub.position().log_epoch,
            &control.node_settings(),
        )
        .ok_or_else(|| ApiError::NotFound {
            what: "node",
            value: node_id.to_string(),
        })
}

async fn plan(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let node_id = command::parse_node_id(&node_id)?;
    let principal = authenticate(&control, &headers).await?;
    principal.require_node_or(&node_id, None, Scope::Read)?;
    let org = known_node_org(&control, &node_id).await?;
    principal
        .require_node_or(&node_id, Some(&org), Scope::Read)
        .map_err(|e| crate::audit::audit_not_found(&control, &principal, e))?;
    let _permit = Arc::clone(&control.plan_permits)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyRequests {
            message: format!(
                "more than {} plan requests in flight; retry after the Retry-After delay",
                control.settings.plan_requests_max
            ),
            retry_after_secs: 1,
        })?;
    let plan = build_plan(&control, &node_id)?;
    Ok(encoded(negotiated(&headers), &plan))
}

async fn changes(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let node_id = command::parse_node_id(&node_id)?;
    let principal = authenticate(&control, &headers).await?;
    principal.require_node(&node_id)?;
    let cursor_text = query.get("cursor").ok_or_else(|| {
        ApiError::invalid(
            "cursor",
            "is required (EPOCH.ID, from the plan's as_of)",
            "",
        )
    })?;
    let cursor = command::parse_cursor(cursor_text)?;
    let wait = command::with_jitter(command::parse_wait(query.get("wait").map(String::as_str))?);
    known_node_org(&control, &node_id).await?;
    let encoding = negotiated(&headers);
    release_request_buffer(headers);
    let settings = control.node_settings();
    let batch = feed::node_changes(
        &control.hub,
        &control.store,
        &node_id,
        cursor,
        wait,
        &settings,
        outpost_proto::limits::FEED_BATCH_EVENTS_MAX,
    )
    .await
    .map_err(|error| feed_error(error, &node_plan_path(&node_id)))?;
    Ok(encoded(encoding, &batch))
}

/// Drops a long-poll's request headers before it parks. Their values are slices of the
/// connection's read buffer: held through the wait, they make hyper allocate a second read
/// buffer (8 KiB) for the same connection, 64 MiB for a fleet of 8,000 parked polls.
pub(crate) fn release_request_buffer(headers: HeaderMap) {
    drop(headers);
}

pub(crate) fn feed_error(error: FeedError, snapshot: &str) -> ApiError {
    match error {
        FeedError::Gone { reason, position } => ApiError::Gone(GoneBody {
            error: "gone".into(),
            message: format!("{reason}; fetch {snapshot} and resume from its as_of"),
            snapshot: snapshot.to_string(),
            log_epoch: position.log_epoch,
            floor: position.floor,
        }),
        other => ApiError::internal(other),
    }
}

pub(crate) fn heartbeats(control: &Control) -> BTreeMap<String, HeartbeatRecord> {
    let mut records = BTreeMap::new();
    for (key, bytes) in control.status.scan("heartbeat/") {
        if let Ok(record) = serde_json::from_slice::<HeartbeatRecord>(&bytes) {
            records.insert(key.trim_start_matches("heartbeat/").to_string(), record);
        }
    }
    records
}

async fn list_nodes(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let heartbeats = heartbeats(&control);
    let views = control.projector.views();
    let nodes: Vec<NodeView> = views
        .nodes
        .values()
        .filter(|n| n.org == org)
        .map(|n| NodeView {
            node_id: n.node_id.clone(),
            org: n.org.clone(),
            hostname: n.facts.hostname.clone(),
            arch: n.facts.arch.clone(),
            capacity: n.facts.capacity,
            labels: n.labels(),
            scheduling: n.scheduling.as_str().to_string(),
            down_since_unix_ms: n.down_since_unix_ms,
            state: n.state.as_str().to_string(),
            role: n.role.as_str().to_string(),
            registered_at_unix_ms: n.registered_at_unix_ms,
            last_heartbeat_unix_ms: heartbeats.get(&n.node_id).map(|h| h.at_unix_ms),
            allocations: views
                .allocations
                .values()
                .filter(|a| a.node_id == n.node_id)
                .count(),
            overlay_address: views.overlay.get(&n.node_id).map(|m| m.address.clone()),
            agent_version: heartbeats
                .get(&n.node_id)
                .and_then(|h| h.agent.as_ref())
                .map(|a| a.version.clone()),
        })
        .collect();
    Ok(axum::Json(nodes).into_response())
}

async fn revoke(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_revoke_node(&node_id)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn set_node_role(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_set_node_role(&node_id, &read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn label_node(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_label_node(&node_id, &read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

/// `POST /v1/nodes/{id}/cordon|uncordon|drain`: one handler per target state (F2).
fn set_node_scheduling(
    scheduling: crate::scheduler::NodeScheduling,
) -> axum::routing::MethodRouter<AppState> {
    post(
        move |State(control): State<AppState>,
              ApiPath(node_id): ApiPath<String>,
              headers: HeaderMap| async move {
            let principal = authenticate(&control, &headers).await?;
            let command = command::parse_set_node_scheduling(&node_id, scheduling)?;
            Ok::<_, ApiError>(
                execute(&control, Some(&principal), command, None)
                    .await?
                    .into_response(),
            )
        },
    )
}

async fn set_wireguard_key(
    State(control): State<AppState>,
    ApiPath(node_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_set_wireguard_key(&node_id, &read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn issue_enrollment_token(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_issue_enrollment_token(&read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn issue_operator_token(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_issue_operator_token(&read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn define_service(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let key = idempotency_key(&headers)?;
    let command =
        command::parse_define_service(&read_body(body).await?, document_format(&headers))?;
    Ok(execute(&control, Some(&principal), command, key.as_deref())
        .await?
        .into_response())
}

async fn delete_service(
    State(control): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let key = idempotency_key(&headers)?;
    let command = command::parse_delete_service(&name)?;
    Ok(execute(&control, Some(&principal), command, key.as_deref())
        .await?
        .into_response())
}

async fn list_services(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let views = control.projector.views();
    let services: Vec<ServiceView> = views
        .services_of(&org)
        .filter_map(|s| service_view(&views, &org, &s.spec.name))
        .collect();
    Ok(axum::Json(services).into_response())
}

async fn get_service(
    State(control): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let views = control.projector.views();
    // Another org's service of that name is not found either (P4).
    let view = service_view(&views, &org, &name).ok_or_else(|| {
        crate::audit::not_found_here(&control, &views, &principal, "service", &name)
    })?;
    Ok(axum::Json(view).into_response())
}

async fn list_allocations(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let org = principal.require(Scope::Read)?.to_string();
    let mut statuses: BTreeMap<String, AllocationStatusRecord> = BTreeMap::new();
    for (key, bytes) in control.status.scan("allocation-status/") {
        if let Ok(record) = serde_json::from_slice::<AllocationStatusRecord>(&bytes) {
            statuses.insert(
                key.trim_start_matches("allocation-status/").to_string(),
                record,
            );
        }
    }
    let views = control.projector.views();
    let allocations: Vec<AllocationView> = views
        .allocations
        .values()
        .filter(|a| a.org == org)
        .map(|a| {
            // Only a report from the node that runs the allocation counts.
            let status = statuses
                .get(&a.allocation_id)
                .filter(|s| s.node_id == a.node_id);
            AllocationView {
                allocation_id: a.allocation_id.clone(),
                service: a.service.clone(),
                node_id: a.node_id.clone(),
                replica: a.replica,
                seq: a.seq,
                memory_bytes: a.spec.memory_bytes,
                cpu_millis: a.spec.cpu_millis,
                state: status.map(|s| s.state),
                restarts: status.map_or(0, |s| s.restarts),
                message: status.map(|s| s.message.clone()).unwrap_or_default(),
                reported_at_unix_ms: status.map(|s| s.at_unix_ms),
            }
        })
        .collect();
    Ok(axum::Json(allocations).into_response())
}

async fn get_profile(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    if !matches!(principal, Principal::Node { .. }) {
        principal.require(Scope::Read)?;
    }
    let profile = control
        .projector
        .views()
        .profile
        .as_ref()
        .map(|p| p.profile.clone());
    Ok(axum::Json(profile.unwrap_or_else(EnvironmentProfile::minimal)).into_response())
}

async fn set_profile(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_set_profile(&read_body(body).await?, document_format(&headers))?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

async fn bootstrap_status(
    State(control): State<AppState>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let node_id = query
        .get("node_id")
        .ok_or_else(|| ApiError::invalid("node_id", "is required", ""))?;
    let node_id = command::parse_node_id(node_id)?;
    let node_org = control
        .projector
        .views()
        .nodes
        .get(&node_id)
        .map(|n| n.org.clone());
    principal
        .require_node_or(&node_id, node_org.as_deref(), Scope::Read)
        .map_err(|e| crate::audit::audit_not_found(&control, &principal, e))?;
    let status = match control.status.bootstrap(&node_id) {
        Some(record) => record.status(),
        None => control.projector.views().bootstrap_status(&node_id),
    };
    Ok(axum::Json(status).into_response())
}

async fn bootstrap_events(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    let command = command::parse_report_bootstrap(&read_body(body).await?)?;
    Ok(execute(&control, Some(&principal), command, None)
        .await?
        .into_response())
}

fn log_event_view(event: &StoredEvent) -> LogEventView {
    LogEventView {
        event_id: event.event_id,
        aggregate: event.aggregate.clone(),
        seq: event.seq,
        schema_version: event.schema_version,
        kind: event.kind.clone(),
        at_unix: event.at_unix_ms / 1000,
        data: serde_json::from_slice(&event.data).unwrap_or(serde_json::Value::Null),
    }
}

async fn events(
    State(control): State<AppState>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    principal.require_cluster(Scope::EventsRead)?;
    let cursor = match query.get("cursor") {
        Some(text) => command::parse_cursor(text)?,
        None => Cursor::new(control.hub.position().log_epoch, 0),
    };
    // Tools poll by default: no wait unless asked for.
    let wait = match query.get("wait") {
        Some(text) => command::parse_wait(Some(text))?,
        None => std::time::Duration::ZERO,
    };
    let limit = command::parse_limit(query.get("limit").map(String::as_str))?;
    release_request_buffer(headers);
    let (events, bookmark) = feed::log_events(&control.hub, &control.store, cursor, wait, limit)
        .await
        .map_err(|error| feed_error(error, "/v1/events"))?;
    Ok(axum::Json(EventsPage {
        events: events.iter().map(|e| log_event_view(e)).collect(),
        bookmark,
    })
    .into_response())
}

async fn rotate_epoch(
    State(control): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    Ok(execute(
        &control,
        Some(&principal),
        command::Command::RotateEpoch,
        None,
    )
    .await?
    .into_response())
}

async fn aggregate_events(
    State(control): State<AppState>,
    ApiPath(path): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = authenticate(&control, &headers).await?;
    principal.require_cluster(Scope::Admin)?;
    // The path is `{aggregate}/events`, and an aggregate holds a slash (`node/n1`); a
    // percent-encoded slash works too.
    let aggregate = path
        .strip_suffix("/events")
        .ok_or_else(|| ApiError::NotFound {
            what: "path",
            value: format!("/v1/admin/aggregates/{path}"),
        })?
        .to_string();
    if aggregate.is_empty() || aggregate.len() > 256 {
        return Err(ApiError::invalid(
            "aggregate",
            "must be 1 to 256 characters",
            &aggregate,
        ));
    }
    let store = Arc::clone(&control.store);
    let events = blocking(move || Ok(store.read_aggregate(&aggregate)?)).await?;
    Ok(axum::Json(events.iter().map(log_event_view).collect::<Vec<_>>()).into_response())
}

#[cfg(test)]
mod overlay_tests;
#[cfg(test)]
mod tests;
