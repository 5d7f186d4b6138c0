//! `outpostctl rollout status NAME [--watch]` (R3): the service's latest rollout — release,
//! batch, updated/healthy/failed counts and why it halted. `--watch` polls until the rollout
//! settles: a progress bar (indicatif) on a terminal, one line per change otherwise.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;
use outpost_proto::name::check_name;
use serde_json::Value;

use crate::client::{ControlClient, Transport};
use crate::commands::{OutputMode, print_json};

/// How often `--watch` asks control.
const WATCH_POLL: Duration = Duration::from_secs(1);

fn path(name: &str) -> String {
    format!("/v1/services/{name}/rollout")
}

fn u64_at(view: &Value, key: &str) -> u64 {
    view.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn state_of(view: &Value) -> &str {
    view.get("state").and_then(Value::as_str).unwrap_or("none")
}

/// Whether the rollout will not change without a new release.
pub fn settled(view: &Value) -> bool {
    state_of(view) != "progressing"
}

/// The one-line summary: state, release, batch and counts.
pub fn summary(view: &Value) -> String {
    let state = state_of(view);
    let release = u64_at(view, "release");
    let from = view
        .get("from_release")
        .and_then(Value::as_u64)
        .map(|r| format!(" (from {r})"))
        .unwrap_or_default();
    let batch = if state == "none" {
        "no rollout policy: instances take each release at once".to_string()
    } else {
        format!(
            "batch {}/{}",
            u64_at(view, "batch"),
            u64_at(view, "batches_total")
        )
    };
    format!(
        "{state} release {release}{from}, {batch}; {} of {} updated, {} healthy, {} failed",
        u64_at(view, "updated"),
        u64_at(view, "total"),
        u64_at(view, "healthy"),
        u64_at(view, "failed"),
    )
}

/// Every line `rollout status` prints.
pub fn render(view: &Value) -> String {
    let service = view.get("service").and_then(Value::as_str).unwrap_or("?");
    let mut text = format!("service {service}: {}\n", summary(view));
    if let Some(policy) = view.get("policy").filter(|p| !p.is_null()) {
        text.push_str(&format!(
            "policy: max_parallel {}, health_deadline_secs {}, auto_rollback {}\n",
            u64_at(policy, "max_parallel"),
            u64_at(policy, "health_deadline_secs"),
            policy
                .get("auto_rollback")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        ));
    }
    if let Some(reason) = view.get("halt_reason").and_then(Value::as_str) {
        text.push_str(&format!("halted: {reason}\n"));
    }
    if let Some(release) = view.get("rolled_back_as_release").and_then(Value::as_u64) {
        text.push_str(&format!(
            "rolled back: every instance returns to release {}, now release {release}\n",
            u64_at(view, "from_release")
        ));
    }
    text
}

pub fn rollout_status<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    watch: bool,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    check_name("service", name)?;
    let view = client.get(&path(name))?;
    if !watch {
        if mode == OutputMode::Json {
            return print_json(out, &view);
        }
        write!(out, "{}", render(&view))?;
        return Ok(());
    }
    if mode == OutputMode::Json || !std::io::stdout().is_terminal() {
        return watch_lines(client, name, view, mode, out);
    }
    watch_bar(client, name, view, out)
}

/// Plain lines (or JSON objects), one per change, until the rollout settles.
fn watch_lines<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mut view: Value,
    mode: OutputMode,
    out: &mut dyn Write,
) -> Result<()> {
    let mut last = String::new();
    loop {
        let line = match mode {
            OutputMode::Json => serde_json::to_string(&view)?,
            _ => summary(&view),
        };
        if line != last {
            writeln!(out, "{line}")?;
            out.flush()?;
            last = line;
        }
        if settled(&view) {
            if mode != OutputMode::Json {
                write!(out, "{}", render(&view))?;
            }
            return Ok(());
        }
        std::thread::sleep(WATCH_POLL);
        view = client.get(&path(name))?;
    }
}

/// A bar of healthy instances out of all, with the summary beside it.
fn watch_bar<T: Transport>(
    client: &ControlClient<T>,
    name: &str,
    mut view: Value,
    out: &mut dyn Write,
) -> Result<()> {
    let bar = indicatif::ProgressBar::new(u64_at(&view, "total"));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} healthy  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        bar.set_length(u64_at(&view, "total"));
        bar.set_position(u64_at(&view, "healthy"));
        bar.set_message(summary(&view));
        if settled(&view) {
            bar.finish();
            write!(out, "{}", render(&view))?;
            return Ok(());
        }
        std::thread::sleep(WATCH_POLL);
        view = client.get(&path(name))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The renderer reads control's real answer type.
    #[test]
    fn renders_the_view_control_answers() {
        let view = outpost_control::rollout::http::RolloutView {
            service: "app".into(),
            state: "rolled_back".into(),
            release: 2,
            from_release: Some(1),
            rolled_back_as_release: Some(3),
            current_release: 3,
            policy: Some(outpost_proto::rollout::RolloutPolicy {
                max_parallel: 1,
                health_deadline_secs: 20,
                auto_rollback: true,
            }),
            batch: 1,
            batches_total: 2,
            total: 2,
            updated: 2,
            healthy: 1,
            failed: 0,
            halt_reason: Some("batch 1: 1 of 1 new instances not ready".into()),
            started_at_unix_ms: Some(1),
            updated_at_unix_ms: Some(2),
        };
        let text = render(&serde_json::to_value(&view).unwrap());
        assert!(
            text.contains(
                "rolled_back release 2 (from 1), batch 1/2; 2 of 2 updated, 1 healthy, 0 failed"
            ),
            "{text}"
        );
        assert!(
            text.contains("max_parallel 1, health_deadline_secs 20, auto_rollback true"),
            "{text}"
        );
        assert!(text.contains("halted: batch 1: 1 of 1"), "{text}");
        assert!(text.contains("now release 3"), "{text}");
        assert!(settled(&serde_json::to_value(&view).unwrap()));
    }
}
