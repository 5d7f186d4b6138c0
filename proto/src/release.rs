//! Signed agent releases (U2): what the release key signs. The operator signs offline with the
//! release key's private half (`outpost-control admin release-key`, `outpostctl artifacts
//! sign`); control holds only the public half and hands it to agents at enrollment, which pin
//! it and verify every agent binary before they switch to it.
//!
//! The signature is ed25519 over [`signed_message`]: a context line, then the artifact's
//! sha256. The hash binds the bytes (the agent checks it separately); the context keeps a
//! release signature from meaning anything else.

use serde::{Deserialize, Serialize};

/// The first line of every signed message.
pub const RELEASE_SIGNATURE_CONTEXT: &str = "outpost-agent-release-v1";
/// An ed25519 public key: 32 bytes.
pub const RELEASE_PUBLIC_KEY_BYTES: usize = 32;
/// An ed25519 signature: 64 bytes.
pub const RELEASE_SIGNATURE_BYTES: usize = 64;

/// The bytes the release key signs for the artifact whose sha256 (lowercase hex) is `sha256`.
pub fn signed_message(sha256: &str) -> Vec<u8> {
    format!("{RELEASE_SIGNATURE_CONTEXT}\n{sha256}\n").into_bytes()
}

/// Which agent binary a node runs, reported at registration and in every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentBuild {
    /// The crate version, with the build's marker when it has one (`0.1.0+MARKER`).
    pub version: String,
    /// The sha256 of the release artifact the agent runs, when it runs one it upgraded to;
    /// `None` for the binary it was installed with.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The last self-update, when there was one.
    #[serde(default)]
    pub upgrade: Option<UpgradeReport>,
}

impl crate::validate::Validate for AgentBuild {
    fn validate(&self) -> Result<(), crate::validate::ValidationError> {
        use crate::artifact::check_sha256;
        use crate::validate::check_text;
        check_text("version", &self.version)?;
        if let Some(sha256) = &self.sha256 {
            check_sha256("sha256", sha256)?;
        }
        if let Some(upgrade) = &self.upgrade {
            check_sha256("upgrade.target_sha256", &upgrade.target_sha256)?;
            check_text("upgrade.message", &upgrade.message)?;
        }
        Ok(())
    }
}

/// How a node's last self-update went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub target_sha256: String,
    pub state: UpgradeState,
    /// Why it was refused or rolled back (empty otherwise).
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeState {
    /// Fetching, verifying, or switched and not yet healthy.
    Trying,
    /// The new binary registered and reported healthy; it is the one that starts now.
    Committed,
    /// The new binary did not become healthy in time (or kept stopping): the previous runs.
    RolledBack,
    /// Refused before switching (signature, hash, architecture, slot); nothing changed.
    Refused,
}

impl UpgradeState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeState::Trying => "trying",
            UpgradeState::Committed => "committed",
            UpgradeState::RolledBack => "rolled_back",
            UpgradeState::Refused => "refused",
        }
    }

    /// Whether the attempt is over and will not be retried by the node.
    pub fn failed(self) -> bool {
        matches!(self, UpgradeState::RolledBack | UpgradeState::Refused)
    }
}

/// What control tells a node in a heartbeat answer: switch to this signed agent binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpgrade {
    /// The artifact's sha256 (lowercase hex).
    pub sha256: String,
    /// The release signature over [`signed_message`] (base64 of 64 bytes).
    pub signature: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_context_and_the_hash() {
        assert_eq!(
            signed_message("ab12"),
            b"outpost-agent-release-v1\nab12\n".to_vec()
        );
    }
}
