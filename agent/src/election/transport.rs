//! Election datagrams over UDP broadcast on the LAN: one socket bound to the election port,
//! sending to the broadcast address of every non-loopback IPv4 interface. Broadcast rather than
//! multicast, so it needs no multicast route; it stays on the local segments like mDNS.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use super::Message;

pub struct Transport {
    socket: UdpSocket,
    port: u16,
    join_secret: Option<String>,
}

/// The broadcast addresses of the non-loopback IPv4 interfaces.
pub fn broadcast_addresses() -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) if !v4.is_loopback() => v4.broadcast,
            _ => None,
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The first non-loopback IPv4 address of this host, to advertise control on.
pub fn first_lan_address() -> Option<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) if !v4.is_loopback() => Some(v4.ip),
            _ => None,
        })
        .collect();
    addresses.sort();
    addresses.first().copied()
}

impl Transport {
    pub fn bind(port: u16, join_secret: Option<String>) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        socket.set_broadcast(true)?;
        Ok(Self {
            socket,
            port,
            join_secret,
        })
    }

    /// Sends to every segment; an error names the address that failed.
    pub fn send(&self, message: &Message) -> Result<(), String> {
        let bytes = message.encode(self.join_secret.as_deref());
        let targets = broadcast_addresses();
        if targets.is_empty() {
            return Err(
                "no IPv4 interface with a broadcast address to send election messages on".into(),
            );
        }
        for address in targets {
            self.socket
                .send_to(&bytes, SocketAddrV4::new(address, self.port))
                .map_err(|e| format!("cannot send election message to {address}: {e}"))?;
        }
        Ok(())
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
