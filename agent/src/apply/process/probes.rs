//! Readiness probes off the supervisor's lock. The running agent shares its [`Supervisor`]
//! behind a mutex (status, heartbeats, plan promotion and shutdown all take it), and a probe
//! may take up to its check's timeout (an HTTP server that answers after seconds). So each due
//! probe runs on its own short-lived thread after the lock is released, and its result is
//! recorded at the next supervision round. At most one probe per process is in flight, so the
//! threads and the result channel are bounded by the plan's allocations.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::{ProbeJob, Supervisor};

type ProbeResult = (ProbeJob, Result<(), String>);

/// Runs supervision rounds on a shared supervisor, probing off its lock.
pub struct OffLockProbes {
    results: Receiver<ProbeResult>,
    sender: Sender<ProbeResult>,
}

impl Default for OffLockProbes {
    fn default() -> Self {
        let (sender, results) = channel();
        Self { results, sender }
    }
}

fn lock(shared: &Mutex<Supervisor>) -> MutexGuard<'_, Supervisor> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OffLockProbes {
    /// One supervision round: records the probes that finished, ticks, runs `inspect` on the
    /// result, all under the lock; then starts the probes that are due, without it. Returns
    /// what `inspect` returned.
    pub fn round<T>(
        &self,
        shared: &Mutex<Supervisor>,
        now: Instant,
        inspect: impl FnOnce(&Supervisor) -> T,
    ) -> T {
        let (jobs, prober, inspected) = {
            let mut supervisor = lock(shared);
            while let Ok((job, result)) = self.results.try_recv() {
                supervisor.probe_finished(job, result, now);
            }
            let jobs = supervisor.tick_deferring_probes(now);
            let inspected = inspect(&supervisor);
            (jobs, supervisor.prober(), inspected)
        };
        for job in jobs {
            let sender = self.sender.clone();
            let prober = prober.clone();
            let running = job.clone();
            let started = std::thread::Builder::new()
                .name("probe".into())
                .spawn(move || {
                    let result =
                        prober.probe(&running.allocation_id, &running.probe, running.timeout);
                    let _ = sender.send((running, result));
                });
            // A probe that cannot run fails, so the process is probed again next time.
            if let Err(error) = started {
                let why = format!(
                    "cannot start a probe thread for {}: {error}",
                    job.allocation_id
                );
                let _ = self.sender.send((job, Err(why)));
            }
        }
        inspected
    }
}
