//! outpostctl: the operator's client for the Outpost control service.
//!
//! `main` reads the command line, the environment and the config file into settings, builds a
//! client that trusts only the control CA, runs one command and exits non-zero on any error.

#![cfg_attr(test, allow(clippy::unwrap_used))]

#[path = "outpostctl/agents.rs"]
mod agents;
#[path = "outpostctl/audit.rs"]
mod audit;
#[path = "outpostctl/cli.rs"]
mod cli;
#[path = "outpostctl/client.rs"]
mod client;
#[path = "outpostctl/commands.rs"]
mod commands;
#[path = "outpostctl/config.rs"]
mod config;
#[path = "outpostctl/delivery.rs"]
mod delivery;
#[path = "outpostctl/documents.rs"]
mod documents;
#[path = "outpostctl/duration.rs"]
mod duration;
#[path = "outpostctl/render.rs"]
mod render;
#[path = "outpostctl/rollout.rs"]
mod rollout;
#[path = "outpostctl/routes.rs"]
mod routes;
#[path = "outpostctl/secrets.rs"]
mod secrets;
#[path = "outpostctl/tokens.rs"]
mod tokens;

use std::io::{ErrorKind, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{
    AgentsAction, ArtifactsAction, Cli, Command, EnrollAction, NodesAction, ProfileAction,
    RolloutAction, RoutesAction, SecretsAction, ServicesAction, TokensAction,
};
use crate::client::{ControlClient, UreqTransport};
use crate::commands::{EventsRequest, EventsUntil, NodeSchedulingAction, OutputMode, Pause};
use crate::config::{ConfigFileChoice, FileSettings, ResolvedSettings};
use crate::documents::read_source;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A closed pipe (`outpostctl events | head`) is not worth a message.
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
            }) {
                return ExitCode::FAILURE;
            }
            eprintln!("outpostctl: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `artifacts sign`: prints the release signature of SHA256 made with the key in `key`.
fn sign_artifact(key: &std::path::Path, sha256: &str) -> Result<()> {
    let key = outpost_control::release::signing::read_key(key)?;
    println!("{}", outpost_control::release::signing::sign(&key, sha256)?);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    // Signing is offline: the release key never meets control, and no connection is made.
    if let Command::Artifacts {
        action: Some(ArtifactsAction::Sign { key, sha256 }),
    } = &cli.command
    {
        return sign_artifact(key, sha256);
    }
    // Deterministic TLS provider: ring is the only one built in; Err means one is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let environment = config::environment_map(|name| std::env::var(name).ok());
    let flags = cli.connection.flags();
    let choice = config::choose_config_file(&flags, &environment);
    let file = read_config_file(&choice)?;
    let settings = config::resolve(&flags, &environment, choice, file.as_ref())?;
    let mode = if cli.json {
        OutputMode::Json
    } else {
        OutputMode::Human
    };
    let client = connect(&settings, &cli.command)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Status => commands::status(&client, mode, &mut out)?,
        Command::Enroll {
            action: EnrollAction::Create { ttl },
        } => commands::enroll_create(&client, &ttl, mode, &mut out)?,
        Command::Nodes {
            action: None | Some(NodesAction::Ls),
        } => commands::nodes_list(&client, mode, &mut out)?,
        Command::Agents {
            action: None | Some(AgentsAction::Ls),
        } => agents::agents_list(&client, mode, &mut out)?,
        Command::Agents {
            action:
                Some(AgentsAction::Upgrade {
                    artifact,
                    signature,
                    selector,
                    max_parallel,
                    health_deadline_secs,
                }),
        } => agents::agents_upgrade(
            &client,
            &agents::UpgradeArgs {
                artifact: &artifact,
                signature: &signature,
                selector: selector.as_deref(),
                max_parallel,
                health_deadline_secs,
            },
            mode,
            &mut out,
        )?,
        Command::Nodes {
            action: Some(NodesAction::Revoke { node }),
        } => commands::nodes_revoke(&client, &node, mode, &mut out)?,
        Command::Nodes {
            action: Some(NodesAction::Label { node, changes }),
        } => commands::nodes_label(&client, &node, &changes, mode, &mut out)?,
        Command::Nodes {
            action: Some(NodesAction::Cordon { node }),
        } => commands::nodes_scheduling(
            &client,
            &node,
            NodeSchedulingAction::Cordon,
            mode,
            &mut out,
        )?,
        Command::Nodes {
            action: Some(NodesAction::Uncordon { node }),
        } => commands::nodes_scheduling(
            &client,
            &node,
            NodeSchedulingAction::Uncordon,
            mode,
            &mut out,
        )?,
        Command::Nodes {
            action: Some(NodesAction::Drain { node }),
        } => {
            commands::nodes_scheduling(&client, &node, NodeSchedulingAction::Drain, mode, &mut out)?
        }
        Command::Services {
            action: Some(ServicesAction::Apply { file }),
        } => {
            let source = read_source(&file, "services file")?;
            commands::services_apply(&client, &source, mode, &mut out)?
        }
        Command::Services {
            action: None | Some(ServicesAction::Ls),
        } => commands::services_list(&client, mode, &mut out)?,
        Command::Services {
            action: Some(ServicesAction::Rm { name }),
        } => commands::services_remove(&client, &name, mode, &mut out)?,
        Command::Routes {
            action: Some(RoutesAction::Apply { file }),
        } => {
            let source = read_source(&file, "routes file")?;
            routes::routes_apply(&client, &source, mode, &mut out)?
        }
        Command::Routes {
            action: None | Some(RoutesAction::Ls),
        } => routes::routes_list(&client, mode, &mut out)?,
        Command::Routes {
            action: Some(RoutesAction::Rm { name }),
        } => routes::routes_remove(&client, &name, mode, &mut out)?,
        Command::Services {
            action: Some(ServicesAction::History { name }),
        } => delivery::services_history(&client, &name, mode, &mut out)?,
        Command::Services {
            action: Some(ServicesAction::Rollback { name, to }),
        } => delivery::services_rollback(&client, &name, to, mode, &mut out)?,
        Command::Rollout {
            action: RolloutAction::Status { name, watch },
        } => rollout::rollout_status(&client, &name, watch, mode, &mut out)?,
        Command::Artifacts {
            action: Some(ArtifactsAction::Push { file, name }),
        } => delivery::artifacts_push(&client, &file, name.as_deref(), mode, &mut out)?,
        Command::Artifacts {
            action: None | Some(ArtifactsAction::Ls),
        } => delivery::artifacts_list(&client, mode, &mut out)?,
        Command::Artifacts {
            action: Some(ArtifactsAction::Sign { key, sha256 }),
        } => sign_artifact(&key, &sha256)?,
        Command::Artifacts {
            action: Some(ArtifactsAction::Rm { sha256 }),
        } => delivery::artifacts_remove(&client, &sha256, mode, &mut out)?,
        Command::Allocations => commands::allocations_list(&client, mode, &mut out)?,
        Command::Audit { since } => audit::audit(&client, since.as_deref(), mode, &mut out)?,
        Command::Events(arguments) => {
            let request = EventsRequest {
                from: arguments.from.as_deref(),
                until: if arguments.follow {
                    EventsUntil::Forever
                } else {
                    EventsUntil::CaughtUp
                },
                limit: arguments.limit,
            };
            let mut pause = RealPause {
                started: Instant::now(),
            };
            commands::events(
                &client,
                &request,
                mode,
                &mut out,
                &mut std::io::stderr(),
                &mut pause,
            )?
        }
        Command::Profile {
            action: ProfileAction::Apply { file },
        } => {
            let source = read_source(&file, "profile file")?;
            commands::profile_apply(&client, &source, mode, &mut out)?
        }
        Command::Profile {
            action: ProfileAction::Show,
        } => commands::profile_show(&client, mode, &mut out)?,
        Command::Secrets {
            action:
                Some(SecretsAction::Set {
                    name,
                    values,
                    from_file,
                    from_stdin,
                }),
        } => {
            let sources = secrets::ValueSources {
                literal: values,
                files: from_file,
                stdin_key: from_stdin,
            };
            let values = secrets::collect_values(
                &sources,
                secrets::read_value_file,
                secrets::read_stdin_value,
            )?;
            secrets::secrets_set(&client, &name, values, mode, &mut out)?
        }
        Command::Tokens {
            action: Some(TokensAction::Create { org, scopes, ttl }),
        } => {
            let body = tokens::create_body(&org, &scopes, ttl.as_deref())?;
            tokens::tokens_create(&client, &body, mode, &mut out)?
        }
        Command::Tokens {
            action: None | Some(TokensAction::Ls),
        } => tokens::tokens_list(&client, mode, &mut out)?,
        Command::Tokens {
            action: Some(TokensAction::Revoke { token_id }),
        } => tokens::tokens_revoke(&client, &token_id, mode, &mut out)?,
        Command::Secrets {
            action: None | Some(SecretsAction::Ls),
        } => secrets::secrets_list(&client, mode, &mut out)?,
        Command::Secrets {
            action: Some(SecretsAction::Rm { name }),
        } => secrets::secrets_remove(&client, &name, mode, &mut out)?,
    }
    out.flush()?;
    Ok(())
}

/// Reads the chosen config file: a named one must exist, the default one may be absent.
fn read_config_file(choice: &ConfigFileChoice) -> Result<Option<FileSettings>> {
    let (path, required) = match choice {
        ConfigFileChoice::Named(path) => (path, true),
        ConfigFileChoice::Default(path) => (path, false),
        ConfigFileChoice::NoFile => return Ok(None),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == ErrorKind::NotFound && !required => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| {
                format!("cannot read config file {}; set --config or OUTPOST_CONFIG to an existing file", path.display())
            });
        }
    };
    let settings = config::parse_config_file(path, &text)?;
    if let Ok(metadata) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if let Some(warning) =
            config::loose_permissions_warning(&settings, metadata.permissions().mode())
        {
            eprintln!("outpostctl: {warning}");
        }
    }
    Ok(Some(settings))
}

/// Builds the client. Only `status` may go without a token (health is public).
fn connect(settings: &ResolvedSettings, command: &Command) -> Result<ControlClient<UreqTransport>> {
    let control_url = settings.require_control_url()?;
    let ca_file = settings.require_ca_file()?;
    let token = match command {
        Command::Status => settings.token.as_ref().map(|token| token.value.clone()),
        _ => Some(settings.require_token()?.value.clone()),
    };
    let transport = UreqTransport::new(&control_url.value, &ca_file.value)?;
    Ok(ControlClient::new(
        transport,
        &control_url.value,
        &ca_file.value.display().to_string(),
        token,
    ))
}

/// Real waiting and jitter for `events --follow`.
struct RealPause {
    started: Instant,
}

impl Pause for RealPause {
    fn pause(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn random(&mut self) -> u64 {
        rand::random()
    }

    fn elapsed_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
