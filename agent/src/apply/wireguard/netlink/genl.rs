//! Generic netlink for the kernel's WireGuard family, sans-IO: the family lookup
//! (`CTRL_CMD_GETFAMILY "wireguard"`), `WG_CMD_GET_DEVICE` and its answer folded into a
//! [`LiveDevice`] (a device with many peers comes in several messages, and one peer's allowed
//! IPs may continue in the next), and `WG_CMD_SET_DEVICE` split into messages of bounded size
//! at peer (or allowed-IP) boundaries, as `wg set` does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{
    MessageBuilder, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkError, attributes, fixed,
    split_family_header,
};
use crate::apply::wireguard::cidr::IpCidr;
use crate::apply::wireguard::device::{
    DeviceUpdate, LiveDevice, LivePeer, PeerChange, PeerConfig, PresharedKeyState,
};
use crate::apply::wireguard::key::{KEY_BYTES, PrivateKey, PublicKey};

/// `struct genlmsghdr`.
const GENL_HEADER_BYTES: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const WG_GENL_NAME: &str = "wireguard";
const WG_GENL_VERSION: u8 = 1;
const WG_CMD_GET_DEVICE: u8 = 0;
const WG_CMD_SET_DEVICE: u8 = 1;

const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
const WGDEVICE_A_PEERS: u16 = 8;

const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_FLAGS: u16 = 3;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
const WGPEER_A_RX_BYTES: u16 = 7;
const WGPEER_A_TX_BYTES: u16 = 8;
const WGPEER_A_ALLOWEDIPS: u16 = 9;

const WGPEER_F_REMOVE_ME: u32 = 1;
const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;

const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Largest `WG_CMD_SET_DEVICE` message built; a change that needs more is split (the kernel
/// takes messages up to a page, like `wg` sends them).
pub const SET_MESSAGE_MAX_BYTES: usize = 4096;

fn genl_header(command: u8, version: u8) -> [u8; GENL_HEADER_BYTES] {
    [command, version, 0, 0]
}

/// `CTRL_CMD_GETFAMILY` for `name`; the kernel answers `ENOENT` when no such family is
/// registered (for `wireguard`: the module is not loaded).
pub fn get_family(name: &str) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        format!("CTRL_CMD_GETFAMILY {name}"),
    );
    message.push_raw(&genl_header(CTRL_CMD_GETFAMILY, 1));
    message.attribute_string(CTRL_ATTR_FAMILY_NAME, name);
    message
}

/// The family id in a `CTRL_CMD_NEWFAMILY` answer.
pub fn parse_family_id(payload: &[u8]) -> Result<u16, NetlinkError> {
    let (_, rest) = split_family_header(payload, GENL_HEADER_BYTES, "genlmsghdr")?;
    for attribute in attributes(rest) {
        let (kind, value) = attribute?;
        if kind == CTRL_ATTR_FAMILY_ID {
            return Ok(u16::from_ne_bytes(fixed(value, "CTRL_ATTR_FAMILY_ID")?));
        }
    }
    Err(NetlinkError::Invalid {
        what: "family answer",
        reason: "no CTRL_ATTR_FAMILY_ID".to_string(),
    })
}

/// `WG_CMD_GET_DEVICE` (a dump) for interface `name`.
pub fn get_device(family: u16, name: &str) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        format!("WG_CMD_GET_DEVICE {name}"),
    );
    message.push_raw(&genl_header(WG_CMD_GET_DEVICE, WG_GENL_VERSION));
    message.attribute_string(WGDEVICE_A_IFNAME, name);
    message
}

/// Folds the payloads of a `WG_CMD_GET_DEVICE` dump into the device. Device attributes repeat
/// in every message; peers continue across messages, and a peer whose key equals the previous
/// message's last peer continues that peer (its allowed IPs did not fit).
pub fn parse_device(payloads: &[&[u8]]) -> Result<LiveDevice, NetlinkError> {
    let mut device = LiveDevice::default();
    for payload in payloads {
        let (_, rest) = split_family_header(payload, GENL_HEADER_BYTES, "genlmsghdr")?;
        for attribute in attributes(rest) {
            let (kind, value) = attribute?;
            match kind {
                WGDEVICE_A_PRIVATE_KEY => {
                    // All zeros is WireGuard's "no key" (checked before clamping changes it).
                    let mut bytes = fixed::<KEY_BYTES>(value, "private key")?;
                    device.private_key =
                        (bytes != [0; KEY_BYTES]).then(|| PrivateKey::from_bytes(bytes));
                    zeroize::Zeroize::zeroize(&mut bytes);
                }
                WGDEVICE_A_PUBLIC_KEY => {
                    device.public_key = Some(PublicKey::from_bytes(fixed(value, "public key")?));
                }
                WGDEVICE_A_LISTEN_PORT => {
                    device.listen_port = u16::from_ne_bytes(fixed(value, "listen port")?);
                }
                WGDEVICE_A_FWMARK => device.fwmark = u32::from_ne_bytes(fixed(value, "fwmark")?),
                WGDEVICE_A_PEERS => {
                    for peer in attributes(value) {
                        let (_, peer_value) = peer?;
                        let parsed = parse_peer(peer_value)?;
                        match device.peers.last_mut() {
                            Some(last) if last.public_key == parsed.public_key => {
                                last.allowed_ips.extend(parsed.allowed_ips);
                            }
                            _ => device.peers.push(parsed),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    device.peers.sort_by_key(|peer| peer.public_key);
    Ok(device)
}

fn parse_peer(value: &[u8]) -> Result<LivePeer, NetlinkError> {
    let mut public_key = None;
    let mut peer = LivePeer::new(PublicKey::from_bytes([0; KEY_BYTES]));
    for attribute in attributes(value) {
        let (kind, field) = attribute?;
        match kind {
            WGPEER_A_PUBLIC_KEY => {
                public_key = Some(PublicKey::from_bytes(fixed(field, "peer public key")?));
            }
            WGPEER_A_PRESHARED_KEY => {
                let key = fixed::<KEY_BYTES>(field, "preshared key")?;
                peer.has_preshared_key = if key == [0; KEY_BYTES] {
                    PresharedKeyState::None
                } else {
                    PresharedKeyState::Set
                };
            }
            WGPEER_A_ENDPOINT => peer.endpoint = Some(parse_endpoint(field)?),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL => {
                peer.persistent_keepalive_secs =
                    u16::from_ne_bytes(fixed(field, "persistent keepalive")?);
            }
            WGPEER_A_LAST_HANDSHAKE_TIME => {
                // struct __kernel_timespec { i64 seconds; i64 nanoseconds }.
                let time = fixed::<16>(field, "last handshake time")?;
                let mut seconds = [0u8; 8];
                seconds.copy_from_slice(&time[..8]);
                let seconds = i64::from_ne_bytes(seconds);
                peer.last_handshake_unix_secs = (seconds > 0).then_some(seconds as u64);
            }
            WGPEER_A_RX_BYTES => peer.rx_bytes = u64::from_ne_bytes(fixed(field, "rx bytes")?),
            WGPEER_A_TX_BYTES => peer.tx_bytes = u64::from_ne_bytes(fixed(field, "tx bytes")?),
            WGPEER_A_ALLOWEDIPS => {
                for allowed in attributes(field) {
                    let (_, allowed_value) = allowed?;
                    peer.allowed_ips.push(parse_allowed_ip(allowed_value)?);
                }
            }
            _ => {}
        }
    }
    peer.public_key = public_key.ok_or_else(|| NetlinkError::Invalid {
        what: "peer",
        reason: "no WGPEER_A_PUBLIC_KEY".to_string(),
    })?;
    Ok(peer)
}

fn parse_allowed_ip(value: &[u8]) -> Result<IpCidr, NetlinkError> {
    let (mut family, mut address, mut mask) = (None, None, None);
    for attribute in attributes(value) {
        let (kind, field) = attribute?;
        match kind {
            WGALLOWEDIP_A_FAMILY => family = Some(u16::from_ne_bytes(fixed(field, "family")?)),
            WGALLOWEDIP_A_IPADDR => address = Some(field),
            WGALLOWEDIP_A_CIDR_MASK => mask = Some(fixed::<1>(field, "cidr mask")?[0]),
            _ => {}
        }
    }
    let ip = match (family, address) {
        (Some(AF_INET), Some(bytes)) => IpAddr::V4(Ipv4Addr::from(fixed::<4>(bytes, "ipv4")?)),
        (Some(AF_INET6), Some(bytes)) => IpAddr::V6(Ipv6Addr::from(fixed::<16>(bytes, "ipv6")?)),
        (family, _) => {
            return Err(NetlinkError::Invalid {
                what: "allowed ip",
                reason: format!("family {family:?} without a matching address"),
            });
        }
    };
    let prefix_len = mask.ok_or_else(|| NetlinkError::Invalid {
        what: "allowed ip",
        reason: format!("{ip} has no WGALLOWEDIP_A_CIDR_MASK"),
    })?;
    IpCidr::new(ip, prefix_len).ok_or_else(|| NetlinkError::Invalid {
        what: "allowed ip",
        reason: format!("prefix length {prefix_len} is too long for {ip}"),
    })
}

/// `struct sockaddr_in` / `sockaddr_in6` → a socket address (port and address big-endian).
fn parse_endpoint(value: &[u8]) -> Result<SocketAddr, NetlinkError> {
    if value.len() < 2 {
        return Err(NetlinkError::Truncated {
            what: "endpoint",
            needed: 2,
            seen: value.len(),
        });
    }
    let family = u16::from_ne_bytes([value[0], value[1]]);
    match (family, value.len()) {
        (AF_INET, length) if length >= 8 => {
            let port = u16::from_be_bytes([value[2], value[3]]);
            let ip = Ipv4Addr::new(value[4], value[5], value[6], value[7]);
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        (AF_INET6, length) if length >= 28 => {
            let port = u16::from_be_bytes([value[2], value[3]]);
            let flow = u32::from_be_bytes([value[4], value[5], value[6], value[7]]);
            let ip = Ipv6Addr::from(fixed::<16>(&value[8..24], "ipv6 endpoint")?);
            let scope = u32::from_ne_bytes([value[24], value[25], value[26], value[27]]);
            Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
        }
        (family, length) => Err(NetlinkError::Invalid {
            what: "endpoint",
            reason: format!("family {family} with {length} bytes"),
        }),
    }
}

fn endpoint_bytes(endpoint: SocketAddr) -> Vec<u8> {
    match endpoint {
        SocketAddr::V4(v4) => {
            let mut raw = vec![0u8; 16];
            raw[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
            raw[2..4].copy_from_slice(&v4.port().to_be_bytes());
            raw[4..8].copy_from_slice(&v4.ip().octets());
            raw
        }
        SocketAddr::V6(v6) => {
            let mut raw = vec![0u8; 28];
            raw[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
            raw[2..4].copy_from_slice(&v6.port().to_be_bytes());
            raw[4..8].copy_from_slice(&v6.flowinfo().to_be_bytes());
            raw[8..24].copy_from_slice(&v6.ip().octets());
            raw[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            raw
        }
    }
}

/// Bytes one allowed IP takes inside a peer (nested header + family + address + mask).
fn allowed_ip_bytes(network: &IpCidr) -> usize {
    let address = match network.address() {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    };
    4 + 8 + (4 + address) + 8
}

/// Bytes of a peer's fixed part (nested header, key, flags, preshared key, endpoint,
/// keepalive, allowed-IPs header) at most.
const PEER_FIXED_MAX_BYTES: usize = 4 + 36 + 8 + 36 + 32 + 8 + 4;

/// `WG_CMD_SET_DEVICE` messages for one update, in order: the private key and listen port in
/// the first, then the peer changes, a new message whenever the next peer (or allowed IP) would
/// pass [`SET_MESSAGE_MAX_BYTES`]. A peer's allowed IPs are replaced in the message that
/// carries its configuration; the ones that did not fit follow in the next message, added.
/// The preshared key is cleared (32 zero bytes), as Outpost never sets one.
pub fn set_device(family: u16, name: &str, update: &DeviceUpdate) -> Vec<MessageBuilder> {
    let mut messages = Vec::new();
    let mut message = start_set(family, name, 0);
    if let Some(key) = &update.private_key {
        message.attribute(WGDEVICE_A_PRIVATE_KEY, &key.to_bytes());
    }
    if let Some(port) = update.listen_port {
        message.attribute_u16(WGDEVICE_A_LISTEN_PORT, port);
    }
    let mut peers_open = false;
    for change in &update.peers {
        let needed = match change {
            PeerChange::Remove(_) => 4 + 36 + 8,
            PeerChange::Upsert(peer) => {
                PEER_FIXED_MAX_BYTES + peer.allowed_ips.first().map_or(0, allowed_ip_bytes)
            }
        };
        if message.len() + needed + 4 > SET_MESSAGE_MAX_BYTES && peers_open {
            message.end_nested();
            messages.push(std::mem::replace(
                &mut message,
                start_set(family, name, messages.len() + 1),
            ));
            peers_open = false;
        }
        if !peers_open {
            message.begin_nested(WGDEVICE_A_PEERS);
            peers_open = true;
        }
        match change {
            PeerChange::Remove(key) => {
                message.begin_nested(0);
                message.attribute(WGPEER_A_PUBLIC_KEY, &key.to_bytes());
                message.attribute_u32(WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME);
                message.end_nested();
            }
            PeerChange::Upsert(peer) => {
                let mut rest = write_peer(&mut message, peer, WGPEER_F_REPLACE_ALLOWEDIPS, true);
                while !rest.is_empty() {
                    message.end_nested();
                    messages.push(std::mem::replace(
                        &mut message,
                        start_set(family, name, messages.len() + 1),
                    ));
                    message.begin_nested(WGDEVICE_A_PEERS);
                    let continued = PeerConfig {
                        allowed_ips: rest,
                        ..peer.clone()
                    };
                    rest = write_peer(&mut message, &continued, 0, false);
                }
            }
        }
    }
    if peers_open {
        message.end_nested();
    }
    messages.push(message);
    messages
}

fn start_set(family: u16, name: &str, part: usize) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        if part == 0 {
            format!("WG_CMD_SET_DEVICE {name}")
        } else {
            format!("WG_CMD_SET_DEVICE {name} (part {})", part + 1)
        },
    );
    message.push_raw(&genl_header(WG_CMD_SET_DEVICE, WG_GENL_VERSION));
    message.attribute_string(WGDEVICE_A_IFNAME, name);
    message
}

/// Writes one peer with as many of its allowed IPs as fit; returns the ones that did not.
/// `full` writes the whole configuration (preshared key, endpoint, keepalive); a continuation
/// carries only the key and more allowed IPs.
fn write_peer(
    message: &mut MessageBuilder,
    peer: &PeerConfig,
    flags: u32,
    full: bool,
) -> Vec<IpCidr> {
    message.begin_nested(0);
    message.attribute(WGPEER_A_PUBLIC_KEY, &peer.public_key.to_bytes());
    message.attribute_u32(WGPEER_A_FLAGS, flags);
    if full {
        message.attribute(WGPEER_A_PRESHARED_KEY, &[0u8; KEY_BYTES]);
        if let Some(endpoint) = peer.endpoint {
            message.attribute(WGPEER_A_ENDPOINT, &endpoint_bytes(endpoint));
        }
        message.attribute_u16(
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
            peer.persistent_keepalive_secs,
        );
    }
    message.begin_nested(WGPEER_A_ALLOWEDIPS);
    let mut written = 0;
    for network in &peer.allowed_ips {
        // Room for this allowed IP and the three nested ends (allowed IPs, peer, peers).
        if written > 0 && message.len() + allowed_ip_bytes(network) + 12 > SET_MESSAGE_MAX_BYTES {
            break;
        }
        message.begin_nested(0);
        let (family, bytes) = match network.address() {
            IpAddr::V4(v4) => (AF_INET, v4.octets().to_vec()),
            IpAddr::V6(v6) => (AF_INET6, v6.octets().to_vec()),
        };
        message.attribute_u16(WGALLOWEDIP_A_FAMILY, family);
        message.attribute(WGALLOWEDIP_A_IPADDR, &bytes);
        message.attribute_u8(WGALLOWEDIP_A_CIDR_MASK, network.prefix_len());
        message.end_nested();
        written += 1;
    }
    message.end_nested();
    message.end_nested();
    peer.allowed_ips[written..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::super::parse_messages;
    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; KEY_BYTES])
    }

    fn peer(byte: u8, allowed: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(byte),
            endpoint: Some("10.231.0.2:51820".parse().unwrap()),
            allowed_ips: allowed.iter().map(|text| text.parse().unwrap()).collect(),
            persistent_keepalive_secs: 25,
        }
    }

    /// The payloads of `messages`, as the kernel would read them.
    fn payloads(messages: Vec<MessageBuilder>) -> Vec<Vec<u8>> {
        messages
            .into_iter()
            .map(|message| {
                let bytes = message.finish(1);
                assert!(
                    bytes.len() <= SET_MESSAGE_MAX_BYTES,
                    "{} bytes",
                    bytes.len()
                );
                parse_messages(&bytes).unwrap()[0].payload.to_vec()
            })
            .collect()
    }

    /// Reads set messages back as a device: the same attribute layout as a get answer (peer
    /// flags aside), so the fold checks what the kernel would be told.
    fn read_back(messages: Vec<MessageBuilder>) -> LiveDevice {
        let payloads = payloads(messages);
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        parse_device(&slices).unwrap()
    }

    #[test]
    fn the_family_lookup_names_wireguard_and_its_answer_gives_the_id() {
        let request = get_family(WG_GENL_NAME);
        assert_eq!(request.message_type(), GENL_ID_CTRL);
        let mut answer = MessageBuilder::new(GENL_ID_CTRL, 0, "answer");
        answer.push_raw(&genl_header(1, 2));
        answer.attribute_string(CTRL_ATTR_FAMILY_NAME, WG_GENL_NAME);
        answer.attribute_u16(CTRL_ATTR_FAMILY_ID, 0x1d);
        let bytes = answer.finish(1);
        let messages = parse_messages(&bytes).unwrap();
        assert_eq!(parse_family_id(messages[0].payload).unwrap(), 0x1d);
        let mut empty = MessageBuilder::new(GENL_ID_CTRL, 0, "answer");
        empty.push_raw(&genl_header(1, 2));
        let bytes = empty.finish(1);
        assert!(parse_family_id(parse_messages(&bytes).unwrap()[0].payload).is_err());
        assert!(get_device(0x1d, "outpost0").is_dump());
    }

    #[test]
    fn a_set_carries_key_port_removals_and_whole_peers() {
        let private = PrivateKey::from_bytes([3; KEY_BYTES]);
        let update = DeviceUpdate {
            private_key: Some(private.clone()),
            listen_port: Some(51820),
            peers: vec![
                PeerChange::Remove(key(5)),
                PeerChange::Upsert(peer(4, &["10.232.0.2/32", "fd00::/64"])),
            ],
        };
        let messages = set_device(0x1d, "outpost0", &update);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].flags(), NLM_F_REQUEST | NLM_F_ACK);
        let device = read_back(messages);
        assert_eq!(device.private_key, Some(private));
        assert_eq!(device.listen_port, 51820);
        assert_eq!(device.peers.len(), 2);
        let upserted = &device.peers[0];
        assert_eq!(upserted.public_key, key(4));
        assert_eq!(upserted.endpoint, Some("10.231.0.2:51820".parse().unwrap()));
        assert_eq!(upserted.persistent_keepalive_secs, 25);
        assert_eq!(upserted.has_preshared_key, PresharedKeyState::None);
        let allowed: Vec<String> = upserted
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(allowed, ["10.232.0.2/32", "fd00::/64"]);
        assert_eq!(device.peers[1].public_key, key(5));
    }

    #[test]
    fn the_flags_say_replace_for_upserts_and_remove_for_removals() {
        let update = DeviceUpdate {
            peers: vec![
                PeerChange::Remove(key(5)),
                PeerChange::Upsert(peer(4, &["10.232.0.2/32"])),
            ],
            ..DeviceUpdate::default()
        };
        let payloads = payloads(set_device(0x1d, "outpost0", &update));
        let (_, rest) = split_family_header(&payloads[0], GENL_HEADER_BYTES, "genl").unwrap();
        let mut flags = Vec::new();
        for attribute in attributes(rest) {
            let (kind, value) = attribute.unwrap();
            if kind == WGDEVICE_A_PEERS {
                for peer in attributes(value) {
                    for field in attributes(peer.unwrap().1) {
                        let (kind, value) = field.unwrap();
                        if kind == WGPEER_A_FLAGS {
                            flags.push(u32::from_ne_bytes(value.try_into().unwrap()));
                        }
                    }
                }
            }
        }
        assert_eq!(flags, [WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS]);
    }

    #[test]
    fn a_large_update_is_split_and_reads_back_whole() {
        // 300 peers, one of them with 400 allowed IPs: several messages, each within the page.
        let mut peers: Vec<PeerChange> = (0..300u16)
            .map(|index| {
                let mut config = peer((index % 250) as u8, &[]);
                config.public_key = PublicKey::from_bytes({
                    let mut bytes = [7u8; KEY_BYTES];
                    bytes[..2].copy_from_slice(&index.to_be_bytes());
                    bytes
                });
                config.allowed_ips = vec![IpCidr::host(IpAddr::V4(Ipv4Addr::new(
                    10,
                    232,
                    (index >> 8) as u8,
                    index as u8,
                )))];
                PeerChange::Upsert(config)
            })
            .collect();
        let wide: Vec<IpCidr> = (0..400u32)
            .map(|index| IpCidr::host(IpAddr::V4(Ipv4Addr::from(0x0a63_0000 + index))))
            .collect();
        peers.push(PeerChange::Upsert(PeerConfig {
            allowed_ips: wide.clone(),
            ..peer(251, &[])
        }));
        let update = DeviceUpdate {
            peers,
            ..DeviceUpdate::default()
        };
        let messages = set_device(0x1d, "outpost0", &update);
        assert!(messages.len() > 3, "{} messages", messages.len());
        assert!(messages[1].description.contains("part 2"));
        let device = read_back(messages);
        assert_eq!(device.peers.len(), 301);
        let wide_peer = device
            .peers
            .iter()
            .find(|p| p.public_key == key(251))
            .unwrap();
        assert_eq!(
            wide_peer.allowed_ips, wide,
            "continued allowed IPs are folded back"
        );
    }

    #[test]
    fn endpoints_of_both_families_round_trip() {
        for text in ["10.231.0.2:51820", "[fd00::2]:51821"] {
            let endpoint: SocketAddr = text.parse().unwrap();
            assert_eq!(parse_endpoint(&endpoint_bytes(endpoint)).unwrap(), endpoint);
        }
        assert!(parse_endpoint(&[2, 0, 1]).is_err());
        assert!(parse_endpoint(&[]).is_err());
    }

    #[test]
    fn a_get_answer_with_counters_and_handshake_is_read() {
        let mut answer = MessageBuilder::new(0x1d, 0, "answer");
        answer.push_raw(&genl_header(WG_CMD_GET_DEVICE, 1));
        answer.attribute_u16(WGDEVICE_A_LISTEN_PORT, 51820);
        answer.attribute(WGDEVICE_A_PRIVATE_KEY, &[0u8; KEY_BYTES]);
        answer.begin_nested(WGDEVICE_A_PEERS);
        answer.begin_nested(0);
        answer.attribute(WGPEER_A_PUBLIC_KEY, &key(9).to_bytes());
        answer.attribute(WGPEER_A_PRESHARED_KEY, &[1u8; KEY_BYTES]);
        let mut handshake = [0u8; 16];
        handshake[..8].copy_from_slice(&1_700_000_000i64.to_ne_bytes());
        answer.attribute(WGPEER_A_LAST_HANDSHAKE_TIME, &handshake);
        answer.attribute(WGPEER_A_RX_BYTES, &10u64.to_ne_bytes());
        answer.attribute(WGPEER_A_TX_BYTES, &20u64.to_ne_bytes());
        answer.end_nested();
        answer.end_nested();
        let bytes = answer.finish(1);
        let payload = parse_messages(&bytes).unwrap()[0].payload;
        let device = parse_device(&[payload]).unwrap();
        assert_eq!(device.private_key, None, "an all-zero key is no key");
        assert_eq!(device.listen_port, 51820);
        let peer = &device.peers[0];
        assert_eq!(peer.has_preshared_key, PresharedKeyState::Set);
        assert_eq!(peer.last_handshake_unix_secs, Some(1_700_000_000));
        assert_eq!((peer.rx_bytes, peer.tx_bytes), (10, 20));
        assert_eq!(peer.endpoint, None);
    }

    #[test]
    fn a_peer_without_a_key_is_an_error() {
        let mut answer = MessageBuilder::new(0x1d, 0, "answer");
        answer.push_raw(&genl_header(WG_CMD_GET_DEVICE, 1));
        answer.begin_nested(WGDEVICE_A_PEERS);
        answer.begin_nested(0);
        answer.attribute_u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, 5);
        answer.end_nested();
        answer.end_nested();
        let bytes = answer.finish(1);
        let payload = parse_messages(&bytes).unwrap()[0].payload;
        let error = parse_device(&[payload]).unwrap_err().to_string();
        assert!(error.contains("WGPEER_A_PUBLIC_KEY"), "{error}");
    }
}
