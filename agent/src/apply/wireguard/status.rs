//! The overlay part of `outpost-agent status`: read-only view of the live device joined with the
//! cached desired overlay (for node ids), and its text rendering.

use serde::{Deserialize, Serialize};

use super::WireguardError;
use super::backend::WireguardBackend;
use super::spec::{DesiredOverlay, InterfaceName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlayDeviceState {
    Running,
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayStatus {
    pub interface_name: String,
    pub backend: String,
    pub state: OverlayDeviceState,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    /// The interface's own overlay addresses.
    pub addresses: Vec<String>,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// From the cached plan; `None` for a peer the plan does not know.
    pub node_id: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub last_handshake_unix_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive_secs: u16,
}

/// Reads the overlay without changing anything (never starts a daemon).
pub fn overlay_status<B: WireguardBackend + ?Sized>(
    backend: &mut B,
    interface: &InterfaceName,
    desired: Option<&DesiredOverlay>,
) -> Result<OverlayStatus, WireguardError> {
    let mut status = OverlayStatus {
        interface_name: interface.to_string(),
        backend: backend.description(),
        state: OverlayDeviceState::Absent,
        public_key: None,
        listen_port: None,
        addresses: Vec::new(),
        peers: Vec::new(),
    };
    let Some(device) = backend.read_device(interface)? else {
        return Ok(status);
    };
    status.state = OverlayDeviceState::Running;
    status.public_key = device
        .private_key
        .as_ref()
        .map(|key| key.public_key().to_base64());
    status.listen_port = Some(device.listen_port);
    status.addresses = backend
        .read_link(interface)?
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    status.peers = device
        .peers
        .iter()
        .map(|peer| PeerStatus {
            node_id: desired.and_then(|overlay| {
                overlay
                    .peers
                    .iter()
                    .find(|wanted| wanted.public_key == peer.public_key)
                    .map(|wanted| wanted.node_id.clone())
            }),
            public_key: peer.public_key.to_base64(),
            endpoint: peer.endpoint.map(|endpoint| endpoint.to_string()),
            allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
            last_handshake_unix_secs: peer.last_handshake_unix_secs,
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            persistent_keepalive_secs: peer.persistent_keepalive_secs,
        })
        .collect();
    status.peers.sort_by(|left, right| {
        left.node_id
            .cmp(&right.node_id)
            .then(left.public_key.cmp(&right.public_key))
    });
    Ok(status)
}

/// Human-readable lines for `outpost-agent status`.
pub fn render_overlay_status(status: &OverlayStatus, now_unix_secs: u64) -> String {
    let mut text = format!(
        "overlay {} ({}): {}\n",
        status.interface_name,
        status.backend,
        match status.state {
            OverlayDeviceState::Running => "running",
            OverlayDeviceState::Absent => "absent",
        }
    );
    if status.state == OverlayDeviceState::Absent {
        return text;
    }
    text.push_str(&format!(
        "  address {}  port {}  public key {}\n",
        if status.addresses.is_empty() {
            "(none)".to_string()
        } else {
            status.addresses.join(", ")
        },
        status
            .listen_port
            .map_or("-".to_string(), |port| port.to_string()),
        status.public_key.as_deref().unwrap_or("(none)"),
    ));
    for peer in &status.peers {
        let handshake = match peer.last_handshake_unix_secs {
            None => "never".to_string(),
            Some(at) => format!("{}s ago", now_unix_secs.saturating_sub(at)),
        };
        text.push_str(&format!(
            "  peer {}  {}  endpoint {}  handshake {}  rx {} B  tx {} B  allowed {}\n",
            peer.node_id.as_deref().unwrap_or("(unknown)"),
            peer.public_key,
            peer.endpoint.as_deref().unwrap_or("(none)"),
            handshake,
            peer.rx_bytes,
            peer.tx_bytes,
            peer.allowed_ips.join(","),
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::apply::OverlayApplier;
    use super::super::diff::UpdateStyle;
    use super::super::key::PrivateKey;
    use super::super::memory::MemoryBackend;
    use super::super::spec::{OverlayPeerSpec, OverlaySpec};
    use super::*;

    #[test]
    fn status_joins_node_ids_and_renders() {
        let own = PrivateKey::from_bytes([1; 32]);
        let peer = PrivateKey::from_bytes([2; 32]);
        let desired = DesiredOverlay::from_spec(&OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/24".into(),
            listen_port: 51820,
            peers: vec![OverlayPeerSpec {
                node_id: "node-b".into(),
                public_key: peer.public_key().to_base64(),
                endpoints: vec!["10.231.0.2:51820".into()],
                allowed_ips: vec!["10.232.0.2/32".into()],
                persistent_keepalive_secs: 25,
            }],
        })
        .unwrap();
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        let absent = overlay_status(
            applier.backend_mut(),
            &desired.interface_name,
            Some(&desired),
        )
        .unwrap();
        assert_eq!(absent.state, OverlayDeviceState::Absent);
        assert!(render_overlay_status(&absent, 0).ends_with("absent\n"));

        applier.apply(&desired, &own, 100).unwrap();
        applier
            .backend_mut()
            .devices
            .get_mut(&desired.interface_name)
            .unwrap()
            .device
            .peers[0]
            .last_handshake_unix_secs = Some(90);
        let status = overlay_status(
            applier.backend_mut(),
            &desired.interface_name,
            Some(&desired),
        )
        .unwrap();
        assert_eq!(status.state, OverlayDeviceState::Running);
        assert_eq!(status.public_key, Some(own.public_key().to_base64()));
        assert_eq!(status.addresses, ["10.232.0.1/24"]);
        assert_eq!(status.peers[0].node_id.as_deref(), Some("node-b"));
        let text = render_overlay_status(&status, 100);
        assert!(text.contains("peer node-b"), "{text}");
        assert!(text.contains("handshake 10s ago"), "{text}");
        assert!(text.contains("endpoint 10.231.0.2:51820"), "{text}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "running");
    }
}
