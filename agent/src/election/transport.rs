//! Election datagrams over UDP multicast on the LAN (group [`ELECTION_GROUP`], link-local
//! scope, TTL 1): one socket bound to the election port, joined to the group and sending on
//! every LAN IPv4 interface (not loopback, not point-to-point), so it needs no multicast route
//! and stays on the local segments like mDNS. Point-to-point links are no LAN: the WireGuard
//! overlay (kernel WireGuard refuses the datagram: "Required key not available"), PPP and
//! cellular uplinks.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::Message;

/// The administratively scoped group election datagrams go to.
pub const ELECTION_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 46);

pub struct Transport {
    socket: UdpSocket,
    port: u16,
    join_secret: Option<String>,
}

/// The IPv4 address of an interface that is on a LAN segment.
fn lan_address(interface: &if_addrs::Interface) -> Option<Ipv4Addr> {
    match &interface.addr {
        if_addrs::IfAddr::V4(v4) if !v4.is_loopback() && !interface.is_p2p => Some(v4.ip),
        _ => None,
    }
}

/// The IPv4 addresses of this host's LAN interfaces, sorted.
pub fn lan_addresses() -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .iter()
        .filter_map(lan_address)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The first LAN IPv4 address of this host, to advertise control on (never the overlay's).
pub fn first_lan_address() -> Option<Ipv4Addr> {
    lan_addresses().first().copied()
}

impl Transport {
    pub fn bind(port: u16, join_secret: Option<String>) -> std::io::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.set_multicast_loop_v4(false)?;
        socket.set_multicast_ttl_v4(1)?;
        socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
        let transport = Self {
            socket: socket.into(),
            port,
            join_secret,
        };
        transport.join_all();
        Ok(transport)
    }

    /// Joins the group on every LAN interface (again: interfaces may appear after boot).
    fn join_all(&self) {
        for address in lan_addresses() {
            let _ = self.socket.join_multicast_v4(&ELECTION_GROUP, &address);
        }
    }

    /// Sends on every LAN interface; an error names the interface address that failed.
    pub fn send(&self, message: &Message) -> Result<(), String> {
        let bytes = message.encode(self.join_secret.as_deref());
        let addresses = lan_addresses();
        if addresses.is_empty() {
            return Err("no LAN IPv4 interface to send election messages on".into());
        }
        self.join_all();
        let socket = socket2::SockRef::from(&self.socket);
        let mut errors = Vec::new();
        for address in addresses {
            let sent = socket.set_multicast_if_v4(&address).and_then(|()| {
                self.socket
                    .send_to(&bytes, SocketAddrV4::new(ELECTION_GROUP, self.port))
            });
            if let Err(error) = sent {
                errors.push(format!(
                    "cannot send election message on {address}: {error}"
                ));
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    }

    /// Waits up to `timeout` for one datagram: `None` when none came.
    pub fn receive(&self, timeout: Duration) -> Option<Result<Message, String>> {
        let _ = self
            .socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))));
        let mut buffer = [0u8; super::MESSAGE_MAX_BYTES + 1];
        match self.socket.recv_from(&mut buffer) {
            Ok((length, from)) => Some(
                Message::parse(&buffer[..length], self.join_secret.as_deref())
                    .map_err(|e| format!("{e} (from {from})")),
            ),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(name: &str, ip: [u8; 4], is_p2p: bool) -> if_addrs::Interface {
        if_addrs::Interface {
            name: name.into(),
            addr: if_addrs::IfAddr::V4(if_addrs::Ifv4Addr {
                ip: Ipv4Addr::from(ip),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                prefixlen: 24,
                broadcast: None,
            }),
            index: Some(1),
            oper_status: if_addrs::IfOperStatus::Up,
            is_p2p,
        }
    }

    #[test]
    fn the_lan_is_neither_loopback_nor_a_point_to_point_link() {
        assert_eq!(
            lan_address(&interface("eth0", [192, 168, 1, 5], false)),
            Some(Ipv4Addr::new(192, 168, 1, 5))
        );
        // The WireGuard overlay (and PPP) is point-to-point: no election there.
        assert_eq!(
            lan_address(&interface("outpost0", [10, 99, 0, 2], true)),
            None
        );
        assert_eq!(lan_address(&interface("lo", [127, 0, 0, 1], false)), None);
    }
}
