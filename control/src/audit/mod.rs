//! The audit trail (P11): every event records its actor — an operator token (`opa.ID`), a node
//! (`opn.ID`), an edge (`ope.ID`) or `system: REASON` — and `GET /v1/audit` lists the
//! security-relevant acts with it, plus the refused attempts on another org's objects.
//!
//! The actor is stamped at commit ([`stamp`]) from the request's credential, which a router
//! middleware ([`with_request_actor`]) puts in a task-local for the request; the credential's
//! secret never leaves [`crate::api::auth::credential_public_part`]. Events appended outside a
//! request (scheduler, liveness, secret delivery, offline admin commands) say `system: REASON`.
//!
//! Refusals are not log events: a tenant probing names could otherwise grow the append-only log
//! without bound. They are coalesced per (actor, object kind, name) into at most
//! [`REFUSALS_MAX`] records (count, first and last time; the oldest record makes room), kept in
//! memory and saved to the store's volatile table at most once per [`REFUSALS_SAVE_EVERY_MS`].

pub mod http;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::api::auth::{Principal, credential_public_part};
use crate::store::{Durability, NewEvent, Store, StoredEvent, TableWrite};

tokio::task_local! {
    /// The credential (public part) of the request being served.
    static REQUEST_ACTOR: String;
}

/// Most coalesced refusal records kept.
pub const REFUSALS_MAX: usize = 1024;
/// The refusal records are saved at most this often.
pub const REFUSALS_SAVE_EVERY_MS: u64 = 5_000;
/// Volatile-table key of the saved refusal records.
pub const REFUSALS_KEY: &str = "audit-refusals";

/// Router middleware: serves the request with its bearer credential's public part as the
/// actor of whatever it appends. Requests without a bearer token (registrations with a token
/// in the body) get their actor from the event ([`system_or_subject_actor`]).
pub async fn with_request_actor(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let actor = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|credential| credential_public_part(credential.trim()));
    match actor {
        Some(actor) => REQUEST_ACTOR.scope(actor, next.run(request)).await,
        None => next.run(request).await,
    }
}

/// Events control appends by itself whatever request caused them.
fn system_reason(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "AllocationPlaced" | "AllocationRemoved" => "scheduler",
        "NodeMarkedDown" | "NodeMarkedReady" => "liveness",
        "SecretDelivered" | "SecretWithdrawn" => "secret delivery",
        "MasterKeyRotated" => "admin rotate-master-key",
        "RecordsSealedAtRest" => "sealing credentials at rest",
        "LogEpochRotated" => "log epoch rotation",
        "ClusterInitialized" | "OrgCreated" => "cluster initialization",
        _ => return None,
    })
}

/// The actor of an event appended outside a request: control itself with a reason, or the
/// node or edge the event is about when it registered with a token in the body.
fn system_or_subject_actor(kind: &str, data: &serde_json::Value) -> String {
    if let Some(reason) = system_reason(kind) {
        return format!("system: {reason}");
    }
    let field = |name: &str| data.get(name).and_then(|v| v.as_str());
    if let Some(edge_id) = field("edge_id") {
        return format!("{}.{edge_id}", crate::route::EDGE_CREDENTIAL_PREFIX);
    }
    let node_id = field("node_id").or_else(|| {
        data.get("member")
            .and_then(|m| m.get("node_id"))
            .and_then(|v| v.as_str())
    });
    match node_id {
        Some(node_id) => format!("{}.{node_id}", crate::api::auth::NODE_CREDENTIAL_PREFIX),
        None => format!("system: {}", kind_reason(kind)),
    }
}

fn kind_reason(kind: &str) -> &'static str {
    if kind.starts_with("Overlay") {
        "overlay"
    } else {
        "control"
    }
}

/// Records the actor in an event's data unless it names one: control's own acts (scheduler,
/// liveness, delivery, initialization, offline admin commands) as `system: REASON`, the rest as
/// the credential of the request being served, else the node or edge the event is about.
pub fn stamp_data(kind: &str, data: &mut serde_json::Value) {
    let serde_json::Value::Object(fields) = data else {
        return;
    };
    if fields.contains_key("actor") {
        return;
    }
    let request_actor = REQUEST_ACTOR.try_with(Clone::clone).ok();
    let actor = match (system_reason(kind), request_actor) {
        (None, Some(actor)) => actor,
        _ => system_or_subject_actor(kind, data),
    };
    if let serde_json::Value::Object(fields) = data {
        fields.insert("actor".into(), serde_json::Value::String(actor));
    }
}

/// [`stamp_data`] over records already encoded (events not built by `Event::to_new_event`).
pub fn stamp(events: &mut [NewEvent]) {
    for event in events {
        let Ok(mut data) = serde_json::from_slice::<serde_json::Value>(&event.data) else {
            continue;
        };
        if data.get("actor").is_some() {
            continue;
        }
        stamp_data(&event.kind, &mut data);
        if let Ok(bytes) = serde_json::to_vec(&data) {
            event.data = bytes;
        }
    }
}

/// The 404 for `what` `name` that the caller's org does not have. When another org has it,
/// the attempt is recorded as a refusal (the answer is the same, so the name does not leak).
pub fn not_found_here(
    control: &crate::app::Control,
    views: &crate::projection::Views,
    principal: &Principal,
    what: &'static str,
    name: &str,
) -> crate::api::error::ApiError {
    if exists_in_another_org(views, principal.org(), what, name) {
        control.record_refusal(principal, what, name);
    }
    crate::api::error::ApiError::NotFound {
        what,
        value: name.to_string(),
    }
}

/// Records the refusal behind a 404 already made (by a check that had no `control` at hand,
/// such as [`Principal::require_node_or`]) when the object exists in another org; returns the
/// error unchanged.
pub fn audit_not_found(
    control: &crate::app::Control,
    principal: &Principal,
    error: crate::api::error::ApiError,
) -> crate::api::error::ApiError {
    if let crate::api::error::ApiError::NotFound { what, value } = &error
        && exists_in_another_org(&control.projector.views(), principal.org(), what, value)
    {
        control.record_refusal(principal, what, value);
    }
    error
}

/// Records an attempt by `principal` to use another org's `what` named `name` (a service
/// referring to another org's secret or artifact) when one exists; the caller's answer names
/// no org and is the same as for a name that exists nowhere.
pub fn record_if_another_orgs(
    control: &crate::app::Control,
    principal: &Principal,
    views: &crate::projection::Views,
    what: &str,
    name: &str,
) {
    if exists_in_another_org(views, principal.org(), what, name) {
        control.record_refusal(principal, what, name);
    }
}

/// Whether an org other than `org` has the `what` named `name`.
fn exists_in_another_org(
    views: &crate::projection::Views,
    org: &str,
    what: &str,
    name: &str,
) -> bool {
    match what {
        "service" => views
            .services
            .values()
            .any(|s| s.org != org && s.spec.name == name),
        "route" => views
            .routes
            .routes
            .values()
            .any(|r| r.org != org && r.spec.name == name),
        "secret" => views
            .secrets
            .secrets
            .values()
            .any(|s| s.org != org && s.name == name),
        "node" => views.nodes.get(name).is_some_and(|n| n.org != org),
        "edge" => views.routes.edges.get(name).is_some_and(|e| e.org != org),
        "artifact" => views.artifacts.is_held(name) && views.artifacts.held_by(org, name).is_none(),
        _ => false,
    }
}

/// The kinds `outpostctl audit` lists.
pub const AUDITED_KINDS: &[&str] = &[
    "ClusterInitialized",
    "OrgCreated",
    "OperatorTokenIssued",
    "OperatorTokenRevoked",
    "EnrollmentTokenIssued",
    "EnrollmentTokenUsed",
    "NodeRegistered",
    "NodeRevoked",
    "NodeSealingKeySet",
    "OverlayJoined",
    "OverlayMemberChanged",
    "OverlayLeft",
    "RouteDefined",
    "RouteDeleted",
    "EdgeRegistered",
    "SecretVersionSet",
    "SecretDeleted",
    "SecretDelivered",
    "SecretWithdrawn",
    "MasterKeyRotated",
    "RecordsSealedAtRest",
    "ProfileSet",
];

/// One line of the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The log event; `None` for a refusal (not a log event).
    pub event_id: Option<u64>,
    pub at_unix_ms: u64,
    /// The event kind, or `AccessRefused`.
    pub act: String,
    /// `opa.TOKEN_ID`, `opn.NODE_ID`, `ope.EDGE_ID`, `system: REASON`, or `(not recorded)`
    /// for events written before actors were recorded.
    pub actor: String,
    /// The org the act concerns, when it names one.
    pub org: Option<String>,
    /// What it was about: the aggregate (`secret/acme/db`, `node/n1`, …), or `KIND/NAME` refused.
    pub subject: String,
    /// A few words more: version, address, scopes; never a secret.
    pub detail: String,
    /// How many times (refusals are coalesced; 1 for an event).
    pub count: u64,
}

/// The audit entry of a stored event, `None` when its kind is not audited.
pub fn entry_of(event: &StoredEvent) -> Option<AuditEntry> {
    if !AUDITED_KINDS.contains(&event.kind.as_str()) {
        return None;
    }
    let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap_or_default();
    let text = |name: &str| data.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let org = text("org").or_else(|| {
        data.get("member")
            .and_then(|m| m.get("org"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    });
    let detail = match event.kind.as_str() {
        "SecretVersionSet" | "SecretDelivered" => format!(
            "version {}{}",
            data["version"],
            text("node_id").map_or(String::new(), |n| format!(" to node {n}"))
        ),
        "SecretWithdrawn" => text("reason").unwrap_or_default(),
        "OperatorTokenIssued" => format!(
            "token {} scopes {}",
            text("token_id").unwrap_or_default(),
            data["scopes"]
        ),
        "OperatorTokenRevoked" => format!("token {}", text("token_id").unwrap_or_default()),
        "EnrollmentTokenUsed" => format!("by node {}", text("node_id").unwrap_or_default()),
        "NodeRegistered" => format!("with {}", text("with").unwrap_or_default()),
        "OverlayJoined" | "OverlayMemberChanged" => format!(
            "address {}",
            data["member"]["address"].as_str().unwrap_or("?")
        ),
        "OverlayLeft" => format!("address {} freed", text("address").unwrap_or_default()),
        "RouteDefined" => format!("hosts {}", data["spec"]["hosts"]),
        "MasterKeyRotated" => format!(
            "{} data keys and {} sealed records to {}",
            data["data_keys"],
            data["sealed_records"].as_u64().unwrap_or(0),
            text("to_key_id").unwrap_or_default()
        ),
        "RecordsSealedAtRest" => format!(
            "{} records under {}",
            data["records"],
            text("master_key_id").unwrap_or_default()
        ),
        _ => String::new(),
    };
    Some(AuditEntry {
        event_id: Some(event.event_id),
        at_unix_ms: event.at_unix_ms,
        act: event.kind.clone(),
        actor: text("actor").unwrap_or_else(|| "(not recorded)".into()),
        org,
        subject: event.aggregate.clone(),
        detail,
        count: 1,
    })
}

/// A refused attempt on another org's object, coalesced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub actor: String,
    /// The caller's org.
    pub org: String,
    /// `service`, `route`, `secret`, `node`, …
    pub what: String,
    pub name: String,
    pub count: u64,
    pub first_at_unix_ms: u64,
    pub last_at_unix_ms: u64,
}

impl Refusal {
    pub fn entry(&self) -> AuditEntry {
        AuditEntry {
            event_id: None,
            at_unix_ms: self.last_at_unix_ms,
            act: "AccessRefused".into(),
            actor: self.actor.clone(),
            org: Some(self.org.clone()),
            subject: format!("{}/{}", self.what, self.name),
            detail: format!(
                "{} of another org; answered 404 (first at {} ms)",
                self.what, self.first_at_unix_ms
            ),
            count: self.count,
        }
    }
}

/// The coalesced refusal records (see the module comment for the bound).
#[derive(Debug, Default)]
pub struct RefusalLog {
    records: Mutex<BTreeMap<(String, String, String), Refusal>>,
    saved_at_unix_ms: AtomicU64,
}

/// Who tried what on another org's object, for [`RefusalLog::record_attempt`].
pub struct RefusedAttempt<'a> {
    /// As events name actors: a credential id, or `enrollment/TOKEN_ID`.
    pub actor: String,
    /// The org the actor belongs to.
    pub org: &'a str,
    pub what: &'a str,
    pub name: &'a str,
}

impl RefusalLog {
    /// Loads the saved records (an unreadable save starts empty).
    pub fn load(store: &dyn Store) -> RefusalLog {
        let records = store
            .get_volatile(REFUSALS_KEY)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<Vec<Refusal>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|r| ((r.actor.clone(), r.what.clone(), r.name.clone()), r))
            .collect();
        RefusalLog {
            records: Mutex::new(records),
            saved_at_unix_ms: AtomicU64::new(0),
        }
    }

    /// Counts a refused attempt of `principal` on another org's `what` named `name`; saves
    /// the records when the last save is older than [`REFUSALS_SAVE_EVERY_MS`].
    pub fn record(
        &self,
        store: &Arc<dyn Store>,
        principal: &Principal,
        what: &str,
        name: &str,
        now_unix_ms: u64,
    ) {
        let attempt = RefusedAttempt {
            actor: principal.credential_id(),
            org: principal.org(),
            what,
            name,
        };
        self.record_attempt(store, attempt, now_unix_ms);
    }

    /// [`RefusalLog::record`] for an actor that is not an operator or node credential (an
    /// enrollment token naming another org's node or edge at registration).
    pub fn record_attempt(
        &self,
        store: &Arc<dyn Store>,
        attempt: RefusedAttempt<'_>,
        now_unix_ms: u64,
    ) {
        let RefusedAttempt {
            actor,
            org,
            what,
            name,
        } = attempt;
        let snapshot = {
            let mut records = self
                .records
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (actor.clone(), what.to_string(), name.to_string());
            if !records.contains_key(&key) && records.len() >= REFUSALS_MAX {
                let oldest = records
                    .iter()
                    .min_by_key(|(_, r)| r.last_at_unix_ms)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    records.remove(&oldest);
                }
            }
            let record = records.entry(key).or_insert_with(|| Refusal {
                actor,
                org: org.to_string(),
                what: what.to_string(),
                name: name.to_string(),
                count: 0,
                first_at_unix_ms: now_unix_ms,
                last_at_unix_ms: now_unix_ms,
            });
            record.count = record.count.saturating_add(1);
            record.last_at_unix_ms = now_unix_ms;
            let saved = self.saved_at_unix_ms.load(Ordering::Relaxed);
            (now_unix_ms.saturating_sub(saved) >= REFUSALS_SAVE_EVERY_MS)
                .then(|| records.values().cloned().collect::<Vec<_>>())
        };
        if let Some(all) = snapshot {
            self.saved_at_unix_ms.store(now_unix_ms, Ordering::Relaxed);
            let store = Arc::clone(store);
            let save = move || {
                let Ok(bytes) = serde_json::to_vec(&all) else {
                    return;
                };
                let write = TableWrite::Put {
                    key: REFUSALS_KEY.into(),
                    value: bytes,
                };
                if let Err(error) = store.put_volatile(vec![write], Durability::Relaxed) {
                    tracing::warn!(%error, "saving the audit's refusal records failed");
                }
            };
            // The store's calls block (PostgreSQL's client too): off the async threads.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(save)),
                Err(_) => save(),
            }
        }
    }

    pub fn all(&self) -> Vec<Refusal> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn principal(token_id: &str) -> Principal {
        Principal::Operator {
            token_id: token_id.into(),
            org: "acme".into(),
            scopes: Vec::new(),
        }
    }

    #[test]
    fn a_flood_of_refusals_stays_within_the_bound() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let log = RefusalLog::default();
        for i in 0..(REFUSALS_MAX as u64 * 3) {
            log.record(&store, &principal("t1"), "service", &format!("s{i}"), i);
        }
        for i in 0..1000 {
            log.record(&store, &principal("t2"), "service", "web", 10_000 + i);
        }
        let all = log.all();
        assert_eq!(all.len(), REFUSALS_MAX);
        let web = all.iter().find(|r| r.actor == "opa.t2").unwrap();
        assert_eq!((web.count, web.first_at_unix_ms), (1000, 10_000));
        let saved = RefusalLog::load(store.as_ref()).all();
        assert!(!saved.is_empty() && saved.len() <= REFUSALS_MAX);
    }

    #[tokio::test]
    async fn events_get_the_request_actor_and_control_acts_say_system() {
        let event = |kind: &str, data: serde_json::Value| NewEvent {
            aggregate: "x".into(),
            kind: kind.into(),
            schema_version: 1,
            routing_keys: Vec::new(),
            data: serde_json::to_vec(&data).unwrap(),
        };
        let mut events = vec![
            event("RouteDefined", serde_json::json!({"org": "acme"})),
            event("AllocationPlaced", serde_json::json!({"node_id": "n1"})),
            event("SecretVersionSet", serde_json::json!({"actor": "opa.kept"})),
        ];
        REQUEST_ACTOR
            .scope("opa.t1".to_string(), async { stamp(&mut events) })
            .await;
        let actors: Vec<String> = events
            .iter()
            .map(|e| {
                serde_json::from_slice::<serde_json::Value>(&e.data).unwrap()["actor"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(actors, ["opa.t1", "system: scheduler", "opa.kept"]);
        let mut registered = vec![event(
            "NodeRegistered",
            serde_json::json!({"node_id": "n7", "org": "default"}),
        )];
        stamp(&mut registered);
        let data: serde_json::Value = serde_json::from_slice(&registered[0].data).unwrap();
        assert_eq!(data["actor"], "opn.n7");
    }
}
