//! `outpost-control serve`: opens the store, starts the core, signs this start's server
//! certificate, writes the local admin's client config, and serves the API over HTTPS.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::views::ClientConfigFile;
use crate::app::{Control, SystemClock};
use crate::config::{ConfigError, ServeConfig, url_host};
use crate::init::{DEFAULT_ORG, InitError, StartKind, mint_operator_token, operator_token_commit};
use crate::store::redb::RedbStore;
use crate::store::{Commit, Store, StoreError};
use crate::tls::{TlsError, install_ring_provider, server_config, server_names};

/// Name of the store file inside the data directory.
pub const STORE_FILE: &str = "control.redb";
/// File holding the bound URL, for scripts and tests.
pub const URL_FILE: &str = "control.url";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot write the admin client config: {0}")]
    AdminConfig(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file atomically with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), ServeError> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io_error(&temporary))?;
        file.write_all(contents).map_err(io_error(&temporary))?;
        file.sync_all().map_err(io_error(&temporary))?;
    }
    std::fs::rename(&temporary, path).map_err(io_error(path))
}

/// The URL a local client uses for a bound address.
pub fn local_url(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    match ip {
        IpAddr::V4(ip) => format!("https://{ip}:{}", bound.port()),
        IpAddr::V6(ip) => format!("https://[{ip}]:{}", bound.port()),
    }
}

/// Writes `admin/ca.pem` and `admin/outpostctl.json`. On a warm start the stored token is kept
/// (only the URL is refreshed); if the file is gone, a new admin token is issued.
async fn write_admin_files(
    control: &Control,
    admin_dir: &Path,
    url: &str,
    cold_start_token: Option<String>,
) -> Result<PathBuf, ServeError> {
    std::fs::create_dir_all(admin_dir).map_err(io_error(admin_dir))?;
    let ca_file = admin_dir.join("ca.pem");
    write_private(&ca_file, control.identity.ca.cert_pem.as_bytes())?;
    let config_file = admin_dir.join("outpostctl.json");
    let token = match cold_start_token {
        Some(token) => token,
        None => match std::fs::read(&config_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<ClientConfigFile>(&b).ok())
        {
            Some(existing) => existing.token,
            None => {
                tracing::warn!(
                    "{} is missing; issuing a new admin token",
                    config_file.display()
                );
                let minted = mint_operator_token(DEFAULT_ORG, vec![crate::api::auth::Scope::Admin]);
                let (event, write) = operator_token_commit(&minted);
                let guard = control.lock_commands().await;
                let commit = Commit {
                    events: vec![event.to_new_event()],
                    config_writes: vec![write],
                    ..Commit::default()
                };
                control
                    .commit(&guard, commit)
                    .await
                    .map_err(|e| ServeError::AdminConfig(e.to_string()))?;
                minted.token
            }
        },
    };
    let ca_path = std::fs::canonicalize(&ca_file).map_err(io_error(&ca_file))?;
    let file = ClientConfigFile {
        control_url: url.to_string(),
        ca_file: ca_path.display().to_string(),
        token,
    };
    let bytes =
        serde_json::to_vec_pretty(&file).map_err(|e| ServeError::AdminConfig(e.to_string()))?;
    write_private(&config_file, &bytes)?;
    std::fs::canonicalize(&config_file).map_err(io_error(&config_file))
}

/// Serves until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    config.validate()?;
    install_ring_provider();
    std::fs::create_dir_all(&config.data_dir).map_err(io_error(&config.data_dir))?;
    let store_path = config.data_dir.join(STORE_FILE);
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&store_path)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            listen: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind {
        listen: config.listen,
        source,
    })?;
    let url = local_url(bound);
    let started = Control::start(
        Arc::clone(&store),
        config.settings(&url),
        Arc::new(SystemClock),
    )
    .await?;
    let control = started.control;
    match started.kind {
        StartKind::Cold => tracing::info!(
            "cold start: initialized cluster {}",
            control.identity.cluster_id
        ),
        StartKind::Warm => {
            tracing::info!("warm start: loaded cluster {}", control.identity.cluster_id)
        }
    }
    let public_host = config.public_url.as_deref().and_then(url_host);
    let names = server_names(bound.ip(), public_host.as_deref(), &config.sans);
    let identity = control.identity.ca.sign_server(&names)?;
    let acceptor = TlsAcceptor::from(server_config(&identity)?);

    let admin_config = write_admin_files(
        &control,
        &config.data_dir.join("admin"),
        &url,
        started.admin_token,
    )
    .await?;
    write_private(&config.data_dir.join(URL_FILE), url.as_bytes())?;
    println!("outpost-control listening on {url}");
    println!("public url: {}", control.settings.public_url);
    println!(
        "ca fingerprint (sha256): {}",
        control.identity.ca.fingerprint
    );
    println!("export OUTPOST_CONFIG={}", admin_config.display());

    let app = crate::api::router(Arc::clone(&control));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!("tls handshake failed: {error}");
                        return;
                    }
                    Err(_) => return,
                };
            let service = TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service);
            if let Err(error) = connection.await {
                tracing::debug!("connection ended: {error}");
            }
        });
    }
    println!("outpost-control stopping");
    let saver = Arc::clone(&control);
    let _ =
        tokio::task::spawn_blocking(move || saver.projector.save_now(saver.store.as_ref())).await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
}
