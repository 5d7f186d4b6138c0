//! The WireGuard overlay as cached desired state (issue 4, agent side): validate the overlay
//! part of the plan, make the live interface match it exactly through a backend (kernel,
//! userspace daemon, or the in-memory fake), and report its status.
//!
//! How the agent uses it:
//! 1. Keys: `load_or_generate_private_key(stored_bytes)`; when it says `Generated`, store
//!    `key.to_bytes()` in the identity table before reporting `key.public_key()` to control.
//!    The private key never leaves the node; rotation is `PrivateKey::generate()` + store +
//!    report the new public key.
//! 2. Backend: for `BackendChoice::Auto`, `probe_kernel_wireguard(Path::new("/sys/module"), t)`
//!    tells whether the kernel can do WireGuard; then
//!    `open_backend(resolve_backend(choice, module, auto_userspace(PATH)))`.
//! 3. `OverlayApplier::new(backend).apply(&DesiredOverlay::from_spec(&spec)?, &key, now)` on
//!    boot (from the cached plan, no network needed), on every plan change, and every 10–30 s
//!    (each call is also the watchdog for a hung userspace daemon).
//! 4. `overlay_status(...)` + `render_overlay_status(...)` for `outpost-agent status`.
//!
//! Interface addresses and routes are set over rtnetlink and the kernel device over generic
//! netlink (`netlink/`, hand-written and sans-IO; no `ip` or `wg` program is needed). The
//! userspace device is driven over its UAPI socket directly.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apply;
pub mod backend;
pub mod cidr;
pub mod device;
pub mod diff;
pub mod kernel;
pub mod key;
pub mod link;
pub mod memory;
pub mod netlink;
pub mod spec;
pub mod status;
pub mod uapi;
pub mod userspace;

use std::path::PathBuf;
use std::time::Duration;

pub use apply::{ApplyReport, KeyApplied, OverlayApplier};
pub use backend::{
    BackendChoice, BackendKind, DeviceReadiness, KernelModule, UserspaceImplementation,
    WireguardBackend, auto_userspace, detect_kernel_module, probe_kernel_wireguard,
    resolve_backend,
};
pub use cidr::IpCidr;
pub use key::{KeyError, KeyOrigin, PrivateKey, PublicKey, load_or_generate_private_key};
pub use spec::{
    DesiredOverlay, DesiredPeer, InterfaceName, OverlayPeerSpec, OverlaySpec, OverlaySpecError,
};
pub use status::{
    OverlayDeviceState, OverlayStatus, PeerStatus, overlay_status, render_overlay_status,
};
pub use userspace::{UserspaceBackend, UserspaceConfig};

/// Everything that can go wrong while applying or reading the overlay.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error(transparent)]
    Spec(#[from] spec::OverlaySpecError),
    #[error(transparent)]
    Key(#[from] key::KeyError),
    #[error(transparent)]
    Uapi(#[from] uapi::UapiError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(
        "interface {interface}: kernel wireguard is not available ({reason}); choose a userspace backend (--wireguard-backend wireguard-go or boringtun) or load the module"
    )]
    KernelModuleMissing { interface: String, reason: String },
    #[error("{source_name} output is invalid: {reason}")]
    Parse { source_name: String, reason: String },
    #[error("wireguard device {interface} does not exist")]
    DeviceAbsent { interface: String },
    #[error("interface {interface} exists but is not a wireguard device: {details}")]
    NotWireguard { interface: String, details: String },
    #[error("cannot start {program} for interface {interface}: {reason}")]
    DaemonStart {
        program: String,
        interface: String,
        reason: String,
    },
    #[error("cannot stop wireguard daemon pid {pid} of interface {interface}: {reason}")]
    DaemonStop {
        pid: u32,
        interface: String,
        reason: String,
    },
    #[error(
        "interface {interface}: its userspace daemon ({daemon}) serves another network namespace; give each agent on this host its own --wireguard-interface"
    )]
    ForeignNamespace { interface: String, daemon: String },
    #[error("overlay peer {public_key} is this node's own public key")]
    OwnKeyAsPeer { public_key: String },
    #[error("cannot prepare {path}: {source}")]
    Filesystem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fake backend failure: {message}")]
    Fake { message: String },
}

/// Default deadline of each netlink request.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The real backend for a kind, with default settings.
pub fn open_backend(kind: BackendKind) -> Box<dyn WireguardBackend + Send> {
    match kind {
        BackendKind::Kernel => Box::new(kernel::KernelBackend::new(COMMAND_TIMEOUT)),
        BackendKind::Userspace(implementation) => {
            Box::new(UserspaceBackend::new(UserspaceConfig::new(implementation)))
        }
    }
}

impl<B: WireguardBackend + ?Sized> WireguardBackend for Box<B> {
    fn description(&self) -> String {
        (**self).description()
    }

    fn update_style(&self) -> diff::UpdateStyle {
        (**self).update_style()
    }

    fn ensure_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<DeviceReadiness, WireguardError> {
        (**self).ensure_device(interface)
    }

    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<device::LiveDevice>, WireguardError> {
        (**self).read_device(interface)
    }

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &device::DeviceUpdate,
    ) -> Result<(), WireguardError> {
        (**self).update_device(interface, update)
    }

    fn read_link(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<device::LinkState, WireguardError> {
        (**self).read_link(interface)
    }

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &device::LinkChanges,
    ) -> Result<(), WireguardError> {
        (**self).update_link(interface, changes)
    }

    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError> {
        (**self).remove_device(interface)
    }
}
