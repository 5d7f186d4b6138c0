//! `outpostctl tokens create|ls|revoke` (P5): operator tokens of an org with scopes and an
//! optional lifetime; a revoked token is refused from the next request on.

use std::io::Write;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, event_suffix, print_json};
use crate::duration::parse_duration_secs;
#[cfg(test)]
use crate::render::render_table;
use crate::render::{CellFormat, Column, column};

pub const PATH_TOKENS: &str = "/v1/admin/tokens";

pub const TOKEN_COLUMNS: &[Column] = &[
    column("ID", &["token_id"], CellFormat::Text),
    column("ORG", &["org"], CellFormat::Text),
    column("SCOPES", &["scopes"], CellFormat::Text),
    column("ISSUED", &["issued_at_unix_ms"], CellFormat::UnixMillis),
    column("EXPIRES", &["expires_at_unix"], CellFormat::Text),
    column("REVOKED", &["revoked"], CellFormat::Text),
];

/// The body of `tokens create`: `--ttl` is checked here (a duration), the rest by control.
pub fn create_body(org: &str, scopes: &[String], ttl: Option<&str>) -> Result<Value> {
    if scopes.is_empty() {
        bail!("tokens create needs at least one --scopes SCOPE");
    }
    let ttl_secs = ttl
        .map(|text| parse_duration_secs(text).context("--ttl"))
        .transpose()?;
    Ok(json!({ "org": org, "scopes": scopes, "ttl_secs": ttl_secs }))
}

pub fn tokens_create<T: Transport>(
    client: &ControlClient<T>,
    body: &Value,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let answer = client.post(PATH_TOKENS, body)?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let Some(token) = answer.get("token").and_then(Value::as_str) else {
        bail!("control's answer has no token");
    };
    writeln!(
        out,
        "token {} for org {} (shown once):\n{token}",
        answer["token_id"].as_str().unwrap_or_default(),
        answer["org"].as_str().unwrap_or_default()
    )?;
    Ok(())
}

pub fn tokens_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    crate::commands::list(client, PATH_TOKENS, "tokens", TOKEN_COLUMNS, mode, out)
}

pub fn tokens_revoke<T: Transport>(
    client: &ControlClient<T>,
    token_id: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    // Accept the whole token too, and send only its id.
    let id = token_id
        .strip_prefix("opa.")
        .map_or(token_id, |rest| rest.split('.').next().unwrap_or(rest));
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("invalid token id: expected the hex id shown by `tokens ls`");
    }
    let answer = client.post(&format!("{PATH_TOKENS}/{id}/revoke"), &json!({}))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "token {id} revoked{}", event_suffix(&answer))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_carry_the_ttl_in_seconds() {
        let body = create_body("acme", &["read".into()], Some("2h")).unwrap();
        assert_eq!(body["ttl_secs"], 7200);
        let body = create_body("acme", &["read".into()], None).unwrap();
        assert_eq!(body["ttl_secs"], Value::Null);
        assert!(create_body("acme", &[], None).is_err());
        assert!(create_body("acme", &["read".into()], Some("soon")).is_err());
    }

    #[test]
    fn every_column_finds_its_field_in_the_view_type() {
        let view = outpost_control::api::tokens::TokenView {
            token_id: "ab12".into(),
            org: "acme".into(),
            scopes: vec!["read".into()],
            issued_at_unix_ms: 1000,
            expires_at_unix: Some(2),
            revoked: false,
        };
        let value = serde_json::to_value(&view).unwrap();
        let table = render_table(std::slice::from_ref(&value), TOKEN_COLUMNS);
        let header = table.lines().next().unwrap();
        for column in TOKEN_COLUMNS {
            assert!(header.contains(column.header), "{}", column.header);
        }
    }
}
