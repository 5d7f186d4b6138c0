//! The secrets endpoints: `PUT /v1/secrets/{name}` (next version), `GET /v1/secrets` (names,
//! versions, keys and who changed them — never values) and `DELETE /v1/secrets/{name}` (refused
//! while a service references it). Parsing is pure; the write takes the command lock and
//! commits the event and the wrapped data key in one transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use outpost_proto::name::check_name;
use outpost_proto::secret::SecretValues;
use outpost_proto::validate::{Validate, ValidationError};
use serde::{Deserialize, Serialize};

use super::at_rest::{data_key_record, seal_version};
use super::views::SecretRecord;
use crate::api::auth::{Principal, Scope};
use crate::api::error::ApiError;
use crate::api::extract::ApiPath;
use crate::app::Control;
use crate::command::{DocumentFormat, Strictness, parse_document};
use crate::log::Event;
use crate::projection::Views;
use crate::store::{Commit, TableWrite};

/// Body of `PUT /v1/secrets/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetSecretRequest {
    pub values: SecretValues,
}

impl Validate for SetSecretRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        self.values.validate()
    }
}

/// What `secrets ls` shows of one secret, and what a write answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretView {
    pub name: String,
    pub org: String,
    pub version: u32,
    pub keys: Vec<String>,
    pub updated_at_unix_ms: u64,
    pub updated_by: String,
    /// Services of the org that reference it.
    pub used_by: Vec<String>,
    pub event_id: u64,
}

/// Parses a secret write: the name from the path, the values from a strict JSON body. Errors
/// name the field and, for values, only the key and size.
pub fn parse_set_secret(name: &str, body: &[u8]) -> Result<(String, SecretValues), ApiError> {
    check_name("name", name)?;
    let request: SetSecretRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields).map_err(
            // serde's messages may quote the offending input; a value must never be echoed.
            |error| match error {
                ApiError::InvalidBody { field, .. } => ApiError::InvalidBody {
                    reason: format!(
                        "expected {{\"values\": {{\"KEY\": \"VALUE\", ...}}}}{}",
                        field.as_ref().map_or(String::new(), |f| format!(" at {f}"))
                    ),
                    field,
                },
                other => other,
            },
        )?;
    Ok((name.to_string(), request.values))
}

fn services_using(views: &Views, org: &str, name: &str) -> Vec<String> {
    views
        .services_of(org)
        .filter(|service| service.spec.secrets.iter().any(|r| r.name == name))
        .map(|service| service.spec.name.to_string())
        .collect()
}

fn secret_view(views: &Views, record: &SecretRecord) -> SecretView {
    SecretView {
        name: record.name.clone(),
        org: record.org.clone(),
        version: record.version,
        keys: record.keys.clone(),
        updated_at_unix_ms: record.updated_at_unix_ms,
        updated_by: record.updated_by.clone(),
        used_by: services_using(views, &record.org, &record.name),
        event_id: record.event_id,
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound {
        what: "secret",
        value: name.to_string(),
    }
}

/// Checks a service's secret references against the org's secrets: each must exist and hold
/// every key the reference reads. Errors name `secrets[i].name` or `secrets[i].env.VAR`.
pub fn check_service_refs(
    views: &Views,
    org: &str,
    spec: &outpost_proto::service::ServiceSpec,
) -> Result<(), ApiError> {
    for (index, reference) in spec.secrets.iter().enumerate() {
        let Some(secret) = views.secrets.get(org, &reference.name) else {
            return Err(ApiError::invalid(
                format!("secrets[{index}].name"),
                "names no secret of this org (outpostctl secrets set)",
                reference.name.as_str(),
            ));
        };
        let wanted = reference
            .env
            .iter()
            .map(|(variable, key)| (format!("env.{variable}"), key))
            .chain(
                reference
                    .files
                    .iter()
                    .map(|(file, key)| (format!("files.{file}"), key)),
            );
        for (field, key) in wanted {
            if !secret.keys.contains(key) {
                return Err(ApiError::invalid(
                    format!("secrets[{index}].{field}"),
                    format!(
                        "secret {} version {} has no key {key} (it has {})",
                        reference.name,
                        secret.version,
                        secret.keys.join(", ")
                    ),
                    key,
                ));
            }
        }
    }
    Ok(())
}

/// How often a secret write is validated again after a concurrent write to the same secret.
const CONFLICT_RETRIES: u32 = 5;

/// Sets the next version of a secret of the caller's org; a concurrent write to the same
/// secret makes it validate again (the version number is taken from the views).
pub async fn set_secret(
    control: &Control,
    principal: &Principal,
    name: String,
    values: SecretValues,
) -> Result<SecretView, ApiError> {
    let mut attempt = 0;
    loop {
        match set_secret_once(control, principal, name.clone(), values.clone()).await {
            Err(ApiError::Conflict { .. }) if attempt < CONFLICT_RETRIES => {
                attempt += 1;
                control.catch_up_after_conflict().await?;
            }
            answer => return answer,
        }
    }
}

async fn set_secret_once(
    control: &Control,
    principal: &Principal,
    name: String,
    values: SecretValues,
) -> Result<SecretView, ApiError> {
    let org = principal.require(Scope::SecretsWrite)?.to_string();
    let master = control
        .settings
        .master_keys
        .current()
        .cloned()
        .ok_or_else(|| ApiError::internal("control holds no master key"))?;
    let guard = control.lock_commands().await;
    let version = {
        let views = control.projector.views();
        // Services keep working: a new version must keep every key a service reads.
        for service in services_using(&views, &org, &name) {
            let Some(spec) = views.service(&org, &service).map(|s| &s.spec) else {
                continue;
            };
            for reference in spec.secrets.iter().filter(|r| r.name == name.as_str()) {
                if let Some(key) = reference.keys().find(|key| values.get(key).is_none()) {
                    return Err(ApiError::invalid(
                        "values",
                        format!(
                            "service {service} reads key {key} of secret {name}; the new version must keep it"
                        ),
                        key,
                    ));
                }
            }
        }
        views.secrets.get(&org, &name).map_or(1, |s| s.version + 1)
    };
    let (sealed, wrapped) = seal_version(&master, &org, &name, version, &values);
    let event = Event::SecretVersionSet {
        org: org.clone(),
        name: name.clone(),
        version,
        keys: values.keys(),
        sealed,
        actor: principal.credential_id(),
    };
    let commit = Commit {
        events: vec![event.to_new_event()],
        config_writes: vec![Control::config_put(
            data_key_record(&org, &name, version),
            &wrapped,
        )],
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    let event_id = outcome.last_event_id().unwrap_or_default();
    crate::command::execute::read_your_writes(control, event_id).await?;
    let views = control.projector.views();
    let record = views
        .secrets
        .get(&org, &name)
        .ok_or_else(|| not_found(&name))?;
    Ok(secret_view(&views, record))
}

/// Deletes a secret of the caller's org and destroys its data keys; refused while a service
/// references it.
pub async fn delete_secret(
    control: &Control,
    principal: &Principal,
    name: String,
) -> Result<u64, ApiError> {
    let org = principal.require(Scope::SecretsWrite)?.to_string();
    check_name("name", &name)?;
    let guard = control.lock_commands().await;
    let version = {
        let views = control.projector.views();
        let record = views.secrets.get(&org, &name).ok_or_else(|| {
            crate::audit::not_found_here(control, &views, principal, "secret", &name)
        })?;
        let users = services_using(&views, &org, &name);
        if !users.is_empty() {
            return Err(ApiError::InUse {
                field: "secret",
                value: name.clone(),
                message: format!(
                    "secret {name} is referenced by service(s) {}; remove the reference first",
                    users.join(", ")
                ),
            });
        }
        record.version
    };
    let commit = Commit {
        events: vec![
            Event::SecretDeleted {
                org: org.clone(),
                name: name.clone(),
                actor: principal.credential_id(),
            }
            .to_new_event(),
        ],
        config_writes: (1..=version)
            .map(|v| TableWrite::Delete {
                key: data_key_record(&org, &name, v),
            })
            .collect(),
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    Ok(outcome.last_event_id().unwrap_or_default())
}

pub async fn put_secret_handler(
    State(control): State<Arc<Control>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = crate::api::authenticate(&control, &headers).await?;
    let (name, values) = parse_set_secret(&name, &crate::api::read_body(body).await?)?;
    let view = set_secret(&control, &principal, name, values).await?;
    Ok(axum::Json(view).into_response())
}

pub async fn list_secrets_handler(
    State(control): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = crate::api::authenticate(&control, &headers).await?;
    let org = principal.require(Scope::SecretsRead)?.to_string();
    let views = control.projector.views();
    let list: Vec<SecretView> = views
        .secrets
        .secrets
        .values()
        .filter(|record| record.org == org)
        .map(|record| secret_view(&views, record))
        .collect();
    Ok(axum::Json(list).into_response())
}

pub async fn delete_secret_handler(
    State(control): State<Arc<Control>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = crate::api::authenticate(&control, &headers).await?;
    let event_id = delete_secret(&control, &principal, name).await?;
    Ok(axum::Json(BTreeMap::from([("event_id", event_id)])).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_writes_parse_and_never_echo_a_value() {
        let (name, values) =
            parse_set_secret("db", br#"{"values":{"password":"hunter2"}}"#).unwrap();
        assert_eq!(
            (name.as_str(), values.get("password")),
            ("db", Some("hunter2"))
        );
        for body in [
            br#"{"values":{"password":123456789}}"#.as_slice(),
            br#"{"values":{"password":"hunter2"},"extra":"hunter2"}"#,
            br#"{"values":"hunter2"}"#,
            b"hunter2",
        ] {
            let error = parse_set_secret("db", body).unwrap_err();
            let body = serde_json::to_string(&error.body()).unwrap();
            assert!(!body.contains("hunter2"), "{body}");
            assert!(!body.contains("123456789"), "{body}");
        }
        let error = parse_set_secret("Bad Name", br#"{"values":{"k":"v"}}"#).unwrap_err();
        assert_eq!(error.body().field.as_deref(), Some("name"));
        let error = parse_set_secret("db", br#"{"values":{"bad key":"v"}}"#).unwrap_err();
        assert_eq!(error.body().value.as_deref(), Some("bad key"));
    }
}
