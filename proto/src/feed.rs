//! The per-node change feed: filtered events, each batch ending in a bookmark (P8).

use serde::{Deserialize, Serialize};

use crate::cursor::Cursor;
use crate::limits::FEED_BATCH_EVENTS_MAX;
use crate::name::{Name, check_name};
use crate::node::{Role, check_ttl};
use crate::overlay::{OverlayPeerSpec, OverlaySpec, check_cidr, check_interface_name};
use crate::plan::Allocation;
use crate::secret::NodeSecret;
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// One event that concerns a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEvent {
    /// Global id in the control's event log.
    pub event_id: u64,
    /// The aggregate this event belongs to, e.g. `allocation/web-1a2b`.
    pub aggregate: String,
    /// Per-aggregate sequence.
    pub seq: u64,
    pub change: NodeChange,
}

/// What changed for the node.
// An allocation is the common change and is decoded once per event; boxing it would add an
// allocation per event for nothing, and the wire form is the same either way.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeChange {
    AllocationUpserted(Allocation),
    AllocationRemoved {
        allocation_id: Name,
        seq: u64,
    },
    RoleChanged {
        role: Role,
    },
    SettingsChanged {
        ttl_secs: u32,
        control_url: String,
        gateway_url: String,
        epoch: u64,
    },
    /// A peer joined this node's overlay, or its key, endpoints or address changed (P9).
    PeerUpserted(OverlayPeerSpec),
    /// A peer left this node's overlay (revoked).
    PeerRemoved {
        node_id: Name,
    },
    /// This node's own interface, address or port changed; its peers stay.
    OverlayChanged {
        interface_name: String,
        address: String,
        listen_port: u16,
    },
    /// This node joined the overlay: its whole overlay, peers included (sent once, on joining).
    OverlayReplaced(OverlaySpec),
    /// A secret version an allocation on this node references, sealed for this node (P11).
    SecretUpserted(NodeSecret),
    /// No allocation on this node references the secret any more.
    SecretRemoved {
        name: Name,
        seq: u64,
    },
}

/// One answer of `GET /v1/nodes/{id}/changes`: the events after the request's cursor that concern
/// the node, and a bookmark meaning "everything that concerns you up to here has been sent".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub events: Vec<FeedEvent>,
    pub bookmark: Cursor,
}

/// Body of a `410 Gone` answer: the cursor cannot be served; fetch the snapshot and resume from
/// its `as_of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoneBody {
    pub error: String,
    pub message: String,
    /// Path of the snapshot to fetch, e.g. `/v1/nodes/n1/plan`.
    pub snapshot: String,
    pub log_epoch: u64,
    pub floor: u64,
}

impl Validate for ChangeBatch {
    fn validate(&self) -> Result<(), ValidationError> {
        check_count("events", self.events.len(), FEED_BATCH_EVENTS_MAX)?;
        let mut previous = 0;
        for (index, event) in self.events.iter().enumerate() {
            let field = format!("events[{index}]");
            if event.event_id <= previous {
                return Err(ValidationError::new(
                    format!("{field}.event_id"),
                    "event ids must increase within a batch",
                    event.event_id,
                ));
            }
            if event.event_id > self.bookmark.event_id {
                return Err(ValidationError::new(
                    format!("{field}.event_id"),
                    format!("is past the batch bookmark {}", self.bookmark.event_id),
                    event.event_id,
                ));
            }
            previous = event.event_id;
            check_text(&format!("{field}.aggregate"), &event.aggregate)?;
            event.change.validate().map_err(|e| e.within(&field))?;
        }
        Ok(())
    }
}

impl Validate for NodeChange {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            NodeChange::AllocationUpserted(allocation) => {
                allocation.validate().map_err(|e| e.within("allocation"))
            }
            NodeChange::AllocationRemoved { allocation_id, .. } => {
                check_name("allocation_id", allocation_id)
            }
            NodeChange::RoleChanged { .. } => Ok(()),
            NodeChange::SettingsChanged {
                ttl_secs,
                control_url,
                gateway_url,
                ..
            } => {
                check_ttl(*ttl_secs)?;
                check_text("control_url", control_url)?;
                check_text("gateway_url", gateway_url)
            }
            NodeChange::PeerUpserted(peer) => peer.validate().map_err(|e| e.within("peer")),
            NodeChange::PeerRemoved { node_id } => check_name("node_id", node_id),
            NodeChange::OverlayChanged {
                interface_name,
                address,
                listen_port,
            } => {
                check_interface_name("interface_name", interface_name)?;
                check_cidr("address", address)?;
                if *listen_port == 0 {
                    return Err(ValidationError::new(
                        "listen_port",
                        "must be 1 to 65535",
                        listen_port,
                    ));
                }
                Ok(())
            }
            NodeChange::OverlayReplaced(overlay) => {
                overlay.validate().map_err(|e| e.within("overlay"))
            }
            NodeChange::SecretUpserted(secret) => secret.validate().map_err(|e| e.within("secret")),
            NodeChange::SecretRemoved { name, .. } => check_name("name", name),
        }
    }
}

impl Validate for GoneBody {
    fn validate(&self) -> Result<(), ValidationError> {
        check_text("snapshot", &self.snapshot)?;
        check_text("message", &self.message)
    }
}
