//! `outpostctl audit [--since DURATION] [--json]` (P11): the security-relevant acts with their
//! actors — secret writes and deliveries, tokens, enrollment, revocation, IP allocation, routes
//! and refused attempts on another org's objects.

use std::io::Write;

use anyhow::{Context, Result};

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, list};
use crate::duration::parse_duration_secs;
use crate::render::{CellFormat, Column, column};

pub const PATH_AUDIT: &str = "/v1/audit";

pub const AUDIT_COLUMNS: &[Column] = &[
    column("AT", &["at_unix_ms"], CellFormat::UnixMillis),
    column("ACT", &["act"], CellFormat::Text),
    column("ACTOR", &["actor"], CellFormat::Text),
    column("ORG", &["org"], CellFormat::Text),
    column("SUBJECT", &["subject"], CellFormat::Text),
    column("DETAIL", &["detail"], CellFormat::Text),
    column("COUNT", &["count"], CellFormat::Text),
];

/// The request path: `--since` (a duration back from `now_unix_ms`) becomes `since_unix_ms`.
pub fn audit_path(since: Option<&str>, now_unix_ms: u64) -> Result<String> {
    match since {
        None => Ok(PATH_AUDIT.to_string()),
        Some(text) => {
            let secs = parse_duration_secs(text).context("--since")?;
            let since_unix_ms = now_unix_ms.saturating_sub(secs.saturating_mul(1000));
            Ok(format!("{PATH_AUDIT}?since_unix_ms={since_unix_ms}"))
        }
    }
}

pub fn audit<T: Transport>(
    client: &ControlClient<T>,
    since: Option<&str>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let path = audit_path(since, now_unix_ms)?;
    list(client, &path, "audited acts", AUDIT_COLUMNS, mode, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_back_from_now() {
        assert_eq!(audit_path(None, 5_000_000).unwrap(), "/v1/audit");
        assert_eq!(
            audit_path(Some("1h"), 5_000_000).unwrap(),
            "/v1/audit?since_unix_ms=1400000"
        );
        let error = audit_path(Some("soon"), 0).unwrap_err();
        assert!(format!("{error:#}").contains("--since"), "{error:#}");
    }
}
