//! The WireGuard device model shared by every backend: what a live device holds
//! (`LiveDevice`), one change request (`DeviceUpdate`), and the interface's addresses and routes
//! (`LinkState`, `LinkChanges`).

use std::net::SocketAddr;

use super::cidr::IpCidr;
use super::key::{PrivateKey, PublicKey};

/// A device as read back from the kernel or a userspace daemon.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LiveDevice {
    /// `None` when the device has none, or does not reveal it (boringtun).
    pub private_key: Option<PrivateKey>,
    /// The device's own public key, as reported or derived from the private key.
    pub public_key: Option<PublicKey>,
    /// 0 when the device has not bound a port yet.
    pub listen_port: u16,
    pub fwmark: u32,
    /// Sorted by public key when read from a device.
    pub peers: Vec<LivePeer>,
}

/// A peer as read back, with its session counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePeer {
    pub public_key: PublicKey,
    pub has_preshared_key: PresharedKeyState,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpCidr>,
    /// 0 means off.
    pub persistent_keepalive_secs: u16,
    /// `None` when the peer never completed a handshake.
    pub last_handshake_unix_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Outpost never sets preshared keys; one found on a live peer is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresharedKeyState {
    None,
    Set,
}

impl LivePeer {
    /// A peer with no session yet, as it looks right after it was added.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            has_preshared_key: PresharedKeyState::None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive_secs: 0,
            last_handshake_unix_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

/// The whole configuration of one peer, written as one unit: allowed IPs are replaced, the
/// preshared key is cleared, and the endpoint is set when it is `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// `None` leaves the live endpoint alone (WireGuard cannot unset an endpoint).
    pub endpoint: Option<SocketAddr>,
    /// Sorted and deduplicated networks (host bits cleared).
    pub allowed_ips: Vec<IpCidr>,
    /// 0 means off.
    pub persistent_keepalive_secs: u16,
}

/// One change to a peer inside a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Remove(PublicKey),
    /// Create the peer or overwrite its whole configuration.
    Upsert(PeerConfig),
}

/// One request to a device. Applied in order: private key, listen port, then the peer changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceUpdate {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerChange>,
}

impl DeviceUpdate {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none() && self.listen_port.is_none() && self.peers.is_empty()
    }
}

/// Whether the interface is administratively up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkUp {
    Up,
    #[default]
    Down,
}

/// The interface's addresses and the routes that point at it (kernel-made routes excluded).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkState {
    pub up: LinkUp,
    pub addresses: Vec<IpCidr>,
    /// Networks (host bits cleared) routed to the interface.
    pub routes: Vec<IpCidr>,
}

/// What to change on the interface, as computed by [`super::diff::diff_link`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkChanges {
    pub bring_up: Option<LinkUp>,
    pub addresses_to_add: Vec<IpCidr>,
    pub addresses_to_remove: Vec<IpCidr>,
    pub routes_to_add: Vec<IpCidr>,
    pub routes_to_remove: Vec<IpCidr>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        self.bring_up.is_none()
            && self.addresses_to_add.is_empty()
            && self.addresses_to_remove.is_empty()
            && self.routes_to_add.is_empty()
            && self.routes_to_remove.is_empty()
    }
}
