//! The agent's structured logs: a `tracing` subscriber that writes one line per event to stderr,
//! as text or as JSON lines, with the fields control and the edge use (`component`, `action`,
//! `node_id`, `allocation_id`, `generation`, `duration_ms`, `attempt`).
//!
//! Written by hand rather than with `tracing-subscriber`: its `fmt` layer with JSON costs more
//! than the static agent's remaining room under its 4 MiB budget (docs/footprint.md has the
//! figures), and the agent needs no spans, no per-target filters and no colours, only a level.
//! The line shapes match control's `tracing-subscriber` output (`--log-format json` uses
//! `flatten_event`), so one log pipeline reads all three programs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber, span};

/// How each line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-07T10:00:00.123Z  INFO outpost_agent::boot: message key=value …`
    Text,
    /// One JSON object a line: `timestamp`, `level`, `message`, the fields, `target`.
    Json,
}

/// What the operator chose: `--log-format` / `OUTPOST_LOG_FORMAT`, and `OUTPOST_LOG` (a level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    pub max_level: Level,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            max_level: Level::INFO,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogSettingError {
    #[error("log format {0:?} is not one of text, json")]
    Format(String),
    #[error("OUTPOST_LOG {0:?} is not one of error, warn, info, debug, trace")]
    Level(String),
}

impl LogFormat {
    pub fn parse(value: &str) -> Result<Self, LogSettingError> {
        match value {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(LogSettingError::Format(other.to_string())),
        }
    }
}

pub fn parse_level(value: &str) -> Result<Level, LogSettingError> {
    value
        .trim()
        .parse::<Level>()
        .map_err(|_| LogSettingError::Level(value.to_string()))
}

/// Where finished lines go: stderr in the binary, a buffer in tests.
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

pub struct LineSubscriber {
    settings: LogSettings,
    sink: Sink,
}

impl LineSubscriber {
    pub fn to_stderr(settings: LogSettings) -> Self {
        Self::with_sink(
            settings,
            Box::new(|line| {
                // One write per line, so lines from several threads never interleave.
                let _ = std::io::stderr().lock().write_all(line);
            }),
        )
    }

    pub fn with_sink(settings: LogSettings, sink: Sink) -> Self {
        Self { settings, sink }
    }
}

/// Installs the stderr subscriber for the whole process. A second call (tests) keeps the first.
pub fn install(settings: LogSettings) {
    let _ = tracing::subscriber::set_global_default(LineSubscriber::to_stderr(settings));
}

impl Subscriber for LineSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= &self.settings.max_level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.settings.max_level))
    }

    // The agent records no spans; every id is the same and nothing is kept.
    fn new_span(&self, _attributes: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _span: &span::Id, _values: &span::Record<'_>) {}

    fn record_follows_from(&self, _span: &span::Id, _follows: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let metadata = event.metadata();
        let line = render_line(
            self.settings.format,
            SystemTime::now(),
            *metadata.level(),
            metadata.target(),
            &fields,
        );
        (self.sink)(line.as_bytes());
    }

    fn enter(&self, _span: &span::Id) {}

    fn exit(&self, _span: &span::Id) {}
}

/// An event's message and its other fields, in the order they were written.
#[derive(Default, Debug)]
pub struct Fields {
    pub message: String,
    pub others: Vec<(&'static str, Value)>,
}

#[derive(Debug, PartialEq)]
pub enum Value {
    /// Numbers and booleans: bare in JSON.
    Bare(String),
    Text(String),
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field, Value::Text(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, Value::Text(value.to_string()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::Bare(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::Bare(value.to_string()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::Bare(value.to_string()));
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = match value {
                Value::Bare(text) | Value::Text(text) => text,
            };
        } else {
            self.others.push((field.name(), value));
        }
    }
}

/// One finished line, newline included.
pub fn render_line(
    format: LogFormat,
    at: SystemTime,
    level: Level,
    target: &str,
    fields: &Fields,
) -> String {
    let timestamp = rfc3339_millis(at);
    let mut line = String::with_capacity(128);
    match format {
        LogFormat::Text => {
            let _ = write!(line, "{timestamp} {level:>5} {target}: {}", fields.message);
            for (name, value) in &fields.others {
                let text = match value {
                    Value::Bare(text) | Value::Text(text) => text,
                };
                line.push(' ');
                line.push_str(name);
                line.push('=');
                if text.is_empty() || text.contains([' ', '"', '=']) {
                    let _ = write!(line, "{text:?}");
                } else {
                    line.push_str(text);
                }
            }
        }
        LogFormat::Json => {
            line.push_str("{\"timestamp\":");
            push_json_string(&mut line, &timestamp);
            line.push_str(",\"level\":");
            push_json_string(&mut line, level.as_str());
            line.push_str(",\"message\":");
            push_json_string(&mut line, &fields.message);
            for (name, value) in &fields.others {
                line.push(',');
                push_json_string(&mut line, name);
                line.push(':');
                match value {
                    Value::Bare(text) => line.push_str(text),
                    Value::Text(text) => push_json_string(&mut line, text),
                }
            }
            line.push_str(",\"target\":");
            push_json_string(&mut line, target);
            line.push('}');
        }
    }
    line.push('\n');
    line
}

fn push_json_string(line: &mut String, text: &str) {
    line.push('"');
    for character in text.chars() {
        match character {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            control if (control as u32) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", control as u32);
            }
            other => line.push(other),
        }
    }
    line.push('"');
}

/// `2026-12-07T10:00:00.123Z`, in UTC.
pub fn rfc3339_millis(at: SystemTime) -> String {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let second_of_day = secs % 86_400;
    let (year, month, day) = outpost_proto::time::civil_from_days(secs / 86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The lines `emit` logs on this thread, for tests of what a module logs.
#[cfg(test)]
pub(crate) fn capture(settings: LogSettings, emit: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink_buffer = Arc::clone(&buffer);
    let subscriber = LineSubscriber::with_sink(
        settings,
        Box::new(move |line| sink_buffer.lock().expect("buffer").extend_from_slice(line)),
    );
    tracing::subscriber::with_default(subscriber, emit);
    let bytes = buffer.lock().expect("buffer").clone();
    String::from_utf8(bytes).expect("utf-8 lines")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_utc_civil_dates() {
        let at = |secs| UNIX_EPOCH + Duration::from_millis(secs);
        assert_eq!(rfc3339_millis(at(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(at(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(at(1_796_643_296_007)),
            "2026-12-07T11:34:56.007Z"
        );
    }

    #[test]
    fn json_lines_carry_the_shared_vocabulary_and_parse() {
        let settings = LogSettings {
            format: LogFormat::Json,
            max_level: Level::INFO,
        };
        let lines = capture(settings, || {
            tracing::info!(
                component = "allocations",
                action = "start",
                allocation_id = "web-1",
                generation = 7u64,
                attempt = 2u32,
                duration_ms = 15u64,
                "started \"web\"\n"
            );
            tracing::debug!(component = "sync", "below the level, never written");
        });
        assert_eq!(lines.lines().count(), 1, "{lines}");
        let parsed: serde_json::Value = serde_json::from_str(lines.trim()).expect("a JSON line");
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(parsed["message"], "started \"web\"\n");
        assert_eq!(parsed["component"], "allocations");
        assert_eq!(parsed["action"], "start");
        assert_eq!(parsed["allocation_id"], "web-1");
        assert_eq!(parsed["generation"], 7);
        assert_eq!(parsed["attempt"], 2);
        assert_eq!(parsed["duration_ms"], 15);
        assert!(
            parsed["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("outpost_agent"))
        );
        assert!(
            parsed["timestamp"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
    }

    #[test]
    fn text_lines_quote_values_with_spaces() {
        let lines = capture(LogSettings::default(), || {
            tracing::warn!(
                component = "sync",
                node_id = "n1",
                error = "no route to host",
                "feed failed"
            );
        });
        assert!(
            lines.contains(" WARN outpost_agent::logging::tests: feed failed component=sync node_id=n1 error=\"no route to host\"\n"),
            "{lines}"
        );
    }

    #[test]
    fn bad_settings_name_the_value() {
        assert_eq!(
            LogFormat::parse("yaml").unwrap_err().to_string(),
            "log format \"yaml\" is not one of text, json"
        );
        assert_eq!(
            parse_level("loud").unwrap_err(),
            LogSettingError::Level("loud".into())
        );
        assert_eq!(parse_level("debug"), Ok(Level::DEBUG));
    }
}
