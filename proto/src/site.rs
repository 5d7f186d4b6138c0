//! The site join secret (D2, D6): HMAC-SHA256 signatures of control's mDNS advertisement and
//! the join proof a node registers with instead of a one-time enrollment token. Both sides
//! (control signs/verifies, the agent verifies/proves) use these functions, so the exact bytes
//! signed are defined once, here. docs/election.md describes the scheme.

use sha2::{Digest, Sha256};

use crate::hash::{from_hex, to_hex};

/// Text form prefix of a join proof, sent in `RegisterRequest::enrollment_token`.
pub const JOIN_PROOF_PREFIX: &str = "opj1.";
/// How far a join proof's timestamp may be from control's clock.
pub const JOIN_PROOF_SKEW_SECS: u64 = 300;

const BLOCK_BYTES: usize = 64;

/// HMAC-SHA256 (RFC 2104) of `message` keyed by `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; BLOCK_BYTES];
    if key.len() > BLOCK_BYTES {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let inner_digest = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner_digest);
    outer.finalize().into()
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |acc, (l, r)| acc | (l ^ r))
        == 0
}

fn verify_hex_mac(secret: &str, message: &[u8], mac_hex: &str) -> bool {
    match from_hex(mac_hex) {
        Some(mac) => constant_time_equal(&hmac_sha256(secret.as_bytes(), message), &mac),
        None => false,
    }
}

/// What control's `_outpost-control._tcp` advertisement says about it (TXT `url`, `epoch`,
/// `ca`, `cluster`; `sig` carries [`AdvertFields::sign`] when control has a join secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertFields {
    pub url: String,
    pub epoch: u64,
    pub ca_fingerprint: String,
    pub cluster_id: String,
}

impl AdvertFields {
    /// The exact bytes signed: `outpost-advert-v1\n{url}\n{epoch}\n{ca}\n{cluster}`.
    pub fn signing_text(&self) -> String {
        format!(
            "outpost-advert-v1\n{}\n{}\n{}\n{}",
            self.url, self.epoch, self.ca_fingerprint, self.cluster_id
        )
    }

    /// Lowercase hex HMAC-SHA256 of [`Self::signing_text`] keyed by the join secret.
    pub fn sign(&self, join_secret: &str) -> String {
        to_hex(&hmac_sha256(
            join_secret.as_bytes(),
            self.signing_text().as_bytes(),
        ))
    }

    pub fn verify(&self, join_secret: &str, signature_hex: &str) -> bool {
        verify_hex_mac(join_secret, self.signing_text().as_bytes(), signature_hex)
    }
}

/// Why a join proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinProofError {
    #[error("join proof is malformed ({reason}); expected opj1.NODE_ID.UNIX_SECS.HMAC_HEX")]
    Malformed { reason: &'static str },
    #[error("join proof is for node {proof_node:?}, not for facts.node_id {node_id:?}")]
    OtherNode { proof_node: String, node_id: String },
    #[error(
        "join proof timestamp {at_unix} is more than {JOIN_PROOF_SKEW_SECS} s from control's clock {now_unix}; check the node's clock"
    )]
    Stale { at_unix: u64, now_unix: u64 },
    #[error("join proof does not verify with this site's join secret (wrong secret?)")]
    WrongSecret,
    #[error("this control accepts no join proofs: it was started without a site join secret")]
    NoSecret,
}

/// A node's proof that it holds the site join secret: `opj1.NODE_ID.UNIX_SECS.HMAC_HEX`, the
/// HMAC over `outpost-join-v1\n{node_id}\n{unix_secs}`. It registers its node while fresh, so
/// `Debug` prints the MAC as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinProof {
    pub node_id: String,
    pub at_unix: u64,
    pub mac_hex: String,
}

impl std::fmt::Debug for JoinProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinProof")
            .field("node_id", &self.node_id)
            .field("at_unix", &self.at_unix)
            .field("mac_hex", &crate::secret::Redacted)
            .finish()
    }
}

fn join_signing_text(node_id: &str, at_unix: u64) -> String {
    format!("outpost-join-v1\n{node_id}\n{at_unix}")
}

impl JoinProof {
    pub fn new(join_secret: &str, node_id: &str, at_unix: u64) -> Self {
        Self {
            node_id: node_id.to_string(),
            at_unix,
            mac_hex: to_hex(&hmac_sha256(
                join_secret.as_bytes(),
                join_signing_text(node_id, at_unix).as_bytes(),
            )),
        }
    }

    pub fn to_text(&self) -> String {
        format!(
            "{JOIN_PROOF_PREFIX}{}.{}.{}",
            self.node_id, self.at_unix, self.mac_hex
        )
    }

    /// Parses the text form. Node ids may hold dots, so the last two fields are split off the end.
    pub fn parse(text: &str) -> Result<Self, JoinProofError> {
        let rest = text
            .strip_prefix(JOIN_PROOF_PREFIX)
            .ok_or(JoinProofError::Malformed {
                reason: "missing the opj1. prefix",
            })?;
        let (rest, mac_hex) = rest.rsplit_once('.').ok_or(JoinProofError::Malformed {
            reason: "missing the hmac",
        })?;
        let (node_id, at_text) = rest.rsplit_once('.').ok_or(JoinProofError::Malformed {
            reason: "missing the timestamp",
        })?;
        let at_unix = at_text.parse().map_err(|_| JoinProofError::Malformed {
            reason: "timestamp is not a whole number",
        })?;
        if node_id.is_empty() || mac_hex.len() != 64 {
            return Err(JoinProofError::Malformed {
                reason: "empty node id or hmac not 64 hex digits",
            });
        }
        Ok(Self {
            node_id: node_id.to_string(),
            at_unix,
            mac_hex: mac_hex.to_string(),
        })
    }

    /// Checks the proof for `node_id` at control's `now_unix` against the site's secret.
    pub fn verify(
        &self,
        join_secret: Option<&str>,
        node_id: &str,
        now_unix: u64,
    ) -> Result<(), JoinProofError> {
        let secret = join_secret.ok_or(JoinProofError::NoSecret)?;
        if self.node_id != node_id {
            return Err(JoinProofError::OtherNode {
                proof_node: self.node_id.clone(),
                node_id: node_id.to_string(),
            });
        }
        if self.at_unix.abs_diff(now_unix) > JOIN_PROOF_SKEW_SECS {
            return Err(JoinProofError::Stale {
                at_unix: self.at_unix,
                now_unix,
            });
        }
        if !verify_hex_mac(
            secret,
            join_signing_text(&self.node_id, self.at_unix).as_bytes(),
            &self.mac_hex,
        ) {
            return Err(JoinProofError::WrongSecret);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_join_proof_prints_no_mac() {
        let proof = JoinProof::new("site-secret", "node-1", 1_900_000_000);
        let printed = format!("{proof:?}");
        assert!(!printed.contains(&proof.mac_hex), "{printed}");
        assert!(
            printed.contains("node-1") && printed.contains("<redacted>"),
            "{printed}"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            to_hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            to_hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn adverts_verify_only_with_the_secret_and_unchanged_fields() {
        let fields = AdvertFields {
            url: "https://10.0.0.1:7443".into(),
            epoch: 3,
            ca_fingerprint: "ab".repeat(32),
            cluster_id: "c1".into(),
        };
        let signature = fields.sign("site-secret");
        assert!(fields.verify("site-secret", &signature));
        assert!(!fields.verify("other-secret", &signature));
        assert!(!fields.verify("site-secret", "zz"));
        let moved = AdvertFields {
            url: "https://10.0.0.66:7443".into(),
            ..fields.clone()
        };
        assert!(!moved.verify("site-secret", &signature));
        let bumped = AdvertFields { epoch: 4, ..fields };
        assert!(!bumped.verify("site-secret", &signature));
    }

    #[test]
    fn join_proofs_round_trip_and_are_checked() {
        let proof = JoinProof::new("s3cret", "edge.1", 1_000);
        let parsed = JoinProof::parse(&proof.to_text()).unwrap();
        assert_eq!(parsed, proof);
        assert_eq!(parsed.verify(Some("s3cret"), "edge.1", 1_100), Ok(()));
        assert_eq!(
            parsed.verify(Some("wrong"), "edge.1", 1_100),
            Err(JoinProofError::WrongSecret)
        );
        assert_eq!(
            parsed.verify(None, "edge.1", 1_100),
            Err(JoinProofError::NoSecret)
        );
        assert!(matches!(
            parsed.verify(Some("s3cret"), "edge.2", 1_100),
            Err(JoinProofError::OtherNode { .. })
        ));
        assert!(matches!(
            parsed.verify(Some("s3cret"), "edge.1", 1_000 + JOIN_PROOF_SKEW_SECS + 1),
            Err(JoinProofError::Stale { .. })
        ));
        for bad in ["opj1.", "opj1.n1.x.aa", "opt1.n1.1.aa", "opj1.n1.1.abc"] {
            assert!(
                matches!(JoinProof::parse(bad), Err(JoinProofError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn equal_compares_contents() {
        assert!(constant_time_equal(b"abc", b"abc"));
        assert!(!constant_time_equal(b"abc", b"abd"));
        assert!(!constant_time_equal(b"abc", b"ab"));
    }
}
