//! Service specs: what an operator declares and what an allocation runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::{ArtifactRef, check_relative_command};
use crate::limits::{
    ARGS_MAX, ENV_VARS_MAX, REPLICAS_MAX, RESCHEDULE_AFTER_DEFAULT_SECS, RESCHEDULE_AFTER_MAX_SECS,
    SELECTOR_ARCH_MAX, SERVICE_PORTS_MAX,
};
use crate::name::{Name, check_name};
use crate::node::check_labels;
use crate::rollout::RolloutPolicy;
use crate::validate::{Validate, ValidationError, check_count, check_text};

/// A service as submitted by an operator (`outpostctl services apply`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: Name,
    /// One process type per instance (P7), e.g. `web` or `worker`.
    #[serde(default = "default_process_type")]
    pub process_type: Name,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A count, or `all`: one instance on every eligible node (F2).
    #[serde(default)]
    pub replicas: Replicas,
    /// Memory request; never oversubscribed on a node.
    #[serde(default)]
    pub memory_bytes: u64,
    /// CPU request in thousandths of a core; soft.
    #[serde(default)]
    pub cpu_millis: u32,
    /// Start order (B2): wave n+1 starts once every service of wave n is ready.
    #[serde(default)]
    pub wave: u32,
    #[serde(default)]
    pub readiness: Option<ReadinessCheck>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u32,
    /// Working directory; the agent uses a per-allocation directory when absent.
    #[serde(default)]
    pub working_dir: Option<String>,
    // Placement (F1, F2): which nodes may run it, and what a lost node means. Control reads
    // these; the agent ignores them, and changing them alone restarts nothing.
    /// Which nodes may run an instance; empty selects every node of the org.
    #[serde(default)]
    pub selector: Selector,
    /// `never`: the instances of a lost node stay with it. Default: they move after
    /// `reschedule_after_secs`.
    #[serde(default)]
    pub reschedule: Reschedule,
    /// How long a node may be `down` before its instances are placed elsewhere (default 300).
    #[serde(default)]
    pub reschedule_after_secs: Option<u32>,
    /// The artifact the service runs from (R1); a relative `command` resolves inside it.
    #[serde(default)]
    pub artifact: Option<ArtifactRef>,
    /// How a change of this spec replaces running instances (R3); absent means all at once.
    #[serde(default)]
    pub rollout: Option<RolloutPolicy>,
    /// Secrets the instance gets as environment variables or files (P11), by reference:
    /// `[{name: db, env: {DB_PASSWORD: password}}]`. Last field: postcard is positional.
    #[serde(default)]
    pub secrets: Vec<crate::secret::SecretRef>,
    /// Named ports (`[{name: http, port: 0}]`); with port 0 the agent picks a free one per
    /// instance. The process gets `OUTPOST_PORT_<NAME>`. Last, so older plans still decode.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// One named port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Name,
    /// 0: the agent picks a free port per instance.
    #[serde(default)]
    pub port: u32,
}

impl ServicePort {
    /// The environment variable that carries the port: `OUTPOST_PORT_HTTP` for `http`.
    pub fn env_name(&self) -> String {
        port_env_name(&self.name)
    }
}

/// `OUTPOST_PORT_<NAME>`, upper case, with `-` and `.` as `_`.
pub fn port_env_name(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("OUTPOST_PORT_{upper}")
}

/// How many instances a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Replicas {
    /// This many, spread over the eligible nodes.
    Count(u32),
    /// One on every eligible node, including nodes that join later.
    All,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas::Count(1)
    }
}

impl Replicas {
    /// The count, or `None` for `all`.
    pub fn count(self) -> Option<u32> {
        match self {
            Replicas::Count(count) => Some(count),
            Replicas::All => None,
        }
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replicas::Count(count) => write!(f, "{count}"),
            Replicas::All => f.write_str("all"),
        }
    }
}

/// Postcard form of [`Replicas`] (positional, so a plain enum); JSON and YAML use a number or
/// the word `all`.
#[derive(Serialize, Deserialize)]
enum ReplicasWire {
    Count(u32),
    All,
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match (serializer.is_human_readable(), *self) {
            (true, Replicas::Count(count)) => serializer.serialize_u32(count),
            (true, Replicas::All) => serializer.serialize_str("all"),
            (false, Replicas::Count(count)) => ReplicasWire::Count(count).serialize(serializer),
            (false, Replicas::All) => ReplicasWire::All.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return Ok(match ReplicasWire::deserialize(deserializer)? {
                ReplicasWire::Count(count) => Replicas::Count(count),
                ReplicasWire::All => Replicas::All,
            });
        }
        struct CountOrAll;
        impl serde::de::Visitor<'_> for CountOrAll {
            type Value = Replicas;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a replica count or `all` (not both)")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Replicas, E> {
                u32::try_from(value)
                    .map(Replicas::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Replicas, E> {
                u64::try_from(value)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
                    .and_then(|value| self.visit_u64(value))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Replicas, E> {
                if value == "all" {
                    Ok(Replicas::All)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(value), &self))
                }
            }
        }
        deserializer.deserialize_any(CountOrAll)
    }
}

/// Which nodes may run a service (F2): every label listed must match, and when `arch` is not
/// empty the node's architecture must be one of them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Selector {
    #[serde(default)]
    pub labels: BTreeMap<Name, String>,
    #[serde(default)]
    pub arch: Vec<String>,
}

impl Selector {
    /// Whether a node with these labels and this architecture is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>, arch: &str) -> bool {
        self.labels
            .iter()
            .all(|(key, value)| labels.get(key.as_str()) == Some(value))
            && (self.arch.is_empty() || self.arch.iter().any(|wanted| wanted == arch))
    }
}

impl Validate for Selector {
    fn validate(&self) -> Result<(), ValidationError> {
        check_labels("labels", &self.labels)?;
        check_count("arch", self.arch.len(), SELECTOR_ARCH_MAX)?;
        for (index, arch) in self.arch.iter().enumerate() {
            check_name(&format!("arch[{index}]"), arch)?;
        }
        Ok(())
    }
}

/// Whether a lost node's instances move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reschedule {
    /// After `reschedule_after_secs` of the node being down.
    #[default]
    After,
    /// Never: the work belongs to the box.
    Never,
}

/// What a lost node means for a service's instances, from `reschedule` and
/// `reschedule_after_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostNodePolicy {
    MoveAfterSecs(u32),
    Stay,
}

impl ServiceSpec {
    pub fn lost_node_policy(&self) -> LostNodePolicy {
        match self.reschedule {
            Reschedule::Never => LostNodePolicy::Stay,
            Reschedule::After => LostNodePolicy::MoveAfterSecs(
                self.reschedule_after_secs
                    .unwrap_or(RESCHEDULE_AFTER_DEFAULT_SECS),
            ),
        }
    }

    /// The spec as an instance runs it: without the placement fields and the rollout policy,
    /// which never restart it.
    pub fn as_instance(&self) -> ServiceSpec {
        ServiceSpec {
            replicas: Replicas::Count(0),
            selector: Selector::default(),
            reschedule: Reschedule::default(),
            reschedule_after_secs: None,
            rollout: None,
            ..self.clone()
        }
    }
}

fn default_process_type() -> Name {
    Name::try_from("web").unwrap_or_default()
}
fn default_stop_grace_ms() -> u32 {
    5_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// How the agent decides a service instance is ready (B2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessCheck {
    pub probe: ReadinessProbe,
    /// How long the instance has to become ready before its wave is reported unready.
    #[serde(default = "default_readiness_timeout_ms")]
    pub timeout_ms: u32,
    #[serde(default = "default_readiness_interval_ms")]
    pub interval_ms: u32,
}

fn default_readiness_timeout_ms() -> u32 {
    30_000
}
fn default_readiness_interval_ms() -> u32 {
    500
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessProbe {
    /// GET `http://127.0.0.1:{port}{path}` answers 2xx.
    Http { port: u16, path: String },
    /// A TCP connect to `127.0.0.1:{port}` succeeds.
    Tcp { port: u16 },
    /// The command exits 0.
    Exec { command: String, args: Vec<String> },
}

impl Validate for ServiceSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        check_name("process_type", &self.process_type)?;
        if self.command.trim().is_empty() {
            return Err(ValidationError::new(
                "command",
                "must not be empty",
                &self.command,
            ));
        }
        check_text("command", &self.command)?;
        check_count("args", self.args.len(), ARGS_MAX)?;
        for (index, arg) in self.args.iter().enumerate() {
            check_text(&format!("args[{index}]"), arg)?;
        }
        check_count("env", self.env.len(), ENV_VARS_MAX)?;
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ValidationError::new(
                    "env",
                    "variable names must be non-empty without '=' or NUL",
                    key,
                ));
            }
            check_text(&format!("env.{key}"), value)?;
        }
        if let Replicas::Count(count) = self.replicas
            && count > REPLICAS_MAX
        {
            return Err(ValidationError::new(
                "replicas",
                format!("more than {REPLICAS_MAX}"),
                count,
            ));
        }
        self.selector.validate().map_err(|e| e.within("selector"))?;
        if let Some(after_secs) = self.reschedule_after_secs {
            if after_secs > RESCHEDULE_AFTER_MAX_SECS {
                return Err(ValidationError::new(
                    "reschedule_after_secs",
                    format!(
                        "must be 0 to {RESCHEDULE_AFTER_MAX_SECS} (7 days); for work tied to its box use reschedule: never"
                    ),
                    after_secs,
                ));
            }
            if self.reschedule == Reschedule::Never {
                return Err(ValidationError::new(
                    "reschedule_after_secs",
                    "cannot be combined with reschedule: never",
                    after_secs,
                ));
            }
        }
        if let Some(readiness) = &self.readiness {
            readiness.validate().map_err(|e| e.within("readiness"))?;
        }
        if let Some(dir) = &self.working_dir {
            check_text("working_dir", dir)?;
        }
        check_count("ports", self.ports.len(), SERVICE_PORTS_MAX)?;
        let mut seen = std::collections::BTreeSet::new();
        for (index, port) in self.ports.iter().enumerate() {
            check_name(&format!("ports[{index}].name"), &port.name)?;
            if !seen.insert(port.name.as_str()) {
                return Err(ValidationError::new(
                    format!("ports[{index}].name"),
                    "names a port twice",
                    &port.name,
                ));
            }
            if port.port > u32::from(u16::MAX) {
                return Err(ValidationError::new(
                    format!("ports[{index}].port"),
                    "must be 0 (the agent picks) to 65535",
                    port.port,
                ));
            }
        }
        if let Some(artifact) = &self.artifact {
            artifact.validate().map_err(|e| e.within("artifact"))?;
            check_relative_command("command", &self.command)?;
        }
        if let Some(rollout) = &self.rollout {
            rollout.validate().map_err(|e| e.within("rollout"))?;
        }
        crate::secret::check_secret_refs(&self.secrets)?;
        for (index, reference) in self.secrets.iter().enumerate() {
            if let Some(variable) = reference.env.keys().find(|v| self.env.contains_key(*v)) {
                return Err(ValidationError::new(
                    format!("secrets[{index}].env"),
                    "is also set in env; a variable comes from one place",
                    variable,
                ));
            }
        }
        Ok(())
    }
}

impl Validate for ReadinessCheck {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.timeout_ms == 0 {
            return Err(ValidationError::new(
                "timeout_ms",
                "must be positive",
                self.timeout_ms,
            ));
        }
        if self.interval_ms == 0 {
            return Err(ValidationError::new(
                "interval_ms",
                "must be positive",
                self.interval_ms,
            ));
        }
        match &self.probe {
            ReadinessProbe::Http { port, path } => {
                if *port == 0 {
                    return Err(ValidationError::new(
                        "probe.http.port",
                        "must not be 0",
                        port,
                    ));
                }
                if !path.starts_with('/') {
                    return Err(ValidationError::new(
                        "probe.http.path",
                        "must start with '/'",
                        path,
                    ));
                }
                check_text("probe.http.path", path)
            }
            ReadinessProbe::Tcp { port } => {
                if *port == 0 {
                    return Err(ValidationError::new(
                        "probe.tcp.port",
                        "must not be 0",
                        port,
                    ));
                }
                Ok(())
            }
            ReadinessProbe::Exec { command, args } => {
                check_text("probe.exec.command", command)?;
                check_count("probe.exec.args", args.len(), ARGS_MAX)?;
                args.iter()
                    .try_for_each(|arg| check_text("probe.exec.args", arg))
            }
        }
    }
}

#[cfg(test)]
pub(crate) fn sample_spec(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: Name::try_from(name).unwrap(),
        process_type: default_process_type(),
        command: "/bin/sleep".into(),
        args: vec!["3600".into()],
        env: BTreeMap::new(),
        replicas: Replicas::Count(1),
        memory_bytes: 64 << 20,
        cpu_millis: 100,
        wave: 0,
        readiness: None,
        restart: RestartPolicy::Always,
        stop_grace_ms: 1000,
        working_dir: None,
        ports: Vec::new(),
        selector: Selector::default(),
        reschedule: Reschedule::After,
        reschedule_after_secs: None,
        artifact: None,
        rollout: None,
        secrets: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_json_gets_defaults() {
        let spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"web","command":"/bin/true"}"#).unwrap();
        assert_eq!(spec.replicas, Replicas::Count(1));
        assert_eq!(
            spec.lost_node_policy(),
            LostNodePolicy::MoveAfterSecs(RESCHEDULE_AFTER_DEFAULT_SECS)
        );
        assert_eq!(spec.process_type.as_str(), "web");
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = sample_spec("web");
        spec.replicas = Replicas::Count(REPLICAS_MAX + 1);
        assert_eq!(spec.validate().unwrap_err().field, "replicas");
        let mut spec = sample_spec("web");
        spec.readiness = Some(ReadinessCheck {
            probe: ReadinessProbe::Http {
                port: 8080,
                path: "health".into(),
            },
            timeout_ms: 1000,
            interval_ms: 100,
        });
        assert_eq!(
            spec.validate().unwrap_err().field,
            "readiness.probe.http.path"
        );
    }

    #[test]
    fn placement_fields_read_and_refuse_by_name() {
        let spec: ServiceSpec = serde_json::from_str(
            r#"{"name":"web","command":"/bin/true","replicas":"all",
                "selector":{"labels":{"site":"North-1"},"arch":["aarch64"]},
                "reschedule_after_secs":600}"#,
        )
        .unwrap();
        assert_eq!(spec.replicas, Replicas::All);
        assert_eq!(spec.lost_node_policy(), LostNodePolicy::MoveAfterSecs(600));
        assert!(spec.validate().is_ok());
        let node_labels: BTreeMap<String, String> = [("site".into(), "North-1".into())].into();
        assert!(spec.selector.matches(&node_labels, "aarch64"));
        assert!(!spec.selector.matches(&node_labels, "x86_64"));
        assert!(!spec.selector.matches(&BTreeMap::new(), "aarch64"));
        // A count and `all` at once, or anything else, is not a replica count.
        for bad in [r#""all 3""#, r#"["all",3]"#, r#""3""#, "-1"] {
            let text = format!(r#"{{"name":"web","command":"/bin/true","replicas":{bad}}}"#);
            let error = serde_json::from_str::<ServiceSpec>(&text).unwrap_err();
            assert!(
                error.to_string().contains("count or `all`"),
                "{bad}: {error}"
            );
        }
        let mut spec = sample_spec("web");
        spec.reschedule_after_secs = Some(RESCHEDULE_AFTER_MAX_SECS + 1);
        assert_eq!(spec.validate().unwrap_err().field, "reschedule_after_secs");
        spec.reschedule_after_secs = Some(10);
        spec.reschedule = Reschedule::Never;
        assert_eq!(spec.validate().unwrap_err().field, "reschedule_after_secs");
        spec.reschedule_after_secs = None;
        assert_eq!(spec.lost_node_policy(), LostNodePolicy::Stay);
        spec.selector
            .labels
            .insert(Name::try_from("site").unwrap(), "no space".into());
        let error = spec.validate().unwrap_err();
        assert_eq!(
            (error.field.as_str(), error.value.as_str()),
            ("selector.labels.site", "no space")
        );
        let mut spec = sample_spec("web");
        spec.selector.arch = vec!["X86".into()];
        assert_eq!(spec.validate().unwrap_err().field, "selector.arch[0]");
    }

    #[test]
    fn replicas_round_trip_in_both_codecs() {
        for replicas in [Replicas::Count(0), Replicas::Count(7), Replicas::All] {
            let spec = ServiceSpec {
                replicas,
                ..sample_spec("web")
            };
            let json: ServiceSpec =
                serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
            assert_eq!(json, spec);
            let bytes = postcard::to_allocvec(&spec).unwrap();
            assert_eq!(postcard::from_bytes::<ServiceSpec>(&bytes).unwrap(), spec);
        }
    }

    #[test]
    fn probe_json_shape() {
        let check: ReadinessCheck =
            serde_json::from_str(r#"{"probe":{"tcp":{"port":80}},"timeout_ms":500}"#).unwrap();
        assert_eq!(check.probe, ReadinessProbe::Tcp { port: 80 });
    }
}
