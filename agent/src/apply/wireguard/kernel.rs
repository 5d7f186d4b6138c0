//! The kernel backend, for hosts with the wireguard module: the device is a link of kind
//! `wireguard` made over rtnetlink, configured over generic netlink (the `wireguard` family:
//! `WG_CMD_GET_DEVICE`, `WG_CMD_SET_DEVICE`), its addresses and routes over rtnetlink. No `ip`
//! or `wg` program is needed. The messages are built and read by the pure functions of
//! `netlink::{route, genl}`; this file only sends them.

use std::time::Duration;

use super::WireguardError;
use super::backend::{DeviceReadiness, WireguardBackend};
use super::device::{DeviceUpdate, LinkChanges, LinkState, LiveDevice};
use super::diff::UpdateStyle;
use super::link;
use super::netlink::genl::{self, WG_GENL_NAME};
use super::netlink::socket::{Bus, NetlinkSocket};
use super::spec::InterfaceName;

/// The link kind of kernel WireGuard devices.
pub const WIREGUARD_LINK_KIND: &str = "wireguard";
/// `ENOENT`: the generic-netlink family is not registered (the module is not loaded).
const ENOENT: i32 = 2;
/// `EOPNOTSUPP`: the kernel knows no link kind `wireguard`.
const EOPNOTSUPP: i32 = 95;

#[derive(Debug, Clone)]
pub struct KernelBackend {
    /// Deadline of each netlink request.
    pub request_timeout: Duration,
    /// The `wireguard` generic-netlink family id, once looked up (it is fixed while the module
    /// stays loaded; a reload makes requests fail and the id is looked up again).
    family: Option<u16>,
}

impl KernelBackend {
    pub fn new(request_timeout: Duration) -> Self {
        Self {
            request_timeout,
            family: None,
        }
    }

    fn generic_socket(&self) -> Result<NetlinkSocket, WireguardError> {
        Ok(NetlinkSocket::open(Bus::Generic, self.request_timeout)?)
    }

    /// The socket and family id for a WireGuard request.
    fn wireguard(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<(NetlinkSocket, u16), WireguardError> {
        let mut socket = self.generic_socket()?;
        if let Some(family) = self.family {
            return Ok((socket, family));
        }
        let answers = match socket.request(genl::get_family(WG_GENL_NAME)) {
            Err(error) if error.errno() == Some(ENOENT) => {
                return Err(WireguardError::KernelModuleMissing {
                    interface: interface.to_string(),
                    reason: "the kernel has no generic-netlink family \"wireguard\"".to_string(),
                });
            }
            other => other?,
        };
        let payload = answers.first().ok_or_else(|| WireguardError::Parse {
            source_name: "CTRL_CMD_GETFAMILY wireguard".to_string(),
            reason: "no answer".to_string(),
        })?;
        let family = genl::parse_family_id(payload)?;
        self.family = Some(family);
        Ok((socket, family))
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
        let mut socket = link::route_socket(self.request_timeout)?;
        match link::find_link(&mut socket, interface.as_str())? {
            Some(found) if found.kind.as_deref() == Some(WIREGUARD_LINK_KIND) => {
                Ok(DeviceReadiness::Running)
            }
            Some(found) => Err(WireguardError::NotWireguard {
                interface: interface.to_string(),
                details: format!(
                    "link index {} of kind {}",
                    found.index,
                    found.kind.as_deref().unwrap_or("(none)")
                ),
            }),
            None => match link::create_link(
                interface.as_str(),
                WIREGUARD_LINK_KIND,
                self.request_timeout,
            ) {
                Ok(()) => Ok(DeviceReadiness::Created),
                Err(WireguardError::Netlink(error)) if error.errno() == Some(EOPNOTSUPP) => {
                    Err(WireguardError::KernelModuleMissing {
                        interface: interface.to_string(),
                        reason: "the kernel knows no link kind \"wireguard\"".to_string(),
                    })
                }
                Err(error) => Err(error),
            },
        }
    }

    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<LiveDevice>, WireguardError> {
        let mut route_socket = link::route_socket(self.request_timeout)?;
        if link::find_link(&mut route_socket, interface.as_str())?.is_none() {
            return Ok(None);
        }
        let (mut socket, family) = self.wireguard(interface)?;
        let mut answers = match socket.request(genl::get_device(family, interface.as_str())) {
            Ok(answers) => answers,
            Err(error) => {
                // The module may have been reloaded with another family id.
                self.family = None;
                return Err(error.into());
            }
        };
        let payloads: Vec<&[u8]> = answers.iter().map(Vec::as_slice).collect();
        let device = genl::parse_device(&payloads);
        // The answer holds the private key.
        for answer in &mut answers {
            zeroize::Zeroize::zeroize(answer);
        }
        Ok(Some(device?))
    }

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &DeviceUpdate,
    ) -> Result<(), WireguardError> {
        let (mut socket, family) = self.wireguard(interface)?;
        for message in genl::set_device(family, interface.as_str(), update) {
            if let Err(error) = socket.request(message) {
                self.family = None;
                return Err(error.into());
            }
        }
        Ok(())
    }

    fn read_link(&mut self, interface: &InterfaceName) -> Result<LinkState, WireguardError> {
        link::read_link(interface, self.request_timeout)
    }

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &LinkChanges,
    ) -> Result<(), WireguardError> {
        link::update_link(interface, changes, self.request_timeout)
    }

    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        link::delete_link(interface.as_str(), self.request_timeout)
    }
}
