//! Dashboard sessions and CSRF tokens, pure: a session cookie names the operator token it was
//! opened with and its expiry, signed with HMAC-SHA256 under a per-process key (the token's
//! secret is never in the cookie); a CSRF token is a random nonce with the same kind of
//! signature, set as a cookie and echoed by the login form (signed double submit).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A session lasts this long (and never past its token's own expiry).
pub const SESSION_TTL_SECS: u64 = 8 * 3600;
/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "outpost_session";
/// Name of the CSRF cookie of the login form.
pub const CSRF_COOKIE: &str = "outpost_csrf";
/// Longest cookie value read; longer ones are refused unread.
pub const COOKIE_VALUE_MAX: usize = 256;

type HmacSha256 = Hmac<Sha256>;

/// The per-process signing key. Restarting control ends every dashboard session.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// What a valid session cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub token_id: String,
    pub expires_at_unix: u64,
}

/// Why a cookie was refused (shown on the login page).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session cookie is malformed")]
    Malformed,
    #[error("session cookie signature does not verify")]
    BadSignature,
    #[error("session expired at unix time {0}; log in again")]
    Expired(u64),
}

impl SessionKey {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut key);
        Self(key)
    }

    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self, purpose: &str, payload: &str) -> String {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(payload.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn verifies(&self, purpose: &str, payload: &str, signature: &str) -> bool {
        crate::api::auth::same_digest(&self.mac(purpose, payload), signature)
    }

    /// The cookie value of a session: `v1:TOKEN_ID:EXPIRES:HMAC`.
    pub fn seal(&self, session: &Session) -> String {
        let payload = format!("v1:{}:{}", session.token_id, session.expires_at_unix);
        let signature = self.mac("session", &payload);
        format!("{payload}:{signature}")
    }

    /// Checks a session cookie's signature and expiry at `now_unix`.
    pub fn open(&self, cookie: &str, now_unix: u64) -> Result<Session, SessionError> {
        if cookie.len() > COOKIE_VALUE_MAX {
            return Err(SessionError::Malformed);
        }
        let (payload, signature) = cookie.rsplit_once(':').ok_or(SessionError::Malformed)?;
        let mut parts = payload.split(':');
        let (Some("v1"), Some(token_id), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Malformed);
        };
        if !self.verifies("session", payload, signature) {
            return Err(SessionError::BadSignature);
        }
        let expires_at_unix: u64 = expires.parse().map_err(|_| SessionError::Malformed)?;
        if now_unix >= expires_at_unix {
            return Err(SessionError::Expired(expires_at_unix));
        }
        Ok(Session {
            token_id: token_id.to_string(),
            expires_at_unix,
        })
    }

    /// A fresh CSRF token: `NONCE:HMAC`.
    pub fn csrf_token(&self) -> String {
        let nonce = crate::api::auth::random_hex(16);
        let signature = self.mac("csrf", &nonce);
        format!("{nonce}:{signature}")
    }

    /// Whether the form's CSRF field matches the CSRF cookie and carries this key's signature.
    pub fn csrf_matches(&self, cookie: Option<&str>, form: Option<&str>) -> bool {
        let (Some(cookie), Some(form)) = (cookie, form) else {
            return false;
        };
        if cookie.len() > COOKIE_VALUE_MAX || !crate::api::auth::same_digest(cookie, form) {
            return false;
        }
        cookie
            .split_once(':')
            .is_some_and(|(nonce, signature)| self.verifies("csrf", nonce, signature))
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// A `Set-Cookie` value: HttpOnly, Secure, SameSite=Strict, scoped to `/ui/`.
pub fn set_cookie(name: &str, value: &str, max_age_secs: u64) -> String {
    format!("{name}={value}; Path=/ui/; Max-Age={max_age_secs}; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            token_id: "abc123".into(),
            expires_at_unix: 2_000,
        }
    }

    #[test]
    fn a_sealed_session_opens_until_it_expires() {
        let key = SessionKey::from_bytes([7; 32]);
        let cookie = key.seal(&session());
        assert_eq!(key.open(&cookie, 1_999), Ok(session()));
        assert_eq!(key.open(&cookie, 2_000), Err(SessionError::Expired(2_000)));
    }

    #[test]
    fn a_tampered_or_foreign_cookie_is_refused() {
        let key = SessionKey::from_bytes([7; 32]);
        let cookie = key.seal(&session());
        let longer = cookie.replace(":2000:", ":9999:");
        assert_eq!(key.open(&longer, 1), Err(SessionError::BadSignature));
        let other_token = cookie.replace("abc123", "abc124");
        assert_eq!(key.open(&other_token, 1), Err(SessionError::BadSignature));
        let other_key = SessionKey::from_bytes([8; 32]);
        assert_eq!(other_key.open(&cookie, 1), Err(SessionError::BadSignature));
        for garbage in ["", "v1", "v1:a:b", "v2:a:1:ff", &"x".repeat(1000)] {
            assert!(key.open(garbage, 1).is_err(), "{garbage}");
        }
    }

    #[test]
    fn csrf_needs_the_same_signed_token_in_cookie_and_form() {
        let key = SessionKey::from_bytes([7; 32]);
        let token = key.csrf_token();
        assert!(key.csrf_matches(Some(&token), Some(&token)));
        assert!(!key.csrf_matches(Some(&token), None));
        assert!(!key.csrf_matches(None, Some(&token)));
        let other = key.csrf_token();
        assert!(!key.csrf_matches(Some(&token), Some(&other)));
        // An attacker who plants a cookie cannot sign it.
        let forged = "00112233445566778899aabbccddeeff:deadbeef";
        assert!(!key.csrf_matches(Some(forged), Some(forged)));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let header = Some("a=1; outpost_session=v1:x:2:ff; b=2");
        assert_eq!(cookie_value(header, SESSION_COOKIE), Some("v1:x:2:ff"));
        assert_eq!(cookie_value(header, "c"), None);
        assert!(set_cookie("n", "v", 5).contains("HttpOnly; Secure"));
    }
}
