//! Route and edge commands: define and delete a route (org-scoped, audited, idempotent by
//! key), and an edge's enrollment with a one-time token or registration with its credential.

use std::sync::Arc;

use outpost_proto::Name;
use outpost_proto::route::{EdgeRegisterRequest, EdgeRegisterResponse, RouteSpec};

use super::api::{RouteAnswer, route_view};
use super::{EDGE_CREDENTIAL_PREFIX, edge_credential_key};
use crate::api::auth::{
    EnrollmentTokenSecret, NodeCredentialSecret, Principal, Scope, enrollment_token_key,
    random_hex, same_digest, sha256_hex,
};
use crate::api::error::ApiError;
use crate::api::views::EventIdAnswer;
use crate::app::{Control, blocking};
use crate::command::execute::{
    Answer, earlier_answer, idempotency_record, read_your_writes, verify_enrollment_token,
};
use crate::log::{Event, RegisteredWith};
use crate::projection::Views;
use crate::store::{Commit, CommitOutcome};

/// Checks a route against the views: its service exists in the org and declares the port, and
/// no other route of the cluster claims one of its hosts or its listen port. Hosts and listen
/// ports are one namespace for the whole cluster (the edges share them); a claim by another
/// org is refused without naming that org's route (P4).
pub fn check_route_against(views: &Views, org: &str, spec: &RouteSpec) -> Result<(), ApiError> {
    let service = views.service(org, &spec.service).ok_or_else(|| {
        ApiError::invalid(
            "service",
            format!("no service of that name in org {org}"),
            &spec.service,
        )
    })?;
    if !service.spec.ports.iter().any(|p| p.name == spec.port) {
        let declared: Vec<&str> = service.spec.ports.iter().map(|p| p.name.as_str()).collect();
        return Err(ApiError::invalid(
            "port",
            format!(
                "service {} declares no port of that name (it declares: {})",
                spec.service,
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ),
            &spec.port,
        ));
    }
    let own: Vec<&RouteSpec> = views
        .routes
        .of_org(org)
        .filter(|r| r.spec.name != spec.name)
        .map(|r| &r.spec)
        .chain(std::iter::once(spec))
        .collect();
    outpost_proto::route::check_route_table(own, &[])?;
    for other in views.routes.routes.values().filter(|r| r.org != org) {
        if let Some(host) = spec.hosts.iter().find(|h| other.spec.hosts.contains(h)) {
            return Err(ApiError::invalid(
                "hosts",
                "is already claimed by a route of another org",
                host,
            ));
        }
        if let Some(port) = spec.listen_port
            && other.spec.listen_port == Some(port)
        {
            return Err(ApiError::invalid(
                "listen_port",
                "is already claimed by a route of another org",
                port,
            ));
        }
    }
    check_tls_secret(views, org, spec)
}

/// A terminating route's `tls_secret` must be a secret of the org holding the keys `cert` and
/// `key` (by their names; the values are checked by the edge when it opens them).
pub fn check_tls_secret(views: &Views, org: &str, spec: &RouteSpec) -> Result<(), ApiError> {
    let Some(name) = &spec.tls_secret else {
        return Ok(());
    };
    let secret = views.secrets.get(org, name).ok_or_else(|| {
        ApiError::invalid(
            "tls_secret",
            format!("no secret of that name in org {org} (outpostctl secrets set {name} --from-file cert=CERT.pem --from-file key=KEY.pem)"),
            name,
        )
    })?;
    let missing: Vec<&str> = outpost_proto::route::TLS_SECRET_KEYS
        .into_iter()
        .filter(|key| !secret.keys.iter().any(|k| k == key))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::invalid(
            "tls_secret",
            format!(
                "secret {name} version {} has no key {} (it has: {}); a terminating route needs keys cert and key",
                secret.version,
                missing.join(" and no key "),
                secret.keys.join(", ")
            ),
            name,
        ));
    }
    Ok(())
}

pub async fn define_route(
    control: &Control,
    principal: &Principal,
    spec: RouteSpec,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    const KIND: &str = "define-route";
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    if let Some((event_id, answer)) = earlier_answer(control, &org, KIND, idempotency_key).await? {
        return answer_route(
            control,
            &org,
            String::from_utf8_lossy(&answer).into_owned(),
            event_id,
        )
        .await;
    }
    let name = spec.name.to_string();
    let guard = control.lock_commands().await;
    check_route_against(&control.projector.views(), &org, &spec)?;
    let event = Event::RouteDefined {
        org: org.clone(),
        spec,
        actor: principal.credential_id(),
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
    answer_route(control, &org, name, event_id).await
}

async fn answer_route(
    control: &Control,
    org: &str,
    name: String,
    event_id: u64,
) -> Result<Answer, ApiError> {
    read_your_writes(control, event_id).await?;
    let views = control.projector.views();
    let record = views
        .routes
        .get(org, &name)
        .ok_or_else(|| ApiError::NotFound {
            what: "route",
            value: name.clone(),
        })?;
    Ok(Answer::Route(RouteAnswer {
        route: route_view(record, Vec::new(), Vec::new()),
        event_id,
    }))
}

pub async fn delete_route(
    control: &Control,
    principal: &Principal,
    name: String,
    idempotency_key: Option<&str>,
) -> Result<Answer, ApiError> {
    const KIND: &str = "delete-route";
    let org = principal.require(Scope::ServicesWrite)?.to_string();
    if let Some((event_id, _)) = earlier_answer(control, &org, KIND, idempotency_key).await? {
        return Ok(Answer::Event(EventIdAnswer { event_id }));
    }
    let guard = control.lock_commands().await;
    {
        let views = control.projector.views();
        // Another org's route of that name is not found either (P4).
        if views.routes.get(&org, &name).is_none() {
            return Err(crate::audit::not_found_here(
                control, &views, principal, "route", &name,
            ));
        }
    }
    let commit = Commit {
        events: vec![
            Event::RouteDeleted {
                org: org.clone(),
                name,
                actor: principal.credential_id(),
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

/// An edge credential's parts: `ope.EDGE_ID.SECRET`.
pub fn split_edge_credential(credential: &str) -> Option<(&str, &str)> {
    let rest = credential
        .strip_prefix(EDGE_CREDENTIAL_PREFIX)?
        .strip_prefix('.')?;
    let (edge_id, secret) = rest.rsplit_once('.')?;
    (!edge_id.is_empty() && !secret.is_empty()).then_some((edge_id, secret))
}

/// Checks an edge credential: the edge's id and org, or 401 naming the credential by its id.
pub async fn verify_edge_credential(
    control: &Control,
    credential: &str,
) -> Result<(String, String), ApiError> {
    let public = split_edge_credential(credential).map_or_else(
        || "(malformed)".to_string(),
        |(id, _)| format!("{EDGE_CREDENTIAL_PREFIX}.{id}"),
    );
    let unauthorized = move || {
        ApiError::unauthorized(
            "authorization",
            public.clone(),
            "unknown or wrong edge credential; enroll the edge again",
        )
    };
    let (edge_id, secret) = split_edge_credential(credential).ok_or_else(&unauthorized)?;
    let store = Arc::clone(&control.store);
    let key = edge_credential_key(edge_id);
    let stored: Option<NodeCredentialSecret> = blocking(move || {
        Ok(match store.get_config(&key)? {
            None => None,
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
        })
    })
    .await?;
    let stored = stored.ok_or_else(&unauthorized)?;
    if stored.revoked || !same_digest(&stored.secret_sha256, &sha256_hex(secret)) {
        return Err(unauthorized());
    }
    Ok((edge_id.to_string(), stored.org))
}

pub async fn register_edge(
    control: &Control,
    request: EdgeRegisterRequest,
) -> Result<Answer, ApiError> {
    let edge_id = request.edge_id.to_string();
    let guard = control.lock_commands().await;
    if let Some(credential) = &request.edge_credential {
        match verify_edge_credential(control, credential).await {
            Ok((verified_id, org)) if verified_id == edge_id => {
                control
                    .append(
                        guard,
                        &[Event::EdgeRegistered {
                            edge_id: edge_id.clone(),
                            org: org.clone(),
                            with: RegisteredWith::NodeCredential,
                            sealing_public_key: request.sealing_public_key.clone(),
                        }],
                    )
                    .await?;
                return Ok(registered(edge_id, credential.clone(), org));
            }
            Ok((other, _)) => {
                return Err(ApiError::forbidden(
                    "edge_id",
                    &edge_id,
                    format!("the credential belongs to edge {other}"),
                ));
            }
            Err(error) if request.enrollment_token.is_none() => return Err(error),
            Err(_) => {}
        }
    }
    let token = request.enrollment_token.clone().unwrap_or_default();
    let (claims, stored_token) = verify_enrollment_token(control, &token).await?;
    let store = Arc::clone(&control.store);
    let key = edge_credential_key(&edge_id);
    let existing: Option<NodeCredentialSecret> = blocking(move || {
        Ok(match store.get_config(&key)? {
            None => None,
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
        })
    })
    .await?;
    if let Some(existing) = existing
        && existing.org != stored_token.org
    {
        // Not found, like a node id another org holds: the enrollment names no org's edge.
        control.record_enrollment_refusal(&claims.token_id, &stored_token.org, "edge", &edge_id);
        return Err(ApiError::NotFound {
            what: "edge",
            value: edge_id,
        });
    }
    let secret = random_hex(32);
    let credential = format!("{EDGE_CREDENTIAL_PREFIX}.{edge_id}.{secret}");
    let events = [
        Event::EnrollmentTokenUsed {
            token_id: claims.token_id.clone(),
            node_id: format!("edge/{edge_id}"),
        },
        Event::EdgeRegistered {
            edge_id: edge_id.clone(),
            org: stored_token.org.clone(),
            with: RegisteredWith::EnrollmentToken,
            sealing_public_key: request.sealing_public_key.clone(),
        },
    ];
    let used = EnrollmentTokenSecret {
        used_by: Some(format!("edge/{edge_id}")),
        ..stored_token.clone()
    };
    let edge_secret = NodeCredentialSecret {
        org: stored_token.org.clone(),
        secret_sha256: sha256_hex(&secret),
        revoked: false,
    };
    let commit = Commit {
        events: events.iter().map(Event::to_new_event).collect(),
        config_writes: vec![
            Control::config_put(enrollment_token_key(&claims.token_id), &used),
            Control::config_put(edge_credential_key(&edge_id), &edge_secret),
        ],
        ..Commit::default()
    };
    control.commit(guard, commit).await?;
    Ok(registered(edge_id, credential, stored_token.org))
}

fn registered(edge_id: String, edge_credential: String, org: String) -> Answer {
    Answer::EdgeRegistered(EdgeRegisterResponse {
        edge_id: Name::try_from(edge_id.as_str()).unwrap_or_default(),
        edge_credential,
        org,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_credentials_split_on_the_last_dot() {
        assert_eq!(split_edge_credential("ope.e1.abc"), Some(("e1", "abc")));
        assert_eq!(split_edge_credential("opn.e1.abc"), None);
        assert_eq!(split_edge_credential("ope.e1."), None);
    }
}
