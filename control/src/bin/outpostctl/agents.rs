//! `outpostctl agents` (U2): each node's agent version and the org's latest agent upgrade;
//! `outpostctl agents upgrade --artifact SHA --signature SIG [--selector K=V,…]
//! [--max-parallel N]` starts a batched upgrade to a pushed, signed agent binary.

use std::io::Write;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, print_json};
use crate::render::{CellFormat, Column, column, render_table};

const PATH_AGENTS: &str = "/v1/agents";
const PATH_UPGRADE: &str = "/v1/agents/upgrade";

const AGENT_COLUMNS: &[Column] = &[
    column("NODE", &["node_id"], CellFormat::Text),
    column("STATE", &["state"], CellFormat::Text),
    column("ARCH", &["arch"], CellFormat::Text),
    column("VERSION", &["agent.version"], CellFormat::Text),
    column("BINARY", &["agent.sha256"], CellFormat::Text),
    column("UPGRADE", &["agent.upgrade.state"], CellFormat::Text),
    column("TO", &["agent.upgrade.target_sha256"], CellFormat::Text),
    column("MESSAGE", &["agent.upgrade.message"], CellFormat::Text),
];

/// The upgrade line under the table.
fn upgrade_line(upgrade: &Value) -> String {
    let text = |key: &str| upgrade.get(key).and_then(Value::as_str).unwrap_or("");
    let number = |key: &str| upgrade.get(key).and_then(Value::as_u64).unwrap_or(0);
    let nodes = upgrade
        .get("nodes")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut line = format!(
        "agent upgrade {}: {} to {}, batch {}, {} of {} nodes updated",
        number("number"),
        text("state"),
        text("artifact"),
        number("batch"),
        number("updated"),
        nodes
    );
    if let Some(reason) = upgrade.get("halt_reason").and_then(Value::as_str) {
        line.push_str(&format!("; halted: {reason}"));
    }
    line
}

fn print_agents(answer: &Value, mode: OutputMode, out: &mut dyn Write) -> Result<()> {
    if mode == OutputMode::Json {
        return print_json(out, answer);
    }
    let rows = answer
        .get("nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        writeln!(out, "no nodes")?;
    } else {
        write!(out, "{}", render_table(&rows, AGENT_COLUMNS))?;
    }
    if let Some(upgrade) = answer.get("upgrade").filter(|u| !u.is_null()) {
        writeln!(out, "{}", upgrade_line(upgrade))?;
    }
    Ok(())
}

pub fn agents_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    print_agents(&client.get(PATH_AGENTS)?, mode, out)
}

/// `K=V,K=V` into selector labels.
fn selector(text: Option<&str>) -> Result<Value> {
    let mut labels = serde_json::Map::new();
    for pair in text.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("invalid selector {pair:?}: expected KEY=VALUE[,KEY=VALUE…]");
        };
        outpost_proto::node::check_label("selector", key, value)?;
        labels.insert(key.to_string(), Value::String(value.to_string()));
    }
    Ok(json!({ "labels": labels }))
}

pub struct UpgradeArgs<'a> {
    pub artifact: &'a str,
    pub signature: &'a str,
    pub selector: Option<&'a str>,
    pub max_parallel: u32,
    pub health_deadline_secs: u32,
}

pub fn agents_upgrade<T: Transport>(
    client: &ControlClient<T>,
    args: &UpgradeArgs<'_>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    outpost_proto::artifact::check_sha256("artifact", args.artifact)?;
    let answer = client.post(
        PATH_UPGRADE,
        &json!({
            "artifact": args.artifact,
            "signature": args.signature,
            "selector": selector(args.selector)?,
            "max_parallel": args.max_parallel,
            "health_deadline_secs": args.health_deadline_secs,
        }),
    )?;
    print_agents(&answer, mode, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_bad_ones_are_named() {
        assert_eq!(
            selector(Some("site=north,tier=a")).unwrap(),
            json!({"labels": {"site": "north", "tier": "a"}})
        );
        assert_eq!(selector(None).unwrap(), json!({"labels": {}}));
        let error = selector(Some("site")).unwrap_err().to_string();
        assert!(error.contains("\"site\""), "{error}");
    }

    #[test]
    fn the_table_and_the_upgrade_line_show_versions_and_the_halt() {
        let answer = json!({
            "nodes": [{"node_id": "edge-1", "state": "ready", "arch": "x86_64",
                       "agent": {"version": "0.1.0", "sha256": null,
                                 "upgrade": {"target_sha256": "ab", "state": "rolled_back", "message": "stopped"}}}],
            "upgrade": {"number": 2, "state": "halted", "artifact": "ab", "batch": 1, "updated": 0,
                        "nodes": ["edge-1"], "halt_reason": "batch 1 failed"}
        });
        let mut out = Vec::new();
        print_agents(&answer, OutputMode::Human, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("rolled_back") && text.contains("0.1.0"),
            "{text}"
        );
        assert!(
            text.contains("agent upgrade 2: halted to ab, batch 1, 0 of 1 nodes updated; halted: batch 1 failed"),
            "{text}"
        );
    }
}
