//! The web dashboard (M2) at `/ui/`: read-only, server-rendered pages of one org's fleet behind
//! an operator-token login. The login (CSRF-checked) opens a signed, expiring session cookie
//! (HttpOnly, Secure, SameSite=Strict) that names the token; every page re-reads the token's
//! record, so a revoked or expired token ends its sessions at once. Pages stay live through a
//! small vendored script that re-fetches their `#live` region (`x-outpost-live: 1`) every 2 s.
//! Another org's node is answered exactly like a missing one: 404.

pub mod model;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Limited};
use maud::Markup;

use crate::api::auth::{self, Principal, Scope};
use crate::app::{Control, blocking};
use crate::projection::Views;
use model::{QueryError, RowContext};
use pages::{EventRow, Tab};
use session::{CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL_SECS, Session, SessionKey};

/// Header the live script sends: answer the `#live` region alone.
pub const LIVE_HEADER: &str = "x-outpost-live";
/// Largest login form body.
const LOGIN_BODY_MAX_BYTES: usize = 4096;
/// Events shown on the events page and on a node page.
const EVENTS_SHOWN: usize = 50;
/// Events read from the log tail to find them (filtered by org).
const EVENTS_SCANNED: u64 = 2000;

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

struct UiState {
    control: Arc<Control>,
    key: SessionKey,
}

type UiStateRef = Arc<UiState>;

/// The dashboard's routes, with a fresh session key: restarting control ends every session.
pub fn router(control: Arc<Control>) -> Router {
    let state = Arc::new(UiState {
        control,
        key: SessionKey::random(),
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(fleet))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/nodes/{node_id}", get(node))
        .route("/ui/services", get(services))
        .route("/ui/events", get(events))
        .route(
            "/ui/assets/ui.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/ui/assets/ui.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .route("/ui/{*rest}", get(not_found))
        .with_state(state)
}

/// Security headers every dashboard answer carries.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secured(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

fn html(status: StatusCode, markup: Markup) -> Response {
    secured(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            markup.into_string(),
        )
            .into_response(),
    )
}

fn is_live(headers: &HeaderMap) -> bool {
    headers.get(LIVE_HEADER).is_some_and(|v| v == "1")
}

/// A signed-in page, or its live region alone when the script asks.
fn page(
    headers: &HeaderMap,
    title: &str,
    user: &SignedIn,
    tab: Option<Tab>,
    before: Markup,
    live: Markup,
) -> Response {
    if is_live(headers) {
        html(StatusCode::OK, live)
    } else {
        html(
            StatusCode::OK,
            pages::layout(title, Some(&user.org), tab, before, live),
        )
    }
}

/// Why the login page is shown again; fixed texts, so a link cannot put words on the page.
#[derive(Clone, Copy)]
enum LoginReason {
    SignedOut,
    SessionInvalid,
    SessionExpired,
    TokenRefused,
}

impl LoginReason {
    fn code(self) -> &'static str {
        match self {
            LoginReason::SignedOut => "signed-out",
            LoginReason::SessionInvalid => "invalid",
            LoginReason::SessionExpired => "expired",
            LoginReason::TokenRefused => "token",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        [
            LoginReason::SignedOut,
            LoginReason::SessionInvalid,
            LoginReason::SessionExpired,
            LoginReason::TokenRefused,
        ]
        .into_iter()
        .find(|reason| reason.code() == code)
    }

    fn message(self) -> &'static str {
        match self {
            LoginReason::SignedOut => "You are logged out.",
            LoginReason::SessionInvalid => {
                "Your session cookie was not valid (tampered with, or from before a restart of control). Log in again."
            }
            LoginReason::SessionExpired => "Your session expired. Log in again.",
            LoginReason::TokenRefused => {
                "The token of your session was revoked, expired or lost its read scope. Log in with a valid token."
            }
        }
    }
}

/// The signed-in operator of a request.
struct SignedIn {
    org: String,
}

fn to_login(headers: &HeaderMap, reason: Option<LoginReason>) -> Response {
    if is_live(headers) {
        return secured(StatusCode::UNAUTHORIZED.into_response());
    }
    let location = match reason {
        Some(reason) => format!("/ui/login?reason={}", reason.code()),
        None => "/ui/login".to_string(),
    };
    let mut response = secured(Redirect::to(&location).into_response());
    if reason.is_some() {
        clear_cookie(&mut response, SESSION_COOKIE);
    }
    response
}

fn clear_cookie(response: &mut Response, name: &str) {
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(name, "", 0)) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let header = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    session::cookie_value(header, name)
}

/// Checks the session cookie and re-reads its token: a revoked, expired or scope-less token
/// ends the session.
async fn signed_in(state: &UiState, headers: &HeaderMap) -> Result<SignedIn, Response> {
    let Some(cookie) = cookie(headers, SESSION_COOKIE) else {
        return Err(to_login(headers, None));
    };
    let now = state.control.clock.now_unix_secs();
    let session = state.key.open(cookie, now).map_err(|error| {
        let reason = match error {
            session::SessionError::Expired(_) => LoginReason::SessionExpired,
            _ => LoginReason::SessionInvalid,
        };
        to_login(headers, Some(reason))
    })?;
    let store = Arc::clone(&state.control.store);
    let token_id = session.token_id.clone();
    let record = blocking(move || auth::read_operator_token(store.as_ref(), &token_id))
        .await
        .map_err(|_| to_login(headers, Some(LoginReason::TokenRefused)))?;
    match record {
        Some(record)
            if !record.revoked
                && record.expires_at_unix.is_none_or(|at| now < at)
                && (record.scopes.contains(&Scope::Read)
                    || record.scopes.contains(&Scope::Admin)) =>
        {
            Ok(SignedIn { org: record.org })
        }
        _ => Err(to_login(headers, Some(LoginReason::TokenRefused))),
    }
}

/// The signed-in operator and the page's query parameters (only `allowed` ones), or the answer
/// that refuses the request (to the login page, or a bad query).
async fn open_page(
    state: &UiState,
    headers: &HeaderMap,
    uri: &Uri,
    allowed: &[&str],
) -> Result<(SignedIn, std::collections::BTreeMap<String, String>), Response> {
    let user = signed_in(state, headers).await?;
    match model::parse_query(uri.query(), allowed) {
        Ok(parameters) => Ok((user, parameters)),
        Err(error) => Err(bad_query(&user.org, &error)),
    }
}

fn bad_query(org: &str, error: &QueryError) -> Response {
    let status = if error.parameter == "(query string)" && error.reason.contains("bytes") {
        StatusCode::URI_TOO_LONG
    } else {
        StatusCode::BAD_REQUEST
    };
    html(
        status,
        pages::error_page(Some(org), "Bad request", &error.to_string()),
    )
}

fn login_page(state: &UiState, status: StatusCode, error: Option<&str>) -> Response {
    let csrf = state.key.csrf_token();
    let mut response = html(status, pages::login(&csrf, error));
    if let Ok(value) =
        HeaderValue::from_str(&session::set_cookie(CSRF_COOKIE, &csrf, SESSION_TTL_SECS))
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

async fn login_form(State(state): State<UiStateRef>, uri: Uri) -> Response {
    let reason = model::parse_query(uri.query(), &["reason"])
        .ok()
        .and_then(|q| {
            q.get("reason")
                .and_then(|code| LoginReason::from_code(code))
        });
    login_page(&state, StatusCode::OK, reason.map(LoginReason::message))
}

async fn login(State(state): State<UiStateRef>, headers: HeaderMap, body: Body) -> Response {
    let body = match Limited::new(body, LOGIN_BODY_MAX_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return login_page(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                Some(&format!(
                    "The login form is larger than {LOGIN_BODY_MAX_BYTES} bytes."
                )),
            );
        }
    };
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    if !state
        .key
        .csrf_matches(cookie(&headers, CSRF_COOKIE), field("csrf"))
    {
        return login_page(
            &state,
            StatusCode::FORBIDDEN,
            Some(
                "The login form did not come from this dashboard or has expired (CSRF check failed). Try again.",
            ),
        );
    }
    let token = field("token").unwrap_or("").trim().to_string();
    if token.is_empty() {
        return login_page(
            &state,
            StatusCode::UNAUTHORIZED,
            Some("Enter an operator token."),
        );
    }
    let store = Arc::clone(&state.control.store);
    let now = state.control.clock.now_unix_secs();
    let principal = blocking(move || {
        auth::authenticate_at(store.as_ref(), Some(&format!("Bearer {token}")), now)
    })
    .await;
    let refused = |message: String| login_page(&state, StatusCode::UNAUTHORIZED, Some(&message));
    let token_id = match &principal {
        Ok(Principal::Operator { token_id, .. }) => token_id.clone(),
        Ok(Principal::Node { .. }) => {
            return refused("That is a node credential; log in with an operator token.".into());
        }
        Err(crate::api::error::ApiError::Unauthorized { value, message, .. }) => {
            // Names the token by its id only (never its secret).
            return refused(format!(
                "Wrong or expired operator token {value}: {message}."
            ));
        }
        Err(error) => return refused(format!("Wrong or expired operator token: {error}.")),
    };
    let Ok(principal) = principal else {
        return refused("Wrong or expired operator token.".into());
    };
    if let Err(error) = principal.require(Scope::Read) {
        return login_page(&state, StatusCode::FORBIDDEN, Some(&format!("{error}.")));
    }
    let store = Arc::clone(&state.control.store);
    let id = token_id.clone();
    let expires_at = blocking(move || auth::read_operator_token(store.as_ref(), &id))
        .await
        .ok()
        .flatten()
        .and_then(|record| record.expires_at_unix);
    let session = Session {
        token_id,
        expires_at_unix: expires_at
            .unwrap_or(u64::MAX)
            .min(now.saturating_add(SESSION_TTL_SECS)),
    };
    let mut response = secured(Redirect::to("/ui/").into_response());
    let max_age = session.expires_at_unix.saturating_sub(now);
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(
        SESSION_COOKIE,
        &state.key.seal(&session),
        max_age,
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    clear_cookie(&mut response, CSRF_COOKIE);
    response
}

async fn logout() -> Response {
    // The session cookie is SameSite=Strict: another site cannot log a user out.
    let mut response = secured(Redirect::to("/ui/login?reason=signed-out").into_response());
    clear_cookie(&mut response, SESSION_COOKIE);
    response
}

fn row_context<'a>(
    control: &'a Control,
    views: &'a Views,
    lookup: model::StatusLookup<'a>,
    bootstrap: &'a dyn Fn(&str) -> Option<crate::projection::NodeBootstrap>,
    settings: &'a crate::feed::NodeSettings,
) -> RowContext<'a> {
    RowContext {
        views,
        lookup,
        bootstrap,
        log_epoch: control.hub.position().log_epoch,
        settings,
    }
}

async fn fleet(State(state): State<UiStateRef>, headers: HeaderMap, uri: Uri) -> Response {
    let (user, parameters) = match open_page(&state, &headers, &uri, &["state", "q", "page"]).await
    {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let filter = match model::node_filter(&parameters) {
        Ok(filter) => filter,
        Err(error) => return bad_query(&user.org, &error),
    };
    let control = &state.control;
    let now = control.clock.now_unix_ms();
    let settings = control.node_settings();
    let lookup = |key: &str| control.status.get(key);
    let bootstrap = |node_id: &str| control.status.bootstrap(node_id);
    let fleet_page = {
        let views = control.projector.views();
        let context = row_context(control, &views, &lookup, &bootstrap, &settings);
        model::fleet_page(&context, &user.org, filter)
    };
    page(
        &headers,
        "Fleet",
        &user,
        Some(Tab::Fleet),
        pages::nothing(),
        pages::fleet(&fleet_page, now),
    )
}

fn not_found_page(org: &str, what: &str) -> Response {
    html(
        StatusCode::NOT_FOUND,
        pages::error_page(Some(org), "Not found", what),
    )
}

async fn node(
    State(state): State<UiStateRef>,
    Path(node_id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let (user, _) = match open_page(&state, &headers, &uri, &[]).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let shown: String = node_id.chars().take(63).collect();
    let control = &state.control;
    let now = control.clock.now_unix_ms();
    let settings = control.node_settings();
    let lookup = |key: &str| control.status.get(key);
    let bootstrap = |node_id: &str| control.status.bootstrap(node_id);
    let node_page = {
        let views = control.projector.views();
        let context = row_context(control, &views, &lookup, &bootstrap, &settings);
        model::node_page(&context, &user.org, &node_id)
    };
    // Unknown and another org's node look the same.
    let Some(node_page) = node_page else {
        return not_found_page(&user.org, &format!("There is no node {shown} in this org."));
    };
    let store = Arc::clone(&control.store);
    let aggregate = format!("node/{node_id}");
    let events = blocking(move || Ok(store.read_aggregate(&aggregate)?))
        .await
        .unwrap_or_default();
    let rows: Vec<EventRow> = events
        .iter()
        .rev()
        .take(EVENTS_SHOWN)
        .map(event_row)
        .collect();
    page(
        &headers,
        &format!("Node {}", node_page.row.node_id),
        &user,
        None,
        pages::nothing(),
        pages::node(&node_page, &rows, now),
    )
}

async fn services(State(state): State<UiStateRef>, headers: HeaderMap, uri: Uri) -> Response {
    let (user, _) = match open_page(&state, &headers, &uri, &[]).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let control = &state.control;
    let now = control.clock.now_unix_ms();
    let lookup = |key: &str| control.status.get(key);
    let rows = model::service_rows(&control.projector.views(), &lookup, &user.org);
    page(
        &headers,
        "Services",
        &user,
        Some(Tab::Services),
        pages::nothing(),
        pages::services(&rows, now),
    )
}

/// The org an event concerns, when it can be told: its `org` field, or the org of the node,
/// service or allocation it is about.
fn event_org(
    views: &Views,
    event: &crate::store::StoredEvent,
    data: &serde_json::Value,
) -> Option<String> {
    if let Some(org) = data.get("org").and_then(|v| v.as_str()) {
        return Some(org.to_string());
    }
    let (kind, id) = event.aggregate.split_once('/')?;
    match kind {
        "node" => views.nodes.get(id).map(|n| n.org.clone()),
        // `service/NAME` in the default org, `service/ORG/NAME` in another.
        "service" => Some(
            id.split_once('/')
                .map_or(crate::init::DEFAULT_ORG, |(org, _)| org)
                .to_string(),
        ),
        "allocation" => views.allocations.get(id).map(|a| a.org.clone()),
        _ => None,
    }
}

/// Who caused an event: the credential recorded with it, else the part of control or the node
/// that appends that kind of event.
fn event_actor(event: &crate::store::StoredEvent, data: &serde_json::Value) -> String {
    if let Some(actor) = data.get("actor").and_then(|v| v.as_str()) {
        return actor.to_string();
    }
    let kind = event.kind.as_str();
    let node = data.get("node_id").and_then(|v| v.as_str()).unwrap_or("?");
    if kind.starts_with("Allocation") {
        "control (scheduler)".into()
    } else if kind == "NodeMarkedDown" || kind == "NodeMarkedReady" {
        "control (liveness)".into()
    } else if kind.starts_with("Secret") {
        "control (secret delivery)".into()
    } else if kind == "NodeRegistered" || kind.starts_with("Overlay") || kind == "NodeSealingKeySet"
    {
        format!("node {node}")
    } else {
        "operator (not recorded)".into()
    }
}

fn event_row(event: &crate::store::StoredEvent) -> EventRow {
    let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap_or_default();
    EventRow {
        event_id: event.event_id,
        at_unix_ms: event.at_unix_ms,
        kind: event.kind.clone(),
        aggregate: event.aggregate.clone(),
        actor: event_actor(event, &data),
    }
}

async fn events(State(state): State<UiStateRef>, headers: HeaderMap, uri: Uri) -> Response {
    let (user, _) = match open_page(&state, &headers, &uri, &[]).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let control = &state.control;
    let now = control.clock.now_unix_ms();
    let head = control.hub.position().head;
    let store = Arc::clone(&control.store);
    let after = head.saturating_sub(EVENTS_SCANNED);
    let events = blocking(move || Ok(store.read_log(after, EVENTS_SCANNED as usize)?))
        .await
        .unwrap_or_default();
    let cluster_operator = user.org == crate::init::DEFAULT_ORG;
    let rows: Vec<EventRow> = {
        let views = control.projector.views();
        events
            .iter()
            .rev()
            .filter(|event| {
                let data: serde_json::Value =
                    serde_json::from_slice(&event.data).unwrap_or_default();
                match event_org(&views, event, &data) {
                    Some(org) => org == user.org,
                    None => cluster_operator,
                }
            })
            .take(EVENTS_SHOWN)
            .map(event_row)
            .collect()
    };
    let caption = format!("The newest {} events of this org", rows.len());
    page(
        &headers,
        "Events",
        &user,
        Some(Tab::Events),
        pages::nothing(),
        pages::events_table(&rows, &caption, now),
    )
}

async fn not_found(State(state): State<UiStateRef>, headers: HeaderMap, uri: Uri) -> Response {
    let user = match signed_in(&state, &headers).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let path: String = uri.path().chars().take(80).collect();
    not_found_page(&user.org, &format!("There is no page {path}."))
}

#[cfg(test)]
mod tests;
