//! Enrollment (D2, D3, D6, P9): the node's one way into control. A new node enrolls with a
//! one-time token (pinning the CA the token names) or, in a site, with the site join secret (a
//! `JoinProof` over the node id and the time, sent to the control discovery found and pinned);
//! a known node registers again with its credential. A revoked node needs a fresh token, and
//! status says so. [`Enrollment`] is the handle the threads that talk to control share: it holds
//! the session and runs at most one registration at a time (`link::session`).

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::name::check_name;
use outpost_proto::node::{Capacity, NodeFacts, RegisterRequest, RegisterResponse};
use outpost_proto::site::JoinProof;

use crate::config::AgentConfig;
use crate::discovery::control_url;
use crate::link::client::{CallError, ControlClient, Recovery};
use crate::link::pinning::{PinError, der_to_pem, fetch_pinned_ca, pem_to_der};
use crate::node::cluster::ClusterFile;
use crate::node::{NodeState, PlanState};
use crate::overlay::OverlayParts;
use crate::status::{ControlState, StatusBoard};
use crate::store::{Identity, Store, StoreError};

const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns a hostname into a node name: lowercase, other characters as '-', at most 63 bytes,
/// starting with a letter or digit.
pub fn sanitize_hostname(hostname: &str) -> String {
    let mapped: String = hostname
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut name: String = trimmed
        .chars()
        .take(outpost_proto::limits::NAME_MAX_BYTES)
        .collect();
    if name.is_empty() {
        name = "node".into();
    }
    name
}

/// This node's id: configured, else registered before, else from the hostname.
pub fn choose_node_id(
    configured: Option<&str>,
    registered: Option<&str>,
    hostname: Option<&str>,
) -> String {
    configured
        .or(registered.filter(|id| check_name("node_id", id).is_ok()))
        .map(str::to_string)
        .unwrap_or_else(|| sanitize_hostname(hostname.unwrap_or("node")))
}

fn memory_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

pub fn node_facts(
    node_id: &str,
    labels: &std::collections::BTreeMap<outpost_proto::Name, String>,
) -> Result<NodeFacts, RegisterError> {
    let node_id = outpost_proto::name::name("node_id", node_id)
        .map_err(|_| RegisterError::NodeId(node_id.to_string()))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Ok(NodeFacts {
        node_id,
        hostname: crate::os::hostname().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        capacity: Capacity {
            memory_bytes: memory_total_bytes(),
            cpu_millis: cpus.saturating_mul(1000),
        },
        labels: labels.clone(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "node is not enrolled and no enrollment token is configured (--enroll TOKEN or OUTPOST_ENROLL_TOKEN)"
    )]
    NotEnrolled,
    #[error("node was revoked by control; it needs a fresh enrollment token (--enroll TOKEN)")]
    Revoked,
    #[error("no control url: configure --control URL or use an enrollment token that names one")]
    NoControlUrl,
    #[error("invalid enrollment token: {0}")]
    Token(String),
    #[error("invalid node id {0:?}")]
    NodeId(String),
    #[error("stored CA certificate is unreadable; enroll again")]
    StoredCa,
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("registration refused: {0}")]
    Call(#[from] CallError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Discovery has not found a control to enroll with yet, or similar (D2).
    #[error("{0}")]
    Site(String),
    /// The failure of a registration another thread ran, for the threads that waited on it
    /// (see [`RegisterError::shared`]).
    #[error("{0}")]
    Reported(String),
}

/// A registered connection to control.
#[derive(Clone)]
pub struct Session {
    pub client: ControlClient,
    pub node_id: String,
}

/// The agent's session slot: one registration at a time, none of it under a lock.
pub type AgentSessionSlot = crate::link::session::SessionSlot<Session, RegisterError>;

/// What enrolling and registering need, shared by every thread that talks to control.
#[derive(Clone)]
pub struct Enrollment {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub node: Arc<NodeState>,
    pub plan: Arc<PlanState>,
    /// The overlay part of a registration (public key, endpoints).
    pub overlay: OverlayParts,
    slot: Arc<AgentSessionSlot>,
}

impl Enrollment {
    pub fn new(
        config: Arc<AgentConfig>,
        store: Arc<Store>,
        board: StatusBoard,
        node: Arc<NodeState>,
        plan: Arc<PlanState>,
        overlay: OverlayParts,
    ) -> Self {
        Self {
            config,
            store,
            board,
            node,
            plan,
            overlay,
            slot: Arc::new(AgentSessionSlot::default()),
        }
    }

    /// The current session, registering first if there is none. While another thread
    /// registers, this waits for that registration and shares its outcome; no lock is held
    /// across the network.
    pub fn session(&self) -> Result<Session, RegisterError> {
        self.slot
            .get_or_register(|| register(self), RegisterError::shared)
    }

    /// The current session without waiting for a registration in flight.
    pub fn current_session(&self) -> Option<Session> {
        self.slot.current()
    }

    /// Drops the session so the next call registers again (after 401/403/404, or when
    /// discovery points the node at another control).
    pub fn invalidate(&self) {
        self.slot.invalidate();
    }

    /// How often the session was dropped so far.
    pub fn invalidations(&self) -> u64 {
        self.slot.invalidations()
    }
}

impl RegisterError {
    /// A copy for the threads that waited on the registration that failed: the variants callers
    /// act on (revoked, not enrolled, control's answer) keep their kind; the others keep their
    /// text.
    pub fn shared(&self) -> Self {
        match self {
            RegisterError::NotEnrolled => RegisterError::NotEnrolled,
            RegisterError::Revoked => RegisterError::Revoked,
            RegisterError::NoControlUrl => RegisterError::NoControlUrl,
            RegisterError::Token(text) => RegisterError::Token(text.clone()),
            RegisterError::NodeId(text) => RegisterError::NodeId(text.clone()),
            RegisterError::StoredCa => RegisterError::StoredCa,
            RegisterError::Call(error) => RegisterError::Call(error.clone()),
            RegisterError::Site(text) => RegisterError::Site(text.clone()),
            RegisterError::Reported(text) => RegisterError::Reported(text.clone()),
            RegisterError::Pin(_) | RegisterError::Store(_) => {
                RegisterError::Reported(self.to_string())
            }
        }
    }
}

fn register(agent: &Enrollment) -> Result<Session, RegisterError> {
    let identity = agent.node.identity();
    let node_id = agent.node.node_id();
    if let (Some(credential), Some(ca_pem), Some(url), false) = (
        &identity.node_credential,
        &identity.ca_pem,
        &identity.control_url,
        identity.revoked,
    ) {
        let ca_der = pem_to_der(ca_pem).ok_or(RegisterError::StoredCa)?;
        let url = control_url(agent.config.control_url.as_deref(), Some(url), None)
            .map_or(url.clone(), |(u, _)| u);
        let mut client = ControlClient::new(&url, &ca_der);
        let mut request = RegisterRequest {
            enrollment_token: None,
            node_credential: Some(credential.clone()),
            facts: node_facts(&node_id, &agent.config.labels)?,
            wireguard_public_key: None,
            endpoints: Vec::new(),
            wireguard_listen_port: None,
            sealing_public_key: None,
            agent: Some(registration_build()),
        };
        crate::overlay::fill_registration(&agent.overlay, &mut request);
        request.sealing_public_key = crate::apply::secret::public_key_of(&identity);
        match client.register(&request) {
            Ok(response) => {
                client.set_credential(Some(response.node_credential.clone()));
                return finish(agent, client, &response, identity);
            }
            Err(error) if error.recovery() == Recovery::Reenroll => {
                let revoked = Identity {
                    revoked: true,
                    ..identity.clone()
                };
                agent.store.save_identity(&revoked)?;
                *agent.node.identity_lock() = revoked;
                agent.board.update(|s| {
                    s.control.state = ControlState::Revoked;
                    s.note(crate::status::REVOKED_NOTE.into());
                });
                if agent.config.enroll_token.is_none() {
                    return Err(RegisterError::Revoked);
                }
            }
            // Control no longer knows the credential: enroll afresh if a token is at hand.
            Err(CallError::Status { status: 401, .. })
                if agent.config.enroll_token.is_some()
                    || agent.config.site.join_secret.is_some() => {}
            Err(error) => return Err(error.into()),
        }
    }
    enroll_with_token(agent, &node_id, identity)
}

fn enroll_with_token(
    agent: &Enrollment,
    node_id: &str,
    identity: Identity,
) -> Result<Session, RegisterError> {
    if agent.config.enroll_token.is_none() && agent.config.site.join_secret.is_some() {
        return enroll_with_join_secret(agent, node_id, identity);
    }
    let token = agent
        .config
        .enroll_token
        .as_deref()
        .ok_or(if identity.revoked {
            RegisterError::Revoked
        } else {
            RegisterError::NotEnrolled
        })?;
    let claims = EnrollmentClaims::parse(token).map_err(|e| RegisterError::Token(e.to_string()))?;
    let (url, _source) = control_url(
        agent.config.control_url.as_deref(),
        None,
        Some(&claims.control_url),
    )
    .ok_or(RegisterError::NoControlUrl)?;
    // A revoked node stays shown as revoked until a fresh token admits it again (the agent's
    // identity is marked revoked before this enrollment is tried).
    let revoked = identity.revoked || agent.node.identity_lock().revoked;
    agent.board.update(|s| {
        s.control.url = Some(url.clone());
        if !revoked {
            s.control.state = ControlState::Enrolling;
        }
    });
    let ca_der = fetch_pinned_ca(&url, &claims.ca_fingerprint, PIN_TIMEOUT)?;
    let mut client = ControlClient::new(&url, &ca_der);
    let mut request = RegisterRequest {
        enrollment_token: Some(token.to_string()),
        node_credential: None,
        facts: node_facts(node_id, &agent.config.labels)?,
        wireguard_public_key: None,
        endpoints: Vec::new(),
        wireguard_listen_port: None,
        sealing_public_key: None,
        agent: Some(registration_build()),
    };
    crate::overlay::fill_registration(&agent.overlay, &mut request);
    request.sealing_public_key = crate::apply::secret::public_key_of(&identity);
    let response = client.register(&request)?;
    client.set_credential(Some(response.node_credential.clone()));
    let wireguard_private_key_hex = identity.wireguard_private_key_hex.clone();
    let sealing_private_key_hex = identity.sealing_private_key_hex.clone();
    let node_key_hex =
        match identity.node_key_hex {
            Some(key) => key,
            None => crate::os::hex(&crate::os::random_bytes::<32>().map_err(|e| {
                StoreError::Damaged {
                    what: "node key".into(),
                    reason: format!("cannot read /dev/urandom: {e}"),
                }
            })?),
        };
    let enrolled = Identity {
        node_id: Some(response.node_id.to_string()),
        node_credential: None,
        node_key_hex: Some(node_key_hex),
        ca_pem: Some(der_to_pem(&ca_der)),
        control_url: Some(url),
        revoked: false,
        wireguard_private_key_hex,
        sealing_private_key_hex,
        release_public_key: None,
    };
    finish(agent, client, &response, enrolled)
}

/// Registers with the discovered control (URL and CA in the identity) using the join secret.
fn enroll_with_join_secret(
    agent: &Enrollment,
    node_id: &str,
    identity: Identity,
) -> Result<Session, RegisterError> {
    let secret = agent
        .config
        .site
        .join_secret
        .as_deref()
        .ok_or(RegisterError::NotEnrolled)?;
    let (Some(url), Some(ca_pem)) = (identity.control_url.clone(), identity.ca_pem.clone()) else {
        return Err(RegisterError::Site(
            "no trusted control found yet (looking over mDNS); will enroll with the site join secret once one answers".into(),
        ));
    };
    let ca_der = pem_to_der(&ca_pem).ok_or(RegisterError::StoredCa)?;
    agent.board.update(|s| {
        s.control.url = Some(url.clone());
        s.control.state = ControlState::Enrolling;
    });
    let mut client = ControlClient::new(&url, &ca_der);
    let proof = JoinProof::new(secret, node_id, crate::os::unix_now_secs());
    // Built from JSON so fields added to the request later keep their defaults here.
    let request: RegisterRequest = serde_json::from_value(serde_json::json!({
        "enrollment_token": proof.to_text(),
        "facts": node_facts(node_id, &agent.config.labels)?,
        "sealing_public_key": crate::apply::secret::public_key_of(&identity),
        "agent": registration_build(),
    }))
    .map_err(|e| RegisterError::Site(format!("cannot build the join request: {e}")))?;
    let response = client.register(&request)?;
    client.set_credential(Some(response.node_credential.clone()));
    let node_key_hex =
        match identity.node_key_hex.clone() {
            Some(key) => key,
            None => crate::os::hex(&crate::os::random_bytes::<32>().map_err(|e| {
                StoreError::Damaged {
                    what: "node key".into(),
                    reason: format!("cannot read /dev/urandom: {e}"),
                }
            })?),
        };
    let enrolled = Identity {
        node_key_hex: Some(node_key_hex),
        revoked: false,
        ..identity
    };
    finish(agent, client, &response, enrolled)
}

/// The agent build a registration names (the heartbeat adds how the last upgrade went).
fn registration_build() -> outpost_proto::release::AgentBuild {
    outpost_proto::release::AgentBuild {
        version: crate::upgrade::version(),
        ..Default::default()
    }
}

fn finish(
    agent: &Enrollment,
    client: ControlClient,
    response: &RegisterResponse,
    identity: Identity,
) -> Result<Session, RegisterError> {
    let identity = Identity {
        // The release key is pinned once (U2): a later control cannot replace it.
        release_public_key: identity
            .release_public_key
            .clone()
            .or_else(|| response.release_public_key.clone()),
        node_id: Some(response.node_id.to_string()),
        node_credential: Some(response.node_credential.clone()),
        control_url: Some(client.base_url().to_string()),
        revoked: false,
        ..identity
    };
    agent.store.save_identity(&identity)?;
    *agent.node.identity_lock() = identity;
    agent.node.set_node_id(response.node_id.as_str());
    agent
        .plan
        .update_cluster(ClusterFile::from_registration(response));
    agent.board.update(|s| {
        s.control.url = Some(client.base_url().to_string());
        s.control.state = ControlState::Connected;
        s.control.last_error = None;
        s.control.last_contact_unix = Some(crate::os::unix_now_secs());
        s.notes.retain(|note| note != crate::status::REVOKED_NOTE);
    });
    Ok(Session {
        client,
        node_id: response.node_id.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_names() {
        assert_eq!(sanitize_hostname("Edge_Box 01.local"), "edge_box-01.local");
        assert_eq!(sanitize_hostname("--x"), "x");
        assert_eq!(sanitize_hostname("ÄÖ"), "node");
        assert_eq!(sanitize_hostname(&"a".repeat(100)).len(), 63);
        assert!(check_name("node_id", &sanitize_hostname("Weird!Host#Name")).is_ok());
    }

    #[test]
    fn node_id_precedence() {
        assert_eq!(
            choose_node_id(Some("cfg"), Some("reg"), Some("host")),
            "cfg"
        );
        assert_eq!(choose_node_id(None, Some("reg"), Some("host")), "reg");
        assert_eq!(choose_node_id(None, Some("Bad Id"), Some("Host")), "host");
    }

    #[test]
    fn facts_describe_this_machine() {
        let facts = node_facts("n1", &Default::default()).unwrap();
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(facts.capacity.memory_bytes > 0);
        assert!(facts.capacity.cpu_millis >= 1000);
        assert!(node_facts("Bad Id", &Default::default()).is_err());
    }
}
