//! HTTP `Range` for artifact downloads, pure: one `bytes=START-[END]` range (what a resuming
//! agent sends) or a suffix `bytes=-N`. Several ranges are not served.

/// The bytes to send: `start..=end` of a blob of `size_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end_inclusive: u64,
}

impl ByteRange {
    pub fn length_bytes(&self) -> u64 {
        self.end_inclusive - self.start + 1
    }

    pub fn content_range(&self, size_bytes: u64) -> String {
        format!("bytes {}-{}/{size_bytes}", self.start, self.end_inclusive)
    }
}

/// What a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send everything with 200 (also for forms this server does not serve,
    /// as RFC 9110 allows).
    Whole,
    Partial(ByteRange),
    /// A range that starts at or past the end: 416.
    NotSatisfiable,
}

/// Decides what to send for `header` against a blob of `size_bytes`.
pub fn parse_range(header: Option<&str>, size_bytes: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix: the last N bytes.
        let Ok(suffix) = last.parse::<u64>() else {
            return RangeRequest::Whole;
        };
        if suffix == 0 || size_bytes == 0 {
            return RangeRequest::NotSatisfiable;
        }
        return RangeRequest::Partial(ByteRange {
            start: size_bytes.saturating_sub(suffix),
            end_inclusive: size_bytes - 1,
        });
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeRequest::Whole;
    };
    let end_inclusive = if last.is_empty() {
        size_bytes.saturating_sub(1)
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end.min(size_bytes.saturating_sub(1)),
            _ => return RangeRequest::Whole,
        }
    };
    if start >= size_bytes {
        return RangeRequest::NotSatisfiable;
    }
    RangeRequest::Partial(ByteRange {
        start,
        end_inclusive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        assert_eq!(parse_range(None, 10), RangeRequest::Whole);
        assert_eq!(
            parse_range(Some("bytes=4-"), 10),
            RangeRequest::Partial(ByteRange {
                start: 4,
                end_inclusive: 9
            })
        );
        assert_eq!(
            parse_range(Some("bytes=2-3"), 10),
            RangeRequest::Partial(ByteRange {
                start: 2,
                end_inclusive: 3
            })
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            RangeRequest::Partial(ByteRange {
                start: 7,
                end_inclusive: 9
            })
        );
        assert_eq!(
            parse_range(Some("bytes=10-"), 10),
            RangeRequest::NotSatisfiable
        );
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), RangeRequest::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeRequest::Whole);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), RangeRequest::Whole);
        assert_eq!(
            ByteRange {
                start: 4,
                end_inclusive: 9
            }
            .content_range(10),
            "bytes 4-9/10"
        );
    }

    proptest! {
        /// Whatever the header, a partial answer lies inside the blob and is not empty.
        #[test]
        fn partial_ranges_lie_inside_the_blob(header in ".{0,24}", size in 0u64..1000) {
            if let RangeRequest::Partial(range) = parse_range(Some(&header), size) {
                prop_assert!(range.start <= range.end_inclusive);
                prop_assert!(range.end_inclusive < size);
                prop_assert!(range.length_bytes() >= 1);
            }
        }

        #[test]
        fn open_ranges_resume_at_their_start(start in 0u64..2000, size in 1u64..1000) {
            match parse_range(Some(&format!("bytes={start}-")), size) {
                RangeRequest::Partial(range) => {
                    prop_assert_eq!(range.start, start);
                    prop_assert_eq!(range.end_inclusive, size - 1);
                }
                RangeRequest::NotSatisfiable => prop_assert!(start >= size),
                RangeRequest::Whole => prop_assert!(false, "open range read as whole"),
            }
        }
    }
}
