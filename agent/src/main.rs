//! `outpost-agent`: run the agent, print its status, stop its workloads, or run the
//! environment-profile reconcilers once (`reconcile`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use outpost_agent::apply::process::launcher;
use outpost_agent::config::{
    self, AgentConfig, Invocation, KEY_DATA_DIR, StatusOutput, USAGE, load_file_settings, merge,
    settings_from_env,
};
use outpost_agent::{boot, status};

fn main() -> ExitCode {
    let started_at = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(launcher::LAUNCH_COMMAND) {
        // Workload launcher: clears the signal mask and execs the program (see launcher.rs).
        return ExitCode::from(launcher::run(&args[1..]).clamp(0, 255) as u8);
    }
    if args.first().map(String::as_str) == Some("reconcile") {
        // 0 converged, 1 failed or needs attention, 2 the dry run found destructive steps.
        return match reconcile(&args[1..]) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(error) => report(&error),
        };
    }
    match run(started_at) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("outpost-agent: error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}

/// `outpost-agent reconcile [--data-dir DIR] ARGS`: the data dir is taken here, the other
/// arguments go to the profile module's command.
fn reconcile(args: &[String]) -> anyhow::Result<i32> {
    let mut flags = config::Settings::new();
    let mut rest = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--data-dir" {
            let value = iter.next().context("--data-dir needs a value")?;
            flags.insert(KEY_DATA_DIR.into(), value.clone());
        } else if let Some(value) = arg.strip_prefix("--data-dir=") {
            flags.insert(KEY_DATA_DIR.into(), value.to_string());
        } else {
            rest.push(arg.clone());
        }
    }
    let env = settings_from_env(std::env::vars());
    let dir = data_dir(&flags, &env)?;
    let log = config::log_settings(|key| env.get(key).map(String::as_str))?;
    outpost_agent::logging::install(log);
    // MINIO_ENDPOINT / WEAVIATE_URL may be https; the agent's ureq has no provider of its own.
    #[cfg(any(feature = "s3", feature = "weaviate"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    outpost_agent::apply::profile::run_reconcile_command(&rest, &dir)
}

fn data_dir(
    flags: &config::Settings,
    env: &config::Settings,
) -> anyhow::Result<std::path::PathBuf> {
    merge(&[env, flags])
        .get(KEY_DATA_DIR)
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .context("data dir is required (--data-dir DIR or OUTPOST_DATA_DIR)")
}

fn run(started_at: Instant) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = settings_from_env(std::env::vars());
    match config::parse_args(&args)? {
        Invocation::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Invocation::Version => {
            println!("outpost-agent {}", outpost_agent::upgrade::version());
            Ok(())
        }
        Invocation::Status { flags, output } => {
            let dir = data_dir(&flags, &env)?;
            let status = status::offline::read_status(&dir)?;
            match output {
                StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                StatusOutput::Text => print!(
                    "{}",
                    status::render_text(&status, outpost_agent::os::unix_now_secs())
                ),
            }
            Ok(())
        }
        Invocation::StopAll { flags } => {
            let dir = data_dir(&flags, &env)?;
            let stopped = status::offline::stop_all(&dir)?;
            println!(
                "stopped {} allocation(s){}",
                stopped.len(),
                if stopped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", stopped.join(", "))
                }
            );
            Ok(())
        }
        Invocation::Run { flags, config_file } => {
            let explicit = config_file.or_else(|| env.get("config").map(std::path::PathBuf::from));
            let dir_hint = merge(&[&env, &flags])
                .get(KEY_DATA_DIR)
                .map(std::path::PathBuf::from);
            let file = load_file_settings(explicit.as_deref(), dir_hint.as_deref())?;
            let config = AgentConfig::from_settings(&merge(&[&file, &env, &flags]))?;
            outpost_agent::logging::install(config.log);
            // Block SIGTERM/SIGINT before any thread starts, so only `wait` below receives them.
            // Children get a clean signal mask from std::process::Command.
            let mut signals = SigSet::empty();
            signals.add(Signal::SIGTERM);
            signals.add(Signal::SIGINT);
            signals.thread_block().context("cannot block signals")?;
            let (agent, report) = boot::boot(config.clone(), started_at)?;
            let snapshot = agent.board.snapshot();
            tracing::info!(
                component = "agent",
                action = "boot",
                node_id = %agent.node_id(),
                duration_ms = report.applied_after.as_millis() as u64,
                "node {} booted from {} in {} ms; status on {}",
                agent.node_id(),
                snapshot.plan_source,
                report.applied_after.as_millis(),
                snapshot
                    .status_addr
                    .unwrap_or_else(|| "(unavailable, see status notes)".into())
            );
            let signal = signals.wait().context("cannot wait for signals")?;
            tracing::info!(
                component = "agent",
                action = "exit",
                "{signal}, exiting; workloads {}",
                match config.workloads_on_exit {
                    config::WorkloadsOnExit::Leave =>
                        "keep running and are adopted on the next start",
                    config::WorkloadsOnExit::Stop => "are being stopped",
                }
            );
            boot::shutdown(&agent, config.workloads_on_exit);
            Ok(())
        }
    }
}
