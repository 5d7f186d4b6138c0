//! The node's WireGuard overlay at run time (P9, O2): its private key (generated here, kept in
//! the identity record, never sent anywhere), the public key and endpoint candidates it reports
//! at registration and in heartbeats, and the thread that keeps the interface matching the
//! plan's overlay — at boot from the cached plan (no network needed), on every plan change, and
//! every [`WATCHDOG_INTERVAL`] (each apply also restarts a hung userspace daemon).
//!
//! The applying itself lives in `apply::wireguard`; this module only wires it to the agent.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_proto::hash::sha256_hex;
use outpost_proto::node::{HeartbeatRequest, RegisterRequest};
use outpost_proto::overlay::{OverlaySpec, PEER_ENDPOINTS_MAX};

use crate::apply::wireguard::{
    BackendChoice, DesiredOverlay, InterfaceName, IpCidr, OverlayApplier, PrivateKey,
    WireguardBackend, auto_userspace, open_backend, overlay_status, probe_kernel_wireguard,
    resolve_backend,
};
use crate::config::AgentConfig;
use crate::node::{Bell, NodeState, PlanState};
use crate::status::StatusBoard;
use crate::store::{ApplyOutcome, ComponentApply, Identity, Store};

/// How often the overlay is applied again without a plan change (the watchdog).
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(15);
/// How often the overlay part of status (handshakes, bytes) is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// The component name under which overlay applies are recorded (C10).
pub const COMPONENT_OVERLAY: &str = "overlay";
pub use crate::config::overlay::*;

/// The agent's overlay state shared between threads: the key and the apply thread's wake-up.
pub struct OverlayHandle {
    pub settings: OverlaySettings,
    key: Mutex<Option<PrivateKey>>,
    /// Rung when a plan is settled (`PlanState` holds the other end); the apply thread waits
    /// on it.
    plan_changed: Arc<Bell>,
}

/// What the overlay thread, registration and heartbeats need for the overlay.
#[derive(Clone)]
pub struct OverlayParts {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub node: Arc<NodeState>,
    pub plan: Arc<PlanState>,
    pub overlay: Arc<OverlayHandle>,
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
            plan_changed: Arc::new(Bell::default()),
        }
    }

    /// The bell a settled plan rings to wake the apply thread.
    pub fn plan_changed(&self) -> Arc<Bell> {
        self.plan_changed.clone()
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
        self.plan_changed.ring();
    }
}

/// Loads the private key from the identity, or makes one (and stores it in the identity table
/// and its copy before anything reports the public key). `RotateAtBoot` always makes a new one.
pub fn prepare_key(agent: &OverlayParts) -> Result<(), String> {
    if agent.overlay.settings.mode == OverlayMode::Disabled {
        return Ok(());
    }
    let mut identity = agent.node.identity_lock();
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
pub fn fill_registration(agent: &OverlayParts, request: &mut RegisterRequest) {
    let Some(public_key) = agent.overlay.public_key() else {
        return;
    };
    request.wireguard_public_key = Some(public_key);
    request.wireguard_listen_port = Some(agent.overlay.settings.listen_port);
    request.endpoints = endpoints_now(agent);
}

/// Puts the overlay part of a heartbeat into `request`.
pub fn fill_heartbeat(agent: &OverlayParts, request: &mut HeartbeatRequest) {
    let Some(public_key) = agent.overlay.public_key() else {
        return;
    };
    request.wireguard_public_key = Some(public_key);
    request.endpoints = endpoints_now(agent);
}

/// The address the node's instances are reached at on its LAN (route backends, E2):
/// `--advertise-ip`, else the first WireGuard endpoint candidate's IP, else the first
/// non-loopback IPv4 address of the host.
pub fn lan_address(agent: &OverlayParts, endpoints: &[String]) -> Option<String> {
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
fn endpoints_now(agent: &OverlayParts) -> Vec<String> {
    let settings = &agent.overlay.settings;
    if !settings.endpoint_overrides.is_empty() {
        return settings.endpoint_overrides.clone();
    }
    let plan = agent.plan.current_plan();
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
pub fn start(agent: &OverlayParts) -> anyhow::Result<()> {
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
        auto_userspace(std::env::var_os("PATH").as_deref()),
    );
    let runner = agent.clone();
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
    agent.overlay.plan_changed.attach(handle.thread().clone());
    Ok(())
}

fn round(agent: &OverlayParts, runtime: &mut Runtime) {
    let plan_changed = agent.overlay.plan_changed.take();
    let due = runtime
        .last_apply
        .is_none_or(|at| at.elapsed() >= WATCHDOG_INTERVAL);
    let plan = agent.plan.current_plan();
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

fn apply(agent: &OverlayParts, runtime: &mut Runtime, spec: &OverlaySpec, key: &PrivateKey) {
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

fn refresh_status(agent: &OverlayParts, runtime: &mut Runtime, spec: &OverlaySpec) {
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

fn record(agent: &OverlayParts, generation: &str, status: ApplyOutcome, message: String) {
    crate::node::record_component(
        &agent.store,
        &agent.board,
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

    fn test_agent(rotation: KeyRotation) -> (tempfile::TempDir, OverlayParts) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::new();
        settings.insert("data_dir".into(), dir.path().display().to_string());
        settings.insert("node_id".into(), "n1".into());
        let mut config = crate::config::AgentConfig::from_settings(&settings).unwrap();
        config.overlay = OverlaySettings {
            rotation,
            ..OverlaySettings::default()
        };
        let (store, _) = crate::store::Store::open_for_boot(dir.path()).unwrap();
        let store = std::sync::Arc::new(store);
        let supervisor = crate::apply::process::Supervisor::new(
            "n1",
            dir.path().to_path_buf(),
            Box::new(crate::apply::process::runtime::recording::RecordingSyscalls::default()),
            Box::new(store.clone()),
        );
        let agent = crate::boot::agent_for_test(config, store, supervisor, None).overlay_parts();
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
        rotating.overlay = Arc::new(OverlayHandle::new(OverlaySettings {
            rotation: KeyRotation::RotateAtBoot,
            ..OverlaySettings::default()
        }));
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
        agent.plan.settle_plan(&plan, "store");
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
        agent.plan.settle_plan(&plan, "control");
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
        agent.plan.settle_plan(&plan, "control");
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
