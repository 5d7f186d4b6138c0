//! The projector: a task that follows the log and applies new events to the views, publishes
//! the checkpoint it reached, wakes the scheduler, and saves snapshots now and then.
//!
//! It runs apart from the append, so read-your-writes is real: a command that needs its own
//! write in the views waits for the checkpoint (P3). A test hook pauses it.
//!
//! Saving a snapshot never pauses the projector or the API: the views are held copy-on-write
//! (`Arc`), a save takes a reference under the read lock (no copy), and serializes and writes
//! it on a blocking thread the projector does not wait for. A batch applied while a save still
//! holds its reference copies the views' top level once; the maps that grow with the fleet are
//! persistent, so that copy shares them and changing them copies only the paths changed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::{ProjectionError, VIEWS_PROJECTION, Views};
use crate::log::Event;
use crate::store::Store;

/// Events read from the log per step.
const BATCH_EVENTS: usize = 1000;
/// A snapshot is saved at most this often while events flow.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);
/// And at most once per this many times the last save took: a save serializes the whole
/// views, so on a big fleet it is spaced out to stay a small share of the CPU (5 % here).
const SNAPSHOT_SPACING_FACTOR: u32 = 20;

/// Read access to the views (see [`Projector::views`]).
pub struct ViewsGuard<'a>(RwLockReadGuard<'a, Arc<Views>>);

impl std::ops::Deref for ViewsGuard<'_> {
    type Target = Views;

    fn deref(&self) -> &Views {
        &self.0
    }
}

pub struct Projector {
    views: RwLock<Arc<Views>>,
    /// A snapshot save is under way (at most one at a time).
    saving: Arc<AtomicBool>,
    /// How long the last snapshot save took, in microseconds.
    last_save_micros: AtomicU64,
    /// Size of the last snapshot, to size the next one's buffer in one allocation.
    last_snapshot_bytes: AtomicUsize,
    checkpoint: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    /// Woken when an applied batch touched what the scheduler reads.
    pub scheduling: Notify,
    last_error: RwLock<Option<String>>,
    /// Commit → applied latency of events committed since this process started.
    pub lag: crate::metrics::LatencyHistogram,
    started_unix_ms: u64,
}

impl Projector {
    /// Loads the saved snapshot, or starts from empty views (then the task replays the log).
    pub fn load(store: &dyn Store) -> Arc<Projector> {
        let views = match store.load_projection(VIEWS_PROJECTION) {
            Ok(Some(bytes)) => Views::from_snapshot(&bytes).unwrap_or_else(|| {
                tracing::warn!(
                    "projection snapshot unreadable or of another layout; replaying the log"
                );
                Views::new()
            }),
            Ok(None) => Views::new(),
            Err(error) => {
                tracing::warn!("cannot load projection snapshot, replaying the log: {error}");
                Views::new()
            }
        };
        let checkpoint = views.checkpoint;
        Arc::new(Projector {
            views: RwLock::new(Arc::new(views)),
            saving: Arc::new(AtomicBool::new(false)),
            last_save_micros: AtomicU64::new(0),
            last_snapshot_bytes: AtomicUsize::new(0),
            checkpoint: watch::channel(checkpoint).0,
            paused: watch::channel(false).0,
            scheduling: Notify::new(),
            last_error: RwLock::new(None),
            lag: Default::default(),
            started_unix_ms: crate::metrics::unix_ms_now(),
        })
    }

    /// Read access to the views; hold it briefly.
    pub fn views(&self) -> ViewsGuard<'_> {
        ViewsGuard(
            self.views
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// The views as they are now, shared: O(1) (the big maps are persistent), and the
    /// projector goes on applying meanwhile. For long reads (a scheduler pass over the fleet)
    /// that must not hold the lock.
    pub fn views_shared(&self) -> Arc<Views> {
        Arc::clone(&*self.views.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn checkpoint(&self) -> u64 {
        *self.checkpoint.borrow()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Test hook: stops applying events until [`Projector::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Waits until the views include `event_id`; on timeout returns the checkpoint reached.
    pub async fn wait_for(&self, event_id: u64, timeout: Duration) -> Result<(), u64> {
        let mut receiver = self.checkpoint.subscribe();
        let reached = tokio::time::timeout(
            timeout,
            receiver.wait_for(|checkpoint| *checkpoint >= event_id),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.checkpoint()),
        }
    }

    /// Applies what the log holds past the checkpoint, one batch at a time. Returns whether it
    /// caught up with `head`.
    async fn catch_up(&self, store: &Arc<dyn Store>, head: u64) -> bool {
        let mut touched_scheduling = false;
        loop {
            let checkpoint = self.checkpoint();
            if checkpoint >= head || *self.paused.borrow() {
                break;
            }
            let reader = Arc::clone(store);
            let events =
                tokio::task::spawn_blocking(move || reader.read_log(checkpoint, BATCH_EVENTS))
                    .await;
            let events = match events {
                Ok(Ok(events)) => events,
                Ok(Err(error)) => {
                    self.record_error(format!(
                        "projector cannot read the log after {checkpoint}: {error}"
                    ));
                    return false;
                }
                Err(error) => {
                    self.record_error(format!("projector read task failed: {error}"));
                    return false;
                }
            };
            if events.is_empty() {
                break;
            }
            // Decoded before the write lock: readers (heartbeats, plans, authentication) wait
            // only for the views to change, not for the JSON to be read.
            let decoded: Vec<_> = events
                .iter()
                .filter(|event| event.event_id > checkpoint)
                .map(|event| (event, Event::from_stored(event)))
                .collect();
            let reached = {
                let mut guard = self.views.write().unwrap_or_else(|p| p.into_inner());
                // A clone a snapshot save still holds shares the maps; changing them copies
                // only the paths changed (persistent maps), not the whole views.
                let views = Arc::make_mut(&mut *guard);
                for (event, decoded) in decoded {
                    match decoded
                        .map_err(ProjectionError::from)
                        .and_then(|decoded| views.apply_decoded(event, decoded))
                    {
                        Ok(touched) => touched_scheduling |= touched.scheduling,
                        Err(error) => {
                            drop(guard);
                            self.record_error(format!(
                                "projection stuck at event {}: {error}",
                                event.event_id
                            ));
                            return false;
                        }
                    }
                }
                views.checkpoint
            };
            self.checkpoint.send_replace(reached);
            // Replayed history is not lag: only events committed while this process runs.
            if let Some(newest) = events.last()
                && newest.at_unix_ms >= self.started_unix_ms
            {
                self.lag
                    .observe_ms(crate::metrics::unix_ms_now().saturating_sub(newest.at_unix_ms));
            }
        }
        if touched_scheduling {
            self.scheduling.notify_one();
        }
        let caught_up = self.checkpoint() >= head;
        if caught_up {
            *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = None;
        }
        caught_up
    }

    fn record_error(&self, message: String) {
        tracing::error!("{message}");
        *self.last_error.write().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    fn save(&self, store: &dyn Store) {
        let started = Instant::now();
        // A reference, not a copy: the projector goes on applying meanwhile.
        let views = self.views_shared();
        let last_bytes = self.last_snapshot_bytes.load(Ordering::Relaxed);
        let snapshot = views.to_snapshot_sized(last_bytes + last_bytes / 8);
        drop(views);
        self.last_snapshot_bytes
            .store(snapshot.len(), Ordering::Relaxed);
        if let Err(error) = store.save_projection(VIEWS_PROJECTION, snapshot) {
            tracing::warn!("cannot save the projection snapshot: {error}");
        }
        self.last_save_micros.store(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The least time between two snapshot saves: [`SNAPSHOT_EVERY`], or more when the last
    /// save took long.
    fn snapshot_spacing(&self) -> Duration {
        let last = Duration::from_micros(self.last_save_micros.load(Ordering::Relaxed));
        SNAPSHOT_EVERY.max(last.saturating_mul(SNAPSHOT_SPACING_FACTOR))
    }

    /// Follows the log head forever.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, mut head: watch::Receiver<u64>) {
        let mut paused = self.paused.subscribe();
        let mut last_saved = Instant::now();
        let mut saved_checkpoint = self.checkpoint();
        loop {
            let target = *head.borrow_and_update();
            let caught_up = self.catch_up(&store, target).await;
            let checkpoint = self.checkpoint();
            if checkpoint > saved_checkpoint
                && last_saved.elapsed() >= self.snapshot_spacing()
                && !self.saving.swap(true, Ordering::AcqRel)
            {
                // Not awaited: the projector goes on while the snapshot is written.
                let saver = Arc::clone(&self);
                let store = Arc::clone(&store);
                tokio::task::spawn_blocking(move || {
                    saver.save(store.as_ref());
                    saver.saving.store(false, Ordering::Release);
                });
                last_saved = Instant::now();
                saved_checkpoint = checkpoint;
            }
            if !caught_up && !*paused.borrow() {
                // A read failure or a stuck event: retry later rather than spin.
                let pause = if self.last_error().is_some() {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(20)
                };
                tokio::time::sleep(pause).await;
                continue;
            }
            let wait = if checkpoint > saved_checkpoint {
                self.snapshot_spacing()
                    .saturating_sub(last_saved.elapsed())
                    .max(Duration::from_millis(20))
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                _ = paused.changed() => {},
                _ = tokio::time::sleep(wait) => {},
            }
        }
    }

    /// Saves a snapshot now (on shutdown and in admin commands).
    pub fn save_now(&self, store: &dyn Store) {
        self.save(store);
    }
}

/// Replays the whole log into fresh views (admin rebuild, and tests comparing with live views).
pub fn replay(store: &dyn Store) -> Result<Views, String> {
    let mut views = Views::new();
    loop {
        let events = store
            .read_log(views.checkpoint, BATCH_EVENTS)
            .map_err(|e| e.to_string())?;
        if events.is_empty() {
            return Ok(views);
        }
        for event in &events {
            views.apply(event).map_err(|e| e.to_string())?;
        }
    }
}
