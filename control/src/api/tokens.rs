//! Operator tokens (P5, issue 12): the view of issued tokens (ids, orgs, scopes, expiry,
//! revocation — never a secret), `GET /v1/admin/tokens` and
//! `POST /v1/admin/tokens/{id}/revoke`. A revoked token is refused from the very next request:
//! authentication reads the stored record on every call ([`super::auth::authenticate_at`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::{OperatorTokenSecret, Scope, operator_token_key, read_operator_token};
use super::error::ApiError;
use super::extract::ApiPath;
use crate::app::{Control, blocking};
use crate::log::Event;
use crate::store::Commit;

/// One issued operator token as `tokens ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub token_id: String,
    pub org: String,
    pub scopes: Vec<String>,
    pub issued_at_unix_ms: u64,
    pub expires_at_unix: Option<u64>,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenViews {
    pub tokens: BTreeMap<String, TokenView>,
}

impl TokenViews {
    pub fn apply(&mut self, event: &Event, at_unix_ms: u64) {
        match event {
            Event::OperatorTokenIssued {
                token_id,
                org,
                scopes,
                expires_at_unix,
            } => {
                self.tokens.insert(
                    token_id.clone(),
                    TokenView {
                        token_id: token_id.clone(),
                        org: org.clone(),
                        scopes: scopes.clone(),
                        issued_at_unix_ms: at_unix_ms,
                        expires_at_unix: *expires_at_unix,
                        revoked: false,
                    },
                );
            }
            Event::OperatorTokenRevoked { token_id, .. } => {
                if let Some(token) = self.tokens.get_mut(token_id) {
                    token.revoked = true;
                }
            }
            _ => {}
        }
    }
}

pub async fn list_tokens_handler(
    State(control): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = super::authenticate(&control, &headers).await?;
    principal.require_cluster(Scope::Admin)?;
    let views = control.projector.views();
    let tokens: Vec<TokenView> = views.tokens.tokens.values().cloned().collect();
    Ok(axum::Json(tokens).into_response())
}

/// Revokes an operator token: the stored record is marked revoked (authentication refuses it
/// from the next request on) and `OperatorTokenRevoked` names who did it.
pub async fn revoke_token(
    control: &Control,
    principal: &super::auth::Principal,
    token_id: &str,
) -> Result<u64, ApiError> {
    principal.require_cluster(Scope::Admin)?;
    let not_found = || ApiError::NotFound {
        what: "token",
        value: token_id.to_string(),
    };
    if token_id.is_empty()
        || token_id.len() > 64
        || !token_id.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(ApiError::invalid(
            "token_id",
            "must be the hex id a token was issued with (opa.TOKEN_ID.…)",
            token_id,
        ));
    }
    let guard = control.lock_commands().await;
    let store = Arc::clone(&control.store);
    let id = token_id.to_string();
    let stored: OperatorTokenSecret = blocking(move || read_operator_token(store.as_ref(), &id))
        .await?
        .ok_or_else(not_found)?;
    if stored.revoked {
        return Ok(control.hub.position().head);
    }
    let event = Event::OperatorTokenRevoked {
        token_id: token_id.to_string(),
        org: stored.org.clone(),
        actor: principal.credential_id(),
    };
    let commit = Commit {
        events: vec![event.to_new_event()],
        config_writes: vec![Control::config_put(
            operator_token_key(token_id),
            &OperatorTokenSecret {
                revoked: true,
                ..stored
            },
        )],
        ..Commit::default()
    };
    let outcome = control.commit(guard, commit).await?;
    Ok(outcome.last_event_id().unwrap_or_default())
}

pub async fn revoke_token_handler(
    State(control): State<Arc<Control>>,
    ApiPath(token_id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let principal = super::authenticate(&control, &headers).await?;
    let event_id = revoke_token(&control, &principal, &token_id).await?;
    Ok(axum::Json(BTreeMap::from([("event_id", event_id)])).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::{Principal, authenticate_at};
    use crate::store::Store;
    use crate::store::memory::MemoryStore;

    fn store_token(store: &MemoryStore, expires_at_unix: Option<u64>, revoked: bool) -> String {
        let mut minted = crate::init::mint_operator_token("acme", vec![Scope::Read]);
        minted.stored.expires_at_unix = expires_at_unix;
        minted.stored.revoked = revoked;
        let (_, write) = crate::init::operator_token_commit(&minted);
        store
            .commit(Commit {
                config_writes: vec![write],
                ..Commit::default()
            })
            .unwrap();
        minted.token
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused_naming_the_token_id() {
        let store = MemoryStore::new();
        let lasting = store_token(&store, None, false);
        let bearer = format!("Bearer {lasting}");
        assert!(matches!(
            authenticate_at(&store, Some(&bearer), 10),
            Ok(Principal::Operator { .. })
        ));
        let expiring = store_token(&store, Some(100), false);
        let bearer = format!("Bearer {expiring}");
        assert!(authenticate_at(&store, Some(&bearer), 100).is_ok());
        let error = authenticate_at(&store, Some(&bearer), 101).unwrap_err();
        let body = error.body();
        assert!(body.message.contains("expired"), "{}", body.message);
        assert!(expiring.starts_with(body.value.as_deref().unwrap()));
        let revoked = store_token(&store, None, true);
        let error = authenticate_at(&store, Some(&format!("Bearer {revoked}")), 1).unwrap_err();
        assert!(error.body().message.contains("revoked"));
        assert!(
            !error
                .body()
                .message
                .contains(revoked.rsplit('.').next().unwrap())
        );
    }
}
