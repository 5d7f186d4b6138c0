//! The node's WireGuard overlay at run time (P9, O2): its private key (generated here, kept in
//! the identity record, never sent anywhere), the public key and endpoint candidates it reports
//! at registration and in heartbeats, and the thread that keeps the interface matching the
//! plan's overlay — at boot from the cached plan (no network needed), on every plan change, and
//! every [`WATCHDOG_INTERVAL`] (each apply also restarts a hung userspace daemon).
//!
//! The applying itself lives in `apply::wireguard`; this module only wires it to the agent.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_proto::hash::sha256_hex;
use outpost_proto::node::{HeartbeatRequest, RegisterRequest};
use outpost_proto::overlay::{OverlaySpec, PEER_ENDPOINTS_MAX};

use crate::apply::wireguard::{
    BackendChoice, DesiredOverlay, InterfaceName, IpCidr, OverlayApplier, PrivateKey,
    WireguardBackend, open_backend, overlay_status, probe_kernel_wireguard, resolve_backend,
};
use crate::boot::Agent;
use crate::store::{ApplyOutcome, ComponentApply, Identity};

/// How often the overlay is applied again without a plan change (the watchdog).
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(15);
/// How often the overlay part of status (handshakes, bytes) is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// The component name under which overlay applies are recorded (C10).
pub const COMPONENT_OVERLAY: &str = "overlay";
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

/// The agent's overlay state shared between threads: the key and the apply thread's wake-up.
pub struct OverlayHandle {
    pub settings: OverlaySettings,
    key: Mutex<Option<PrivateKey>>,
    thread: Mutex<Option<std::thread::Thread>>,
    plan_changed: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OverlayHandle {
    pub fn new(settings: OverlaySettings) -> Self {
        Self {
            settings,
            key: Mutex::new(None),
            thread: Mutex::new(None),
            plan_changed: AtomicBool::new(false),
        }
    }

    /// The node's public key (base64), once the key is loaded and the overlay is enabled.
    pub fn public_key(&self) -> Option<String> {
        lock(&self.key)
            .as_ref()
            .map(|key| key.public_key().to_base64())
    }

    fn private_key(&self) -> Option<PrivateKey> {
        lock(&self.key).clone()
    }

    /// A new plan was promoted: apply the overlay now.
    pub fn wake(&self) {
        self.plan_changed.store(true, Ordering::SeqCst);
        if let Some(thread) = lock(&self.thread).as_ref() {
            thread.unpark();
        }
    }
}

/// Loads the private key from the identity, or makes one (and stores it in the identity table
/// and its copy before anything reports the public key). `RotateAtBoot` always makes a new one.
pub fn prepare_key(agent: &Agent) -> Result<(), String> {
    if agent.overlay.settings.mode == OverlayMode::Disabled {
        return Ok(());
    }
    let mut identity = lock(&agent.identity);
    let stored = match (
        &identity.wireguard_private_key_hex,
        agent.overlay.settings.rotation,
    ) {
        (Some(hex), KeyRotation::KeepKey) => Some(
            PrivateKey::from_hex("stored wireguard private key", hex).map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let key = match stored {
        Some(key) => key,
        None => {
            let key =
                PrivateKey::generate().map_err(|e| format!("cannot make a wireguard key: {e}"))?;
            let updated = Identity {
                wireguard_private_key_hex: Some(key.to_hex()),
                ..identity.clone()
            };
            agent
                .store
                .save_identity(&updated)
                .map_err(|e| format!("cannot store the wireguard key: {e}"))?;
            *identity = updated;
            key
        }
    };
    *lock(&agent.overlay.key) = Some(key);
    Ok(())
}

/// Puts the overlay part of a registration into `request`.
pub fn fill_registration(agent: &Agent, request: &mut RegisterRequest) {
    let Some(public_key) = agent.overlay.public_key() else {
        return;
    };
    request.wireguard_public_key = Some(public_key);
    request.wireguard_listen_port = Some(agent.overlay.settings.listen_port);
    request.endpoints = endpoints_now(agent);
}

/// Puts the overlay part of a heartbeat into `request`.
pub fn fill_heartbeat(agent: &Agent, request: &mut HeartbeatRequest) {
    let Some(public_key) = agent.overlay.public_key() else {
        return;
    };
    request.wireguard_public_key = Some(public_key);
    request.endpoints = endpoints_now(agent);
}

/// The address the node's instances are reached at on its LAN (route backends, E2):
/// `--advertise-ip`, else the first WireGuard endpoint candidate's IP, else the first
/// non-loopback IPv4 address of the host.
pub fn lan_address(agent: &Agent, endpoints: &[String]) -> Option<String> {
    if let Some(ip) = agent.config.site.advertise_ip {
        return Some(ip.to_string());
    }
    endpoints
        .iter()
        .find_map(|endpoint| endpoint.parse::<std::net::SocketAddr>().ok())
        .map(|address| address.ip().to_string())
        .or_else(|| {
            local_ipv4_addresses()
                .into_iter()
                .map(|(_, ip)| ip)
                .find(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string())
        })
}

/// The endpoint candidates to report now.
fn endpoints_now(agent: &Agent) -> Vec<String> {
    let settings = &agent.overlay.settings;
    if !settings.endpoint_overrides.is_empty() {
        return settings.endpoint_overrides.clone();
    }
    let plan = agent.current_plan();
    let interface = local_interface_name(settings, plan.overlay.as_ref());
    let overlay_network = plan
        .overlay
        .as_ref()
        .and_then(|overlay| overlay.address.parse::<IpCidr>().ok())
        .map(|cidr| cidr.network());
    endpoint_candidates(
        &local_ipv4_addresses(),
        &interface,
        overlay_network,
        settings.listen_port,
    )
}

/// The interface name this node uses: the local override, else the plan's, else the default.
pub fn local_interface_name(settings: &OverlaySettings, overlay: Option<&OverlaySpec>) -> String {
    settings
        .interface_override
        .clone()
        .or_else(|| overlay.map(|overlay| overlay.interface_name.clone()))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| DEFAULT_INTERFACE_NAME.to_string())
}

/// The node's IPv4 addresses by interface (`getifaddrs`).
fn local_ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|entry| {
            let address = entry.address?;
            let ipv4 = address.as_sockaddr_in()?.ip();
            Some((entry.interface_name, ipv4))
        })
        .collect()
}

/// Endpoint candidates from the node's addresses: IPv4, not loopback, not on the overlay
/// interface and not inside the overlay network, with the WireGuard port; in interface order,
/// without duplicates, at most [`PEER_ENDPOINTS_MAX`].
pub fn endpoint_candidates(
    addresses: &[(String, Ipv4Addr)],
    overlay_interface: &str,
    overlay_network: Option<IpCidr>,
    port: u16,
) -> Vec<String> {
    let mut endpoints = Vec::new();
    for (interface, address) in addresses {
        let inside_overlay = overlay_network
            .is_some_and(|network| network.contains(&IpCidr::host(IpAddr::V4(*address))));
        if address.is_loopback()
            || address.is_unspecified()
            || interface == overlay_interface
            || inside_overlay
        {
            continue;
        }
        let endpoint = format!("{address}:{port}");
        if !endpoints.contains(&endpoint) && endpoints.len() < PEER_ENDPOINTS_MAX {
            endpoints.push(endpoint);
        }
    }
    endpoints
}

/// The plan's overlay as this node applies it: with the local interface name.
fn local_spec(settings: &OverlaySettings, spec: &OverlaySpec) -> OverlaySpec {
    OverlaySpec {
        interface_name: local_interface_name(settings, Some(spec)),
        ..spec.clone()
    }
}

/// The overlay for `outpost-agent status` while the agent is stopped: the live device (a
/// userspace daemon outlives the agent) read without changing anything. The interface name and
/// backend come from the last snapshot the running agent wrote (it knows the local name), else
/// from the plan. `None` when the plan has no overlay.
pub fn offline_status(
    data_dir: &Path,
    plan: Option<&outpost_proto::plan::Plan>,
) -> Option<crate::apply::wireguard::OverlayStatus> {
    let spec = plan?.overlay.as_ref()?;
    let last = std::fs::read(crate::status::status_path(data_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<crate::status::AgentStatus>(&bytes).ok())
        .and_then(|status| status.overlay);
    let interface_name = last
        .as_ref()
        .map(|status| status.interface_name.clone())
        .unwrap_or_else(|| spec.interface_name.clone());
    let interface = InterfaceName::new(&interface_name).ok()?;
    let local = OverlaySpec {
        interface_name,
        ..spec.clone()
    };
    let desired = DesiredOverlay::from_spec(&local).ok();
    let kernel = last
        .as_ref()
        .is_some_and(|status| status.backend == "kernel");
    let mut backend = open_backend(if kernel {
        crate::apply::wireguard::BackendKind::Kernel
    } else {
        crate::apply::wireguard::BackendKind::Userspace(
            crate::apply::wireguard::UserspaceImplementation::WireguardGo,
        )
    });
    overlay_status(&mut backend, &interface, desired.as_ref()).ok()
}

/// What the apply thread keeps between rounds.
struct Runtime {
    applier: OverlayApplier<Box<dyn WireguardBackend + Send>>,
    /// The interface this process last applied, to remove it when the plan drops the overlay
    /// or renames it.
    applied_interface: Option<InterfaceName>,
    last_apply: Option<Instant>,
    first_round: bool,
}

/// Loads the key and starts the apply thread. Boot calls it before the sync threads start, so
/// the cached overlay comes up with no network at all.
pub fn start(agent: &std::sync::Arc<Agent>) -> anyhow::Result<()> {
    if agent.overlay.settings.mode == OverlayMode::Disabled {
        agent
            .board
            .update(|s| s.note("overlay disabled (--no-overlay)".into()));
        return Ok(());
    }
    if let Err(error) = prepare_key(agent) {
        agent
            .board
            .update(|s| s.note(format!("overlay unavailable: {error}")));
        return Ok(());
    }
    let kind = resolve_backend(
        agent.overlay.settings.backend,
        match agent.overlay.settings.backend {
            BackendChoice::Auto => probe_kernel_wireguard(
                Path::new("/sys/module"),
                crate::apply::wireguard::COMMAND_TIMEOUT,
            ),
            _ => crate::apply::wireguard::KernelModule::Missing,
        },
    );
    let runner = std::sync::Arc::clone(agent);
    let handle = std::thread::Builder::new()
        .name("overlay".into())
        .spawn(move || {
            let mut runtime = Runtime {
                applier: OverlayApplier::new(open_backend(kind)),
                applied_interface: None,
                last_apply: None,
                first_round: true,
            };
            loop {
                round(&runner, &mut runtime);
                std::thread::park_timeout(STATUS_INTERVAL);
            }
        })?;
    *lock(&agent.overlay.thread) = Some(handle.thread().clone());
    Ok(())
}

fn round(agent: &Agent, runtime: &mut Runtime) {
    let plan_changed = agent.overlay.plan_changed.swap(false, Ordering::SeqCst);
    let due = runtime
        .last_apply
        .is_none_or(|at| at.elapsed() >= WATCHDOG_INTERVAL);
    let plan = agent.current_plan();
    let settings = &agent.overlay.settings;
    let Some(key) = agent.overlay.private_key() else {
        return;
    };
    match &plan.overlay {
        Some(spec) if plan_changed || due || runtime.first_round => {
            runtime.first_round = false;
            runtime.last_apply = Some(Instant::now());
            apply(agent, runtime, &local_spec(settings, spec), &key);
        }
        Some(spec) => refresh_status(agent, runtime, &local_spec(settings, spec)),
        None => {
            let leftover = if runtime.first_round {
                InterfaceName::new(&local_interface_name(settings, None))
                    .ok()
                    .filter(|name| {
                        matches!(runtime.applier.backend_mut().read_device(name), Ok(Some(_)))
                    })
            } else {
                runtime.applied_interface.take()
            };
            runtime.first_round = false;
            if let Some(interface) = leftover {
                match runtime.applier.remove(&interface) {
                    Ok(()) => record(
                        agent,
                        "none",
                        ApplyOutcome::Ok,
                        format!("removed {interface}: the plan has no overlay"),
                    ),
                    Err(error) => record(
                        agent,
                        "none",
                        ApplyOutcome::Error,
                        format!("cannot remove {interface}: {error}"),
                    ),
                }
            }
            agent.board.update(|s| s.overlay = None);
        }
    }
}

fn apply(agent: &Agent, runtime: &mut Runtime, spec: &OverlaySpec, key: &PrivateKey) {
    let generation = sha256_hex(&outpost_proto::codec::encode(
        outpost_proto::codec::Encoding::Postcard,
        spec,
    ));
    let desired = match DesiredOverlay::from_spec(spec) {
        Ok(desired) => desired,
        Err(error) => {
            record(
                agent,
                &generation,
                ApplyOutcome::Error,
                format!("overlay refused: {error}"),
            );
            return;
        }
    };
    if let Some(previous) = runtime.applied_interface.clone()
        && previous != desired.interface_name
    {
        let _ = runtime.applier.remove(&previous);
    }
    runtime.applied_interface = Some(desired.interface_name.clone());
    match runtime
        .applier
        .apply(&desired, key, crate::os::unix_now_secs())
    {
        Ok(report) => {
            if report.changed_anything()
                || agent
                    .board
                    .snapshot()
                    .components
                    .get(COMPONENT_OVERLAY)
                    .is_none_or(|c| c.generation != generation || c.status != ApplyOutcome::Ok)
            {
                record(
                    agent,
                    &generation,
                    ApplyOutcome::Ok,
                    format!(
                        "{} {} peers ({} added, {} updated, {} removed)",
                        desired.address,
                        desired.peers.len(),
                        report.peers_added.len(),
                        report.peers_updated.len(),
                        report.peers_removed.len()
                    ),
                );
            }
        }
        Err(error) => record(
            agent,
            &generation,
            ApplyOutcome::Error,
            format!("overlay apply failed: {error}"),
        ),
    }
    refresh_status(agent, runtime, spec);
}

fn refresh_status(agent: &Agent, runtime: &mut Runtime, spec: &OverlaySpec) {
    let Ok(interface) = InterfaceName::new(&spec.interface_name) else {
        return;
    };
    let desired = DesiredOverlay::from_spec(spec).ok();
    match overlay_status(runtime.applier.backend_mut(), &interface, desired.as_ref()) {
        Ok(status) => agent.board.update(|s| s.overlay = Some(status)),
        Err(error) => agent
            .board
            .update(|s| s.note(format!("cannot read overlay {interface}: {error}"))),
    }
}

fn record(agent: &Agent, generation: &str, status: ApplyOutcome, message: String) {
    agent.record_component(
        COMPONENT_OVERLAY,
        ComponentApply {
            generation: generation.to_string(),
            status,
            message,
            at_unix: crate::os::unix_now_secs(),
        },
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<OverlaySettings, OverlaySettingError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OverlaySettings::from_settings(|key| map.get(key).map(String::as_str))
    }

    #[test]
    fn settings_parse_with_defaults_and_name_bad_values() {
        assert_eq!(settings(&[]).unwrap(), OverlaySettings::default());
        let parsed = settings(&[
            (KEY_WIREGUARD_PORT, "51999"),
            (KEY_WIREGUARD_ENDPOINT, "192.0.2.1:4000, [fd00::1]:4000"),
            (KEY_WIREGUARD_BACKEND, "wireguard-go"),
            (KEY_WIREGUARD_INTERFACE, "ow1"),
            (KEY_OVERLAY, "off"),
        ])
        .unwrap();
        assert_eq!(parsed.listen_port, 51999);
        assert_eq!(
            parsed.endpoint_overrides,
            ["192.0.2.1:4000", "[fd00::1]:4000"]
        );
        assert_eq!(parsed.mode, OverlayMode::Disabled);
        assert_eq!(parsed.interface_override.as_deref(), Some("ow1"));
        for (key, value) in [
            (KEY_WIREGUARD_PORT, "0"),
            (KEY_WIREGUARD_ENDPOINT, "192.0.2.1"),
            (KEY_WIREGUARD_BACKEND, "wg"),
            (KEY_WIREGUARD_INTERFACE, "much-too-long-name"),
            (KEY_OVERLAY, "maybe"),
        ] {
            let error = settings(&[(key, value)]).unwrap_err();
            assert_eq!(error.key, key);
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    #[test]
    fn endpoints_skip_loopback_and_the_overlay() {
        let addresses = vec![
            ("lo".to_string(), Ipv4Addr::new(127, 0, 0, 1)),
            ("ul0".to_string(), Ipv4Addr::new(10, 231, 0, 2)),
            ("outpost0".to_string(), Ipv4Addr::new(10, 232, 0, 2)),
            ("other".to_string(), Ipv4Addr::new(10, 232, 9, 9)),
            ("eth1".to_string(), Ipv4Addr::new(192, 168, 1, 5)),
            ("eth1".to_string(), Ipv4Addr::new(192, 168, 1, 5)),
        ];
        let overlay: IpCidr = "10.232.0.0/16".parse().unwrap();
        assert_eq!(
            endpoint_candidates(&addresses, "outpost0", Some(overlay), 51820),
            ["10.231.0.2:51820", "192.168.1.5:51820"]
        );
        let many: Vec<_> = (1..20)
            .map(|i| ("e".to_string(), Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        assert_eq!(
            endpoint_candidates(&many, "outpost0", None, 1).len(),
            PEER_ENDPOINTS_MAX
        );
    }

    fn test_agent(rotation: KeyRotation) -> (tempfile::TempDir, crate::boot::Agent) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::new();
        settings.insert("data_dir".into(), dir.path().display().to_string());
        settings.insert("node_id".into(), "n1".into());
        let config = crate::config::AgentConfig::from_settings(&settings).unwrap();
        let (store, _) = crate::store::Store::open_for_boot(dir.path()).unwrap();
        let store = std::sync::Arc::new(store);
        let supervisor = crate::apply::process::Supervisor::new(
            "n1",
            dir.path().to_path_buf(),
            Box::new(crate::apply::process::runtime::recording::RecordingSyscalls::default()),
            Box::new(store.clone()),
        );
        let mut agent = crate::boot::agent_for_test(config, store, supervisor, None);
        agent.overlay = OverlayHandle::new(OverlaySettings {
            rotation,
            ..OverlaySettings::default()
        });
        (dir, agent)
    }

    #[test]
    fn the_key_is_made_once_kept_in_both_identity_copies_and_rotated_on_request() {
        let (dir, agent) = test_agent(KeyRotation::KeepKey);
        assert!(agent.overlay.public_key().is_none());
        prepare_key(&agent).unwrap();
        let public = agent.overlay.public_key().unwrap();
        let stored = agent
            .store
            .state()
            .unwrap()
            .identity
            .wireguard_private_key_hex
            .unwrap();
        let copy = crate::store::read_identity_copy(dir.path()).unwrap();
        assert_eq!(
            copy.wireguard_private_key_hex.as_deref(),
            Some(stored.as_str())
        );
        assert!(!public.contains(&stored), "only the public key is reported");
        // Again (a restart): the same key.
        prepare_key(&agent).unwrap();
        assert_eq!(agent.overlay.public_key().unwrap(), public);
        // A rotation at boot makes and stores a new one.
        let mut rotating = agent;
        rotating.overlay = OverlayHandle::new(OverlaySettings {
            rotation: KeyRotation::RotateAtBoot,
            ..OverlaySettings::default()
        });
        prepare_key(&rotating).unwrap();
        let rotated = rotating.overlay.public_key().unwrap();
        assert_ne!(rotated, public);
        let copy = crate::store::read_identity_copy(dir.path()).unwrap();
        assert_ne!(
            copy.wireguard_private_key_hex.as_deref(),
            Some(stored.as_str())
        );
        // What registration and heartbeats carry.
        let mut beat = HeartbeatRequest::default();
        fill_heartbeat(&rotating, &mut beat);
        assert_eq!(beat.wireguard_public_key.as_deref(), Some(rotated.as_str()));
    }

    #[test]
    fn the_apply_round_brings_the_cached_overlay_up_and_removes_it_when_the_plan_drops_it() {
        use crate::apply::wireguard::diff::UpdateStyle;
        use crate::apply::wireguard::memory::MemoryBackend;
        let (_dir, agent) = test_agent(KeyRotation::KeepKey);
        prepare_key(&agent).unwrap();
        let peer_key = PrivateKey::generate().unwrap().public_key().to_base64();
        let mut plan =
            outpost_proto::plan::Plan::empty(outpost_proto::name::name("n", "n1").unwrap());
        plan.overlay = Some(OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/16".into(),
            listen_port: 51820,
            peers: vec![outpost_proto::overlay::OverlayPeerSpec {
                node_id: "n2".into(),
                public_key: peer_key.clone(),
                endpoints: vec!["10.231.0.2:51820".into()],
                allowed_ips: vec!["10.232.0.2/32".into()],
                persistent_keepalive_secs: 25,
            }],
        });
        agent.settle_plan(&plan, "store");
        let backend: Box<dyn WireguardBackend + Send> =
            Box::new(MemoryBackend::new(UpdateStyle::InPlace));
        let mut runtime = Runtime {
            applier: OverlayApplier::new(backend),
            applied_interface: None,
            last_apply: None,
            first_round: true,
        };
        round(&agent, &mut runtime);
        let interface = InterfaceName::new("outpost0").unwrap();
        let device = runtime
            .applier
            .backend_mut()
            .read_device(&interface)
            .unwrap()
            .unwrap();
        assert_eq!(device.peers.len(), 1);
        assert_eq!(device.listen_port, 51820);
        let status = agent.board.snapshot();
        let overlay = status.overlay.unwrap();
        assert_eq!(overlay.peers[0].node_id.as_deref(), Some("n2"));
        assert_eq!(overlay.addresses, ["10.232.0.1/16"]);
        assert_eq!(
            status.components[COMPONENT_OVERLAY].status,
            ApplyOutcome::Ok
        );
        // A status round between applies only reads.
        round(&agent, &mut runtime);
        // The plan drops the overlay: the interface goes.
        plan.overlay = None;
        agent.settle_plan(&plan, "control");
        round(&agent, &mut runtime);
        assert!(
            runtime
                .applier
                .backend_mut()
                .read_device(&interface)
                .unwrap()
                .is_none()
        );
        assert!(agent.board.snapshot().overlay.is_none());
        // A plan that the agent refuses to type is an error in status, not a crash.
        plan.overlay = Some(OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.0/16".into(),
            listen_port: 51820,
            peers: Vec::new(),
        });
        agent.settle_plan(&plan, "control");
        round(&agent, &mut runtime);
        let apply = &agent.board.snapshot().components[COMPONENT_OVERLAY];
        assert_eq!(apply.status, ApplyOutcome::Error);
        assert!(apply.message.contains("address"), "{}", apply.message);
    }

    #[test]
    fn overlay_switches_parse_from_the_command_line() {
        let args: Vec<String> = [
            "run",
            "--no-overlay",
            "--rotate-wireguard-key",
            "--wireguard-port",
            "4000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let crate::config::Invocation::Run { mut flags, .. } =
            crate::config::parse_args(&args).unwrap()
        else {
            panic!("not run")
        };
        flags.insert("data_dir".into(), "/d".into());
        let config = crate::config::AgentConfig::from_settings(&flags).unwrap();
        assert_eq!(config.overlay.mode, OverlayMode::Disabled);
        assert_eq!(config.overlay.rotation, KeyRotation::RotateAtBoot);
        assert_eq!(config.overlay.listen_port, 4000);
        // The rotation is a flag only: the environment cannot ask for it on every boot.
        let env = crate::config::settings_from_env(vec![(
            "OUTPOST_ROTATE_WIREGUARD_KEY".to_string(),
            "true".to_string(),
        )]);
        assert!(env.is_empty());
    }

    #[test]
    fn the_local_interface_name_wins_over_the_plans() {
        let spec = OverlaySpec {
            interface_name: "outpost0".into(),
            address: "10.232.0.1/16".into(),
            listen_port: 51820,
            peers: vec![],
        };
        let mut settings = OverlaySettings::default();
        assert_eq!(local_spec(&settings, &spec).interface_name, "outpost0");
        settings.interface_override = Some("ow7".into());
        assert_eq!(local_spec(&settings, &spec).interface_name, "ow7");
        assert_eq!(
            local_interface_name(&OverlaySettings::default(), None),
            DEFAULT_INTERFACE_NAME
        );
    }
}
