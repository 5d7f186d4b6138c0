//! The interface's state, addresses and routes through the `ip` command (iproute2): pure parsers
//! of `ip -o` output and a thin runner. A first version; netlink would avoid the dependency on
//! iproute2 being installed.

use std::net::IpAddr;
use std::time::Duration;

use super::WireguardError;
use super::cidr::IpCidr;
use super::command::run_command;
use super::device::{LinkChanges, LinkState, LinkUp};
use super::spec::InterfaceName;

/// The `ip` program, found on `PATH`.
pub const IP_PROGRAM: &str = "ip";

/// Reads the interface's up flag, addresses and routes.
pub fn read_link(
    interface: &InterfaceName,
    timeout: Duration,
) -> Result<LinkState, WireguardError> {
    let name = interface.as_str();
    let link_text = ip(&["-o", "link", "show", "dev", name], timeout)?;
    let address_text = ip(&["-o", "addr", "show", "dev", name], timeout)?;
    let v4_routes = ip(&["-o", "-4", "route", "show", "dev", name], timeout)?;
    let v6_routes = ip(&["-o", "-6", "route", "show", "dev", name], timeout)?;
    let mut routes = parse_routes(&v4_routes, IpFamily::V4)?;
    routes.extend(parse_routes(&v6_routes, IpFamily::V6)?);
    Ok(LinkState {
        up: parse_link_up(&link_text)?,
        addresses: parse_addresses(&address_text)?,
        routes,
    })
}

/// Applies link changes: removals first, then the link up, addresses, routes.
pub fn update_link(
    interface: &InterfaceName,
    changes: &LinkChanges,
    timeout: Duration,
) -> Result<(), WireguardError> {
    let name = interface.as_str();
    for route in &changes.routes_to_remove {
        ip(&["route", "del", &route.to_string(), "dev", name], timeout)?;
    }
    for address in &changes.addresses_to_remove {
        ip(&["addr", "del", &address.to_string(), "dev", name], timeout)?;
    }
    match changes.bring_up {
        Some(LinkUp::Up) => {
            ip(&["link", "set", "dev", name, "up"], timeout)?;
        }
        Some(LinkUp::Down) => {
            ip(&["link", "set", "dev", name, "down"], timeout)?;
        }
        None => {}
    }
    for address in &changes.addresses_to_add {
        ip(&["addr", "add", &address.to_string(), "dev", name], timeout)?;
    }
    for route in &changes.routes_to_add {
        ip(
            &["route", "replace", &route.to_string(), "dev", name],
            timeout,
        )?;
    }
    Ok(())
}

fn ip(args: &[&str], timeout: Duration) -> Result<String, WireguardError> {
    let output = run_command(IP_PROGRAM, args, None, timeout)?;
    String::from_utf8(output).map_err(|_| WireguardError::Parse {
        source_name: format!("ip {}", args.join(" ")),
        reason: "output is not UTF-8".to_string(),
    })
}

fn parse_error(what: &str, line: &str, reason: &str) -> WireguardError {
    WireguardError::Parse {
        source_name: what.to_string(),
        reason: format!(
            "{reason} in line {:?}",
            line.chars().take(200).collect::<String>()
        ),
    }
}

/// `5: outpost0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 …` → up when the flags hold `UP`.
pub fn parse_link_up(text: &str) -> Result<LinkUp, WireguardError> {
    let line = text.lines().next().unwrap_or_default();
    let flags = line
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags)
        .ok_or_else(|| parse_error("ip link show", line, "no <FLAGS>"))?;
    Ok(if flags.split(',').any(|flag| flag == "UP") {
        LinkUp::Up
    } else {
        LinkUp::Down
    })
}

/// Addresses from `ip -o addr show dev X`; IPv6 link-local addresses (made by the kernel) are
/// left out.
pub fn parse_addresses(text: &str) -> Result<Vec<IpCidr>, WireguardError> {
    let mut addresses = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(family) = words.find(|word| *word == "inet" || *word == "inet6") else {
            continue;
        };
        let cidr_text = words
            .next()
            .ok_or_else(|| parse_error("ip addr show", line, "no address after the family"))?;
        let address: IpCidr = cidr_text
            .parse()
            .map_err(|_| parse_error("ip addr show", line, "the address is not ADDRESS/PREFIX"))?;
        let link_local =
            matches!(address.address(), IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if family == "inet6" && link_local {
            continue;
        }
        addresses.push(address);
    }
    Ok(addresses)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

const ROUTE_TYPES: [&str; 10] = [
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "unreachable",
    "blackhole",
    "prohibit",
    "throw",
    "nat",
    "anycast",
];

/// Unicast routes from `ip -o -4|-6 route show dev X`, without the kernel-made ones (`proto
/// kernel`, the address's own network and IPv6 link-local).
pub fn parse_routes(text: &str, family: IpFamily) -> Result<Vec<IpCidr>, WireguardError> {
    let mut routes = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = words.first() else {
            continue;
        };
        if words.windows(2).any(|pair| pair == ["proto", "kernel"]) {
            continue;
        }
        let destination = if ROUTE_TYPES.contains(first) {
            if *first != "unicast" {
                continue;
            }
            words
                .get(1)
                .ok_or_else(|| parse_error("ip route show", line, "no destination"))?
        } else {
            first
        };
        let route = match (*destination, family) {
            ("default", IpFamily::V4) => IpCidr::new(IpAddr::from([0u8; 4]), 0),
            ("default", IpFamily::V6) => IpCidr::new(IpAddr::from([0u16; 8]), 0),
            (text, _) if text.contains('/') => text.parse().ok(),
            (text, _) => text.parse::<IpAddr>().ok().map(IpCidr::host),
        }
        .ok_or_else(|| parse_error("ip route show", line, "the destination is not a network"))?;
        routes.push(route.network());
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_flags() {
        let up = "5: outpost0: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1420 qdisc fq state UNKNOWN";
        assert_eq!(parse_link_up(up).unwrap(), LinkUp::Up);
        let down = "5: outpost0: <POINTOPOINT,MULTICAST,NOARP> mtu 1420 qdisc noop state DOWN";
        assert_eq!(parse_link_up(down).unwrap(), LinkUp::Down);
        assert!(parse_link_up("garbage").is_err());
    }

    #[test]
    fn addresses_skip_link_local() {
        let text = "5: outpost0    inet 10.232.0.1/24 scope global outpost0\\       valid_lft forever preferred_lft forever\n\
                    5: outpost0    inet6 fd00::1/64 scope global \\       valid_lft forever preferred_lft forever\n\
                    5: outpost0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n";
        let addresses: Vec<String> = parse_addresses(text)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.232.0.1/24", "fd00::1/64"]);
        assert!(parse_addresses("5: x    inet nonsense scope global").is_err());
    }

    #[test]
    fn routes_skip_kernel_and_non_unicast() {
        let v4 = "10.232.0.0/24 proto kernel scope link src 10.232.0.1 \n\
                  10.99.0.0/24 scope link \n\
                  10.98.0.7 scope link \n\
                  default scope link \n\
                  blackhole 10.5.0.0/16 \n";
        let routes: Vec<String> = parse_routes(v4, IpFamily::V4)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(routes, ["10.99.0.0/24", "10.98.0.7/32", "0.0.0.0/0"]);
        let v6 =
            "fe80::/64 proto kernel metric 256 pref medium\nfd00:9::/64 metric 1024 pref medium\n";
        let routes: Vec<String> = parse_routes(v6, IpFamily::V6)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(routes, ["fd00:9::/64"]);
        assert!(parse_routes("what/ever scope link", IpFamily::V4).is_err());
    }
}
