//! The agent's local state (O2): one redb file (`DIR/agent.redb`) plus the last-good plan copy
//! beside it.
//!
//! Tables: identity, plan (last-good and candidate, each prefixed with its sha256), cursor,
//! applied generations per component, processes (for adoption), a bounded outbox, and meta.
//! Opening never blocks boot: a file redb calls corrupt is moved aside (kept for forensics) and a
//! fresh store is seeded from the last-good copy.

pub mod last_good;
pub mod records;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use outpost_proto::Cursor;
use outpost_proto::bootstrap::BootstrapEvent;
use outpost_proto::codec::{Encoding, encode};
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::plan::Plan;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition, TableError,
};
use sha2::{Digest, Sha256};

pub use records::{ApplyOutcome, ComponentApply, Identity, ProcessRecord, UpgradeRecord};

pub const STORE_FILE_NAME: &str = "agent.redb";
/// Most status/bootstrap events kept while control is unreachable; the oldest are dropped.
pub const OUTBOX_MAX: u64 = 256;
/// The component name under which allocation applies are recorded.
pub const COMPONENT_ALLOCATIONS: &str = "allocations";

const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
const PLAN: TableDefinition<&str, &[u8]> = TableDefinition::new("plan");
const CURSOR: TableDefinition<&str, &[u8]> = TableDefinition::new("cursor");
const APPLIED: TableDefinition<&str, &[u8]> = TableDefinition::new("applied");
const PROCESSES: TableDefinition<&str, &[u8]> = TableDefinition::new("processes");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const KEY_IDENTITY: &str = "node";
/// The self-update record (crate::upgrade), in the identity table.
const KEY_UPGRADE: &str = "upgrade";
const KEY_LAST_GOOD: &str = "last_good";
const KEY_CANDIDATE: &str = "candidate";
/// An applied plan whose new instances are not healthy yet (R4): never a boot fallback.
const KEY_PROBATION: &str = "probation";
const KEY_FEED: &str = "feed";
pub const META_LAST_SYNC_UNIX: &str = "last_sync_unix";
pub const META_OUTBOX_DROPPED: &str = "outbox_dropped";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store {path} is in use by another process (is another agent running on this data dir?)"
    )]
    Locked { path: PathBuf },
    #[error("store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: DatabaseError,
    },
    #[error("store {path}: cannot move the corrupt file aside to {moved_to}: {source}")]
    MoveAside {
        path: PathBuf,
        moved_to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Redb(#[from] redb::Error),
    #[error("store record {what} is damaged: {reason}")]
    Damaged { what: String, reason: String },
    #[error("store is closed")]
    Closed,
}

macro_rules! redb_from {
    ($($t:ty),*) => { $(impl From<$t> for StoreError { fn from(e: $t) -> Self { StoreError::Redb(e.into()) } })* };
}
redb_from!(
    redb::TransactionError,
    redb::CommitError,
    redb::StorageError,
    redb::SetDurabilityError
);

impl From<TableError> for StoreError {
    fn from(e: TableError) -> Self {
        StoreError::Redb(e.into())
    }
}

/// How the store came up, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Healthy,
    /// No store yet: a fresh one was created.
    Created,
    /// No store file, but the copies beside it (last-good plan, processes, identity) seeded a
    /// fresh one.
    CreatedFromCopies,
    /// The store file could not be used at all; the agent runs on an in-memory store seeded
    /// from the copies, and nothing new is persisted in redb.
    InMemory {
        reason: String,
        seeded_from_copy: bool,
    },
    /// The store file was unreadable; it was moved aside and a fresh one created.
    Recovered {
        moved_to: PathBuf,
        reason: String,
        seeded_from_copy: bool,
    },
}

impl std::fmt::Display for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreHealth::Healthy => f.write_str("healthy"),
            StoreHealth::Created => f.write_str("created fresh (no store before)"),
            StoreHealth::CreatedFromCopies => f.write_str(
                "recovered from last-good copy: the store file was missing; created a fresh one",
            ),
            StoreHealth::InMemory {
                reason,
                seeded_from_copy,
            } => write!(
                f,
                "store unusable ({reason}); running on an in-memory store{}; changes are not persisted",
                if *seeded_from_copy {
                    " seeded from the last-good copy"
                } else {
                    ", started empty"
                }
            ),
            StoreHealth::Recovered {
                moved_to,
                reason,
                seeded_from_copy: true,
            } => write!(
                f,
                "recovered from last-good copy: store was unreadable ({reason}); moved aside to {}",
                moved_to.display()
            ),
            StoreHealth::Recovered {
                moved_to,
                reason,
                seeded_from_copy: false,
            } => write!(
                f,
                "started empty: store was unreadable ({reason}) and no last-good copy exists; moved aside to {}",
                moved_to.display()
            ),
        }
    }
}

/// Everything the store holds, read in one transaction. Damaged records are reported, not fatal.
#[derive(Debug, Clone, Default)]
pub struct StoredState {
    pub identity: Identity,
    pub last_good: Option<Plan>,
    /// Why the last-good record could not be used, if it exists but is damaged.
    pub last_good_error: Option<String>,
    pub has_candidate: bool,
    /// The generation of an applied plan that never became last-good (R4).
    pub probation: Option<String>,
    pub cursor: Option<Cursor>,
    pub components: BTreeMap<String, ComponentApply>,
    pub processes: BTreeMap<String, ProcessRecord>,
    pub outbox_len: u64,
    pub meta: BTreeMap<String, u64>,
    /// The agent's last self-update (crate::upgrade), if any.
    pub upgrade: Option<UpgradeRecord>,
}

/// The open redb store. All access is serialized; `close` drops the database cleanly.
pub struct Store {
    path: PathBuf,
    db: Mutex<Option<Database>>,
}

pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STORE_FILE_NAME)
}

fn is_corruption(error: &DatabaseError) -> bool {
    match error {
        DatabaseError::Storage(StorageError::Corrupted(_)) => true,
        DatabaseError::Storage(StorageError::Io(e)) => {
            matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            )
        }
        DatabaseError::RepairAborted | DatabaseError::UpgradeRequired(_) => true,
        _ => false,
    }
}

pub const PROCESSES_COPY_FILE_NAME: &str = "processes.json";
pub const IDENTITY_COPY_FILE_NAME: &str = "identity.json";

pub fn identity_copy_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_COPY_FILE_NAME)
}

/// The identity kept beside the store; `None` when missing or unreadable.
pub fn read_identity_copy(data_dir: &Path) -> Option<Identity> {
    let bytes = std::fs::read(identity_copy_path(data_dir)).ok()?;
    if bytes.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

pub fn processes_copy_path(data_dir: &Path) -> PathBuf {
    data_dir.join(PROCESSES_COPY_FILE_NAME)
}

/// The process records kept beside the store; `None` when missing or unreadable.
pub fn read_processes_copy(data_dir: &Path) -> Option<Vec<ProcessRecord>> {
    let bytes = std::fs::read(processes_copy_path(data_dir)).ok()?;
    if bytes.len() > 1024 * 1024 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

fn all_processes(table: &redb::Table<&str, &[u8]>) -> Result<Vec<ProcessRecord>, StoreError> {
    let mut records = Vec::new();
    for item in table.iter()? {
        let (key, value) = item?;
        let what = format!("processes/{}", key.value());
        records.push(json_record(&what, value.value())?);
    }
    Ok(records)
}

/// Frames a plan for the store: sha256 then postcard.
fn plan_record(plan: &Plan) -> Vec<u8> {
    let payload = encode(Encoding::Postcard, plan);
    let mut bytes = Sha256::digest(&payload).to_vec();
    bytes.extend_from_slice(&payload);
    bytes
}

fn read_plan_record(what: &str, bytes: &[u8]) -> Result<Plan, StoreError> {
    let damaged = |reason: String| StoreError::Damaged {
        what: what.to_string(),
        reason,
    };
    if bytes.len() < 32 {
        return Err(damaged(format!(
            "{} bytes, shorter than its checksum",
            bytes.len()
        )));
    }
    let (sum, payload) = bytes.split_at(32);
    if Sha256::digest(payload).as_slice() != sum {
        return Err(damaged("checksum mismatch".into()));
    }
    // Also a plan written before the overlay field existed.
    outpost_proto::plan::decode_postcard_plan(payload, FRAME_MAX_BYTES, "stored plan")
        .map_err(|e| damaged(e.to_string()))
}

fn json_record<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Damaged {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn json_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Reads every table of any redb handle (read-write or read-only).
pub fn read_state<D: ReadableDatabase>(db: &D) -> Result<StoredState, StoreError> {
    let rtx = db.begin_read()?;
    let mut state = StoredState::default();
    macro_rules! table {
        ($def:expr) => {
            match rtx.open_table($def) {
                Ok(table) => Some(table),
                Err(TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            }
        };
    }
    if let Some(table) = table!(IDENTITY)
        && let Some(guard) = table.get(KEY_IDENTITY)?
    {
        state.identity = json_record("identity", guard.value())?;
    }
    if crate::upgrade::ENABLED
        && let Some(table) = table!(IDENTITY)
        && let Some(guard) = table.get(KEY_UPGRADE)?
    {
        state.upgrade = Some(json_record("upgrade", guard.value())?);
    }
    if let Some(table) = table!(PLAN) {
        if let Some(guard) = table.get(KEY_LAST_GOOD)? {
            match read_plan_record("last-good plan", guard.value()) {
                Ok(plan) => state.last_good = Some(plan),
                Err(error) => state.last_good_error = Some(error.to_string()),
            }
        }
        state.has_candidate = table.get(KEY_CANDIDATE)?.is_some();
        if let Some(guard) = table.get(KEY_PROBATION)? {
            state.probation = Some(
                read_plan_record("plan on probation", guard.value())
                    .map_or_else(|e| e.to_string(), |plan| plan.generation()),
            );
        }
    }
    if let Some(table) = table!(CURSOR)
        && let Some(guard) = table.get(KEY_FEED)?
    {
        state.cursor = postcard::from_bytes(guard.value()).ok();
    }
    if let Some(table) = table!(APPLIED) {
        for item in table.iter()? {
            let (key, value) = item?;
            let what = format!("applied/{}", key.value());
            state
                .components
                .insert(key.value().to_string(), json_record(&what, value.value())?);
        }
    }
    if let Some(table) = table!(PROCESSES) {
        for item in table.iter()? {
            let (key, value) = item?;
            let what = format!("processes/{}", key.value());
            state
                .processes
                .insert(key.value().to_string(), json_record(&what, value.value())?);
        }
    }
    if let Some(table) = table!(OUTBOX) {
        state.outbox_len = table.len()?;
    }
    if let Some(table) = table!(META) {
        for item in table.iter()? {
            let (key, value) = item?;
            state.meta.insert(key.value().to_string(), value.value());
        }
    }
    Ok(state)
}

impl Store {
    /// Opens the store for the running agent, recovering from a corrupt file (see module docs).
    pub fn open_for_boot(data_dir: &Path) -> Result<(Store, StoreHealth), StoreError> {
        match Self::open_file(data_dir) {
            Ok(opened) => Ok(opened),
            Err(StoreError::Locked { path }) => Err(StoreError::Locked { path }),
            // Unusable file (permissions, I/O errors, a read-only disk): run from memory, seeded
            // from the copies beside it, rather than not run at all.
            Err(error) => {
                let store = Store {
                    path: store_path(data_dir),
                    db: Mutex::new(Some(
                        Database::builder()
                            .create_with_backend(redb::backends::InMemoryBackend::new())
                            .map_err(|source| StoreError::Open {
                                path: store_path(data_dir),
                                source,
                            })?,
                    )),
                };
                let seeded_from_copy = store.seed_from_copies(data_dir)?;
                Ok((
                    store,
                    StoreHealth::InMemory {
                        reason: error.to_string(),
                        seeded_from_copy,
                    },
                ))
            }
        }
    }

    /// [`Store::open_for_boot`] for an agent that is starting: a store locked by another process
    /// is tried again until `wait` has passed. A predecessor killed a moment ago (a supervisor
    /// restarting the agent at once) may not be torn down yet, or a child it forked may not have
    /// reached `exec`, which closes its copy of the store's file; both let go within moments. A
    /// lock still held after `wait` is another agent on this data dir, and boot stops.
    pub fn open_for_boot_waiting(
        data_dir: &Path,
        wait: std::time::Duration,
    ) -> Result<(Store, StoreHealth), StoreError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::open_for_boot(data_dir) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other,
            }
        }
    }

    fn open_file(data_dir: &Path) -> Result<(Store, StoreHealth), StoreError> {
        let path = store_path(data_dir);
        if !path.exists() {
            let db = Self::create(&path)?;
            let store = Store {
                path,
                db: Mutex::new(Some(db)),
            };
            // A store deleted by hand still finds its plan, credential and processes.
            let seeded = store.seed_from_copies(data_dir)?;
            let health = if seeded {
                StoreHealth::CreatedFromCopies
            } else {
                StoreHealth::Created
            };
            return Ok((store, health));
        }
        match Database::builder()
            .set_check_integrity_on_open(true)
            .open(&path)
        {
            Ok(db) => Ok((
                Store {
                    path,
                    db: Mutex::new(Some(db)),
                },
                StoreHealth::Healthy,
            )),
            Err(DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Locked { path }),
            Err(error)
                if is_corruption(&error)
                    || path.metadata().map(|m| m.len() == 0).unwrap_or(false) =>
            {
                let moved_to = data_dir.join(format!(
                    "{STORE_FILE_NAME}.corrupt-{}",
                    crate::os::unix_now_secs()
                ));
                std::fs::rename(&path, &moved_to).map_err(|source| StoreError::MoveAside {
                    path: path.clone(),
                    moved_to: moved_to.clone(),
                    source,
                })?;
                let db = Self::create(&path)?;
                let store = Store {
                    path,
                    db: Mutex::new(Some(db)),
                };
                let seeded_from_copy = store.seed_from_copies(data_dir)?;
                Ok((
                    store,
                    StoreHealth::Recovered {
                        moved_to,
                        reason: error.to_string(),
                        seeded_from_copy,
                    },
                ))
            }
            Err(source) => Err(StoreError::Open { path, source }),
        }
    }

    /// Seeds an empty store from the files kept beside redb: the last-good plan, the process
    /// records and the identity. Returns whether a plan was found.
    fn seed_from_copies(&self, data_dir: &Path) -> Result<bool, StoreError> {
        let copy = last_good::read(data_dir).ok().flatten();
        let seeded_plan = copy.is_some();
        if let Some(plan) = copy {
            self.seed_last_good(&plan)?;
        }
        if let Some(records) = read_processes_copy(data_dir) {
            self.seed_processes(&records)?;
        }
        if let Some(identity) = read_identity_copy(data_dir) {
            // Into redb only: the copy is where it came from.
            self.write(|wtx| {
                wtx.open_table(IDENTITY)?
                    .insert(KEY_IDENTITY, json_bytes(&identity).as_slice())?;
                Ok(())
            })?;
        }
        Ok(seeded_plan)
    }

    /// Creates the store file, readable by the agent's user only: it holds the node credential.
    fn create(path: &Path) -> Result<Database, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let open_error = |source: DatabaseError| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = Database::builder().create(path).map_err(open_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_error(DatabaseError::Storage(StorageError::Io(e))))?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<MutexGuard<'_, Option<Database>>, StoreError> {
        let guard = self
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(guard)
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or(StoreError::Closed)?;
        let mut wtx = db.begin_write()?;
        wtx.set_durability(Durability::Immediate)?;
        let value = body(&wtx)?;
        wtx.commit()?;
        Ok(value)
    }

    pub fn state(&self) -> Result<StoredState, StoreError> {
        let guard = self.db()?;
        read_state(guard.as_ref().ok_or(StoreError::Closed)?)
    }

    /// Closes the database cleanly; later calls answer `Closed`.
    pub fn close(&self) {
        let mut guard = self
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.take();
    }

    fn seed_last_good(&self, plan: &Plan) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(PLAN)?
                .insert(KEY_LAST_GOOD, plan_record(plan).as_slice())?;
            wtx.open_table(CURSOR)?
                .insert(KEY_FEED, encode(Encoding::Postcard, &plan.as_of).as_slice())?;
            Ok(())
        })
    }

    /// Saves the self-update record (crate::upgrade), durably.
    pub fn save_upgrade(&self, record: &UpgradeRecord) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(IDENTITY)?
                .insert(KEY_UPGRADE, json_bytes(record).as_slice())?;
            Ok(())
        })
    }

    /// Saves the identity in redb and in `DIR/identity.json` (mode 0600), so a store recreated
    /// after corruption keeps the node's credential and pinned CA.
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(IDENTITY)?
                .insert(KEY_IDENTITY, json_bytes(identity).as_slice())?;
            Ok(())
        })?;
        let path = identity_copy_path(self.path.parent().unwrap_or(Path::new(".")));
        crate::os::atomic_write_with_mode(&path, &json_bytes(identity), 0o600).map_err(|e| {
            StoreError::Damaged {
                what: path.display().to_string(),
                reason: format!("cannot write: {e}"),
            }
        })
    }

    /// Writes a plan as the candidate, with its checksum.
    pub fn write_candidate(&self, plan: &Plan) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(PLAN)?
                .insert(KEY_CANDIDATE, plan_record(plan).as_slice())?;
            Ok(())
        })
    }

    /// Reads the candidate back, checking checksum, decoding and validating it.
    pub fn read_candidate(&self) -> Result<Plan, StoreError> {
        let guard = self.db()?;
        let rtx = guard.as_ref().ok_or(StoreError::Closed)?.begin_read()?;
        let table = rtx.open_table(PLAN)?;
        let guard = table
            .get(KEY_CANDIDATE)?
            .ok_or_else(|| StoreError::Damaged {
                what: "candidate plan".into(),
                reason: "missing".into(),
            })?;
        read_plan_record("candidate plan", guard.value())
    }

    pub fn discard_candidate(&self) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(PLAN)?.remove(KEY_CANDIDATE)?;
            Ok(())
        })
    }

    /// Promotes the candidate to last-good and saves its cursor, the component generation and the
    /// sync time, all in one transaction. A plan on probation is superseded.
    pub fn promote_candidate(&self, apply: &ComponentApply) -> Result<Plan, StoreError> {
        self.take_candidate(KEY_LAST_GOOD, apply)
    }

    /// Moves the applied candidate to probation (R4): recorded as applied, but the last-good
    /// plan and its cursor stay the boot fallback until [`Store::promote_probation`].
    pub fn hold_candidate(&self, apply: &ComponentApply) -> Result<Plan, StoreError> {
        self.take_candidate(KEY_PROBATION, apply)
    }

    fn take_candidate(&self, key: &str, apply: &ComponentApply) -> Result<Plan, StoreError> {
        self.write(|wtx| {
            let mut plans = wtx.open_table(PLAN)?;
            let bytes = plans
                .remove(KEY_CANDIDATE)?
                .map(|guard| guard.value().to_vec())
                .ok_or_else(|| StoreError::Damaged {
                    what: "candidate plan".into(),
                    reason: "missing".into(),
                })?;
            let plan = read_plan_record("candidate plan", &bytes)?;
            plans.remove(KEY_PROBATION)?;
            plans.insert(key, bytes.as_slice())?;
            if key == KEY_LAST_GOOD {
                wtx.open_table(CURSOR)?
                    .insert(KEY_FEED, encode(Encoding::Postcard, &plan.as_of).as_slice())?;
            }
            wtx.open_table(APPLIED)?
                .insert(COMPONENT_ALLOCATIONS, json_bytes(apply).as_slice())?;
            wtx.open_table(META)?
                .insert(META_LAST_SYNC_UNIX, apply.at_unix)?;
            Ok(plan)
        })
    }

    /// Makes the plan on probation last-good, with its cursor, if it is still of `generation`;
    /// `None` when it is not (a newer plan replaced it).
    pub fn promote_probation(&self, generation: &str) -> Result<Option<Plan>, StoreError> {
        self.write(|wtx| {
            let mut plans = wtx.open_table(PLAN)?;
            let Some(bytes) = plans.get(KEY_PROBATION)?.map(|g| g.value().to_vec()) else {
                return Ok(None);
            };
            let plan = read_plan_record("plan on probation", &bytes)?;
            if plan.generation() != generation {
                return Ok(None);
            }
            plans.remove(KEY_PROBATION)?;
            plans.insert(KEY_LAST_GOOD, bytes.as_slice())?;
            wtx.open_table(CURSOR)?
                .insert(KEY_FEED, encode(Encoding::Postcard, &plan.as_of).as_slice())?;
            Ok(Some(plan))
        })
    }

    /// Drops the plan on probation (boot runs the last-good plan instead).
    pub fn discard_probation(&self) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(PLAN)?.remove(KEY_PROBATION)?;
            Ok(())
        })
    }

    pub fn record_component(
        &self,
        component: &str,
        apply: &ComponentApply,
    ) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(APPLIED)?
                .insert(component, json_bytes(apply).as_slice())?;
            Ok(())
        })
    }

    pub fn set_meta(&self, key: &str, value: u64) -> Result<(), StoreError> {
        self.write(|wtx| {
            wtx.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    /// Records a started process, in redb and in the copy beside it.
    pub fn save_process(&self, record: &ProcessRecord) -> Result<(), StoreError> {
        self.save_processes(std::slice::from_ref(record))
    }

    /// Records several processes in one transaction (and one rewrite of the copy): the
    /// supervisor records every start of a round at once, so a boot that starts N workloads
    /// pays for one durable commit, not N.
    pub fn save_processes(&self, records: &[ProcessRecord]) -> Result<(), StoreError> {
        let all = self.write(|wtx| {
            let mut table = wtx.open_table(PROCESSES)?;
            for record in records {
                table.insert(record.allocation_id.as_str(), json_bytes(record).as_slice())?;
            }
            all_processes(&table)
        })?;
        self.mirror_processes(&all)
    }

    pub fn remove_process(&self, allocation_id: &str) -> Result<(), StoreError> {
        self.remove_processes(&[allocation_id])
    }

    /// Forgets several processes in one transaction (the dead ones found at boot).
    pub fn remove_processes(&self, allocation_ids: &[&str]) -> Result<(), StoreError> {
        let all = self.write(|wtx| {
            let mut table = wtx.open_table(PROCESSES)?;
            for allocation_id in allocation_ids {
                table.remove(*allocation_id)?;
            }
            all_processes(&table)
        })?;
        self.mirror_processes(&all)
    }

    /// Keeps `DIR/processes.json` equal to the processes table, so a store recreated after
    /// corruption still adopts the running workloads instead of starting twins.
    fn mirror_processes(&self, all: &[ProcessRecord]) -> Result<(), StoreError> {
        let path = processes_copy_path(self.path.parent().unwrap_or(Path::new(".")));
        crate::os::atomic_write(&path, &json_bytes(&all)).map_err(|e| StoreError::Damaged {
            what: path.display().to_string(),
            reason: format!("cannot write: {e}"),
        })
    }

    fn seed_processes(&self, records: &[ProcessRecord]) -> Result<(), StoreError> {
        self.write(|wtx| {
            let mut table = wtx.open_table(PROCESSES)?;
            for record in records {
                table.insert(record.allocation_id.as_str(), json_bytes(record).as_slice())?;
            }
            Ok(())
        })
    }

    /// Queues an event for control. Keeps at most [`OUTBOX_MAX`]; the oldest are dropped and
    /// counted under `outbox_dropped`.
    pub fn push_outbox(&self, event: &BootstrapEvent) -> Result<(), StoreError> {
        self.write(|wtx| {
            let mut outbox = wtx.open_table(OUTBOX)?;
            let next = outbox.last()?.map(|(key, _)| key.value() + 1).unwrap_or(1);
            outbox.insert(next, json_bytes(event).as_slice())?;
            let mut dropped = 0;
            while outbox.len()? > OUTBOX_MAX {
                if outbox.pop_first()?.is_none() {
                    break;
                }
                dropped += 1;
            }
            drop(outbox);
            if dropped > 0 {
                let mut meta = wtx.open_table(META)?;
                let before = meta
                    .get(META_OUTBOX_DROPPED)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                meta.insert(META_OUTBOX_DROPPED, before + dropped)?;
            }
            Ok(())
        })
    }

    /// The oldest `limit` queued events with their keys. Damaged entries are skipped (and removed
    /// by the next `remove_outbox_through`).
    pub fn peek_outbox(&self, limit: usize) -> Result<Vec<(u64, BootstrapEvent)>, StoreError> {
        let guard = self.db()?;
        let rtx = guard.as_ref().ok_or(StoreError::Closed)?.begin_read()?;
        let table = match rtx.open_table(OUTBOX) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut events = Vec::new();
        for item in table.iter()?.take(limit) {
            let (key, value) = item?;
            if let Ok(event) = serde_json::from_slice(value.value()) {
                events.push((key.value(), event));
            }
        }
        Ok(events)
    }

    /// Removes queued events up to and including `key` (after control accepted them).
    pub fn remove_outbox_through(&self, key: u64) -> Result<(), StoreError> {
        self.write(|wtx| {
            let mut outbox = wtx.open_table(OUTBOX)?;
            outbox.retain(|k, _| k > key)?;
            Ok(())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use outpost_proto::Name;
    use outpost_proto::bootstrap::BootstrapStepStatus;
    use outpost_proto::plan::Allocation;
    use outpost_proto::service::{RestartPolicy, ServiceSpec};

    pub(crate) fn sample_allocation(id: &str, wave: u32) -> Allocation {
        Allocation {
            id: Name::try_from(id).unwrap(),
            node_id: Name::try_from("n1").unwrap(),
            service: Name::try_from("web").unwrap(),
            seq: 1,
            spec: ServiceSpec {
                name: Name::try_from("web").unwrap(),
                process_type: Name::try_from("web").unwrap(),
                command: "/bin/sleep".into(),
                args: vec!["3600".into()],
                env: Default::default(),
                replicas: outpost_proto::service::Replicas::Count(1),
                memory_bytes: 0,
                cpu_millis: 0,
                wave,
                readiness: None,
                restart: RestartPolicy::Always,
                stop_grace_ms: 1000,
                working_dir: None,
                ports: Vec::new(),
                selector: Default::default(),
                reschedule: Default::default(),
                reschedule_after_secs: None,
                artifact: None,
                rollout: None,
                secrets: Vec::new(),
            },
        }
    }

    pub(crate) fn sample_plan(allocations: usize) -> Plan {
        let mut plan = Plan::empty(Name::try_from("n1").unwrap());
        plan.as_of = Cursor::new(7, 40 + allocations as u64);
        plan.allocations = (0..allocations)
            .map(|i| sample_allocation(&format!("web-{i}"), 0))
            .collect();
        plan
    }

    fn apply_ok(plan: &Plan) -> ComponentApply {
        ComponentApply {
            generation: plan.generation(),
            status: ApplyOutcome::Ok,
            message: String::new(),
            at_unix: 5,
        }
    }

    #[test]
    fn candidate_promotion_saves_plan_cursor_and_generation_together() {
        let dir = tempfile::tempdir().unwrap();
        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        assert_eq!(health, StoreHealth::Created);
        let plan = sample_plan(2);
        store.write_candidate(&plan).unwrap();
        assert_eq!(store.read_candidate().unwrap(), plan);
        assert!(store.state().unwrap().last_good.is_none());
        store.promote_candidate(&apply_ok(&plan)).unwrap();
        store.close();

        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        assert_eq!(health, StoreHealth::Healthy);
        let state = store.state().unwrap();
        assert_eq!(state.last_good, Some(plan.clone()));
        assert_eq!(state.cursor, Some(plan.as_of));
        assert!(!state.has_candidate);
        assert_eq!(
            state.components[COMPONENT_ALLOCATIONS].generation,
            plan.generation()
        );
        assert_eq!(state.meta[META_LAST_SYNC_UNIX], 5);
    }

    #[test]
    fn second_opener_is_told_the_store_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = Store::open_for_boot(dir.path()).unwrap();
        assert!(matches!(
            Store::open_for_boot(dir.path()),
            Err(StoreError::Locked { .. })
        ));
    }

    #[test]
    fn a_booting_agent_waits_a_moment_for_a_predecessor_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let (held, _) = Store::open_for_boot(dir.path()).unwrap();
        // Held throughout: refused once the wait is over.
        assert!(matches!(
            Store::open_for_boot_waiting(dir.path(), std::time::Duration::from_millis(100)),
            Err(StoreError::Locked { .. })
        ));
        // Let go while the next agent waits: it opens the store.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            drop(held);
        });
        let (_store, health) =
            Store::open_for_boot_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        assert!(matches!(health, StoreHealth::Healthy), "{health:?}");
        releaser.join().unwrap();
    }

    /// Flips the bytes of every stored copy of `needle`: a damaged data page, header intact.
    fn corrupt_data_page(path: &Path, needle: &[u8]) {
        let mut bytes = std::fs::read(path).unwrap();
        let mut hits = 0;
        let mut at = 0;
        while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
            for byte in &mut bytes[at + found..at + found + needle.len()] {
                *byte ^= 0xa5;
            }
            hits += 1;
            at += found + needle.len();
        }
        assert!(hits > 0, "needle not found in the store file");
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn corrupt_store_is_moved_aside_and_seeded_from_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(3);
        {
            let (store, _) = Store::open_for_boot(dir.path()).unwrap();
            store.write_candidate(&plan).unwrap();
            store.promote_candidate(&apply_ok(&plan)).unwrap();
            last_good::write(dir.path(), &plan).unwrap();
            store
                .save_process(&ProcessRecord {
                    allocation_id: "web-0".into(),
                    pid: 42,
                    start_ticks: 7,
                    spec_hash: "h".into(),
                    restarts: 0,
                    ports: Default::default(),
                })
                .unwrap();
            store
                .save_identity(&Identity {
                    node_id: Some("n1".into()),
                    node_credential: Some("opn.n1.secret".into()),
                    ..Default::default()
                })
                .unwrap();
            store.close();
        }
        corrupt_data_page(&store_path(dir.path()), b"/bin/sleep");
        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        let StoreHealth::Recovered {
            moved_to,
            seeded_from_copy,
            ..
        } = &health
        else {
            panic!("{health:?}")
        };
        assert!(*seeded_from_copy);
        assert!(moved_to.exists(), "the corrupt file is kept for forensics");
        assert!(
            health
                .to_string()
                .starts_with("recovered from last-good copy")
        );
        let state = store.state().unwrap();
        assert_eq!(state.last_good, Some(plan.clone()));
        assert_eq!(state.cursor, Some(plan.as_of));
        assert_eq!(
            state.processes["web-0"].pid, 42,
            "process records come back from their copy"
        );
    }

    #[test]
    fn deleted_store_is_recreated_from_the_copies() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(1);
        {
            let (store, _) = Store::open_for_boot(dir.path()).unwrap();
            store
                .save_identity(&Identity {
                    node_id: Some("n1".into()),
                    ..Default::default()
                })
                .unwrap();
            store.close();
        }
        last_good::write(dir.path(), &plan).unwrap();
        std::fs::remove_file(store_path(dir.path())).unwrap();
        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        assert_eq!(health, StoreHealth::CreatedFromCopies);
        let state = store.state().unwrap();
        assert_eq!(state.last_good, Some(plan));
        assert_eq!(state.identity.node_id.as_deref(), Some("n1"));
    }

    #[test]
    fn unusable_store_file_runs_in_memory_from_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let plan = sample_plan(1);
        last_good::write(dir.path(), &plan).unwrap();
        // A folder where the file should be: neither openable nor movable as a database.
        std::fs::create_dir(store_path(dir.path())).unwrap();
        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        assert!(
            matches!(
                health,
                StoreHealth::InMemory {
                    seeded_from_copy: true,
                    ..
                }
            ),
            "{health:?}"
        );
        assert!(health.to_string().contains("in-memory"));
        assert_eq!(store.state().unwrap().last_good, Some(plan));
    }

    #[test]
    fn garbage_store_without_copy_starts_empty_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(store_path(dir.path()), b"not a database at all").unwrap();
        let (store, health) = Store::open_for_boot(dir.path()).unwrap();
        assert!(matches!(
            health,
            StoreHealth::Recovered {
                seeded_from_copy: false,
                ..
            }
        ));
        assert!(health.to_string().starts_with("started empty"));
        assert!(store.state().unwrap().last_good.is_none());
    }

    #[test]
    fn outbox_keeps_the_newest_entries_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_for_boot(dir.path()).unwrap();
        let event = |i: u64| BootstrapEvent {
            node_id: Name::try_from("n1").unwrap(),
            component: "allocations".into(),
            action: "apply".into(),
            status: BootstrapStepStatus::Ok,
            message: Some(format!("event {i}")),
            generation: None,
        };
        for i in 0..OUTBOX_MAX + 10 {
            store.push_outbox(&event(i)).unwrap();
        }
        let state = store.state().unwrap();
        assert_eq!(state.outbox_len, OUTBOX_MAX);
        assert_eq!(state.meta[META_OUTBOX_DROPPED], 10);
        let oldest = store.peek_outbox(2).unwrap();
        assert_eq!(oldest[0].1.message.as_deref(), Some("event 10"));
        store.remove_outbox_through(oldest[1].0).unwrap();
        assert_eq!(store.state().unwrap().outbox_len, OUTBOX_MAX - 2);
        assert_eq!(
            store.peek_outbox(1).unwrap()[0].1.message.as_deref(),
            Some("event 12")
        );
    }

    #[test]
    fn process_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_for_boot(dir.path()).unwrap();
        let record = ProcessRecord {
            allocation_id: "web-0".into(),
            pid: 42,
            start_ticks: 7,
            spec_hash: "h".into(),
            restarts: 1,
            ports: Default::default(),
        };
        store.save_process(&record).unwrap();
        assert_eq!(store.state().unwrap().processes["web-0"], record);
        store.remove_process("web-0").unwrap();
        assert!(store.state().unwrap().processes.is_empty());
    }
}
