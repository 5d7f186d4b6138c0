//! Enrolling with the site join secret (D2): no one-time token, a `JoinProof` over the node id
//! and the time instead, sent to the control that discovery found and pinned.

use outpost_proto::node::RegisterRequest;
use outpost_proto::site::JoinProof;

use crate::boot::Agent;
use crate::store::{Identity, StoreError};
use crate::sync::client::ControlClient;
use crate::sync::pinning::pem_to_der;
use crate::sync::registration::{RegisterError, Session, finish, node_facts};

/// Registers with the discovered control (URL and CA in the identity) using the join secret.
pub fn enroll(agent: &Agent, node_id: &str, identity: Identity) -> Result<Session, RegisterError> {
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
        s.control.state = "enrolling".into();
    });
    let mut client = ControlClient::new(&url, &ca_der);
    let proof = JoinProof::new(secret, node_id, crate::os::unix_now_secs());
    // Built from JSON so fields added to the request later keep their defaults here.
    let request: RegisterRequest = serde_json::from_value(serde_json::json!({
        "enrollment_token": proof.to_text(),
        "facts": node_facts(node_id, &agent.config.labels)?,
        "sealing_public_key": crate::apply::secret::public_key_of(&identity),
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
