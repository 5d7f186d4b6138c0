//! Change-feed cursors `(log_epoch, event_id)` and the arithmetic that decides what a consumer
//! may be sent.
//!
//! `event_id` is the last global event id a consumer has seen (0: none). `log_epoch` is a random
//! id of the log's lineage; it changes when the log is restored from backup or compacted past a
//! floor, and a cursor from another epoch is never served.

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
    /// Another epoch or below the floor: answer 410 Gone with a snapshot pointer.
    Gone(GoneReason),
    /// The cursor names an event the log has not written: a client bug or another control.
    Future { head: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneReason {
    OtherEpoch { cursor_epoch: u64, log_epoch: u64 },
    BelowFloor { event_id: u64, floor: u64 },
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
        }
    }
}

/// Decides whether `cursor` can be served from `log`. A consumer that has seen `event_id` needs
/// event `event_id + 1` onwards, so it is servable when `event_id + 1 >= floor`.
pub fn check_cursor(cursor: Cursor, log: LogPosition) -> CursorCheck {
    if cursor.log_epoch != log.log_epoch {
        return CursorCheck::Gone(GoneReason::OtherEpoch {
            cursor_epoch: cursor.log_epoch,
            log_epoch: log.log_epoch,
        });
    }
    if cursor.event_id > log.head {
        return CursorCheck::Future { head: log.head };
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
    fn future_cursor_is_refused() {
        let log = LogPosition {
            log_epoch: 1,
            floor: 1,
            head: 10,
        };
        assert_eq!(
            check_cursor(Cursor::new(1, 11), log),
            CursorCheck::Future { head: 10 }
        );
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
                CursorCheck::Gone(_) => prop_assert!(id + 1 < floor),
                CursorCheck::Future { .. } => prop_assert!(id > head),
            }
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<Cursor>();
        }
    }
}
