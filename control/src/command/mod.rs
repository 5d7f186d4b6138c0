//! Writes as a closed set of commands (P6), and the parsers that turn request bodies, paths and
//! queries into them before any logic runs. Parsing is pure and tested on its own.
//!
//! Operator documents (service specs, profiles, token requests) are read strictly: an unknown
//! field is an error naming its path. Agent messages are read leniently (unknown fields are
//! ignored) so old controls survive new agents.

pub mod execute;

use std::time::Duration;

use outpost_proto::bootstrap::{BootstrapEvent, BootstrapEvents};
use outpost_proto::cursor::Cursor;
use outpost_proto::limits::{FEED_BATCH_EVENTS_MAX, FEED_WAIT_DEFAULT_SECS, FEED_WAIT_MAX_SECS};
use outpost_proto::name::check_name;
use outpost_proto::node::{HeartbeatRequest, RegisterRequest, Role};
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::service::ServiceSpec;
use outpost_proto::validate::{Validate, shorten};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api::auth::Scope;
use crate::api::error::ApiError;

/// Every write the control accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    IssueEnrollmentToken {
        ttl_secs: u64,
    },
    IssueOperatorToken {
        org: String,
        scopes: Vec<Scope>,
        /// `None`: the token never expires.
        ttl_secs: Option<u64>,
    },
    RegisterNode(Box<RegisterRequest>),
    Heartbeat {
        node_id: String,
        request: HeartbeatRequest,
    },
    DefineService(Box<ServiceSpec>),
    DeleteService {
        name: String,
    },
    RevokeNode {
        node_id: String,
    },
    SetNodeRole {
        node_id: String,
        role: Role,
    },
    SetProfile(Box<EnvironmentProfile>),
    ReportBootstrap(Vec<BootstrapEvent>),
    RotateEpoch,
    /// A node's new WireGuard public key (P9).
    SetWireguardKey {
        node_id: String,
        public_key: String,
    },
    /// A route (E2), `outpostctl routes apply`.
    DefineRoute(Box<outpost_proto::route::RouteSpec>),
    DeleteRoute {
        name: String,
    },
    /// An edge router enrolls with a token or registers again with its credential.
    RegisterEdge(Box<outpost_proto::route::EdgeRegisterRequest>),
    /// The operator sets and removes node labels (F2).
    LabelNode {
        node_id: String,
        set: std::collections::BTreeMap<String, String>,
        remove: Vec<String>,
    },
    /// Cordon, drain or uncordon (F2).
    SetNodeScheduling {
        node_id: String,
        scheduling: crate::scheduler::NodeScheduling,
    },
    /// An uploaded artifact, verified and published to the blob store (R1).
    RecordArtifact {
        sha256: String,
        size_bytes: u64,
        name: String,
    },
    RemoveArtifact {
        sha256: String,
    },
    /// Makes release `to` (or the one before the newest) the newest release (R2).
    RollbackService {
        name: String,
        to: Option<u64>,
    },
}

/// How strictly a JSON document is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Operator input: unknown fields are refused with their path.
    RefuseUnknownFields,
    /// Machine input from agents of any version: unknown fields are ignored.
    IgnoreUnknownFields,
}

/// The text format of a document body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    Json,
    Yaml,
}

impl DocumentFormat {
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(value) if value.contains("yaml") => DocumentFormat::Yaml,
            _ => DocumentFormat::Json,
        }
    }
}

pub const ENROLLMENT_TOKEN_TTL_MAX_SECS: u64 = 365 * 24 * 3600;
pub const ENROLLMENT_TOKEN_TTL_DEFAULT_SECS: u64 = 3600;
/// Longest lifetime of an operator token that expires (ten years).
pub const OPERATOR_TOKEN_TTL_MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// Finds the first field of `input` that `canonical` (the parsed value serialized back) lacks.
fn unknown_field(
    input: &serde_json::Value,
    canonical: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (input, canonical) {
        (Value::Object(given), Value::Object(known)) => given.iter().find_map(|(key, value)| {
            let field = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match known.get(key) {
                None => Some(field),
                Some(known_value) => unknown_field(value, known_value, &field),
            }
        }),
        (Value::Array(given), Value::Array(known)) => {
            given
                .iter()
                .zip(known)
                .enumerate()
                .find_map(|(index, (value, known_value))| {
                    unknown_field(value, known_value, &format!("{path}[{index}]"))
                })
        }
        _ => None,
    }
}

/// Parses, checks and validates a document.
pub fn parse_document<T>(
    bytes: &[u8],
    format: DocumentFormat,
    strictness: Strictness,
) -> Result<T, ApiError>
where
    T: DeserializeOwned + serde::Serialize + Validate,
{
    let value: serde_json::Value = match format {
        DocumentFormat::Json => {
            serde_json::from_slice(bytes).map_err(|error| ApiError::InvalidBody {
                reason: format!("not valid json: {error}"),
                field: None,
            })?
        }
        DocumentFormat::Yaml => {
            serde_norway::from_slice(bytes).map_err(|error| ApiError::InvalidBody {
                reason: format!("not valid yaml: {error}"),
                field: None,
            })?
        }
    };
    let parsed: T = serde_path_to_error::deserialize(&value).map_err(|error| {
        let path = error.path().to_string();
        let reason = error.into_inner().to_string();
        if path == "." {
            ApiError::InvalidBody {
                reason,
                field: None,
            }
        } else {
            ApiError::InvalidBody {
                reason: format!("{path}: {reason}"),
                field: Some(path),
            }
        }
    })?;
    if strictness == Strictness::RefuseUnknownFields {
        let canonical = serde_json::to_value(&parsed).map_err(ApiError::internal)?;
        if let Some(field) = unknown_field(&value, &canonical, "") {
            return Err(ApiError::invalid(
                field.clone(),
                "is not a known field",
                field,
            ));
        }
    }
    parsed.validate().map_err(|error| {
        // A rollout policy out of range is well-formed but cannot be carried out (R3): 422.
        if error.field.starts_with("rollout.") {
            ApiError::unprocessable(error.field, error.reason, error.value)
        } else {
            ApiError::from(error)
        }
    })?;
    Ok(parsed)
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentTokenRequest {
    #[serde(default = "default_enrollment_ttl")]
    ttl_secs: u64,
}

fn default_enrollment_ttl() -> u64 {
    ENROLLMENT_TOKEN_TTL_DEFAULT_SECS
}

impl Validate for EnrollmentTokenRequest {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        if self.ttl_secs == 0 || self.ttl_secs > ENROLLMENT_TOKEN_TTL_MAX_SECS {
            return Err(outpost_proto::ValidationError::new(
                "ttl_secs",
                format!("must be between 1 and {ENROLLMENT_TOKEN_TTL_MAX_SECS}"),
                self.ttl_secs,
            ));
        }
        Ok(())
    }
}

pub fn parse_issue_enrollment_token(body: &[u8]) -> Result<Command, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let request: EnrollmentTokenRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields)?;
    Ok(Command::IssueEnrollmentToken {
        ttl_secs: request.ttl_secs,
    })
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct OperatorTokenRequest {
    org: String,
    scopes: Vec<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

impl Validate for OperatorTokenRequest {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        check_name("org", &self.org)?;
        if let Some(ttl_secs) = self.ttl_secs
            && (ttl_secs == 0 || ttl_secs > OPERATOR_TOKEN_TTL_MAX_SECS)
        {
            return Err(outpost_proto::ValidationError::new(
                "ttl_secs",
                format!("must be between 1 and {OPERATOR_TOKEN_TTL_MAX_SECS}"),
                ttl_secs,
            ));
        }
        if self.scopes.is_empty() {
            return Err(outpost_proto::ValidationError::new(
                "scopes",
                "must name at least one scope",
                "[]",
            ));
        }
        for (index, scope) in self.scopes.iter().enumerate() {
            if Scope::parse(scope).is_none() {
                return Err(outpost_proto::ValidationError::new(
                    format!("scopes[{index}]"),
                    "is not a scope (admin, services:write, nodes:write, enroll:write, profile:write, events:read, read, secrets:read, secrets:write, audit:read)",
                    scope,
                ));
            }
        }
        Ok(())
    }
}

pub fn parse_issue_operator_token(body: &[u8]) -> Result<Command, ApiError> {
    let request: OperatorTokenRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields)?;
    let scopes = request
        .scopes
        .iter()
        .filter_map(|s| Scope::parse(s))
        .collect();
    Ok(Command::IssueOperatorToken {
        org: request.org,
        scopes,
        ttl_secs: request.ttl_secs,
    })
}

pub fn parse_register(body: &[u8]) -> Result<Command, ApiError> {
    let request: RegisterRequest =
        parse_document(body, DocumentFormat::Json, Strictness::IgnoreUnknownFields)?;
    Ok(Command::RegisterNode(Box::new(request)))
}

pub fn parse_heartbeat(node_id: &str, body: &[u8]) -> Result<Command, ApiError> {
    let node_id = parse_node_id(node_id)?;
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let request: HeartbeatRequest =
        parse_document(body, DocumentFormat::Json, Strictness::IgnoreUnknownFields)?;
    Ok(Command::Heartbeat { node_id, request })
}

pub fn parse_define_service(body: &[u8], format: DocumentFormat) -> Result<Command, ApiError> {
    let spec: ServiceSpec = parse_document(body, format, Strictness::RefuseUnknownFields)?;
    Ok(Command::DefineService(Box::new(spec)))
}

pub fn parse_delete_service(name: &str) -> Result<Command, ApiError> {
    check_name("name", name)?;
    Ok(Command::DeleteService {
        name: name.to_string(),
    })
}

pub fn parse_define_route(body: &[u8], format: DocumentFormat) -> Result<Command, ApiError> {
    let spec: outpost_proto::route::RouteSpec =
        parse_document(body, format, Strictness::RefuseUnknownFields)?;
    Ok(Command::DefineRoute(Box::new(spec)))
}

pub fn parse_delete_route(name: &str) -> Result<Command, ApiError> {
    check_name("name", name)?;
    Ok(Command::DeleteRoute {
        name: name.to_string(),
    })
}

pub fn parse_register_edge(body: &[u8]) -> Result<Command, ApiError> {
    let request: outpost_proto::route::EdgeRegisterRequest =
        parse_document(body, DocumentFormat::Json, Strictness::IgnoreUnknownFields)?;
    Ok(Command::RegisterEdge(Box::new(request)))
}

pub fn parse_node_id(node_id: &str) -> Result<String, ApiError> {
    check_name("node_id", node_id)?;
    Ok(node_id.to_string())
}

pub fn parse_revoke_node(node_id: &str) -> Result<Command, ApiError> {
    Ok(Command::RevokeNode {
        node_id: parse_node_id(node_id)?,
    })
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct NodeRoleRequest {
    role: Role,
}

impl Validate for NodeRoleRequest {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        Ok(())
    }
}

pub fn parse_set_node_role(node_id: &str, body: &[u8]) -> Result<Command, ApiError> {
    let node_id = parse_node_id(node_id)?;
    let request: NodeRoleRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields)?;
    Ok(Command::SetNodeRole {
        node_id,
        role: request.role,
    })
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct WireguardKeyRequest {
    public_key: String,
}

impl Validate for WireguardKeyRequest {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        outpost_proto::overlay::check_wireguard_key("public_key", &self.public_key)
    }
}

/// `POST /v1/nodes/{id}/wireguard-key` with `{"public_key": "BASE64"}`.
pub fn parse_set_wireguard_key(node_id: &str, body: &[u8]) -> Result<Command, ApiError> {
    let node_id = parse_node_id(node_id)?;
    let request: WireguardKeyRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields)?;
    Ok(Command::SetWireguardKey {
        node_id,
        public_key: request.public_key,
    })
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct NodeLabelsRequest {
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

impl Validate for NodeLabelsRequest {
    fn validate(&self) -> Result<(), outpost_proto::ValidationError> {
        use outpost_proto::limits::LABELS_MAX;
        outpost_proto::validate::check_count("set", self.set.len(), LABELS_MAX)?;
        outpost_proto::validate::check_count("remove", self.remove.len(), LABELS_MAX)?;
        for (key, value) in &self.set {
            outpost_proto::node::check_label("set", key, value)?;
        }
        for (index, key) in self.remove.iter().enumerate() {
            check_name(&format!("remove[{index}]"), key)?;
            if self.set.contains_key(key) {
                return Err(outpost_proto::ValidationError::new(
                    format!("remove[{index}]"),
                    "is also in set",
                    key,
                ));
            }
        }
        if self.set.is_empty() && self.remove.is_empty() {
            return Err(outpost_proto::ValidationError::new(
                "set",
                "a label to set or remove is required",
                "{}",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/nodes/{id}/labels` with `{"set": {"KEY": "VALUE"}, "remove": ["KEY"]}`.
pub fn parse_label_node(node_id: &str, body: &[u8]) -> Result<Command, ApiError> {
    let node_id = parse_node_id(node_id)?;
    let request: NodeLabelsRequest =
        parse_document(body, DocumentFormat::Json, Strictness::RefuseUnknownFields)?;
    Ok(Command::LabelNode {
        node_id,
        set: request.set,
        remove: request.remove,
    })
}

/// `POST /v1/nodes/{id}/cordon`, `/drain` and `/uncordon` (no body).
pub fn parse_set_node_scheduling(
    node_id: &str,
    scheduling: crate::scheduler::NodeScheduling,
) -> Result<Command, ApiError> {
    Ok(Command::SetNodeScheduling {
        node_id: parse_node_id(node_id)?,
        scheduling,
    })
}

pub fn parse_set_profile(body: &[u8], format: DocumentFormat) -> Result<Command, ApiError> {
    let profile: EnvironmentProfile =
        parse_document(body, format, Strictness::RefuseUnknownFields)?;
    Ok(Command::SetProfile(Box::new(profile)))
}

pub fn parse_report_bootstrap(body: &[u8]) -> Result<Command, ApiError> {
    let events: BootstrapEvents =
        parse_document(body, DocumentFormat::Json, Strictness::IgnoreUnknownFields)?;
    Ok(Command::ReportBootstrap(events.into_vec()))
}

/// `cursor=EPOCH.ID`; absent means "from the start of this epoch" only where the caller allows.
pub fn parse_cursor(text: &str) -> Result<Cursor, ApiError> {
    text.parse::<Cursor>().map_err(|error| {
        ApiError::invalid(
            "cursor",
            "expected EPOCH.ID (16 hex digits, a dot, a decimal id)",
            error.value,
        )
    })
}

/// `wait=SECS`: default 300, at most 600.
pub fn parse_wait(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(Duration::from_secs(FEED_WAIT_DEFAULT_SECS));
    };
    let seconds: u64 = text.trim().parse().map_err(|_| {
        ApiError::invalid("wait", "must be a whole number of seconds", shorten(text))
    })?;
    if seconds > FEED_WAIT_MAX_SECS {
        return Err(ApiError::invalid(
            "wait",
            format!("must be at most {FEED_WAIT_MAX_SECS} seconds"),
            seconds,
        ));
    }
    Ok(Duration::from_secs(seconds))
}

/// `limit=N` of the admin feed: default and maximum [`FEED_BATCH_EVENTS_MAX`].
pub fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text else {
        return Ok(FEED_BATCH_EVENTS_MAX);
    };
    let limit: usize = text
        .trim()
        .parse()
        .map_err(|_| ApiError::invalid("limit", "must be a whole number", shorten(text)))?;
    if limit == 0 || limit > FEED_BATCH_EVENTS_MAX {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {FEED_BATCH_EVENTS_MAX}"),
            limit,
        ));
    }
    Ok(limit)
}

/// Adds up to wait/16 of random extra, so long-polls of many nodes do not end together.
pub fn with_jitter(wait: Duration) -> Duration {
    let extra_ms = (wait.as_millis() / 16) as u64;
    if extra_ms == 0 {
        return wait;
    }
    wait + Duration::from_millis(rand::random::<u64>() % (extra_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: ApiError) -> String {
        match error {
            ApiError::InvalidField { field, .. } => field,
            ApiError::InvalidBody { field, reason } => field.unwrap_or(reason),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn service_specs_parse_with_defaults() {
        let command = parse_define_service(
            br#"{"name":"web","command":"/bin/true","replicas":2}"#,
            DocumentFormat::Json,
        )
        .unwrap();
        let Command::DefineService(spec) = command else {
            panic!("expected a service")
        };
        assert_eq!(
            (spec.name.as_str(), spec.replicas),
            ("web", outpost_proto::service::Replicas::Count(2))
        );
    }

    #[test]
    fn unknown_fields_in_operator_documents_are_named_with_their_path() {
        let error = parse_define_service(
            br#"{"name":"web","command":"x","replicaz":2}"#,
            DocumentFormat::Json,
        )
        .unwrap_err();
        assert_eq!(field_of(error), "replicaz");
        let error = parse_define_service(
            br#"{"name":"web","command":"x","readiness":{"probe":{"tcp":{"port":80,"host":"h"}}}}"#,
            DocumentFormat::Json,
        )
        .unwrap_err();
        assert_eq!(field_of(error), "readiness.probe.tcp.host");
        let error = parse_set_profile(
            br#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","spec":{"storage":{"buckets":[{"name":"media","versionning":true}]}}}"#,
            DocumentFormat::Json,
        )
        .unwrap_err();
        assert_eq!(field_of(error), "spec.storage.buckets[0].versionning");
    }

    #[test]
    fn type_errors_name_the_path() {
        let error = parse_define_service(
            br#"{"name":"web","command":"x","replicas":"two"}"#,
            DocumentFormat::Json,
        )
        .unwrap_err();
        assert_eq!(field_of(error), "replicas");
    }

    #[test]
    fn validation_errors_name_field_and_value() {
        let error =
            parse_define_service(br#"{"name":"Web App","command":"x"}"#, DocumentFormat::Json)
                .unwrap_err();
        let ApiError::InvalidField { field, value, .. } = error else {
            panic!("expected invalid field")
        };
        assert_eq!((field.as_str(), value.as_str()), ("name", "Web App"));
    }

    #[test]
    fn yaml_profiles_parse() {
        let yaml = b"apiVersion: outpost/v1\nkind: EnvironmentProfile\nmetadata:\n  name: site\n";
        assert!(matches!(
            parse_set_profile(yaml, DocumentFormat::Yaml),
            Ok(Command::SetProfile(_))
        ));
    }

    #[test]
    fn agent_messages_ignore_unknown_fields() {
        let body = br#"{"allocations":[],"from_the_future":true}"#;
        assert!(matches!(
            parse_heartbeat("n1", body),
            Ok(Command::Heartbeat { .. })
        ));
        assert!(parse_heartbeat("N 1", b"{}").is_err());
    }

    #[test]
    fn garbage_bodies_are_clear_errors() {
        assert!(matches!(
            parse_register(b"\xff\xfe"),
            Err(ApiError::InvalidBody { .. })
        ));
        assert!(matches!(
            parse_define_service(b"[]", DocumentFormat::Json),
            Err(ApiError::InvalidBody { .. })
        ));
    }

    #[test]
    fn role_requests() {
        assert_eq!(
            parse_set_node_role("n1", br#"{"role":"proxy"}"#).unwrap(),
            Command::SetNodeRole {
                node_id: "n1".into(),
                role: Role::Proxy
            }
        );
        assert!(matches!(
            parse_set_node_role("n1", br#"{"role":"king"}"#),
            Err(ApiError::InvalidBody { .. })
        ));
    }

    #[test]
    fn token_requests() {
        assert_eq!(
            parse_issue_enrollment_token(b"").unwrap(),
            Command::IssueEnrollmentToken { ttl_secs: 3600 }
        );
        assert!(parse_issue_enrollment_token(br#"{"ttl_secs":0}"#).is_err());
        assert_eq!(
            field_of(parse_issue_enrollment_token(br#"{"ttl":5}"#).unwrap_err()),
            "ttl"
        );
        let error =
            parse_issue_operator_token(br#"{"org":"acme","scopes":["read","root"]}"#).unwrap_err();
        assert_eq!(field_of(error), "scopes[1]");
    }

    proptest::proptest! {
        /// Every parser turns arbitrary bytes into a command or a clear error, never a panic.
        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_register(&bytes);
            let _ = parse_heartbeat("n1", &bytes);
            let _ = parse_define_service(&bytes, DocumentFormat::Json);
            let _ = parse_define_service(&bytes, DocumentFormat::Yaml);
            let _ = parse_set_profile(&bytes, DocumentFormat::Json);
            let _ = parse_set_profile(&bytes, DocumentFormat::Yaml);
            let _ = parse_report_bootstrap(&bytes);
            let _ = parse_issue_enrollment_token(&bytes);
            let _ = parse_issue_operator_token(&bytes);
        }

        /// Near-miss JSON documents (valid JSON, wrong shapes) are refused without a panic.
        #[test]
        fn parsers_never_panic_on_json_shaped_input(
            keys in proptest::collection::vec("[a-z_]{1,12}", 0..6),
            values in proptest::collection::vec(proptest::prelude::any::<i64>(), 0..6),
        ) {
            let object: serde_json::Map<String, serde_json::Value> =
                keys.into_iter().zip(values).map(|(k, v)| (k, serde_json::json!(v))).collect();
            let bytes = serde_json::to_vec(&object).unwrap();
            let _ = parse_define_service(&bytes, DocumentFormat::Json);
            let _ = parse_set_profile(&bytes, DocumentFormat::Json);
            let _ = parse_register(&bytes);
        }

        #[test]
        fn query_parsers_never_panic(text in ".{0,64}") {
            let _ = parse_cursor(&text);
            let _ = parse_wait(Some(&text));
            let _ = parse_limit(Some(&text));
            let _ = parse_node_id(&text);
        }
    }

    #[test]
    fn queries() {
        assert_eq!(parse_wait(None).unwrap(), Duration::from_secs(300));
        assert_eq!(parse_wait(Some("0")).unwrap(), Duration::ZERO);
        assert!(parse_wait(Some("601")).is_err());
        assert!(parse_wait(Some("-1")).is_err());
        let ApiError::InvalidField { field, value, .. } = parse_cursor("nope").unwrap_err() else {
            panic!()
        };
        assert_eq!((field.as_str(), value.as_str()), ("cursor", "nope"));
        assert_eq!(
            parse_cursor("0000000000000001.5").unwrap(),
            Cursor::new(1, 5)
        );
        assert!(parse_limit(Some("0")).is_err());
        let jittered = with_jitter(Duration::from_secs(160));
        assert!(jittered >= Duration::from_secs(160) && jittered <= Duration::from_secs(170));
    }
}
