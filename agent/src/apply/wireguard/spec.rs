//! The overlay part of a node plan as control sends it (`OverlaySpec`, the wire type of
//! `outpost-proto`'s `Plan`), and its validation into the typed `DesiredOverlay`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use super::cidr::IpCidr;
use super::key::PublicKey;

/// Most peers one overlay may have.
pub const OVERLAY_PEERS_MAX: usize = 1024;
/// Most endpoint candidates of one peer.
pub const PEER_ENDPOINTS_MAX: usize = 8;
/// Most allowed IPs of one peer.
pub const PEER_ALLOWED_IPS_MAX: usize = 64;
/// Longest Linux interface name.
pub const INTERFACE_NAME_MAX_BYTES: usize = 15;

/// The overlay part of a node plan is the wire type of `outpost-proto` (moved there from this
/// module); this module types and checks it.
pub use outpost_proto::overlay::{OverlayPeerSpec, OverlaySpec};

/// A validated Linux interface name (1 to 15 of `A-Z a-z 0-9 _ -`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn new(text: &str) -> Result<Self, OverlaySpecError> {
        let fits = !text.is_empty()
            && text.len() <= INTERFACE_NAME_MAX_BYTES
            && text
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
        if fits {
            Ok(Self(text.to_string()))
        } else {
            Err(OverlaySpecError::new(
                "interface_name",
                text,
                "must be 1 to 15 characters of A-Z a-z 0-9 _ -",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A field of the overlay spec that is wrong, with the value seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("overlay field {field} has invalid value {value:?}: {reason}")]
pub struct OverlaySpecError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl OverlaySpecError {
    fn new(field: impl Into<String>, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string().chars().take(128).collect(),
            reason: reason.into(),
        }
    }
}

/// The overlay after validation: typed, normalized, ready to diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredOverlay {
    pub interface_name: InterfaceName,
    pub address: IpCidr,
    pub listen_port: u16,
    /// Sorted by public key.
    pub peers: Vec<DesiredPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node_id: String,
    pub public_key: PublicKey,
    /// Best first, deduplicated.
    pub endpoints: Vec<SocketAddr>,
    /// Networks with host bits cleared, sorted and deduplicated.
    pub allowed_ips: Vec<IpCidr>,
    pub persistent_keepalive_secs: u16,
}

impl DesiredOverlay {
    /// Checks every field; the first problem is returned, naming the field and the value.
    pub fn from_spec(spec: &OverlaySpec) -> Result<Self, OverlaySpecError> {
        let interface_name = InterfaceName::new(&spec.interface_name)?;
        let address: IpCidr =
            spec.address
                .parse()
                .map_err(|error: super::cidr::CidrParseError| {
                    OverlaySpecError::new("address", &spec.address, error.reason)
                })?;
        if address.prefix_len() == 0 || address == address.network() && address.prefix_len() < 31 {
            return Err(OverlaySpecError::new(
                "address",
                &spec.address,
                "must be a host address inside the overlay network, e.g. 10.232.0.1/24",
            ));
        }
        if spec.listen_port == 0 {
            return Err(OverlaySpecError::new(
                "listen_port",
                spec.listen_port,
                "must be 1 to 65535 so peers can reach it",
            ));
        }
        if spec.peers.len() > OVERLAY_PEERS_MAX {
            return Err(OverlaySpecError::new(
                "peers",
                format!("{} peers", spec.peers.len()),
                format!("at most {OVERLAY_PEERS_MAX} peers"),
            ));
        }
        let mut peers = Vec::with_capacity(spec.peers.len());
        let mut owner_of_network: BTreeMap<IpCidr, usize> = BTreeMap::new();
        let mut seen_keys = BTreeSet::new();
        for (index, peer_spec) in spec.peers.iter().enumerate() {
            let peer = validate_peer(index, peer_spec, &address)?;
            if !seen_keys.insert(peer.public_key) {
                return Err(OverlaySpecError::new(
                    format!("peers[{index}].public_key"),
                    &peer_spec.public_key,
                    "appears on two peers",
                ));
            }
            for network in &peer.allowed_ips {
                if let Some(other) = owner_of_network.insert(*network, index) {
                    return Err(OverlaySpecError::new(
                        format!("peers[{index}].allowed_ips"),
                        network,
                        format!("is also an allowed IP of peers[{other}]"),
                    ));
                }
            }
            peers.push(peer);
        }
        peers.sort_by_key(|peer| peer.public_key);
        Ok(Self {
            interface_name,
            address,
            listen_port: spec.listen_port,
            peers,
        })
    }
}

fn validate_peer(
    index: usize,
    spec: &OverlayPeerSpec,
    own_address: &IpCidr,
) -> Result<DesiredPeer, OverlaySpecError> {
    let field = |name: &str| format!("peers[{index}].{name}");
    if spec.node_id.len() > 253 {
        return Err(OverlaySpecError::new(
            field("node_id"),
            &spec.node_id,
            "longer than 253 bytes",
        ));
    }
    let public_key = PublicKey::from_base64(&spec.public_key).map_err(|_| {
        OverlaySpecError::new(
            field("public_key"),
            &spec.public_key,
            "not a base64 WireGuard key of 32 bytes",
        )
    })?;
    if spec.endpoints.len() > PEER_ENDPOINTS_MAX {
        return Err(OverlaySpecError::new(
            field("endpoints"),
            format!("{} endpoints", spec.endpoints.len()),
            format!("at most {PEER_ENDPOINTS_MAX}"),
        ));
    }
    let mut endpoints: Vec<SocketAddr> = Vec::with_capacity(spec.endpoints.len());
    for text in &spec.endpoints {
        let endpoint: SocketAddr = text.parse().map_err(|_| {
            OverlaySpecError::new(
                field("endpoints"),
                text,
                "not IP:PORT (IPv6 as [ADDRESS]:PORT)",
            )
        })?;
        if endpoint.port() == 0 {
            return Err(OverlaySpecError::new(field("endpoints"), text, "port 0"));
        }
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    if spec.allowed_ips.len() > PEER_ALLOWED_IPS_MAX {
        return Err(OverlaySpecError::new(
            field("allowed_ips"),
            format!("{} networks", spec.allowed_ips.len()),
            format!("at most {PEER_ALLOWED_IPS_MAX}"),
        ));
    }
    let mut allowed_ips = BTreeSet::new();
    for text in &spec.allowed_ips {
        let network: IpCidr = text.parse().map_err(|error: super::cidr::CidrParseError| {
            OverlaySpecError::new(field("allowed_ips"), text, error.reason)
        })?;
        if network.prefix_len() == 0 {
            return Err(OverlaySpecError::new(
                field("allowed_ips"),
                text,
                "a default route is not allowed on the overlay",
            ));
        }
        if network.contains(&IpCidr::host(own_address.address())) {
            return Err(OverlaySpecError::new(
                field("allowed_ips"),
                text,
                format!("covers this node's own address {}", own_address.address()),
            ));
        }
        allowed_ips.insert(network.network());
    }
    Ok(DesiredPeer {
        node_id: spec.node_id.clone(),
        public_key,
        endpoints,
        allowed_ips: allowed_ips.into_iter().collect(),
        persistent_keepalive_secs: spec.persistent_keepalive_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::super::key::PrivateKey;
    use super::*;

    fn key() -> String {
        PrivateKey::generate().unwrap().public_key().to_base64()
    }

    fn spec() -> OverlaySpec {
        OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/24".into(),
            listen_port: 51820,
            peers: vec![OverlayPeerSpec {
                node_id: "node-b".into(),
                public_key: key(),
                endpoints: vec!["10.231.0.2:51820".into(), "[fd00::2]:51820".into()],
                allowed_ips: vec!["10.232.0.2/32".into(), "10.99.0.7/24".into()],
                persistent_keepalive_secs: 25,
            }],
        }
    }

    #[test]
    fn a_good_spec_is_typed_and_normalized() {
        let desired = DesiredOverlay::from_spec(&spec()).unwrap();
        assert_eq!(desired.interface_name.as_str(), "outpost0");
        assert_eq!(desired.address.to_string(), "10.232.0.1/24");
        let peer = &desired.peers[0];
        assert_eq!(peer.endpoints.len(), 2);
        let allowed: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, ["10.99.0.0/24", "10.232.0.2/32"]);
    }

    #[test]
    fn the_spec_round_trips_through_json() {
        let original = spec();
        let text = serde_json::to_string(&original).unwrap();
        assert!(text.contains("\"persistent_keepalive_secs\":25"), "{text}");
        let back: OverlaySpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn each_bad_field_is_named_with_its_value() {
        type Case = (Box<dyn Fn(&mut OverlaySpec)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.interface_name = "bad name".into()),
                "interface_name",
                "bad name",
            ),
            (
                Box::new(|s| s.interface_name = "x".repeat(16)),
                "interface_name",
                "xxxx",
            ),
            (
                Box::new(|s| s.address = "10.232.0.1".into()),
                "address",
                "10.232.0.1",
            ),
            (
                Box::new(|s| s.address = "10.232.0.0/24".into()),
                "address",
                "10.232.0.0/24",
            ),
            (Box::new(|s| s.listen_port = 0), "listen_port", "0"),
            (
                Box::new(|s| s.peers[0].public_key = "nope".into()),
                "peers[0].public_key",
                "nope",
            ),
            (
                Box::new(|s| s.peers[0].endpoints[0] = "10.0.0.1".into()),
                "peers[0].endpoints",
                "10.0.0.1",
            ),
            (
                Box::new(|s| s.peers[0].allowed_ips[0] = "0.0.0.0/0".into()),
                "peers[0].allowed_ips",
                "0.0.0.0/0",
            ),
            (
                Box::new(|s| s.peers[0].allowed_ips[0] = "10.232.0.1/32".into()),
                "peers[0].allowed_ips",
                "10.232.0.1/32",
            ),
            (
                Box::new(|s| s.peers[0].allowed_ips[0] = "10.232.0.2/40".into()),
                "peers[0].allowed_ips",
                "10.232.0.2/40",
            ),
        ];
        for (change, field, value) in cases {
            let mut bad = spec();
            change(&mut bad);
            let error = DesiredOverlay::from_spec(&bad).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.value.contains(value), "{error}");
            assert!(error.to_string().starts_with("overlay field "), "{error}");
        }
    }

    #[test]
    fn duplicate_keys_and_shared_allowed_ips_are_rejected() {
        let mut twice = spec();
        twice.peers.push(twice.peers[0].clone());
        assert_eq!(
            DesiredOverlay::from_spec(&twice).unwrap_err().field,
            "peers[1].public_key"
        );
        let mut shared = spec();
        let mut other = shared.peers[0].clone();
        other.public_key = key();
        shared.peers.push(other);
        let error = DesiredOverlay::from_spec(&shared).unwrap_err();
        assert_eq!(error.field, "peers[1].allowed_ips");
        assert!(error.reason.contains("peers[0]"), "{error}");
    }

    #[test]
    fn too_many_peers_is_an_error_not_a_truncation() {
        let mut big = spec();
        big.peers = vec![big.peers[0].clone(); OVERLAY_PEERS_MAX + 1];
        assert_eq!(DesiredOverlay::from_spec(&big).unwrap_err().field, "peers");
    }
}
