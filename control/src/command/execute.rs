//! Executing commands (P6): authorize against the caller's org and scopes, validate against the
//! current views and stored secrets, take the idempotency key, append every event of the command
//! in one store transaction, and answer (after the views caught up, where the answer reads them).

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::hash::sha256_hex as sha256_bytes_hex;
use outpost_proto::node::{HeartbeatResponse, RegisterRequest, RegisterResponse, Role};
use outpost_proto::service::ServiceSpec;

use super::Command;
use crate::api::auth::{
    AUTHORIZATION_FIELD, EnrollmentTokenSecret, NODE_CREDENTIAL_PREFIX, NodeCredentialSecret,
    Principal, Scope, another_orgs_node, credential_public_part, enrollment_token_key,
    node_credential_key, random_hex, read_enrollment_token, read_node_credential, same_digest,
    sha256_hex, split_node_credential, verify_node_credential,
};
use crate::api::error::ApiError;
use crate::api::views::{
    AcceptedAnswer, AllocationStatusRecord, EnrollmentTokenAnswer, EpochAnswer, EventIdAnswer,
    HeartbeatRecord, OperatorTokenAnswer, ProfileAnswer, ServiceAnswer, ServiceView,
};
use crate::app::{Control, blocking};
use crate::init::{mint_operator_token, operator_token_commit};
use crate::log::{Event, RegisteredWith};
use crate::overlay::{OverlayRefusal, OverlayReport};
use crate::projection::{NodeState, Views};
use crate::scheduler::never_fits;
use crate::store::{Commit, CommitOutcome, IdempotencyRecord, TableWrite, random_log_epoch};

/// What a command answers.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per request and turned into a response
pub enum Answer {
    EnrollmentToken(EnrollmentTokenAnswer),
    OperatorToken(OperatorTokenAnswer),
    Registered(RegisterResponse),
    Heartbeat(HeartbeatResponse),
    Service(ServiceAnswer),
    Event(EventIdAnswer),
    Profile(ProfileAnswer),
    Accepted(AcceptedAnswer),
    Epoch(EpochAnswer),
    Route(crate::route::api::RouteAnswer),
    EdgeRegistered(outpost_proto::route::EdgeRegisterResponse),
    Artifact(outpost_proto::artifact::ArtifactInfo),
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::EnrollmentToken(answer) => Json(answer).into_response(),
            Answer::OperatorToken(answer) => Json(answer).into_response(),
            Answer::Registered(answer) => Json(answer).into_response(),
            Answer::Heartbeat(answer) => Json(answer).into_response(),
            Answer::Service(answer) => Json(answer).into_response(),
            Answer::Event(answer) => Json(answer).into_response(),
            Answer::Profile(answer) => Json(answer).into_response(),
            Answer::Accepted(answer) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
            Answer::Epoch(answer) => Json(answer).into_response(),
            Answer::Route(answer) => Json(answer).into_response(),
            Answer::EdgeRegistered(answer) => Json(answer).into_response(),
            Answer::Artifact(answer) => Json(answer).into_response(),
        }
    }
}

/// Runs a command for a caller. `principal` is `None` only for registration, which proves
/// itself with the token or credential in its body.
pub async fn execute(
    control: &Control,
    principal: Option<&Principal>,
    command: Command,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    // Another replica, or a command staged just before in the same group commit, may write what
    // this command read; the commit is then refused, and the command runs again on the
    // caught-up views.
    let mut attempt = 0;
    loop {
        match execute_once(control, principal, command.clone(), idempotency_key).await {
            Err(ApiError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                attempt += 1;
                control.catch_up_after_conflict().await?;
            }
            answer => return answer,
        }
    }
}

/// How often a command runs again after another replica appended first.
const CONFLICT_RETRIES: u32 = 5;

async fn execute_once(
    control: &Control,
    principal: Option<&Principal>,
    command: Command,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    let caller = || {
        principal.ok_or_else(|| {
            ApiError::unauthorized(AUTHORIZATION_FIELD, "(missing)", "missing bearer token")
        })
    };
    match command {
        Command::IssueEnrollmentToken { ttl_secs } => {
            issue_enrollment_token(control, caller()?, ttl_secs).await
        }
        Command::IssueOperatorToken {
            org,
            scopes,
            ttl_secs,
        } => issue_operator_token(control, caller()?, org, scopes, ttl_secs).await,
        Command::RegisterNode(request) => register_node(control, *request).await,
        Command::Heartbeat { node_id, request } => {
            heartbeat(control, caller()?, node_id, request).await
        }
        Command::DefineService(spec) => {
            define_service(control, caller()?, *spec, idempotency_key).await
        }
        Command::DeleteService { name } => {
            delete_service(control, caller()?, name, idempotency_key).await
        }
        Command::RevokeNode { node_id } => revoke_node(control, caller()?, node_id).await,
        Command::SetNodeRole { node_id, role } => {
            set_node_role(control, caller()?, node_id, role).await
        }
        Command::SetProfile(profile) => set_profile(control, caller()?, *profile).await,
        Command::ReportBootstrap(events) => report_bootstrap(control, caller()?, events).await,
        Command::RotateEpoch => rotate_epoch(control, caller()?).await,
        Command::SetWireguardKey {
            node_id,
            public_key,
        } => set_wireguard_key(control, caller()?, node_id, public_key).await,
        Command::DefineRoute(spec) => {
            crate::route::execute::define_route(control, caller()?, *spec, idempotency_key).await
        }
        Command::DeleteRoute { name } => {
            crate::route::execute::delete_route(control, caller()?, name, idempotency_key).await
        }
        Command::RegisterEdge(request) => {
            crate::route::execute::register_edge(control, *request).await
        }
        Command::LabelNode {
            node_id,
            set,
            remove,
        } => label_node(control, caller()?, node_id, set, remove).await,
        Command::SetNodeScheduling {
            node_id,
            scheduling,
        } => set_node_scheduling(control, caller()?, node_id, scheduling).await,
        Command::RecordArtifact {
            sha256,
            size_bytes,
            name,
        } => {
            crate::artifact::command::record_artifact(control, caller()?, sha256, size_bytes, name)
                .await
        }
        Command::RemoveArtifact { sha256 } => {
            crate::artifact::command::remove_artifact(control, caller()?, sha256).await
        }
        Command::RollbackService { name, to } => {
            crate::release::command::rollback_service(control, caller()?, name, to).await
        }
    }
}

async fn issue_enrollment_token(
    control: &Control,
    principal: &Principal,
    ttl_secs: u64,
) -> Result<Answer, ApiError> {
    let org = principal.require(Scope::EnrollWrite)?.to_string();
    let token_id = crate::api::auth::time_ordered_id();
    let secret = random_hex(32);
    let expires_at_unix = control.clock.now_unix_secs().saturating_add(ttl_secs);
    let claims = EnrollmentClaims {
        token_id: token_id.clone(),
        secret: secret.clone(),
        ca_fingerprint: control.identity.ca.fingerprint.clone(),
        control_url: control.settings.public_url.clone(),
        expires_at_unix,
    };
    let stored = EnrollmentTokenSecret {
        org: org.clone(),
        secret_sha256: sha256_hex(&secret),
        expires_at_unix,
        used_by: None,
    };
    let event = Event::EnrollmentTokenIssued {
        token_id: token_id.clone(),
        org,
        expires_at_unix,
    };
    let commit = Commit {
        events: vec![event.to_new_event()],
        config_writes: vec![Control::config_put(
            enrollment_token_key(&token_id),
            &stored,
        )],
        ..Commit::default()
    };
    let guard = control.lock_commands().await;
    control.commit(guard, commit).await?;
    Ok(Answer::EnrollmentToken(EnrollmentTokenAnswer {
        token: claims.to_token(),
        token_id,
        expires_at_unix,
        ca_fingerprint: control.identity.ca.fingerprint.clone(),
    }))
}

async fn issue_operator_token(
    control: &Control,
    principal: &Principal,
    org: String,
    scopes: Vec<Scope>,
    ttl_secs: Option<u64>,
) -> Result<Answer, ApiError> {
    principal.require_cluster(Scope::Admin)?;
    let mut minted = mint_operator_token(&org, scopes);
    minted.stored.expires_at_unix =
        ttl_secs.map(|ttl| control.clock.now_unix_secs().saturating_add(ttl));
    let (token_event, token_write) = operator_token_commit(&minted);
    let mut events = Vec::new();
    if !control.projector.views().orgs.contains(&org) {
        events.push(Event::OrgCreated { org: org.clone() });
    }
    events.push(token_event);
    let commit = Commit {
        events: events.iter().map(Event::to_new_event).collect(),
        config_writes: vec![token_write],
        ..Commit::default()
    };
    let guard = control.lock_commands().await;
    control.commit(guard, commit).await?;
    Ok(Answer::OperatorToken(OperatorTokenAnswer {
        token: minted.token,
        token_id: minted.token_id,
        org,
        scopes: minted
            .stored
            .scopes
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        expires_at_unix: minted.stored.expires_at_unix,
    }))
}

fn registered(control: &Control, node_id: &str, credential: String) -> Answer {
    let role = control
        .projector
        .views()
        .nodes
        .get(node_id)
        .map_or(Role::Worker, |n| n.role);
    let settings = control.node_settings();
    Answer::Registered(RegisterResponse {
        node_id: outpost_proto::Name::try_from(node_id).unwrap_or_default(),
        node_credential: credential,
        role,
        control_url: settings.control_url,
        gateway_url: settings.gateway_url,
        ttl_secs: settings.ttl_secs,
        epoch: settings.epoch,
        release_public_key: control.settings.release_public_key.clone(),
    })
}

fn heartbeat_write(
    node_id: &str,
    at_unix_ms: u64,
    agent: Option<outpost_proto::release::AgentBuild>,
) -> TableWrite {
    let record = HeartbeatRecord {
        at_unix_ms,
        plan_generation: None,
        cursor: None,
        lan_address: None,
        agent,
    };
    Control::config_put(Control::heartbeat_key(node_id), &record)
}

/// Checks a node credential presented at registration for `node_id`.
async fn verify_credential_for(
    control: &Control,
    credential: &str,
    node_id: &str,
) -> Result<Principal, ApiError> {
    const FIELD: &str = "node_credential";
    let (claimed, _) = split_node_credential(credential).ok_or_else(|| {
        ApiError::unauthorized(
            FIELD,
            "(malformed)",
            "node credential is malformed; expected opn.NODE_ID.SECRET",
        )
    })?;
    if claimed != node_id {
        return Err(ApiError::unauthorized(
            FIELD,
            credential_public_part(credential),
            format!("node credential belongs to node {claimed}, not to facts.node_id {node_id}"),
        ));
    }
    let store = Arc::clone(&control.store);
    let text = credential.to_string();
    blocking(move || verify_node_credential(store.as_ref(), FIELD, &text)).await
}

async fn register_node(control: &Control, request: RegisterRequest) -> Result<Answer, ApiError> {
    let node_id = request.facts.node_id.to_string();
    let guard = control.lock_commands().await;
    // A valid credential wins; an unknown, wrong or revoked one falls back to an enclosed token.
    let verified = match &request.node_credential {
        Some(credential) => match verify_credential_for(control, credential, &node_id).await {
            Ok(principal) => Some((credential.clone(), principal)),
            Err(ApiError::Unauthorized { .. } | ApiError::NodeRevoked { .. })
                if request.enrollment_token.is_some() =>
            {
                None
            }
            Err(error) => return Err(error),
        },
        None => None,
    };
    let (credential, commit) = if let Some((credential, principal)) = verified {
        let event = Event::NodeRegistered {
            node_id: node_id.clone(),
            org: principal.org().to_string(),
            facts: request.facts.clone(),
            with: RegisteredWith::NodeCredential,
        };
        (
            credential,
            Commit {
                events: vec![event.to_new_event()],
                ..Commit::default()
            },
        )
    } else if let Some(proof) = request
        .enrollment_token
        .as_deref()
        .filter(|t| t.starts_with(outpost_proto::site::JOIN_PROOF_PREFIX))
    {
        crate::discovery::join::join_commit(control, &request, proof).await?
    } else {
        let token = request.enrollment_token.clone().unwrap_or_default();
        let (claims, stored_token) = verify_enrollment_token(control, &token).await?;
        let store = Arc::clone(&control.store);
        let id = node_id.clone();
        let stored_credential = blocking(move || read_node_credential(store.as_ref(), &id)).await?;
        // A fresh enrollment token re-admits a revoked node id (the operator's explicit act);
        // the revoked credential stays dead because a new secret replaces it.
        if let Some(existing) = &stored_credential
            && existing.org != stored_token.org
        {
            control.record_enrollment_refusal(
                &claims.token_id,
                &stored_token.org,
                "node",
                &node_id,
            );
            return Err(another_orgs_node(&node_id));
        }
        let secret = random_hex(32);
        let credential = format!("{NODE_CREDENTIAL_PREFIX}.{node_id}.{secret}");
        let events = [
            Event::EnrollmentTokenUsed {
                token_id: claims.token_id.clone(),
                node_id: node_id.clone(),
            },
            Event::NodeRegistered {
                node_id: node_id.clone(),
                org: stored_token.org.clone(),
                facts: request.facts.clone(),
                with: RegisteredWith::EnrollmentToken,
            },
        ];
        let used = EnrollmentTokenSecret {
            used_by: Some(node_id.clone()),
            ..stored_token.clone()
        };
        let node_secret = NodeCredentialSecret {
            org: stored_token.org.clone(),
            secret_sha256: sha256_hex(&secret),
            revoked: false,
        };
        let commit = Commit {
            events: events.iter().map(Event::to_new_event).collect(),
            config_writes: vec![
                Control::config_put(enrollment_token_key(&claims.token_id), &used),
                Control::config_put(node_credential_key(&node_id), &node_secret),
            ],
            ..Commit::default()
        };
        (credential, commit)
    };
    control.commit(guard, commit).await?;
    // The overlay part of the registration: join the mesh, or a new key, endpoints or port.
    let report = OverlayReport {
        public_key: request.wireguard_public_key.clone(),
        endpoints: request.endpoints.clone(),
        listen_port: request.wireguard_listen_port,
    };
    if report.public_key.is_some() {
        let guard = control.lock_commands_settled().await;
        if let Err(error) = apply_overlay_report(control, guard, &node_id, &report).await {
            tracing::warn!(
                "node {node_id} registered, but its overlay report was not taken: {error}"
            );
        }
    }
    if let Some(key) = &request.sealing_public_key
        && let Err(error) =
            crate::secret::delivery::record_sealing_key(control, &node_id, key).await
    {
        tracing::warn!("node {node_id} registered, but its sealing key was not taken: {error}");
    }
    // A registration counts as a heartbeat.
    control.status.put(vec![heartbeat_write(
        &node_id,
        control.clock.now_unix_ms(),
        request.agent.clone(),
    )]);
    Ok(registered(control, &node_id, credential))
}

/// Checks a one-time enrollment token (nodes and edges): known, right secret, unused and not
/// expired. Returns its claims and stored record.
pub(crate) async fn verify_enrollment_token(
    control: &Control,
    token: &str,
) -> Result<(EnrollmentClaims, EnrollmentTokenSecret), ApiError> {
    let claims =
        EnrollmentClaims::parse(token).map_err(|error| ApiError::EnrollmentTokenUnknown {
            token_id: format!("(malformed: {})", error.reason),
        })?;
    let store = Arc::clone(&control.store);
    let token_id = claims.token_id.clone();
    let stored_token = blocking(move || read_enrollment_token(store.as_ref(), &token_id)).await?;
    let unknown = || ApiError::EnrollmentTokenUnknown {
        token_id: claims.token_id.clone(),
    };
    let stored_token = stored_token.ok_or_else(unknown)?;
    if !same_digest(&stored_token.secret_sha256, &sha256_hex(&claims.secret)) {
        return Err(unknown());
    }
    if let Some(used_by) = &stored_token.used_by {
        return Err(ApiError::EnrollmentTokenUsed {
            token_id: claims.token_id.clone(),
            node_id: used_by.clone(),
        });
    }
    if control.clock.now_unix_secs() > stored_token.expires_at_unix {
        return Err(ApiError::EnrollmentTokenExpired {
            token_id: claims.token_id.clone(),
            expires_at_unix: stored_token.expires_at_unix,
        });
    }
    Ok((claims, stored_token))
}

async fn heartbeat(
    control: &Control,
    principal: &Principal,
    node_id: String,
    request: outpost_proto::node::HeartbeatRequest,
) -> Result<Answer, ApiError> {
    principal.require_node(&node_id)?;
    let now = control.clock.now_unix_ms();
    if !control.status.admit_heartbeat(&node_id, now) {
        return Err(ApiError::TooManyRequests {
            message: format!(
                "node {node_id} sends heartbeats faster than {} per second (burst {}); this one was refused, its last one counts",
                crate::app::status::HEARTBEAT_REFILL_PER_SEC,
                crate::app::status::HEARTBEAT_BURST
            ),
            retry_after_secs: 1,
        });
    }
    let mut writes = vec![Control::config_put(
        Control::heartbeat_key(&node_id),
        &HeartbeatRecord {
            at_unix_ms: now,
            plan_generation: request.plan_generation.clone(),
            cursor: request.cursor,
            lan_address: request.lan_address.clone(),
            agent: request.agent.clone(),
        },
    )];
    for status in &request.allocations {
        let record = AllocationStatusRecord {
            node_id: node_id.clone(),
            state: status.state,
            restarts: status.restarts,
            message: status.message.clone(),
            at_unix_ms: now,
            ports: status.ports.clone(),
            plan_cursor: request.cursor,
        };
        writes.push(Control::config_put(
            Control::allocation_status_key(&status.allocation_id),
            &record,
        ));
    }
    control.status.put(writes);
    // A new key or endpoints (a node whose LAN address changed) reach its peers (P9).
    let report = OverlayReport {
        public_key: request.wireguard_public_key.clone(),
        endpoints: request.endpoints.clone(),
        listen_port: None,
    };
    if crate::overlay::report_differs(&control.projector.views().overlay, &node_id, &report) {
        let guard = control.lock_commands_settled().await;
        if let Err(error) = apply_overlay_report(control, guard, &node_id, &report).await {
            tracing::warn!("overlay report of node {node_id} was not taken: {error}");
        }
    }
    let (down, role, upgrade) = {
        let views = control.projector.views();
        let node = views.nodes.get(&node_id);
        (
            node.is_some_and(|n| n.state == NodeState::Down),
            node.map_or(Role::Worker, |n| n.role),
            node.and_then(|n| {
                views
                    .agent_upgrades
                    .offer(&n.org, &node_id, request.agent.as_ref())
            }),
        )
    };
    if down {
        let guard = control.lock_commands().await;
        let still_down = control
            .projector
            .views()
            .nodes
            .get(&node_id)
            .is_some_and(|n| n.state == NodeState::Down);
        if still_down {
            tracing::info!(
                component = "liveness",
                action = "mark_ready",
                node_id = node_id.as_str(),
                "node {node_id} is back; marking it ready"
            );
            control
                .append(
                    guard,
                    &[Event::NodeMarkedReady {
                        node_id: node_id.clone(),
                    }],
                )
                .await?;
        }
    }
    let settings = control.node_settings();
    Ok(Answer::Heartbeat(HeartbeatResponse {
        ttl_secs: settings.ttl_secs,
        epoch: settings.epoch,
        role,
        upgrade,
    }))
}

/// Key under which a client's idempotency key is kept: per org and command kind.
pub(crate) fn idempotency_record(
    org: &str,
    kind: &str,
    client_key: Option<&str>,
    answer: Vec<u8>,
) -> IdempotencyRecord {
    let key = match client_key {
        Some(key) => format!("{org}/{kind}/{}", sha256_bytes_hex(key.as_bytes())),
        None => format!("{org}/{kind}/generated-{}", random_hex(16)),
    };
    IdempotencyRecord { key, answer }
}

/// The view of `org`'s service `name`.
pub fn service_view(views: &Views, org: &str, name: &str) -> Option<ServiceView> {
    let record = views.service(org, name)?;
    Some(ServiceView {
        name: name.to_string(),
        org: record.org.clone(),
        spec: record.spec.clone(),
        event_id: record.event_id,
        updated_at_unix_ms: record.updated_at_unix_ms,
        placed: views
            .allocations
            .values()
            .filter(|a| a.org == org && a.service == name)
            .count(),
        release: views.releases.latest(org, name),
    })
}

/// Waits until the views include `event_id`, or fails with `projection_lagging`.
pub(crate) async fn read_your_writes(control: &Control, event_id: u64) -> Result<(), ApiError> {
    control
        .projector
        .wait_for(event_id, control.settings.projection_wait)
        .await
        .map_err(|checkpoint| ApiError::ProjectionLagging {
            event_id,
            checkpoint,
        })
}

/// The first answer of a client's idempotency key, if it was used before.
pub(crate) async fn earlier_answer(
    control: &Control,
    org: &str,
    kind: &str,
    client_key: Option<&str>,
) -> Result<Option<(u64, Vec<u8>)>, ApiError> {
    let Some(client_key) = client_key else {
        return Ok(None);
    };
    let key = idempotency_record(org, kind, Some(client_key), Vec::new()).key;
    let store = Arc::clone(&control.store);
    let found = blocking(move || Ok(store.read_idempotency(&key)?)).await?;
    Ok(match found {
        Some(CommitOutcome::Duplicate {
            answer,
            last_event_id,
        }) => Some((last_event_id, answer)),
        _ => None,
    })
}

async fn answer_service(
    control: &Control,
    org: &str,
    name: String,
    event_id: u64,
) -> Result<Answer, ApiError> {
    read_your_writes(control, event_id).await?;
    let view =
        service_view(&control.projector.views(), org, &name).ok_or_else(|| ApiError::NotFound {
            what: "service",
            value: name.clone(),
        })?;
    Ok(Answer::Service(ServiceAnswer {
        service: view,
        event_id,
    }))
}

pub(crate) async fn define_service(
    control: &Control,
    principal: &Principal,
    spec: ServiceSpec,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    const KIND: &str = "define-service";
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    if let Some((event_id, answer)) = earlier_answer(control, &org, KIND, idempotency_key).await? {
        return answer_service(
            control,
            &org,
            String::from_utf8_lossy(&answer).into_owned(),
            event_id,
        )
        .await;
    }
    let name = spec.name.to_string();
    let guard = control.lock_commands().await;
    {
        let views = control.projector.views();
        if let Err(error) = crate::secret::api::check_service_refs(&views, &org, &spec) {
            for reference in &spec.secrets {
                let name = reference.name.as_str();
                if views.secrets.get(&org, name).is_none() {
                    crate::audit::record_if_another_orgs(
                        control, principal, &views, "secret", name,
                    );
                }
            }
            return Err(error);
        }
        let ratio = control.settings.cpu_overcommit_ratio;
        let input = views.scheduler_input(ratio, 0);
        if let Some(never) = never_fits(&input.nodes, &org, &spec, ratio) {
            return Err(ApiError::Unschedulable(never));
        }
        if let Some(artifact) = &spec.artifact
            && views.artifacts.held_by(&org, &artifact.sha256).is_none()
        {
            crate::audit::record_if_another_orgs(
                control,
                principal,
                &views,
                "artifact",
                &artifact.sha256,
            );
            return Err(ApiError::unprocessable(
                "artifact.sha256",
                "no artifact with this sha256 was pushed to this org (outpostctl artifacts push)",
                &artifact.sha256,
            ));
        }
    }
    let event = Event::ServiceDefined {
        org: org.clone(),
        spec,
    };
    let commit = Commit {
        events: vec![event.to_new_event()],
        idempotency: Some(idempotency_record(
            &org,
            KIND,
            idempotency_key,
            name.clone().into_bytes(),
        )),
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    let event_id = outcome.last_event_id().unwrap_or_default();
    let name = match &outcome {
        CommitOutcome::Duplicate { answer, .. } => String::from_utf8_lossy(answer).into_owned(),
        CommitOutcome::Appended(_) => name,
    };
    answer_service(control, &org, name, event_id).await
}

async fn delete_service(
    control: &Control,
    principal: &Principal,
    name: String,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    const KIND: &str = "delete-service";
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    if let Some((event_id, _)) = earlier_answer(control, &org, KIND, idempotency_key).await? {
        return Ok(Answer::Event(EventIdAnswer { event_id }));
    }
    let guard = control.lock_commands().await;
    {
        let views = control.projector.views();
        // Another org's service of that name is not found either (P4).
        if views.service(&org, &name).is_none() {
            return Err(crate::audit::not_found_here(
                control, &views, principal, "service", &name,
            ));
        }
    }
    let commit = Commit {
        events: vec![
            Event::ServiceDeleted {
                org: org.clone(),
                name,
            }
            .to_new_event(),
        ],
        idempotency: Some(idempotency_record(&org, KIND, idempotency_key, Vec::new())),
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    Ok(Answer::Event(EventIdAnswer {
        event_id: outcome.last_event_id().unwrap_or_default(),
    }))
}

/// Reads what `pick` wants of a node of the caller's org: 404 for an unknown node and for
/// another org's (that refusal is audited).
fn owned_node<T>(
    control: &Control,
    node_id: &str,
    principal: &Principal,
    pick: impl FnOnce(&crate::projection::NodeRecord) -> T,
) -> Result<T, ApiError> {
    let views = control.projector.views();
    let node = views.nodes.get(node_id).ok_or_else(|| ApiError::NotFound {
        what: "node",
        value: node_id.to_string(),
    })?;
    if node.org != principal.org() {
        control.record_refusal(principal, "node", node_id);
        return Err(another_orgs_node(node_id));
    }
    Ok(pick(node))
}

async fn revoke_node(
    control: &Control,
    principal: &Principal,
    node_id: String,
) -> Result<Answer, ApiError> {
    principal.require(Scope::NodesWrite)?;
    let guard = control.lock_commands_settled().await;
    let (state, updated_event_id) = owned_node(control, &node_id, principal, |node| {
        (node.state, node.updated_event_id)
    })?;
    if state == NodeState::Revoked {
        return Ok(Answer::Event(EventIdAnswer {
            event_id: updated_event_id,
        }));
    }
    let store = Arc::clone(&control.store);
    let id = node_id.clone();
    let stored = blocking(move || read_node_credential(store.as_ref(), &id)).await?;
    let mut config_writes = Vec::new();
    if let Some(credential) = stored {
        config_writes.push(Control::config_put(
            node_credential_key(&node_id),
            &NodeCredentialSecret {
                revoked: true,
                ..credential
            },
        ));
    }
    // The node leaves the overlay in the same transaction: its peers drop it, its address is
    // free again (P9). The views must hold every overlay event before the leave is computed.
    let head = control.hub.position().head;
    control
        .projector
        .wait_for(head, control.settings.projection_wait)
        .await
        .map_err(|checkpoint| ApiError::ProjectionLagging {
            event_id: head,
            checkpoint,
        })?;
    let mut events = vec![
        Event::NodeRevoked {
            node_id: node_id.clone(),
        }
        .to_new_event(),
    ];
    if let Some(leave) = crate::overlay::leave_event(&control.projector.views().overlay, &node_id) {
        events.push(leave.to_new_event());
    }
    let commit = Commit {
        events,
        config_writes,
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    Ok(Answer::Event(EventIdAnswer {
        event_id: outcome.last_event_id().unwrap_or_default(),
    }))
}

/// Appends the events of a node's overlay report (joining the mesh, a new key, endpoints or
/// port), under the command lock and against views that reached the log head. Revoked and
/// unknown nodes never join. Returns the last event id, or `None` when nothing changed.
async fn apply_overlay_report(
    control: &Control,
    guard: crate::app::CommandGuard<'_>,
    node_id: &str,
    report: &OverlayReport,
) -> Result<Option<u64>, ApiError> {
    if report.public_key.is_none() {
        return Ok(None);
    }
    let head = control.hub.position().head;
    control
        .projector
        .wait_for(head, control.settings.projection_wait)
        .await
        .map_err(|checkpoint| ApiError::ProjectionLagging {
            event_id: head,
            checkpoint,
        })?;
    let events = {
        let views = control.projector.views();
        let Some(node) = views.nodes.get(node_id) else {
            return Err(ApiError::NotFound {
                what: "node",
                value: node_id.to_string(),
            });
        };
        if node.state == NodeState::Revoked {
            return Err(ApiError::NodeRevoked {
                node_id: node_id.to_string(),
            });
        }
        crate::overlay::report_events(
            &control.settings.overlay,
            &views.overlay,
            node_id,
            &node.org,
            report,
        )
        .map_err(|refusal| match refusal {
            OverlayRefusal::KeyInUse { ref public_key, .. } => ApiError::invalid(
                "wireguard_public_key",
                refusal.to_string(),
                public_key.clone(),
            ),
            OverlayRefusal::Full { ref cidr, .. } => ApiError::invalid(
                "overlay_cidr",
                format!("{refusal}; control needs a wider --overlay-cidr"),
                cidr.clone(),
            ),
        })?
    };
    if events.is_empty() {
        return Ok(None);
    }
    control.append(guard, &events).await.map(Some)
}

/// `POST /v1/nodes/{id}/wireguard-key`: the node rotated its WireGuard key.
async fn set_wireguard_key(
    control: &Control,
    principal: &Principal,
    node_id: String,
    public_key: String,
) -> Result<Answer, ApiError> {
    principal.require_node(&node_id)?;
    let guard = control.lock_commands_settled().await;
    let current = control.projector.views().overlay.get(&node_id).cloned();
    let report = OverlayReport {
        public_key: Some(public_key),
        endpoints: current
            .as_ref()
            .map(|member| member.endpoints.clone())
            .unwrap_or_default(),
        listen_port: None,
    };
    let event_id = match apply_overlay_report(control, guard, &node_id, &report).await? {
        Some(event_id) => event_id,
        None => control
            .projector
            .views()
            .nodes
            .get(&node_id)
            .map_or(0, |node| node.updated_event_id),
    };
    Ok(Answer::Event(EventIdAnswer { event_id }))
}

async fn set_node_role(
    control: &Control,
    principal: &Principal,
    node_id: String,
    role: Role,
) -> Result<Answer, ApiError> {
    principal.require(Scope::NodesWrite)?;
    let guard = control.lock_commands().await;
    let (current, updated_event_id) = owned_node(control, &node_id, principal, |node| {
        (node.role, node.updated_event_id)
    })?;
    if current == role {
        return Ok(Answer::Event(EventIdAnswer {
            event_id: updated_event_id,
        }));
    }
    let event_id = control
        .append(guard, &[Event::NodeRoleChanged { node_id, role }])
        .await?;
    Ok(Answer::Event(EventIdAnswer { event_id }))
}

/// `outpostctl nodes label`: the operator's labels of a node (F2). Labels already as asked
/// append nothing.
async fn label_node(
    control: &Control,
    principal: &Principal,
    node_id: String,
    set: std::collections::BTreeMap<String, String>,
    remove: Vec<String>,
) -> Result<Answer, ApiError> {
    principal.require(Scope::NodesWrite)?;
    let guard = control.lock_commands().await;
    let (labels, updated_event_id) = owned_node(control, &node_id, principal, |node| {
        (node.operator_labels.clone(), node.updated_event_id)
    })?;
    let mut after = labels.clone();
    for key in &remove {
        after.remove(key);
    }
    after.extend(set.clone());
    if after.len() > outpost_proto::limits::LABELS_MAX {
        return Err(ApiError::invalid(
            "set",
            format!(
                "the node would have more than {} operator labels",
                outpost_proto::limits::LABELS_MAX
            ),
            after.len(),
        ));
    }
    if after == labels {
        return Ok(Answer::Event(EventIdAnswer {
            event_id: updated_event_id,
        }));
    }
    let event_id = control
        .append(
            guard,
            &[Event::NodeLabeled {
                node_id,
                set,
                remove,
            }],
        )
        .await?;
    read_your_writes(control, event_id).await?;
    Ok(Answer::Event(EventIdAnswer { event_id }))
}

/// `outpostctl nodes cordon|drain|uncordon` (F2). Cordoning a cordoned node, or uncordoning a
/// schedulable one, appends nothing; draining a draining node is refused (409).
async fn set_node_scheduling(
    control: &Control,
    principal: &Principal,
    node_id: String,
    scheduling: crate::scheduler::NodeScheduling,
) -> Result<Answer, ApiError> {
    use crate::scheduler::NodeScheduling;
    principal.require(Scope::NodesWrite)?;
    let guard = control.lock_commands().await;
    let (current, updated_event_id) = owned_node(control, &node_id, principal, |node| {
        (node.scheduling, node.updated_event_id)
    })?;
    if current == scheduling {
        if scheduling == NodeScheduling::Draining {
            return Err(ApiError::NodeAlreadyDraining { node_id });
        }
        return Ok(Answer::Event(EventIdAnswer {
            event_id: updated_event_id,
        }));
    }
    tracing::info!(
        component = "nodes",
        action = "set_scheduling",
        node_id = node_id.as_str(),
        "node {node_id} is now {}",
        scheduling.as_str()
    );
    let event_id = control
        .append(
            guard,
            &[Event::NodeSchedulingChanged {
                node_id,
                scheduling,
            }],
        )
        .await?;
    read_your_writes(control, event_id).await?;
    Ok(Answer::Event(EventIdAnswer { event_id }))
}

async fn set_profile(
    control: &Control,
    principal: &Principal,
    profile: outpost_proto::profile::EnvironmentProfile,
) -> Result<Answer, ApiError> {
    principal.require_cluster(Scope::ProfileWrite)?;
    let generation = sha256_bytes_hex(&serde_json::to_vec(&profile).map_err(ApiError::internal)?);
    let guard = control.lock_commands().await;
    let event_id = control
        .append(
            guard,
            &[Event::ProfileSet {
                profile,
                generation: generation.clone(),
            }],
        )
        .await?;
    read_your_writes(control, event_id).await?;
    Ok(Answer::Profile(ProfileAnswer {
        event_id,
        generation,
    }))
}

async fn report_bootstrap(
    control: &Control,
    principal: &Principal,
    reports: Vec<outpost_proto::bootstrap::BootstrapEvent>,
) -> Result<Answer, ApiError> {
    for report in &reports {
        principal.require_node(report.node_id.as_str())?;
    }
    if reports.is_empty() {
        return Ok(Answer::Accepted(AcceptedAnswer { accepted: 0 }));
    }
    // Status, not commands: folded into each node's latest record, never a log entry.
    let accepted = reports.len();
    let views = control.projector.views();
    control.status.report_bootstrap(reports, |node_id| {
        views.bootstrap.get(node_id).cloned().unwrap_or_default()
    });
    Ok(Answer::Accepted(AcceptedAnswer { accepted }))
}

async fn rotate_epoch(control: &Control, principal: &Principal) -> Result<Answer, ApiError> {
    principal.require_cluster(Scope::Admin)?;
    let guard = control.lock_commands_settled().await;
    let mut log_epoch = random_log_epoch();
    while log_epoch == control.hub.position().log_epoch {
        log_epoch = random_log_epoch();
    }
    let store = Arc::clone(&control.store);
    blocking(move || Ok(store.set_log_epoch(log_epoch)?)).await?;
    control.hub.set_epoch(log_epoch);
    control
        .append(guard, &[Event::LogEpochRotated { log_epoch }])
        .await?;
    tracing::info!("log epoch rotated to {log_epoch:016x}; every cursor is now gone");
    Ok(Answer::Epoch(EpochAnswer { log_epoch }))
}
