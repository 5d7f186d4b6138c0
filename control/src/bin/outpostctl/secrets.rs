//! `outpostctl secrets set|ls|rm` (P11): values come from arguments (`KEY=VALUE`), files
//! (`--from-file KEY=PATH`) or stdin (`--from-stdin KEY`, so they stay out of shell history
//! and the process list); they are sent once and never printed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use outpost_proto::name::check_name;
use serde_json::json;

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, event_suffix, print_json};
#[cfg(test)]
use crate::render::render_table;
use crate::render::{CellFormat, Column, column};

pub const PATH_SECRETS: &str = "/v1/secrets";

pub const SECRET_COLUMNS: &[Column] = &[
    column("NAME", &["name"], CellFormat::Text),
    column("VERSION", &["version"], CellFormat::Text),
    column("KEYS", &["keys"], CellFormat::Text),
    column("USED BY", &["used_by"], CellFormat::Text),
    column("UPDATED", &["updated_at_unix_ms"], CellFormat::UnixMillis),
    column("BY", &["updated_by"], CellFormat::Text),
];

/// Where each value of a `secrets set` comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValueSources {
    /// `KEY=VALUE` arguments.
    pub literal: Vec<String>,
    /// `KEY=PATH` of `--from-file`.
    pub files: Vec<String>,
    /// `--from-stdin KEY`.
    pub stdin_key: Option<String>,
}

fn split_pair<'a>(what: &str, text: &'a str) -> Result<(&'a str, &'a str)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key, value)),
        // Never echo the text: it may be a value typed without its key.
        _ => bail!("invalid {what}: expected KEY=… with a non-empty KEY"),
    }
}

/// Collects the values; `read_file` and `read_stdin` are the I/O (tests pass closures).
pub fn collect_values(
    sources: &ValueSources,
    read_file: impl Fn(&str) -> Result<String>,
    read_stdin: impl FnOnce() -> Result<String>,
) -> Result<BTreeMap<String, String>> {
    let mut values = BTreeMap::new();
    let mut insert = |key: &str, value: String| -> Result<()> {
        if values.insert(key.to_string(), value).is_some() {
            bail!("key {key} is given twice");
        }
        Ok(())
    };
    for pair in &sources.literal {
        let (key, value) = split_pair("KEY=VALUE argument", pair)?;
        insert(key, value.to_string())?;
    }
    for pair in &sources.files {
        let (key, path) = split_pair("--from-file", pair)?;
        insert(key, read_file(path)?)?;
    }
    if let Some(key) = &sources.stdin_key {
        let mut text = read_stdin()?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        insert(key, text)?;
    }
    if values.is_empty() {
        bail!("secrets set needs at least one KEY=VALUE, --from-file KEY=PATH or --from-stdin KEY");
    }
    Ok(values)
}

pub fn read_value_file(path: &str) -> Result<String> {
    std::fs::read_to_string(PathBuf::from(path))
        .with_context(|| format!("cannot read --from-file {path} (a UTF-8 text file)"))
}

pub fn read_stdin_value() -> Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the value from stdin (UTF-8 text)")?;
    Ok(text)
}

pub fn secrets_set<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    values: BTreeMap<String, String>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("secret", name)?;
    let answer = client.put(
        &format!("{PATH_SECRETS}/{name}"),
        &json!({ "values": values }),
    )?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(
        out,
        "secret {name} version {} set (keys {}){}",
        answer["version"],
        answer["keys"]
            .as_array()
            .map(|keys| keys
                .iter()
                .filter_map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        event_suffix(&answer)
    )?;
    Ok(())
}

pub fn secrets_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    crate::commands::list(client, PATH_SECRETS, "secrets", SECRET_COLUMNS, mode, out)
}

pub fn secrets_remove<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("secret", name)?;
    let answer = client.delete(&format!("{PATH_SECRETS}/{name}"))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "secret {name} removed{}", event_suffix(&answer))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_arguments_files_and_stdin() {
        let sources = ValueSources {
            literal: vec!["user=app".into(), "url=a=b".into()],
            files: vec!["cert=/tmp/cert.pem".into()],
            stdin_key: Some("password".into()),
        };
        let values = collect_values(
            &sources,
            |path| Ok(format!("contents of {path}")),
            || Ok("hunter2\n".into()),
        )
        .unwrap();
        assert_eq!(values["user"], "app");
        assert_eq!(values["url"], "a=b");
        assert_eq!(values["cert"], "contents of /tmp/cert.pem");
        assert_eq!(values["password"], "hunter2");
    }

    #[test]
    fn bad_pairs_are_refused_without_echoing_them() {
        let sources = ValueSources {
            literal: vec!["hunter2".into()],
            ..ValueSources::default()
        };
        let error = collect_values(&sources, |_| unreachable!(), || unreachable!()).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let twice = ValueSources {
            literal: vec!["k=1".into(), "k=2".into()],
            ..ValueSources::default()
        };
        assert!(collect_values(&twice, |_| unreachable!(), || unreachable!()).is_err());
        assert!(
            collect_values(
                &ValueSources::default(),
                |_| unreachable!(),
                || unreachable!()
            )
            .is_err()
        );
    }

    #[test]
    fn every_column_finds_its_field_in_the_view_type() {
        let view = outpost_control::secret::api::SecretView {
            name: "db".into(),
            org: "default".into(),
            version: 2,
            keys: vec!["password".into()],
            updated_at_unix_ms: 1000,
            updated_by: "opa.abc".into(),
            used_by: vec!["web".into()],
            event_id: 7,
        };
        let value = serde_json::to_value(&view).unwrap();
        let table = render_table(std::slice::from_ref(&value), SECRET_COLUMNS);
        let header = table.lines().next().unwrap();
        for column in SECRET_COLUMNS {
            assert!(header.contains(column.header), "{}", column.header);
        }
    }
}
