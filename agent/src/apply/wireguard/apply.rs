//! `OverlayApplier`: makes a node's WireGuard interface match its desired overlay — ensure the
//! device (creating, adopting or restarting its daemon), read it, diff, send only the changes,
//! then set the interface's address, routes and up flag.

use std::collections::BTreeMap;

use super::WireguardError;
use super::backend::{DeviceReadiness, WireguardBackend};
use super::device::LinkChanges;
use super::diff::{
    EndpointAttempt, desired_device, desired_link, device_requests, diff_device, diff_link,
};
use super::key::{PrivateKey, PublicKey};
use super::spec::{DesiredOverlay, InterfaceName};

/// What one apply found and changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub readiness: DeviceReadiness,
    pub private_key_set: KeyApplied,
    pub listen_port_set: Option<u16>,
    pub peers_added: Vec<PublicKey>,
    pub peers_updated: Vec<PublicKey>,
    pub peers_removed: Vec<PublicKey>,
    /// Requests sent to the device.
    pub requests_sent: usize,
    pub link: LinkChanges,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyApplied {
    Unchanged,
    Set,
}

impl ApplyReport {
    /// Whether the apply changed anything on the device or the interface.
    pub fn changed_anything(&self) -> bool {
        self.requests_sent > 0 || !self.link.is_empty()
    }
}

/// Applies desired overlays through one backend, remembering which endpoint candidate it is
/// trying for each peer between calls.
#[derive(Debug)]
pub struct OverlayApplier<B: WireguardBackend> {
    backend: B,
    endpoint_attempts: BTreeMap<PublicKey, EndpointAttempt>,
}

impl<B: WireguardBackend> OverlayApplier<B> {
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            endpoint_attempts: BTreeMap::new(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Makes the device match `desired` exactly (unknown peers are removed). Safe to call
    /// again at any time; when nothing differs it only reads. Call it on boot with the cached
    /// plan, on every plan change, and periodically (every 10–30 s): each call is also the
    /// watchdog that restarts a hung userspace daemon and re-applies everything to it.
    pub fn apply(
        &mut self,
        desired: &DesiredOverlay,
        private_key: &PrivateKey,
        now_unix_secs: u64,
    ) -> Result<ApplyReport, WireguardError> {
        let own_public_key = private_key.public_key();
        if desired
            .peers
            .iter()
            .any(|peer| peer.public_key == own_public_key)
        {
            return Err(WireguardError::OwnKeyAsPeer {
                public_key: own_public_key.to_base64(),
            });
        }
        let interface = &desired.interface_name;
        let readiness = self.backend.ensure_device(interface)?;
        let live =
            self.backend
                .read_device(interface)?
                .ok_or_else(|| WireguardError::DeviceAbsent {
                    interface: interface.to_string(),
                })?;
        let wanted = desired_device(
            desired,
            private_key,
            &live,
            &self.endpoint_attempts,
            now_unix_secs,
        );
        let changes = diff_device(&live, &wanted);
        let requests = device_requests(&changes, self.backend.update_style());
        for request in &requests {
            self.backend.update_device(interface, request)?;
        }
        self.remember_endpoints(&wanted.peers, now_unix_secs);

        let live_link = self.backend.read_link(interface)?;
        let link_changes = diff_link(&live_link, &desired_link(desired));
        if !link_changes.is_empty() {
            self.backend.update_link(interface, &link_changes)?;
        }
        Ok(ApplyReport {
            readiness,
            private_key_set: if changes.private_key.is_some() {
                KeyApplied::Set
            } else {
                KeyApplied::Unchanged
            },
            listen_port_set: changes.listen_port,
            peers_added: changes
                .peers_to_add
                .iter()
                .map(|peer| peer.public_key)
                .collect(),
            peers_updated: changes
                .peers_to_update
                .iter()
                .map(|peer| peer.public_key)
                .collect(),
            peers_removed: changes.peers_to_remove,
            requests_sent: requests.len(),
            link: link_changes,
        })
    }

    fn remember_endpoints(&mut self, peers: &[super::device::PeerConfig], now_unix_secs: u64) {
        let mut kept = BTreeMap::new();
        for peer in peers {
            let Some(endpoint) = peer.endpoint else {
                continue;
            };
            let attempt = match self.endpoint_attempts.get(&peer.public_key) {
                Some(previous) if previous.endpoint == endpoint => *previous,
                _ => EndpointAttempt {
                    endpoint,
                    since_unix_secs: now_unix_secs,
                },
            };
            kept.insert(peer.public_key, attempt);
        }
        self.endpoint_attempts = kept;
    }

    /// Takes the overlay down: the device (and its daemon) is removed.
    pub fn remove(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        self.endpoint_attempts.clear();
        self.backend.remove_device(interface)
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::{LinkUp, PresharedKeyState};
    use super::super::diff::UpdateStyle;
    use super::super::memory::MemoryBackend;
    use super::super::spec::{OverlayPeerSpec, OverlaySpec};
    use super::*;

    fn peer_spec(node: &str, key: &PrivateKey, last_octet: u8) -> OverlayPeerSpec {
        OverlayPeerSpec {
            node_id: node.into(),
            public_key: key.public_key().to_base64(),
            endpoints: vec![format!("10.231.0.{last_octet}:51820")],
            allowed_ips: vec![
                format!("10.232.0.{last_octet}/32"),
                format!("10.240.{last_octet}.0/24"),
            ],
            persistent_keepalive_secs: 25,
        }
    }

    fn overlay(peers: Vec<OverlayPeerSpec>) -> DesiredOverlay {
        DesiredOverlay::from_spec(&OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/24".into(),
            listen_port: 51820,
            peers,
        })
        .unwrap()
    }

    #[test]
    fn first_apply_builds_everything_and_the_second_changes_nothing() {
        let own = PrivateKey::from_bytes([1; 32]);
        let (b, c) = (
            PrivateKey::from_bytes([2; 32]),
            PrivateKey::from_bytes([3; 32]),
        );
        let desired = overlay(vec![peer_spec("b", &b, 2), peer_spec("c", &c, 3)]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        let first = applier.apply(&desired, &own, 1000).unwrap();
        assert_eq!(first.readiness, DeviceReadiness::Created);
        assert_eq!(first.private_key_set, KeyApplied::Set);
        assert_eq!(first.peers_added.len(), 2);
        assert_eq!(first.requests_sent, 1);
        assert_eq!(first.link.bring_up, Some(LinkUp::Up));
        assert_eq!(first.link.routes_to_add.len(), 2);
        let second = applier.apply(&desired, &own, 1001).unwrap();
        assert_eq!(second.readiness, DeviceReadiness::Running);
        assert!(!second.changed_anything(), "{second:?}");
        let memory = &applier.backend().devices[&desired.interface_name];
        assert!(memory.is_up());
        assert_eq!(memory.link.addresses[0].to_string(), "10.232.0.1/24");
    }

    #[test]
    fn foreign_peers_and_tampering_are_undone() {
        let own = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let desired = overlay(vec![peer_spec("b", &b, 2)]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        applier.apply(&desired, &own, 1000).unwrap();
        let intruder = PublicKey::from_bytes([9; 32]);
        {
            let memory = applier
                .backend_mut()
                .devices
                .get_mut(&desired.interface_name)
                .unwrap();
            memory
                .device
                .peers
                .push(super::super::device::LivePeer::new(intruder));
            memory.device.peers[0].has_preshared_key = PresharedKeyState::Set;
            memory.device.listen_port = 4;
            memory.link.routes.push("10.77.0.0/16".parse().unwrap());
        }
        let report = applier.apply(&desired, &own, 1001).unwrap();
        assert_eq!(report.peers_removed, vec![intruder]);
        assert_eq!(report.peers_updated.len(), 1);
        assert_eq!(report.listen_port_set, Some(51820));
        assert_eq!(report.link.routes_to_remove[0].to_string(), "10.77.0.0/16");
        assert!(
            !applier
                .apply(&desired, &own, 1002)
                .unwrap()
                .changed_anything()
        );
    }

    #[test]
    fn boringtun_style_never_updates_in_place() {
        let own = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(
            UpdateStyle::OnePeerPerRequestRemoveThenAdd,
        ));
        applier
            .apply(&overlay(vec![peer_spec("b", &b, 2)]), &own, 1000)
            .unwrap();
        let mut changed = peer_spec("b", &b, 2);
        changed.persistent_keepalive_secs = 0;
        let report = applier.apply(&overlay(vec![changed]), &own, 1001).unwrap();
        assert_eq!(report.requests_sent, 2);
        let requests = &applier.backend().requests;
        assert!(matches!(
            requests[requests.len() - 2].peers.as_slice(),
            [super::super::device::PeerChange::Remove(_)]
        ));
    }

    #[test]
    fn a_failed_request_is_reported_and_the_next_apply_converges() {
        let own = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let desired = overlay(vec![peer_spec("b", &b, 2)]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        applier.backend_mut().fail_next_update = Some("socket closed".into());
        let error = applier.apply(&desired, &own, 1000).unwrap_err();
        assert!(error.to_string().contains("socket closed"), "{error}");
        let report = applier.apply(&desired, &own, 1001).unwrap();
        assert_eq!(report.peers_added.len(), 1);
    }

    #[test]
    fn own_key_as_a_peer_is_refused_before_touching_the_device() {
        let own = PrivateKey::from_bytes([1; 32]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        let error = applier
            .apply(&overlay(vec![peer_spec("me", &own, 2)]), &own, 1)
            .unwrap_err();
        assert!(
            matches!(error, WireguardError::OwnKeyAsPeer { .. }),
            "{error}"
        );
        assert!(applier.backend().devices.is_empty());
    }

    #[test]
    fn endpoint_candidates_rotate_while_no_handshake_happens() {
        let own = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let mut spec = peer_spec("b", &b, 2);
        spec.endpoints = vec!["10.231.0.2:51820".into(), "192.168.9.2:51820".into()];
        let desired = overlay(vec![spec]);
        let mut applier = OverlayApplier::new(MemoryBackend::new(UpdateStyle::InPlace));
        let endpoint_now = |applier: &OverlayApplier<MemoryBackend>| {
            applier.backend().devices[&desired.interface_name]
                .device
                .peers[0]
                .endpoint
                .unwrap()
                .to_string()
        };
        applier.apply(&desired, &own, 1000).unwrap();
        assert_eq!(endpoint_now(&applier), "10.231.0.2:51820");
        assert!(
            !applier
                .apply(&desired, &own, 1010)
                .unwrap()
                .changed_anything()
        );
        applier
            .apply(&desired, &own, 1000 + super::super::diff::ENDPOINT_TRY_SECS)
            .unwrap();
        assert_eq!(endpoint_now(&applier), "192.168.9.2:51820");
    }
}
