//! Bootstrap API bodies (B1): agents report reconcile steps; control shows what each node applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::name::{Name, check_name};
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// `POST /v1/bootstrap/events`: one reconcile step of one node (C9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapEvent {
    pub node_id: Name,
    pub component: String,
    pub action: String,
    pub status: BootstrapStepStatus,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub generation: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapStepStatus {
    Start,
    Ok,
    Error,
}

/// `GET /v1/bootstrap/status?node_id=`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BootstrapStatus {
    /// Component → last generation applied successfully.
    pub applied: BTreeMap<String, String>,
    pub errors: Vec<String>,
}

/// Most bootstrap events accepted in one request.
pub const BOOTSTRAP_EVENTS_MAX: usize = 64;

impl Validate for BootstrapEvent {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("node_id", &self.node_id)?;
        check_name("component", &self.component)?;
        check_name("action", &self.action)?;
        if let Some(message) = &self.message {
            check_text("message", message)?;
        }
        if let Some(generation) = &self.generation {
            check_text("generation", generation)?;
        }
        Ok(())
    }
}

/// The body of `POST /v1/bootstrap/events` is one event or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BootstrapEvents {
    One(BootstrapEvent),
    Many(Vec<BootstrapEvent>),
}

impl BootstrapEvents {
    pub fn into_vec(self) -> Vec<BootstrapEvent> {
        match self {
            BootstrapEvents::One(event) => vec![event],
            BootstrapEvents::Many(events) => events,
        }
    }
}

impl Validate for BootstrapEvents {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            BootstrapEvents::One(event) => event.validate(),
            BootstrapEvents::Many(events) => {
                check_count("events", events.len(), BOOTSTRAP_EVENTS_MAX)?;
                for (index, event) in events.iter().enumerate() {
                    event
                        .validate()
                        .map_err(|e| e.within(&format!("[{index}]")))?;
                }
                Ok(())
            }
        }
    }
}
