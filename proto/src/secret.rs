//! Secrets on the wire (P11): how a service refers to a secret, the values of one version, a
//! version sealed for one node's X25519 key (what a node's feed and plan carry), and the pure
//! sealing and opening both ends share.
//!
//! Sealing for a node: an ephemeral X25519 key agrees a shared secret with the node's public
//! key; the sealing key is `sha256(domain || shared || ephemeral_public || node_public)`; the
//! values (postcard) are sealed with XChaCha20-Poly1305 under that key, with the node id, secret
//! name and version as associated data, so a sealed version opens only on its node, under its
//! own name and version. The caller supplies the randomness (ephemeral key, nonce): this crate
//! does no I/O. Any consumer holding a node's private key (agent, edge) opens with
//! [`open_for_node`].

use std::collections::BTreeMap;
use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hash::{from_hex, to_hex};
use crate::name::{Name, check_name};
use crate::validate::{Validate, ValidationError, check_count};

/// Most keys in one secret version.
pub const SECRET_KEYS_MAX: usize = 16;
/// Largest single value of a secret.
pub const SECRET_VALUE_MAX_BYTES: usize = 16 * 1024;
/// Largest sum of a version's values.
pub const SECRET_VERSION_MAX_BYTES: usize = 32 * 1024;
/// Most secrets one service references, and most secrets in one node's plan.
pub const SECRET_REFS_MAX: usize = 16;
pub const NODE_SECRETS_MAX: usize = 64;
/// Largest sealed ciphertext (hex): the postcard of the largest version plus overhead.
pub const SEALED_CIPHERTEXT_MAX_HEX: usize = 2 * (SECRET_VERSION_MAX_BYTES + 4096);
/// Longest file name a secret may be written to.
pub const SECRET_FILE_NAME_MAX_BYTES: usize = 128;

const NODE_SEAL_DOMAIN: &[u8] = b"outpost node seal v1";

/// One secret a service uses: which of its keys become environment variables (`env: {VAR:
/// key}`) and which become files in `OUTPOST_SECRETS_DIR` (`files: {file.pem: key}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub name: Name,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

impl SecretRef {
    /// Every key of the secret this reference reads.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.env.values().chain(self.files.values())
    }
}

/// A valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
pub fn check_env_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let mut chars = value.chars();
    let valid = value.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 128 bytes)",
            value,
        ))
    }
}

/// A secret's key name: `[A-Za-z0-9._-]`, 1 to 63 bytes.
pub fn check_secret_key(field: &str, value: &str) -> Result<(), ValidationError> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "is not a secret key name ([A-Za-z0-9._-], 1 to 63 bytes)",
            value,
        ))
    }
}

/// A file name inside the secrets directory: no path separators, not `.` or `..`.
pub fn check_secret_file_name(field: &str, value: &str) -> Result<(), ValidationError> {
    let valid = !value.is_empty()
        && value.len() <= SECRET_FILE_NAME_MAX_BYTES
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "is not a file name ([A-Za-z0-9._-], no '/', not '.' or '..')",
            value,
        ))
    }
}

impl Validate for SecretRef {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        check_count("env", self.env.len(), SECRET_KEYS_MAX)?;
        check_count("files", self.files.len(), SECRET_KEYS_MAX)?;
        if self.env.is_empty() && self.files.is_empty() {
            return Err(ValidationError::new(
                "env",
                "a secret reference must map at least one key to env or files",
                self.name.as_str(),
            ));
        }
        for (variable, key) in &self.env {
            check_env_name("env", variable)?;
            check_secret_key(&format!("env.{variable}"), key)?;
        }
        for (file, key) in &self.files {
            check_secret_file_name("files", file)?;
            check_secret_key(&format!("files.{file}"), key)?;
        }
        Ok(())
    }
}

/// Checks a service's secret references: bounded, each valid, no secret twice, no environment
/// variable or file name given by two references.
pub fn check_secret_refs(refs: &[SecretRef]) -> Result<(), ValidationError> {
    check_count("secrets", refs.len(), SECRET_REFS_MAX)?;
    let mut names = std::collections::BTreeSet::new();
    let mut variables = std::collections::BTreeSet::new();
    let mut files = std::collections::BTreeSet::new();
    for (index, reference) in refs.iter().enumerate() {
        let field = format!("secrets[{index}]");
        reference.validate().map_err(|e| e.within(&field))?;
        if !names.insert(reference.name.as_str()) {
            return Err(ValidationError::new(
                format!("{field}.name"),
                "is referenced twice",
                reference.name.as_str(),
            ));
        }
        for variable in reference.env.keys() {
            if !variables.insert(variable.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.env"),
                    "is set by two secret references",
                    variable,
                ));
            }
        }
        for file in reference.files.keys() {
            if !files.insert(file.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.files"),
                    "is written by two secret references",
                    file,
                ));
            }
        }
    }
    Ok(())
}

/// Stands in for a token, credential or MAC in `Debug` output: prints `<redacted>`.
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `Some(<redacted>)` or `None`: whether a secret is there, never its value.
pub fn redacted_option<T>(value: &Option<T>) -> Option<Redacted> {
    value.as_ref().map(|_| Redacted)
}

/// The values of one secret version, key → value. Never printed: `Debug` shows only the keys.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValues")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretValues {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn keys(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// Checks a version's values. Errors name the key and the size, never a value.
impl Validate for SecretValues {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.0.is_empty() {
            return Err(ValidationError::new(
                "values",
                "a secret needs at least one KEY=VALUE",
                "{}",
            ));
        }
        check_count("values", self.0.len(), SECRET_KEYS_MAX)?;
        let mut total = 0usize;
        for (key, value) in &self.0 {
            check_secret_key("values", key)?;
            if value.len() > SECRET_VALUE_MAX_BYTES {
                return Err(ValidationError::new(
                    format!("values.{key}"),
                    format!("is larger than {SECRET_VALUE_MAX_BYTES} bytes"),
                    format!("({} bytes)", value.len()),
                ));
            }
            if value.contains('\0') {
                return Err(ValidationError::new(
                    format!("values.{key}"),
                    "must not contain NUL",
                    "(value hidden)",
                ));
            }
            total += value.len();
        }
        if total > SECRET_VERSION_MAX_BYTES {
            return Err(ValidationError::new(
                "values",
                format!("together larger than {SECRET_VERSION_MAX_BYTES} bytes"),
                format!("({total} bytes)"),
            ));
        }
        Ok(())
    }
}

/// A secret version sealed for one node's X25519 key. Hex text fields, so JSON and postcard
/// carry it alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedForNode {
    pub ephemeral_public_key: String,
    pub nonce: String,
    pub ciphertext: String,
}

impl Validate for SealedForNode {
    fn validate(&self) -> Result<(), ValidationError> {
        check_hex_len("ephemeral_public_key", &self.ephemeral_public_key, 32)?;
        check_hex_len("nonce", &self.nonce, 24)?;
        if self.ciphertext.len() > SEALED_CIPHERTEXT_MAX_HEX
            || self.ciphertext.len() < 32
            || from_hex(&self.ciphertext).is_none()
        {
            return Err(ValidationError::new(
                "ciphertext",
                format!(
                    "must be hex of 16 to {} bytes",
                    SEALED_CIPHERTEXT_MAX_HEX / 2
                ),
                format!("({} characters)", self.ciphertext.len()),
            ));
        }
        Ok(())
    }
}

fn check_hex_len(field: &str, text: &str, bytes: usize) -> Result<(), ValidationError> {
    match from_hex(text) {
        Some(decoded) if decoded.len() == bytes => Ok(()),
        _ => Err(ValidationError::new(
            field,
            format!("must be {} hex characters", bytes * 2),
            text,
        )),
    }
}

/// One secret version in a node's plan: the newest version of `name` that an allocation on the
/// node references, sealed for the node. `seq` is the per-aggregate sequence of its delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSecret {
    pub name: Name,
    pub version: u32,
    pub seq: u64,
    pub sealed: SealedForNode,
}

impl Validate for NodeSecret {
    fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        if self.version == 0 {
            return Err(ValidationError::new(
                "version",
                "must be positive",
                self.version,
            ));
        }
        self.sealed.validate().map_err(|e| e.within("sealed"))
    }
}

/// Why sealing or opening failed. Never carries a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{what} is not {expected} bytes of hex")]
    BadKey { what: &'static str, expected: usize },
    #[error(
        "secret {name} version {version} does not open for node {node_id}: tampered, or sealed for another node, name or version"
    )]
    DoesNotOpen {
        node_id: String,
        name: String,
        version: u32,
    },
    #[error("sealed data does not open: tampered, or sealed under another key")]
    KeyDoesNotOpen,
    #[error("secret {name} version {version} opened but its values do not decode")]
    Malformed { name: String, version: u32 },
}

/// The public half of a node's sealing key.
pub fn sealing_public_key(private_key: &[u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(*private_key);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

/// Parses 64 hex characters into a 32-byte key.
pub fn key_from_hex(what: &'static str, text: &str) -> Result<[u8; 32], SealError> {
    from_hex(text)
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
        .ok_or(SealError::BadKey { what, expected: 32 })
}

/// Seals `plaintext` with a 32-byte key (XChaCha20-Poly1305). Returns the ciphertext with its
/// tag. Used for data keys and master-key wrapping as well as node sealing.
pub fn seal_with_key(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    // Encryption with an in-memory buffer cannot fail (no length limit is near).
    cipher
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default()
}

/// Opens what [`seal_with_key`] sealed; fails on any change to key, nonce, aad or ciphertext.
pub fn open_with_key(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| SealError::KeyDoesNotOpen)
}

fn node_seal_aad(node_id: &str, name: &str, version: u32) -> Vec<u8> {
    format!("outpost secret v1\0{node_id}\0{name}\0{version}").into_bytes()
}

fn node_seal_key(
    shared: &[u8; 32],
    ephemeral_public: &[u8; 32],
    node_public: &[u8; 32],
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(NODE_SEAL_DOMAIN);
    hasher.update(shared);
    hasher.update(ephemeral_public);
    hasher.update(node_public);
    hasher.finalize().into()
}

/// Seals one version's values for a node. `ephemeral_private` and `nonce` must be fresh random
/// bytes for every call.
pub fn seal_for_node(
    node_public_key: &[u8; 32],
    node_id: &str,
    name: &str,
    version: u32,
    values: &SecretValues,
    ephemeral_private: [u8; 32],
    nonce: [u8; 24],
) -> SealedForNode {
    let ephemeral = x25519_dalek::StaticSecret::from(ephemeral_private);
    let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral
        .diffie_hellman(&x25519_dalek::PublicKey::from(*node_public_key))
        .to_bytes();
    let key = node_seal_key(&shared, &ephemeral_public, node_public_key);
    let plaintext = crate::codec::encode(crate::codec::Encoding::Postcard, values);
    let ciphertext = seal_with_key(
        &key,
        &nonce,
        &node_seal_aad(node_id, name, version),
        &plaintext,
    );
    SealedForNode {
        ephemeral_public_key: to_hex(&ephemeral_public),
        nonce: to_hex(&nonce),
        ciphertext: to_hex(&ciphertext),
    }
}

/// Opens a version sealed for this node. A tampered ciphertext, another node's seal, or a seal
/// moved to another name or version is refused.
pub fn open_for_node(
    node_private_key: &[u8; 32],
    node_id: &str,
    name: &str,
    version: u32,
    sealed: &SealedForNode,
) -> Result<SecretValues, SealError> {
    let does_not_open = || SealError::DoesNotOpen {
        node_id: node_id.to_string(),
        name: name.to_string(),
        version,
    };
    let ephemeral_public = key_from_hex("ephemeral_public_key", &sealed.ephemeral_public_key)?;
    let nonce: [u8; 24] = from_hex(&sealed.nonce)
        .and_then(|bytes| <[u8; 24]>::try_from(bytes.as_slice()).ok())
        .ok_or(SealError::BadKey {
            what: "nonce",
            expected: 24,
        })?;
    let ciphertext = from_hex(&sealed.ciphertext).ok_or_else(does_not_open)?;
    let secret = x25519_dalek::StaticSecret::from(*node_private_key);
    let node_public = x25519_dalek::PublicKey::from(&secret).to_bytes();
    let shared = secret
        .diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral_public))
        .to_bytes();
    let key = node_seal_key(&shared, &ephemeral_public, &node_public);
    let plaintext = open_with_key(
        &key,
        &nonce,
        &node_seal_aad(node_id, name, version),
        &ciphertext,
    )
    .map_err(|_| does_not_open())?;
    let values: SecretValues =
        postcard::from_bytes(&plaintext).map_err(|_| SealError::Malformed {
            name: name.to_string(),
            version,
        })?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> SecretValues {
        SecretValues(BTreeMap::from([
            ("password".to_string(), "hunter2".to_string()),
            ("user".to_string(), "app".to_string()),
        ]))
    }

    fn node_keys(seed: u8) -> ([u8; 32], [u8; 32]) {
        let private = [seed; 32];
        (private, sealing_public_key(&private))
    }

    #[test]
    fn a_seal_opens_only_for_its_node_name_and_version() {
        let (private, public) = node_keys(7);
        let sealed = seal_for_node(&public, "n1", "db", 3, &values(), [9; 32], [1; 24]);
        assert!(sealed.validate().is_ok());
        assert_eq!(
            open_for_node(&private, "n1", "db", 3, &sealed).unwrap(),
            values()
        );
        let (other, _) = node_keys(8);
        for (key, node, name, version) in [
            (other, "n1", "db", 3),
            (private, "n2", "db", 3),
            (private, "n1", "tls", 3),
            (private, "n1", "db", 4),
        ] {
            assert!(matches!(
                open_for_node(&key, node, name, version, &sealed),
                Err(SealError::DoesNotOpen { .. })
            ));
        }
    }

    #[test]
    fn a_tampered_seal_is_refused_and_the_error_holds_no_value() {
        let (private, public) = node_keys(7);
        let mut sealed = seal_for_node(&public, "n1", "db", 1, &values(), [9; 32], [1; 24]);
        let mut bytes = from_hex(&sealed.ciphertext).unwrap();
        bytes[0] ^= 1;
        sealed.ciphertext = to_hex(&bytes);
        let error = open_for_node(&private, "n1", "db", 1, &sealed).unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
        assert!(!format!("{:?}", values()).contains("hunter2"));
    }

    #[test]
    fn the_ciphertext_does_not_hold_the_value() {
        let (_, public) = node_keys(7);
        let sealed = seal_for_node(&public, "n1", "db", 1, &values(), [9; 32], [1; 24]);
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(!text.contains("hunter2"));
        assert!(!text.contains(&to_hex(b"hunter2")));
    }

    #[test]
    fn references_are_checked() {
        let good: SecretRef = serde_json::from_str(
            r#"{"name":"db","env":{"DB_PASSWORD":"password"},"files":{"cert.pem":"cert"}}"#,
        )
        .unwrap();
        assert!(check_secret_refs(std::slice::from_ref(&good)).is_ok());
        let mut bad = good.clone();
        bad.env.insert("1BAD".into(), "password".into());
        assert_eq!(
            check_secret_refs(&[bad]).unwrap_err().field,
            "secrets[0].env"
        );
        let mut bad = good.clone();
        bad.files.insert("../x".into(), "k".into());
        assert_eq!(
            check_secret_refs(&[bad]).unwrap_err().field,
            "secrets[0].files"
        );
        let error = check_secret_refs(&[good.clone(), good]).unwrap_err();
        assert_eq!(error.field, "secrets[1].name");
    }

    #[test]
    fn values_are_bounded_and_errors_hide_them() {
        let mut big = values();
        big.0
            .insert("blob".into(), "x".repeat(SECRET_VALUE_MAX_BYTES + 1));
        let error = big.validate().unwrap_err();
        assert_eq!(error.field, "values.blob");
        assert!(!error.value.contains("xxxx"));
        assert!(SecretValues::default().validate().is_err());
        let mut bad_key = values();
        bad_key.0.insert("a b".into(), "v".into());
        assert_eq!(bad_key.validate().unwrap_err().field, "values");
    }

    proptest::proptest! {
        #[test]
        fn opening_arbitrary_seals_never_panics(
            key in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            ephemeral in "[0-9a-f]{0,80}",
            nonce in "[0-9a-f]{0,60}",
            ciphertext in "[0-9a-fx]{0,200}",
        ) {
            let sealed = SealedForNode { ephemeral_public_key: ephemeral, nonce, ciphertext };
            let _ = sealed.validate();
            let _ = open_for_node(&key, "n1", "db", 1, &sealed);
        }
    }
}
