//! Pure planning of an overlay apply: which endpoint to use for each peer, what differs between
//! the live device and the desired overlay, and how to cut the changes into requests a backend
//! can take safely. No I/O and no clock here; the caller passes `now_unix_secs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::cidr::IpCidr;
use super::device::{
    DeviceUpdate, LinkChanges, LinkState, LinkUp, LiveDevice, LivePeer, PeerChange, PeerConfig,
    PresharedKeyState,
};
use super::key::{PrivateKey, PublicKey};
use super::spec::{DesiredOverlay, DesiredPeer};

/// A handshake younger than this proves the live endpoint works; it is kept even when control
/// lists other candidates (the peer may have roamed).
pub const HANDSHAKE_FRESH_SECS: u64 = 180;
/// How long an endpoint candidate is tried without a handshake before the next one is set.
pub const ENDPOINT_TRY_SECS: u64 = 30;

/// The device part of the desired state, with endpoints already chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDevice {
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// Sorted by public key.
    pub peers: Vec<PeerConfig>,
}

/// What differs between a live device and a desired one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceChanges {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub peers_to_remove: Vec<PublicKey>,
    pub peers_to_add: Vec<PeerConfig>,
    /// Peers that exist but whose configuration differs; the full new configuration.
    pub peers_to_update: Vec<PeerConfig>,
}

impl DeviceChanges {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.peers_to_remove.is_empty()
            && self.peers_to_add.is_empty()
            && self.peers_to_update.is_empty()
    }
}

/// How a backend takes changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStyle {
    /// Everything in one request, peers updated in place (kernel, wireguard-go).
    InPlace,
    /// boringtun 0.7.1: updating an existing peer crashes it and per-peer fields leak into the
    /// next peer of a request, so every peer goes in its own request and an update is a removal
    /// followed by an addition.
    OnePeerPerRequestRemoveThenAdd,
}

/// The endpoint last set for a peer and when, kept by the caller between applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointAttempt {
    pub endpoint: SocketAddr,
    pub since_unix_secs: u64,
}

/// Picks the endpoint to configure for one peer, or `None` to leave the live one alone.
///
/// 1. No candidates: leave it.
/// 2. A fresh handshake on the live endpoint: keep it (it works, maybe roamed).
/// 3. The candidate being tried has had less than [`ENDPOINT_TRY_SECS`]: keep trying it.
/// 4. It has had its time: move to the next candidate, wrapping around.
/// 5. Nothing being tried but the live endpoint is a candidate (agent restarted): keep it.
/// 6. Otherwise the first candidate.
pub fn choose_endpoint(
    candidates: &[SocketAddr],
    live: Option<&LivePeer>,
    attempt: Option<&EndpointAttempt>,
    now_unix_secs: u64,
) -> Option<SocketAddr> {
    let first = *candidates.first()?;
    let live_endpoint = live.and_then(|peer| peer.endpoint);
    let handshake_fresh = live
        .and_then(|peer| peer.last_handshake_unix_secs)
        .is_some_and(|at| now_unix_secs.saturating_sub(at) < HANDSHAKE_FRESH_SECS);
    if let (Some(endpoint), true) = (live_endpoint, handshake_fresh) {
        return Some(endpoint);
    }
    if let Some(attempt) = attempt
        && let Some(position) = candidates.iter().position(|c| *c == attempt.endpoint)
        && live_endpoint == Some(attempt.endpoint)
    {
        if now_unix_secs.saturating_sub(attempt.since_unix_secs) < ENDPOINT_TRY_SECS {
            return Some(attempt.endpoint);
        }
        return Some(candidates[(position + 1) % candidates.len()]);
    }
    match live_endpoint {
        Some(endpoint) if candidates.contains(&endpoint) => Some(endpoint),
        _ => Some(first),
    }
}

/// Builds the desired device: the desired peers with their endpoints chosen against `live`.
pub fn desired_device(
    desired: &DesiredOverlay,
    private_key: &PrivateKey,
    live: &LiveDevice,
    attempts: &BTreeMap<PublicKey, EndpointAttempt>,
    now_unix_secs: u64,
) -> DesiredDevice {
    let live_by_key: BTreeMap<PublicKey, &LivePeer> = live
        .peers
        .iter()
        .map(|peer| (peer.public_key, peer))
        .collect();
    let peers = desired
        .peers
        .iter()
        .map(|peer: &DesiredPeer| PeerConfig {
            public_key: peer.public_key,
            endpoint: choose_endpoint(
                &peer.endpoints,
                live_by_key.get(&peer.public_key).copied(),
                attempts.get(&peer.public_key),
                now_unix_secs,
            ),
            allowed_ips: peer.allowed_ips.clone(),
            persistent_keepalive_secs: peer.persistent_keepalive_secs,
        })
        .collect();
    DesiredDevice {
        private_key: private_key.clone(),
        listen_port: desired.listen_port,
        peers,
    }
}

/// Compares a live device with a desired one. Peers not desired are removed; the preshared key
/// Outpost never sets is cleared; allowed IPs are compared as sets of networks.
pub fn diff_device(live: &LiveDevice, desired: &DesiredDevice) -> DeviceChanges {
    let mut changes = DeviceChanges::default();
    let key_matches = match &live.private_key {
        Some(live_key) => *live_key == desired.private_key,
        // boringtun reports only its public key.
        None => live.public_key == Some(desired.private_key.public_key()),
    };
    if !key_matches {
        changes.private_key = Some(desired.private_key.clone());
    }
    if live.listen_port != desired.listen_port {
        changes.listen_port = Some(desired.listen_port);
    }
    let desired_keys: BTreeSet<PublicKey> =
        desired.peers.iter().map(|peer| peer.public_key).collect();
    let mut live_by_key: BTreeMap<PublicKey, &LivePeer> = BTreeMap::new();
    for peer in &live.peers {
        live_by_key.insert(peer.public_key, peer);
    }
    changes.peers_to_remove = live_by_key
        .keys()
        .filter(|key| !desired_keys.contains(key))
        .copied()
        .collect();
    for peer in &desired.peers {
        match live_by_key.get(&peer.public_key) {
            None => changes.peers_to_add.push(peer.clone()),
            Some(live_peer) if !peer_matches(live_peer, peer) => {
                changes.peers_to_update.push(peer.clone())
            }
            Some(_) => {}
        }
    }
    changes
}

fn peer_matches(live: &LivePeer, desired: &PeerConfig) -> bool {
    let live_networks: BTreeSet<IpCidr> = live.allowed_ips.iter().map(IpCidr::network).collect();
    let desired_networks: BTreeSet<IpCidr> = desired.allowed_ips.iter().copied().collect();
    live_networks == desired_networks
        && live.persistent_keepalive_secs == desired.persistent_keepalive_secs
        && live.has_preshared_key == PresharedKeyState::None
        && desired
            .endpoint
            .is_none_or(|endpoint| live.endpoint == Some(endpoint))
}

/// Cuts changes into requests. `InPlace`: one request. `OnePeerPerRequestRemoveThenAdd`: the
/// device settings, then one request per removal, then per updated peer a removal and an
/// addition, then one request per new peer.
pub fn device_requests(changes: &DeviceChanges, style: UpdateStyle) -> Vec<DeviceUpdate> {
    match style {
        UpdateStyle::InPlace => {
            let mut update = DeviceUpdate {
                private_key: changes.private_key.clone(),
                listen_port: changes.listen_port,
                peers: Vec::new(),
            };
            update.peers.extend(
                changes
                    .peers_to_remove
                    .iter()
                    .copied()
                    .map(PeerChange::Remove),
            );
            update.peers.extend(
                changes
                    .peers_to_update
                    .iter()
                    .chain(&changes.peers_to_add)
                    .cloned()
                    .map(PeerChange::Upsert),
            );
            if update.is_empty() {
                Vec::new()
            } else {
                vec![update]
            }
        }
        UpdateStyle::OnePeerPerRequestRemoveThenAdd => {
            let mut requests = Vec::new();
            if changes.private_key.is_some() || changes.listen_port.is_some() {
                requests.push(DeviceUpdate {
                    private_key: changes.private_key.clone(),
                    listen_port: changes.listen_port,
                    peers: Vec::new(),
                });
            }
            let single = |change| DeviceUpdate {
                peers: vec![change],
                ..DeviceUpdate::default()
            };
            for key in &changes.peers_to_remove {
                requests.push(single(PeerChange::Remove(*key)));
            }
            for peer in &changes.peers_to_update {
                requests.push(single(PeerChange::Remove(peer.public_key)));
                requests.push(single(PeerChange::Upsert(peer.clone())));
            }
            for peer in &changes.peers_to_add {
                requests.push(single(PeerChange::Upsert(peer.clone())));
            }
            requests
        }
    }
}

/// Routes the interface needs: every allowed IP that the interface address's own network does
/// not already cover (that one comes with the address).
pub fn desired_link(desired: &DesiredOverlay) -> LinkState {
    let own_network = desired.address.network();
    let routes: BTreeSet<IpCidr> = desired
        .peers
        .iter()
        .flat_map(|peer| peer.allowed_ips.iter())
        .filter(|network| !own_network.contains(network))
        .copied()
        .collect();
    LinkState {
        up: LinkUp::Up,
        addresses: vec![desired.address],
        routes: routes.into_iter().collect(),
    }
}

/// Compares the interface's live addresses and routes with the desired ones; the interface
/// belongs to Outpost, so unknown addresses and routes are removed.
pub fn diff_link(live: &LinkState, desired: &LinkState) -> LinkChanges {
    let live_addresses: BTreeSet<IpCidr> = live.addresses.iter().copied().collect();
    let desired_addresses: BTreeSet<IpCidr> = desired.addresses.iter().copied().collect();
    let live_routes: BTreeSet<IpCidr> = live.routes.iter().map(IpCidr::network).collect();
    let desired_routes: BTreeSet<IpCidr> = desired.routes.iter().map(IpCidr::network).collect();
    LinkChanges {
        bring_up: (live.up != desired.up).then_some(desired.up),
        addresses_to_add: desired_addresses
            .difference(&live_addresses)
            .copied()
            .collect(),
        addresses_to_remove: live_addresses
            .difference(&desired_addresses)
            .copied()
            .collect(),
        routes_to_add: desired_routes.difference(&live_routes).copied().collect(),
        routes_to_remove: live_routes.difference(&desired_routes).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::apply_update_to_model;
    use super::*;
    use proptest::prelude::*;

    fn public(seed: u8) -> PublicKey {
        PublicKey::from_bytes([seed; 32])
    }

    fn endpoint(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 231, 0, last], 51820))
    }

    fn net(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    fn config(seed: u8, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: public(seed),
            endpoint: Some(endpoint(seed)),
            allowed_ips: allowed.iter().map(|text| net(text)).collect(),
            persistent_keepalive_secs: 25,
        }
    }

    fn live_from(desired: &DesiredDevice) -> LiveDevice {
        let mut live = LiveDevice::default();
        let update = DeviceUpdate {
            private_key: Some(desired.private_key.clone()),
            listen_port: Some(desired.listen_port),
            peers: desired
                .peers
                .iter()
                .cloned()
                .map(PeerChange::Upsert)
                .collect(),
        };
        apply_update_to_model(&mut live, &update);
        live
    }

    fn device(peers: Vec<PeerConfig>) -> DesiredDevice {
        DesiredDevice {
            private_key: PrivateKey::from_bytes([7; 32]),
            listen_port: 51820,
            peers,
        }
    }

    #[test]
    fn an_applied_device_has_no_changes() {
        let desired = device(vec![
            config(1, &["10.232.0.2/32"]),
            config(2, &["10.232.0.3/32"]),
        ]);
        let live = live_from(&desired);
        assert!(diff_device(&live, &desired).is_empty());
    }

    #[test]
    fn unknown_peers_are_removed_and_changed_peers_updated() {
        let before = device(vec![
            config(1, &["10.232.0.2/32"]),
            config(9, &["10.232.0.9/32"]),
        ]);
        let live = live_from(&before);
        let mut changed = config(1, &["10.232.0.2/32", "10.99.0.0/24"]);
        changed.persistent_keepalive_secs = 0;
        let after = device(vec![changed.clone(), config(3, &["10.232.0.4/32"])]);
        let changes = diff_device(&live, &after);
        assert_eq!(changes.peers_to_remove, vec![public(9)]);
        assert_eq!(changes.peers_to_update, vec![changed]);
        assert_eq!(changes.peers_to_add, vec![config(3, &["10.232.0.4/32"])]);
        assert!(changes.private_key.is_none() && changes.listen_port.is_none());
    }

    #[test]
    fn a_new_key_or_port_or_a_preshared_key_is_a_change() {
        let desired = device(vec![config(1, &["10.232.0.2/32"])]);
        let mut live = live_from(&desired);
        live.listen_port = 1;
        live.private_key = None;
        live.public_key = None;
        live.peers[0].has_preshared_key = PresharedKeyState::Set;
        let changes = diff_device(&live, &desired);
        assert_eq!(changes.listen_port, Some(51820));
        assert!(changes.private_key.is_some());
        assert_eq!(changes.peers_to_update.len(), 1);
    }

    #[test]
    fn a_device_that_shows_only_its_public_key_matches_by_public_key() {
        let desired = device(vec![]);
        let mut live = live_from(&desired);
        live.private_key = None;
        assert!(diff_device(&live, &desired).is_empty());
        live.public_key = Some(public(1));
        assert!(diff_device(&live, &desired).private_key.is_some());
    }

    #[test]
    fn a_peer_without_endpoint_candidates_keeps_its_live_endpoint() {
        let desired = device(vec![config(1, &["10.232.0.2/32"])]);
        let live = live_from(&desired);
        let mut no_endpoint = desired.clone();
        no_endpoint.peers[0].endpoint = None;
        assert!(diff_device(&live, &no_endpoint).is_empty());
    }

    #[test]
    fn boringtun_style_splits_every_peer_and_removes_before_adding() {
        let changes = DeviceChanges {
            private_key: None,
            listen_port: Some(1000),
            peers_to_remove: vec![public(9)],
            peers_to_add: vec![config(3, &[])],
            peers_to_update: vec![config(1, &[])],
        };
        let requests = device_requests(&changes, UpdateStyle::OnePeerPerRequestRemoveThenAdd);
        let shapes: Vec<String> = requests
            .iter()
            .map(|request| {
                let mut shape = String::new();
                if request.listen_port.is_some() {
                    shape.push('P');
                }
                for change in &request.peers {
                    match change {
                        PeerChange::Remove(key) => {
                            shape.push_str(&format!("-{}", key.to_bytes()[0]))
                        }
                        PeerChange::Upsert(peer) => {
                            shape.push_str(&format!("+{}", peer.public_key.to_bytes()[0]))
                        }
                    }
                }
                shape
            })
            .collect();
        assert_eq!(shapes, ["P", "-9", "-1", "+1", "+3"]);
        let in_place = device_requests(&changes, UpdateStyle::InPlace);
        assert_eq!(in_place.len(), 1);
        assert_eq!(in_place[0].peers.len(), 3);
        assert!(device_requests(&DeviceChanges::default(), UpdateStyle::InPlace).is_empty());
    }

    #[test]
    fn endpoint_choice_follows_the_rules() {
        let candidates = [endpoint(2), endpoint(3)];
        let mut live = LivePeer::new(public(1));
        // No live peer: the first candidate.
        assert_eq!(
            choose_endpoint(&candidates, None, None, 1000),
            Some(endpoint(2))
        );
        // No candidates: leave the live endpoint alone.
        assert_eq!(choose_endpoint(&[], Some(&live), None, 1000), None);
        // Fresh handshake on a roamed endpoint: keep it.
        live.endpoint = Some(endpoint(77));
        live.last_handshake_unix_secs = Some(1000 - HANDSHAKE_FRESH_SECS + 1);
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), None, 1000),
            Some(endpoint(77))
        );
        // Stale handshake on an endpoint control no longer lists: back to the first candidate.
        live.last_handshake_unix_secs = Some(1);
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), None, 1000),
            Some(endpoint(2))
        );
        // Trying candidate 2 since 990: keep trying until ENDPOINT_TRY_SECS passed, then move on.
        live.endpoint = Some(endpoint(2));
        let attempt = EndpointAttempt {
            endpoint: endpoint(2),
            since_unix_secs: 990,
        };
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), Some(&attempt), 1000),
            Some(endpoint(2))
        );
        let later = 990 + ENDPOINT_TRY_SECS;
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), Some(&attempt), later),
            Some(endpoint(3))
        );
        // ...and wrap around after the last one.
        live.endpoint = Some(endpoint(3));
        let attempt = EndpointAttempt {
            endpoint: endpoint(3),
            since_unix_secs: 990,
        };
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), Some(&attempt), later),
            Some(endpoint(2))
        );
        // Agent restarted (no memory) and the live endpoint is a candidate: keep it.
        assert_eq!(
            choose_endpoint(&candidates, Some(&live), None, later),
            Some(endpoint(3))
        );
    }

    #[test]
    fn link_diff_adds_missing_and_removes_unknown() {
        let desired = LinkState {
            up: LinkUp::Up,
            addresses: vec![net("10.232.0.1/24")],
            routes: vec![net("10.99.0.0/24")],
        };
        let live = LinkState {
            up: LinkUp::Down,
            addresses: vec![net("10.232.0.5/24")],
            routes: vec![net("10.98.0.0/16")],
        };
        let changes = diff_link(&live, &desired);
        assert_eq!(changes.bring_up, Some(LinkUp::Up));
        assert_eq!(changes.addresses_to_add, vec![net("10.232.0.1/24")]);
        assert_eq!(changes.addresses_to_remove, vec![net("10.232.0.5/24")]);
        assert_eq!(changes.routes_to_add, vec![net("10.99.0.0/24")]);
        assert_eq!(changes.routes_to_remove, vec![net("10.98.0.0/16")]);
        assert!(diff_link(&desired, &desired).is_empty());
    }

    fn arbitrary_peer() -> impl Strategy<Value = PeerConfig> {
        (
            0u8..12,
            proptest::option::of(1u8..6),
            proptest::collection::btree_set((0u8..8, prop_oneof![Just(32u8), Just(24u8)]), 0..4),
            prop_oneof![Just(0u16), Just(25u16)],
        )
            .prop_map(|(seed, endpoint_seed, networks, keepalive)| PeerConfig {
                public_key: public(seed),
                endpoint: endpoint_seed.map(endpoint),
                allowed_ips: networks
                    .into_iter()
                    .map(|(octet, prefix)| {
                        IpCidr::new([10, 232, octet, 1].into(), prefix)
                            .unwrap()
                            .network()
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                persistent_keepalive_secs: keepalive,
            })
    }

    /// Peers with distinct keys and no allowed IP on two peers (what validation guarantees).
    fn arbitrary_device() -> impl Strategy<Value = DesiredDevice> {
        (
            proptest::collection::vec(arbitrary_peer(), 0..6),
            0u8..3,
            1u16..4,
        )
            .prop_map(|(peers, key_seed, port)| {
                let mut by_key: BTreeMap<PublicKey, PeerConfig> = BTreeMap::new();
                let mut taken = BTreeSet::new();
                for mut peer in peers {
                    peer.allowed_ips.retain(|network| taken.insert(*network));
                    by_key.entry(peer.public_key).or_insert(peer);
                }
                DesiredDevice {
                    private_key: PrivateKey::from_bytes([key_seed; 32]),
                    listen_port: port,
                    peers: by_key.into_values().collect(),
                }
            })
    }

    fn matches(live: &LiveDevice, desired: &DesiredDevice) -> bool {
        let mut live_peers: Vec<&LivePeer> = live.peers.iter().collect();
        live_peers.sort_by_key(|peer| peer.public_key);
        live.private_key.as_ref() == Some(&desired.private_key)
            && live.listen_port == desired.listen_port
            && live_peers.len() == desired.peers.len()
            && live_peers
                .iter()
                .zip(&desired.peers)
                .all(|(live_peer, peer)| {
                    live_peer.public_key == peer.public_key && peer_matches(live_peer, peer)
                })
    }

    proptest! {
        #[test]
        fn applying_the_diff_reaches_the_desired_device(
            before in arbitrary_device(),
            after in arbitrary_device(),
            boringtun in any::<bool>(),
        ) {
            let style = if boringtun {
                UpdateStyle::OnePeerPerRequestRemoveThenAdd
            } else {
                UpdateStyle::InPlace
            };
            let mut live = live_from(&before);
            let changes = diff_device(&live, &after);
            for request in device_requests(&changes, style) {
                if style == UpdateStyle::OnePeerPerRequestRemoveThenAdd {
                    prop_assert!(request.peers.len() <= 1);
                    if let [PeerChange::Upsert(peer)] = request.peers.as_slice() {
                        // Never an in-place update of an existing peer.
                        prop_assert!(live.peers.iter().all(|p| p.public_key != peer.public_key));
                    }
                }
                apply_update_to_model(&mut live, &request);
            }
            prop_assert!(matches(&live, &after), "live {:?}\nwanted {:?}", live, after);
            prop_assert!(diff_device(&live, &after).is_empty());
        }

        #[test]
        fn link_diff_applied_gives_the_desired_link(
            live_nets in proptest::collection::btree_set(0u8..10, 0..5),
            desired_nets in proptest::collection::btree_set(0u8..10, 0..5),
        ) {
            let to_nets = |set: &BTreeSet<u8>| -> Vec<IpCidr> {
                set.iter().map(|octet| net(&format!("10.{octet}.0.0/16"))).collect()
            };
            let mut live = LinkState { up: LinkUp::Down, addresses: to_nets(&live_nets), routes: to_nets(&live_nets) };
            let desired = LinkState { up: LinkUp::Up, addresses: to_nets(&desired_nets), routes: to_nets(&desired_nets) };
            let changes = diff_link(&live, &desired);
            live.up = changes.bring_up.unwrap_or(live.up);
            live.addresses.retain(|a| !changes.addresses_to_remove.contains(a));
            live.addresses.extend(&changes.addresses_to_add);
            live.routes.retain(|r| !changes.routes_to_remove.contains(r));
            live.routes.extend(&changes.routes_to_add);
            prop_assert!(diff_link(&live, &desired).is_empty());
        }
    }
}
