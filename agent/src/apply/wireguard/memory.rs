//! A fake WireGuard backend that keeps devices in memory, standing in for the kernel and the
//! userspace daemons in unit tests, plus the device model (`apply_update_to_model`) it shares
//! with the diff's property tests.

use std::collections::BTreeMap;

use super::WireguardError;
use super::backend::{DeviceReadiness, WireguardBackend};
use super::device::{
    DeviceUpdate, LinkChanges, LinkState, LinkUp, LiveDevice, LivePeer, PeerChange,
    PresharedKeyState,
};
use super::diff::UpdateStyle;
use super::spec::InterfaceName;

/// Applies one request to a device the way WireGuard does: peers are created on first mention,
/// an upsert replaces allowed IPs and clears the preshared key, and an allowed IP given to one
/// peer is taken away from any other peer that had it.
pub fn apply_update_to_model(device: &mut LiveDevice, update: &DeviceUpdate) {
    if let Some(key) = &update.private_key {
        device.private_key = Some(key.clone());
        device.public_key = Some(key.public_key());
    }
    if let Some(port) = update.listen_port {
        device.listen_port = port;
    }
    for change in &update.peers {
        match change {
            PeerChange::Remove(key) => device.peers.retain(|peer| peer.public_key != *key),
            PeerChange::Upsert(config) => {
                for other in &mut device.peers {
                    if other.public_key != config.public_key {
                        other
                            .allowed_ips
                            .retain(|network| !config.allowed_ips.contains(network));
                    }
                }
                let position = match device
                    .peers
                    .iter()
                    .position(|peer| peer.public_key == config.public_key)
                {
                    Some(position) => position,
                    None => {
                        device.peers.push(LivePeer::new(config.public_key));
                        device.peers.len() - 1
                    }
                };
                let peer = &mut device.peers[position];
                if config.endpoint.is_some() {
                    peer.endpoint = config.endpoint;
                }
                peer.allowed_ips = config.allowed_ips.clone();
                peer.persistent_keepalive_secs = config.persistent_keepalive_secs;
                peer.has_preshared_key = PresharedKeyState::None;
            }
        }
    }
}

/// One in-memory device and its interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryDevice {
    pub device: LiveDevice,
    pub link: LinkState,
}

/// The fake backend. Public fields let a test look at and tamper with the "live" state.
#[derive(Debug)]
pub struct MemoryBackend {
    pub style: UpdateStyle,
    pub devices: BTreeMap<InterfaceName, MemoryDevice>,
    /// Every request the backend took, in order.
    pub requests: Vec<DeviceUpdate>,
    /// When set, the next `update_device` fails with this message and changes nothing.
    pub fail_next_update: Option<String>,
}

impl MemoryBackend {
    pub fn new(style: UpdateStyle) -> Self {
        Self {
            style,
            devices: BTreeMap::new(),
            requests: Vec::new(),
            fail_next_update: None,
        }
    }

    fn device_mut(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<&mut MemoryDevice, WireguardError> {
        self.devices
            .get_mut(interface)
            .ok_or_else(|| WireguardError::DeviceAbsent {
                interface: interface.to_string(),
            })
    }
}

impl WireguardBackend for MemoryBackend {
    fn description(&self) -> String {
        "memory (test fake)".to_string()
    }

    fn update_style(&self) -> UpdateStyle {
        self.style
    }

    fn ensure_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<DeviceReadiness, WireguardError> {
        if self.devices.contains_key(interface) {
            return Ok(DeviceReadiness::Running);
        }
        self.devices
            .insert(interface.clone(), MemoryDevice::default());
        Ok(DeviceReadiness::Created)
    }

    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<LiveDevice>, WireguardError> {
        Ok(self
            .devices
            .get(interface)
            .map(|memory| memory.device.clone()))
    }

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &DeviceUpdate,
    ) -> Result<(), WireguardError> {
        if let Some(message) = self.fail_next_update.take() {
            return Err(WireguardError::Fake { message });
        }
        let memory = self.device_mut(interface)?;
        apply_update_to_model(&mut memory.device, update);
        self.requests.push(update.clone());
        Ok(())
    }

    fn read_link(&mut self, interface: &InterfaceName) -> Result<LinkState, WireguardError> {
        Ok(self.device_mut(interface)?.link.clone())
    }

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &LinkChanges,
    ) -> Result<(), WireguardError> {
        let link = &mut self.device_mut(interface)?.link;
        if let Some(up) = changes.bring_up {
            link.up = up;
        }
        link.addresses
            .retain(|address| !changes.addresses_to_remove.contains(address));
        link.addresses.extend(&changes.addresses_to_add);
        link.routes
            .retain(|route| !changes.routes_to_remove.contains(route));
        link.routes.extend(&changes.routes_to_add);
        Ok(())
    }

    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        self.devices.remove(interface);
        Ok(())
    }
}

impl MemoryDevice {
    pub fn is_up(&self) -> bool {
        self.link.up == LinkUp::Up
    }
}
