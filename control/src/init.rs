//! Cold and warm start (B3). Cold start (empty store): create the CA, the cluster id, the
//! default org and an admin token, and persist them with their events in one transaction.
//! Warm start: load them, without initializing again. A failure while persisting leaves the
//! store as it was, so the next start tries the cold start again.

use serde::{Deserialize, Serialize};

use crate::api::auth::{
    OPERATOR_TOKEN_PREFIX, OperatorTokenSecret, Scope, operator_token_key, random_hex, sha256_hex,
};
use crate::app::Control;
use crate::log::Event;
use crate::store::{Commit, Store, StoreError};
use crate::tls::{CertificateAuthority, TlsError};

/// Config key of the cluster identity.
pub const CLUSTER_KEY: &str = "cluster";
pub const DEFAULT_ORG: &str = "default";

/// What the control persists about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub cluster_id: String,
    pub ca: CertificateAuthority,
    /// Leadership epoch handed to nodes in plans and registrations.
    pub leadership_epoch: u64,
    pub created_at_unix_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Cold,
    Warm,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("stored cluster identity does not decode: {0}")]
    Corrupt(String),
    #[error("initialization task failed: {0}")]
    Task(String),
}

/// A freshly minted operator token: its text (shown once) and what is stored.
pub struct MintedToken {
    pub token: String,
    pub token_id: String,
    pub stored: OperatorTokenSecret,
}

pub fn mint_operator_token(org: &str, scopes: Vec<Scope>) -> MintedToken {
    let token_id = crate::api::auth::time_ordered_id();
    let secret = random_hex(32);
    MintedToken {
        token: format!("{OPERATOR_TOKEN_PREFIX}.{token_id}.{secret}"),
        token_id,
        stored: OperatorTokenSecret {
            org: org.to_string(),
            scopes,
            secret_sha256: sha256_hex(&secret),
            expires_at_unix: None,
            revoked: false,
        },
    }
}

/// The events and writes that issue an operator token.
pub fn operator_token_commit(minted: &MintedToken) -> (Event, crate::store::TableWrite) {
    let event = Event::OperatorTokenIssued {
        token_id: minted.token_id.clone(),
        expires_at_unix: minted.stored.expires_at_unix,
        org: minted.stored.org.clone(),
        scopes: minted
            .stored
            .scopes
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
    };
    (
        event,
        Control::config_put(operator_token_key(&minted.token_id), &minted.stored),
    )
}

/// Loads the cluster identity, or creates and persists it on an empty store. Returns the admin
/// token on a cold start.
pub fn initialize_or_load(
    store: &dyn Store,
    now_unix_ms: u64,
) -> Result<(ClusterIdentity, StartKind, Option<String>), InitError> {
    if let Some(bytes) = store.get_config(CLUSTER_KEY)? {
        let identity: ClusterIdentity =
            serde_json::from_slice(&bytes).map_err(|e| InitError::Corrupt(e.to_string()))?;
        return Ok((identity, StartKind::Warm, None));
    }
    let identity = ClusterIdentity {
        cluster_id: random_hex(8),
        ca: CertificateAuthority::generate()?,
        leadership_epoch: 1,
        created_at_unix_ms: now_unix_ms,
    };
    let admin = mint_operator_token(DEFAULT_ORG, vec![Scope::Admin]);
    let (token_event, token_write) = operator_token_commit(&admin);
    let events = [
        Event::ClusterInitialized {
            cluster_id: identity.cluster_id.clone(),
            ca_fingerprint: identity.ca.fingerprint.clone(),
        },
        Event::OrgCreated {
            org: DEFAULT_ORG.to_string(),
        },
        token_event,
    ];
    let commit = Commit {
        events: events.iter().map(Event::to_new_event).collect(),
        config_writes: vec![
            Control::config_put(CLUSTER_KEY.to_string(), &identity),
            token_write,
        ],
        at_unix_ms: now_unix_ms,
        idempotency: None,
        expected_head: Some(0),
    };
    store.commit(commit)?;
    Ok((identity, StartKind::Cold, Some(admin.token)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[test]
    fn cold_start_persists_and_warm_start_loads_without_initializing_again() {
        let store = MemoryStore::new();
        let (cold, kind, token) = initialize_or_load(&store, 1).unwrap();
        assert_eq!(kind, StartKind::Cold);
        assert!(token.unwrap().starts_with("opa."));
        let head = store.log_position().unwrap().head;
        assert_eq!(head, 3);
        let (warm, kind, token) = initialize_or_load(&store, 2).unwrap();
        assert_eq!((kind, token), (StartKind::Warm, None));
        assert_eq!(warm, cold);
        assert_eq!(
            store.log_position().unwrap().head,
            head,
            "a warm start appends nothing"
        );
    }
}
