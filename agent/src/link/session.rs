//! The current session with control and the one registration in flight (single-flight).
//!
//! Registering is a network exchange of up to ~20 s (a pinning handshake plus `POST
//! /v1/nodes/register`). The slot's lock is held only to read or change its state, never across
//! that exchange: the thread that finds no session marks a registration in flight, releases the
//! lock and registers; threads that want a session meanwhile wait on a condition variable for
//! that one registration to end and share its outcome, so only one registration runs at a time;
//! threads that only look (`current`) never wait at all.

use std::sync::{Condvar, Mutex, MutexGuard};

/// A session (`S`) obtained by registering, which fails with `E`. Generic so the
/// single-flight logic is tested without a network.
pub struct SessionSlot<S, E> {
    state: Mutex<SlotState<S, E>>,
    /// Signalled whenever a registration ends.
    settled: Condvar,
}

struct SlotState<S, E> {
    current: Option<S>,
    /// A registration is running on some thread (without the lock).
    in_flight: bool,
    /// Registrations ended so far; a waiter knows its registration ended when this moves.
    ended: u64,
    /// The failure of the last registration that ended, as shared with its waiters.
    last_failure: Option<E>,
    /// How often the session was dropped ([`SessionSlot::invalidate`]).
    invalidations: u64,
    /// Threads waiting for the registration in flight.
    waiting: usize,
}

impl<S, E> Default for SessionSlot<S, E> {
    fn default() -> Self {
        Self {
            state: Mutex::new(SlotState {
                current: None,
                in_flight: false,
                ended: 0,
                last_failure: None,
                invalidations: 0,
                waiting: 0,
            }),
            settled: Condvar::new(),
        }
    }
}

impl<S: Clone, E> SessionSlot<S, E> {
    fn lock(&self) -> MutexGuard<'_, SlotState<S, E>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The session, if there is one; never waits for a registration.
    pub fn current(&self) -> Option<S> {
        self.lock().current.clone()
    }

    /// The session, registering first if there is none. When another thread is registering,
    /// waits for it and shares its outcome (its error through `share`, which copies it) instead
    /// of registering a second time. `register` runs without the lock held.
    pub fn get_or_register(
        &self,
        register: impl FnOnce() -> Result<S, E>,
        share: impl Fn(&E) -> E,
    ) -> Result<S, E> {
        let mut state = self.lock();
        loop {
            if let Some(session) = &state.current {
                return Ok(session.clone());
            }
            if !state.in_flight {
                break;
            }
            let ended = state.ended;
            state.waiting += 1;
            state = self
                .settled
                .wait_while(state, |state| state.ended == ended)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.waiting -= 1;
            if state.current.is_none()
                && let Some(failure) = &state.last_failure
            {
                return Err(share(failure));
            }
            // Registered but dropped again at once, or the registering thread panicked: look
            // again (and register if nobody else does).
        }
        state.in_flight = true;
        let invalidations = state.invalidations;
        drop(state);
        let mut flight = Flight {
            slot: self,
            invalidations,
            outcome: None,
        };
        let result = register();
        flight.outcome = Some(match &result {
            Ok(session) => Ok(session.clone()),
            Err(error) => Err(share(error)),
        });
        drop(flight);
        result
    }

    /// Drops the session so the next [`SessionSlot::get_or_register`] registers again.
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.current = None;
        state.invalidations += 1;
    }

    /// How often the session was dropped so far.
    pub fn invalidations(&self) -> u64 {
        self.lock().invalidations
    }

    /// Threads waiting for the registration in flight (for tests).
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

/// Ends the registration in flight, also when `register` panicked: wakes the waiters with its
/// outcome (`None`: no outcome, they look again).
struct Flight<'a, S: Clone, E> {
    slot: &'a SessionSlot<S, E>,
    /// [`SlotState::invalidations`] when the registration began.
    invalidations: u64,
    outcome: Option<Result<S, E>>,
}

impl<S: Clone, E> Drop for Flight<'_, S, E> {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        state.in_flight = false;
        state.ended += 1;
        state.last_failure = None;
        match self.outcome.take() {
            // A session dropped while it was being made (control changed) serves the call that
            // made it but is not kept.
            Some(Ok(session)) if state.invalidations == self.invalidations => {
                state.current = Some(session);
            }
            Some(Ok(_)) | None => {}
            Some(Err(error)) => state.last_failure = Some(error),
        }
        drop(state);
        self.slot.settled.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    type Slot = SessionSlot<u32, String>;
    type Registering = (
        mpsc::Sender<Result<u32, String>>,
        std::thread::JoinHandle<Result<u32, String>>,
    );

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a registration on its own thread that blocks (as on the network) until the test
    /// sends its outcome; returns once it is in flight.
    fn register_in_background(slot: &Arc<Slot>, calls: &Arc<AtomicUsize>) -> Registering {
        let (answer, answers) = mpsc::channel::<Result<u32, String>>();
        let (started, in_flight) = mpsc::channel();
        let registering = {
            let (slot, calls) = (slot.clone(), calls.clone());
            std::thread::spawn(move || {
                slot.get_or_register(
                    || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        started.send(()).unwrap();
                        answers.recv().unwrap()
                    },
                    Clone::clone,
                )
            })
        };
        in_flight.recv().unwrap();
        (answer, registering)
    }

    fn wait_in_background(
        slot: &Arc<Slot>,
        calls: &Arc<AtomicUsize>,
    ) -> std::thread::JoinHandle<Result<u32, String>> {
        let (slot, calls) = (slot.clone(), calls.clone());
        std::thread::spawn(move || {
            slot.get_or_register(
                || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(99)
                },
                Clone::clone,
            )
        })
    }

    #[test]
    fn one_registration_at_a_time_and_readers_never_wait_for_it() {
        let slot = Arc::new(Slot::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (answer, registering) = register_in_background(&slot, &calls);

        // The registration is blocked "on the network": a reader gets its answer at once.
        assert_eq!(slot.current(), None);
        // A second thread that needs a session waits for the one in flight, not registering.
        let waiter = wait_in_background(&slot, &calls);
        wait_until("the second thread to wait", || slot.waiting() == 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(slot.current(), None);

        answer.send(Ok(7)).unwrap();
        assert_eq!(registering.join().unwrap(), Ok(7));
        assert_eq!(
            waiter.join().unwrap(),
            Ok(7),
            "the waiter shares the session"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "registered once");
        assert_eq!(slot.current(), Some(7));
        assert_eq!(
            slot.get_or_register(|| Ok(8), Clone::clone),
            Ok(7),
            "a session in hand is reused"
        );
    }

    #[test]
    fn waiters_share_a_failure_and_the_next_call_registers_again() {
        let slot = Arc::new(Slot::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (answer, registering) = register_in_background(&slot, &calls);
        let waiter = wait_in_background(&slot, &calls);
        wait_until("the second thread to wait", || slot.waiting() == 1);
        answer.send(Err("control answered 503".into())).unwrap();
        assert_eq!(
            registering.join().unwrap(),
            Err("control answered 503".into())
        );
        assert_eq!(waiter.join().unwrap(), Err("control answered 503".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The failure is not remembered for later callers: they try again.
        assert_eq!(slot.get_or_register(|| Ok(3), Clone::clone), Ok(3));
    }

    #[test]
    fn a_session_dropped_while_registering_is_not_kept() {
        let slot = Arc::new(Slot::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (answer, registering) = register_in_background(&slot, &calls);
        // Control changed meanwhile (discovery found another one).
        slot.invalidate();
        assert_eq!(slot.invalidations(), 1);
        answer.send(Ok(5)).unwrap();
        assert_eq!(registering.join().unwrap(), Ok(5), "used for its own call");
        assert_eq!(slot.current(), None, "but not kept");
        assert_eq!(slot.get_or_register(|| Ok(6), Clone::clone), Ok(6));
        slot.invalidate();
        assert_eq!(slot.current(), None);
    }

    #[test]
    fn a_panicking_registration_releases_its_waiters() {
        let slot = Arc::new(Slot::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (started, in_flight) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let panicking = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                slot.get_or_register(
                    || {
                        started.send(()).unwrap();
                        released.recv().unwrap();
                        panic!("registration bug")
                    },
                    Clone::clone,
                )
            })
        };
        in_flight.recv().unwrap();
        let waiter = wait_in_background(&slot, &calls);
        wait_until("the second thread to wait", || slot.waiting() == 1);
        release.send(()).unwrap();
        assert!(panicking.join().is_err());
        assert_eq!(
            waiter.join().unwrap(),
            Ok(99),
            "the waiter registers itself"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
