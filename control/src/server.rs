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
use crate::secret::MasterKeyring;
use crate::secret::sealed_records::seal_plaintext_records;
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
    #[error("cannot load the master key: {0}")]
    MasterKey(String),
    #[error(transparent)]
    Advertise(#[from] crate::discovery::AdvertiseError),
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
                    .commit(guard, commit)
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

/// Opens the configured store: PostgreSQL when a database URL is set, else the redb file in
/// the data directory.
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Opens the redb store. An older store's plaintext CA key and credentials are sealed under
/// the master key, then the file is compacted so the freed pages that held the plaintext are
/// dropped from it.
pub fn open_redb(path: &Path, keyring: &MasterKeyring) -> Result<RedbStore, StoreError> {
    let mut store = RedbStore::open(path)?;
    if seal_plaintext_records(&store, keyring, now_unix_ms())? > 0 {
        tracing::info!(
            "sealed the CA key and credentials of an older store; compacting {}",
            path.display()
        );
        // Each pass moves pages down and trims the end; a few suffice.
        for _ in 0..8 {
            if !store.compact()? {
                break;
            }
        }
    }
    Ok(store)
}

/// Opens the PostgreSQL store. An older store's plaintext CA key and credentials are sealed
/// under the master key, then the config table is rewritten (`VACUUM FULL`) so the dead rows
/// that held the plaintext are dropped from its files.
#[cfg(feature = "postgres")]
pub fn open_postgres(
    url: &str,
    schema: &str,
    keyring: &MasterKeyring,
) -> Result<crate::store::postgres::PostgresStore, StoreError> {
    let store = crate::store::postgres::PostgresStore::open(url, schema)?;
    if seal_plaintext_records(&store, keyring, now_unix_ms())? > 0 {
        tracing::info!(
            "sealed the CA key and credentials of an older store; rewriting {schema}.config"
        );
        store.rewrite_config_table()?;
    }
    Ok(store)
}

async fn open_store(
    config: &ServeConfig,
    keyring: &MasterKeyring,
) -> Result<Arc<dyn Store>, ServeError> {
    match &config.database_url {
        None => Ok(Arc::new(open_redb(
            &config.data_dir.join(STORE_FILE),
            keyring,
        )?)),
        #[cfg(feature = "postgres")]
        Some(url) => {
            let (url, schema) = (url.clone(), config.database_schema.clone());
            let keyring = keyring.clone();
            let store = tokio::task::spawn_blocking(move || open_postgres(&url, &schema, &keyring))
                .await
                .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))??;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => Err(ServeError::Config(ConfigError {
            field: "database-url",
            reason: "this outpost-control was built without the postgres feature".into(),
            value: "(set)".into(),
        })),
    }
}

/// Serves until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    serve_until(config, shutdown_signal()).await
}

/// Serves until `shutdown` completes (tests pass their own signal).
pub async fn serve_until(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    config.validate()?;
    install_ring_provider();
    std::fs::create_dir_all(&config.data_dir).map_err(io_error(&config.data_dir))?;
    let environment: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let master_keys = MasterKeyring::new(
        crate::secret::master_key::load_or_create(&config.master_key_source(), &environment)
            .map_err(|e| ServeError::MasterKey(e.to_string()))?,
    );
    let store = open_store(&config, &master_keys).await?;
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
    let mut settings = config.settings(&url);
    settings.master_keys = master_keys;
    let started = Control::start(Arc::clone(&store), settings, Arc::new(SystemClock)).await?;
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
    if let Some(metrics_listen) = config.metrics_listen {
        let bound = crate::metrics::serve_metrics(Arc::clone(&control), metrics_listen)
            .await
            .map_err(|source| ServeError::Bind {
                listen: metrics_listen,
                source,
            })?;
        println!("metrics on http://{bound}/metrics");
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
    let _advertiser = match config.advertise {
        crate::config::Advertise::Off => None,
        crate::config::Advertise::Mdns => {
            let fields = outpost_proto::site::AdvertFields {
                url: control.settings.public_url.clone(),
                epoch: control.node_settings().epoch,
                ca_fingerprint: control.identity.ca.fingerprint.clone(),
                cluster_id: control.identity.cluster_id.clone(),
            };
            let advertiser = crate::discovery::Advertiser::start(
                &fields,
                control.settings.site.join_secret.as_deref(),
            )?;
            println!(
                "advertising {} over mdns (epoch {}, {})",
                fields.url,
                fields.epoch,
                if control.settings.site.join_secret.is_some() {
                    "signed with the join secret"
                } else {
                    "unsigned"
                }
            );
            Some(advertiser)
        }
    };

    let app = crate::api::router(Arc::clone(&control));
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
    if let Err(error) = control.write_back_status_once().await {
        tracing::warn!("cannot write node status back on shutdown: {error}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// Runs a real server on a loopback port in its own runtime, calls `check` from a blocking
    /// thread once `control.url` exists, then shuts the server down and drops the runtime (which
    /// closes the store).
    fn run_server_once(config: ServeConfig, check: impl FnOnce(&Path, &str) + Send + 'static) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let data_dir = config.data_dir.clone();
            let checker = tokio::task::spawn_blocking(move || {
                let url_file = data_dir.join(URL_FILE);
                let deadline = Instant::now() + Duration::from_secs(20);
                while !url_file.exists() {
                    assert!(Instant::now() < deadline, "control.url never appeared");
                    std::thread::sleep(Duration::from_millis(20));
                }
                let url = std::fs::read_to_string(&url_file).unwrap();
                check(&data_dir, &url);
                let _ = stop.send(());
            });
            serve_until(config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            checker.await.unwrap();
        });
        drop(runtime);
    }

    fn client(ca_pem: &[u8]) -> ureq::Agent {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let ca = Certificate::from_pem(ca_pem).unwrap().to_owned();
        ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .provider(TlsProvider::Rustls)
                    .root_certs(RootCerts::new_with_certs(&[ca]))
                    .build(),
            )
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// The chain the server presents, read with a plain rustls client that trusts the CA.
    fn presented_chain(url: &str, ca_pem: &[u8]) -> Vec<Vec<u8>> {
        let address = url.trim_start_matches("https://");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut socket = std::net::TcpStream::connect(address).unwrap();
        let mut stream = rustls::Stream::new(&mut connection, &mut socket);
        stream
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        connection
            .peer_certificates()
            .unwrap()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    }

    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn serves_https_writes_admin_files_and_restarts_warm() {
        install_ring_provider();
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let config = ServeConfig {
            sans: vec!["edge.example".into()],
            ..ServeConfig::new(data_dir.clone(), "127.0.0.1:0".parse().unwrap())
        };
        let first_token = Arc::new(std::sync::Mutex::new(String::new()));
        let saved = Arc::clone(&first_token);
        run_server_once(config.clone(), move |data_dir, url| {
            assert!(url.starts_with("https://127.0.0.1:"), "{url}");
            let admin: ClientConfigFile = serde_json::from_slice(
                &std::fs::read(data_dir.join("admin/outpostctl.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(admin.control_url, url);
            for file in ["admin/outpostctl.json", "admin/ca.pem"] {
                let mode = std::fs::metadata(data_dir.join(file))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777;
                assert_eq!(mode, 0o600, "{file}");
            }
            let ca_pem = std::fs::read(&admin.ca_file).unwrap();
            let ca_der = CertificateDer::from_pem_slice(&ca_pem).unwrap();
            // The server presents [leaf, CA]; the CA's fingerprint is what tokens carry.
            let chain = presented_chain(url, &ca_pem);
            assert_eq!(chain.len(), 2);
            assert_eq!(chain[1], ca_der.as_ref());
            let agent = client(&ca_pem);
            let mut reply = agent.get(format!("{url}/v1/health")).call().unwrap();
            assert_eq!(reply.status().as_u16(), 200);
            let health: serde_json::Value = reply.body_mut().read_json().unwrap();
            assert_eq!(health["status"], "ok");
            let port = url.rsplit(':').next().unwrap();
            let mut reply = agent
                .post(format!("https://localhost:{port}/v1/enrollment-tokens"))
                .header("Authorization", format!("Bearer {}", admin.token))
                .send_json(serde_json::json!({"ttl_secs": 60}))
                .unwrap();
            assert_eq!(reply.status().as_u16(), 200);
            let token: serde_json::Value = reply.body_mut().read_json().unwrap();
            assert_eq!(
                token["ca_fingerprint"],
                crate::tls::fingerprint(ca_der.as_ref())
            );
            *saved.lock().unwrap() = admin.token;
        });
        std::fs::remove_file(data_dir.join(URL_FILE)).unwrap();
        let expected = first_token.lock().unwrap().clone();
        run_server_once(config, move |data_dir, url| {
            let admin: ClientConfigFile = serde_json::from_slice(
                &std::fs::read(data_dir.join("admin/outpostctl.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(admin.token, expected, "a warm start keeps the admin token");
            assert_eq!(admin.control_url, url);
            let agent = client(&std::fs::read(&admin.ca_file).unwrap());
            let reply = agent
                .get(format!("{url}/v1/services"))
                .header("Authorization", format!("Bearer {}", admin.token))
                .call()
                .unwrap();
            assert_eq!(reply.status().as_u16(), 200);
        });
    }
}
