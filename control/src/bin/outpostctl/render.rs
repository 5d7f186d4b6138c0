//! Human output: aligned tables and key/value blocks rendered from control's JSON answers.
//!
//! Columns name one or more JSON paths each (the first present wins), so the tables read the
//! view types of docs/api.md without depending on their Rust definitions; a column no row has
//! is left out.

use serde_json::Value;

use crate::duration::format_unix_utc;

/// How a cell's value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellFormat {
    Text,
    /// Bytes as `64Mi`, `1.5Gi`.
    Bytes,
    /// Thousandths of a core as `250m` / `2`.
    CpuMillis,
    /// Unix seconds as a UTC time.
    UnixTime,
    /// Unix milliseconds as a UTC time (to the second).
    UnixMillis,
    /// A log epoch as the 16 hex digits of the cursor text form.
    Epoch,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    /// Dotted paths into a row, tried in order.
    pub paths: &'static [&'static str],
    pub format: CellFormat,
    pub show: ColumnShow,
}

/// Whether a column no row fills is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnShow {
    WhenPresent,
    /// Always shown, `-` where empty: the absence itself is news (no state reported yet).
    Always,
}

pub const fn column(
    header: &'static str,
    paths: &'static [&'static str],
    format: CellFormat,
) -> Column {
    Column {
        header,
        paths,
        format,
        show: ColumnShow::WhenPresent,
    }
}

impl Column {
    /// The same column, shown even when no row fills it.
    pub const fn always(self) -> Column {
        Column {
            show: ColumnShow::Always,
            ..self
        }
    }
}

/// Looks up a dotted path (`facts.capacity.memory_bytes`).
pub fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(row, |value, key| value.get(key))
        .filter(|value| !value.is_null())
}

fn cell(row: &Value, column: &Column) -> Option<String> {
    column
        .paths
        .iter()
        .find_map(|path| lookup(row, path))
        .map(|value| format_value(value, column.format))
}

pub fn format_value(value: &Value, format: CellFormat) -> String {
    match (format, value) {
        (CellFormat::Bytes, Value::Number(number)) => number
            .as_u64()
            .map(format_bytes)
            .unwrap_or_else(|| number.to_string()),
        (CellFormat::CpuMillis, Value::Number(number)) => number
            .as_u64()
            .map(format_cpu_millis)
            .unwrap_or_else(|| number.to_string()),
        (CellFormat::UnixTime, Value::Number(number)) => number
            .as_u64()
            .map(format_unix_utc)
            .unwrap_or_else(|| number.to_string()),
        (CellFormat::UnixMillis, Value::Number(number)) => number
            .as_u64()
            .map(|millis| format_unix_utc(millis / 1000))
            .unwrap_or_else(|| number.to_string()),
        (CellFormat::Epoch, Value::Number(number)) => number
            .as_u64()
            .map(|epoch| format!("{epoch:016x}"))
            .unwrap_or_else(|| number.to_string()),
        (_, Value::String(text)) => text.clone(),
        (_, Value::Array(items)) => items
            .iter()
            .map(|item| format_value(item, CellFormat::Text))
            .collect::<Vec<_>>()
            .join(","),
        (_, Value::Null) => String::new(),
        (_, Value::Object(fields)) if fields.values().all(Value::is_string) => fields
            .iter()
            .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        (_, other) => other.to_string(),
    }
}

/// `67108864` → `64Mi`; below 1 KiB, plain bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "Ti"),
        (1 << 30, "Gi"),
        (1 << 20, "Mi"),
        (1 << 10, "Ki"),
    ];
    for (size, unit) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            let tenths = (bytes % size) * 10 / size;
            return if tenths == 0 {
                format!("{whole}{unit}")
            } else {
                format!("{whole}.{tenths}{unit}")
            };
        }
    }
    bytes.to_string()
}

/// `250` → `250m`, `2000` → `2`.
pub fn format_cpu_millis(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// An aligned table with a header line; columns that no row fills are left out. Cells are
/// separated by two spaces; the last column is not padded.
pub fn render_table(rows: &[Value], columns: &[Column]) -> String {
    let cells: Vec<Vec<Option<String>>> = rows
        .iter()
        .map(|row| columns.iter().map(|column| cell(row, column)).collect())
        .collect();
    let shown: Vec<usize> = (0..columns.len())
        .filter(|&index| {
            columns[index].show == ColumnShow::Always
                || cells.iter().any(|row| row[index].is_some())
        })
        .collect();
    let mut lines: Vec<Vec<String>> = vec![
        shown
            .iter()
            .map(|&index| columns[index].header.to_string())
            .collect(),
    ];
    for row in &cells {
        lines.push(
            shown
                .iter()
                .map(|&index| sanitize(row[index].as_deref().unwrap_or("-")))
                .collect(),
        );
    }
    align(&lines)
}

/// `key  value` lines, keys padded to the longest.
pub fn render_pairs(pairs: &[(String, String)]) -> String {
    let lines: Vec<Vec<String>> = pairs
        .iter()
        .map(|(key, value)| vec![key.clone(), sanitize(value)])
        .collect();
    align(&lines)
}

fn align(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|index| {
            lines
                .iter()
                .filter_map(|line| line.get(index))
                .map(|text| text.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (index, value) in line.iter().enumerate() {
            if index + 1 == line.len() {
                text.push_str(value);
            } else {
                text.push_str(value);
                text.push_str(&" ".repeat(widths[index] - value.chars().count() + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// Control characters from the server never reach the terminal.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A JSON answer that should be a list, or a clear error naming what came instead.
pub fn as_rows<'a>(value: &'a Value, what: &str) -> Result<&'a [Value], String> {
    match value {
        Value::Array(rows) => Ok(rows),
        other => Err(format!(
            "expected a list of {what}, got {}",
            shorten_json(other)
        )),
    }
}

/// Compact JSON, shortened to about 120 characters for a table cell or an error.
pub fn shorten_json(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 120 {
        text
    } else {
        format!("{}…", text.chars().take(119).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const COLUMNS: &[Column] = &[
        column("NODE", &["node_id", "id"], CellFormat::Text),
        column(
            "MEMORY",
            &["capacity.memory_bytes", "facts.capacity.memory_bytes"],
            CellFormat::Bytes,
        ),
        column("CPU", &["capacity.cpu_millis"], CellFormat::CpuMillis),
        column("NEVER", &["nowhere"], CellFormat::Text),
        column("NOTE", &["note"], CellFormat::Text).always(),
        column("STATE", &["state"], CellFormat::Text),
    ];

    #[test]
    fn tables_align_and_skip_empty_columns() {
        let rows = vec![
            json!({"node_id": "edge-1", "capacity": {"memory_bytes": 1073741824u64, "cpu_millis": 2000}, "state": "ready"}),
            json!({"id": "n2", "facts": {"capacity": {"memory_bytes": 1610612736u64}}, "state": "down"}),
        ];
        let table = render_table(&rows, COLUMNS);
        assert_eq!(
            table,
            "NODE    MEMORY  CPU  NOTE  STATE\n\
             edge-1  1Gi     2    -     ready\n\
             n2      1.5Gi   -    -     down\n"
        );
    }

    #[test]
    fn an_empty_list_shows_the_header_only() {
        assert_eq!(render_table(&[], COLUMNS), "NOTE\n");
        assert_eq!(
            render_table(&[json!({"state": "x"})], COLUMNS),
            "NOTE  STATE\n-     x\n"
        );
    }

    #[test]
    fn values_format_by_kind() {
        assert_eq!(format_bytes(512), "512");
        assert_eq!(format_bytes(64 << 20), "64Mi");
        assert_eq!(format_cpu_millis(250), "250m");
        assert_eq!(
            format_value(&json!(0), CellFormat::UnixTime),
            "1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            format_value(&json!(1_700_000_000_999u64), CellFormat::UnixMillis),
            "2023-11-14 22:13:20 UTC"
        );
        assert_eq!(
            format_value(&json!(255), CellFormat::Epoch),
            "00000000000000ff"
        );
        assert_eq!(format_value(&json!(["a", "b"]), CellFormat::Text), "a,b");
    }

    #[test]
    fn control_characters_are_not_printed() {
        let table = render_table(&[json!({"state": "bad\u{1b}[2Jstate"})], COLUMNS);
        assert_eq!(table, "NOTE  STATE\n-     bad [2Jstate\n");
    }

    #[test]
    fn pairs_align() {
        let pairs = vec![
            ("status".to_string(), "ok".to_string()),
            ("log epoch".to_string(), "ab".to_string()),
        ];
        assert_eq!(render_pairs(&pairs), "status     ok\nlog epoch  ab\n");
    }
}
