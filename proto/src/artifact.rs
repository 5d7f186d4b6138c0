//! Artifacts (R1): the reference a service spec carries to a content-addressed file on control,
//! the answer to an upload, and the path both sides use.

use serde::{Deserialize, Serialize};

use crate::validate::{Validate, ValidationError, check_text};

/// Length of a sha256 in lowercase hex.
pub const SHA256_HEX_LEN: usize = 64;

/// Header an upload declares its sha256 in (the path names it too; both must agree).
pub const ARTIFACT_SHA256_HEADER: &str = "x-outpost-artifact-sha256";

/// What a service runs from: the artifact with this sha256, unpacked by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub sha256: String,
}

impl Validate for ArtifactRef {
    fn validate(&self) -> Result<(), ValidationError> {
        check_sha256("sha256", &self.sha256)
    }
}

/// What control answers for a stored artifact (upload, list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    pub sha256: String,
    pub size_bytes: u64,
    pub name: String,
    #[serde(default)]
    pub stored_at_unix_ms: u64,
}

/// Refuses anything but 64 lowercase hex characters, naming `field`.
pub fn check_sha256(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() != SHA256_HEX_LEN
        || !value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ValidationError::new(
            field,
            "must be 64 lowercase hex characters",
            value,
        ));
    }
    Ok(())
}

/// Refuses an artifact name that is empty, too long or holds a slash or control characters.
pub fn check_artifact_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > 255 || value.contains('/') {
        return Err(ValidationError::new(
            field,
            "must be 1 to 255 characters without '/'",
            value,
        ));
    }
    check_text(field, value)
}

/// Refuses a relative command that could leave the artifact's directory.
pub fn check_relative_command(field: &str, command: &str) -> Result<(), ValidationError> {
    if command.starts_with('/') {
        return Ok(());
    }
    if command.split('/').any(|part| part == "..") {
        return Err(ValidationError::new(
            field,
            "a command inside an artifact must not use '..'",
            command,
        ));
    }
    Ok(())
}

/// The path an artifact is uploaded to and fetched from.
pub fn artifact_path(sha256: &str) -> String {
    format!("/v1/artifacts/{sha256}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_must_be_lowercase_hex_of_64() {
        assert!(check_sha256("sha256", &"a".repeat(64)).is_ok());
        let error = check_sha256("artifact.sha256", &"A".repeat(64)).unwrap_err();
        assert_eq!(error.field, "artifact.sha256");
        assert!(check_sha256("sha256", "abc").is_err());
        assert!(check_sha256("sha256", &"g".repeat(64)).is_err());
    }

    #[test]
    fn relative_commands_stay_inside() {
        assert!(check_relative_command("command", "bin/app").is_ok());
        assert!(check_relative_command("command", "/usr/bin/env").is_ok());
        assert!(check_relative_command("command", "../etc/app").is_err());
        assert!(check_relative_command("command", "bin/../../x").is_err());
    }

    #[test]
    fn names_are_bounded() {
        assert!(check_artifact_name("name", "app-v1.tar.gz").is_ok());
        assert!(check_artifact_name("name", "").is_err());
        assert!(check_artifact_name("name", "a/b").is_err());
    }
}
