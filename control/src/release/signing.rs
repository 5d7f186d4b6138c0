//! The release signing key (U2): an ed25519 key pair made offline (`outpost-control admin
//! release-key`), whose private half signs agent binaries on the operator's machine
//! (`outpostctl artifacts sign --key FILE SHA256`) and never reaches control; control is given
//! only the public half, which agents pin at enrollment. ring, which rustls already links,
//! does the ed25519; the private key is a PKCS#8 document in a `PRIVATE KEY` PEM file.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use outpost_proto::release::signed_message;
use ring::signature::{Ed25519KeyPair, KeyPair};

const PEM_LABEL: &str = "PRIVATE KEY";

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot make a key pair: the system random source failed")]
    Random,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path} is not an ed25519 release key (PKCS#8 `PRIVATE KEY` PEM): {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{value:?} is not an artifact sha256 (64 lowercase hex characters)")]
    Sha256 { value: String },
}

/// A key pair written by [`write_key_pair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenKey {
    pub private_path: PathBuf,
    pub public_path: PathBuf,
    /// The public half, base64: what control is given (`--release-public-key`).
    pub public_base64: String,
}

/// Makes a key pair: the private half to `out` (0600, never overwriting a file), the public
/// half (base64) to `out.pub`.
pub fn write_key_pair(out: &Path) -> Result<WrittenKey, SigningError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| SigningError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| SigningError::Random)?;
    let public_base64 =
        base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref());
    let file_error = |path: &Path, reason: String| SigningError::File {
        path: path.to_path_buf(),
        reason,
    };
    let public_path = PathBuf::from(format!("{}.pub", out.display()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| file_error(out, format!("cannot create the private key file: {e}")))?;
        file.write_all(to_pem(pkcs8.as_ref()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| file_error(out, e.to_string()))?;
    }
    std::fs::write(&public_path, format!("{public_base64}\n"))
        .map_err(|e| file_error(&public_path, e.to_string()))?;
    Ok(WrittenKey {
        private_path: out.to_path_buf(),
        public_path,
        public_base64,
    })
}

fn to_pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    pem
}

/// Reads a key file written by [`write_key_pair`].
pub fn read_key(path: &Path) -> Result<Ed25519KeyPair, SigningError> {
    let text = std::fs::read_to_string(path).map_err(|e| SigningError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bad = |reason: &str| SigningError::Key {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let body: String = text
        .lines()
        .skip_while(|line| line.trim() != format!("-----BEGIN {PEM_LABEL}-----"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .map(str::trim)
        .collect();
    if body.is_empty() {
        return Err(bad("no PRIVATE KEY block"));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| bad("the PEM body is not base64"))?;
    Ed25519KeyPair::from_pkcs8(&der).map_err(|_| bad("not an ed25519 PKCS#8 key"))
}

/// Reads a public key file (`OUT.pub`: 32 bytes of base64) for `serve --release-public-key`.
pub fn read_public_key(path: &Path) -> Result<String, SigningError> {
    let text = std::fs::read_to_string(path).map_err(|e| SigningError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key = text.trim();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(bytes) if bytes.len() == outpost_proto::release::RELEASE_PUBLIC_KEY_BYTES => {
            Ok(key.to_string())
        }
        _ => Err(SigningError::Key {
            path: path.to_path_buf(),
            reason: format!(
                "a release public key is 32 bytes of base64 on one line (admin release-key writes OUT.pub), got {:?}",
                key.chars().take(60).collect::<String>()
            ),
        }),
    }
}

/// The release signature (base64) of the artifact `sha256`.
pub fn sign(key: &Ed25519KeyPair, sha256: &str) -> Result<String, SigningError> {
    let well_formed = sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return Err(SigningError::Sha256 {
            value: sha256.chars().take(80).collect(),
        });
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(key.sign(&signed_message(sha256))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ring::signature::{ED25519, UnparsedPublicKey};

    #[test]
    fn a_written_key_signs_what_its_public_half_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("release.key");
        let written = write_key_pair(&out).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&written.public_path)
                .unwrap()
                .contains(&written.public_base64)
        );
        // Never overwrites a key.
        assert!(write_key_pair(&out).is_err());
        let key = read_key(&out).unwrap();
        let sha = outpost_proto::hash::sha256_hex(b"agent");
        let signature = base64::engine::general_purpose::STANDARD
            .decode(sign(&key, &sha).unwrap())
            .unwrap();
        let public = base64::engine::general_purpose::STANDARD
            .decode(&written.public_base64)
            .unwrap();
        UnparsedPublicKey::new(&ED25519, &public)
            .verify(&signed_message(&sha), &signature)
            .unwrap();
    }

    #[test]
    fn bad_keys_and_hashes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-key");
        std::fs::write(&path, "hello").unwrap();
        let error = read_key(&path).unwrap_err().to_string();
        assert!(
            error.contains("not-a-key") && error.contains("no PRIVATE KEY"),
            "{error}"
        );
        let out = dir.path().join("k");
        write_key_pair(&out).unwrap();
        let key = read_key(&out).unwrap();
        let error = sign(&key, "ABC").unwrap_err().to_string();
        assert!(error.contains("\"ABC\""), "{error}");
        // The public half reads back; a private key is no public key.
        assert_eq!(
            read_public_key(&dir.path().join("k.pub")).unwrap().len(),
            44
        );
        let error = read_public_key(&out).unwrap_err().to_string();
        assert!(error.contains("32 bytes of base64"), "{error}");
    }
}
