//! The interface's state, addresses and routes over rtnetlink (`netlink::route`): no `ip`
//! command. Used by both backends (the kernel device and a userspace daemon's tun device).

use std::time::Duration;

use super::WireguardError;
use super::cidr::IpCidr;
use super::device::{LinkChanges, LinkState};
use super::netlink::NetlinkError;
use super::netlink::route::{self, Change, LinkInfo};
use super::netlink::socket::{Bus, NetlinkSocket};
use super::spec::InterfaceName;

/// `ENODEV`: no such interface.
const ENODEV: i32 = 19;

/// An rtnetlink socket for one round of reads or changes.
pub fn route_socket(timeout: Duration) -> Result<NetlinkSocket, WireguardError> {
    Ok(NetlinkSocket::open(Bus::Route, timeout)?)
}

/// The link called `name`, or `None` when there is none.
pub fn find_link(
    socket: &mut NetlinkSocket,
    name: &str,
) -> Result<Option<LinkInfo>, WireguardError> {
    match socket.request(route::get_link(name)) {
        Ok(answers) => match answers.first() {
            Some(payload) => Ok(Some(route::parse_link(payload)?)),
            None => Ok(None),
        },
        Err(error) if error.errno() == Some(ENODEV) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn require_link(
    socket: &mut NetlinkSocket,
    interface: &InterfaceName,
) -> Result<LinkInfo, WireguardError> {
    find_link(socket, interface.as_str())?.ok_or_else(|| WireguardError::DeviceAbsent {
        interface: interface.to_string(),
    })
}

/// Reads the interface's up flag, addresses and routes.
pub fn read_link(
    interface: &InterfaceName,
    timeout: Duration,
) -> Result<LinkState, WireguardError> {
    let mut socket = route_socket(timeout)?;
    let link = require_link(&mut socket, interface)?;
    let addresses = parse_all(
        socket.request(route::dump_addresses())?,
        route::parse_address,
    )?;
    let mut routes = parse_all(
        socket.request(route::dump_routes(false))?,
        route::parse_route,
    )?;
    routes.extend(parse_all(
        socket.request(route::dump_routes(true))?,
        route::parse_route,
    )?);
    Ok(LinkState {
        up: link.up,
        addresses: route::addresses_of(&addresses, link.index),
        routes: route::routes_of(&routes, link.index),
    })
}

fn parse_all<T>(
    payloads: Vec<Vec<u8>>,
    parse: fn(&[u8]) -> Result<Option<T>, NetlinkError>,
) -> Result<Vec<T>, NetlinkError> {
    let mut parsed = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        if let Some(item) = parse(payload)? {
            parsed.push(item);
        }
    }
    Ok(parsed)
}

/// Applies link changes: removals first, then the link up, addresses, routes.
pub fn update_link(
    interface: &InterfaceName,
    changes: &LinkChanges,
    timeout: Duration,
) -> Result<(), WireguardError> {
    let mut socket = route_socket(timeout)?;
    let link = require_link(&mut socket, interface)?;
    let (index, name) = (link.index, interface.as_str());
    for network in &changes.routes_to_remove {
        socket.request(route::change_route(index, name, *network, Change::Remove))?;
    }
    for address in &changes.addresses_to_remove {
        socket.request(route::change_address(index, name, *address, Change::Remove))?;
    }
    if let Some(up) = changes.bring_up {
        socket.request(route::set_link_up(index, name, up))?;
    }
    for address in &changes.addresses_to_add {
        add_address(&mut socket, index, name, *address)?;
    }
    for network in &changes.routes_to_add {
        socket.request(route::change_route(index, name, *network, Change::Add))?;
    }
    Ok(())
}

/// `EEXIST` from the kernel: the address is there already (a read raced with another writer).
const EEXIST: i32 = 17;

fn add_address(
    socket: &mut NetlinkSocket,
    index: u32,
    name: &str,
    address: IpCidr,
) -> Result<(), WireguardError> {
    match socket.request(route::change_address(index, name, address, Change::Add)) {
        Err(error) if error.errno() == Some(EEXIST) => Ok(()),
        other => other.map(|_| ()).map_err(Into::into),
    }
}

/// Creates link `name` of `kind` (`ip link add dev NAME type KIND`).
pub fn create_link(name: &str, kind: &str, timeout: Duration) -> Result<(), WireguardError> {
    route_socket(timeout)?.request(route::new_link(name, kind))?;
    Ok(())
}

/// Deletes link `name`; absent is fine.
pub fn delete_link(name: &str, timeout: Duration) -> Result<(), WireguardError> {
    let mut socket = route_socket(timeout)?;
    if let Some(link) = find_link(&mut socket, name)? {
        match socket.request(route::delete_link(link.index, name)) {
            Err(error) if error.errno() == Some(ENODEV) => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}
