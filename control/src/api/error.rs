//! The one error type of the API and the one place that maps it to HTTP status codes.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_proto::api::ApiErrorBody;
use outpost_proto::feed::GoneBody;
use outpost_proto::validate::{ValidationError, shorten};

use crate::scheduler::NeverFits;
use crate::store::StoreError;

fn unschedulable_message(never: &NeverFits) -> String {
    format!(
        "{} {} {}; no node of this org could ever hold it",
        never.field, never.value, never.reason
    )
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A missing, unknown or wrong credential. `value` is the credential's public part
    /// (`opa.TOKEN_ID`, `opn.NODE_ID`), never its secret.
    #[error("{message}")]
    Unauthorized {
        field: &'static str,
        value: String,
        message: String,
    },
    /// A valid credential that may not do this: `field` names what was refused (`authorization`
    /// for a missing scope, `service` or `node_id` for another org's or node's resource).
    #[error("{message}")]
    Forbidden {
        field: &'static str,
        value: String,
        message: String,
    },
    #[error("node {node_id} was revoked; it needs a new enrollment token from an operator")]
    NodeRevoked { node_id: String },
    #[error("{what} {value:?} not found")]
    NotFound { what: &'static str, value: String },
    #[error(
        "method {method} is not allowed on {path}; the Allow header lists the methods it takes"
    )]
    MethodNotAllowed { method: String, path: String },
    #[error("invalid {field}: {reason} (got {value:?})")]
    InvalidField {
        field: String,
        reason: String,
        value: String,
    },
    #[error("request body is not valid: {reason}")]
    InvalidBody {
        reason: String,
        field: Option<String>,
    },
    #[error("request body is over the limit of {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("enrollment token {token_id:?} is unknown to this control")]
    EnrollmentTokenUnknown { token_id: String },
    #[error("enrollment token {token_id:?} expired at unix time {expires_at_unix}")]
    EnrollmentTokenExpired {
        token_id: String,
        expires_at_unix: u64,
    },
    #[error("enrollment token {token_id:?} was already used by node {node_id}")]
    EnrollmentTokenUsed { token_id: String, node_id: String },
    #[error("{}", .0.message)]
    Gone(GoneBody),
    #[error("{}", unschedulable_message(.0))]
    Unschedulable(NeverFits),
    #[error(
        "projections reached event {checkpoint} but the command wrote event {event_id}; the write is stored, retry the read later"
    )]
    ProjectionLagging { event_id: u64, checkpoint: u64 },
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    #[error(
        "another control replica wrote first (expected log head {expected}, found {found}); retry"
    )]
    Conflict { expected: u64, found: u64 },
    #[error("internal error: {message}")]
    Internal { message: String },
    /// A node asked to drain that is draining already (F2).
    #[error("node {node_id} is already draining; uncordon it first to drain it again")]
    NodeAlreadyDraining { node_id: String },
    /// Well-formed input that refers to something that does not exist or cannot be used
    /// (an unknown artifact in a spec, a rollback to a missing release).
    #[error("invalid {field}: {reason} (got {value:?})")]
    Unprocessable {
        field: String,
        reason: String,
        value: String,
    },
    /// A removal refused while something still references the resource.
    #[error("{message}")]
    InUse {
        field: &'static str,
        value: String,
        message: String,
    },
    #[error(
        "artifact of {size_bytes} bytes (or more) is over --artifact-max-bytes {max_bytes}; nothing was stored"
    )]
    ArtifactTooLarge { size_bytes: u64, max_bytes: u64 },
    #[error("range {range:?} is outside the {size_bytes} bytes of the artifact")]
    RangeNotSatisfiable { range: String, size_bytes: u64 },
    #[error("{what} is not available: {message}")]
    Unavailable { what: &'static str, message: String },
}

impl From<&ApiError> for StatusCode {
    fn from(error: &ApiError) -> StatusCode {
        match error {
            ApiError::Unauthorized { .. }
            | ApiError::EnrollmentTokenUnknown { .. }
            | ApiError::EnrollmentTokenExpired { .. }
            | ApiError::EnrollmentTokenUsed { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::NodeRevoked { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidField { .. } | ApiError::InvalidBody { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unschedulable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ProjectionLagging { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict { .. } | ApiError::NodeAlreadyDraining { .. } => {
                StatusCode::CONFLICT
            }
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InUse { .. } => StatusCode::CONFLICT,
            ApiError::ArtifactTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl ApiError {
    /// The machine-readable code in the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NodeRevoked { .. } => "node_revoked",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::InvalidBody { .. } => "invalid_body",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::EnrollmentTokenUnknown { .. } => "enrollment_token_unknown",
            ApiError::EnrollmentTokenExpired { .. } => "enrollment_token_expired",
            ApiError::EnrollmentTokenUsed { .. } => "enrollment_token_used",
            ApiError::Gone(_) => "gone",
            ApiError::Unschedulable(_) => "unschedulable",
            ApiError::ProjectionLagging { .. } => "projection_lagging",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Internal { .. } => "internal",
            ApiError::NodeAlreadyDraining { .. } => "node_already_draining",
            ApiError::Unprocessable { .. } => "unprocessable",
            ApiError::InUse { .. } => "in_use",
            ApiError::ArtifactTooLarge { .. } => "artifact_too_large",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::Unavailable { .. } => "unavailable",
        }
    }

    /// The field and value the body names, if any.
    fn field_and_value(&self) -> (Option<String>, Option<String>) {
        match self {
            ApiError::InvalidField { field, value, .. }
            | ApiError::Unprocessable { field, value, .. } => {
                (Some(field.clone()), Some(value.clone()))
            }
            ApiError::InUse { field, value, .. } => {
                (Some((*field).to_string()), Some(value.clone()))
            }
            ApiError::ArtifactTooLarge { size_bytes, .. } => {
                (Some("size_bytes".into()), Some(size_bytes.to_string()))
            }
            ApiError::RangeNotSatisfiable { range, .. } => {
                (Some("range".into()), Some(range.clone()))
            }
            ApiError::InvalidBody { field, .. } => (field.clone(), None),
            ApiError::NotFound { what, value } => (Some((*what).to_string()), Some(value.clone())),
            ApiError::MethodNotAllowed { method, .. } => {
                (Some("method".into()), Some(method.clone()))
            }
            ApiError::Unauthorized { field, value, .. }
            | ApiError::Forbidden { field, value, .. } => {
                (Some((*field).to_string()), Some(value.clone()))
            }
            ApiError::NodeRevoked { node_id } | ApiError::NodeAlreadyDraining { node_id } => {
                (Some("node_id".into()), Some(node_id.clone()))
            }
            ApiError::EnrollmentTokenUnknown { token_id }
            | ApiError::EnrollmentTokenExpired { token_id, .. }
            | ApiError::EnrollmentTokenUsed { token_id, .. } => {
                (Some("enrollment_token".into()), Some(token_id.clone()))
            }
            ApiError::Unschedulable(never) => {
                (Some(never.field.into()), Some(never.value.to_string()))
            }
            ApiError::ProjectionLagging { event_id, .. } => {
                (Some("event_id".into()), Some(event_id.to_string()))
            }
            ApiError::BodyTooLarge { limit_bytes } => (
                Some("body".into()),
                Some(format!("over {limit_bytes} bytes")),
            ),
            _ => (None, None),
        }
    }

    pub fn body(&self) -> ApiErrorBody {
        let (field, value) = self.field_and_value();
        ApiErrorBody {
            error: self.code().to_string(),
            message: self.to_string(),
            field,
            value: value.map(|v| shorten(&v)),
        }
    }

    pub fn invalid(
        field: impl Into<String>,
        reason: impl Into<String>,
        value: impl std::fmt::Display,
    ) -> Self {
        ApiError::InvalidField {
            field: field.into(),
            reason: reason.into(),
            value: shorten(&value.to_string()),
        }
    }

    pub fn unauthorized(
        field: &'static str,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError::Unauthorized {
            field,
            value: value.into(),
            message: message.into(),
        }
    }

    pub fn forbidden(
        field: &'static str,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError::Forbidden {
            field,
            value: value.into(),
            message: message.into(),
        }
    }

    pub fn unprocessable(
        field: impl Into<String>,
        reason: impl Into<String>,
        value: impl std::fmt::Display,
    ) -> Self {
        ApiError::Unprocessable {
            field: field.into(),
            reason: reason.into(),
            value: shorten(&value.to_string()),
        }
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        ApiError::Internal {
            message: message.to_string(),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        ApiError::InvalidField {
            field: error.field,
            reason: error.reason,
            value: error.value,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { expected, found } => ApiError::Conflict { expected, found },
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from(&self);
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        let mut response = match &self {
            ApiError::Gone(body) => (status, Json(body.clone())).into_response(),
            _ => (status, Json(self.body())).into_response(),
        };
        let retry_after = match &self {
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::Conflict { .. } => Some(1),
            ApiError::ProjectionLagging { .. } => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_names_a_code_and_status() {
        let cases = [
            (ApiError::unauthorized("authorization", "opa.t", "x"), 401),
            (ApiError::forbidden("service", "web", "x"), 403),
            (
                ApiError::EnrollmentTokenUsed {
                    token_id: "t".into(),
                    node_id: "n".into(),
                },
                401,
            ),
            (
                ApiError::NodeRevoked {
                    node_id: "n".into(),
                },
                403,
            ),
            (
                ApiError::NotFound {
                    what: "node",
                    value: "n".into(),
                },
                404,
            ),
            (ApiError::BodyTooLarge { limit_bytes: 1 }, 413),
            (
                ApiError::unprocessable("artifact.sha256", "unknown", "ab"),
                422,
            ),
            (
                ApiError::InUse {
                    field: "sha256",
                    value: "ab".into(),
                    message: "m".into(),
                },
                409,
            ),
            (
                ApiError::RangeNotSatisfiable {
                    range: "bytes=9-".into(),
                    size_bytes: 3,
                },
                416,
            ),
            (
                ApiError::Unschedulable(NeverFits {
                    field: "memory_bytes",
                    value: 5,
                    reason: "exceeds the largest node memory capacity 4".into(),
                }),
                422,
            ),
            (
                ApiError::ProjectionLagging {
                    event_id: 9,
                    checkpoint: 8,
                },
                503,
            ),
            (
                ApiError::TooManyRequests {
                    message: "m".into(),
                    retry_after_secs: 1,
                },
                429,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(StatusCode::from(&error).as_u16(), status, "{error}");
            assert!(!error.code().is_empty());
        }
        let body = ApiError::Unschedulable(NeverFits {
            field: "memory_bytes",
            value: 5,
            reason: "exceeds the largest node memory capacity 4".into(),
        })
        .body();
        assert_eq!(
            (body.field.as_deref(), body.value.as_deref()),
            (Some("memory_bytes"), Some("5"))
        );
    }
}
