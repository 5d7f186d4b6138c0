//! `outpostctl routes apply|ls|rm`: routes of the caller's org, their backends as control sees
//! them, and what each edge reported it applied.

use std::io::Write;

use anyhow::Result;
use outpost_proto::name::check_name;
use serde_json::{Value, json};

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, event_suffix, print_json};
use crate::documents::{SourceText, parse_route_specs};
use crate::render::{CellFormat, Column, as_rows, column, render_table};

pub const PATH_ROUTES: &str = "/v1/routes";

const ROUTE_COLUMNS: &[Column] = &[
    column("NAME", &["name"], CellFormat::Text),
    column("MATCH", &["match"], CellFormat::Text),
    column("SERVICE", &["service"], CellFormat::Text),
    column("TLS", &["tls"], CellFormat::Text),
    column("PROXY", &["proxy_protocol"], CellFormat::Text),
    column("READY", &["ready"], CellFormat::Text).always(),
    column("EDGES", &["edges"], CellFormat::Text).always(),
];

/// One table row from a `RouteView`: hosts or `:PORT`, `service:port`, ready/known backends,
/// and per edge `ID healthy/known @cursor` (with `REFUSED` when its last table was refused).
pub fn route_row(view: &Value) -> Value {
    let spec = &view["spec"];
    let text = |value: &Value| value.as_str().unwrap_or("-").to_string();
    let matching = match spec["listen_port"].as_u64() {
        Some(port) => format!(":{port}"),
        None => spec["hosts"]
            .as_array()
            .map(|hosts| hosts.iter().map(text).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
    };
    let backends = view["backends"].as_array().cloned().unwrap_or_default();
    let ready = backends
        .iter()
        .filter(|b| b["ready"] == json!(true))
        .count();
    let edges: Vec<String> = view["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|edge| {
            let cursor = edge["cursor"].as_str().unwrap_or("-");
            let refused = if edge["refused"].is_string() {
                " REFUSED"
            } else {
                ""
            };
            format!(
                "{} {}/{} @{cursor}{refused}",
                text(&edge["edge_id"]),
                edge["healthy_backends"].as_u64().unwrap_or(0),
                edge["backends"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    json!({
        "name": view["name"],
        "match": matching,
        "service": format!("{}:{}", text(&spec["service"]), text(&spec["port"])),
        "tls": spec["tls"],
        "proxy_protocol": spec["proxy_protocol"],
        "ready": format!("{ready}/{}", backends.len()),
        "edges": if edges.is_empty() { "-".to_string() } else { edges.join("; ") },
    })
}

pub fn routes_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let answer = client.get(PATH_ROUTES)?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let rows = as_rows(&answer, "routes")
        .map_err(|message| anyhow::anyhow!("GET {PATH_ROUTES}: {message}"))?;
    if rows.is_empty() {
        writeln!(out, "no routes")?;
        return Ok(());
    }
    let rows: Vec<Value> = rows.iter().map(route_row).collect();
    write!(out, "{}", render_table(&rows, ROUTE_COLUMNS))?;
    Ok(())
}

/// Applies every route of the document in order; stops at the first refusal, saying which were
/// already applied.
pub fn routes_apply<T: Transport>(
    client: &ControlClient<T>,
    source: &SourceText,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let specs = parse_route_specs(source)?;
    let mut answers = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let answer = client
            .post(PATH_ROUTES, &serde_json::to_value(spec)?)
            .map_err(|error| {
                let applied: Vec<&str> = specs[..index].iter().map(|s| s.name.as_str()).collect();
                let already = if applied.is_empty() {
                    String::new()
                } else {
                    format!(" (already applied: {})", applied.join(", "))
                };
                anyhow::Error::new(error).context(format!(
                    "route {:?} from {} was not applied{already}",
                    spec.name.as_str(),
                    source.label
                ))
            })?;
        if mode == OutputMode::Human {
            writeln!(out, "route {} applied{}", spec.name, event_suffix(&answer))?;
        }
        answers.push(answer);
    }
    if mode == OutputMode::Json {
        return print_json(out, &Value::Array(answers));
    }
    Ok(())
}

pub fn routes_remove<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("route", name)?;
    let answer = client.delete(&format!("{PATH_ROUTES}/{name}"))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "route {name} removed{}", event_suffix(&answer))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_control::route::api::{EdgeRouteStatus, RouteView};

    /// The row reads control's real view type: every column is filled.
    #[test]
    fn a_route_view_fills_every_column() {
        let spec: outpost_proto::route::RouteSpec = serde_json::from_value(json!({
            "name": "shop", "hosts": ["shop.example.com"], "service": "web", "port": "http"
        }))
        .unwrap();
        let view = RouteView {
            name: "shop".into(),
            org: "default".into(),
            spec,
            event_id: 3,
            updated_at_unix_ms: 0,
            updated_by: "opa.t".into(),
            backends: Vec::new(),
            edges: vec![EdgeRouteStatus {
                edge_id: "e1".into(),
                cursor: Some(outpost_proto::Cursor::new(1, 3)),
                route_count: 1,
                healthy_backends: 1,
                backends: 2,
                refused: None,
                at_unix_ms: 0,
            }],
        };
        let row = route_row(&serde_json::to_value(&view).unwrap());
        assert_eq!(row["match"], "shop.example.com");
        assert_eq!(row["service"], "web:http");
        assert_eq!(row["ready"], "0/0");
        assert!(
            row["edges"].as_str().unwrap().starts_with("e1 1/2 @"),
            "{row}"
        );
        let table = render_table(&[row], ROUTE_COLUMNS);
        assert!(table.contains("shop.example.com"), "{table}");
    }
}
