//! Service specs: what an operator declares and what an allocation runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::{ArtifactRef, check_relative_command};
use crate::limits::{ARGS_MAX, ENV_VARS_MAX, REPLICAS_MAX};
use crate::name::{Name, check_name};
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
    #[serde(default = "default_replicas")]
    pub replicas: u32,
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
}

fn default_process_type() -> Name {
    Name::try_from("web").unwrap_or_default()
}
fn default_replicas() -> u32 {
    1
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
        if self.replicas > REPLICAS_MAX {
            return Err(ValidationError::new(
                "replicas",
                format!("more than {REPLICAS_MAX}"),
                self.replicas,
            ));
        }
        if let Some(readiness) = &self.readiness {
            readiness.validate().map_err(|e| e.within("readiness"))?;
        }
        if let Some(dir) = &self.working_dir {
            check_text("working_dir", dir)?;
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
        replicas: 1,
        memory_bytes: 64 << 20,
        cpu_millis: 100,
        wave: 0,
        readiness: None,
        restart: RestartPolicy::Always,
        stop_grace_ms: 1000,
        working_dir: None,
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
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.process_type.as_str(), "web");
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = sample_spec("web");
        spec.replicas = REPLICAS_MAX + 1;
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
    fn probe_json_shape() {
        let check: ReadinessCheck =
            serde_json::from_str(r#"{"probe":{"tcp":{"port":80}},"timeout_ms":500}"#).unwrap();
        assert_eq!(check.probe, ReadinessProbe::Tcp { port: 80 });
    }
}
