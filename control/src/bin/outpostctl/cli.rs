//! The command line of outpostctl, parsed by clap into a closed set of commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::ConfigFlags;

/// The Outpost operator's client: enroll nodes, apply services and the environment profile,
/// and watch the fleet through the control service's API.
///
/// Where control is comes from flags, then OUTPOST_CONTROL_URL / OUTPOST_CA_FILE /
/// OUTPOST_TOKEN, then the config file (--config, OUTPOST_CONFIG, default
/// ~/.config/outpost/outpostctl.json), which `outpost-control serve` writes to
/// DATA_DIR/admin/outpostctl.json.
#[derive(Debug, Parser)]
#[command(name = "outpostctl", version)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Print control's JSON instead of tables (services apply: a list of answers; events: one
    /// {events, bookmark} object, or with --follow one event per line)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// Control URL, e.g. https://10.0.0.1:7443 [env: OUTPOST_CONTROL_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub control_url: Option<String>,
    /// PEM file with the control CA; only this CA is trusted [env: OUTPOST_CA_FILE]
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Operator token (opa.…); prefer the environment or the config file, since other users
    /// can see flags in the process list [env: OUTPOST_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Config file with {"control_url","ca_file","token"} [env: OUTPOST_CONFIG]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConnectionArgs {
    pub fn flags(&self) -> ConfigFlags {
        ConfigFlags {
            control_url: self.control_url.clone(),
            ca_file: self.ca_file.clone(),
            token: self.token.clone(),
            config: self.config.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show control's health: status, log epoch, head and floor
    Status,
    /// Enrollment tokens for new nodes
    Enroll {
        #[command(subcommand)]
        action: EnrollAction,
    },
    /// List nodes, or revoke one
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
    },
    /// Each node's agent version, or upgrade the agents to a signed binary in batches (U2)
    Agents {
        #[command(subcommand)]
        action: Option<AgentsAction>,
    },
    /// Apply, list and remove services
    Services {
        #[command(subcommand)]
        action: Option<ServicesAction>,
    },
    /// Apply, list and remove routes (edge routing by host or port)
    Routes {
        #[command(subcommand)]
        action: Option<RoutesAction>,
    },
    /// List allocations: which service instance runs where, and its last reported state
    Allocations,
    /// Print the event log (admin feed); --follow keeps printing new events
    Events(EventsArgs),
    /// Apply or show the environment profile
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Create, list and revoke operator tokens (cluster admin)
    Tokens {
        #[command(subcommand)]
        action: Option<TokensAction>,
    },
    /// Security-relevant acts with their actors (scope audit:read)
    Audit {
        /// Only acts of the last DURATION: 90s, 10m, 1h, 2d or plain seconds
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
    },
    /// Set, list and remove secrets (values are never shown)
    Secrets {
        #[command(subcommand)]
        action: Option<SecretsAction>,
    },
    /// Push, list and remove artifacts: binaries or .tar/.tar.gz archives services run from
    Artifacts {
        #[command(subcommand)]
        action: Option<ArtifactsAction>,
    },
    /// Follow a service's rollout: batches gated on readiness, halts and rollbacks
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Show the release, batch, updated/healthy/failed counts and why a rollout halted
    Status {
        #[arg(value_name = "NAME")]
        name: String,
        /// Keep showing it until the rollout completes, halts or rolls back (a progress bar
        /// on a terminal, one line per change otherwise)
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensAction {
    /// Issue a token of ORG with scopes; it is shown once
    Create {
        #[arg(long, value_name = "ORG")]
        org: String,
        /// Scopes (admin, services:write, nodes:write, enroll:write, profile:write,
        /// events:read, read, secrets:read, secrets:write, audit:read)
        #[arg(long, value_name = "SCOPE", num_args = 1.., required = true)]
        scopes: Vec<String>,
        /// Lifetime: 90s, 10m, 1h, 2d or plain seconds (default: no expiry)
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// List tokens: ids, orgs, scopes, expiry, revocation (the default)
    Ls,
    /// Revoke a token by its id; refused from the next request on
    Revoke {
        #[arg(value_name = "ID")]
        token_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsAction {
    /// Set the next version of a secret from KEY=VALUE arguments, files or stdin
    Set {
        #[arg(value_name = "NAME")]
        name: String,
        /// KEY=VALUE pairs (visible in shell history; prefer --from-stdin or --from-file)
        #[arg(value_name = "KEY=VALUE")]
        values: Vec<String>,
        /// KEY=PATH: the file's contents become KEY's value (repeatable)
        #[arg(long = "from-file", value_name = "KEY=PATH")]
        from_file: Vec<String>,
        /// KEY: stdin's contents (one trailing newline dropped) become KEY's value
        #[arg(long = "from-stdin", value_name = "KEY")]
        from_stdin: Option<String>,
    },
    /// List secrets: names, versions, keys, who changed them (the default)
    Ls,
    /// Remove a secret (refused while a service references it)
    Rm {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsAction {
    /// Stream a file to control and print its sha256 (what a spec's artifact.sha256 names)
    Push {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A name to show in `artifacts ls` (default: the file's name)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List artifacts (the default)
    Ls,
    /// Sign an agent binary's sha256 with the release key (offline; prints the signature)
    Sign {
        /// The release key's private half (`outpost-control admin release-key --out FILE`)
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(value_name = "SHA256")]
        sha256: String,
    },
    /// Remove an artifact; refused while a release of a service references it
    Rm {
        #[arg(value_name = "SHA256")]
        sha256: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnrollAction {
    /// Create a one-time enrollment token for `outpost-agent run --enroll TOKEN`
    Create {
        /// How long the token stays valid: 90s, 10m, 1h, 2d or plain seconds
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// Each node's agent version and last upgrade, and the org's latest upgrade (the default)
    Ls,
    /// Roll a pushed, signed agent binary out to the selected nodes in batches; a batch must
    /// re-register healthy on the new binary within the deadline, else the upgrade halts
    Upgrade {
        /// The sha256 of the agent binary (`outpostctl artifacts push` it first)
        #[arg(long, value_name = "SHA256")]
        artifact: String,
        /// Its release signature (`outpostctl artifacts sign --key FILE SHA256`)
        #[arg(long)]
        signature: String,
        /// Only nodes with these labels: KEY=VALUE[,KEY=VALUE…] (default: every node)
        #[arg(long)]
        selector: Option<String>,
        /// Nodes upgraded at once
        #[arg(long, default_value_t = 1)]
        max_parallel: u32,
        /// Seconds a batch has to come back healthy on the new binary
        #[arg(long, default_value_t = 120)]
        health_deadline_secs: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesAction {
    /// List nodes (the default)
    Ls,
    /// Revoke a node: its credential stops working and it must enroll again
    Revoke {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Set (KEY=VALUE) or remove (KEY-) operator labels of a node; selectors match them
    Label {
        #[arg(value_name = "NODE")]
        node: String,
        #[arg(value_name = "KEY=VALUE|KEY-", required = true)]
        changes: Vec<String>,
    },
    /// Give a node nothing new; it keeps what it runs
    Cordon {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Let a cordoned or drained node get new instances again
    Uncordon {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Move a node's instances off in wave order and stop its every-node instances
    Drain {
        #[arg(value_name = "NODE")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutesAction {
    /// Create or update routes from a YAML or JSON file: one route or a list (`-f -` reads stdin)
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List routes with their backends and what each edge applied (the default)
    Ls,
    /// Remove a route
    Rm {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServicesAction {
    /// Create or update services from a YAML or JSON file: one spec or a list (`-f -` reads stdin)
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List services (the default)
    Ls,
    /// Remove a service; its allocations are stopped
    Rm {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List a service's releases (every accepted change of its spec)
    History {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Make an older release's spec the newest release (default: the one before the newest)
    Rollback {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "N")]
        to: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Start after this cursor (EPOCH.ID); default: the start of the current log epoch
    #[arg(long, value_name = "CURSOR")]
    pub from: Option<String>,
    /// Keep long-polling and print events as they arrive, until interrupted
    #[arg(long)]
    pub follow: bool,
    /// Events per request
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub limit: u32,
}

#[derive(Debug, Subcommand)]
pub enum ProfileAction {
    /// Set the environment profile from a YAML or JSON file (`-f -` reads stdin)
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Show the environment profile (YAML; --json for JSON)
    Show,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("outpostctl").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["services", "ls", "--json", "--token", "opa.x"]);
        assert!(cli.json);
        assert_eq!(cli.connection.token.as_deref(), Some("opa.x"));
        assert!(matches!(
            cli.command,
            Command::Services {
                action: Some(ServicesAction::Ls)
            }
        ));
    }

    #[test]
    fn subcommands_parse() {
        assert!(matches!(
            parse(&["nodes"]).command,
            Command::Nodes { action: None }
        ));
        let cli = parse(&["nodes", "revoke", "edge-1"]);
        assert!(
            matches!(cli.command, Command::Nodes { action: Some(NodesAction::Revoke { node }) } if node == "edge-1")
        );
        let cli = parse(&["services", "apply", "-f", "-"]);
        assert!(
            matches!(cli.command, Command::Services { action: Some(ServicesAction::Apply { file }) } if file.as_os_str() == "-")
        );
        let cli = parse(&["enroll", "create", "--ttl", "10m"]);
        assert!(
            matches!(cli.command, Command::Enroll { action: EnrollAction::Create { ttl } } if ttl == "10m")
        );
        let cli = parse(&["events", "--from", "0000000000000001.0", "--follow"]);
        assert!(matches!(
            cli.command,
            Command::Events(EventsArgs {
                from: Some(_),
                follow: true,
                ..
            })
        ));
        assert!(matches!(
            parse(&["profile", "show"]).command,
            Command::Profile {
                action: ProfileAction::Show
            }
        ));
    }

    #[test]
    fn missing_arguments_are_usage_errors() {
        assert!(Cli::try_parse_from(["outpostctl", "services", "apply"]).is_err());
        assert!(Cli::try_parse_from(["outpostctl", "profile"]).is_err());
        assert!(Cli::try_parse_from(["outpostctl"]).is_err());
    }
}
