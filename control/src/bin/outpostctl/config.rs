//! Where outpostctl finds control: flags, then the environment, then a JSON config file.
//!
//! Pure: the environment arrives as a map and the config file as text, so the precedence is
//! unit-tested without touching the process environment or the file system.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const ENV_CONTROL_URL: &str = "OUTPOST_CONTROL_URL";
pub const ENV_CA_FILE: &str = "OUTPOST_CA_FILE";
pub const ENV_TOKEN: &str = "OUTPOST_TOKEN";
pub const ENV_CONFIG: &str = "OUTPOST_CONFIG";
/// Relative to `$HOME`.
pub const DEFAULT_CONFIG_PATH: &str = ".config/outpost/outpostctl.json";

/// The environment variables outpostctl reads, as a map, so tests can pass their own.
pub fn environment_map(lookup: impl Fn(&str) -> Option<String>) -> BTreeMap<String, String> {
    [ENV_CONTROL_URL, ENV_CA_FILE, ENV_TOKEN, ENV_CONFIG, "HOME"]
        .into_iter()
        .filter_map(|name| lookup(name).map(|value| (name.to_string(), value)))
        .collect()
}

/// What the command line said about where control is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    pub control_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub token: Option<String>,
    pub config: Option<PathBuf>,
}

/// Which config file to read, and whether a person asked for it by name (a named file must
/// exist; the default one may be absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFileChoice {
    Named(PathBuf),
    Default(PathBuf),
    NoFile,
}

pub fn choose_config_file(
    flags: &ConfigFlags,
    environment: &BTreeMap<String, String>,
) -> ConfigFileChoice {
    if let Some(path) = &flags.config {
        return ConfigFileChoice::Named(path.clone());
    }
    if let Some(path) = non_empty(environment, ENV_CONFIG) {
        return ConfigFileChoice::Named(PathBuf::from(path));
    }
    match non_empty(environment, "HOME") {
        Some(home) => ConfigFileChoice::Default(Path::new(home).join(DEFAULT_CONFIG_PATH)),
        None => ConfigFileChoice::NoFile,
    }
}

/// The config file's contents: exactly what `outpost-control serve` writes to
/// `DATA_DIR/admin/outpostctl.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    pub path: PathBuf,
    pub control_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileSettingsJson {
    #[serde(default)]
    control_url: Option<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config file {path} is not valid JSON {{\"control_url\",\"ca_file\",\"token\"}}: {source}"
    )]
    FileSyntax {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no control URL: set --control-url, {ENV_CONTROL_URL} or \"control_url\" in the config file ({config})"
    )]
    MissingControlUrl { config: String },
    #[error(
        "no CA file: set --ca-file, {ENV_CA_FILE} or \"ca_file\" in the config file ({config}); outpost-control serve names its CA in DATA_DIR/admin/outpostctl.json"
    )]
    MissingCaFile { config: String },
    #[error(
        "no token: set --token, {ENV_TOKEN} or \"token\" in the config file ({config}); outpost-control serve writes the admin token to DATA_DIR/admin/outpostctl.json"
    )]
    MissingToken { config: String },
    #[error("control URL {value:?} from {source_name} {reason}; expected https://HOST:PORT")]
    BadControlUrl {
        value: String,
        source_name: Origin,
        reason: &'static str,
    },
}

/// Parses a config file. A relative `ca_file` is taken relative to the config file's folder.
pub fn parse_config_file(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
    let parsed: FileSettingsJson =
        serde_json::from_str(text).map_err(|source| ConfigError::FileSyntax {
            path: path.to_path_buf(),
            source,
        })?;
    let ca_file = parsed
        .ca_file
        .filter(|value| !value.is_empty())
        .map(|value| {
            let ca_path = PathBuf::from(value);
            match path.parent() {
                Some(folder) if ca_path.is_relative() => folder.join(ca_path),
                _ => ca_path,
            }
        });
    Ok(FileSettings {
        path: path.to_path_buf(),
        control_url: parsed.control_url.filter(|value| !value.is_empty()),
        ca_file,
        token: parsed.token.filter(|value| !value.is_empty()),
    })
}

/// A warning when a config file that holds a token can be read by other users.
pub fn loose_permissions_warning(file: &FileSettings, mode: u32) -> Option<String> {
    if file.token.is_none() || mode & 0o077 == 0 {
        return None;
    }
    Some(format!(
        "warning: config file {} holds a token and is readable by other users (mode {:o}); run chmod 600 on it",
        file.path.display(),
        mode & 0o777
    ))
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag(&'static str),
    Environment(&'static str),
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "{flag}"),
            Origin::Environment(name) => write!(f, "{name}"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<T> {
    pub value: T,
    pub origin: Origin,
}

/// Every setting found, each from the highest-precedence source that had it. Validated once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSettings {
    pub control_url: Option<Setting<String>>,
    pub ca_file: Option<Setting<PathBuf>>,
    pub token: Option<Setting<String>>,
    /// The config file consulted, for error messages.
    pub config_file: ConfigFileChoice,
}

/// Flags beat the environment, which beats the config file.
pub fn resolve(
    flags: &ConfigFlags,
    environment: &BTreeMap<String, String>,
    config_file: ConfigFileChoice,
    file: Option<&FileSettings>,
) -> Result<ResolvedSettings, ConfigError> {
    let control_url = pick(
        flags.control_url.clone().filter(|value| !value.is_empty()),
        "--control-url",
        environment,
        ENV_CONTROL_URL,
        file.and_then(|file| {
            file.control_url
                .clone()
                .map(|value| (value, file.path.clone()))
        }),
    )
    .map(normalize_control_url)
    .transpose()?;
    let ca_file = pick(
        flags
            .ca_file
            .clone()
            .map(|path| path.to_string_lossy().into_owned())
            .filter(|value| !value.is_empty()),
        "--ca-file",
        environment,
        ENV_CA_FILE,
        file.and_then(|file| {
            file.ca_file
                .clone()
                .map(|path| (path.to_string_lossy().into_owned(), file.path.clone()))
        }),
    )
    .map(|setting| Setting {
        value: PathBuf::from(setting.value),
        origin: setting.origin,
    });
    let token = pick(
        flags.token.clone().filter(|value| !value.is_empty()),
        "--token",
        environment,
        ENV_TOKEN,
        file.and_then(|file| file.token.clone().map(|value| (value, file.path.clone()))),
    )
    .map(|setting| Setting {
        value: setting.value.trim().to_string(),
        origin: setting.origin,
    });
    Ok(ResolvedSettings {
        control_url,
        ca_file,
        token,
        config_file,
    })
}

fn pick(
    flag: Option<String>,
    flag_name: &'static str,
    environment: &BTreeMap<String, String>,
    environment_name: &'static str,
    file: Option<(String, PathBuf)>,
) -> Option<Setting<String>> {
    if let Some(value) = flag {
        return Some(Setting {
            value,
            origin: Origin::Flag(flag_name),
        });
    }
    if let Some(value) = non_empty(environment, environment_name) {
        return Some(Setting {
            value: value.to_string(),
            origin: Origin::Environment(environment_name),
        });
    }
    file.map(|(value, path)| Setting {
        value,
        origin: Origin::File(path),
    })
}

fn non_empty<'a>(environment: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    environment
        .get(name)
        .map(String::as_str)
        .filter(|value| !value.trim().is_empty())
}

/// Control speaks only HTTPS; a URL is `https://HOST[:PORT]` with no path. A trailing `/` is dropped.
fn normalize_control_url(setting: Setting<String>) -> Result<Setting<String>, ConfigError> {
    let value = setting.value.trim();
    let value = match value.strip_prefix("https://") {
        Some(rest) => format!("https://{}", rest.strip_suffix('/').unwrap_or(rest)),
        None => value.to_string(),
    };
    let bad = |reason| ConfigError::BadControlUrl {
        value: setting.value.clone(),
        source_name: setting.origin.clone(),
        reason,
    };
    let Some(rest) = value.strip_prefix("https://") else {
        return Err(bad(if value.starts_with("http://") {
            "is plain http, but control speaks only TLS"
        } else {
            "does not start with https://"
        }));
    };
    if rest.is_empty() {
        return Err(bad("has no host"));
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(bad("has a path; give only scheme, host and port"));
    }
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace"));
    }
    Ok(Setting {
        value,
        origin: setting.origin,
    })
}

impl ConfigFileChoice {
    pub fn describe(&self) -> String {
        match self {
            ConfigFileChoice::Named(path) => path.display().to_string(),
            ConfigFileChoice::Default(path) => format!("{}, not found", path.display()),
            ConfigFileChoice::NoFile => format!("none: $HOME is unset and {ENV_CONFIG} is empty"),
        }
    }
}

impl ResolvedSettings {
    pub fn require_control_url(&self) -> Result<&Setting<String>, ConfigError> {
        self.control_url
            .as_ref()
            .ok_or_else(|| ConfigError::MissingControlUrl {
                config: self.config_file.describe(),
            })
    }

    pub fn require_ca_file(&self) -> Result<&Setting<PathBuf>, ConfigError> {
        self.ca_file
            .as_ref()
            .ok_or_else(|| ConfigError::MissingCaFile {
                config: self.config_file.describe(),
            })
    }

    pub fn require_token(&self) -> Result<&Setting<String>, ConfigError> {
        self.token
            .as_ref()
            .ok_or_else(|| ConfigError::MissingToken {
                config: self.config_file.describe(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file() -> FileSettings {
        parse_config_file(
            Path::new("/data/admin/outpostctl.json"),
            r#"{"control_url":"https://file:1","ca_file":"/data/tls/ca.pem","token":"opa.file"}"#,
        )
        .unwrap()
    }

    fn resolved(
        flags: &ConfigFlags,
        env: &BTreeMap<String, String>,
        file: Option<&FileSettings>,
    ) -> ResolvedSettings {
        resolve(flags, env, ConfigFileChoice::NoFile, file).unwrap()
    }

    #[test]
    fn the_file_alone_is_enough() {
        let settings = resolved(&ConfigFlags::default(), &environment(&[]), Some(&file()));
        assert_eq!(settings.control_url.unwrap().value, "https://file:1");
        assert_eq!(
            settings.ca_file.unwrap().value,
            PathBuf::from("/data/tls/ca.pem")
        );
        let token = settings.token.unwrap();
        assert_eq!(token.value, "opa.file");
        assert_eq!(
            token.origin,
            Origin::File(PathBuf::from("/data/admin/outpostctl.json"))
        );
    }

    #[test]
    fn environment_beats_the_file() {
        let env = environment(&[(ENV_CONTROL_URL, "https://env:2"), (ENV_TOKEN, "opa.env")]);
        let settings = resolved(&ConfigFlags::default(), &env, Some(&file()));
        let url = settings.control_url.unwrap();
        assert_eq!(url.value, "https://env:2");
        assert_eq!(url.origin, Origin::Environment(ENV_CONTROL_URL));
        assert_eq!(settings.token.unwrap().value, "opa.env");
        // Not set in the environment: still from the file.
        assert_eq!(
            settings.ca_file.unwrap().value,
            PathBuf::from("/data/tls/ca.pem")
        );
    }

    #[test]
    fn flags_beat_the_environment_and_the_file() {
        let env = environment(&[
            (ENV_CONTROL_URL, "https://env:2"),
            (ENV_CA_FILE, "/env/ca.pem"),
            (ENV_TOKEN, "opa.env"),
        ]);
        let flags = ConfigFlags {
            control_url: Some("https://flag:3/".into()),
            ca_file: Some(PathBuf::from("/flag/ca.pem")),
            token: Some("opa.flag".into()),
            config: None,
        };
        let settings = resolved(&flags, &env, Some(&file()));
        let url = settings.control_url.unwrap();
        assert_eq!(url.value, "https://flag:3", "trailing slash dropped");
        assert_eq!(url.origin, Origin::Flag("--control-url"));
        assert_eq!(
            settings.ca_file.unwrap().value,
            PathBuf::from("/flag/ca.pem")
        );
        assert_eq!(settings.token.unwrap().value, "opa.flag");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let env = environment(&[(ENV_CONTROL_URL, ""), (ENV_TOKEN, "  ")]);
        let flags = ConfigFlags {
            token: Some(String::new()),
            ..ConfigFlags::default()
        };
        let settings = resolved(&flags, &env, Some(&file()));
        assert_eq!(settings.control_url.unwrap().value, "https://file:1");
        assert_eq!(settings.token.unwrap().value, "opa.file");
    }

    #[test]
    fn missing_settings_say_how_to_set_them() {
        let settings = resolve(
            &ConfigFlags::default(),
            &environment(&[]),
            ConfigFileChoice::Default(PathBuf::from("/home/op/.config/outpost/outpostctl.json")),
            None,
        )
        .unwrap();
        let message = settings.require_control_url().unwrap_err().to_string();
        assert!(
            message.contains("--control-url") && message.contains(ENV_CONTROL_URL),
            "{message}"
        );
        assert!(
            message.contains("/home/op/.config/outpost/outpostctl.json"),
            "{message}"
        );
        let message = settings.require_token().unwrap_err().to_string();
        assert!(
            message.contains("--token") && message.contains(ENV_TOKEN),
            "{message}"
        );
        assert!(settings.require_ca_file().is_err());
    }

    #[test]
    fn control_url_must_be_https_without_a_path() {
        for (bad, reason) in [
            ("http://h:1", "plain http"),
            ("h:1", "https://"),
            ("https://", "no host"),
            ("https://h:1/v1", "path"),
        ] {
            let flags = ConfigFlags {
                control_url: Some(bad.into()),
                ..ConfigFlags::default()
            };
            let error =
                resolve(&flags, &environment(&[]), ConfigFileChoice::NoFile, None).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(reason) && message.contains(bad),
                "{message}"
            );
            assert!(message.contains("--control-url"), "{message}");
        }
    }

    #[test]
    fn config_file_choice_follows_the_same_precedence() {
        let env = environment(&[(ENV_CONFIG, "/env/c.json"), ("HOME", "/home/op")]);
        let flags = ConfigFlags {
            config: Some(PathBuf::from("/flag/c.json")),
            ..ConfigFlags::default()
        };
        assert_eq!(
            choose_config_file(&flags, &env),
            ConfigFileChoice::Named(PathBuf::from("/flag/c.json"))
        );
        assert_eq!(
            choose_config_file(&ConfigFlags::default(), &env),
            ConfigFileChoice::Named(PathBuf::from("/env/c.json"))
        );
        assert_eq!(
            choose_config_file(
                &ConfigFlags::default(),
                &environment(&[("HOME", "/home/op")])
            ),
            ConfigFileChoice::Default(PathBuf::from("/home/op/.config/outpost/outpostctl.json"))
        );
        assert_eq!(
            choose_config_file(&ConfigFlags::default(), &environment(&[])),
            ConfigFileChoice::NoFile
        );
    }

    #[test]
    fn relative_ca_file_is_relative_to_the_config_file() {
        let settings = parse_config_file(
            Path::new("/data/admin/outpostctl.json"),
            r#"{"ca_file":"../tls/ca.pem"}"#,
        )
        .unwrap();
        assert_eq!(
            settings.ca_file,
            Some(PathBuf::from("/data/admin/../tls/ca.pem"))
        );
        assert_eq!(settings.control_url, None);
    }

    #[test]
    fn world_readable_token_files_are_warned_about() {
        let warning = loose_permissions_warning(&file(), 0o100644).unwrap();
        assert!(
            warning.contains("mode 644") && warning.contains("chmod 600"),
            "{warning}"
        );
        assert_eq!(loose_permissions_warning(&file(), 0o100600), None);
        let no_token = FileSettings {
            token: None,
            ..file()
        };
        assert_eq!(loose_permissions_warning(&no_token, 0o100644), None);
    }

    #[test]
    fn a_broken_config_file_is_named_with_the_location() {
        let error = parse_config_file(Path::new("/c.json"), "{\"token\": 5}")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("/c.json") && error.contains("line 1"),
            "{error}"
        );
    }
}
