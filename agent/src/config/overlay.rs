//! The overlay's settings (P9): WireGuard port, endpoints, backend, interface, key rotation,
//! from flags, environment and the config file. The overlay at run time is `crate::overlay`.

use crate::apply::wireguard::{BackendChoice, InterfaceName};

pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;
/// The interface a plan names when control does not say otherwise (control's default).
pub const DEFAULT_INTERFACE_NAME: &str = "outpost0";

pub const KEY_WIREGUARD_PORT: &str = "wireguard_port";
pub const KEY_WIREGUARD_ENDPOINT: &str = "wireguard_endpoint";
pub const KEY_WIREGUARD_BACKEND: &str = "wireguard_backend";
pub const KEY_WIREGUARD_INTERFACE: &str = "wireguard_interface";
pub const KEY_OVERLAY: &str = "overlay";
/// Set only by the `--rotate-wireguard-key` flag (never from the environment or a file, which
/// would rotate on every boot).
pub const KEY_ROTATE_WIREGUARD_KEY: &str = "rotate_wireguard_key";

/// The overlay's flags that take no value: `--no-overlay`, `--rotate-wireguard-key`.
pub fn switch_flag(flag: &str) -> Option<(&'static str, &'static str)> {
    match flag {
        "--no-overlay" => Some((KEY_OVERLAY, "off")),
        "--rotate-wireguard-key" => Some((KEY_ROTATE_WIREGUARD_KEY, "true")),
        _ => None,
    }
}
/// Every setting this module reads.
pub const OVERLAY_KEYS: &[&str] = &[
    KEY_WIREGUARD_PORT,
    KEY_WIREGUARD_ENDPOINT,
    KEY_WIREGUARD_BACKEND,
    KEY_WIREGUARD_INTERFACE,
    KEY_OVERLAY,
];

/// Whether this agent takes part in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayMode {
    Enabled,
    /// `--no-overlay`: no key, nothing reported, the interface is left alone.
    Disabled,
}

/// Whether the agent makes a fresh key at boot (`--rotate-wireguard-key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRotation {
    KeepKey,
    RotateAtBoot,
}

/// The overlay settings of `outpost-agent run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySettings {
    pub mode: OverlayMode,
    pub backend: BackendChoice,
    /// UDP port reported to control; control puts it in the plan.
    pub listen_port: u16,
    /// `--wireguard-endpoint`: reported instead of the node's own addresses (NAT, port forward).
    pub endpoint_overrides: Vec<String>,
    /// `--wireguard-interface`: a local name used instead of the plan's (several agents on one
    /// host share the userspace socket folder).
    pub interface_override: Option<String>,
    pub rotation: KeyRotation,
}

impl Default for OverlaySettings {
    fn default() -> Self {
        Self {
            mode: OverlayMode::Enabled,
            backend: BackendChoice::Auto,
            listen_port: DEFAULT_WIREGUARD_PORT,
            endpoint_overrides: Vec::new(),
            interface_override: None,
            rotation: KeyRotation::KeepKey,
        }
    }
}

/// A setting that did not parse: the key, the value seen and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {key} {value:?}: {reason}")]
pub struct OverlaySettingError {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl OverlaySettings {
    /// Reads the overlay settings; `get` answers a key's trimmed, non-empty value.
    pub fn from_settings<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Self, OverlaySettingError> {
        let invalid = |key: &'static str, value: &str, reason: &str| OverlaySettingError {
            key,
            value: value.chars().take(128).collect(),
            reason: reason.to_string(),
        };
        let mut settings = OverlaySettings {
            mode: match get(KEY_OVERLAY) {
                None | Some("on") | Some("true") => OverlayMode::Enabled,
                Some("off") | Some("false") => OverlayMode::Disabled,
                Some(other) => return Err(invalid(KEY_OVERLAY, other, "expected on or off")),
            },
            ..OverlaySettings::default()
        };
        if get(KEY_ROTATE_WIREGUARD_KEY) == Some("true") {
            settings.rotation = KeyRotation::RotateAtBoot;
        }
        if let Some(text) = get(KEY_WIREGUARD_BACKEND) {
            settings.backend = text.parse().map_err(|_| {
                invalid(
                    KEY_WIREGUARD_BACKEND,
                    text,
                    "expected auto, kernel, wireguard-go or boringtun",
                )
            })?;
        }
        if let Some(text) = get(KEY_WIREGUARD_PORT) {
            settings.listen_port = match text.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(invalid(
                        KEY_WIREGUARD_PORT,
                        text,
                        "expected a UDP port from 1 to 65535",
                    ));
                }
            };
        }
        if let Some(text) = get(KEY_WIREGUARD_ENDPOINT) {
            let endpoints: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(str::to_string)
                .collect();
            outpost_proto::overlay::check_endpoints(KEY_WIREGUARD_ENDPOINT, &endpoints).map_err(
                |e| {
                    invalid(
                        KEY_WIREGUARD_ENDPOINT,
                        &e.value,
                        "expected IP:PORT[,IP:PORT…] (at most 8)",
                    )
                },
            )?;
            settings.endpoint_overrides = endpoints;
        }
        if let Some(text) = get(KEY_WIREGUARD_INTERFACE) {
            InterfaceName::new(text).map_err(|_| {
                invalid(
                    KEY_WIREGUARD_INTERFACE,
                    text,
                    "must be 1 to 15 characters of A-Z a-z 0-9 _ -",
                )
            })?;
            settings.interface_override = Some(text.to_string());
        }
        Ok(settings)
    }
}
