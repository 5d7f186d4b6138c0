//! `outpost-edge run` serves routes; `outpost-edge status` reports from the data dir offline.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use outpost_edge::cache::{BootSource, Cache};
use outpost_edge::follow::{FollowSettings, Runtime, follow, report_forever};
use outpost_edge::state::{Shared, UpstreamProxy};
use outpost_edge::status::EdgeStatus;
use outpost_edge::table::RouteTable;
use outpost_edge::workers::Workers;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "outpost-edge", version, about = "Outpost edge router")]
struct Cli {
    /// Log format on stderr: `text` (default) or `json` (one JSON object a line), as control's.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve routes: from the cache at once, then following control
    Run(RunArgs),
    /// Print the edge's state from its data dir (works with the edge and control down)
    Status {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

// No `Debug`: the arguments hold the enrollment token.
#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// One-time enrollment token (`outpostctl enroll create`); used only while the edge has no
    /// credential or control refuses it
    #[arg(long = "enroll", value_name = "TOKEN", env = "OUTPOST_EDGE_ENROLL")]
    enroll: Option<String>,
    /// Control URL (default: the one the token names)
    #[arg(long, value_name = "URL")]
    control: Option<String>,
    /// This edge's id when it enrolls (default: edge-RANDOM)
    #[arg(long, value_name = "NAME")]
    edge_id: Option<String>,
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:80")]
    http_listen: SocketAddr,
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:443")]
    https_listen: SocketAddr,
    /// Expect a PROXY v1/v2 header from an upstream load balancer on every listener
    #[arg(long)]
    accept_proxy_protocol: bool,
    /// Threads that serve client connections, each with its own runtime (default: one per
    /// core); the feed, reports, health checks and listeners run on one more
    #[arg(long, value_name = "N", env = "OUTPOST_EDGE_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Status { data_dir } => {
            let report = outpost_edge::status::offline_report(&data_dir);
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            // A reader that stops early (`| head`) closes the pipe: that ends the output, it is
            // not a failure (println! would panic on it).
            match writeln!(std::io::stdout().lock(), "{text}") {
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other.context("cannot write the status to stdout"),
            }
        }
        Command::Run(args) => run(args, cli.log_format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outpost-edge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs, log_format: LogFormat) -> Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: RunArgs) -> Result<()> {
    let cache = Cache::open(&args.data_dir).context("opening the edge store")?;
    if let Some(note) = &cache.recovery_note {
        tracing::warn!(component = "edge", action = "recover_store", "{note}");
    }
    let (boot, source, notes) = cache.boot_table();
    for note in &notes {
        tracing::warn!(component = "edge", action = "boot", "boot: {note}");
    }
    match source {
        BootSource::Store => tracing::info!(
            component = "edge",
            action = "boot",
            generation = boot.as_of.event_id,
            "booted {} routes from the store",
            boot.routes.len()
        ),
        BootSource::LastGoodCopy | BootSource::PreviousCopy => tracing::warn!(
            component = "edge",
            action = "boot",
            generation = boot.as_of.event_id,
            "booted {} routes from the {} copy of the route cache, because the store could not give them",
            boot.routes.len(),
            if source == BootSource::LastGoodCopy {
                "last-good"
            } else {
                "previous"
            }
        ),
        BootSource::Empty => tracing::info!(
            component = "edge",
            action = "boot",
            "no cached routes; waiting for control"
        ),
    }
    let http = TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("listening on --http-listen {}", args.http_listen))?;
    let https = TcpListener::bind(args.https_listen)
        .await
        .with_context(|| format!("listening on --https-listen {}", args.https_listen))?;
    let (http_address, https_address) = (http.local_addr()?, https.local_addr()?);
    let reserved = vec![http_address.port(), https_address.port()];
    let edge_key = cache.identity().and_then(|identity| identity.edge_key());
    let table = match RouteTable::build(boot.clone(), &reserved) {
        Ok(table) => table.with_certificates(edge_key.as_ref(), &Default::default()),
        Err(error) => {
            tracing::warn!(
                component = "edge",
                action = "boot",
                generation = boot.as_of.event_id,
                "the cached route table does not fit this edge's listeners ({error}); starting empty"
            );
            RouteTable::default()
        }
    };
    let upstream = if args.accept_proxy_protocol {
        UpstreamProxy::Expect
    } else {
        UpstreamProxy::None
    };
    let worker_count = match args.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads 0: at least one thread must serve"),
        Some(count) => count,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let workers = Workers::start(worker_count).context("starting the worker threads")?;
    let shared = Shared::new(
        table,
        upstream,
        args.http_listen.ip(),
        reserved,
        https_address.port(),
        workers,
    );
    let status = EdgeStatus {
        pid: std::process::id(),
        boot_source: Some(source),
        boot_notes: notes
            .into_iter()
            .chain(cache.recovery_note.clone())
            .collect(),
        http_listen: Some(http_address.to_string()),
        https_listen: Some(https_address.to_string()),
        ..EdgeStatus::default()
    };
    let runtime = Runtime::new(
        Arc::clone(&shared),
        Arc::new(cache),
        args.data_dir.clone(),
        status,
    );
    runtime.follow_table().await;
    tokio::spawn(outpost_edge::http::serve(http, Arc::clone(&shared)));
    tokio::spawn(outpost_edge::tls::serve(https, Arc::clone(&shared)));
    tokio::spawn(report_forever(Arc::clone(&runtime)));
    tokio::spawn(follow(
        Arc::clone(&runtime),
        FollowSettings {
            enrollment_token: args.enroll,
            control_url: args.control,
            edge_id: args.edge_id,
        },
    ));
    tracing::info!(
        component = "edge",
        action = "listen",
        "serving http on {http_address}, https on {https_address} with {worker_count} worker threads"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!(component = "edge", action = "stop", "stopping");
    Ok(())
}
