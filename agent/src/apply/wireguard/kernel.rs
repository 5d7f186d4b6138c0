//! The kernel backend, for hosts with the wireguard module: the device is an `ip link` of type
//! wireguard, configured with the `wg` tool (wireguard-tools). `wg show IFACE dump` is parsed by
//! a pure function; `wg set` takes the changes. Like the `ip` command this is a first version;
//! generic netlink would drop the dependency on wireguard-tools. `wg` also drives userspace
//! devices, which is how the tests exercise this code on hosts without the module.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::WireguardError;
use super::backend::{DeviceReadiness, WireguardBackend};
use super::cidr::IpCidr;
use super::command::{CommandError, run_command};
use super::device::{
    DeviceUpdate, LinkChanges, LinkState, LiveDevice, LivePeer, PeerChange, PresharedKeyState,
};
use super::diff::UpdateStyle;
use super::key::{PrivateKey, PublicKey};
use super::link::{self, IP_PROGRAM};
use super::spec::InterfaceName;

pub const WG_PROGRAM: &str = "wg";

#[derive(Debug, Clone)]
pub struct KernelBackend {
    /// Deadline of each `ip` and `wg` command.
    pub command_timeout: Duration,
}

impl KernelBackend {
    pub fn new(command_timeout: Duration) -> Self {
        Self { command_timeout }
    }

    /// `Some(details)` of `ip -d -o link show dev X`, `None` when there is no such link.
    fn link_details(&self, interface: &InterfaceName) -> Result<Option<String>, WireguardError> {
        match run_command(
            IP_PROGRAM,
            &["-d", "-o", "link", "show", "dev", interface.as_str()],
            None,
            self.command_timeout,
        ) {
            Ok(output) => Ok(Some(String::from_utf8_lossy(&output).into_owned())),
            Err(CommandError::Failed { stderr, .. }) if stderr.contains("does not exist") => {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }
}

impl WireguardBackend for KernelBackend {
    fn description(&self) -> String {
        "kernel".to_string()
    }

    fn update_style(&self) -> UpdateStyle {
        UpdateStyle::InPlace
    }

    fn ensure_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<DeviceReadiness, WireguardError> {
        match self.link_details(interface)? {
            Some(details) if details.split_whitespace().any(|word| word == "wireguard") => {
                Ok(DeviceReadiness::Running)
            }
            Some(details) => Err(WireguardError::NotWireguard {
                interface: interface.to_string(),
                details: details.chars().take(200).collect(),
            }),
            None => {
                run_command(
                    IP_PROGRAM,
                    &[
                        "link",
                        "add",
                        "dev",
                        interface.as_str(),
                        "type",
                        "wireguard",
                    ],
                    None,
                    self.command_timeout,
                )?;
                Ok(DeviceReadiness::Created)
            }
        }
    }

    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<LiveDevice>, WireguardError> {
        if self.link_details(interface)?.is_none() {
            return Ok(None);
        }
        let output = run_command(
            WG_PROGRAM,
            &["show", interface.as_str(), "dump"],
            None,
            self.command_timeout,
        )?;
        parse_wg_dump(&String::from_utf8_lossy(&output)).map(Some)
    }

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &DeviceUpdate,
    ) -> Result<(), WireguardError> {
        let (arguments, stdin) = wg_set_arguments(interface, update);
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        run_command(
            WG_PROGRAM,
            &arguments,
            stdin.as_ref().map(|text| text.as_bytes()),
            self.command_timeout,
        )?;
        Ok(())
    }

    fn read_link(&mut self, interface: &InterfaceName) -> Result<LinkState, WireguardError> {
        link::read_link(interface, self.command_timeout)
    }

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &LinkChanges,
    ) -> Result<(), WireguardError> {
        link::update_link(interface, changes, self.command_timeout)
    }

    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        if self.link_details(interface)?.is_some() {
            run_command(
                IP_PROGRAM,
                &["link", "del", "dev", interface.as_str()],
                None,
                self.command_timeout,
            )?;
        }
        Ok(())
    }
}

/// The arguments of `wg set` for one request, and what to feed it on stdin (the private key,
/// so it never shows in a process list).
pub fn wg_set_arguments(
    interface: &InterfaceName,
    update: &DeviceUpdate,
) -> (Vec<String>, Option<String>) {
    let mut arguments = vec!["set".to_string(), interface.to_string()];
    let mut stdin = None;
    if let Some(port) = update.listen_port {
        arguments.extend(["listen-port".to_string(), port.to_string()]);
    }
    if let Some(key) = &update.private_key {
        arguments.extend(["private-key".to_string(), "/dev/stdin".to_string()]);
        stdin = Some(format!("{}\n", key.to_base64()));
    }
    for change in &update.peers {
        match change {
            PeerChange::Remove(key) => {
                arguments.extend(["peer".to_string(), key.to_base64(), "remove".to_string()]);
            }
            PeerChange::Upsert(peer) => {
                arguments.extend(["peer".to_string(), peer.public_key.to_base64()]);
                arguments.extend(["preshared-key".to_string(), "/dev/null".to_string()]);
                if let Some(endpoint) = peer.endpoint {
                    arguments.extend(["endpoint".to_string(), endpoint.to_string()]);
                }
                arguments.extend([
                    "persistent-keepalive".to_string(),
                    match peer.persistent_keepalive_secs {
                        0 => "off".to_string(),
                        secs => secs.to_string(),
                    },
                ]);
                let mut networks = String::new();
                for (index, network) in peer.allowed_ips.iter().enumerate() {
                    if index > 0 {
                        networks.push(',');
                    }
                    let _ = write!(networks, "{network}");
                }
                arguments.extend(["allowed-ips".to_string(), networks]);
            }
        }
    }
    (arguments, stdin)
}

fn dump_error(line: &str, reason: &str) -> WireguardError {
    WireguardError::Parse {
        source_name: "wg show dump".to_string(),
        reason: format!(
            "{reason} in line {:?}",
            line.chars().take(200).collect::<String>()
        ),
    }
}

fn dump_number<T: std::str::FromStr>(
    line: &str,
    field: &str,
    what: &str,
) -> Result<T, WireguardError> {
    field
        .parse()
        .map_err(|_| dump_error(line, &format!("{what} {field:?} is not a number")))
}

/// Parses `wg show IFACE dump`: a device line (private key, public key, port, fwmark) and one
/// line per peer (public key, preshared key, endpoint, allowed IPs, latest handshake, rx, tx,
/// keepalive), tab separated, `(none)` / `off` for absent values.
pub fn parse_wg_dump(text: &str) -> Result<LiveDevice, WireguardError> {
    let mut lines = text.lines().filter(|line| !line.is_empty());
    let device_line = lines
        .next()
        .ok_or_else(|| dump_error("", "no device line"))?;
    let fields: Vec<&str> = device_line.split('\t').collect();
    let [private_key, public_key, listen_port, fwmark] = fields.as_slice() else {
        return Err(dump_error(
            device_line,
            "the device line does not have 4 fields",
        ));
    };
    let mut device = LiveDevice {
        private_key: match *private_key {
            "(none)" => None,
            text => Some(
                PrivateKey::from_base64(text)
                    .map_err(|error| dump_error(device_line, &error.to_string()))?,
            ),
        },
        public_key: match *public_key {
            "(none)" => None,
            text => Some(
                PublicKey::from_base64(text)
                    .map_err(|error| dump_error(device_line, &error.to_string()))?,
            ),
        },
        listen_port: dump_number(device_line, listen_port, "listen port")?,
        fwmark: match *fwmark {
            "off" => 0,
            text => dump_number(device_line, text, "fwmark")?,
        },
        peers: Vec::new(),
    };
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        let [
            public_key,
            preshared,
            endpoint,
            allowed,
            handshake,
            rx,
            tx,
            keepalive,
        ] = fields.as_slice()
        else {
            return Err(dump_error(line, "a peer line does not have 8 fields"));
        };
        let key = PublicKey::from_base64(public_key)
            .map_err(|error| dump_error(line, &error.to_string()))?;
        let mut peer = LivePeer::new(key);
        peer.has_preshared_key = match *preshared {
            "(none)" => PresharedKeyState::None,
            _ => PresharedKeyState::Set,
        };
        peer.endpoint = match *endpoint {
            "(none)" => None,
            text => Some(
                text.parse::<SocketAddr>()
                    .map_err(|_| dump_error(line, &format!("endpoint {text:?} is not IP:PORT")))?,
            ),
        };
        if *allowed != "(none)" {
            for text in allowed.split(',') {
                let network: IpCidr = text.parse().map_err(|_| {
                    dump_error(line, &format!("allowed ip {text:?} is not a network"))
                })?;
                peer.allowed_ips.push(network);
            }
        }
        let handshake_secs: u64 = dump_number(line, handshake, "latest handshake")?;
        peer.last_handshake_unix_secs = (handshake_secs != 0).then_some(handshake_secs);
        peer.rx_bytes = dump_number(line, rx, "rx bytes")?;
        peer.tx_bytes = dump_number(line, tx, "tx bytes")?;
        peer.persistent_keepalive_secs = match *keepalive {
            "off" => 0,
            text => dump_number(line, text, "persistent keepalive")?,
        };
        device.peers.push(peer);
    }
    device.peers.sort_by_key(|peer| peer.public_key);
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::super::device::PeerConfig;
    use super::*;

    #[test]
    fn parses_a_dump() {
        let private = PrivateKey::from_bytes([3; 32]);
        let peer = PublicKey::from_bytes([4; 32]);
        let text = format!(
            "{}\t{}\t51820\toff\n{}\t(none)\t10.231.0.2:51820\t10.232.0.2/32,10.99.0.0/24\t1700000000\t10\t20\t25\n{}\tPSK\t(none)\t(none)\t0\t0\t0\toff\n",
            private.to_base64(),
            private.public_key().to_base64(),
            peer.to_base64(),
            PublicKey::from_bytes([5; 32]).to_base64(),
        );
        let device = parse_wg_dump(&text).unwrap();
        assert_eq!(device.private_key, Some(private));
        assert_eq!(device.listen_port, 51820);
        assert_eq!(device.peers.len(), 2);
        assert_eq!(device.peers[0].allowed_ips.len(), 2);
        assert_eq!(
            device.peers[0].last_handshake_unix_secs,
            Some(1_700_000_000)
        );
        assert_eq!(device.peers[0].persistent_keepalive_secs, 25);
        assert_eq!(device.peers[1].endpoint, None);
        assert_eq!(device.peers[1].has_preshared_key, PresharedKeyState::Set);
        assert_eq!(device.peers[1].last_handshake_unix_secs, None);
        assert!(parse_wg_dump("").is_err());
        assert!(parse_wg_dump("a\tb\n").is_err());
        let bad_peer = format!(
            "(none)\t(none)\t0\toff\n{}\t(none)\tnope\t(none)\t0\t0\t0\toff\n",
            peer.to_base64()
        );
        assert!(
            parse_wg_dump(&bad_peer)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }

    #[test]
    fn builds_wg_set_arguments_with_the_key_on_stdin() {
        let interface = InterfaceName::new("outpost0").unwrap();
        let private = PrivateKey::from_bytes([3; 32]);
        let peer = PublicKey::from_bytes([4; 32]);
        let update = DeviceUpdate {
            private_key: Some(private.clone()),
            listen_port: Some(51820),
            peers: vec![
                PeerChange::Remove(PublicKey::from_bytes([5; 32])),
                PeerChange::Upsert(PeerConfig {
                    public_key: peer,
                    endpoint: Some("10.231.0.2:51820".parse().unwrap()),
                    allowed_ips: vec![
                        "10.232.0.2/32".parse().unwrap(),
                        "10.99.0.0/24".parse().unwrap(),
                    ],
                    persistent_keepalive_secs: 0,
                }),
            ],
        };
        let (arguments, stdin) = wg_set_arguments(&interface, &update);
        assert_eq!(stdin, Some(format!("{}\n", private.to_base64())));
        assert!(!arguments.join(" ").contains(&private.to_base64()));
        let expected = format!(
            "set outpost0 listen-port 51820 private-key /dev/stdin peer {} remove peer {} preshared-key /dev/null endpoint 10.231.0.2:51820 persistent-keepalive off allowed-ips 10.232.0.2/32,10.99.0.0/24",
            PublicKey::from_bytes([5; 32]).to_base64(),
            peer.to_base64()
        );
        assert_eq!(arguments.join(" "), expected);
    }
}
