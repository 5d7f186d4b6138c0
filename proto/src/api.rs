//! HTTP API shapes shared by every client: the error body, paths and query names.

use serde::{Deserialize, Serialize};

use crate::validate::{Validate, ValidationError, check_text};

/// Every 4xx/5xx answer carries this JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Machine-readable code, e.g. `invalid_field`, `unauthorized`, `not_found`.
    pub error: String,
    /// What went wrong and what to do, for people.
    pub message: String,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

impl Validate for ApiErrorBody {
    fn validate(&self) -> Result<(), ValidationError> {
        check_text("error", &self.error)?;
        check_text("message", &self.message)
    }
}

pub const PATH_REGISTER: &str = "/v1/nodes/register";
pub const PATH_BOOTSTRAP_PROFILE: &str = "/v1/bootstrap/profile";
pub const PATH_BOOTSTRAP_STATUS: &str = "/v1/bootstrap/status";
pub const PATH_BOOTSTRAP_EVENTS: &str = "/v1/bootstrap/events";

pub fn node_heartbeat_path(node_id: &str) -> String {
    format!("/v1/nodes/{node_id}/heartbeat")
}

pub fn node_plan_path(node_id: &str) -> String {
    format!("/v1/nodes/{node_id}/plan")
}

pub fn node_changes_path(node_id: &str) -> String {
    format!("/v1/nodes/{node_id}/changes")
}
