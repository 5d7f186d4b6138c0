//! Agent settings: parsed from command-line flags, `OUTPOST_*` environment variables and a JSON
//! config file into one abstract map, then validated once into [`AgentConfig`].
//!
//! Precedence: flags over environment over file. Tests pass maps; nothing here reads the process
//! environment or the file system except [`load_file_settings`].

pub mod overlay;
pub mod site;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use outpost_proto::Name;
use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::name::name;

use crate::logging::{LogFormat, LogSettings, parse_level};

/// Settings by key (`data_dir`, `control_url`, ...), from any source.
pub type Settings = BTreeMap<String, String>;

pub const KEY_DATA_DIR: &str = "data_dir";
pub const KEY_CONTROL_URL: &str = "control_url";
pub const KEY_ENROLL_TOKEN: &str = "enroll_token";
pub const KEY_STATUS_LISTEN: &str = "status_listen";
pub const KEY_NODE_ID: &str = "node_id";
pub const KEY_FEED_WAIT_SECS: &str = "feed_wait_secs";
pub const KEY_LOG_CAP_BYTES: &str = "log_cap_bytes";
pub const KEY_CGROUP_ROOT: &str = "cgroup_root";
pub const KEY_WORKLOADS_ON_EXIT: &str = "workloads_on_exit";
pub const KEY_PROFILE_POLL_SECS: &str = "profile_poll_secs";
pub const KEY_PROFILE_VERIFY_SECS: &str = "profile_verify_secs";
/// The node's own labels (F2), `KEY=VALUE` separated by commas; `--label` may repeat.
pub const KEY_LABELS: &str = "labels";
pub const KEY_ARTIFACT_CACHE_BYTES: &str = "artifact_cache_bytes";
/// R4: how long a new instance without a readiness check stays up before its plan is last-good.
pub const KEY_HEALTHY_AFTER_SECS: &str = "healthy_after_secs";
/// `--log-format text|json` / `OUTPOST_LOG_FORMAT` (logging.rs).
pub const KEY_LOG_FORMAT: &str = "log_format";
/// `OUTPOST_LOG`: the most verbose level written (`info` by default).
pub const KEY_LOG: &str = "log";

const KNOWN_KEYS: &[&str] = &[
    site::KEY_JOIN_SECRET,
    site::KEY_MAY_LEAD,
    site::KEY_DISCOVERY,
    site::KEY_LEASE_TTL_SECS,
    site::KEY_CONTROL_PROGRAM,
    site::KEY_CONTROL_PORT,
    site::KEY_ELECTION_PORT,
    site::KEY_ADVERTISE_IP,
    KEY_DATA_DIR,
    KEY_CONTROL_URL,
    KEY_ENROLL_TOKEN,
    KEY_STATUS_LISTEN,
    KEY_NODE_ID,
    KEY_FEED_WAIT_SECS,
    KEY_LOG_CAP_BYTES,
    KEY_CGROUP_ROOT,
    KEY_WORKLOADS_ON_EXIT,
    overlay::KEY_WIREGUARD_PORT,
    overlay::KEY_WIREGUARD_ENDPOINT,
    overlay::KEY_WIREGUARD_BACKEND,
    overlay::KEY_WIREGUARD_INTERFACE,
    overlay::KEY_OVERLAY,
    KEY_PROFILE_POLL_SECS,
    KEY_PROFILE_VERIFY_SECS,
    KEY_LABELS,
    KEY_ARTIFACT_CACHE_BYTES,
    KEY_HEALTHY_AFTER_SECS,
    KEY_LOG_FORMAT,
    KEY_LOG,
];

pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:7450";
pub const DEFAULT_FEED_WAIT_SECS: u64 = 300;
pub const DEFAULT_LOG_CAP_BYTES: u64 = 1024 * 1024;
/// Default `--artifact-cache-bytes`: 2 GiB of unpacked artifacts (R1).
pub const DEFAULT_ARTIFACT_CACHE_BYTES: u64 = 2 << 30;
/// How often the environment profile is fetched from control (profile_runner).
pub const DEFAULT_PROFILE_POLL_SECS: u64 = 30;
/// How often the profile's actual state is verified and repaired (C1 VerifyActual).
pub const DEFAULT_PROFILE_VERIFY_SECS: u64 = 600;
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const CONFIG_FILE_NAME: &str = "agent.json";
const CONFIG_FILE_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown command {0:?}; expected run, status, stop-all or reconcile (see --help)")]
    UnknownCommand(String),
    #[error("unknown flag {0:?} for {1}")]
    UnknownFlag(String, &'static str),
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("{key} is required (flag, OUTPOST_{} or config file)", key.to_uppercase())]
    Missing { key: &'static str },
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// What to do with workloads when the agent exits on SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadsOnExit {
    /// Leave them running; the next agent adopts them (the default).
    Leave,
    /// Stop them (SIGTERM, then SIGKILL after their grace) before exiting.
    Stop,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutput {
    Text,
    Json,
}

/// The validated settings of `outpost-agent run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// Discovery, join secret and leadership (D2, D6, D7).
    pub site: site::SiteConfig,
    pub control_url: Option<String>,
    pub enroll_token: Option<String>,
    pub status_listen: SocketAddr,
    pub node_id: Option<Name>,
    pub feed_wait_secs: u64,
    pub log_cap_bytes: u64,
    /// Size cap of the artifact cache; what the plans reference is kept even past it.
    pub artifact_cache_bytes: u64,
    /// R4 (`sync::promote`); 0: a plan whose new instances have no readiness check is last-good
    /// once applied.
    pub healthy_after_secs: u64,
    pub cgroup_root: PathBuf,
    pub workloads_on_exit: WorkloadsOnExit,
    pub profile_poll_secs: u64,
    pub profile_verify_secs: u64,
    pub overlay: overlay::OverlaySettings,
    /// Labels the node reports at registration (F2); selectors match them.
    pub labels: BTreeMap<Name, String>,
    /// Line format and level of the agent's own logs (logging.rs).
    pub log: LogSettings,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Run {
        flags: Settings,
        config_file: Option<PathBuf>,
    },
    Status {
        flags: Settings,
        output: StatusOutput,
    },
    StopAll {
        flags: Settings,
    },
    Help,
    Version,
}

pub const USAGE: &str = "usage:
  outpost-agent run [--data-dir DIR] [--control URL] [--enroll TOKEN] [--status-listen ADDR]
                    [--node-id NAME] [--config FILE] [--feed-wait-secs N] [--stop-workloads-on-exit]
                    [--label KEY=VALUE]... (F2: reported at registration; selectors match them)
                    [--profile-poll-secs N (30)] [--profile-verify-secs N (600)]
                    [--artifact-cache-bytes N (2 GiB)] [--healthy-after-secs N (10)]
                    [--log-format text|json]
                    [--wireguard-port PORT (51820)] [--wireguard-endpoint IP:PORT[,…]]
                    [--wireguard-backend auto|kernel|wireguard-go|boringtun]
                    [--wireguard-interface NAME] [--no-overlay] [--rotate-wireguard-key]
                    [--join-secret S] [--may-lead yes|no] [--discovery auto|mdns|off]
                    [--lease-ttl-secs N (15)] [--control-program PATH] [--control-port N (7443)]
                    [--election-port N (7446)] [--advertise-ip IPV4]   (docs/election.md)
  outpost-agent status [--data-dir DIR] [--json]
  outpost-agent stop-all [--data-dir DIR]
  outpost-agent reconcile [--data-dir DIR] [--dry-run] [--profile FILE] [--ack-destructive HASH]
                    [--node-id ID]
      runs the environment-profile reconcilers once on DIR/profile.json (or FILE) and prints
      what it did; --dry-run prints the diff and its hash, destructive steps included.
      Exit code: 0 converged, 1 failed or needs attention, 2 the dry run found destructive steps.
      Adapters: MINIO_ENDPOINT, AMQP_URL, WEAVIATE_URL (unset: local defaults under DIR).
environment: OUTPOST_DATA_DIR, OUTPOST_CONTROL_URL, OUTPOST_ENROLL_TOKEN, OUTPOST_STATUS_LISTEN,
             OUTPOST_NODE_ID, OUTPOST_LABELS (KEY=VALUE,…), OUTPOST_LOG_FORMAT, OUTPOST_LOG (level),
             OUTPOST_AGENT_CONFIG; config file: DIR/agent.json (JSON object of settings)";

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Invocation, ConfigError> {
    let Some((command, rest)) = args.split_first() else {
        return Ok(Invocation::Help);
    };
    match command.as_str() {
        "-h" | "--help" | "help" => Ok(Invocation::Help),
        "-V" | "--version" | "version" => Ok(Invocation::Version),
        "run" => {
            let mut flags = Settings::new();
            let mut config_file = None;
            let mut index = 0;
            while index < rest.len() {
                let flag = rest[index].as_str();
                let (flag, inline) = match flag.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_string())),
                    None => (flag, None),
                };
                if flag == "--stop-workloads-on-exit" {
                    flags.insert(KEY_WORKLOADS_ON_EXIT.into(), "stop".into());
                    index += 1;
                    continue;
                }
                if let Some((key, value)) = overlay::switch_flag(flag) {
                    flags.insert(key.into(), value.into());
                    index += 1;
                    continue;
                }
                let key = match flag {
                    "--data-dir" => KEY_DATA_DIR,
                    "--control" => KEY_CONTROL_URL,
                    "--enroll" => KEY_ENROLL_TOKEN,
                    "--status-listen" => KEY_STATUS_LISTEN,
                    "--node-id" => KEY_NODE_ID,
                    "--feed-wait-secs" => KEY_FEED_WAIT_SECS,
                    site_flag if site::SITE_FLAGS.iter().any(|(f, _)| *f == site_flag) => {
                        site::SITE_FLAGS
                            .iter()
                            .find(|(f, _)| *f == site_flag)
                            .map_or(KEY_DATA_DIR, |(_, key)| key)
                    }
                    "--profile-poll-secs" => KEY_PROFILE_POLL_SECS,
                    "--wireguard-port" => overlay::KEY_WIREGUARD_PORT,
                    "--wireguard-endpoint" => overlay::KEY_WIREGUARD_ENDPOINT,
                    "--wireguard-backend" => overlay::KEY_WIREGUARD_BACKEND,
                    "--wireguard-interface" => overlay::KEY_WIREGUARD_INTERFACE,
                    "--profile-verify-secs" => KEY_PROFILE_VERIFY_SECS,
                    "--label" => KEY_LABELS,
                    "--artifact-cache-bytes" => KEY_ARTIFACT_CACHE_BYTES,
                    "--healthy-after-secs" => KEY_HEALTHY_AFTER_SECS,
                    "--log-format" => KEY_LOG_FORMAT,
                    "--config" => "config",
                    _ => return Err(ConfigError::UnknownFlag(flag.to_string(), "run")),
                };
                let value = match inline {
                    Some(value) => value,
                    None => {
                        index += 1;
                        rest.get(index)
                            .cloned()
                            .ok_or_else(|| ConfigError::MissingValue(flag.to_string()))?
                    }
                };
                if key == "config" {
                    config_file = Some(PathBuf::from(value));
                } else if key == KEY_LABELS
                    && let Some(earlier) = flags.get_mut(KEY_LABELS)
                {
                    earlier.push(',');
                    earlier.push_str(&value);
                } else {
                    flags.insert(key.to_string(), value);
                }
                index += 1;
            }
            Ok(Invocation::Run { flags, config_file })
        }
        "status" | "stop-all" => {
            let mut flags = Settings::new();
            let mut output = StatusOutput::Text;
            let mut index = 0;
            let which = if command == "status" {
                "status"
            } else {
                "stop-all"
            };
            while index < rest.len() {
                match rest[index].as_str() {
                    "--json" if which == "status" => output = StatusOutput::Json,
                    "--data-dir" => {
                        index += 1;
                        let value = rest
                            .get(index)
                            .ok_or_else(|| ConfigError::MissingValue("--data-dir".into()))?;
                        flags.insert(KEY_DATA_DIR.into(), value.clone());
                    }
                    other => match other.strip_prefix("--data-dir=") {
                        Some(value) => {
                            flags.insert(KEY_DATA_DIR.into(), value.to_string());
                        }
                        None => return Err(ConfigError::UnknownFlag(other.to_string(), which)),
                    },
                }
                index += 1;
            }
            if which == "status" {
                Ok(Invocation::Status { flags, output })
            } else {
                Ok(Invocation::StopAll { flags })
            }
        }
        other => Err(ConfigError::UnknownCommand(other.to_string())),
    }
}

/// The settings found in `OUTPOST_*` variables, e.g. `OUTPOST_DATA_DIR` → `data_dir`.
/// `OUTPOST_AGENT_CONFIG` is returned under the key `config` (`OUTPOST_CONFIG` belongs to
/// `outpostctl`, so the agent ignores it).
pub fn settings_from_env<I: IntoIterator<Item = (String, String)>>(vars: I) -> Settings {
    let mut settings = Settings::new();
    for (name, value) in vars {
        let Some(suffix) = name.strip_prefix("OUTPOST_") else {
            continue;
        };
        let key = suffix.to_ascii_lowercase();
        if key == "agent_config" {
            settings.insert("config".to_string(), value);
        } else if KNOWN_KEYS.contains(&key.as_str()) {
            settings.insert(key, value);
        }
    }
    settings
}

/// Parses a config file's text: a JSON object whose values are strings, numbers or booleans.
pub fn settings_from_json(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let file_error = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| file_error(format!("not valid json: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| file_error("must be a json object".into()))?;
    let mut settings = Settings::new();
    for (key, value) in object {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(file_error(format!(
                "unknown setting {key:?}; known: {}",
                KNOWN_KEYS.join(", ")
            )));
        }
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(file_error(format!(
                    "setting {key} must be a string or number, got {other}"
                )));
            }
        };
        settings.insert(key.clone(), text);
    }
    Ok(settings)
}

/// Reads the config file: `explicit` if given (it must exist), else `DATA_DIR/agent.json` if it exists.
pub fn load_file_settings(
    explicit: Option<&Path>,
    data_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let path = match (explicit, data_dir) {
        (Some(path), _) => path.to_path_buf(),
        (None, Some(dir)) => {
            let path = dir.join(CONFIG_FILE_NAME);
            if !path.exists() {
                return Ok(Settings::new());
            }
            path
        }
        (None, None) => return Ok(Settings::new()),
    };
    let file_error = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let metadata = std::fs::metadata(&path).map_err(|e| file_error(e.to_string()))?;
    if metadata.len() > CONFIG_FILE_MAX_BYTES {
        return Err(file_error(format!(
            "{} bytes, over the limit of {CONFIG_FILE_MAX_BYTES}",
            metadata.len()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
    settings_from_json(&path, &text)
}

/// Layers sources: later ones win.
pub fn merge(layers: &[&Settings]) -> Settings {
    let mut merged = Settings::new();
    for layer in layers {
        for (key, value) in layer.iter() {
            merged.insert(key.clone(), value.clone());
        }
    }
    merged
}

/// Parses `KEY=VALUE,KEY=VALUE` into node labels, each checked like control checks them.
pub fn parse_labels(text: &str) -> Result<BTreeMap<Name, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(KEY_LABELS, pair, "expected KEY=VALUE"))?;
        outpost_proto::node::check_label(KEY_LABELS, key, value)
            .map_err(|e| invalid(&e.field, &e.value, e.reason))?;
        let key = name(KEY_LABELS, key).map_err(|e| invalid(KEY_LABELS, key, e.reason))?;
        labels.insert(key, value.to_string());
    }
    if labels.len() > outpost_proto::limits::LABELS_MAX {
        return Err(invalid(
            KEY_LABELS,
            text,
            format!("more than {} labels", outpost_proto::limits::LABELS_MAX),
        ));
    }
    Ok(labels)
}

/// The log format and level from settings; also used before a full config exists (`reconcile`).
pub fn log_settings<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<LogSettings, ConfigError> {
    let mut log = LogSettings::default();
    if let Some(text) = get(KEY_LOG_FORMAT) {
        log.format =
            LogFormat::parse(text).map_err(|e| invalid(KEY_LOG_FORMAT, text, e.to_string()))?;
    }
    if let Some(text) = get(KEY_LOG) {
        log.max_level = parse_level(text).map_err(|e| invalid(KEY_LOG, text, e.to_string()))?;
    }
    Ok(log)
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks a control URL: `https://HOST[:PORT]` with an optional path prefix.
pub fn check_control_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        invalid(
            key,
            url,
            "must start with https:// (control speaks TLS only)",
        )
    })?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(key, url, "has no host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl AgentConfig {
    /// Validates merged settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let get = |key: &str| {
            settings
                .get(key)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let data_dir =
            PathBuf::from(get(KEY_DATA_DIR).ok_or(ConfigError::Missing { key: KEY_DATA_DIR })?);
        let control_url = get(KEY_CONTROL_URL)
            .map(|url| check_control_url(KEY_CONTROL_URL, url))
            .transpose()?;
        let enroll_token = match get(KEY_ENROLL_TOKEN) {
            Some(token) => {
                EnrollmentClaims::parse(token)
                    .map_err(|e| invalid(KEY_ENROLL_TOKEN, &e.value, e.reason))?;
                Some(token.to_string())
            }
            None => None,
        };
        let listen_text = get(KEY_STATUS_LISTEN).unwrap_or(DEFAULT_STATUS_LISTEN);
        let status_listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid(KEY_STATUS_LISTEN, listen_text, "expected IP:PORT"))?;
        let node_id = get(KEY_NODE_ID)
            .map(|id| name(KEY_NODE_ID, id).map_err(|e| invalid(KEY_NODE_ID, id, e.reason)))
            .transpose()?;
        let number = |key: &str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
            match get(key) {
                None => Ok(default),
                Some(text) => match text.parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(n),
                    _ => Err(invalid(
                        key,
                        text,
                        format!("expected a whole number between {min} and {max}"),
                    )),
                },
            }
        };
        let feed_wait_secs = number(
            KEY_FEED_WAIT_SECS,
            DEFAULT_FEED_WAIT_SECS,
            1,
            outpost_proto::limits::FEED_WAIT_MAX_SECS,
        )?;
        let log_cap_bytes = number(KEY_LOG_CAP_BYTES, DEFAULT_LOG_CAP_BYTES, 4096, 1 << 34)?;
        let artifact_cache_bytes = number(
            KEY_ARTIFACT_CACHE_BYTES,
            DEFAULT_ARTIFACT_CACHE_BYTES,
            0,
            1 << 44,
        )?;
        let healthy_after_secs = number(KEY_HEALTHY_AFTER_SECS, 10, 0, 3600)?;
        let profile_poll_secs = number(
            KEY_PROFILE_POLL_SECS,
            DEFAULT_PROFILE_POLL_SECS,
            1,
            24 * 3600,
        )?;
        let profile_verify_secs = number(
            KEY_PROFILE_VERIFY_SECS,
            DEFAULT_PROFILE_VERIFY_SECS,
            1,
            7 * 24 * 3600,
        )?;
        let overlay = overlay::OverlaySettings::from_settings(get)
            .map_err(|e| invalid(e.key, &e.value, e.reason))?;
        let labels = get(KEY_LABELS)
            .map(parse_labels)
            .transpose()?
            .unwrap_or_default();
        let cgroup_root = PathBuf::from(get(KEY_CGROUP_ROOT).unwrap_or(DEFAULT_CGROUP_ROOT));
        let workloads_on_exit = match get(KEY_WORKLOADS_ON_EXIT) {
            None | Some("leave") => WorkloadsOnExit::Leave,
            Some("stop") => WorkloadsOnExit::Stop,
            Some(other) => {
                return Err(invalid(
                    KEY_WORKLOADS_ON_EXIT,
                    other,
                    "expected leave or stop",
                ));
            }
        };
        let log = log_settings(get)?;
        Ok(Self {
            labels,
            log,
            site: site::SiteConfig::from_settings(settings)?,
            data_dir,
            control_url,
            enroll_token,
            status_listen,
            node_id,
            feed_wait_secs,
            log_cap_bytes,
            artifact_cache_bytes,
            healthy_after_secs,
            cgroup_root,
            workloads_on_exit,
            profile_poll_secs,
            profile_verify_secs,
            overlay,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn map(pairs: &[(&str, &str)]) -> Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn token() -> String {
        EnrollmentClaims {
            token_id: "t1".into(),
            secret: "s".into(),
            ca_fingerprint: "ab".repeat(32),
            control_url: "https://127.0.0.1:7443".into(),
            expires_at_unix: 1,
        }
        .to_token()
    }

    #[test]
    fn run_flags_parse_into_settings() {
        let invocation = parse_args(&args(&[
            "run",
            "--data-dir",
            "/d",
            "--control=https://c:1",
            "--stop-workloads-on-exit",
        ]))
        .unwrap();
        let Invocation::Run { flags, config_file } = invocation else {
            panic!("not run")
        };
        assert_eq!(flags.get(KEY_DATA_DIR).unwrap(), "/d");
        assert_eq!(flags.get(KEY_CONTROL_URL).unwrap(), "https://c:1");
        assert_eq!(flags.get(KEY_WORKLOADS_ON_EXIT).unwrap(), "stop");
        assert!(config_file.is_none());
    }

    #[test]
    fn bad_command_lines_are_named() {
        assert_eq!(
            parse_args(&args(&["fly"])),
            Err(ConfigError::UnknownCommand("fly".into()))
        );
        assert_eq!(
            parse_args(&args(&["run", "--nope"])),
            Err(ConfigError::UnknownFlag("--nope".into(), "run"))
        );
        assert_eq!(
            parse_args(&args(&["run", "--data-dir"])),
            Err(ConfigError::MissingValue("--data-dir".into()))
        );
        assert!(matches!(
            parse_args(&args(&["status", "--json", "--data-dir", "/x"])),
            Ok(Invocation::Status {
                output: StatusOutput::Json,
                ..
            })
        ));
    }

    #[test]
    fn environment_maps_to_keys_and_ignores_others() {
        let env = settings_from_env(vec![
            (
                "OUTPOST_DATA_DIR".to_string(),
                "/var/lib/outpost".to_string(),
            ),
            (
                "OUTPOST_STATUS_LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            ("OUTPOST_SOMETHING".to_string(), "x".to_string()),
            (
                "OUTPOST_CONFIG".to_string(),
                "/home/op/outpostctl.json".to_string(),
            ),
            (
                "OUTPOST_AGENT_CONFIG".to_string(),
                "/etc/outpost/agent.json".to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
        ]);
        assert_eq!(
            env,
            map(&[
                ("data_dir", "/var/lib/outpost"),
                ("status_listen", "127.0.0.1:0"),
                ("config", "/etc/outpost/agent.json")
            ])
        );
    }

    #[test]
    fn flags_win_over_env_over_file() {
        let file = settings_from_json(
            Path::new("a.json"),
            r#"{"data_dir":"/file","feed_wait_secs":30,"node_id":"n-file"}"#,
        )
        .unwrap();
        let env = map(&[("data_dir", "/env"), ("node_id", "n-env")]);
        let flags = map(&[("data_dir", "/flag")]);
        let config = AgentConfig::from_settings(&merge(&[&file, &env, &flags])).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/flag"));
        assert_eq!(config.node_id.as_deref(), Some("n-env"));
        assert_eq!(config.feed_wait_secs, 30);
        assert_eq!(config.status_listen.to_string(), DEFAULT_STATUS_LISTEN);
        assert_eq!(config.workloads_on_exit, WorkloadsOnExit::Leave);
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        let base = map(&[("data_dir", "/d")]);
        let cases = [
            ("control_url", "http://plain:80", "control_url"),
            ("status_listen", "localhost", "status_listen"),
            ("node_id", "Bad Node", "node_id"),
            ("feed_wait_secs", "9999", "feed_wait_secs"),
            ("enroll_token", "opt1.zz", "enroll_token"),
        ];
        for (key, value, named) in cases {
            let settings = merge(&[&base, &map(&[(key, value)])]);
            let error = AgentConfig::from_settings(&settings).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(named), "{text}");
        }
        assert_eq!(
            AgentConfig::from_settings(&Settings::new()),
            Err(ConfigError::Missing { key: KEY_DATA_DIR })
        );
    }

    #[test]
    fn a_good_token_is_kept_and_the_url_trimmed() {
        let settings = map(&[
            ("data_dir", "/d"),
            ("enroll_token", &token()),
            ("control_url", "https://h:7443/"),
        ]);
        let config = AgentConfig::from_settings(&settings).unwrap();
        assert_eq!(config.enroll_token.as_deref(), Some(token().as_str()));
        assert_eq!(config.control_url.as_deref(), Some("https://h:7443"));
    }

    #[test]
    fn config_file_rejects_unknown_settings_and_non_objects() {
        assert!(
            settings_from_json(Path::new("a"), r#"{"colour":"red"}"#)
                .unwrap_err()
                .to_string()
                .contains("colour")
        );
        assert!(settings_from_json(Path::new("a"), "[1]").is_err());
        assert!(settings_from_json(Path::new("a"), "{").is_err());
    }

    #[test]
    fn explicit_config_file_must_exist_and_default_one_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_file_settings(None, Some(dir.path())).unwrap(),
            Settings::new()
        );
        assert!(load_file_settings(Some(&dir.path().join("missing.json")), None).is_err());
        std::fs::write(dir.path().join(CONFIG_FILE_NAME), r#"{"node_id":"edge-1"}"#).unwrap();
        assert_eq!(
            load_file_settings(None, Some(dir.path())).unwrap(),
            map(&[("node_id", "edge-1")])
        );
    }

    #[test]
    fn profile_intervals_have_defaults_flags_and_bounds() {
        let config = AgentConfig::from_settings(&map(&[("data_dir", "/d")])).unwrap();
        assert_eq!(config.profile_poll_secs, DEFAULT_PROFILE_POLL_SECS);
        assert_eq!(config.profile_verify_secs, DEFAULT_PROFILE_VERIFY_SECS);
        let Invocation::Run { flags, .. } = parse_args(&args(&[
            "run",
            "--profile-poll-secs",
            "2",
            "--profile-verify-secs=60",
        ]))
        .unwrap() else {
            panic!("not a run invocation")
        };
        let config =
            AgentConfig::from_settings(&merge(&[&map(&[("data_dir", "/d")]), &flags])).unwrap();
        assert_eq!(
            (config.profile_poll_secs, config.profile_verify_secs),
            (2, 60)
        );
        let error =
            AgentConfig::from_settings(&map(&[("data_dir", "/d"), ("profile_poll_secs", "0")]))
                .unwrap_err();
        assert!(error.to_string().contains("profile_poll_secs"), "{error}");
    }

    #[test]
    fn labels_come_from_repeated_flags_or_one_list_and_are_checked() {
        let Invocation::Run { flags, .. } =
            parse_args(&args(&["run", "--label", "site=north", "--label=rack=r-3"])).unwrap()
        else {
            panic!("not a run invocation")
        };
        let config =
            AgentConfig::from_settings(&merge(&[&map(&[("data_dir", "/d")]), &flags])).unwrap();
        let labels: Vec<(&str, &str)> = config
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(labels, vec![("rack", "r-3"), ("site", "north")]);
        let from_env = settings_from_env([("OUTPOST_LABELS".to_string(), "a=1, b=2".to_string())]);
        let config =
            AgentConfig::from_settings(&merge(&[&map(&[("data_dir", "/d")]), &from_env])).unwrap();
        assert_eq!(config.labels.len(), 2);
        for (bad, field, value) in [
            ("site", "labels", "site"),
            ("Site=x", "labels", "Site"),
            ("site=a b", "labels.site", "a b"),
        ] {
            let error = AgentConfig::from_settings(&map(&[("data_dir", "/d"), ("labels", bad)]))
                .unwrap_err();
            assert!(
                matches!(&error, ConfigError::Invalid { key, value: seen, .. } if key == field && seen == value),
                "{bad}: {error:?}"
            );
        }
    }
}
