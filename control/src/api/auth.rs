//! Authentication and authorization (P5): operator tokens with an org and scopes, node
//! credentials valid only for their own node. Control stores only sha256 of every secret.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::store::Store;

pub const OPERATOR_TOKEN_PREFIX: &str = "opa";
pub const NODE_CREDENTIAL_PREFIX: &str = "opn";

/// What an operator token allows. `Admin` implies every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "admin")]
    Admin,
    #[serde(rename = "services:write")]
    ServicesWrite,
    #[serde(rename = "nodes:write")]
    NodesWrite,
    #[serde(rename = "enroll:write")]
    EnrollWrite,
    #[serde(rename = "profile:write")]
    ProfileWrite,
    #[serde(rename = "events:read")]
    EventsRead,
    #[serde(rename = "read")]
    Read,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::Admin,
        Scope::ServicesWrite,
        Scope::NodesWrite,
        Scope::EnrollWrite,
        Scope::ProfileWrite,
        Scope::EventsRead,
        Scope::Read,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::ServicesWrite => "services:write",
            Scope::NodesWrite => "nodes:write",
            Scope::EnrollWrite => "enroll:write",
            Scope::ProfileWrite => "profile:write",
            Scope::EventsRead => "events:read",
            Scope::Read => "read",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == text)
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator {
        token_id: String,
        org: String,
        scopes: Vec<Scope>,
    },
    Node {
        node_id: String,
        org: String,
    },
}

impl Principal {
    pub fn org(&self) -> &str {
        match self {
            Principal::Operator { org, .. } | Principal::Node { org, .. } => org,
        }
    }

    /// Requires an operator token with `scope` (or admin).
    pub fn require(&self, scope: Scope) -> Result<&str, ApiError> {
        match self {
            Principal::Operator { org, scopes, .. }
                if scopes.contains(&Scope::Admin) || scopes.contains(&scope) =>
            {
                Ok(org)
            }
            Principal::Operator { .. } => Err(ApiError::Forbidden {
                message: format!("this token lacks the scope {}", scope.as_str()),
            }),
            Principal::Node { node_id, .. } => Err(ApiError::Forbidden {
                message: format!(
                    "node {node_id} may not call this endpoint; it needs an operator token with {}",
                    scope.as_str()
                ),
            }),
        }
    }

    /// Requires `scope` (or admin) on a token of the cluster operator's org (`default`):
    /// cluster-wide operations (the unfiltered log, epochs, other orgs' tokens, the profile)
    /// are not for tenants.
    pub fn require_cluster(&self, scope: Scope) -> Result<(), ApiError> {
        let org = self.require(scope)?;
        if org != crate::init::DEFAULT_ORG {
            return Err(ApiError::Forbidden {
                message: format!(
                    "{} is cluster-wide; it needs a token of the {} org, not of org {org}",
                    scope.as_str(),
                    crate::init::DEFAULT_ORG
                ),
            });
        }
        Ok(())
    }

    /// Allows the node itself, or an operator of the node's org with `scope`.
    pub fn require_node_or(
        &self,
        node_id: &str,
        node_org: Option<&str>,
        scope: Scope,
    ) -> Result<(), ApiError> {
        match self {
            Principal::Node {
                node_id: caller, ..
            } if caller == node_id => Ok(()),
            Principal::Node {
                node_id: caller, ..
            } => Err(ApiError::Forbidden {
                message: format!("node {caller} may not act on node {node_id}"),
            }),
            Principal::Operator { .. } => {
                let org = self.require(scope)?;
                match node_org {
                    Some(node_org) if node_org != org => Err(ApiError::Forbidden {
                        message: format!("node {node_id} belongs to another org"),
                    }),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Allows only the node itself.
    pub fn require_node(&self, node_id: &str) -> Result<(), ApiError> {
        match self {
            Principal::Node {
                node_id: caller, ..
            } if caller == node_id => Ok(()),
            Principal::Node {
                node_id: caller, ..
            } => Err(ApiError::Forbidden {
                message: format!("node {caller} may not act on node {node_id}"),
            }),
            Principal::Operator { .. } => Err(ApiError::Forbidden {
                message: format!("only node {node_id} itself may call this endpoint"),
            }),
        }
    }
}

/// Stored form of an operator token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenSecret {
    pub org: String,
    pub scopes: Vec<Scope>,
    pub secret_sha256: String,
}

/// Stored form of a node credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredentialSecret {
    pub org: String,
    pub secret_sha256: String,
    pub revoked: bool,
}

/// Stored form of an enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenSecret {
    pub org: String,
    pub secret_sha256: String,
    pub expires_at_unix: u64,
    pub used_by: Option<String>,
}

pub fn operator_token_key(token_id: &str) -> String {
    format!("operator-token/{token_id}")
}

pub fn node_credential_key(node_id: &str) -> String {
    format!("node-credential/{node_id}")
}

pub fn enrollment_token_key(token_id: &str) -> String {
    format!("enrollment-token/{token_id}")
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Random hex of `bytes` random bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), buffer.as_mut_slice());
    hex::encode(buffer)
}

/// Compares two hex digests in constant time.
pub fn same_digest(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn read_config<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<T>, ApiError> {
    match store.get_config(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            ApiError::internal(format!("stored record {key} does not decode: {error}"))
        }),
    }
}

pub fn read_node_credential(
    store: &dyn Store,
    node_id: &str,
) -> Result<Option<NodeCredentialSecret>, ApiError> {
    read_config(store, &node_credential_key(node_id))
}

pub fn read_enrollment_token(
    store: &dyn Store,
    token_id: &str,
) -> Result<Option<EnrollmentTokenSecret>, ApiError> {
    read_config(store, &enrollment_token_key(token_id))
}

/// A node credential's parts: `opn.NODE_ID.SECRET`.
pub fn split_node_credential(credential: &str) -> Option<(&str, &str)> {
    let rest = credential
        .strip_prefix(NODE_CREDENTIAL_PREFIX)?
        .strip_prefix('.')?;
    let (node_id, secret) = rest.rsplit_once('.')?;
    (!node_id.is_empty() && !secret.is_empty()).then_some((node_id, secret))
}

/// Checks a node credential against the store: 401 when unknown or wrong, 403 when revoked.
pub fn verify_node_credential(store: &dyn Store, credential: &str) -> Result<Principal, ApiError> {
    let unauthorized = || ApiError::Unauthorized {
        message: "unknown or wrong node credential; register again".into(),
    };
    let (node_id, secret) = split_node_credential(credential).ok_or_else(unauthorized)?;
    let stored = read_node_credential(store, node_id)?.ok_or_else(unauthorized)?;
    if !same_digest(&stored.secret_sha256, &sha256_hex(secret)) {
        return Err(unauthorized());
    }
    if stored.revoked {
        return Err(ApiError::NodeRevoked {
            node_id: node_id.to_string(),
        });
    }
    Ok(Principal::Node {
        node_id: node_id.to_string(),
        org: stored.org,
    })
}

/// Authenticates a bearer token of either kind.
pub fn authenticate(store: &dyn Store, authorization: Option<&str>) -> Result<Principal, ApiError> {
    let missing = || ApiError::Unauthorized {
        message: "missing bearer token in the Authorization header".into(),
    };
    let token = authorization.ok_or_else(missing)?.trim();
    let token = token.strip_prefix("Bearer ").ok_or_else(missing)?.trim();
    if token.starts_with(NODE_CREDENTIAL_PREFIX) {
        return verify_node_credential(store, token);
    }
    let unknown = || ApiError::Unauthorized {
        message: "unknown or wrong operator token".into(),
    };
    let rest = token
        .strip_prefix(OPERATOR_TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(unknown)?;
    let (token_id, secret) = rest.split_once('.').ok_or_else(unknown)?;
    let stored: OperatorTokenSecret =
        read_config(store, &operator_token_key(token_id))?.ok_or_else(unknown)?;
    if !same_digest(&stored.secret_sha256, &sha256_hex(secret)) {
        return Err(unknown());
    }
    Ok(Principal::Operator {
        token_id: token_id.to_string(),
        org: stored.org,
        scopes: stored.scopes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_credentials_split_on_the_last_dot() {
        assert_eq!(
            split_node_credential("opn.edge-1.site.abc"),
            Some(("edge-1.site", "abc"))
        );
        assert_eq!(split_node_credential("opn.n1."), None);
        assert_eq!(split_node_credential("opa.n1.s"), None);
    }

    #[test]
    fn admin_implies_every_scope_and_others_do_not() {
        let admin = Principal::Operator {
            token_id: "t".into(),
            org: "o".into(),
            scopes: vec![Scope::Admin],
        };
        assert!(Scope::ALL.iter().all(|s| admin.require(*s).is_ok()));
        let reader = Principal::Operator {
            token_id: "t".into(),
            org: "o".into(),
            scopes: vec![Scope::Read],
        };
        assert!(reader.require(Scope::Read).is_ok());
        assert!(matches!(
            reader.require(Scope::ServicesWrite),
            Err(ApiError::Forbidden { .. })
        ));
    }

    #[test]
    fn scopes_round_trip_their_text() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
