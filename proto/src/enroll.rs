//! Enrollment tokens (P9): one-time, expiring, and carrying the control's CA fingerprint so a
//! new node pins the CA before it sends anything.
//!
//! Text form: `opt1.` followed by lowercase hex of the postcard-encoded [`EnrollmentClaims`].
//! Control keeps only `sha256(secret)`; the token itself is shown once.

use serde::{Deserialize, Serialize};

use crate::hash::{from_hex, to_hex};
use crate::secret::Redacted;
use crate::validate::{ValidationError, check_text};

pub const TOKEN_PREFIX: &str = "opt1.";
/// Longest token text accepted.
pub const TOKEN_MAX_BYTES: usize = 2048;

/// What an enrollment token carries. `Debug` prints the secret as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentClaims {
    /// Public id of the token, used to look it up.
    pub token_id: String,
    /// Random secret; control stores its sha256.
    pub secret: String,
    /// sha256 (lowercase hex) of the control CA certificate (DER).
    pub ca_fingerprint: String,
    /// Where to register, if the operator wants the token to say it.
    pub control_url: String,
    /// Unix seconds after which control refuses the token.
    pub expires_at_unix: u64,
}

impl std::fmt::Debug for EnrollmentClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentClaims")
            .field("token_id", &self.token_id)
            .field("secret", &Redacted)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("control_url", &self.control_url)
            .field("expires_at_unix", &self.expires_at_unix)
            .finish()
    }
}

impl EnrollmentClaims {
    pub fn to_token(&self) -> String {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", to_hex(&bytes))
    }

    /// Parses a token's text. Says what is wrong without echoing the secret.
    pub fn parse(token: &str) -> Result<Self, ValidationError> {
        let token = token.trim();
        let shown = token.get(..12).unwrap_or(token);
        if token.len() > TOKEN_MAX_BYTES {
            return Err(ValidationError::new(
                "enrollment_token",
                format!("longer than {TOKEN_MAX_BYTES} bytes"),
                format!("{shown}…"),
            ));
        }
        let hex = token.strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            ValidationError::new(
                "enrollment_token",
                format!("must start with {TOKEN_PREFIX:?}"),
                format!("{shown}…"),
            )
        })?;
        let bytes = from_hex(hex).ok_or_else(|| {
            ValidationError::new(
                "enrollment_token",
                "is not hex after the prefix",
                format!("{shown}…"),
            )
        })?;
        let claims: EnrollmentClaims = postcard::from_bytes(&bytes).map_err(|_| {
            ValidationError::new("enrollment_token", "does not decode", format!("{shown}…"))
        })?;
        check_text("enrollment_token.control_url", &claims.control_url)?;
        if claims.ca_fingerprint.len() != 64 || from_hex(&claims.ca_fingerprint).is_none() {
            return Err(ValidationError::new(
                "enrollment_token.ca_fingerprint",
                "must be 64 hex characters",
                &claims.ca_fingerprint,
            ));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> EnrollmentClaims {
        EnrollmentClaims {
            token_id: "t1".into(),
            secret: "s3cret".into(),
            ca_fingerprint: "ab".repeat(32),
            control_url: "https://127.0.0.1:7443".into(),
            expires_at_unix: 1_900_000_000,
        }
    }

    #[test]
    fn round_trips() {
        let token = claims().to_token();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(EnrollmentClaims::parse(&token), Ok(claims()));
    }

    #[test]
    fn garbage_is_refused_without_echoing_the_secret() {
        for bad in ["", "opt1.zz", "opt2.00", "opt1.0001"] {
            assert!(EnrollmentClaims::parse(bad).is_err(), "{bad}");
        }
        let token = claims().to_token();
        let error = EnrollmentClaims::parse(&token[..token.len() - 2]).unwrap_err();
        assert!(!error.to_string().contains("s3cret"));
    }

    #[test]
    fn debug_prints_no_secret() {
        let printed = format!("{:?}", claims());
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("t1") && printed.contains("<redacted>"),
            "{printed}"
        );
    }
}
