//! The `WireguardBackend` port: how the apply code reaches a WireGuard device (kernel, userspace
//! daemon, or the in-memory fake), and the choice between them.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::WireguardError;
use super::device::{DeviceUpdate, LinkChanges, LinkState, LiveDevice};
use super::diff::UpdateStyle;
use super::kernel::WIREGUARD_LINK_KIND;
use super::link;
use super::spec::InterfaceName;

/// What `ensure_device` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceReadiness {
    /// The device was there and answered.
    Running,
    /// A userspace daemon this process did not start was there and answered; it is used as is.
    Adopted,
    /// There was no device; one was made (empty: it needs a full apply).
    Created,
    /// The device or its daemon was broken and was replaced (empty: it needs a full apply).
    Restarted { reason: String },
}

/// A WireGuard implementation the agent can drive. Every call is bounded in time.
pub trait WireguardBackend {
    /// For status output and logs, e.g. `userspace wireguard-go`.
    fn description(&self) -> String;

    /// How this backend takes changes (see [`UpdateStyle`]).
    fn update_style(&self) -> UpdateStyle;

    /// Makes sure the device exists and answers: creates it, adopts a running daemon, or kills
    /// and restarts a daemon that does not answer in time (the watchdog).
    fn ensure_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<DeviceReadiness, WireguardError>;

    /// The live device, or `None` when there is no such device. Never creates anything.
    fn read_device(
        &mut self,
        interface: &InterfaceName,
    ) -> Result<Option<LiveDevice>, WireguardError>;

    fn update_device(
        &mut self,
        interface: &InterfaceName,
        update: &DeviceUpdate,
    ) -> Result<(), WireguardError>;

    /// The interface's state, addresses and routes.
    fn read_link(&mut self, interface: &InterfaceName) -> Result<LinkState, WireguardError>;

    fn update_link(
        &mut self,
        interface: &InterfaceName,
        changes: &LinkChanges,
    ) -> Result<(), WireguardError>;

    /// Removes the device (and stops its daemon). Absent is fine.
    fn remove_device(&mut self, interface: &InterfaceName) -> Result<(), WireguardError>;
}

/// Which userspace implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserspaceImplementation {
    WireguardGo,
    Boringtun,
}

impl UserspaceImplementation {
    pub fn default_program(self) -> &'static str {
        match self {
            Self::WireguardGo => "wireguard-go",
            Self::Boringtun => "boringtun-cli",
        }
    }

    pub fn update_style(self) -> UpdateStyle {
        match self {
            Self::WireguardGo => UpdateStyle::InPlace,
            Self::Boringtun => UpdateStyle::OnePeerPerRequestRemoveThenAdd,
        }
    }
}

/// The operator's choice (`auto`, `kernel`, `wireguard-go`, `boringtun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Kernel when the module is loaded, otherwise wireguard-go, or boringtun-cli when only
    /// that is on `PATH` (see [`auto_userspace`]).
    #[default]
    Auto,
    Kernel,
    Userspace(UserspaceImplementation),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wireguard backend {value:?} is not one of auto, kernel, wireguard-go, boringtun")]
pub struct BackendChoiceError {
    pub value: String,
}

impl FromStr for BackendChoice {
    type Err = BackendChoiceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "wireguard-go" => Ok(Self::Userspace(UserspaceImplementation::WireguardGo)),
            "boringtun" => Ok(Self::Userspace(UserspaceImplementation::Boringtun)),
            _ => Err(BackendChoiceError {
                value: text.chars().take(64).collect(),
            }),
        }
    }
}

/// Whether the kernel has WireGuard loaded, as `/sys/module/wireguard` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelModule {
    Loaded,
    Missing,
}

/// Looks at `sys_module_dir` (normally `/sys/module`) for the wireguard module.
pub fn detect_kernel_module(sys_module_dir: &Path) -> KernelModule {
    if sys_module_dir.join("wireguard").is_dir() {
        KernelModule::Loaded
    } else {
        KernelModule::Missing
    }
}

/// Whether this host can make kernel WireGuard devices. `/sys/module/wireguard` answers when the
/// module is loaded (or built in); otherwise a throwaway link of kind `wireguard` is made over
/// rtnetlink, which makes the kernel load the module when it is installed but not loaded yet (as
/// wg-quick relies on). The probe link is deleted at once.
pub fn probe_kernel_wireguard(sys_module_dir: &Path, timeout: Duration) -> KernelModule {
    if detect_kernel_module(sys_module_dir) == KernelModule::Loaded {
        return KernelModule::Loaded;
    }
    let probe_name = format!("opwgprobe{}", std::process::id() % 100_000);
    match link::create_link(&probe_name, WIREGUARD_LINK_KIND, timeout) {
        Ok(()) => {
            let _ = link::delete_link(&probe_name, timeout);
            KernelModule::Loaded
        }
        Err(_) => KernelModule::Missing,
    }
}

/// The concrete backend kind for a choice on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Kernel,
    Userspace(UserspaceImplementation),
}

/// `fallback` is the userspace daemon `auto` uses without the kernel module (see
/// [`auto_userspace`]).
pub fn resolve_backend(
    choice: BackendChoice,
    module: KernelModule,
    fallback: UserspaceImplementation,
) -> BackendKind {
    match (choice, module) {
        (BackendChoice::Kernel, _) | (BackendChoice::Auto, KernelModule::Loaded) => {
            BackendKind::Kernel
        }
        (BackendChoice::Auto, KernelModule::Missing) => BackendKind::Userspace(fallback),
        (BackendChoice::Userspace(implementation), _) => BackendKind::Userspace(implementation),
    }
}

/// The userspace daemon `auto` falls back to: wireguard-go when it is on `path` (a `PATH`
/// value), else boringtun-cli when that is (the OCI agent image ships only boringtun-cli), else
/// wireguard-go, whose absence is then reported when the daemon cannot start.
pub fn auto_userspace(path: Option<&std::ffi::OsStr>) -> UserspaceImplementation {
    let on_path = |program: &str| {
        path.is_some_and(|path| std::env::split_paths(path).any(|dir| dir.join(program).is_file()))
    };
    if !on_path(UserspaceImplementation::WireguardGo.default_program())
        && on_path(UserspaceImplementation::Boringtun.default_program())
    {
        UserspaceImplementation::Boringtun
    } else {
        UserspaceImplementation::WireguardGo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve() {
        assert_eq!(
            "auto".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        let error = "wg".parse::<BackendChoice>().unwrap_err();
        assert!(error.to_string().contains("\"wg\""), "{error}");
        let go = UserspaceImplementation::WireguardGo;
        assert_eq!(
            resolve_backend(BackendChoice::Auto, KernelModule::Loaded, go),
            BackendKind::Kernel
        );
        assert_eq!(
            resolve_backend(BackendChoice::Auto, KernelModule::Missing, go),
            BackendKind::Userspace(go)
        );
        assert_eq!(
            resolve_backend(
                BackendChoice::Auto,
                KernelModule::Missing,
                UserspaceImplementation::Boringtun
            ),
            BackendKind::Userspace(UserspaceImplementation::Boringtun)
        );
        assert_eq!(
            resolve_backend("boringtun".parse().unwrap(), KernelModule::Loaded, go),
            BackendKind::Userspace(UserspaceImplementation::Boringtun)
        );
    }

    #[test]
    fn auto_falls_back_to_the_daemon_on_path() {
        let go_dir = tempfile::tempdir().unwrap();
        let boringtun_dir = tempfile::tempdir().unwrap();
        std::fs::write(go_dir.path().join("wireguard-go"), b"").unwrap();
        std::fs::write(boringtun_dir.path().join("boringtun-cli"), b"").unwrap();
        let path = |dirs: &[&Path]| std::env::join_paths(dirs).unwrap();
        let only_boringtun = path(&[boringtun_dir.path()]);
        let both = path(&[boringtun_dir.path(), go_dir.path()]);
        assert_eq!(
            auto_userspace(Some(&only_boringtun)),
            UserspaceImplementation::Boringtun
        );
        assert_eq!(
            auto_userspace(Some(&both)),
            UserspaceImplementation::WireguardGo
        );
        assert_eq!(auto_userspace(None), UserspaceImplementation::WireguardGo);
    }

    #[test]
    fn module_detection_reads_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect_kernel_module(dir.path()), KernelModule::Missing);
        std::fs::create_dir(dir.path().join("wireguard")).unwrap();
        assert_eq!(detect_kernel_module(dir.path()), KernelModule::Loaded);
    }
}
