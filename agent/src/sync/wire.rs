//! One connection to control per agent: the feed's long-poll ends before the next heartbeat is
//! due and gives way to it, so the beat reuses the pooled connection instead of a second one held
//! for the whole poll. Control then keeps one connection per agent: half the sockets and half the
//! connection memory, which is what lets one control hold a fleet within its open-file limit
//! (docs/performance.md, `bench-fleet`). A beat brought forward by a state change may still open
//! a second connection for a moment; the pool drops it once idle.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_proto::limits::feed_wait_before_beat;

/// Control answers a poll after its `wait` plus up to 1/16 of it (jitter against herds); a poll
/// shorter than this cannot end before a beat due this soon, so the beat goes first.
pub const POLL_SPAN_MIN: Duration = Duration::from_millis(1100);

/// Beats closer together than this are not brought forward for the feed: with a short TTL the
/// beat and the poll overlap now and then instead (a second connection for a moment).
pub const GIVE_WAY_PERIOD_MIN: Duration = Duration::from_secs(2);

/// Longest the feed waits for a beat to take the connection and give it back.
pub const GIVE_WAY_MAX: Duration = Duration::from_secs(5);

/// When the heartbeat is due, shared by the heartbeat thread and the feed thread.
#[derive(Default)]
pub struct BeatSchedule {
    state: Mutex<BeatState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct BeatState {
    in_flight: bool,
    next_due: Option<Instant>,
    last_end: Option<Instant>,
    /// The last beat reached control: only then is the next one brought forward (a failing
    /// heartbeat backs off on its own pacing, and the feed does not wait for it).
    delivered: bool,
    beats: u64,
}

impl BeatSchedule {
    fn lock(&self) -> MutexGuard<'_, BeatState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The heartbeat thread starts a beat (delivered or not).
    pub fn beat_started(&self) {
        self.lock().in_flight = true;
    }

    /// The beat ended (`delivered`: control took it); the next one is due at `next_due`.
    pub fn beat_ended(&self, next_due: Instant, delivered: bool) {
        let mut state = self.lock();
        state.in_flight = false;
        state.delivered = delivered;
        state.next_due = Some(next_due);
        state.last_end = Some(Instant::now());
        state.beats = state.beats.wrapping_add(1);
        drop(state);
        self.changed.notify_all();
    }

    /// Called by the feed thread before a poll: lets a beat that is under way, or due before a
    /// poll could end, have the connection first (`bring_forward` asks the heartbeat thread to go
    /// now), for at most [`GIVE_WAY_MAX`]. Returns the wait, in whole seconds, to ask control
    /// for: at most `wanted_secs`, and short enough to end before the next beat is due.
    pub fn poll_wait_secs(&self, wanted_secs: u64, bring_forward: impl FnOnce()) -> u64 {
        let deadline = Instant::now() + GIVE_WAY_MAX;
        let mut state = self.lock();
        // The first beat goes out at boot; a poll started beside it would hold a second
        // connection for its whole wait.
        state = self.wait_while(state, deadline, |s| s.in_flight || s.beats == 0);
        let now = Instant::now();
        let period_long_enough = state
            .last_end
            .is_some_and(|end| now.saturating_duration_since(end) >= GIVE_WAY_PERIOD_MIN);
        let due_soon = state
            .next_due
            .is_some_and(|due| due.saturating_duration_since(now) < POLL_SPAN_MIN);
        if due_soon && period_long_enough && state.delivered {
            let beats = state.beats;
            bring_forward();
            state = self.wait_while(state, deadline, |s| s.beats == beats || s.in_flight);
        }
        let to_due = state
            .next_due
            .map(|due| due.saturating_duration_since(Instant::now()));
        feed_wait_before_beat(wanted_secs, to_due)
    }

    fn wait_while<'a>(
        &self,
        mut state: MutexGuard<'a, BeatState>,
        deadline: Instant,
        condition: impl Fn(&BeatState) -> bool,
    ) -> MutexGuard<'a, BeatState> {
        while condition(&state) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map_or_else(|p| p.into_inner().0, |(guard, _)| guard);
        }
        state
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_wait_ends_before_the_beat_even_with_controls_jitter() {
        let wait = feed_wait_before_beat;
        assert_eq!(wait(300, None), 300);
        // TTL 30: a beat every 10 s; control may add 1/16 to the wait asked.
        let before_a_ten_second_beat = wait(300, Some(Duration::from_secs(10)));
        assert_eq!(before_a_ten_second_beat, 9);
        // The wait plus control's 1/16 jitter still ends before the beat at 10 s.
        assert!(before_a_ten_second_beat * 17 < 10 * 16);
        assert_eq!(wait(5, Some(Duration::from_secs(10))), 5);
        // Never below a second (a short TTL overlaps instead).
        assert_eq!(wait(300, Some(Duration::from_millis(300))), 1);
        assert_eq!(wait(300, Some(Duration::ZERO)), 1);
    }

    #[test]
    fn the_first_poll_follows_the_first_beat() {
        let schedule = Arc::new(BeatSchedule::default());
        let beating = Arc::clone(&schedule);
        let heartbeat = std::thread::spawn(move || {
            beating.beat_started();
            beating.beat_ended(Instant::now() + Duration::from_secs(10), true);
        });
        let mut asked = false;
        let wait = schedule.poll_wait_secs(300, || asked = true);
        heartbeat.join().unwrap();
        assert_eq!(schedule.lock().beats, 1);
        assert!((8..=9).contains(&wait), "{wait}");
        assert!(!asked);
    }

    #[test]
    fn a_beat_due_before_a_poll_could_end_goes_first_and_the_poll_follows_it() {
        let schedule = Arc::new(BeatSchedule::default());
        // The last beat ended long enough ago for the period to count as long, and the next one
        // is due in half a second: shorter than any poll.
        {
            let mut state = schedule.lock();
            state.last_end = Some(Instant::now() - Duration::from_secs(9));
            state.next_due = Some(Instant::now() + Duration::from_millis(500));
            state.delivered = true;
            state.beats = 1;
        }
        let beating = Arc::clone(&schedule);
        let (asked_tx, asked_rx) = std::sync::mpsc::channel();
        let heartbeat = std::thread::spawn(move || {
            asked_rx.recv().unwrap();
            beating.beat_started();
            beating.beat_ended(Instant::now() + Duration::from_secs(10), true);
        });
        let wait = schedule.poll_wait_secs(300, || asked_tx.send(()).unwrap());
        heartbeat.join().unwrap();
        assert_eq!(schedule.lock().beats, 2, "the poll waited for the beat");
        assert!(
            (8..=9).contains(&wait),
            "the poll ends before the next beat: {wait}"
        );
    }

    #[test]
    fn a_short_period_is_not_brought_forward() {
        let schedule = BeatSchedule::default();
        schedule.beat_started();
        schedule.beat_ended(Instant::now() + Duration::from_millis(900), true);
        let mut asked = false;
        assert_eq!(schedule.poll_wait_secs(300, || asked = true), 1);
        assert!(!asked, "a beat every second overlaps the poll instead");
    }

    #[test]
    fn a_failing_heartbeat_is_not_waited_for() {
        let schedule = BeatSchedule::default();
        {
            let mut state = schedule.lock();
            state.last_end = Some(Instant::now() - Duration::from_secs(9));
            state.next_due = Some(Instant::now() + Duration::from_millis(500));
            state.delivered = false;
            state.beats = 1;
        }
        let mut asked = false;
        assert_eq!(schedule.poll_wait_secs(300, || asked = true), 1);
        assert!(!asked, "the heartbeat backs off on its own pacing");
    }
}
