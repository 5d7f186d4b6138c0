//! What each outpostctl command asks control and how it shows the answer.
//!
//! Commands write to a `Write` and talk through [`ControlClient`], so unit tests run them
//! against a fake control and read what they printed.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_proto::Cursor;
use outpost_proto::api::PATH_BOOTSTRAP_PROFILE;
use outpost_proto::backoff::{BACKOFF_RESET_AFTER_SECS, backoff_delay};
use outpost_proto::name::check_name;
use serde_json::{Value, json};

use crate::client::{ClientError, ControlClient, Transport};
use crate::documents::{SourceText, parse_profile, parse_service_specs};
use crate::duration::{format_duration_secs, format_unix_utc, parse_duration_secs};
use crate::render::{
    CellFormat, Column, as_rows, column, format_value, render_pairs, render_table, shorten_json,
};

/// Tables for people, or control's JSON for tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    Human,
    Json,
}

pub const PATH_HEALTH: &str = "/v1/health";
pub const PATH_NODES: &str = "/v1/nodes";
pub const PATH_SERVICES: &str = "/v1/services";
pub const PATH_ALLOCATIONS: &str = "/v1/allocations";
pub const PATH_ENROLLMENT_TOKENS: &str = "/v1/enrollment-tokens";
pub const PATH_EVENTS: &str = "/v1/events";

/// Long-poll wait of `events --follow`, in seconds.
pub const FOLLOW_WAIT_SECS: u64 = 30;

pub fn print_json(out: &mut dyn Write, value: &Value) -> Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

pub fn status<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let health = client.get(PATH_HEALTH)?;
    if mode == OutputMode::Json {
        return print_json(out, &health);
    }
    let mut pairs = vec![("control".to_string(), client.control_url().to_string())];
    let Value::Object(fields) = &health else {
        bail!(
            "control's health is not a JSON object: {}",
            shorten_json(&health)
        );
    };
    // The fields people look for first, then whatever else control reports.
    const FIRST: [&str; 4] = ["status", "log_epoch", "head", "floor"];
    let rest = fields
        .keys()
        .map(String::as_str)
        .filter(|key| !FIRST.contains(key));
    for key in FIRST.into_iter().chain(rest) {
        if let Some(value) = fields.get(key) {
            let format = if key == "log_epoch" {
                CellFormat::Epoch
            } else {
                CellFormat::Text
            };
            pairs.push((key.replace('_', " "), format_value(value, format)));
        }
    }
    write!(out, "{}", render_pairs(&pairs))?;
    Ok(())
}

pub fn enroll_create<T: Transport>(
    client: &ControlClient<T>,
    ttl_text: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let ttl_secs = parse_duration_secs(ttl_text).context("--ttl")?;
    let answer = client.post(PATH_ENROLLMENT_TOKENS, &json!({ "ttl_secs": ttl_secs }))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let Some(token) = answer.get("token").and_then(Value::as_str) else {
        bail!("control's answer has no token: {}", shorten_json(&answer));
    };
    let text = |key: &str, format: CellFormat| {
        answer
            .get(key)
            .map(|value| format_value(value, format))
            .unwrap_or_default()
    };
    let expires = match answer.get("expires_at_unix").and_then(Value::as_u64) {
        Some(unix) => format!(
            "{} (in {})",
            format_unix_utc(unix),
            format_duration_secs(ttl_secs)
        ),
        None => format!("in {}", format_duration_secs(ttl_secs)),
    };
    let pairs = vec![
        ("token".to_string(), token.to_string()),
        ("token id".to_string(), text("token_id", CellFormat::Text)),
        ("expires".to_string(), expires),
        (
            "ca fingerprint".to_string(),
            text("ca_fingerprint", CellFormat::Text),
        ),
    ];
    write!(out, "{}", render_pairs(&pairs))?;
    writeln!(
        out,
        "start a node with: outpost-agent run --enroll {token}  (the token works once)"
    )?;
    Ok(())
}

const NODE_COLUMNS: &[Column] = &[
    column("NODE", &["node_id", "id"], CellFormat::Text),
    column("STATE", &["state"], CellFormat::Text),
    column(
        "DOWN SINCE",
        &["down_since_unix_ms"],
        CellFormat::UnixMillis,
    ),
    column("SCHEDULING", &["scheduling"], CellFormat::Text),
    column("ROLE", &["role"], CellFormat::Text),
    column("HOSTNAME", &["hostname"], CellFormat::Text),
    column("ARCH", &["arch"], CellFormat::Text),
    column("MEMORY", &["capacity.memory_bytes"], CellFormat::Bytes),
    column("CPU", &["capacity.cpu_millis"], CellFormat::CpuMillis),
    column("ALLOCATIONS", &["allocations"], CellFormat::Text),
    column("OVERLAY", &["overlay_address"], CellFormat::Text),
    column("AGENT", &["agent_version"], CellFormat::Text),
    column("LABELS", &["labels"], CellFormat::Text),
    column(
        "LAST HEARTBEAT",
        &["last_heartbeat_unix_ms"],
        CellFormat::UnixMillis,
    ),
];

pub fn nodes_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    list(client, PATH_NODES, "nodes", NODE_COLUMNS, mode, out)
}

pub fn nodes_revoke<T: Transport>(
    client: &ControlClient<T>,
    node: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("node", node)?;
    let answer = client.post(&format!("{PATH_NODES}/{node}/revoke"), &json!({}))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "node {node} revoked{}", event_suffix(&answer))?;
    Ok(())
}

/// `outpostctl nodes label NODE KEY=VALUE… KEY-…`: sets and removes operator labels (F2).
pub fn nodes_label<T: Transport>(
    client: &ControlClient<T>,
    node: &str,
    changes: &[String],
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("node", node)?;
    let mut set = serde_json::Map::new();
    let mut remove = Vec::new();
    for change in changes {
        match change.split_once('=') {
            Some((key, value)) => {
                outpost_proto::node::check_label("label", key, value)?;
                set.insert(key.to_string(), Value::String(value.to_string()));
            }
            None => match change.strip_suffix('-') {
                Some(key) => {
                    check_name("label", key)?;
                    remove.push(Value::String(key.to_string()));
                }
                None => {
                    bail!("invalid label {change:?}: expected KEY=VALUE to set or KEY- to remove")
                }
            },
        }
    }
    if set.is_empty() && remove.is_empty() {
        bail!("no label given: expected KEY=VALUE to set or KEY- to remove");
    }
    let answer = client.post(
        &format!("{PATH_NODES}/{node}/labels"),
        &json!({ "set": set, "remove": remove }),
    )?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "node {node} labeled{}", event_suffix(&answer))?;
    Ok(())
}

/// What `outpostctl nodes cordon|uncordon|drain` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSchedulingAction {
    Cordon,
    Uncordon,
    Drain,
}

pub fn nodes_scheduling<T: Transport>(
    client: &ControlClient<T>,
    node: &str,
    action: NodeSchedulingAction,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("node", node)?;
    let (path, done) = match action {
        NodeSchedulingAction::Cordon => (
            "cordon",
            "cordoned: it keeps what it runs and gets nothing new",
        ),
        NodeSchedulingAction::Uncordon => {
            ("uncordon", "uncordoned: it may get new instances again")
        }
        NodeSchedulingAction::Drain => (
            "drain",
            "draining: its instances move off in wave order (see `outpostctl allocations`)",
        ),
    };
    let answer = client.post(&format!("{PATH_NODES}/{node}/{path}"), &json!({}))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "node {node} {done}{}", event_suffix(&answer))?;
    Ok(())
}

const SERVICE_COLUMNS: &[Column] = &[
    column("NAME", &["name", "spec.name"], CellFormat::Text),
    column("TYPE", &["spec.process_type"], CellFormat::Text),
    column("REPLICAS", &["spec.replicas"], CellFormat::Text),
    column("PLACED", &["placed"], CellFormat::Text),
    column("WAVE", &["spec.wave"], CellFormat::Text),
    column("MEMORY", &["spec.memory_bytes"], CellFormat::Bytes),
    column("CPU", &["spec.cpu_millis"], CellFormat::CpuMillis),
    column("COMMAND", &["spec.command"], CellFormat::Text),
];

pub fn services_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    list(
        client,
        PATH_SERVICES,
        "services",
        SERVICE_COLUMNS,
        mode,
        out,
    )
}

/// Applies every spec of the document in order; stops at the first refusal, saying which
/// specs were already applied.
pub fn services_apply<T: Transport>(
    client: &ControlClient<T>,
    source: &SourceText,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let specs = parse_service_specs(source)?;
    let mut answers = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let body = serde_json::to_value(spec)?;
        let answer = client.post(PATH_SERVICES, &body).map_err(|error| {
            let applied: Vec<&str> = specs[..index]
                .iter()
                .map(|spec| spec.name.as_str())
                .collect();
            let already = if applied.is_empty() {
                String::new()
            } else {
                format!(" (already applied: {})", applied.join(", "))
            };
            anyhow::Error::new(error).context(format!(
                "service {:?} from {} was not applied{already}",
                spec.name.as_str(),
                source.label
            ))
        })?;
        if mode == OutputMode::Human {
            let placed = match answer.pointer("/service/placed").and_then(Value::as_u64) {
                Some(placed) => match spec.replicas.count() {
                    Some(count) => format!(": {placed} of {count} replicas placed"),
                    None => format!(": {placed} placed, one on every eligible node"),
                },
                None => String::new(),
            };
            writeln!(
                out,
                "service {} applied{}{placed}",
                spec.name,
                event_suffix(&answer)
            )?;
        }
        answers.push(answer);
    }
    if mode == OutputMode::Json {
        print_json(out, &Value::Array(answers))?;
    }
    Ok(())
}

pub fn services_remove<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("service", name)?;
    let answer = client.delete(&format!("{PATH_SERVICES}/{name}"))?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    writeln!(out, "service {name} removed{}", event_suffix(&answer))?;
    Ok(())
}

const ALLOCATION_COLUMNS: &[Column] = &[
    column("ALLOCATION", &["allocation_id"], CellFormat::Text),
    column("SERVICE", &["service"], CellFormat::Text),
    column("NODE", &["node_id"], CellFormat::Text),
    column("MEMORY", &["memory_bytes"], CellFormat::Bytes),
    column("STATE", &["state"], CellFormat::Text).always(),
    column("RESTARTS", &["restarts"], CellFormat::Text),
    column("REPORTED", &["reported_at_unix_ms"], CellFormat::UnixMillis),
    column("MESSAGE", &["message"], CellFormat::Text),
];

pub fn allocations_list<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    list(
        client,
        PATH_ALLOCATIONS,
        "allocations",
        ALLOCATION_COLUMNS,
        mode,
        out,
    )
}

pub fn list<T: Transport>(
    client: &ControlClient<T>,
    path: &str,
    what: &str,
    columns: &[Column],
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let answer = client.get(path)?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let rows =
        as_rows(&answer, what).map_err(|message| anyhow::anyhow!("GET {path}: {message}"))?;
    if rows.is_empty() {
        writeln!(out, "no {what}")?;
        return Ok(());
    }
    write!(out, "{}", render_table(rows, columns))?;
    Ok(())
}

pub fn profile_apply<T: Transport>(
    client: &ControlClient<T>,
    source: &SourceText,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let profile = parse_profile(source)?;
    let answer = client
        .put(PATH_BOOTSTRAP_PROFILE, &serde_json::to_value(&profile)?)
        .with_context(|| {
            format!(
                "the profile from {} was not applied; the previous profile stays",
                source.label
            )
        })?;
    if mode == OutputMode::Json {
        return print_json(out, &answer);
    }
    let generation = answer
        .get("generation")
        .map(|value| format_value(value, CellFormat::Text));
    let name = if profile.metadata.name.is_empty() {
        String::new()
    } else {
        format!(" {:?}", profile.metadata.name)
    };
    match generation {
        Some(generation) => writeln!(
            out,
            "profile{name} applied: generation {generation}{}",
            event_suffix(&answer)
        )?,
        None => writeln!(out, "profile{name} applied{}", event_suffix(&answer))?,
    }
    Ok(())
}

pub fn profile_show<T: Transport>(
    client: &ControlClient<T>,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let profile = client.get(PATH_BOOTSTRAP_PROFILE)?;
    if mode == OutputMode::Json {
        return print_json(out, &profile);
    }
    write!(out, "{}", serde_norway::to_string(&profile)?)?;
    Ok(())
}

/// ` (event 12)` when the answer names its event.
pub fn event_suffix(answer: &Value) -> String {
    match answer.get("event_id") {
        Some(id) if !id.is_null() => format!(" (event {})", format_value(id, CellFormat::Text)),
        _ => String::new(),
    }
}

/// Whether `events` stops once it has caught up or keeps long-polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsUntil {
    CaughtUp,
    Forever,
}

/// The table header of human event output is printed once control has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderLine {
    Pending,
    Printed,
}

/// Effects of `events --follow` besides printing: waiting between retries and drawing jitter.
pub trait Pause {
    fn pause(&mut self, duration: Duration);
    fn random(&mut self) -> u64;
    /// Seconds since some fixed start, to reset the backoff after a healthy stretch.
    fn elapsed_secs(&self) -> u64;
}

pub struct EventsRequest<'a> {
    pub from: Option<&'a str>,
    pub until: EventsUntil,
    pub limit: u32,
}

/// Prints the admin event feed from a cursor; `Forever` retries transient failures with
/// backoff and exits only on an error a retry cannot fix (a refused token, a gone cursor).
pub fn events<T: Transport>(
    client: &ControlClient<T>,
    request: &EventsRequest<'_>,
    mode: OutputMode,
    out: &mut dyn Write,
    notes: &mut dyn Write,
    pause: &mut dyn Pause,
) -> Result<()> {
    let mut cursor = match request.from {
        Some(text) => text.trim().parse::<Cursor>().context("--from")?.to_string(),
        None => start_of_current_epoch(client)?,
    };
    let wait_secs = match request.until {
        EventsUntil::CaughtUp => 0,
        EventsUntil::Forever => FOLLOW_WAIT_SECS,
    };
    let limit = request.limit.max(1);
    let mut collected = Vec::new();
    let mut failures: u32 = 0;
    // When the current run of successful polls began; the backoff resets after a healthy while.
    let mut healthy_since: Option<u64> = None;
    let mut header = match mode {
        OutputMode::Human => HeaderLine::Pending,
        OutputMode::Json => HeaderLine::Printed,
    };
    loop {
        let path = format!("{PATH_EVENTS}?cursor={cursor}&wait={wait_secs}&limit={limit}");
        let batch = match client.get_waiting(&path, Duration::from_secs(wait_secs)) {
            Ok(batch) => batch,
            Err(error) if request.until == EventsUntil::Forever && is_transient(&error) => {
                healthy_since = None;
                let delay = backoff_delay(failures, pause.random());
                failures = failures.saturating_add(1);
                writeln!(
                    notes,
                    "outpostctl: {error}; retrying in {} ms",
                    delay.as_millis()
                )?;
                pause.pause(delay);
                continue;
            }
            Err(error) => return Err(explain_events_error(error, &cursor)),
        };
        let now_secs = pause.elapsed_secs();
        let since = *healthy_since.get_or_insert(now_secs);
        if now_secs.saturating_sub(since) >= BACKOFF_RESET_AFTER_SECS {
            failures = 0;
        }
        let events = batch
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let bookmark = batch
            .get("bookmark")
            .and_then(cursor_text)
            .with_context(|| {
                format!(
                    "control's event batch has no bookmark: {}",
                    shorten_json(&batch)
                )
            })?;
        if header == HeaderLine::Pending {
            let line = event_line("ID", "AT", "KIND", "AGGREGATE", "SEQ", "DATA");
            writeln!(out, "{line}")?;
            header = HeaderLine::Printed;
        }
        for event in &events {
            match (mode, request.until) {
                (OutputMode::Json, EventsUntil::CaughtUp) => collected.push(event.clone()),
                (OutputMode::Json, EventsUntil::Forever) => writeln!(out, "{event}")?,
                (OutputMode::Human, _) => writeln!(out, "{}", human_event(event))?,
            }
        }
        out.flush()?;
        let advanced = bookmark != cursor;
        cursor = bookmark;
        if request.until == EventsUntil::CaughtUp && (events.is_empty() || !advanced) {
            break;
        }
    }
    match mode {
        OutputMode::Json => print_json(out, &json!({ "events": collected, "bookmark": cursor }))?,
        OutputMode::Human => writeln!(notes, "continue with: outpostctl events --from {cursor}")?,
    }
    Ok(())
}

/// `EPOCH.0` for the log epoch control reports in its health.
fn start_of_current_epoch<T: Transport>(client: &ControlClient<T>) -> Result<String> {
    let health = client.get(PATH_HEALTH)?;
    let epoch = match health.get("log_epoch") {
        Some(Value::Number(number)) => number.as_u64(),
        Some(Value::String(text)) => u64::from_str_radix(text, 16).ok(),
        _ => None,
    };
    let Some(epoch) = epoch else {
        bail!(
            "control's health has no usable log_epoch: {}; give --from EPOCH.ID",
            shorten_json(&health)
        );
    };
    Ok(Cursor::new(epoch, 0).to_string())
}

/// A cursor as text, whether control sent `"EPOCH.ID"` or `{"log_epoch","event_id"}`.
fn cursor_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.parse::<Cursor>().ok().map(|cursor| cursor.to_string()),
        Value::Object(_) => serde_json::from_value::<Cursor>(value.clone())
            .ok()
            .map(|cursor| cursor.to_string()),
        _ => None,
    }
}

fn is_transient(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable { .. } | ClientError::TimedOut { .. } => true,
        ClientError::Refused { status, .. } => *status == 429 || *status >= 500,
        ClientError::BadAnswer { status, .. } => *status >= 500,
        _ => false,
    }
}

fn explain_events_error(error: ClientError, cursor: &str) -> anyhow::Error {
    let gone = matches!(&error, ClientError::Refused { status: 410, .. });
    let hint = if gone {
        format!(
            "cursor {cursor} is no longer served (the log was restored or compacted); start again without --from to read the current epoch"
        )
    } else {
        format!("reading events after {cursor}")
    };
    anyhow::Error::new(error).context(hint)
}

fn event_line(id: &str, at: &str, kind: &str, aggregate: &str, seq: &str, data: &str) -> String {
    format!("{id:>6}  {at:<23}  {kind:<24}  {aggregate:<28}  {seq:>4}  {data}")
        .trim_end()
        .to_string()
}

fn human_event(event: &Value) -> String {
    let text = |key: &str, format: CellFormat| {
        event
            .get(key)
            .map(|value| format_value(value, format))
            .unwrap_or_default()
    };
    let data = event.get("data").map(shorten_json).unwrap_or_default();
    let line = event_line(
        &text("event_id", CellFormat::Text),
        &text("at_unix", CellFormat::UnixTime),
        &text("kind", CellFormat::Text),
        &text("aggregate", CellFormat::Text),
        &text("seq", CellFormat::Text),
        &data,
    );
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Answer, Method, TransportFailure};
    use crate::documents::FormatHint;
    use std::cell::RefCell;

    /// Method and path prefix it answers, and the answer.
    type CannedAnswer = (Method, &'static str, Result<Answer, TransportFailure>);

    /// A fake that stands in for the control service: answers by method and path prefix, in
    /// order, and records every call.
    struct FakeControl {
        answers: RefCell<Vec<CannedAnswer>>,
        calls: RefCell<Vec<(Method, String, Option<String>)>>,
    }

    impl Transport for FakeControl {
        fn send(&self, call: &crate::client::Call<'_>) -> Result<Answer, TransportFailure> {
            self.calls.borrow_mut().push((
                call.method,
                call.path.to_string(),
                call.json_body
                    .as_ref()
                    .map(|body| String::from_utf8_lossy(body).into_owned()),
            ));
            let mut answers = self.answers.borrow_mut();
            let position = answers.iter().position(|(method, prefix, _)| {
                *method == call.method && call.path.starts_with(prefix)
            });
            match position {
                Some(index) => answers.remove(index).2,
                None => Ok(Answer {
                    status: 404,
                    body: br#"{"error":"not_found","message":"fake has no answer"}"#.to_vec(),
                }),
            }
        }
    }

    fn ok(body: Value) -> Result<Answer, TransportFailure> {
        Ok(Answer {
            status: 200,
            body: body.to_string().into_bytes(),
        })
    }

    fn control(answers: Vec<CannedAnswer>) -> ControlClient<FakeControl> {
        let fake = FakeControl {
            answers: RefCell::new(answers),
            calls: RefCell::new(Vec::new()),
        };
        ControlClient::new(
            fake,
            "https://127.0.0.1:7443",
            "/ca.pem",
            Some("opa.t".into()),
        )
    }

    fn calls(client: &ControlClient<FakeControl>) -> Vec<(Method, String, Option<String>)> {
        // The transport is private to the client; reach it through a helper in client.rs.
        client.transport_ref().calls.borrow().clone()
    }

    /// Records pauses; its clock moves `step_secs` each time it is read.
    struct RecordingPause {
        pauses: Vec<Duration>,
        clock_secs: std::cell::Cell<u64>,
        step_secs: u64,
    }

    impl RecordingPause {
        fn new(step_secs: u64) -> Self {
            Self {
                pauses: Vec::new(),
                clock_secs: std::cell::Cell::new(0),
                step_secs,
            }
        }
    }

    impl Pause for RecordingPause {
        fn pause(&mut self, duration: Duration) {
            self.pauses.push(duration);
        }
        fn random(&mut self) -> u64 {
            u64::MAX
        }
        fn elapsed_secs(&self) -> u64 {
            self.clock_secs.set(self.clock_secs.get() + self.step_secs);
            self.clock_secs.get()
        }
    }

    #[test]
    fn follow_backoff_grows_and_resets_after_a_healthy_while() {
        let batch = || ok(json!({"events": [], "bookmark": "0000000000000001.0"}));
        let client = control(vec![
            (
                Method::Get,
                "/v1/events",
                Err(TransportFailure::ConnectionRefused),
            ),
            (Method::Get, "/v1/events", Err(TransportFailure::TimedOut)),
            (Method::Get, "/v1/events", batch()),
            (Method::Get, "/v1/events", batch()),
            (Method::Get, "/v1/events", batch()),
            (
                Method::Get,
                "/v1/events",
                Err(TransportFailure::ConnectionRefused),
            ),
            (
                Method::Get,
                "/v1/events",
                Ok(Answer {
                    status: 401,
                    body: br#"{"error":"unauthorized","message":"no"}"#.to_vec(),
                }),
            ),
        ]);
        let mut pause = RecordingPause::new(60);
        let request = EventsRequest {
            from: Some("0000000000000001.0"),
            until: EventsUntil::Forever,
            limit: 10,
        };
        let error = events(
            &client,
            &request,
            OutputMode::Json,
            &mut Vec::new(),
            &mut Vec::new(),
            &mut pause,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("the token was refused"),
            "{error:#}"
        );
        let ceiling = |attempt: u32| {
            Duration::from_millis(
                u64::MAX % (outpost_proto::backoff::backoff_ceiling_ms(attempt) + 1),
            )
        };
        // Two failures back off from the base; after two healthy minutes the next starts over.
        assert_eq!(pause.pauses, vec![ceiling(0), ceiling(1), ceiling(0)]);
    }

    fn output(run: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> String {
        let mut out = Vec::new();
        run(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn status_shows_the_epoch_as_cursor_hex() {
        let client = control(vec![(
            Method::Get,
            PATH_HEALTH,
            ok(json!({"status": "ok", "log_epoch": 255, "head": 3, "floor": 1})),
        )]);
        let text = output(|out| status(&client, OutputMode::Human, out));
        assert!(text.contains("log epoch  00000000000000ff"), "{text}");
        assert!(
            text.starts_with("control    https://127.0.0.1:7443\n"),
            "{text}"
        );
    }

    #[test]
    fn enroll_create_sends_ttl_secs_and_shows_the_token() {
        let client = control(vec![(
            Method::Post,
            PATH_ENROLLMENT_TOKENS,
            ok(
                json!({"token": "opt1.abcd", "token_id": "t1", "expires_at_unix": 600, "ca_fingerprint": "ff"}),
            ),
        )]);
        let text = output(|out| enroll_create(&client, "10m", OutputMode::Human, out));
        assert!(text.starts_with("token           opt1.abcd\n"), "{text}");
        assert!(text.contains("1970-01-01 00:10:00 UTC (in 10m)"), "{text}");
        assert_eq!(calls(&client)[0].2.as_deref(), Some(r#"{"ttl_secs":600}"#));
    }

    #[test]
    fn enroll_create_refuses_a_bad_ttl_before_calling() {
        let client = control(vec![]);
        let error =
            enroll_create(&client, "ten minutes", OutputMode::Human, &mut Vec::new()).unwrap_err();
        assert!(
            format!("{error:#}").contains("--ttl: invalid duration \"ten minutes\""),
            "{error:#}"
        );
        assert!(calls(&client).is_empty());
    }

    #[test]
    fn services_apply_posts_each_spec_and_reports_partial_progress() {
        let source = SourceText {
            label: "file s.yaml".into(),
            text: "- name: a\n  command: /x\n- name: b\n  command: /y\n".into(),
            format_hint: FormatHint::Yaml,
        };
        let client = control(vec![
            (Method::Post, PATH_SERVICES, ok(json!({"service": {"name": "a", "placed": 0}, "event_id": 4}))),
            (
                Method::Post,
                PATH_SERVICES,
                Ok(Answer {
                    status: 422,
                    body: br#"{"error":"unschedulable","message":"too big","field":"memory_bytes","value":"9"}"#.to_vec(),
                }),
            ),
        ]);
        let mut out = Vec::new();
        let error = services_apply(&client, &source, OutputMode::Human, &mut out).unwrap_err();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "service a applied (event 4): 0 of 1 replicas placed\n"
        );
        let message = format!("{error:#}");
        assert!(message.starts_with("service \"b\" from file s.yaml was not applied (already applied: a): control refused"), "{message}");
        assert!(
            message.contains("field memory_bytes, value \"9\""),
            "{message}"
        );
        let sent: Value = serde_json::from_str(calls(&client)[1].2.as_deref().unwrap()).unwrap();
        assert_eq!(sent["name"], "b");
        assert_eq!(sent["replicas"], 1, "defaults are sent explicitly");
    }

    #[test]
    fn services_ls_renders_a_table_and_json_passes_through() {
        // The ServiceView shape of control/src/api/views.rs.
        let services = json!([{
            "name": "web", "org": "default", "event_id": 7, "updated_at_unix_ms": 0, "placed": 1,
            "spec": {"name": "web", "process_type": "web", "command": "/bin/sleep", "args": [], "env": {},
                     "replicas": 2, "memory_bytes": 67108864, "cpu_millis": 250, "wave": 0, "readiness": null,
                     "restart": "always", "stop_grace_ms": 5000, "working_dir": null}
        }]);
        let client = control(vec![
            (Method::Get, PATH_SERVICES, ok(services.clone())),
            (Method::Get, PATH_SERVICES, ok(services.clone())),
        ]);
        let text = output(|out| services_list(&client, OutputMode::Human, out));
        assert_eq!(
            text,
            "NAME  TYPE  REPLICAS  PLACED  WAVE  MEMORY  CPU   COMMAND\n\
             web   web   2         1       0     64Mi    250m  /bin/sleep\n"
        );
        let text = output(|out| services_list(&client, OutputMode::Json, out));
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), services);
    }

    /// The tables read control's real view types: every column finds its field.
    #[test]
    fn every_column_finds_its_field_in_the_view_types() {
        use outpost_control::api::views::{AllocationView, NodeView, ServiceView};
        use outpost_proto::node::{AllocationState, Capacity};
        let node = NodeView {
            node_id: "edge-1".into(),
            org: "default".into(),
            hostname: "edge-1.lan".into(),
            arch: "aarch64".into(),
            capacity: Capacity {
                memory_bytes: 1 << 30,
                cpu_millis: 2000,
            },
            labels: [("site".to_string(), "north".to_string())].into(),
            state: "down".into(),
            role: "worker".into(),
            registered_at_unix_ms: 0,
            last_heartbeat_unix_ms: Some(1000),
            allocations: 1,
            overlay_address: Some("10.232.0.1/16".into()),
            scheduling: "cordoned".into(),
            down_since_unix_ms: Some(31_000),
            agent_version: Some("0.1.0".into()),
        };
        let service = ServiceView {
            name: "web".into(),
            org: "default".into(),
            spec: serde_json::from_value(json!({"name": "web", "command": "/bin/true"})).unwrap(),
            event_id: 3,
            updated_at_unix_ms: 0,
            placed: 1,
            release: 1,
        };
        let allocation = AllocationView {
            allocation_id: "web-1".into(),
            service: "web".into(),
            node_id: "edge-1".into(),
            replica: 0,
            seq: 1,
            memory_bytes: 1 << 20,
            cpu_millis: 100,
            state: Some(AllocationState::Running),
            restarts: 0,
            message: "started".into(),
            reported_at_unix_ms: Some(1000),
        };
        for (view, columns) in [
            (serde_json::to_value(&node).unwrap(), NODE_COLUMNS),
            (serde_json::to_value(&service).unwrap(), SERVICE_COLUMNS),
            (
                serde_json::to_value(&allocation).unwrap(),
                ALLOCATION_COLUMNS,
            ),
        ] {
            let table = render_table(std::slice::from_ref(&view), columns);
            let header = table.lines().next().unwrap();
            for column in columns {
                assert!(
                    header.contains(column.header),
                    "{} missing from {header:?} for {view}",
                    column.header
                );
            }
        }
    }

    #[test]
    fn names_in_paths_are_checked() {
        let client = control(vec![]);
        let error =
            nodes_revoke(&client, "../admin", OutputMode::Human, &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("invalid node"), "{error}");
        assert!(calls(&client).is_empty());
    }

    #[test]
    fn events_start_at_the_current_epoch_and_page_until_caught_up() {
        let client = control(vec![
            (
                Method::Get,
                PATH_HEALTH,
                ok(json!({"status": "ok", "log_epoch": 1, "head": 2, "floor": 1})),
            ),
            (
                Method::Get,
                "/v1/events?cursor=0000000000000001.0&",
                ok(
                    json!({"events": [{"event_id": 1, "aggregate": "service/web", "seq": 1, "kind": "ServiceCreated", "at_unix": 0, "data": {"name": "web"}}], "bookmark": "0000000000000001.1"}),
                ),
            ),
            (
                Method::Get,
                "/v1/events?cursor=0000000000000001.1&",
                ok(
                    json!({"events": [{"event_id": 2, "aggregate": "service/web", "seq": 2, "kind": "ServiceUpdated", "at_unix": 0, "data": {}}], "bookmark": "0000000000000001.2"}),
                ),
            ),
            (
                Method::Get,
                "/v1/events?cursor=0000000000000001.2&",
                ok(json!({"events": [], "bookmark": "0000000000000001.2"})),
            ),
        ]);
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let request = EventsRequest {
            from: None,
            until: EventsUntil::CaughtUp,
            limit: 1,
        };
        let mut pause = RecordingPause::new(0);
        events(
            &client,
            &request,
            OutputMode::Json,
            &mut out,
            &mut notes,
            &mut pause,
        )
        .unwrap();
        let printed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(printed["events"].as_array().unwrap().len(), 2);
        assert_eq!(printed["bookmark"], "0000000000000001.2");
        assert!(
            calls(&client)
                .iter()
                .all(|call| !call.1.contains("wait=") || call.1.contains("wait=0"))
        );
    }

    #[test]
    fn follow_retries_transient_failures_and_stops_on_gone() {
        let client = control(vec![
            (
                Method::Get,
                "/v1/events",
                Err(TransportFailure::ConnectionRefused),
            ),
            (
                Method::Get,
                "/v1/events",
                ok(
                    json!({"events": [{"event_id": 5, "kind": "NodeRegistered", "aggregate": "node/n1", "seq": 1, "at_unix": 0, "data": {}}], "bookmark": {"log_epoch": 1, "event_id": 5}}),
                ),
            ),
            (
                Method::Get,
                "/v1/events",
                Ok(Answer {
                    status: 410,
                    body: br#"{"error":"gone","message":"other epoch"}"#.to_vec(),
                }),
            ),
        ]);
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let mut pause = RecordingPause::new(0);
        let request = EventsRequest {
            from: Some("0000000000000001.4"),
            until: EventsUntil::Forever,
            limit: 10,
        };
        let error = events(
            &client,
            &request,
            OutputMode::Human,
            &mut out,
            &mut notes,
            &mut pause,
        )
        .unwrap_err();
        assert_eq!(pause.pauses, vec![Duration::from_millis(u64::MAX % 801)]);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.lines().nth(1).unwrap().contains("NodeRegistered"),
            "{text}"
        );
        assert!(
            format!("{error:#}").contains("cursor 0000000000000001.5 is no longer served"),
            "{error:#}"
        );
        let paths: Vec<String> = calls(&client).into_iter().map(|call| call.1).collect();
        assert!(
            paths[2].contains("cursor=0000000000000001.5&wait=30"),
            "{paths:?}"
        );
    }

    #[test]
    fn a_bad_from_cursor_is_refused_before_calling() {
        let client = control(vec![]);
        let request = EventsRequest {
            from: Some("12"),
            until: EventsUntil::CaughtUp,
            limit: 10,
        };
        let mut pause = RecordingPause::new(0);
        let error = events(
            &client,
            &request,
            OutputMode::Human,
            &mut Vec::new(),
            &mut Vec::new(),
            &mut pause,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("--from: invalid cursor \"12\""),
            "{error:#}"
        );
    }

    #[test]
    fn profile_apply_failure_says_the_previous_profile_stays() {
        let source = SourceText {
            label: "file p.yaml".into(),
            text: "apiVersion: outpost/v1\nkind: EnvironmentProfile\n".into(),
            format_hint: FormatHint::Yaml,
        };
        let client = control(vec![(
            Method::Put,
            PATH_BOOTSTRAP_PROFILE,
            Ok(Answer {
                status: 400,
                body: br#"{"error":"invalid_field","message":"bad","field":"kind","value":"x"}"#
                    .to_vec(),
            }),
        )]);
        let error =
            profile_apply(&client, &source, OutputMode::Human, &mut Vec::new()).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("the previous profile stays") && message.contains("field kind"),
            "{message}"
        );
    }
}
