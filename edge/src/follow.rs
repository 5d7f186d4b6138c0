//! The edge at run time (E1, E3): applies a table only after it validates as a whole (swap with
//! `arc-swap`, then kept in redb with its cursor, then the checks and TCP listeners follow), and
//! follows control by cursor like an agent — snapshot on first start or after 410, long-poll
//! otherwise, backing off with full jitter on errors — and reports what it applied.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::Cursor;
use outpost_proto::backoff::{BACKOFF_RESET_AFTER_SECS, backoff_delay};
use outpost_proto::enroll::EnrollmentClaims;
use outpost_proto::route::{BackendHealth, EdgeRegisterRequest, EdgeReport, EdgeTable};

use crate::cache::{Cache, EdgeIdentity};
use crate::checker::Checkers;
use crate::control::{ClientError, ControlClient};
use crate::state::Shared;
use crate::status::{BackendStatus, EdgeStatus};
use crate::table::RouteTable;
use crate::tcp::TcpListeners;

/// How long a long-poll waits for a change.
pub const FEED_WAIT: Duration = Duration::from_secs(20);
/// Healthy rounds start at least this far apart, whatever control answers.
pub const ROUND_SPACING_MIN: Duration = Duration::from_millis(500);
/// How often the reporter looks for something new to tell control.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Runtime {
    pub shared: Arc<Shared>,
    pub cache: Arc<Cache>,
    pub data_dir: PathBuf,
    checkers: Mutex<Checkers>,
    tcp: tokio::sync::Mutex<TcpListeners>,
    pub status: Mutex<EdgeStatus>,
    identity: Mutex<Option<EdgeIdentity>>,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Runtime {
    pub fn new(
        shared: Arc<Shared>,
        cache: Arc<Cache>,
        data_dir: PathBuf,
        status: EdgeStatus,
    ) -> Arc<Self> {
        let identity = cache.identity();
        Arc::new(Self {
            shared,
            cache,
            data_dir,
            checkers: Mutex::new(Checkers::default()),
            tcp: tokio::sync::Mutex::new(TcpListeners::default()),
            status: Mutex::new(status),
            identity: Mutex::new(identity),
        })
    }

    fn edge_key(&self) -> Option<crate::certs::EdgeKey> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(EdgeIdentity::edge_key)
    }

    fn update_status(&self, change: impl FnOnce(&mut EdgeStatus)) {
        let snapshot = {
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            let before = status.clone();
            change(&mut status);
            if *status == before {
                return;
            }
            status.clone()
        };
        crate::status::write(&self.data_dir, &snapshot);
    }

    /// Starts checks and TCP listeners for the table that serves now.
    pub async fn follow_table(&self) {
        self.checkers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reconcile(&self.shared.table.load(), &self.shared.health);
        let failures = self.tcp.lock().await.reconcile(&self.shared).await;
        for failure in &failures {
            tracing::warn!(component = "tcp", action = "listen", "{failure}");
        }
        let table = self.shared.table.load();
        let tcp_ports = table.tcp_ports();
        let backends = self.backend_statuses();
        self.update_status(|s| {
            s.backends = backends;
            s.cursor = table.source.as_of.to_string();
            s.route_count = table.route_count();
            s.routes = table.source.routes.keys().cloned().collect();
            s.tcp_ports = tcp_ports;
            s.tls_problems = table.certificates.problems.clone();
            s.tls_secrets = table
                .source
                .tls
                .secrets
                .iter()
                .map(|secret| format!("{}@v{}", secret.name, secret.version))
                .collect();
            if !failures.is_empty() {
                s.last_error = Some(failures.join("; "));
            }
        });
    }

    /// Validates `candidate` as a whole and swaps it in, or refuses it and keeps the old one.
    pub async fn apply(&self, candidate: EdgeTable) -> Result<(), String> {
        let started = Instant::now();
        let current = self.shared.table.load();
        if current.source == candidate {
            return Ok(());
        }
        let changed_routes = current.source.routes != candidate.routes
            || current.source.backends != candidate.backends;
        let table = match RouteTable::build(candidate.clone(), &self.shared.reserved_ports) {
            Ok(table) => table.with_certificates(self.edge_key().as_ref(), &current.certificates),
            Err(error) => {
                let reason = format!("route table at {} refused: {error}", candidate.as_of);
                tracing::warn!(
                    component = "routes",
                    action = "refuse",
                    generation = candidate.as_of.event_id,
                    "{reason}; the previous table keeps serving"
                );
                self.update_status(|s| s.refused = Some(reason.clone()));
                return Err(reason);
            }
        };
        // Keep it before serving it: a crash right after the swap boots the same table.
        let cache = Arc::clone(&self.cache);
        let saved = tokio::task::spawn_blocking(move || cache.save_table(&candidate))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(error) = &saved {
            tracing::warn!(
                component = "routes",
                action = "save",
                generation = table.source.as_of.event_id,
                "the route table serves but was not saved: {error}"
            );
        }
        let count = table.route_count();
        let cursor = table.source.as_of;
        self.shared.table.store(Arc::new(table));
        if changed_routes {
            tracing::info!(
                component = "routes",
                action = "apply",
                generation = cursor.event_id,
                duration_ms = started.elapsed().as_millis() as u64,
                "serving {count} routes at {cursor}"
            );
        }
        self.update_status(|s| {
            s.refused = None;
            s.last_sync_unix_ms = Some(now_unix_ms());
        });
        self.follow_table().await;
        Ok(())
    }

    /// What the edge applied, for control.
    pub fn report(&self) -> EdgeReport {
        let table = self.shared.table.load();
        let backends = table
            .all_backends()
            .into_iter()
            .map(|(spec, backend)| BackendHealth {
                route: spec.name.clone(),
                address: backend.address.ip().to_string(),
                port: backend.address.port(),
                healthy: self.shared.health.is_healthy(backend.address, spec),
            })
            .collect();
        let refused = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .clone();
        EdgeReport {
            cursor: Some(table.source.as_of),
            route_count: u32::try_from(table.route_count()).unwrap_or(u32::MAX),
            backends,
            refused,
        }
    }

    fn backend_statuses(&self) -> Vec<BackendStatus> {
        let table = self.shared.table.load();
        table
            .all_backends()
            .into_iter()
            .map(|(spec, backend)| BackendStatus {
                route: backend.route.clone(),
                address: backend.address.to_string(),
                ready: backend.ready,
                healthy: self.shared.health.is_healthy(backend.address, spec),
            })
            .collect()
    }
}

/// How the edge reaches control. The enrollment token is a secret: `Debug` redacts it.
#[derive(Clone)]
pub struct FollowSettings {
    pub enrollment_token: Option<String>,
    pub control_url: Option<String>,
    pub edge_id: Option<String>,
}

impl std::fmt::Debug for FollowSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowSettings")
            .field(
                "enrollment_token",
                &self.enrollment_token.as_ref().map(|_| "<redacted>"),
            )
            .field("control_url", &self.control_url)
            .field("edge_id", &self.edge_id)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Setup(String),
}

fn client_for(identity: &EdgeIdentity) -> Result<ControlClient, RoundError> {
    ControlClient::new(&identity.control_url, &identity.ca_sha256).map_err(RoundError::Client)
}

/// Enrolls with the token when the edge has no identity (or its credential was refused).
async fn ensure_identity(
    runtime: &Runtime,
    settings: &FollowSettings,
    refused: bool,
) -> Result<EdgeIdentity, RoundError> {
    let known = runtime
        .identity
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(identity) = &known
        && !refused
    {
        if identity.edge_key().is_some() {
            return Ok(identity.clone());
        }
        // Enrolled by an outpost-edge without sealing keys: register again with the credential,
        // now sending a key, so TLS secrets can reach this edge.
        return register_sealing_key(runtime, identity).await;
    }
    let token = settings.enrollment_token.as_deref().ok_or_else(|| {
        RoundError::Setup(if refused {
            "control refused this edge's credential; start it with a fresh --enroll TOKEN".into()
        } else {
            "this edge has not enrolled; start it with --enroll TOKEN".into()
        })
    })?;
    let claims =
        EnrollmentClaims::parse(token).map_err(|e| RoundError::Setup(format!("--enroll: {e}")))?;
    let control_url = settings
        .control_url
        .clone()
        .or_else(|| known.as_ref().map(|k| k.control_url.clone()))
        .unwrap_or_else(|| claims.control_url.clone());
    let edge_id = known
        .as_ref()
        .map(|k| k.edge_id.clone())
        .or_else(|| settings.edge_id.clone())
        .unwrap_or_else(|| format!("edge-{:08x}", rand::random::<u32>()));
    let client = ControlClient::new(&control_url, &claims.ca_fingerprint)?;
    let sealing_key = known
        .as_ref()
        .and_then(|k| k.sealing_key.clone())
        .filter(|_| known.as_ref().and_then(EdgeIdentity::edge_key).is_some())
        .unwrap_or_else(new_sealing_key);
    let request = EdgeRegisterRequest {
        edge_id: edge_id
            .as_str()
            .try_into()
            .map_err(|_| RoundError::Setup(format!("edge id {edge_id:?} is not a valid name")))?,
        enrollment_token: Some(token.to_string()),
        edge_credential: None,
        sealing_public_key: Some(sealing_public_hex(&sealing_key)),
    };
    let answer = client.register(&request).await?;
    let identity = EdgeIdentity {
        edge_id: answer.edge_id.to_string(),
        credential: answer.edge_credential,
        control_url,
        ca_sha256: claims.ca_fingerprint,
        org: answer.org,
        sealing_key: Some(sealing_key),
    };
    save_identity(runtime, &identity).await?;
    tracing::info!(
        component = "follow",
        action = "enroll",
        edge_id = %identity.edge_id,
        "enrolled as edge {} of org {} at {}",
        identity.edge_id,
        identity.org,
        identity.control_url
    );
    Ok(identity)
}

/// A fresh X25519 private key, as hex.
fn new_sealing_key() -> String {
    outpost_proto::hash::to_hex(&rand::random::<[u8; 32]>())
}

fn sealing_public_hex(private_hex: &str) -> String {
    let private =
        outpost_proto::secret::key_from_hex("sealing key", private_hex).unwrap_or_default();
    outpost_proto::hash::to_hex(&outpost_proto::secret::sealing_public_key(&private))
}

async fn save_identity(runtime: &Runtime, identity: &EdgeIdentity) -> Result<(), RoundError> {
    let cache = Arc::clone(&runtime.cache);
    let saved = identity.clone();
    tokio::task::spawn_blocking(move || cache.save_identity(&saved))
        .await
        .map_err(|e| RoundError::Setup(e.to_string()))?
        .map_err(|e| RoundError::Setup(e.to_string()))?;
    *runtime.identity.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.clone());
    Ok(())
}

/// Registers an enrolled edge again with its credential, sending a new sealing key.
async fn register_sealing_key(
    runtime: &Runtime,
    known: &EdgeIdentity,
) -> Result<EdgeIdentity, RoundError> {
    let sealing_key = new_sealing_key();
    let client = client_for(known)?;
    let request = EdgeRegisterRequest {
        edge_id: known.edge_id.as_str().try_into().map_err(|_| {
            RoundError::Setup(format!("edge id {:?} is not a valid name", known.edge_id))
        })?,
        enrollment_token: None,
        edge_credential: Some(known.credential.clone()),
        sealing_public_key: Some(sealing_public_hex(&sealing_key)),
    };
    client.register(&request).await?;
    let identity = EdgeIdentity {
        sealing_key: Some(sealing_key),
        ..known.clone()
    };
    save_identity(runtime, &identity).await?;
    tracing::info!(
        component = "follow",
        action = "register_sealing_key",
        edge_id = %identity.edge_id,
        "registered a sealing key for edge {}",
        identity.edge_id
    );
    Ok(identity)
}

/// Follows control forever.
pub async fn follow(runtime: Arc<Runtime>, settings: FollowSettings) {
    let mut candidate = runtime.shared.table.load().source.clone();
    let mut attempt: u32 = 0;
    let mut healthy_since: Option<Instant> = None;
    let mut credential_refused = false;
    loop {
        let started = Instant::now();
        let round = async {
            let identity = ensure_identity(&runtime, &settings, credential_refused).await?;
            credential_refused = false;
            runtime.update_status(|s| {
                s.edge_id = Some(identity.edge_id.clone());
                s.org = Some(identity.org.clone());
                s.control_url = Some(identity.control_url.clone());
            });
            let client = client_for(&identity)?;
            let never_synced = candidate.as_of == Cursor::default();
            let next = if never_synced {
                let snapshot = client
                    .snapshot(&identity.edge_id, &identity.credential)
                    .await?;
                EdgeTable::from_snapshot(snapshot)
            } else {
                let batch = client
                    .changes(
                        &identity.edge_id,
                        &identity.credential,
                        candidate.as_of,
                        &candidate.backends.digest,
                        &candidate.tls.digest,
                        FEED_WAIT,
                    )
                    .await?;
                if batch.bookmark.log_epoch != candidate.as_of.log_epoch {
                    tracing::info!(
                        component = "follow",
                        action = "resnapshot",
                        generation = candidate.as_of.event_id,
                        "control's log epoch changed ({} → {}); fetching the snapshot",
                        candidate.as_of,
                        batch.bookmark
                    );
                    candidate.as_of = Cursor::default();
                    return Ok::<_, RoundError>(());
                }
                candidate.folded(&batch)
            };
            candidate = next;
            // A refusal is reported; the candidate keeps folding so a later fix applies.
            let _ = runtime.apply(candidate.clone()).await;
            Ok(())
        };
        match round.await {
            Ok(()) => {
                let since = *healthy_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(BACKOFF_RESET_AFTER_SECS) {
                    attempt = 0;
                }
                runtime.update_status(|s| s.last_error = None);
                let spent = started.elapsed();
                if spent < ROUND_SPACING_MIN {
                    tokio::time::sleep(ROUND_SPACING_MIN - spent).await;
                }
            }
            Err(RoundError::Client(error)) if error.is_gone() => {
                tracing::info!(
                    component = "follow",
                    action = "resnapshot",
                    generation = candidate.as_of.event_id,
                    "cursor {} is gone ({error}); fetching the snapshot",
                    candidate.as_of
                );
                candidate.as_of = Cursor::default();
            }
            Err(error) => {
                if let RoundError::Client(client_error) = &error
                    && client_error.is_unauthorized()
                {
                    credential_refused = true;
                }
                healthy_since = None;
                let delay = backoff_delay(attempt, rand::random());
                attempt = attempt.saturating_add(1);
                tracing::warn!(
                    component = "follow",
                    action = "retry",
                    attempt,
                    "control unreachable or refusing ({error}); serving the last-good routes, retrying in {} ms",
                    delay.as_millis()
                );
                runtime.update_status(|s| s.last_error = Some(error.to_string()));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Tells control what the edge applied whenever it changes (and at least every 15 s), and keeps
/// the status file's backend health current.
pub async fn report_forever(runtime: Arc<Runtime>) {
    let mut last_sent: Option<(EdgeReport, Instant)> = None;
    loop {
        tokio::time::sleep(REPORT_INTERVAL).await;
        let statuses = runtime.backend_statuses();
        runtime.update_status(|s| s.backends = statuses);
        let identity = runtime
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(identity) = identity else { continue };
        let report = runtime.report();
        let due = match &last_sent {
            Some((sent, at)) => *sent != report || at.elapsed() >= Duration::from_secs(15),
            None => true,
        };
        if !due {
            continue;
        }
        let Ok(client) = ControlClient::new(&identity.control_url, &identity.ca_sha256) else {
            continue;
        };
        match client
            .report(&identity.edge_id, &identity.credential, &report)
            .await
        {
            Ok(()) => last_sent = Some((report, Instant::now())),
            Err(error) => tracing::debug!(
                component = "follow",
                action = "report",
                edge_id = %identity.edge_id,
                "report not delivered: {error}"
            ),
        }
    }
}
