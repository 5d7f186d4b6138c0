//! The WireGuard overlay on control's side (P9): IPAM over the overlay CIDR, the mesh members
//! (one per node with a key: address, public key, endpoints, port), and the pure decisions that
//! turn a node's report (registration, heartbeat, key rotation) or its revocation into events.
//!
//! The mesh is per org: a node's peers are the other members of its org (ready or down — a node
//! control lost contact with may still be reachable over the LAN, so it is not taken out of its
//! peers' sets; revoked nodes leave). Each event names the nodes it concerns, so the feed
//! sends every node only its own peer changes; only a joining node receives its whole peer list.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use outpost_proto::overlay::{OverlayPeerSpec, OverlaySpec};
use serde::{Deserialize, Serialize};

use crate::log::Event;

/// The overlay network nodes get addresses from, unless `--overlay-cidr` says otherwise:
/// 10.232.0.0/16 (65 534 nodes; private space, next to the 10.231.0.0/24 the namespace tests
/// use as underlay).
pub const DEFAULT_OVERLAY_CIDR: &str = "10.232.0.0/16";
/// The interface name plans carry (an agent may use a local name instead).
pub const DEFAULT_INTERFACE_NAME: &str = "outpost0";
/// Keepalive every peer gets: keeps NAT mappings open and lets a peer notice a changed endpoint.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// Port assumed for a node that did not report one.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// How control hands out overlay addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub interface_name: String,
    pub keepalive_secs: u16,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        Self::parse_cidr(DEFAULT_OVERLAY_CIDR).unwrap_or(Self {
            network: Ipv4Addr::new(10, 232, 0, 0),
            prefix_len: 16,
            interface_name: DEFAULT_INTERFACE_NAME.to_string(),
            keepalive_secs: PERSISTENT_KEEPALIVE_SECS,
        })
    }
}

impl OverlayConfig {
    /// Parses `--overlay-cidr`: an IPv4 network from /8 to /30 whose host bits are zero.
    pub fn parse_cidr(text: &str) -> Result<Self, String> {
        let bad = |reason: &str| format!("overlay cidr {text:?} {reason}");
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| bad("must be NETWORK/PREFIX, e.g. 10.232.0.0/16"))?;
        let network: Ipv4Addr = address
            .parse()
            .map_err(|_| bad("does not start with an IPv4 address"))?;
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| bad("has no prefix length after '/'"))?;
        if !(8..=30).contains(&prefix_len) {
            return Err(bad("must have a prefix length from 8 to 30"));
        }
        if u32::from(network) & !mask(prefix_len) != 0 {
            return Err(bad("has host bits set; give the network address"));
        }
        Ok(Self {
            network,
            prefix_len,
            interface_name: DEFAULT_INTERFACE_NAME.to_string(),
            keepalive_secs: PERSISTENT_KEEPALIVE_SECS,
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network, self.prefix_len)
    }

    /// The lowest host address of the network not in `used` (network and broadcast addresses
    /// excluded); `None` when every address is taken.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network) + 1;
        let broadcast = u32::from(self.network) | !mask(self.prefix_len);
        (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|address| !used.contains(address))
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

/// One node in the overlay mesh, as the views keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayMember {
    pub node_id: String,
    pub org: String,
    /// The node's address with the overlay prefix, e.g. `10.232.0.3/16`.
    pub address: String,
    pub public_key: String,
    pub endpoints: Vec<String>,
    pub listen_port: u16,
    pub interface_name: String,
    pub keepalive_secs: u16,
}

impl OverlayMember {
    /// The bare address (before the `/`).
    pub fn host_address(&self) -> &str {
        self.address.split('/').next().unwrap_or(&self.address)
    }

    /// This member as a peer of the others: its key, endpoints and its own /32.
    pub fn peer_spec(&self) -> OverlayPeerSpec {
        OverlayPeerSpec {
            node_id: self.node_id.clone(),
            public_key: self.public_key.clone(),
            endpoints: self.endpoints.clone(),
            allowed_ips: vec![format!("{}/32", self.host_address())],
            persistent_keepalive_secs: self.keepalive_secs,
        }
    }

    /// This member's own overlay with `peers`.
    pub fn own_spec(&self, peers: Vec<OverlayPeerSpec>) -> OverlaySpec {
        OverlaySpec {
            interface_name: self.interface_name.clone(),
            address: self.address.clone(),
            listen_port: self.listen_port,
            peers,
        }
    }
}

/// Every member by node id.
pub type Members = BTreeMap<String, OverlayMember>;

/// The peers of `node_id`: the other members of its org, sorted by node id.
pub fn peers_of(members: &Members, node_id: &str, org: &str) -> Vec<OverlayPeerSpec> {
    members
        .values()
        .filter(|member| member.org == org && member.node_id != node_id)
        .map(OverlayMember::peer_spec)
        .collect()
}

fn others_in_org(members: &Members, node_id: &str, org: &str) -> Vec<String> {
    members
        .values()
        .filter(|member| member.org == org && member.node_id != node_id)
        .map(|member| member.node_id.clone())
        .collect()
}

/// What a node reported about its overlay side (registration, heartbeat, key rotation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlayReport {
    pub public_key: Option<String>,
    /// Authoritative only together with a key: an agent without the overlay reports neither.
    pub endpoints: Vec<String>,
    pub listen_port: Option<u16>,
}

/// Why a report cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayRefusal {
    #[error("wireguard public key {public_key} is already the key of node {owner}")]
    KeyInUse { public_key: String, owner: String },
    #[error("overlay network {cidr} has no free address left ({allocated} allocated)")]
    Full { cidr: String, allocated: usize },
}

/// The events a node's report leads to: none when nothing changed; `OverlayJoined` (with a new
/// address) for a node that is not a member yet and has a key; `OverlayMemberChanged` when its
/// key, endpoints or port differ. A report without a key changes nothing.
pub fn report_events(
    config: &OverlayConfig,
    members: &Members,
    node_id: &str,
    org: &str,
    report: &OverlayReport,
) -> Result<Vec<Event>, OverlayRefusal> {
    let Some(public_key) = &report.public_key else {
        return Ok(Vec::new());
    };
    if let Some(owner) = members
        .values()
        .find(|member| member.public_key == *public_key && member.node_id != node_id)
    {
        return Err(OverlayRefusal::KeyInUse {
            public_key: public_key.clone(),
            owner: owner.node_id.clone(),
        });
    }
    let notify = others_in_org(members, node_id, org);
    match members.get(node_id) {
        Some(existing) => {
            let updated = OverlayMember {
                public_key: public_key.clone(),
                endpoints: report.endpoints.clone(),
                listen_port: report.listen_port.unwrap_or(existing.listen_port),
                ..existing.clone()
            };
            if updated == *existing {
                return Ok(Vec::new());
            }
            Ok(vec![Event::OverlayMemberChanged {
                member: updated,
                notify,
            }])
        }
        None => {
            let used: BTreeSet<Ipv4Addr> = members
                .values()
                .filter_map(|member| member.host_address().parse().ok())
                .collect();
            let address = config.allocate(&used).ok_or_else(|| OverlayRefusal::Full {
                cidr: config.cidr(),
                allocated: used.len(),
            })?;
            let member = OverlayMember {
                node_id: node_id.to_string(),
                org: org.to_string(),
                address: format!("{address}/{}", config.prefix_len),
                public_key: public_key.clone(),
                endpoints: report.endpoints.clone(),
                listen_port: report.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
                interface_name: config.interface_name.clone(),
                keepalive_secs: config.keepalive_secs,
            };
            let peers = peers_of(members, node_id, org);
            Ok(vec![Event::OverlayJoined {
                member,
                peers,
                notify,
            }])
        }
    }
}

/// Whether a report would change anything, checked without the command lock (heartbeats).
pub fn report_differs(members: &Members, node_id: &str, report: &OverlayReport) -> bool {
    let Some(public_key) = &report.public_key else {
        return false;
    };
    match members.get(node_id) {
        None => true,
        Some(member) => {
            member.public_key != *public_key
                || member.endpoints != report.endpoints
                || report
                    .listen_port
                    .is_some_and(|port| port != member.listen_port)
        }
    }
}

/// The event of a node leaving the mesh (revocation): its peers drop it and its address is free.
pub fn leave_event(members: &Members, node_id: &str) -> Option<Event> {
    let member = members.get(node_id)?;
    Some(Event::OverlayLeft {
        node_id: node_id.to_string(),
        org: member.org.clone(),
        address: member.address.clone(),
        notify: others_in_org(members, node_id, &member.org),
    })
}

/// Applies an overlay event to the members (the projection's part).
pub fn apply_event(members: &mut Members, event: &Event) {
    match event {
        Event::OverlayJoined { member, .. } | Event::OverlayMemberChanged { member, .. } => {
            members.insert(member.node_id.clone(), member.clone());
        }
        Event::OverlayLeft { node_id, .. } => {
            members.remove(node_id);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        format!("{}{n:02x}=", "A".repeat(41))
    }

    fn report(n: u8, endpoint: &str) -> OverlayReport {
        OverlayReport {
            public_key: Some(key(n)),
            endpoints: vec![endpoint.to_string()],
            listen_port: Some(51820),
        }
    }

    fn join(members: &mut Members, config: &OverlayConfig, node: &str, org: &str, n: u8) -> Event {
        let events =
            report_events(config, members, node, org, &report(n, "10.231.0.9:51820")).unwrap();
        assert_eq!(events.len(), 1);
        apply_event(members, &events[0]);
        events[0].clone()
    }

    #[test]
    fn cidrs_parse_or_say_what_is_wrong() {
        let config = OverlayConfig::parse_cidr("10.232.0.0/16").unwrap();
        assert_eq!(config.cidr(), "10.232.0.0/16");
        for bad in [
            "10.232.0.0",
            "10.232.0.1/16",
            "10.232.0.0/31",
            "fd00::/64",
            "x/16",
            "10.0.0.0/x",
        ] {
            let error = OverlayConfig::parse_cidr(bad).unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
    }

    #[test]
    fn addresses_are_lowest_free_and_never_shared() {
        let config = OverlayConfig::parse_cidr("10.9.0.0/30").unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(config.allocate(&used), Some(Ipv4Addr::new(10, 9, 0, 1)));
        used.insert(Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(config.allocate(&used), Some(Ipv4Addr::new(10, 9, 0, 2)));
        used.insert(Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(
            config.allocate(&used),
            None,
            "network and broadcast are never handed out"
        );
    }

    #[test]
    fn joining_updating_and_leaving_name_exactly_the_nodes_concerned() {
        let config = OverlayConfig::default();
        let mut members = Members::new();
        let first = join(&mut members, &config, "a", "default", 1);
        let Event::OverlayJoined {
            member,
            peers,
            notify,
        } = &first
        else {
            panic!("{first:?}")
        };
        assert_eq!(
            (member.address.as_str(), peers.len(), notify.len()),
            ("10.232.0.1/16", 0, 0)
        );
        join(&mut members, &config, "other-org", "acme", 9);
        let second = join(&mut members, &config, "b", "default", 2);
        let Event::OverlayJoined {
            member,
            peers,
            notify,
        } = &second
        else {
            panic!("{second:?}")
        };
        assert_eq!(member.address, "10.232.0.3/16");
        assert_eq!(
            peers.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(peers[0].allowed_ips, ["10.232.0.1/32"]);
        assert_eq!(notify, &["a".to_string()], "another org's node is not told");

        // The same report again changes nothing; a new endpoint or key does.
        assert!(
            report_events(
                &config,
                &members,
                "b",
                "default",
                &report(2, "10.231.0.9:51820")
            )
            .unwrap()
            .is_empty()
        );
        assert!(!report_differs(
            &members,
            "b",
            &report(2, "10.231.0.9:51820")
        ));
        assert!(report_differs(
            &members,
            "b",
            &report(2, "192.168.1.2:51820")
        ));
        let moved = report_events(
            &config,
            &members,
            "b",
            "default",
            &report(2, "192.168.1.2:51820"),
        )
        .unwrap();
        let Event::OverlayMemberChanged { member, notify } = &moved[0] else {
            panic!("{moved:?}")
        };
        assert_eq!(
            (member.address.as_str(), notify.len()),
            ("10.232.0.3/16", 1),
            "the address is stable"
        );
        apply_event(&mut members, &moved[0]);
        let rotated = report_events(
            &config,
            &members,
            "b",
            "default",
            &report(7, "192.168.1.2:51820"),
        )
        .unwrap();
        assert!(
            matches!(&rotated[0], Event::OverlayMemberChanged { member, .. } if member.public_key == key(7))
        );

        // A key another node holds is refused.
        let stolen = report_events(
            &config,
            &members,
            "b",
            "default",
            &report(1, "10.231.0.9:51820"),
        );
        assert!(matches!(stolen, Err(OverlayRefusal::KeyInUse { owner, .. }) if owner == "a"));

        // Leaving frees the address for the next node.
        let left = leave_event(&members, "a").unwrap();
        let Event::OverlayLeft {
            notify, address, ..
        } = &left
        else {
            panic!("{left:?}")
        };
        assert_eq!(
            (address.as_str(), notify.clone()),
            ("10.232.0.1/16", vec!["b".to_string()])
        );
        apply_event(&mut members, &left);
        let third = join(&mut members, &config, "c", "default", 3);
        assert!(
            matches!(&third, Event::OverlayJoined { member, .. } if member.address == "10.232.0.1/16")
        );
        assert!(leave_event(&members, "nobody").is_none());
    }

    #[test]
    fn a_report_without_a_key_changes_nothing_and_a_full_network_is_an_error() {
        let config = OverlayConfig::parse_cidr("10.9.0.0/30").unwrap();
        let mut members = Members::new();
        assert!(
            report_events(&config, &members, "a", "o", &OverlayReport::default())
                .unwrap()
                .is_empty()
        );
        join(&mut members, &config, "a", "o", 1);
        join(&mut members, &config, "b", "o", 2);
        let full = report_events(&config, &members, "c", "o", &report(3, "10.0.0.3:1"));
        assert!(
            matches!(full, Err(OverlayRefusal::Full { allocated: 2, .. })),
            "{full:?}"
        );
    }
}
