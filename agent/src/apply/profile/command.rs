//! `outpost-agent reconcile [--dry-run] [--profile FILE] [--ack-destructive HASH]`: runs the
//! profile reconcilers once from the command line, prints the diff and its hash (C7).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use outpost_proto::limits::PROFILE_MAX_BYTES;
use outpost_proto::name::Name;
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::validate::Validate;

use super::config::AdapterConfig;
use super::diff::{DestructivePolicy, Safety, Step};
use super::engine::{CollectingSink, Engine, ReconcileRequest, RunMode, UnchangedPolicy};

/// The cached profile the agent writes (JSON) whenever it fetches one.
pub const CACHED_PROFILE_FILE: &str = "profile.json";
/// Node id used when neither `--node-id` nor `OUTPOST_NODE_ID` is given.
pub const NODE_ID_FILE: &str = "node_id";

/// Parsed `reconcile` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReconcileArgs {
    pub dry_run: bool,
    pub profile: Option<PathBuf>,
    pub ack_destructive: Option<String>,
    pub node_id: Option<String>,
}

pub const USAGE: &str = "usage: outpost-agent reconcile [--dry-run] [--profile FILE] [--ack-destructive HASH] [--node-id ID]";

/// Parses the arguments after `reconcile`.
pub fn parse_args(args: &[String]) -> anyhow::Result<ReconcileArgs> {
    let mut parsed = ReconcileArgs::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |flag: &str| {
            iter.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--dry-run" => parsed.dry_run = true,
            "--profile" => parsed.profile = Some(PathBuf::from(value("--profile")?)),
            "--ack-destructive" => parsed.ack_destructive = Some(value("--ack-destructive")?),
            "--node-id" => parsed.node_id = Some(value("--node-id")?),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if parsed.dry_run && parsed.ack_destructive.is_some() {
        bail!(
            "--dry-run and --ack-destructive exclude each other: run the dry run first, then apply with its hash"
        );
    }
    Ok(parsed)
}

/// Reads and validates a profile document (JSON) with the size limit.
pub fn read_profile(path: &Path) -> anyhow::Result<EnvironmentProfile> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading profile {}", path.display()))?
        .len();
    if size > PROFILE_MAX_BYTES as u64 {
        bail!(
            "profile {} is {size} bytes, over the limit of {PROFILE_MAX_BYTES}",
            path.display()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading profile {}", path.display()))?;
    let profile: EnvironmentProfile = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "profile {} is not a JSON EnvironmentProfile",
            path.display()
        )
    })?;
    profile
        .validate()
        .with_context(|| format!("profile {}", path.display()))?;
    Ok(profile)
}

fn node_id(
    args: &ReconcileArgs,
    environment: &BTreeMap<String, String>,
    data_dir: &Path,
) -> anyhow::Result<Name> {
    let text = match (&args.node_id, environment.get("OUTPOST_NODE_ID")) {
        (Some(id), _) => id.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => std::fs::read_to_string(data_dir.join(NODE_ID_FILE))
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|_| "local".to_string()),
    };
    outpost_proto::name::name("node id", &text).map_err(anyhow::Error::from)
}

/// `outpost-agent reconcile`: returns the process exit code (0 converged, 1 a component failed
/// or needs attention, 2 the dry run found destructive steps).
pub fn run_reconcile_command(args: &[String], data_dir: &Path) -> anyhow::Result<i32> {
    let args = parse_args(args)?;
    let environment: BTreeMap<String, String> = std::env::vars().collect();
    run_reconcile_with(&args, data_dir, &environment, &mut std::io::stdout())
}

/// The command with its environment and output given, for tests.
pub fn run_reconcile_with(
    args: &ReconcileArgs,
    data_dir: &Path,
    environment: &BTreeMap<String, String>,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<i32> {
    let profile_path = args
        .profile
        .clone()
        .unwrap_or_else(|| data_dir.join(CACHED_PROFILE_FILE));
    let profile = read_profile(&profile_path)?;
    let node_id = node_id(args, environment, data_dir)?;
    let config = AdapterConfig::from_environment(environment, data_dir)
        .context("choosing profile adapters")?;
    let mut adapters = super::build_adapters(&config).context("building profile adapters")?;
    let mut sink = CollectingSink::default();
    let mut engine = Engine::new(node_id, data_dir, &mut adapters, &mut sink);
    let destructive = match &args.ack_destructive {
        Some(hash) => DestructivePolicy::Acknowledged {
            diff_hash: hash.trim().to_string(),
        },
        None => DestructivePolicy::Withhold,
    };
    let mode = if args.dry_run {
        RunMode::DryRun
    } else {
        RunMode::Apply
    };
    let request = ReconcileRequest {
        profile: &profile,
        components: &config.components,
        unchanged: UnchangedPolicy::VerifyActual,
        destructive,
        mode,
    };
    let report = engine.reconcile(&request)?;
    let destructive_steps = report
        .diff
        .iter()
        .filter(|step| step.safety() == Safety::Destructive)
        .count();
    if args.dry_run {
        writeln!(
            out,
            "dry run of profile {:?} ({})",
            profile.metadata.name,
            profile_path.display()
        )?;
        if report.diff.iter().all(Step::is_reassertion) {
            writeln!(out, "no changes")?;
        }
        for step in &report.diff {
            writeln!(out, "  {}", step.describe())?;
        }
        writeln!(out, "diff hash: {}", report.diff_hash)?;
        if destructive_steps > 0 {
            writeln!(
                out,
                "{destructive_steps} destructive step(s) are withheld on a normal apply; to run them set allow_destructive: true in the profile and run: outpost-agent reconcile --ack-destructive {}",
                report.diff_hash
            )?;
            return Ok(2);
        }
        return Ok(0);
    }
    for apply in &report.components {
        writeln!(
            out,
            "{:<8} {:<15} {}",
            apply.component.as_str(),
            format!("{:?}", apply.outcome).to_lowercase(),
            apply.message.as_deref().unwrap_or("")
        )?;
    }
    let all_clean = report.components.iter().all(|apply| {
        matches!(
            apply.outcome,
            super::Outcome::Applied
                | super::Outcome::Unchanged
                | super::Outcome::Skipped
                | super::Outcome::OutOfScope
        )
    });
    Ok(if all_clean { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_named() {
        let args = parse_args(&strings(&["--dry-run", "--profile", "/p.json"])).unwrap();
        assert!(args.dry_run);
        assert_eq!(args.profile, Some(PathBuf::from("/p.json")));
        let error = parse_args(&strings(&["--force"])).unwrap_err();
        assert!(error.to_string().contains("\"--force\""), "{error}");
        assert!(parse_args(&strings(&["--profile"])).is_err());
        assert!(parse_args(&strings(&["--dry-run", "--ack-destructive", "abc"])).is_err());
    }
}
