//! The delivery commands (R1, R2): `artifacts push|ls|rm` and `services history|rollback`.
//! A push hashes the file first (streaming), then streams it to control under that hash, so
//! control can refuse a body that arrives different.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_proto::artifact::{artifact_path, check_artifact_name, check_sha256};
use outpost_proto::name::check_name;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, event_suffix, list, print_json};
use crate::render::{CellFormat, Column, column};

pub const PATH_ARTIFACTS: &str = "/v1/artifacts";

/// Least time an upload may take; larger files get a second more per MiB.
const UPLOAD_TIMEOUT_MIN: Duration = Duration::from_secs(60);

/// sha256 and size of a file, read in chunks.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size_bytes = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size_bytes += read as u64;
    }
    Ok((outpost_proto::hash::to_hex(&hasher.finalize()), size_bytes))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

pub fn artifacts_push<T: Transport>(
    client: &ControlClient<T>,
    file: &Path,
    name: Option<&str>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let name = match name {
        Some(name) => name.to_string(),
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "artifact".into()),
    };
    check_artifact_name("name", &name)?;
    let (sha256, size_bytes) = hash_file(file)?;
    let timeout = UPLOAD_TIMEOUT_MIN + Duration::from_secs(size_bytes >> 20);
    let path = format!("{}?name={}", artifact_path(&sha256), percent_encode(&name));
    let answer = client
        .put_file(&path, file, timeout)
        .with_context(|| format!("artifact {} was not pushed", file.display()))?;
    if mode == OutputMode::Json {
        return print_json(
            out,
            &json!({
                "sha256": answer.get("sha256").cloned().unwrap_or(Value::String(sha256)),
                "size_bytes": answer.get("size_bytes").cloned().unwrap_or(json!(size_bytes)),
                "name": answer.get("name").cloned().unwrap_or(Value::String(name)),
            }),
        );
    }
    writeln!(out, "{sha256}")?;
    Ok(())
}

const ARTIFACT_COLUMNS: &[Column] = &[
    column("SHA256", &["sha256"], CellFormat::Text),
    column("NAME", &["name"], CellFormat::Text),
    column("SIZE", &["size_bytes"], CellFormat::Bytes),
    column("STORED", &["stored_at_unix_ms"], CellFormat::UnixMillis),
];

pub fn artifacts_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    list(
        client,
        PATH_ARTIFACTS,
        "artifacts",
        ARTIFACT_COLUMNS,
        mode,
        out,
    )
}

pub fn artifacts_remove<T: Transport>(
    client: &ControlClient<T>,
    sha256: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_sha256("sha256", sha256)?;
    let answer = client.delete(&artifact_path(sha256))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "artifact {sha256} removed{}", event_suffix(&answer))?;
    Ok(())
}

const RELEASE_COLUMNS: &[Column] = &[
    column("RELEASE", &["release"], CellFormat::Text),
    column("CURRENT", &["current"], CellFormat::Text),
    column("AT", &["at_unix_ms"], CellFormat::UnixMillis),
    column("ARTIFACT", &["artifact_sha256"], CellFormat::Text),
    column("COMMAND", &["spec.command"], CellFormat::Text),
    column("EVENT", &["event_id"], CellFormat::Text),
];

pub fn services_history<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("service", name)?;
    list(
        client,
        &format!("/v1/services/{name}/releases"),
        "releases",
        RELEASE_COLUMNS,
        mode,
        out,
    )
}

pub fn services_rollback<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    to: Option<u64>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("service", name)?;
    if to == Some(0) {
        bail!("--to 0: releases are numbered from 1");
    }
    let body = match to {
        Some(to) => json!({ "to": to }),
        None => json!({}),
    };
    let answer = client.post(&format!("/v1/services/{name}/rollback"), &body)?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let release = answer
        .pointer("/service/release")
        .and_then(Value::as_u64)
        .map(|r| format!(" as release {r}"))
        .unwrap_or_default();
    writeln!(
        out,
        "service {name} rolled back{release}{}",
        event_suffix(&answer)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::render_table;

    /// The tables read control's real answer types: every column finds its field.
    #[test]
    fn every_column_finds_its_field_in_the_answer_types() {
        let artifact = outpost_proto::artifact::ArtifactInfo {
            sha256: "ab".repeat(32),
            size_bytes: 1 << 20,
            name: "app.tar.gz".into(),
            stored_at_unix_ms: 1000,
        };
        let release = outpost_control::release::http::ReleaseView {
            release: 2,
            event_id: 9,
            at_unix_ms: 1000,
            current: true,
            artifact_sha256: Some("ab".repeat(32)),
            spec: serde_json::from_value(json!({"name": "app", "command": "bin/app"})).unwrap(),
        };
        for (view, columns) in [
            (serde_json::to_value(&artifact).unwrap(), ARTIFACT_COLUMNS),
            (serde_json::to_value(&release).unwrap(), RELEASE_COLUMNS),
        ] {
            let table = render_table(std::slice::from_ref(&view), columns);
            for line in table.lines().skip(1) {
                assert!(
                    !line.contains(" - "),
                    "an empty cell in {table:?} for {view}"
                );
            }
            let header = table.lines().next().unwrap();
            for column in columns {
                assert!(
                    header.contains(column.header),
                    "{} missing from {header:?}",
                    column.header
                );
            }
        }
    }

    #[test]
    fn files_hash_in_chunks_and_names_are_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app");
        std::fs::write(&path, vec![5u8; 300_000]).unwrap();
        let (sha256, size_bytes) = hash_file(&path).unwrap();
        assert_eq!(size_bytes, 300_000);
        assert_eq!(sha256, outpost_proto::hash::sha256_hex(&vec![5u8; 300_000]));
        assert_eq!(percent_encode("app v1.tar.gz"), "app%20v1.tar.gz");
    }
}
