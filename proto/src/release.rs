//! Signed agent releases (U2): what the release key signs. The operator signs offline with the
//! release key's private half (`outpost-control admin release-key`, `outpostctl artifacts
//! sign`); control holds only the public half and hands it to agents at enrollment, which pin
//! it and verify every agent binary before they switch to it.
//!
//! The signature is ed25519 over [`signed_message`]: a context line, then the artifact's
//! sha256. The hash binds the bytes (the agent checks it separately); the context keeps a
//! release signature from meaning anything else.

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
