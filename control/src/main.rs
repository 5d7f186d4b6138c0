//! `outpost-control`: parses the command line and runs the control service or an admin command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_control::ServeConfig;

#[derive(Parser)]
#[command(name = "outpost-control", version, about = "Outpost control service")]
struct Cli {
    /// Log format on stderr: `text` (default) or `json` (one JSON object a line).
    #[arg(
        long,
        global = true,
        env = "OUTPOST_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum CliCommand {
    /// Serve the control API over HTTPS.
    Serve {
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// URL nodes use to reach this control (defaults to the bound address).
        #[arg(long, env = "OUTPOST_PUBLIC_URL")]
        public_url: Option<String>,
        #[arg(long, env = "OUTPOST_GATEWAY_URL", default_value = "")]
        gateway_url: String,
        /// Extra DNS name or IP for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 30)]
        node_ttl_secs: u32,
        #[arg(long, default_value_t = outpost_control::scheduler::DEFAULT_CPU_OVERCOMMIT_RATIO)]
        cpu_overcommit_ratio: f64,
        /// PostgreSQL connection string (needs the `postgres` feature); redb in DATA_DIR otherwise.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, env = "OUTPOST_DATABASE_SCHEMA", default_value = "outpost")]
        database_schema: String,
        /// Most plan (snapshot) requests served at once.
        #[arg(long, default_value_t = 64)]
        plan_requests_max: usize,
        /// Advertise this control over mDNS (`_outpost-control._tcp`) on every IPv4 interface.
        #[arg(long)]
        advertise_mdns: bool,
        /// Site join secret: accept enrollments proven with it and sign the mDNS advertisement.
        #[arg(long, env = "OUTPOST_JOIN_SECRET", hide_env_values = true)]
        join_secret: Option<String>,
        /// Leadership epoch this control was elected at (set by the agent that runs it).
        #[arg(long)]
        leader_epoch: Option<u64>,
        /// Overlay network node addresses come from (IPv4, /8 to /30); each node keeps its
        /// address until it is revoked.
        #[arg(long, env = "OUTPOST_OVERLAY_CIDR", default_value = outpost_control::overlay::DEFAULT_OVERLAY_CIDR,
              value_parser = outpost_control::overlay::OverlayConfig::parse_cidr)]
        overlay_cidr: outpost_control::overlay::OverlayConfig,
        /// File holding the master key that wraps secrets' data keys (created 0600 when
        /// absent; default DATA_DIR/master.key). Keep it off the store's disk where you can.
        #[arg(long, env = "OUTPOST_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
        /// Name of an environment variable holding the master key as 64 hex characters,
        /// instead of a file.
        #[arg(long, conflicts_with = "master_key_file")]
        master_key_env: Option<String>,
        /// Largest artifact upload in bytes (default 1 GiB).
        #[arg(long, default_value_t = outpost_control::artifact::DEFAULT_ARTIFACT_MAX_BYTES)]
        artifact_max_bytes: u64,
        /// Where artifact bytes live: a directory (default DATA_DIR/artifacts) or
        /// s3://BUCKET[/PREFIX]?endpoint=URL[&region=REGION] for an S3 or MinIO bucket shared by
        /// several replicas (credentials from OUTPOST_ARTIFACT_S3_ACCESS_KEY and
        /// OUTPOST_ARTIFACT_S3_SECRET_KEY, else AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
        #[arg(long, env = "OUTPOST_ARTIFACT_STORE")]
        artifact_store: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; keep it on a private
        /// address). Off when absent.
        #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// The release public key file (`admin release-key` writes it as OUT.pub): handed to
        /// nodes at enrollment, which verify every agent binary they switch to with it (U2).
        #[arg(long, env = "OUTPOST_RELEASE_PUBLIC_KEY")]
        release_public_key: Option<PathBuf>,
    },
    /// Offline administration of a stopped control's data directory.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Fleet benchmark (docs/performance.md): starts this binary as a control on loopback,
    /// simulates AGENTS agents against it, makes one change that lands on every node and undoes
    /// it, and prints the figures; then durable commands/s with wrk against control and etcd.
    BenchFleet {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 30)]
        node_ttl_secs: u32,
        /// The simulated agents' long-poll wait (the agent's default).
        #[arg(long, default_value_t = 300)]
        feed_wait_secs: u64,
        #[arg(long, default_value_t = 32)]
        registrations_in_flight: usize,
        /// Seconds of wrk against control and against etcd; 0 skips that part.
        #[arg(long, default_value_t = 10)]
        wrk_secs: u64,
        #[arg(long, default_value_t = 64)]
        wrk_connections: usize,
        #[arg(long, default_value = "wrk")]
        wrk: PathBuf,
        #[arg(long, default_value = "etcd")]
        etcd: PathBuf,
    },
    /// Measure durable append throughput of the redb store.
    BenchAppend {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 2000)]
        events: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Measure PostgreSQL instead (needs the `postgres` feature).
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Drop the projections and rebuild them by replaying the log.
    RebuildProjections {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Make the release signing key pair (U2): the private half to OUT (0600; keep it off
    /// control, it signs agent binaries with `outpostctl artifacts sign`), the public half to
    /// OUT.pub and stdout.
    ReleaseKey {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
    /// Give the log a new epoch: every cursor gets 410 and consumers fetch a snapshot.
    RotateEpoch {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Re-wrap every secret's data key, and re-seal the CA key and credentials, under a new
    /// master key (control stopped).
    RotateMasterKey {
        #[arg(long)]
        data_dir: PathBuf,
        /// The master key file (default DATA_DIR/master.key).
        #[arg(long, env = "OUTPOST_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
        /// The PostgreSQL store to rotate (needs the `postgres` feature); redb in DATA_DIR
        /// otherwise.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, env = "OUTPOST_DATABASE_SCHEMA", default_value = "outpost")]
        database_schema: String,
    },
    /// Print an aggregate's events (e.g. node/n1, service/web), one JSON object a line.
    Events {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        aggregate: String,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    match cli.command {
        CliCommand::Serve {
            data_dir,
            listen,
            public_url,
            gateway_url,
            sans,
            node_ttl_secs,
            cpu_overcommit_ratio,
            plan_requests_max,
            database_url,
            database_schema,
            advertise_mdns,
            join_secret,
            leader_epoch,
            overlay_cidr,
            master_key_file,
            master_key_env,
            artifact_max_bytes,
            artifact_store,
            metrics_listen,
            release_public_key,
        } => {
            let release_public_key = release_public_key
                .map(|path| outpost_control::release::signing::read_public_key(&path))
                .transpose()?;
            let artifact_store = match artifact_store {
                Some(text) => Some(
                    outpost_control::artifact::BlobStoreConfig::parse(&text, |name| {
                        std::env::var(name).ok()
                    })
                    .map_err(|reason| {
                        anyhow::anyhow!("invalid artifact-store: {reason} (got {text:?})")
                    })?,
                ),
                None => None,
            };
            if let Some(outpost_control::artifact::BlobStoreConfig::S3(s3)) = &artifact_store {
                outpost_control::artifact::s3::S3BlobStore::new(s3)
                    .and_then(|store| store.ensure_bucket())
                    .with_context(|| format!("artifact store bucket {}", s3.bucket))?;
            }
            let master_key = match (master_key_file, master_key_env) {
                (_, Some(variable)) => {
                    Some(outpost_control::secret::MasterKeySource::Environment { variable })
                }
                (Some(path), None) => Some(outpost_control::secret::MasterKeySource::File(path)),
                (None, None) => None,
            };
            let config = ServeConfig {
                public_url,
                gateway_url,
                sans,
                node_ttl_secs,
                cpu_overcommit_ratio,
                plan_requests_max,
                database_url,
                database_schema,
                advertise: if advertise_mdns {
                    outpost_control::config::Advertise::Mdns
                } else {
                    outpost_control::config::Advertise::Off
                },
                site: outpost_control::discovery::SiteSettings {
                    join_secret: join_secret.filter(|s| !s.is_empty()),
                    leader_epoch,
                },
                overlay: overlay_cidr,
                master_key,
                artifact_max_bytes,
                artifact_store,
                metrics_listen,
                release_public_key,
                ..ServeConfig::new(data_dir, listen)
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            runtime
                .block_on(outpost_control::serve(config))
                .context("control service failed")?;
        }
        CliCommand::Admin {
            command: AdminCommand::RebuildProjections { data_dir },
        } => {
            let report = outpost_control::admin::rebuild_projections(&data_dir)
                .context("rebuild-projections failed")?;
            println!(
                "rebuilt projections to event {}: {} nodes, {} services, {} allocations",
                report.checkpoint, report.nodes, report.services, report.allocations
            );
        }
        CliCommand::Admin {
            command:
                AdminCommand::RotateMasterKey {
                    data_dir,
                    master_key_file,
                    database_url,
                    database_schema,
                },
        } => {
            let database = database_url.map(|url| (url, database_schema));
            let report = outpost_control::admin::rotate_master_key(
                &data_dir,
                master_key_file.as_deref(),
                database,
            )
            .context("rotate-master-key failed")?;
            println!(
                "master key rotated: {} -> {}; {} data key(s) re-wrapped, {} credential record(s) re-sealed; new key in {}",
                report.from_key_id,
                report.to_key_id,
                report.data_keys,
                report.sealed_records,
                report.key_file.display()
            );
        }
        CliCommand::Admin {
            command: AdminCommand::ReleaseKey { out },
        } => {
            let written = outpost_control::release::signing::write_key_pair(&out)
                .context("release-key failed")?;
            eprintln!(
                "release signing key written to {} (keep it offline); public half in {}",
                written.private_path.display(),
                written.public_path.display()
            );
            println!("{}", written.public_base64);
        }
        CliCommand::Admin {
            command: AdminCommand::RotateEpoch { data_dir },
        } => {
            let epoch =
                outpost_control::admin::rotate_epoch(&data_dir).context("rotate-epoch failed")?;
            println!("log epoch is now {epoch:016x}; every cursor will get 410 Gone");
        }
        CliCommand::Admin {
            command:
                AdminCommand::Events {
                    data_dir,
                    aggregate,
                },
        } => {
            let events = outpost_control::admin::aggregate_events(&data_dir, &aggregate)
                .context("events failed")?;
            for event in events {
                println!("{}", serde_json::to_string(&event)?);
            }
        }
        CliCommand::BenchFleet {
            agents,
            node_ttl_secs,
            feed_wait_secs,
            registrations_in_flight,
            wrk_secs,
            wrk_connections,
            wrk,
            etcd,
        } => {
            let control_bin = std::env::current_exe().context("cannot find this binary")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            runtime.block_on(async {
                if agents > 0 {
                    let report = outpost_control::bench::fleet::run(
                        outpost_control::bench::fleet::FleetOptions {
                            agents,
                            control_bin: control_bin.clone(),
                            node_ttl_secs,
                            feed_wait_secs,
                            registrations_in_flight,
                            change_timeout: std::time::Duration::from_secs(120),
                        },
                    )
                    .await
                    .context("fleet benchmark failed")?;
                    report.print();
                }
                if wrk_secs > 0 {
                    let options = outpost_control::bench::throughput::ThroughputOptions {
                        control_bin,
                        wrk_bin: wrk,
                        etcd_bin: etcd,
                        connections: wrk_connections,
                        threads: 2,
                        duration_secs: wrk_secs,
                    };
                    let report = outpost_control::bench::throughput::run(options.clone())
                        .await
                        .context("throughput benchmark failed")?;
                    report.print(&options);
                }
                anyhow::Ok(())
            })?;
        }
        CliCommand::BenchAppend {
            data_dir,
            events,
            batch,
            database_url,
        } => {
            let report = match database_url {
                None => outpost_control::admin::bench_append(&data_dir, events, batch),
                #[cfg(feature = "postgres")]
                Some(url) => outpost_control::admin::bench_append_postgres(&url, events, batch),
                #[cfg(not(feature = "postgres"))]
                Some(_) => {
                    anyhow::bail!("this outpost-control was built without the postgres feature")
                }
            }
            .context("bench-append failed")?;
            println!("events: {}", report.events);
            println!(
                "one event per durable transaction: {:.0} events/s",
                report.single_events_per_sec
            );
            println!(
                "batches of {}: {:.0} events/s",
                report.batch_size, report.batched_events_per_sec
            );
        }
    }
    Ok(())
}
