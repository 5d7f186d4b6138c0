//! WireGuard keys: the node's private key (generated here, never sent anywhere) and public keys,
//! with the base64 form people and control use and the hex form the UAPI protocol uses.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Length of every WireGuard key in bytes.
pub const KEY_BYTES: usize = 32;

/// The node's x25519 private key. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_BYTES]);

/// A peer's (or this node's) public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_BYTES]);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {value:?} is not a base64 WireGuard key of {KEY_BYTES} bytes")]
    Base64 { what: &'static str, value: String },
    #[error("{what} is {length} bytes, a WireGuard key is {KEY_BYTES}")]
    Length { what: &'static str, length: usize },
    #[error("{what} {value:?} is not {KEY_BYTES} bytes of hex")]
    Hex { what: &'static str, value: String },
    #[error("cannot read random bytes for a new private key: {0}")]
    Random(String),
}

/// Whether [`load_or_generate_private_key`] found a stored key or made a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Stored,
    /// New: the caller must store `key.to_bytes()` before it reports the public key anywhere.
    Generated,
}

impl PrivateKey {
    /// A fresh key from the operating system's random source, clamped as x25519 requires.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::fill(&mut bytes).map_err(|error| KeyError::Random(error.to_string()))?;
        Ok(Self::from_bytes(bytes))
    }

    /// Clamps the scalar like `wg genkey`, so the stored and the applied key are the same bytes.
    pub fn from_bytes(mut bytes: [u8; KEY_BYTES]) -> Self {
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// For a stored record of unknown length (e.g. read back from the agent's store).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let array: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| KeyError::Length {
            what: "stored private key",
            length: bytes.len(),
        })?;
        Ok(Self::from_bytes(array))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_base64("private key", text).map(Self::from_bytes)
    }

    /// The raw bytes, for the caller's store only.
    pub fn to_bytes(&self) -> [u8; KEY_BYTES] {
        self.0
    }

    /// Base64, the form `wg` and wg-quick files use. Only for local tools; never log it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    pub(crate) fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    pub(crate) fn from_hex(what: &'static str, text: &str) -> Result<Self, KeyError> {
        decode_hex(what, text).map(Self)
    }

    /// The all-zero key: WireGuard's "no private key".
    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0u8; KEY_BYTES]
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "PrivateKey(public {})", self.public_key())
    }
}

/// Returns the stored key when there is one, otherwise a new one that the caller must store.
/// A stored record of the wrong length is an error, never silently replaced: replacing it would
/// change the node's identity on the overlay.
pub fn load_or_generate_private_key(
    stored: Option<&[u8]>,
) -> Result<(PrivateKey, KeyOrigin), KeyError> {
    match stored {
        Some(bytes) => Ok((PrivateKey::from_slice(bytes)?, KeyOrigin::Stored)),
        None => Ok((PrivateKey::generate()?, KeyOrigin::Generated)),
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_base64("public key", text).map(Self)
    }

    pub fn to_bytes(self) -> [u8; KEY_BYTES] {
        self.0
    }

    pub fn to_base64(self) -> String {
        BASE64.encode(self.0)
    }

    pub(crate) fn to_hex(self) -> String {
        hex_encode(&self.0)
    }

    pub(crate) fn from_hex(what: &'static str, text: &str) -> Result<Self, KeyError> {
        decode_hex(what, text).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "PublicKey({})", self.to_base64())
    }
}

fn decode_base64(what: &'static str, text: &str) -> Result<[u8; KEY_BYTES], KeyError> {
    let error = || KeyError::Base64 {
        what,
        value: text.chars().take(64).collect(),
    };
    // 32 bytes are 44 base64 characters; refuse anything longer before decoding.
    if text.len() != 44 {
        return Err(error());
    }
    let bytes = BASE64.decode(text).map_err(|_| error())?;
    bytes.try_into().map_err(|_| error())
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

fn decode_hex(what: &'static str, text: &str) -> Result<[u8; KEY_BYTES], KeyError> {
    let error = || KeyError::Hex {
        what,
        value: text.chars().take(80).collect(),
    };
    let digits = text.as_bytes();
    if digits.len() != KEY_BYTES * 2 {
        return Err(error());
    }
    let mut bytes = [0u8; KEY_BYTES];
    for (index, pair) in digits.chunks_exact(2).enumerate() {
        let high = hex_digit(pair[0]).ok_or_else(error)?;
        let low = hex_digit(pair[1]).ok_or_else(error)?;
        bytes[index] = (high << 4) | low;
    }
    Ok(bytes)
}

fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_the_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = decode_hex(
            "test",
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        )
        .unwrap();
        let public = PrivateKey::from_bytes(private).public_key();
        assert_eq!(
            public.to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let first = PrivateKey::generate().unwrap();
        let second = PrivateKey::generate().unwrap();
        assert_ne!(first, second);
        assert_eq!(PrivateKey::from_base64(&first.to_base64()).unwrap(), first);
        assert_eq!(PrivateKey::from_slice(&first.to_bytes()).unwrap(), first);
        let public = first.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_base64()).unwrap(), public);
        assert_eq!(
            PublicKey::from_hex("test", &public.to_hex()).unwrap(),
            public
        );
        assert!(!format!("{first:?}").contains(&first.to_base64()));
    }

    #[test]
    fn load_or_generate_keeps_a_stored_key_and_rejects_a_damaged_one() {
        let (stored, origin) = load_or_generate_private_key(None).unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        let (loaded, origin) = load_or_generate_private_key(Some(&stored.to_bytes())).unwrap();
        assert_eq!((loaded, origin), (stored, KeyOrigin::Stored));
        let error = load_or_generate_private_key(Some(&[1, 2, 3])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "stored private key is 3 bytes, a WireGuard key is 32"
        );
    }

    #[test]
    fn bad_text_is_named() {
        let error = PublicKey::from_base64("not-a-key").unwrap_err();
        assert!(error.to_string().contains("\"not-a-key\""), "{error}");
        assert!(PublicKey::from_base64(&format!("{}=", "A".repeat(43))).is_ok());
        assert!(PublicKey::from_base64(&"A".repeat(44)).is_err());
        assert!(PublicKey::from_hex("peer", &"g".repeat(64)).is_err());
    }
}
