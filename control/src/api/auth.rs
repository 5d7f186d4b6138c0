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
    #[serde(rename = "secrets:read")]
    SecretsRead,
    #[serde(rename = "secrets:write")]
    SecretsWrite,
    #[serde(rename = "audit:read")]
    AuditRead,
}

impl Scope {
    pub const ALL: [Scope; 10] = [
        Scope::Admin,
        Scope::ServicesWrite,
        Scope::NodesWrite,
        Scope::EnrollWrite,
        Scope::ProfileWrite,
        Scope::EventsRead,
        Scope::Read,
        Scope::SecretsRead,
        Scope::SecretsWrite,
        Scope::AuditRead,
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
            Scope::SecretsRead => "secrets:read",
            Scope::SecretsWrite => "secrets:write",
            Scope::AuditRead => "audit:read",
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

    /// The caller's credential as an error may show it: `opa.TOKEN_ID` or `opn.NODE_ID`.
    pub fn credential_id(&self) -> String {
        match self {
            Principal::Operator { token_id, .. } => format!("{OPERATOR_TOKEN_PREFIX}.{token_id}"),
            Principal::Node { node_id, .. } => format!("{NODE_CREDENTIAL_PREFIX}.{node_id}"),
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
            Principal::Operator { .. } => Err(ApiError::forbidden(
                AUTHORIZATION_FIELD,
                self.credential_id(),
                format!("this token lacks the scope {}", scope.as_str()),
            )),
            Principal::Node { node_id, .. } => Err(ApiError::forbidden(
                AUTHORIZATION_FIELD,
                self.credential_id(),
                format!(
                    "node {node_id} may not call this endpoint; it needs an operator token with {}",
                    scope.as_str()
                ),
            )),
        }
    }

    /// Requires `scope` (or admin) on a token of the cluster operator's org (`default`):
    /// cluster-wide operations (the unfiltered log, epochs, other orgs' tokens, the profile)
    /// are not for tenants.
    pub fn require_cluster(&self, scope: Scope) -> Result<(), ApiError> {
        let org = self.require(scope)?;
        if org != crate::init::DEFAULT_ORG {
            return Err(ApiError::forbidden(
                AUTHORIZATION_FIELD,
                self.credential_id(),
                format!(
                    "{} is cluster-wide; it needs a token of the {} org, not of org {org}",
                    scope.as_str(),
                    crate::init::DEFAULT_ORG
                ),
            ));
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
            } => Err(ApiError::forbidden(
                "node_id",
                node_id,
                format!("node {caller} may not act on node {node_id}"),
            )),
            Principal::Operator { .. } => {
                let org = self.require(scope)?;
                match node_org {
                    Some(node_org) if node_org != org => Err(another_orgs_node(node_id)),
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
            } => Err(ApiError::forbidden(
                "node_id",
                node_id,
                format!("node {caller} may not act on node {node_id}"),
            )),
            Principal::Operator { .. } => Err(ApiError::forbidden(
                AUTHORIZATION_FIELD,
                self.credential_id(),
                format!("only node {node_id} itself may call this endpoint"),
            )),
        }
    }
}

/// The field a 401 or 403 names when the bearer token itself is the problem.
pub const AUTHORIZATION_FIELD: &str = "authorization";

/// A node of another org is not found: a tenant never learns that a name exists in another
/// org (P4), so the answer is the 404 an unknown node gets.
pub fn another_orgs_node(node_id: &str) -> ApiError {
    ApiError::NotFound {
        what: "node",
        value: node_id.to_string(),
    }
}

/// A service of another org is not found (404), like [`another_orgs_node`].
pub fn another_orgs_service(name: &str) -> ApiError {
    ApiError::NotFound {
        what: "service",
        value: name.to_string(),
    }
}

/// The service `name` of `org`; another org's service of that name is not found either (P4).
pub fn org_service<'a>(
    views: &'a crate::projection::Views,
    name: &str,
    org: &str,
) -> Result<&'a crate::projection::ServiceRecord, ApiError> {
    views
        .service(org, name)
        .ok_or_else(|| another_orgs_service(name))
}

/// What of a presented credential an error may show: its kind and id, never its secret
/// (`opa.TOKEN_ID`, `opn.NODE_ID`); `(malformed)` for text that is neither.
pub fn credential_public_part(credential: &str) -> String {
    if let Some((node_id, _)) = split_node_credential(credential) {
        return format!("{NODE_CREDENTIAL_PREFIX}.{node_id}");
    }
    match split_operator_token(credential) {
        Some((token_id, _)) => format!("{OPERATOR_TOKEN_PREFIX}.{token_id}"),
        None => "(malformed)".into(),
    }
}

/// An operator token's parts: `opa.TOKEN_ID.SECRET`.
fn split_operator_token(token: &str) -> Option<(&str, &str)> {
    let rest = token
        .strip_prefix(OPERATOR_TOKEN_PREFIX)?
        .strip_prefix('.')?;
    let (token_id, secret) = rest.split_once('.')?;
    (!token_id.is_empty() && !secret.is_empty()).then_some((token_id, secret))
}

/// Stored form of an operator token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenSecret {
    pub org: String,
    pub scopes: Vec<Scope>,
    pub secret_sha256: String,
    /// Unix time after which the token is refused; `None` never expires.
    #[serde(default)]
    pub expires_at_unix: Option<u64>,
    /// Set by `tokens revoke`; refused from the next request on.
    #[serde(default)]
    pub revoked: bool,
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

/// A new object's id that sorts by creation time: the unix milliseconds (12 hex digits) and 8
/// random bytes (16 hex digits). Ids made close together sit next to each other in every
/// B-tree keyed by them (the token records, the log's aggregate tables), so a batch of new
/// tokens writes a few store pages instead of one page per token. The random part keeps ids
/// unique across replicas and clocks; nothing secret is in an id.
pub fn time_ordered_id() -> String {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("{:012x}{}", unix_ms & 0xffff_ffff_ffff, random_hex(8))
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

pub fn read_operator_token(
    store: &dyn Store,
    token_id: &str,
) -> Result<Option<OperatorTokenSecret>, ApiError> {
    read_config(store, &operator_token_key(token_id))
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

/// Checks a node credential against the store: 401 naming `field` when unknown or wrong, 403
/// when revoked.
pub fn verify_node_credential(
    store: &dyn Store,
    field: &'static str,
    credential: &str,
) -> Result<Principal, ApiError> {
    let unauthorized = || {
        ApiError::unauthorized(
            field,
            credential_public_part(credential),
            "unknown or wrong node credential; register again",
        )
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

/// Authenticates a bearer token of either kind, at the current wall-clock time.
pub fn authenticate(store: &dyn Store, authorization: Option<&str>) -> Result<Principal, ApiError> {
    let now_unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    authenticate_at(store, authorization, now_unix_secs)
}

/// Authenticates a bearer token of either kind at `now_unix_secs`: an operator token that is
/// revoked or past its expiry is refused (401 naming `opa.TOKEN_ID`).
pub fn authenticate_at(
    store: &dyn Store,
    authorization: Option<&str>,
    now_unix_secs: u64,
) -> Result<Principal, ApiError> {
    let authorization = authorization.ok_or_else(|| {
        ApiError::unauthorized(
            AUTHORIZATION_FIELD,
            "(missing)",
            "missing bearer token in the Authorization header",
        )
    })?;
    let token = authorization
        .trim()
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            ApiError::unauthorized(
                AUTHORIZATION_FIELD,
                "(not a bearer token)",
                "the Authorization header must be `Bearer TOKEN`",
            )
        })?;
    let token = token.trim();
    if token.starts_with(NODE_CREDENTIAL_PREFIX) {
        return verify_node_credential(store, AUTHORIZATION_FIELD, token);
    }
    let unknown = || {
        ApiError::unauthorized(
            AUTHORIZATION_FIELD,
            credential_public_part(token),
            "unknown or wrong operator token",
        )
    };
    let (token_id, secret) = split_operator_token(token).ok_or_else(unknown)?;
    let stored: OperatorTokenSecret =
        read_config(store, &operator_token_key(token_id))?.ok_or_else(unknown)?;
    if !same_digest(&stored.secret_sha256, &sha256_hex(secret)) {
        return Err(unknown());
    }
    if stored.revoked {
        return Err(ApiError::unauthorized(
            AUTHORIZATION_FIELD,
            credential_public_part(token),
            "this operator token was revoked",
        ));
    }
    if let Some(expires_at_unix) = stored.expires_at_unix
        && now_unix_secs > expires_at_unix
    {
        return Err(ApiError::unauthorized(
            AUTHORIZATION_FIELD,
            credential_public_part(token),
            format!("this operator token expired at unix time {expires_at_unix}"),
        ));
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
    fn time_ordered_ids_sort_by_creation_and_stay_unique() {
        let first = time_ordered_id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Wait for the clock's next millisecond (a condition, not a fixed sleep).
        while time_ordered_id()[..12] == first[..12] {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock never moved"
            );
            std::thread::yield_now();
        }
        let later = time_ordered_id();
        assert!(later > first, "{later} made after {first} sorts after it");
        assert_eq!(first.len(), 28);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        // Made in the same millisecond, they still differ (the random part).
        let same_ms: std::collections::BTreeSet<String> =
            (0..1000).map(|_| time_ordered_id()).collect();
        assert_eq!(same_ms.len(), 1000);
    }

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
    fn errors_show_a_credentials_id_and_never_its_secret() {
        assert_eq!(credential_public_part("opa.tok1.s3cret"), "opa.tok1");
        assert_eq!(
            credential_public_part("opn.edge-1.site.s3cret"),
            "opn.edge-1.site"
        );
        for malformed in ["opa.tok1", "opa..s3cret", "s3cret", "opn.n1.", ""] {
            assert_eq!(
                credential_public_part(malformed),
                "(malformed)",
                "{malformed}"
            );
        }
        let store = crate::store::memory::MemoryStore::new();
        let error = authenticate(&store, Some("Bearer opa.tok1.s3cret")).unwrap_err();
        let body = error.body();
        assert_eq!(
            (body.field.as_deref(), body.value.as_deref()),
            (Some("authorization"), Some("opa.tok1"))
        );
        assert!(!body.message.contains("s3cret"));
        let body = authenticate(&store, None).unwrap_err().body();
        assert_eq!(body.value.as_deref(), Some("(missing)"));
        let body = authenticate(&store, Some("Basic s3cret"))
            .unwrap_err()
            .body();
        assert_eq!(body.value.as_deref(), Some("(not a bearer token)"));
    }

    #[test]
    fn scopes_round_trip_their_text() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
