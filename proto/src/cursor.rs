//! Change-feed cursors `(log_epoch, event_id)` and the arithmetic that decides what a consumer
//! may be sent.
//!
//! `event_id` is the last global event id a consumer has seen (0: none). `log_epoch` is a random
//! id of the log's lineage; it changes when the log is restored from backup or compacted past a
//! floor, and a cursor from another epoch is never served. Nor is a cursor past the log head:
//! the consumer saw events this log does not hold (a control restored from an older copy without
//! a new epoch, or a replica behind the one that served the consumer), so serving it would skip
//! whatever this log writes up to that id. Every cursor that cannot be served is `410 Gone`, and
//! the consumer starts again from a snapshot.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a consumer stands in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub log_epoch: u64,
    pub event_id: u64,
}

impl Cursor {
    pub fn new(log_epoch: u64, event_id: u64) -> Self {
        Self {
            log_epoch,
            event_id,
        }
    }
}

/// Text form `EPOCH.ID`: 16 hex digits of the epoch, a dot, the decimal event id.
impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{}", self.log_epoch, self.event_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor {value:?}: expected EPOCH.ID, 16 hex digits, a dot and a decimal id")]
pub struct CursorParseError {
    pub value: String,
}

impl FromStr for Cursor {
    type Err = CursorParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || CursorParseError {
            value: crate::validate::shorten(text),
        };
        let (epoch, id) = text.split_once('.').ok_or_else(error)?;
        if epoch.len() != 16 {
            return Err(error());
        }
        let log_epoch = u64::from_str_radix(epoch, 16).map_err(|_| error())?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let event_id = id.parse::<u64>().map_err(|_| error())?;
        Ok(Cursor {
            log_epoch,
            event_id,
        })
    }
}

/// What the log holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    pub log_epoch: u64,
    /// Id of the oldest event still retained; `head + 1` when the log retains none.
    pub floor: u64,
    /// Id of the newest event (0 when empty).
    pub head: u64,
}

/// How a server answers a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorCheck {
    /// Serve events with ids greater than `after`.
    Serve { after: u64 },
    /// Another epoch, below the floor or past the head: answer 410 Gone with a snapshot pointer.
    Gone(GoneReason),
}

/// Why a cursor cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneReason {
    OtherEpoch {
        cursor_epoch: u64,
        log_epoch: u64,
    },
    BelowFloor {
        event_id: u64,
        floor: u64,
    },
    /// The cursor names an event this log has not written (yet).
    PastHead {
        event_id: u64,
        head: u64,
    },
}

impl fmt::Display for GoneReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoneReason::OtherEpoch {
                cursor_epoch,
                log_epoch,
            } => write!(
                f,
                "cursor is from log epoch {cursor_epoch:016x}, the log is now epoch {log_epoch:016x}"
            ),
            GoneReason::BelowFloor { event_id, floor } => write!(
                f,
                "cursor event {event_id} is below the retained floor {floor}; events were compacted"
            ),
            GoneReason::PastHead { event_id, head } => write!(
                f,
                "cursor event {event_id} is past the log head {head}; this log was restored from an older copy or is a replica that is behind"
            ),
        }
    }
}

/// Decides whether `cursor` can be served from `log`. A consumer that has seen `event_id` needs
/// event `event_id + 1` onwards, so it is servable when `event_id + 1 >= floor` and
/// `event_id <= head`; anything else is gone.
pub fn check_cursor(cursor: Cursor, log: LogPosition) -> CursorCheck {
    if cursor.log_epoch != log.log_epoch {
        return CursorCheck::Gone(GoneReason::OtherEpoch {
            cursor_epoch: cursor.log_epoch,
            log_epoch: log.log_epoch,
        });
    }
    if cursor.event_id > log.head {
        return CursorCheck::Gone(GoneReason::PastHead {
            event_id: cursor.event_id,
            head: log.head,
        });
    }
    if cursor.event_id.saturating_add(1) < log.floor {
        return CursorCheck::Gone(GoneReason::BelowFloor {
            event_id: cursor.event_id,
            floor: log.floor,
        });
    }
    CursorCheck::Serve {
        after: cursor.event_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_round_trips() {
        let cursor = Cursor::new(0xdead_beef, 42);
        assert_eq!(cursor.to_string(), "00000000deadbeef.42");
        assert_eq!("00000000deadbeef.42".parse::<Cursor>(), Ok(cursor));
    }

    #[test]
    fn malformed_text_is_rejected_with_the_value() {
        for bad in [
            "",
            "1.2",
            "00000000deadbeef",
            "00000000deadbeef.",
            "00000000deadbeef.-1",
            "zzzzzzzzzzzzzzzz.1",
        ] {
            let error = bad.parse::<Cursor>().unwrap_err();
            assert_eq!(error.value, bad);
        }
    }

    #[test]
    fn other_epoch_is_gone() {
        let log = LogPosition {
            log_epoch: 2,
            floor: 1,
            head: 10,
        };
        assert!(matches!(
            check_cursor(Cursor::new(1, 5), log),
            CursorCheck::Gone(GoneReason::OtherEpoch { .. })
        ));
    }

    #[test]
    fn below_floor_is_gone_and_at_floor_is_served() {
        let log = LogPosition {
            log_epoch: 1,
            floor: 50,
            head: 100,
        };
        assert!(matches!(
            check_cursor(Cursor::new(1, 48), log),
            CursorCheck::Gone(GoneReason::BelowFloor { .. })
        ));
        assert_eq!(
            check_cursor(Cursor::new(1, 49), log),
            CursorCheck::Serve { after: 49 }
        );
    }

    #[test]
    fn a_cursor_past_the_head_is_gone_and_at_the_head_is_served() {
        let position = |floor, head| LogPosition {
            log_epoch: 1,
            floor,
            head,
        };
        let past = |event_id, head| CursorCheck::Gone(GoneReason::PastHead { event_id, head });
        for (log, event_id, expected) in [
            (position(1, 10), 11, past(11, 10)),
            (position(1, 10), 10, CursorCheck::Serve { after: 10 }),
            // An empty log (restored from a copy taken before anything was written).
            (position(1, 0), 1, past(1, 0)),
            (position(1, 0), 0, CursorCheck::Serve { after: 0 }),
        ] {
            assert_eq!(check_cursor(Cursor::new(1, event_id), log), expected);
        }
    }

    #[test]
    fn the_past_head_reason_names_the_cursor_the_head_and_the_likely_cause() {
        let text = GoneReason::PastHead {
            event_id: 120,
            head: 80,
        }
        .to_string();
        assert!(text.contains("120") && text.contains("80"), "{text}");
        assert!(text.contains("restored"), "{text}");
    }

    proptest! {
        #[test]
        fn any_cursor_parses_back(epoch in any::<u64>(), id in any::<u64>()) {
            let cursor = Cursor::new(epoch, id);
            prop_assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor));
        }

        #[test]
        fn served_cursors_never_skip_a_retained_event(
            epoch in any::<u64>(), floor in 1u64..1000, extra in 0u64..1000, id in 0u64..3000,
        ) {
            let head = floor + extra;
            let log = LogPosition { log_epoch: epoch, floor, head };
            match check_cursor(Cursor::new(epoch, id), log) {
                CursorCheck::Serve { after } => {
                    // The next event the consumer needs is retained (or not yet written).
                    prop_assert!(after + 1 >= floor && after <= head);
                }
                CursorCheck::Gone(GoneReason::BelowFloor { .. }) => prop_assert!(id + 1 < floor),
                CursorCheck::Gone(GoneReason::PastHead { .. }) => prop_assert!(id > head),
                CursorCheck::Gone(GoneReason::OtherEpoch { .. }) => {
                    prop_assert!(false, "same epoch answered as another epoch")
                }
            }
        }

        /// Every cursor is either served or gone with the reason that fits; nothing is refused
        /// in a way a consumer cannot recover from (no 400), and the reasons are checked in the
        /// order epoch, head, floor.
        #[test]
        fn every_cursor_is_served_or_gone_for_the_right_reason(
            cursor_epoch in 0u64..3, log_epoch in 0u64..3,
            floor in 1u64..50, extra in 0u64..50, id in 0u64..150,
        ) {
            // The log is either empty (floor = head + 1) or retains [floor, head].
            let head = if extra == 0 { floor - 1 } else { floor + extra - 1 };
            let log = LogPosition { log_epoch, floor, head };
            let expected = if cursor_epoch != log_epoch {
                CursorCheck::Gone(GoneReason::OtherEpoch { cursor_epoch, log_epoch })
            } else if id > head {
                CursorCheck::Gone(GoneReason::PastHead { event_id: id, head })
            } else if id + 1 < floor {
                CursorCheck::Gone(GoneReason::BelowFloor { event_id: id, floor })
            } else {
                CursorCheck::Serve { after: id }
            };
            prop_assert_eq!(check_cursor(Cursor::new(cursor_epoch, id), log), expected);
        }

        /// A consumer restarting from the snapshot of a log that fell behind it is served from
        /// then on: the snapshot's cursor is at most the head.
        #[test]
        fn a_snapshot_cursor_of_a_log_behind_the_consumer_is_served(
            epoch in any::<u64>(), head in 0u64..1000, ahead in 1u64..1000,
        ) {
            let log = LogPosition { log_epoch: epoch, floor: 1, head };
            let consumer = Cursor::new(epoch, head + ahead);
            let gone = matches!(
                check_cursor(consumer, log),
                CursorCheck::Gone(GoneReason::PastHead { .. })
            );
            prop_assert!(gone, "a cursor past the head is gone");
            let snapshot = Cursor::new(epoch, head);
            prop_assert_eq!(check_cursor(snapshot, log), CursorCheck::Serve { after: head });
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<Cursor>();
        }
    }
}
