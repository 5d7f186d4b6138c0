//! Durations as people type them (`90s`, `10m`, `1h`, `2d`, `3600`) and as they are shown.

/// Longest enrollment-token lifetime outpostctl asks for: 30 days.
pub const TTL_MAX_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "invalid duration {value:?}: expected a number with an optional unit s, m, h or d, e.g. 10m, 1h, 3600"
    )]
    Syntax { value: String },
    #[error("invalid duration {value:?}: must be at least 1 second")]
    Zero { value: String },
    #[error("invalid duration {value:?}: longer than {TTL_MAX_SECS} seconds (30 days)")]
    TooLong { value: String },
}

/// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd` into seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, DurationError> {
    let value = text.trim();
    let syntax = || DurationError::Syntax {
        value: text.to_string(),
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() {
        return Err(syntax());
    }
    let count: u64 = digits.parse().map_err(|_| DurationError::TooLong {
        value: text.to_string(),
    })?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(syntax()),
    };
    let secs = count
        .checked_mul(unit_secs)
        .ok_or_else(|| DurationError::TooLong {
            value: text.to_string(),
        })?;
    if secs == 0 {
        return Err(DurationError::Zero {
            value: text.to_string(),
        });
    }
    if secs > TTL_MAX_SECS {
        return Err(DurationError::TooLong {
            value: text.to_string(),
        });
    }
    Ok(secs)
}

/// `3725` → `1h2m5s`; `0` → `0s`.
pub fn format_duration_secs(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, unit)| format!("{count}{unit}"))
        .collect()
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`, without a clock or a time-zone database.
pub fn format_unix_utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = outpost_proto::time::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_understood() {
        assert_eq!(parse_duration_secs("3600"), Ok(3600));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("10m"), Ok(600));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs(" 2d "), Ok(172_800));
    }

    #[test]
    fn bad_durations_name_the_value() {
        for bad in ["", "m", "10x", "1.5h", "-1", "h1", "10 m"] {
            let error = parse_duration_secs(bad).unwrap_err();
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
        assert!(matches!(
            parse_duration_secs("0m"),
            Err(DurationError::Zero { .. })
        ));
        assert!(matches!(
            parse_duration_secs("31d"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse_duration_secs("99999999999999999999999"),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn durations_format_compactly() {
        assert_eq!(format_duration_secs(0), "0s");
        assert_eq!(format_duration_secs(600), "10m");
        assert_eq!(format_duration_secs(3725), "1h2m5s");
        assert_eq!(format_duration_secs(90_000), "1d1h");
    }

    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(format_unix_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_unix_utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }
}
