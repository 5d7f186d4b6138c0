//! Signed self-update (U2). Control names a signed agent binary in a heartbeat answer; the
//! agent checks the signature with the release key it pinned at enrollment, fetches the binary
//! through its artifact cache (sha256-checked), checks it is an ELF for this architecture,
//! writes it to the inactive of two slots under `DATA_DIR/agent/` and execs it (same pid, so
//! workloads keep running and the new binary adopts them as after any restart). The new binary
//! is on trial until it has registered and a heartbeat got through; then it commits (the stable
//! link `DATA_DIR/agent/current`, which the service manager starts, points at its slot). A
//! binary not healthy by its deadline execs the previous one; one that keeps stopping is caught
//! by the boot counter: the service manager starts `current` (still the previous binary), which
//! retries the new one at most [`MAX_BOOTS`] times in all and then stays, rolled back.
//!
//! The signature is checked with ring, which rustls already links into the agent (no new
//! crate). The whole of it is behind the cargo feature `upgrade` (see [`ENABLED`]), on by
//! default (its size is in docs/footprint.md).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use outpost_proto::release::{
    AgentBuild, AgentUpgrade, UpgradeReport, UpgradeState, signed_message,
};

use crate::artifact::{ArtifactCache, sha256_of_file};
use crate::store::{Store, UpgradeRecord};

/// Whether this build updates itself (cargo feature `upgrade`). Without it the agent reports its
/// version and refuses upgrades with [`DISABLED`]; the code below is then unreachable and left
/// out of the binary.
pub const ENABLED: bool = cfg!(feature = "upgrade");
/// What a build without self-update answers an upgrade with.
pub const DISABLED: &str = "this agent was built without self-update (cargo feature `upgrade` off)";

/// Under the data dir: the two slots and the stable link.
pub const SLOTS_DIR: &str = "agent";
/// The stable link the service manager starts (`DATA_DIR/agent/current`).
pub const CURRENT_LINK: &str = "current";
const SLOT_NAMES: [&str; 2] = ["slot-a", "slot-b"];
/// Starts of the new binary allowed before it reports healthy.
pub const MAX_BOOTS: u32 = 2;
/// How long a new binary has to register and get a heartbeat through
/// (`OUTPOST_UPGRADE_DEADLINE_SECS` overrides it).
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(120);

/// The version this binary reports: the crate version, and the build marker
/// (`OUTPOST_AGENT_BUILD_MARKER` at build time) when there is one.
pub fn version() -> String {
    match option_env!("OUTPOST_AGENT_BUILD_MARKER") {
        Some(marker) if !marker.is_empty() => format!("{}+{marker}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// A fault for the fleet test of the health deadline (tests/tests/agent_upgrade.rs), compiled
/// in only when `OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY` is set at build time: the binary boots
/// and adopts its workloads but never starts talking to control, so it never reports healthy —
/// the stand-in for a new binary that hangs. Always false in a normal build (the code it guards
/// is then left out).
pub const TEST_FAULT_NEVER_HEALTHY: bool =
    option_env!("OUTPOST_AGENT_TEST_FAULT_NEVER_HEALTHY").is_some();

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "no release public key is pinned (control had no --release-public-key when this node enrolled); agent binaries cannot be verified"
    )]
    NoKey,
    #[error("the pinned release public key {value:?} is not 32 bytes of base64")]
    BadKey { value: String },
    #[error(
        "artifact {sha256}: the release signature does not verify with the pinned key ({reason})"
    )]
    BadSignature { sha256: String, reason: String },
    #[error("{what}: {reason}")]
    Fetch { what: &'static str, reason: String },
    #[error("the binary hashes to {found}, not {expected}")]
    HashMismatch { expected: String, found: String },
    #[error("the binary is not a little-endian ELF executable")]
    NotElf,
    #[error("the binary is for ELF machine {found}, this agent runs on {expected} ({arch})")]
    OtherArch {
        found: u16,
        expected: u16,
        arch: &'static str,
    },
    #[error("slot {path}: {reason}")]
    Slot { path: String, reason: String },
}

/// Checks the release signature of `sha256` with the pinned key (both base64).
pub fn verify_signature(
    public_key: &str,
    sha256: &str,
    signature: &str,
) -> Result<(), UpgradeError> {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(public_key.trim())
        .ok()
        .filter(|k| k.len() == outpost_proto::release::RELEASE_PUBLIC_KEY_BYTES)
        .ok_or_else(|| UpgradeError::BadKey {
            value: public_key.chars().take(60).collect(),
        })?;
    let bad = |reason: &str| UpgradeError::BadSignature {
        sha256: sha256.to_string(),
        reason: reason.to_string(),
    };
    let signature = engine
        .decode(signature.trim())
        .map_err(|_| bad("the signature is not base64"))?;
    if signature.len() != outpost_proto::release::RELEASE_SIGNATURE_BYTES {
        return Err(bad("the signature is not 64 bytes"));
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
        .verify(&signed_message(sha256), &signature)
        .map_err(|_| bad("wrong key or altered"))
}

/// The ELF machine of this build.
fn own_machine() -> (u16, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => (62, "x86_64"),
        "aarch64" => (183, "aarch64"),
        "arm" => (40, "arm"),
        "x86" => (3, "x86"),
        other => (0, other),
    }
}

/// Checks that `head` (the first bytes of a binary) is a little-endian ELF for this
/// architecture.
pub fn check_elf(head: &[u8]) -> Result<(), UpgradeError> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" || head[5] != 1 {
        return Err(UpgradeError::NotElf);
    }
    let found = u16::from_le_bytes([head[18], head[19]]);
    let (expected, arch) = own_machine();
    if found != expected {
        return Err(UpgradeError::OtherArch {
            found,
            expected,
            arch,
        });
    }
    Ok(())
}

fn slot_error(path: &Path, reason: impl std::fmt::Display) -> UpgradeError {
    UpgradeError::Slot {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The two slots and the stable link under `DATA_DIR/agent/`.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(SLOTS_DIR),
        }
    }

    pub fn current_link(&self) -> PathBuf {
        self.dir.join(CURRENT_LINK)
    }

    /// The slot the running binary (`running`) is not in.
    pub fn inactive(&self, running: &Path) -> PathBuf {
        let first = self.dir.join(SLOT_NAMES[0]);
        if same_file(running, &first) {
            self.dir.join(SLOT_NAMES[1])
        } else {
            first
        }
    }

    /// Writes `bytes` to `slot` (0755, synced, renamed into place).
    pub fn write(&self, slot: &Path, bytes: &[u8]) -> Result<(), UpgradeError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.dir).map_err(|e| slot_error(&self.dir, e))?;
        let temporary = slot.with_extension("new");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&temporary)
            .map_err(|e| slot_error(&temporary, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| slot_error(&temporary, e))?;
        drop(file);
        std::fs::rename(&temporary, slot).map_err(|e| slot_error(slot, e))
    }

    /// Points the stable link at `target` (atomically: a new link renamed over the old).
    pub fn point_current(&self, target: &Path) -> Result<(), UpgradeError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| slot_error(&self.dir, e))?;
        let link = self.current_link();
        let temporary = self.dir.join("current.new");
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(target, &temporary).map_err(|e| slot_error(&temporary, e))?;
        std::fs::rename(&temporary, &link).map_err(|e| slot_error(&link, e))
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn running_binary() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Checks that the binary in `slot` still hashes to `sha256` and is for this architecture.
pub fn check_slot(slot: &Path, sha256: &str) -> Result<(), UpgradeError> {
    let found = sha256_of_file(slot).map_err(|e| slot_error(slot, e))?;
    if found != sha256 {
        return Err(slot_error(
            slot,
            format!("corrupted: it hashes to {found}, not {sha256}"),
        ));
    }
    let mut head = [0u8; 20];
    let read = std::io::Read::read(
        &mut std::fs::File::open(slot).map_err(|e| slot_error(slot, e))?,
        &mut head,
    )
    .map_err(|e| slot_error(slot, e))?;
    check_elf(&head[..read])
}

/// Verifies `binary` (already fetched) for `upgrade` with `public_key` and writes it to the
/// inactive slot; returns the slot. Nothing changes when any check fails.
pub fn stage(
    slots: &Slots,
    public_key: Option<&str>,
    upgrade: &AgentUpgrade,
    binary: &Path,
) -> Result<PathBuf, UpgradeError> {
    verify_signature(
        public_key.ok_or(UpgradeError::NoKey)?,
        &upgrade.sha256,
        &upgrade.signature,
    )?;
    let bytes = std::fs::read(binary).map_err(|e| UpgradeError::Fetch {
        what: "cannot read the fetched binary",
        reason: format!("{}: {e}", binary.display()),
    })?;
    let found = outpost_proto::hash::sha256_hex(&bytes);
    if found != upgrade.sha256 {
        return Err(UpgradeError::HashMismatch {
            expected: upgrade.sha256.clone(),
            found,
        });
    }
    check_elf(&bytes)?;
    let slot = slots.inactive(&running_binary());
    slots.write(&slot, &bytes)?;
    check_slot(&slot, &upgrade.sha256)?;
    Ok(slot)
}

/// Replaces this process with `binary`, with the same arguments; returns only on failure.
fn exec(binary: &Path) -> std::io::Error {
    eprintln!("outpost-agent: switching to {}", binary.display());
    std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec()
}

fn now_unix() -> u64 {
    crate::os::unix_now_secs()
}

fn deadline() -> Duration {
    std::env::var("OUTPOST_UPGRADE_DEADLINE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(HEALTH_DEADLINE, Duration::from_secs)
}

/// The agent's self-update state: the record (as stored) and whether an attempt is under way.
#[derive(Debug, Default)]
pub struct Upgrades {
    record: Mutex<Option<UpgradeRecord>>,
    busy: AtomicBool,
}

impl Upgrades {
    pub fn new(record: Option<UpgradeRecord>) -> Self {
        Self {
            record: Mutex::new(record),
            busy: AtomicBool::new(false),
        }
    }

    pub fn record(&self) -> Option<UpgradeRecord> {
        crate::node::lock(&self.record).clone()
    }

    fn save(&self, store: &Store, record: UpgradeRecord) {
        if let Err(error) = store.save_upgrade(&record) {
            eprintln!("outpost-agent: cannot store the upgrade record: {error}");
        }
        *crate::node::lock(&self.record) = Some(record);
    }

    /// What this node reports about its binary.
    pub fn build(&self) -> AgentBuild {
        let record = self.record();
        let running = running_binary();
        AgentBuild {
            version: version(),
            sha256: record.as_ref().and_then(|r| {
                if r.state == UpgradeState::Committed && same_file(&running, &r.target_path) {
                    Some(r.target_sha256.clone())
                } else if same_file(&running, &r.previous_path) {
                    r.previous_sha256.clone()
                } else {
                    None
                }
            }),
            upgrade: record.as_ref().map(report),
        }
    }

    /// After a delivered heartbeat: a binary on trial has registered and reported, so it
    /// commits (becomes what `current` starts). Returns whether anything changed.
    pub fn commit_if_on_trial(&self, store: &Store, data_dir: &Path) -> bool {
        let Some(mut record) = self.record().filter(|_| ENABLED) else {
            return false;
        };
        if record.state != UpgradeState::Trying
            || !same_file(&running_binary(), &record.target_path)
        {
            return false;
        }
        if let Err(error) = Slots::new(data_dir).point_current(&record.target_path) {
            eprintln!("outpost-agent: cannot point the stable link at the new binary: {error}");
            return false;
        }
        record.state = UpgradeState::Committed;
        record.message.clear();
        self.save(store, record);
        eprintln!(
            "outpost-agent: upgrade committed; {} is the agent now",
            version()
        );
        true
    }

    /// Control asks for `upgrade`: unless this binary already is it, or an attempt at it failed
    /// (it is not retried), or one is under way, run `attempt` on its own thread. `attempt`
    /// fetches the binary and returns its path in the cache.
    pub fn request(
        self: &std::sync::Arc<Self>,
        store: std::sync::Arc<Store>,
        data_dir: PathBuf,
        public_key: Option<String>,
        upgrade: AgentUpgrade,
        fetch: impl FnOnce(&str) -> Result<PathBuf, String> + Send + 'static,
        changed: impl Fn() + Send + 'static,
    ) {
        if !ENABLED {
            // Said once, kept in memory only: control's upgrade halts on it.
            if self
                .record()
                .is_none_or(|r| r.target_sha256 != upgrade.sha256)
            {
                *crate::node::lock(&self.record) = Some(UpgradeRecord {
                    target_sha256: upgrade.sha256,
                    target_path: PathBuf::new(),
                    previous_path: running_binary(),
                    previous_sha256: None,
                    state: UpgradeState::Refused,
                    message: DISABLED.into(),
                    boots: 0,
                    deadline_unix: 0,
                });
                changed();
            }
            return;
        }
        if self
            .record()
            .is_some_and(|r| r.target_sha256 == upgrade.sha256)
            || self.busy.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let upgrades = self.clone();
        let previous_sha256 = self.build().sha256;
        let spawned = std::thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || {
                let slots = Slots::new(&data_dir);
                // The signature first: an unsigned binary is not even downloaded.
                let staged = verify_signature(
                    public_key.as_deref().unwrap_or_default(),
                    &upgrade.sha256,
                    &upgrade.signature,
                )
                .map_err(|error| match public_key {
                    None => UpgradeError::NoKey,
                    Some(_) => error,
                })
                .and_then(|()| {
                    fetch(&upgrade.sha256).map_err(|reason| UpgradeError::Fetch {
                        what: "cannot fetch the binary",
                        reason,
                    })
                })
                .and_then(|binary| stage(&slots, public_key.as_deref(), &upgrade, &binary));
                let mut record = UpgradeRecord {
                    target_sha256: upgrade.sha256.clone(),
                    target_path: PathBuf::new(),
                    previous_path: running_binary(),
                    previous_sha256,
                    state: UpgradeState::Refused,
                    message: String::new(),
                    boots: 1,
                    deadline_unix: now_unix() + deadline().as_secs(),
                };
                match staged {
                    Err(error) => {
                        eprintln!("outpost-agent: agent upgrade refused: {error}");
                        record.message = error.to_string();
                        upgrades.save(&store, record);
                    }
                    Ok(slot) => {
                        record.target_path = slot.clone();
                        record.state = UpgradeState::Trying;
                        upgrades.save(&store, record.clone());
                        let error = exec(&slot);
                        record.state = UpgradeState::RolledBack;
                        record.message = format!("cannot start {}: {error}", slot.display());
                        upgrades.save(&store, record);
                    }
                }
                upgrades.busy.store(false, Ordering::SeqCst);
                changed();
            });
        if spawned.is_err() {
            self.busy.store(false, Ordering::SeqCst);
        }
    }

    /// On a binary on trial: when the deadline passes before it commits, go back to the
    /// previous binary.
    pub fn spawn_deadline(self: &std::sync::Arc<Self>, store: std::sync::Arc<Store>) {
        let Some(record) = self.record().filter(|_| ENABLED) else {
            return;
        };
        if record.state != UpgradeState::Trying
            || !same_file(&running_binary(), &record.target_path)
        {
            return;
        }
        let upgrades = self.clone();
        let _ = std::thread::Builder::new()
            .name("upgrade-deadline".into())
            .spawn(move || {
                while now_unix() < record.deadline_unix {
                    std::thread::sleep(Duration::from_millis(500));
                    if upgrades
                        .record()
                        .is_none_or(|r| r.state != UpgradeState::Trying)
                    {
                        return;
                    }
                }
                let mut record = record;
                record.state = UpgradeState::RolledBack;
                record.message = format!(
                    "the new binary did not register and report healthy within {} s; back on {}",
                    deadline().as_secs(),
                    record.previous_path.display()
                );
                eprintln!("outpost-agent: {}", record.message);
                let previous = record.previous_path.clone();
                upgrades.save(&store, record);
                let error = exec(&previous);
                eprintln!("outpost-agent: cannot start the previous binary: {error}");
            });
    }
}

/// A record for status: `STATE to SHA (why)`.
pub fn describe(record: &UpgradeRecord) -> String {
    let mut text = format!(
        "{} to {}",
        record.state.as_str(),
        record
            .target_sha256
            .get(..12)
            .unwrap_or(&record.target_sha256)
    );
    if !record.message.is_empty() {
        text.push_str(&format!(" ({})", record.message));
    }
    text
}

/// The report of a record, for control.
pub fn report(record: &UpgradeRecord) -> UpgradeReport {
    UpgradeReport {
        target_sha256: record.target_sha256.clone(),
        state: record.state,
        message: record.message.clone(),
    }
}

/// Right after the store opens at boot, before anything is adopted or started. When a new
/// binary is on trial and this is not it, the new one stopped before it reported healthy (the
/// service manager started `current`, the previous binary, again): retry it while the boot
/// counter allows, else stay and say it was rolled back. Also makes sure the stable link
/// exists. Returns the record as it now is.
pub fn at_boot(
    store: &Store,
    data_dir: &Path,
    record: Option<UpgradeRecord>,
) -> Option<UpgradeRecord> {
    if !ENABLED {
        return record;
    }
    let slots = Slots::new(data_dir);
    if std::fs::symlink_metadata(slots.current_link()).is_err()
        && let Err(error) = slots.point_current(&running_binary())
    {
        eprintln!("outpost-agent: {error}");
    }
    let mut record = record?;
    let running = running_binary();
    if record.state != UpgradeState::Trying || same_file(&running, &record.target_path) {
        return Some(record);
    }
    let check = check_slot(&record.target_path, &record.target_sha256);
    match check {
        // Another binary than the one the trial started from (an operator installed one):
        // the trial is over, and it is not retried.
        _ if !same_file(&running, &record.previous_path) => {
            record.message = format!(
                "{} was started while the new binary was on trial; the trial ended",
                running.display()
            );
        }
        Ok(()) if record.boots < MAX_BOOTS => {
            record.boots += 1;
            if store.save_upgrade(&record).is_ok() {
                store.close();
                let error = exec(&record.target_path);
                record.message = format!("cannot start {}: {error}", record.target_path.display());
            } else {
                record.message = "cannot store the boot counter".into();
            }
        }
        Ok(()) => {
            record.message = format!(
                "the new binary stopped {} times before it reported healthy; back on {}",
                record.boots,
                running_binary().display()
            );
        }
        Err(error) => record.message = format!("{error}; back on the previous binary"),
    }
    record.state = UpgradeState::RolledBack;
    eprintln!(
        "outpost-agent: agent upgrade rolled back: {}",
        record.message
    );
    let _ = store.save_upgrade(&record);
    Some(record)
}

/// The fetch an upgrade uses: the artifact cache over the current session.
pub fn fetch_through_cache(
    data_dir: &Path,
    client: &crate::link::client::ControlClient,
    sha256: &str,
) -> Result<PathBuf, String> {
    let cache = ArtifactCache::new(data_dir);
    crate::artifact::fetch::ensure(&cache, client, sha256).map_err(|e| e.to_string())?;
    cache.verify(sha256).map_err(|e| e.to_string())?;
    let file = cache
        .dir(sha256)
        .join(crate::artifact::unpack::SINGLE_FILE_NAME);
    if !file.is_file() {
        return Err("the artifact is an archive, not a single binary".into());
    }
    Ok(file)
}

#[cfg(all(test, feature = "upgrade"))]
#[allow(clippy::unwrap_used)]
mod tests;
