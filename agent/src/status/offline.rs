//! `outpost-agent status` and `stop-all`: read the agent's files without the agent. With the
//! agent running (it holds the redb lock), `status` reads its `status.json` snapshot; with the
//! agent stopped, it reads a private copy of the store opened with the integrity check (so a
//! damaged file is reported, never parsed unchecked, and the original is never modified), else
//! the last-good copy.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_proto::node::AllocationState;
use outpost_proto::plan::Plan;

use redb::{BackendError, Database, DatabaseError, StorageBackend};

use super::{AgentRun, AgentStatus, ControlState, ControlStatus, status_path};
use crate::apply::process::launcher::Launcher;
use crate::apply::process::runtime::RealSyscalls;
use crate::apply::process::{AllocationReport, Drift, Supervisor, procfs};
use crate::store::{META_LAST_SYNC_UNIX, Store, StoredState, last_good, read_state, store_path};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("no agent data in {0}: the directory does not exist")]
    NoDataDir(String),
    #[error("the agent is running but {path} is unreadable: {reason}")]
    Snapshot { path: String, reason: String },
    #[error("the agent is running; stop it before stop-all")]
    AgentRunning,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

enum StoreRead {
    Locked,
    Read(Box<StoredState>, String),
    Missing,
    Unreadable(String),
}

/// Reads the store without trusting it. A plain open parses pages unchecked, and a damaged
/// page panics redb (even in release builds), so the agent's lock is probed without reading
/// anything, and the state is read from a private copy opened with the integrity check; the
/// original is never modified.
fn read_store(data_dir: &Path) -> StoreRead {
    let path = store_path(data_dir);
    if !path.exists() {
        return StoreRead::Missing;
    }
    if held_by_agent(&path) {
        return StoreRead::Locked;
    }
    let Ok(dir) = tempfile_dir() else {
        return StoreRead::Unreadable("cannot create a temporary folder for a copy".into());
    };
    let copy = dir.join("copy.redb");
    let result = std::fs::copy(&path, &copy)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            Database::builder()
                .set_check_integrity_on_open(true)
                .open(&copy)
                .map_err(|e| e.to_string())
        })
        .and_then(|db| read_state(&db).map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(state) => StoreRead::Read(Box::new(state), "healthy".into()),
        Err(why) => StoreRead::Unreadable(why),
    }
}

/// Whether a running agent holds the store file: redb takes its locks before it reads
/// anything, and [`LockProbe`] reads nothing.
fn held_by_agent(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(backend) = redb::backends::FileBackend::new(file) else {
        return false;
    };
    matches!(
        Database::builder().open_read_only_with_backend(LockProbe(backend)),
        Err(DatabaseError::DatabaseAlreadyOpen)
    )
}

/// A storage backend that takes redb's locks on the store file and reads nothing.
#[derive(Debug)]
struct LockProbe(redb::backends::FileBackend);

fn probe_reads_nothing() -> std::io::Error {
    std::io::Error::other("lock probe: the store is not read through it")
}

impl StorageBackend for LockProbe {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, _offset: u64, _out: &mut [u8]) -> Result<(), std::io::Error> {
        Err(probe_reads_nothing())
    }
    fn set_len(&self, _len: u64) -> Result<(), std::io::Error> {
        Err(probe_reads_nothing())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> Result<(), std::io::Error> {
        Err(probe_reads_nothing())
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "outpost-agent-status-{}-{}",
        std::process::id(),
        crate::os::random_u64()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Allocations as the files say: processes recorded and still alive (they are adopted on the
/// next start) count as running.
fn offline_allocations(plan: &Plan, state: &StoredState) -> (Vec<AllocationReport>, Drift) {
    let alive = |id: &str| {
        state.processes.get(id).filter(|r| {
            r.start_ticks != 0 && procfs::live_start_ticks(r.pid) == Some(r.start_ticks)
        })
    };
    let mut reports = Vec::new();
    for allocation in &plan.allocations {
        let record = alive(allocation.id.as_str());
        let current = record.is_some_and(|r| r.spec_hash == allocation.spec_hash());
        reports.push(AllocationReport {
            allocation_id: allocation.id.to_string(),
            service: allocation.service.to_string(),
            wave: allocation.spec.wave,
            state: if current {
                AllocationState::Running
            } else {
                AllocationState::Pending
            },
            pid: record.map(|r| r.pid),
            adopted: false,
            restarts: record.map_or(0, |r| r.restarts),
            message: match (record, current) {
                (Some(_), true) => "running; the agent adopts it when it starts".into(),
                (Some(_), false) => "running an older spec; restarted when the agent starts".into(),
                (None, _) => "not running; the agent starts it when it starts".into(),
            },
        });
    }
    let planned: BTreeMap<&str, ()> = plan
        .allocations
        .iter()
        .map(|a| (a.id.as_str(), ()))
        .collect();
    let unexpected: Vec<String> = state
        .processes
        .keys()
        .filter(|id| !planned.contains_key(id.as_str()) && alive(id).is_some())
        .cloned()
        .collect();
    let drift = Drift {
        desired: reports.len(),
        running: reports
            .iter()
            .filter(|r| r.state == AllocationState::Running)
            .count(),
        missing: reports
            .iter()
            .filter(|r| r.state != AllocationState::Running)
            .map(|r| r.allocation_id.clone())
            .collect(),
        unexpected,
    };
    (reports, drift)
}

/// The status of the agent in `data_dir`, running or not.
pub fn read_status(data_dir: &Path) -> Result<AgentStatus, OfflineError> {
    if !data_dir.is_dir() {
        return Err(OfflineError::NoDataDir(data_dir.display().to_string()));
    }
    let (state, store_health) = match read_store(data_dir) {
        StoreRead::Locked => {
            let path = status_path(data_dir);
            let snapshot = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<AgentStatus>(&bytes).map_err(|e| e.to_string())
                });
            return snapshot.map_err(|reason| OfflineError::Snapshot {
                path: path.display().to_string(),
                reason,
            });
        }
        StoreRead::Read(state, health) => match &state.last_good_error {
            Some(error) => {
                let health = format!("damaged plan record ({error})");
                (*state, health)
            }
            None => (*state, health),
        },
        StoreRead::Missing => (StoredState::default(), "no store yet".to_string()),
        StoreRead::Unreadable(why) => (StoredState::default(), format!("unreadable ({why})")),
    };
    let (plan, plan_source) = match (&state.last_good, last_good::read(data_dir)) {
        (Some(plan), _) => (Some(plan.clone()), "store"),
        (None, Ok(Some(plan))) => (Some(plan), "last-good copy"),
        _ => (None, "empty"),
    };
    let mut notes = Vec::new();
    if let Some(error) = &state.last_good_error {
        notes.push(format!("last-good plan record unreadable: {error}"));
    }
    if plan_source == "last-good copy" {
        notes.push("plan read from the last-good copy".into());
    }
    if state.identity.revoked {
        notes.push(super::REVOKED_NOTE.into());
    }
    let empty = Plan::empty(Default::default());
    let (allocations, drift) = offline_allocations(plan.as_ref().unwrap_or(&empty), &state);
    let node_id = state
        .identity
        .node_id
        .clone()
        .or(plan.as_ref().map(|p| p.node_id.to_string()))
        .unwrap_or_default();
    Ok(AgentStatus {
        agent: AgentRun::Stopped,
        pid: None,
        node_id,
        role: plan.as_ref().map(|p| p.role).unwrap_or_default(),
        plan_generation: plan.as_ref().map(Plan::generation),
        last_good: plan.as_ref().map(Plan::generation),
        plan_source: plan_source.to_string(),
        cursor: state
            .cursor
            .or(plan.as_ref().map(|p| p.as_of))
            .map(|c| c.to_string()),
        last_sync_unix: state.meta.get(META_LAST_SYNC_UNIX).copied(),
        store_health,
        control: ControlStatus {
            url: state.identity.control_url.clone(),
            state: if state.identity.revoked {
                ControlState::Revoked
            } else {
                ControlState::AgentStopped
            },
            last_error: None,
            last_contact_unix: None,
        },
        drift,
        components: state.components.clone(),
        allocations,
        notes,
        last_plan_error: None,
        outbox_len: state.outbox_len,
        status_addr: None,
        // A userspace daemon outlives the agent: its device is read as it is now.
        overlay: offline_overlay_status(data_dir, plan.as_ref()),
        artifacts: offline_artifacts(data_dir, plan.as_ref()),
        upgrade: state.upgrade.as_ref().map(crate::upgrade::describe),
    })
}

/// Whether each artifact the plan references is in the cache (not re-hashed: boot does that).
fn offline_artifacts(data_dir: &Path, plan: Option<&Plan>) -> BTreeMap<String, String> {
    let cache = crate::artifact::ArtifactCache::new(data_dir);
    plan.map(crate::artifact::plan_artifacts)
        .unwrap_or_default()
        .into_iter()
        .map(|sha256| {
            let state = if cache.is_ready(&sha256) {
                "cached"
            } else {
                "missing: fetched once the agent runs and control answers"
            };
            (sha256, state.to_string())
        })
        .collect()
}

/// Stops every workload the agent recorded (the agent must be stopped): SIGTERM to each
/// process group, SIGKILL after its grace. Returns the allocation ids stopped.
pub fn stop_all(data_dir: &Path) -> Result<Vec<String>, OfflineError> {
    if !data_dir.is_dir() {
        return Err(OfflineError::NoDataDir(data_dir.display().to_string()));
    }
    let (store, _health) = match Store::open_for_boot(data_dir) {
        Ok(opened) => opened,
        Err(crate::store::StoreError::Locked { .. }) => return Err(OfflineError::AgentRunning),
        Err(error) => return Err(error.into()),
    };
    let store = std::sync::Arc::new(store);
    let state = store.state()?;
    let plan = state
        .last_good
        .clone()
        .unwrap_or_else(|| Plan::empty(Default::default()));
    let sys = RealSyscalls::new(u64::MAX, Err("not needed to stop".into()), Launcher::Direct);
    let mut supervisor = Supervisor::new(
        "",
        data_dir.to_path_buf(),
        Box::new(sys),
        Box::new(store.clone()),
    );
    let (adopted, _gone) = supervisor.adopt(
        state.processes.values().cloned().collect(),
        &plan,
        Instant::now(),
    );
    supervisor.stop_all(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !supervisor.is_idle() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        supervisor.tick(Instant::now());
    }
    store.close();
    Ok(adopted)
}

/// The overlay for `outpost-agent status` while the agent is stopped: the live device (a
/// userspace daemon outlives the agent) read without changing anything. The interface name and
/// backend come from the last snapshot the running agent wrote (it knows the local name), else
/// from the plan. `None` when the plan has no overlay.
fn offline_overlay_status(
    data_dir: &Path,
    plan: Option<&outpost_proto::plan::Plan>,
) -> Option<crate::apply::wireguard::OverlayStatus> {
    let spec = plan?.overlay.as_ref()?;
    let last = std::fs::read(crate::status::status_path(data_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<crate::status::AgentStatus>(&bytes).ok())
        .and_then(|status| status.overlay);
    let interface_name = last
        .as_ref()
        .map(|status| status.interface_name.clone())
        .unwrap_or_else(|| spec.interface_name.clone());
    use crate::apply::wireguard::{DesiredOverlay, InterfaceName, open_backend, overlay_status};
    let interface = InterfaceName::new(&interface_name).ok()?;
    let local = outpost_proto::overlay::OverlaySpec {
        interface_name,
        ..spec.clone()
    };
    let desired = DesiredOverlay::from_spec(&local).ok();
    let kernel = last
        .as_ref()
        .is_some_and(|status| status.backend == "kernel");
    let mut backend = open_backend(if kernel {
        crate::apply::wireguard::BackendKind::Kernel
    } else {
        crate::apply::wireguard::BackendKind::Userspace(
            crate::apply::wireguard::UserspaceImplementation::WireguardGo,
        )
    });
    overlay_status(&mut backend, &interface, desired.as_ref()).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::tests::sample_plan;
    use crate::store::{ApplyOutcome, ComponentApply, ProcessRecord};

    #[test]
    fn stopped_agent_status_reads_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(2);
        {
            let (store, _) = Store::open_for_boot(dir.path()).unwrap();
            store.write_candidate(&plan).unwrap();
            store
                .promote_candidate(&ComponentApply {
                    generation: plan.generation(),
                    status: ApplyOutcome::Ok,
                    message: String::new(),
                    at_unix: 9,
                })
                .unwrap();
            // Our own process stands in for a workload left running.
            let me = std::process::id() as i32;
            let ticks = procfs::read_stat(me).unwrap().start_ticks;
            store
                .save_process(&ProcessRecord {
                    allocation_id: "web-0".into(),
                    pid: me,
                    start_ticks: ticks,
                    spec_hash: plan.allocations[0].spec_hash(),
                    restarts: 0,
                    ports: Default::default(),
                })
                .unwrap();
            store.close();
        }
        let status = read_status(dir.path()).unwrap();
        assert_eq!(status.agent, AgentRun::Stopped);
        assert_eq!(status.plan_generation, Some(plan.generation()));
        assert_eq!(status.cursor, Some(plan.as_of.to_string()));
        assert_eq!(status.last_sync_unix, Some(9));
        assert_eq!((status.drift.desired, status.drift.running), (2, 1));
        assert_eq!(status.drift.missing, vec!["web-1".to_string()]);
        assert_eq!(status.store_health, "healthy");
    }

    #[test]
    fn running_agent_status_comes_from_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = Store::open_for_boot(dir.path()).unwrap();
        assert!(matches!(
            read_status(dir.path()),
            Err(OfflineError::Snapshot { .. })
        ));
        let snapshot = AgentStatus {
            node_id: "live".into(),
            ..Default::default()
        };
        std::fs::write(
            status_path(dir.path()),
            serde_json::to_vec(&snapshot).unwrap(),
        )
        .unwrap();
        assert_eq!(read_status(dir.path()).unwrap().node_id, "live");
    }

    #[test]
    fn damaged_pages_are_reported_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(1);
        {
            let (store, _) = Store::open_for_boot(dir.path()).unwrap();
            store.write_candidate(&plan).unwrap();
            store
                .promote_candidate(&ComponentApply {
                    generation: plan.generation(),
                    status: ApplyOutcome::Ok,
                    message: String::new(),
                    at_unix: 1,
                })
                .unwrap();
            store.close();
        }
        last_good::write(dir.path(), &plan).unwrap();
        // Keep the header page, overwrite every other page with garbage.
        let path = store_path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        for (index, byte) in bytes.iter_mut().enumerate().skip(4096) {
            *byte = (index.wrapping_mul(2_654_435_761) >> 7) as u8 ^ 0xa5;
        }
        std::fs::write(&path, &bytes).unwrap();
        let status = read_status(dir.path()).unwrap();
        assert_eq!(status.plan_source, "last-good copy");
        assert_eq!(status.plan_generation, Some(plan.generation()));
        assert!(
            status.store_health.starts_with("unreadable"),
            "{}",
            status.store_health
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the original is untouched"
        );
    }

    #[test]
    fn unreadable_store_falls_back_to_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(store_path(dir.path()), b"garbage").unwrap();
        last_good::write(dir.path(), &sample_plan(1)).unwrap();
        let status = read_status(dir.path()).unwrap();
        assert_eq!(status.plan_source, "last-good copy");
        assert!(
            status.store_health.starts_with("unreadable"),
            "{}",
            status.store_health
        );
        assert_eq!(status.drift.desired, 1);
        assert!(read_status(&dir.path().join("nope")).is_err());
    }
}
