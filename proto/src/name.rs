//! Bounded names: node ids, service names, allocation ids, label keys.

use crate::limits::NAME_MAX_BYTES;
use crate::validate::ValidationError;

/// A name held without heap allocation: at most 63 bytes of `[a-z0-9._-]`, starting with a
/// letter or digit. Deserializing a longer string fails; [`check_name`] checks the characters.
pub type Name = heapless::String<NAME_MAX_BYTES>;

/// Builds a [`Name`], checking length and characters.
pub fn name(field: &str, value: &str) -> Result<Name, ValidationError> {
    check_name(field, value)?;
    Name::try_from(value).map_err(|_| {
        ValidationError::new(field, format!("longer than {NAME_MAX_BYTES} bytes"), value)
    })
}

/// Checks the characters of a name.
pub fn check_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty", value));
    }
    if value.len() > NAME_MAX_BYTES {
        return Err(ValidationError::new(
            field,
            format!("longer than {NAME_MAX_BYTES} bytes"),
            value,
        ));
    }
    let first = value.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(ValidationError::new(
            field,
            "must start with a lowercase letter or digit",
            value,
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!("may only contain a-z, 0-9, '-', '_' and '.', found {bad:?}"),
            value,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        assert!(name("node_id", "edge-01.site_a").is_ok());
    }

    #[test]
    fn rejects_bad_names_with_the_value() {
        let error = name("node_id", "Edge 1").unwrap_err();
        assert_eq!(error.field, "node_id");
        assert_eq!(error.value, "Edge 1");
        assert!(name("node_id", "").is_err());
        assert!(name("node_id", &"a".repeat(64)).is_err());
        assert!(name("node_id", "-lead").is_err());
    }

    #[test]
    fn oversized_names_fail_to_deserialize() {
        let json = format!("\"{}\"", "a".repeat(64));
        assert!(serde_json::from_str::<Name>(&json).is_err());
    }
}
