//! Validation of decoded values: one error type that names the field and the value seen.

use std::fmt;

/// A value that was well-formed but not acceptable. `field` is a dotted path such as
/// `spec.replicas`; `value` is what was seen, shortened for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
    pub value: String,
}

impl ValidationError {
    pub fn new(
        field: impl Into<String>,
        reason: impl Into<String>,
        value: impl fmt::Display,
    ) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            value: shorten(&value.to_string()),
        }
    }

    /// Prefixes the field path, so nested validators can report `spec.services[2].name`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}: {} (got {:?})",
            self.field, self.reason, self.value
        )
    }
}

impl std::error::Error for ValidationError {}

/// Shortens a value for an error message, on a char boundary.
pub fn shorten(value: &str) -> String {
    const SHOWN: usize = 80;
    if value.len() <= SHOWN {
        return value.to_string();
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

/// Implemented by every type decoded from outside the process.
pub trait Validate {
    fn validate(&self) -> Result<(), ValidationError>;
}

/// Checks a free-form string against [`crate::limits::TEXT_MAX_BYTES`] and for NUL bytes.
pub fn check_text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > crate::limits::TEXT_MAX_BYTES {
        return Err(ValidationError::new(
            field,
            format!("longer than {} bytes", crate::limits::TEXT_MAX_BYTES),
            value,
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(
            field,
            "contains a NUL byte",
            value.escape_debug(),
        ));
    }
    Ok(())
}

/// Checks that a list has at most `max` entries.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), ValidationError> {
    if count > max {
        return Err(ValidationError::new(
            field,
            format!("more than {max} entries"),
            count,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_paths_read_naturally() {
        let error = ValidationError::new("name", "empty", "")
            .within("[2]")
            .within("services");
        assert_eq!(error.field, "services[2].name");
    }

    #[test]
    fn long_values_are_shortened_on_char_boundaries() {
        let value = "é".repeat(100);
        let shown = shorten(&value);
        assert!(shown.ends_with('…'));
        assert!(shown.len() < value.len());
    }
}
