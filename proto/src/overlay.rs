//! The WireGuard overlay part of a node plan (P9): the node's own interface, address and port,
//! and exactly the peers it should have. Control declares it; the agent applies it.
//!
//! Strings stay strings on the wire; validation here is bounded and shallow (lengths, counts,
//! the shape of keys, endpoints and networks). The agent types everything once more before it
//! touches a device (`agent/src/apply/wireguard/spec.rs`).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::name::check_name;
use crate::validate::{Validate, ValidationError, check_count};

/// Most peers one overlay may have.
pub const OVERLAY_PEERS_MAX: usize = 1024;
/// Most endpoint candidates of one peer (and of one node's report).
pub const PEER_ENDPOINTS_MAX: usize = 8;
/// Most allowed IPs of one peer.
pub const PEER_ALLOWED_IPS_MAX: usize = 64;
/// Longest Linux interface name.
pub const INTERFACE_NAME_MAX_BYTES: usize = 15;
/// Length of a base64 WireGuard key (32 bytes).
pub const WIREGUARD_KEY_BASE64_LEN: usize = 44;

/// This node's WireGuard overlay, as control declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlaySpec {
    /// Interface name, e.g. `outpost0`.
    pub interface_name: String,
    /// This node's overlay address with the overlay prefix, e.g. `10.232.0.1/16`.
    pub address: String,
    /// UDP port this node listens on.
    pub listen_port: u16,
    /// Every peer this node should have, sorted by node id; any other peer is removed.
    pub peers: Vec<OverlayPeerSpec>,
}

/// One peer of the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayPeerSpec {
    /// The peer's node id.
    pub node_id: String,
    /// Base64 x25519 public key (44 characters).
    pub public_key: String,
    /// Candidate underlay endpoints `IP:PORT`, best first (LAN addresses the peer reported).
    pub endpoints: Vec<String>,
    /// Networks routed to this peer, e.g. `["10.232.0.2/32"]`.
    pub allowed_ips: Vec<String>,
    /// 0 turns keepalives off.
    pub persistent_keepalive_secs: u16,
}

impl OverlaySpec {
    /// The peer for a node id.
    pub fn peer(&self, node_id: &str) -> Option<&OverlayPeerSpec> {
        self.peers.iter().find(|peer| peer.node_id == node_id)
    }

    /// Inserts or replaces the peer with `peer.node_id`, keeping the list sorted by node id.
    /// Returns whether anything changed.
    pub fn upsert_peer(&mut self, peer: &OverlayPeerSpec) -> bool {
        match self
            .peers
            .binary_search_by(|existing| existing.node_id.as_str().cmp(&peer.node_id))
        {
            Ok(index) if self.peers[index] == *peer => false,
            Ok(index) => {
                self.peers[index] = peer.clone();
                true
            }
            Err(index) => {
                self.peers.insert(index, peer.clone());
                true
            }
        }
    }

    /// Removes the peer of a node id. Returns whether it was there.
    pub fn remove_peer(&mut self, node_id: &str) -> bool {
        match self
            .peers
            .binary_search_by(|existing| existing.node_id.as_str().cmp(node_id))
        {
            Ok(index) => {
                self.peers.remove(index);
                true
            }
            Err(_) => false,
        }
    }
}

/// Checks a Linux interface name: 1 to 15 of `A-Z a-z 0-9 _ -`.
pub fn check_interface_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let fits = !value.is_empty()
        && value.len() <= INTERFACE_NAME_MAX_BYTES
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if fits {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be 1 to 15 characters of A-Z a-z 0-9 _ -",
            value,
        ))
    }
}

/// Checks the shape of a base64 WireGuard public key: 44 characters of the base64 alphabet
/// ending in `=` (43 characters carry 32 bytes).
pub fn check_wireguard_key(field: &str, value: &str) -> Result<(), ValidationError> {
    let shaped = value.len() == WIREGUARD_KEY_BASE64_LEN
        && value.ends_with('=')
        && value[..WIREGUARD_KEY_BASE64_LEN - 1]
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'+' || byte == b'/');
    if shaped {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be a base64 WireGuard key of 32 bytes (44 characters ending in '=')",
            value,
        ))
    }
}

/// Checks endpoint candidates: at most [`PEER_ENDPOINTS_MAX`] of `IP:PORT` (IPv6 as
/// `[ADDRESS]:PORT`) with a port other than 0.
pub fn check_endpoints(field: &str, endpoints: &[String]) -> Result<(), ValidationError> {
    check_count(field, endpoints.len(), PEER_ENDPOINTS_MAX)?;
    for (index, text) in endpoints.iter().enumerate() {
        match text.parse::<SocketAddr>() {
            Ok(endpoint) if endpoint.port() != 0 => {}
            _ => {
                return Err(ValidationError::new(
                    format!("{field}[{index}]"),
                    "must be IP:PORT (IPv6 as [ADDRESS]:PORT) with a port from 1 to 65535",
                    text,
                ));
            }
        }
    }
    Ok(())
}

/// Checks `ADDRESS/PREFIX` with a prefix that fits the address family.
pub fn check_cidr(field: &str, value: &str) -> Result<(IpAddr, u8), ValidationError> {
    let bad = || ValidationError::new(field, "must be ADDRESS/PREFIX, e.g. 10.232.0.2/32", value);
    let (address, prefix) = value.split_once('/').ok_or_else(bad)?;
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let longest = if address.is_ipv4() { 32 } else { 128 };
    if prefix > longest {
        return Err(bad());
    }
    Ok((address, prefix))
}

impl Validate for OverlayPeerSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("node_id", &self.node_id)?;
        check_wireguard_key("public_key", &self.public_key)?;
        check_endpoints("endpoints", &self.endpoints)?;
        check_count("allowed_ips", self.allowed_ips.len(), PEER_ALLOWED_IPS_MAX)?;
        for (index, network) in self.allowed_ips.iter().enumerate() {
            check_cidr(&format!("allowed_ips[{index}]"), network)?;
        }
        Ok(())
    }
}

impl Validate for OverlaySpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_interface_name("interface_name", &self.interface_name)?;
        check_cidr("address", &self.address)?;
        if self.listen_port == 0 {
            return Err(ValidationError::new(
                "listen_port",
                "must be 1 to 65535",
                self.listen_port,
            ));
        }
        check_count("peers", self.peers.len(), OVERLAY_PEERS_MAX)?;
        for (index, peer) in self.peers.iter().enumerate() {
            let field = format!("peers[{index}]");
            peer.validate().map_err(|e| e.within(&field))?;
            if index > 0 && self.peers[index - 1].node_id >= peer.node_id {
                return Err(ValidationError::new(
                    format!("{field}.node_id"),
                    "peers must be sorted by node id without duplicates",
                    &peer.node_id,
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn sample_peer(node_id: &str, last_octet: u8) -> OverlayPeerSpec {
    OverlayPeerSpec {
        node_id: node_id.to_string(),
        public_key: format!("{}{last_octet:02x}=", "A".repeat(41)),
        endpoints: vec![format!("10.231.0.{last_octet}:51820")],
        allowed_ips: vec![format!("10.232.0.{last_octet}/32")],
        persistent_keepalive_secs: 25,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OverlaySpec {
        OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/16".into(),
            listen_port: 51820,
            peers: vec![sample_peer("b", 2), sample_peer("c", 3)],
        }
    }

    #[test]
    fn a_good_spec_validates_and_round_trips() {
        let spec = spec();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<OverlaySpec>(&json).unwrap(), spec);
        let bytes = postcard::to_allocvec(&spec).unwrap();
        assert_eq!(postcard::from_bytes::<OverlaySpec>(&bytes).unwrap(), spec);
    }

    #[test]
    fn bad_fields_are_named_with_their_value() {
        type Case = (fn(&mut OverlaySpec), &'static str, &'static str);
        let cases: [Case; 7] = [
            (
                |s| s.interface_name = "bad name".into(),
                "interface_name",
                "bad name",
            ),
            (|s| s.address = "10.232.0.1".into(), "address", "10.232.0.1"),
            (|s| s.listen_port = 0, "listen_port", "0"),
            (
                |s| s.peers[0].public_key = "nope".into(),
                "peers[0].public_key",
                "nope",
            ),
            (
                |s| s.peers[1].endpoints = vec!["10.0.0.1".into()],
                "peers[1].endpoints[0]",
                "10.0.0.1",
            ),
            (
                |s| s.peers[0].allowed_ips = vec!["10.0.0.0/40".into()],
                "peers[0].allowed_ips[0]",
                "10.0.0.0/40",
            ),
            (|s| s.peers.swap(0, 1), "peers[1].node_id", "b"),
        ];
        for (change, field, value) in cases {
            let mut bad = spec();
            change(&mut bad);
            let error = bad.validate().unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert_eq!(error.value, value, "{error}");
        }
    }

    #[test]
    fn peers_are_upserted_in_order_and_removed() {
        let mut spec = spec();
        assert!(!spec.upsert_peer(&sample_peer("b", 2)), "same peer again");
        let mut moved = sample_peer("b", 2);
        moved.endpoints = vec!["192.168.1.2:51820".into()];
        assert!(spec.upsert_peer(&moved));
        assert!(spec.upsert_peer(&sample_peer("a", 9)));
        let order: Vec<&str> = spec.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert_eq!(spec.peer("b"), Some(&moved));
        assert!(spec.remove_peer("a"));
        assert!(!spec.remove_peer("a"));
        spec.validate().unwrap();
    }

    #[test]
    fn keys_and_endpoints_are_shape_checked() {
        assert!(check_wireguard_key("k", &format!("{}=", "a".repeat(42))).is_err());
        assert!(check_wireguard_key("k", &format!("{}=", "a+/9".repeat(10) + "abc")).is_ok());
        assert!(check_endpoints("e", &["[fd00::1]:51820".into()]).is_ok());
        assert!(check_endpoints("e", &["10.0.0.1:0".into()]).is_err());
        assert!(check_endpoints("e", &vec!["10.0.0.1:1".to_string(); 9]).is_err());
    }
}
