//! rtnetlink messages, sans-IO: links (get by name, create with a kind, delete, set up or down),
//! addresses (dump, add, delete) and routes (dump, replace, delete), and the parsers of the
//! kernel's answers. Only what the overlay needs: one interface, its addresses, and unicast
//! routes of the main table that point at it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    MessageBuilder, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkError, attributes, fixed, read_u32, split_family_header, string,
};
use crate::apply::wireguard::cidr::IpCidr;
use crate::apply::wireguard::device::LinkUp;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `struct ifinfomsg`.
const IFINFOMSG_BYTES: usize = 16;
/// `struct ifaddrmsg`.
const IFADDRMSG_BYTES: usize = 8;
/// `struct rtmsg`.
const RTMSG_BYTES: usize = 12;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_KERNEL: u8 = 2;
/// What `ip route add` records as the route's origin.
pub const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_NOWHERE: u8 = 255;
pub const RTN_UNICAST: u8 = 1;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub up: LinkUp,
    /// `IFLA_INFO_KIND` (`wireguard`, `veth`, …); `None` for links without one (loopback, tun
    /// devices of userspace daemons).
    pub kind: Option<String>,
}

/// `RTM_GETLINK` for one interface by name (the kernel answers `ENODEV` when there is none).
pub fn get_link(name: &str) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        RTM_GETLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        format!("RTM_GETLINK {name}"),
    );
    message.push_raw(&ifinfomsg(0, 0, 0));
    message.attribute_string(IFLA_IFNAME, name);
    message
}

/// `RTM_NEWLINK` creating `name` of `kind` (`ip link add dev NAME type KIND`); `EEXIST` when
/// it is there.
pub fn new_link(name: &str, kind: &str) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        format!("RTM_NEWLINK {name} type {kind}"),
    );
    message.push_raw(&ifinfomsg(0, 0, 0));
    message.attribute_string(IFLA_IFNAME, name);
    message.begin_nested(IFLA_LINKINFO);
    message.attribute_string(IFLA_INFO_KIND, kind);
    message.end_nested();
    message
}

/// `RTM_DELLINK` by index.
pub fn delete_link(index: u32, name: &str) -> MessageBuilder {
    let mut message = MessageBuilder::new(
        RTM_DELLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        format!("RTM_DELLINK {name}"),
    );
    message.push_raw(&ifinfomsg(index, 0, 0));
    message
}

/// `RTM_NEWLINK` changing only the up flag of an existing link.
pub fn set_link_up(index: u32, name: &str, up: LinkUp) -> MessageBuilder {
    let flags = match up {
        LinkUp::Up => IFF_UP,
        LinkUp::Down => 0,
    };
    let mut message = MessageBuilder::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        format!("RTM_NEWLINK {name} {up:?}"),
    );
    message.push_raw(&ifinfomsg(index, flags, IFF_UP));
    message
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_BYTES] {
    let mut raw = [0u8; IFINFOMSG_BYTES];
    raw[0] = AF_UNSPEC;
    raw[4..8].copy_from_slice(&index.to_ne_bytes());
    raw[8..12].copy_from_slice(&flags.to_ne_bytes());
    raw[12..16].copy_from_slice(&change.to_ne_bytes());
    raw
}

/// Parses an `RTM_NEWLINK` answer.
pub fn parse_link(payload: &[u8]) -> Result<LinkInfo, NetlinkError> {
    let (header, rest) = split_family_header(payload, IFINFOMSG_BYTES, "ifinfomsg")?;
    let index = read_u32(header, 4);
    let flags = read_u32(header, 8);
    let mut link = LinkInfo {
        index,
        name: String::new(),
        up: if flags & IFF_UP != 0 {
            LinkUp::Up
        } else {
            LinkUp::Down
        },
        kind: None,
    };
    for attribute in attributes(rest) {
        let (kind, value) = attribute?;
        match kind {
            IFLA_IFNAME => link.name = string(value, "IFLA_IFNAME")?,
            IFLA_LINKINFO => {
                for inner in attributes(value) {
                    let (inner_kind, inner_value) = inner?;
                    if inner_kind == IFLA_INFO_KIND {
                        link.kind = Some(string(inner_value, "IFLA_INFO_KIND")?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

/// `RTM_GETADDR` dump of every address (filtered by interface index after parsing).
pub fn dump_addresses() -> MessageBuilder {
    let mut message = MessageBuilder::new(
        RTM_GETADDR,
        NLM_F_REQUEST | NLM_F_DUMP,
        "RTM_GETADDR dump".to_string(),
    );
    message.push_raw(&ifaddrmsg(AF_UNSPEC, 0, 0, 0));
    message
}

/// Add or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

/// `RTM_NEWADDR` / `RTM_DELADDR` of `address` on interface `index` (`ip addr add|del`).
pub fn change_address(index: u32, name: &str, address: IpCidr, change: Change) -> MessageBuilder {
    let (message_type, flags, verb) = match change {
        Change::Add => (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            "RTM_NEWADDR",
        ),
        Change::Remove => (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, "RTM_DELADDR"),
    };
    let mut message =
        MessageBuilder::new(message_type, flags, format!("{verb} {address} on {name}"));
    message.push_raw(&ifaddrmsg(
        family_of(address.address()),
        address.prefix_len(),
        RT_SCOPE_UNIVERSE,
        index,
    ));
    let bytes = address_bytes(address.address());
    message.attribute(IFA_LOCAL, &bytes);
    message.attribute(IFA_ADDRESS, &bytes);
    message
}

fn ifaddrmsg(family: u8, prefix_len: u8, scope: u8, index: u32) -> [u8; IFADDRMSG_BYTES] {
    let mut raw = [0u8; IFADDRMSG_BYTES];
    raw[0] = family;
    raw[1] = prefix_len;
    raw[3] = scope;
    raw[4..8].copy_from_slice(&index.to_ne_bytes());
    raw
}

/// An address as the kernel reports it: the interface index and the address with its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressEntry {
    pub index: u32,
    pub address: IpCidr,
}

/// Parses an `RTM_NEWADDR` answer. `IFA_LOCAL` is the interface's own address where present
/// (IPv4), `IFA_ADDRESS` otherwise (IPv6). `None` for families other than IPv4 and IPv6.
pub fn parse_address(payload: &[u8]) -> Result<Option<AddressEntry>, NetlinkError> {
    let (header, rest) = split_family_header(payload, IFADDRMSG_BYTES, "ifaddrmsg")?;
    let (family, prefix_len, index) = (header[0], header[1], read_u32(header, 4));
    let mut local = None;
    let mut address = None;
    for attribute in attributes(rest) {
        let (kind, value) = attribute?;
        match kind {
            IFA_LOCAL => local = Some(parse_ip(family, value, "IFA_LOCAL")?),
            IFA_ADDRESS => address = Some(parse_ip(family, value, "IFA_ADDRESS")?),
            _ => {}
        }
    }
    let Some(ip) = local.or(address).flatten() else {
        return Ok(None);
    };
    let cidr = IpCidr::new(ip, prefix_len).ok_or_else(|| NetlinkError::Invalid {
        what: "ifaddrmsg",
        reason: format!("prefix length {prefix_len} is too long for {ip}"),
    })?;
    Ok(Some(AddressEntry {
        index,
        address: cidr,
    }))
}

/// The addresses of interface `index`, without IPv6 link-local ones (the kernel makes those).
pub fn addresses_of(entries: &[AddressEntry], index: u32) -> Vec<IpCidr> {
    entries
        .iter()
        .filter(|entry| entry.index == index)
        .map(|entry| entry.address)
        .filter(|address| !is_ipv6_link_local(address.address()))
        .collect()
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `RTM_GETROUTE` dump of one family's routes.
pub fn dump_routes(ipv6: bool) -> MessageBuilder {
    let family = if ipv6 { AF_INET6 } else { AF_INET };
    let mut message = MessageBuilder::new(
        RTM_GETROUTE,
        NLM_F_REQUEST | NLM_F_DUMP,
        format!("RTM_GETROUTE dump (family {family})"),
    );
    message.push_raw(&rtmsg(family, 0, 0, 0, 0, 0));
    message
}

/// `RTM_NEWROUTE` (create or replace) / `RTM_DELROUTE` of `network` through interface `index`
/// in the main table, as `ip route replace|del NETWORK dev NAME` sends it.
pub fn change_route(index: u32, name: &str, network: IpCidr, change: Change) -> MessageBuilder {
    let network = network.network();
    let family = family_of(network.address());
    let (message_type, flags, protocol, scope, verb) = match change {
        Change::Add => (
            RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            RTPROT_BOOT,
            RT_SCOPE_LINK,
            "RTM_NEWROUTE",
        ),
        Change::Remove => (
            RTM_DELROUTE,
            NLM_F_REQUEST | NLM_F_ACK,
            0,
            RT_SCOPE_NOWHERE,
            "RTM_DELROUTE",
        ),
    };
    let mut message =
        MessageBuilder::new(message_type, flags, format!("{verb} {network} dev {name}"));
    message.push_raw(&rtmsg(
        family,
        network.prefix_len(),
        RT_TABLE_MAIN,
        protocol,
        scope,
        RTN_UNICAST,
    ));
    if network.prefix_len() > 0 {
        message.attribute(RTA_DST, &address_bytes(network.address()));
    }
    message.attribute_u32(RTA_OIF, index);
    message
}

fn rtmsg(
    family: u8,
    dst_len: u8,
    table: u8,
    protocol: u8,
    scope: u8,
    kind: u8,
) -> [u8; RTMSG_BYTES] {
    let mut raw = [0u8; RTMSG_BYTES];
    raw[0] = family;
    raw[1] = dst_len;
    raw[4] = table;
    raw[5] = protocol;
    raw[6] = scope;
    raw[7] = kind;
    raw
}

/// A route as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry {
    pub destination: IpCidr,
    pub table: u32,
    pub protocol: u8,
    pub kind: u8,
    /// The output interface; `None` for routes without one (multipath, blackhole).
    pub output_index: Option<u32>,
}

/// Parses an `RTM_NEWROUTE` answer; `None` for families other than IPv4 and IPv6.
pub fn parse_route(payload: &[u8]) -> Result<Option<RouteEntry>, NetlinkError> {
    let (header, rest) = split_family_header(payload, RTMSG_BYTES, "rtmsg")?;
    let (family, dst_len) = (header[0], header[1]);
    let mut table = u32::from(header[4]);
    let (protocol, kind) = (header[5], header[7]);
    let unspecified = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AF_INET6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return Ok(None),
    };
    let mut destination = unspecified;
    let mut output_index = None;
    for attribute in attributes(rest) {
        let (attribute_kind, value) = attribute?;
        match attribute_kind {
            RTA_DST => {
                if let Some(ip) = parse_ip(family, value, "RTA_DST")? {
                    destination = ip;
                }
            }
            RTA_OIF => output_index = Some(u32::from_ne_bytes(fixed(value, "RTA_OIF")?)),
            RTA_TABLE => table = u32::from_ne_bytes(fixed(value, "RTA_TABLE")?),
            _ => {}
        }
    }
    let destination = IpCidr::new(destination, dst_len).ok_or_else(|| NetlinkError::Invalid {
        what: "rtmsg",
        reason: format!("prefix length {dst_len} is too long for {destination}"),
    })?;
    Ok(Some(RouteEntry {
        destination: destination.network(),
        table,
        protocol,
        kind,
        output_index,
    }))
}

/// The routes the overlay manages on interface `index`: unicast routes of the main table
/// through it, without the kernel-made ones (an address's own network, IPv6 link-local), the
/// same set `ip route show dev NAME` lists minus `proto kernel`.
pub fn routes_of(entries: &[RouteEntry], index: u32) -> Vec<IpCidr> {
    entries
        .iter()
        .filter(|route| route.output_index == Some(index))
        .filter(|route| route.table == u32::from(RT_TABLE_MAIN))
        .filter(|route| route.kind == RTN_UNICAST && route.protocol != RTPROT_KERNEL)
        .map(|route| route.destination)
        .collect()
}

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn address_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn parse_ip(family: u8, value: &[u8], what: &'static str) -> Result<Option<IpAddr>, NetlinkError> {
    Ok(match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(fixed::<4>(value, what)?))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(fixed::<16>(value, what)?))),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{NLM_F_MULTI, attributes, parse_messages, read_u16};
    use super::*;

    fn cidr(text: &str) -> IpCidr {
        text.parse().unwrap()
    }

    /// The payload of the single message `builder` makes.
    fn payload(builder: MessageBuilder) -> Vec<u8> {
        let bytes = builder.finish(1);
        parse_messages(&bytes).unwrap()[0].payload.to_vec()
    }

    #[test]
    fn get_link_asks_by_name_and_new_link_names_the_kind() {
        let request = get_link("outpost0");
        assert_eq!(request.message_type(), RTM_GETLINK);
        assert!(!request.is_dump());
        let body = payload(request);
        let found: Vec<(u16, Vec<u8>)> = attributes(&body[IFINFOMSG_BYTES..])
            .map(|a| a.map(|(k, v)| (k, v.to_vec())).unwrap())
            .collect();
        assert_eq!(found, [(IFLA_IFNAME, b"outpost0\0".to_vec())]);

        let request = new_link("outpost0", "wireguard");
        assert_eq!(
            request.flags(),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        // The kernel's answer to a get has the same shape: parse the request as one.
        let link = parse_link(&payload(request)).unwrap();
        assert_eq!(link.name, "outpost0");
        assert_eq!(link.kind.as_deref(), Some("wireguard"));
        assert_eq!(link.up, LinkUp::Down);
    }

    #[test]
    fn setting_a_link_up_changes_only_the_up_flag() {
        let body = payload(set_link_up(7, "outpost0", LinkUp::Up));
        assert_eq!(read_u32(&body, 4), 7, "index");
        assert_eq!(read_u32(&body, 8), IFF_UP, "flags");
        assert_eq!(read_u32(&body, 12), IFF_UP, "change mask");
        let link = parse_link(&body).unwrap();
        assert_eq!((link.index, link.up), (7, LinkUp::Up));
        let body = payload(set_link_up(7, "outpost0", LinkUp::Down));
        assert_eq!(read_u32(&body, 8), 0);
        assert_eq!(read_u32(&body, 12), IFF_UP);
        let body = payload(delete_link(9, "outpost0"));
        assert_eq!(read_u32(&body, 4), 9);
    }

    #[test]
    fn addresses_round_trip_and_link_local_is_left_out() {
        for text in ["10.232.0.1/24", "fd00::7/64"] {
            let request = change_address(5, "outpost0", cidr(text), Change::Add);
            assert_eq!(request.message_type(), RTM_NEWADDR);
            let entry = parse_address(&payload(request)).unwrap().unwrap();
            assert_eq!(entry.index, 5);
            assert_eq!(entry.address, cidr(text), "host bits are kept");
        }
        let removal = change_address(5, "outpost0", cidr("10.232.0.1/24"), Change::Remove);
        assert_eq!(removal.message_type(), RTM_DELADDR);
        assert_eq!(removal.flags(), NLM_F_REQUEST | NLM_F_ACK);
        let entries = [
            AddressEntry {
                index: 5,
                address: cidr("10.232.0.1/24"),
            },
            AddressEntry {
                index: 5,
                address: cidr("fe80::1/64"),
            },
            AddressEntry {
                index: 6,
                address: cidr("10.1.0.1/24"),
            },
        ];
        assert_eq!(addresses_of(&entries, 5), [cidr("10.232.0.1/24")]);
        assert!(dump_addresses().is_dump());
    }

    #[test]
    fn routes_round_trip_and_only_managed_ones_are_listed() {
        let request = change_route(5, "outpost0", cidr("10.99.0.7/24"), Change::Add);
        assert_eq!(
            request.flags(),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        let entry = parse_route(&payload(request)).unwrap().unwrap();
        assert_eq!(entry.destination, cidr("10.99.0.0/24"), "host bits cleared");
        assert_eq!(entry.output_index, Some(5));
        assert_eq!(
            (entry.table, entry.protocol, entry.kind),
            (254, RTPROT_BOOT, RTN_UNICAST)
        );
        let default = parse_route(&payload(change_route(
            5,
            "outpost0",
            cidr("::/0"),
            Change::Remove,
        )))
        .unwrap()
        .unwrap();
        assert_eq!(default.destination, cidr("::/0"));
        let mut kernel_made = entry;
        kernel_made.protocol = RTPROT_KERNEL;
        let mut other_table = entry;
        other_table.table = 255;
        let mut other_link = entry;
        other_link.output_index = Some(6);
        let mut blackhole = entry;
        blackhole.kind = 6;
        blackhole.output_index = None;
        assert_eq!(
            routes_of(
                &[
                    entry,
                    kernel_made,
                    other_table,
                    other_link,
                    blackhole,
                    default
                ],
                5
            ),
            [cidr("10.99.0.0/24"), cidr("::/0")]
        );
        assert!(dump_routes(false).is_dump());
        assert_eq!(
            read_u16(&dump_routes(true).finish(1), 6),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_ne!(NLM_F_MULTI, 0);
    }

    #[test]
    fn bad_answers_are_errors_naming_the_field() {
        assert!(parse_link(&[0; 4]).is_err());
        let mut body = payload(change_address(5, "x", cidr("10.0.0.1/24"), Change::Add));
        body[1] = 40; // prefix length past /32
        let error = parse_address(&body).unwrap_err().to_string();
        assert!(error.contains("prefix length 40"), "{error}");
        let mut body = payload(change_route(5, "x", cidr("10.0.0.0/8"), Change::Add));
        body[0] = 99; // another family: not ours
        assert_eq!(parse_route(&body).unwrap(), None);
    }
}
