//! Secret versions at rest (P11): each version's values sealed with its own random data key
//! (XChaCha20-Poly1305; the ciphertext goes into the log), the data key wrapped by the master
//! key and kept in the config table, where rotation can re-wrap it and deletion can destroy it.

use outpost_proto::hash::{from_hex, to_hex};
use outpost_proto::secret::{SecretValues, open_with_key, seal_with_key};
use serde::{Deserialize, Serialize};

use super::master_key::{MasterKey, MasterKeyring};

/// A data key wrapped by a master key, as the config table keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedDataKey {
    pub master_key_id: String,
    pub nonce: String,
    pub wrapped: String,
}

/// A version's values sealed under its data key, as the log keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedVersion {
    pub nonce: String,
    pub ciphertext: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtRestError {
    #[error(
        "data key of secret {secret} version {version} is wrapped by master key {master_key_id}, which this control does not hold"
    )]
    UnknownMasterKey {
        secret: String,
        version: u32,
        master_key_id: String,
    },
    #[error(
        "secret {secret} version {version} does not open: its data key or ciphertext was changed"
    )]
    DoesNotOpen { secret: String, version: u32 },
    #[error("data key of secret {secret} version {version} is missing from the store")]
    MissingDataKey { secret: String, version: u32 },
}

/// Config-table key of a version's wrapped data key.
pub fn data_key_record(org: &str, name: &str, version: u32) -> String {
    format!("secret-data-key/{org}/{name}/{version}")
}

pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    bytes
}

fn values_aad(org: &str, name: &str, version: u32) -> Vec<u8> {
    format!("outpost secret values v1\0{org}\0{name}\0{version}").into_bytes()
}

fn data_key_aad(org: &str, name: &str, version: u32) -> Vec<u8> {
    format!("outpost data key v1\0{org}\0{name}\0{version}").into_bytes()
}

/// Wraps a data key with `master`.
pub fn wrap_data_key(
    master: &MasterKey,
    org: &str,
    name: &str,
    version: u32,
    data_key: &[u8; 32],
) -> WrappedDataKey {
    let nonce = random::<24>();
    let wrapped = seal_with_key(
        master.bytes(),
        &nonce,
        &data_key_aad(org, name, version),
        data_key,
    );
    WrappedDataKey {
        master_key_id: master.id.clone(),
        nonce: to_hex(&nonce),
        wrapped: to_hex(&wrapped),
    }
}

/// Unwraps a version's data key with whichever key of `keyring` wrapped it.
pub fn unwrap_data_key(
    keyring: &MasterKeyring,
    org: &str,
    name: &str,
    version: u32,
    wrapped: &WrappedDataKey,
) -> Result<[u8; 32], AtRestError> {
    let secret = format!("{org}/{name}");
    let master =
        keyring
            .by_id(&wrapped.master_key_id)
            .ok_or_else(|| AtRestError::UnknownMasterKey {
                secret: secret.clone(),
                version,
                master_key_id: wrapped.master_key_id.clone(),
            })?;
    let does_not_open = || AtRestError::DoesNotOpen {
        secret: secret.clone(),
        version,
    };
    let nonce: [u8; 24] = from_hex(&wrapped.nonce)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(does_not_open)?;
    let ciphertext = from_hex(&wrapped.wrapped).ok_or_else(does_not_open)?;
    let plain = open_with_key(
        master.bytes(),
        &nonce,
        &data_key_aad(org, name, version),
        &ciphertext,
    )
    .map_err(|_| does_not_open())?;
    plain.try_into().map_err(|_| does_not_open())
}

/// Seals a new version: returns what the log keeps and the wrapped data key.
pub fn seal_version(
    master: &MasterKey,
    org: &str,
    name: &str,
    version: u32,
    values: &SecretValues,
) -> (SealedVersion, WrappedDataKey) {
    let data_key = random::<32>();
    let nonce = random::<24>();
    let plaintext = serde_json::to_vec(values).unwrap_or_default();
    let ciphertext = seal_with_key(
        &data_key,
        &nonce,
        &values_aad(org, name, version),
        &plaintext,
    );
    (
        SealedVersion {
            nonce: to_hex(&nonce),
            ciphertext: to_hex(&ciphertext),
        },
        wrap_data_key(master, org, name, version, &data_key),
    )
}

/// Opens a version's values.
pub fn open_version(
    keyring: &MasterKeyring,
    org: &str,
    name: &str,
    version: u32,
    sealed: &SealedVersion,
    wrapped: &WrappedDataKey,
) -> Result<SecretValues, AtRestError> {
    let data_key = unwrap_data_key(keyring, org, name, version, wrapped)?;
    let does_not_open = || AtRestError::DoesNotOpen {
        secret: format!("{org}/{name}"),
        version,
    };
    let nonce: [u8; 24] = from_hex(&sealed.nonce)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(does_not_open)?;
    let ciphertext = from_hex(&sealed.ciphertext).ok_or_else(does_not_open)?;
    let plain = open_with_key(
        &data_key,
        &nonce,
        &values_aad(org, name, version),
        &ciphertext,
    )
    .map_err(|_| does_not_open())?;
    serde_json::from_slice(&plain).map_err(|_| does_not_open())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn values() -> SecretValues {
        SecretValues(BTreeMap::from([("password".into(), "s3cr3t-v4lue".into())]))
    }

    #[test]
    fn a_version_opens_with_its_master_key_only() {
        let master = MasterKey::generate();
        let keyring = MasterKeyring::new(vec![master.clone()]);
        let (sealed, wrapped) = seal_version(&master, "acme", "db", 1, &values());
        assert!(!sealed.ciphertext.contains(&to_hex(b"s3cr3t-v4lue")));
        assert_eq!(
            open_version(&keyring, "acme", "db", 1, &sealed, &wrapped).unwrap(),
            values()
        );
        let stranger = MasterKeyring::ephemeral();
        assert!(matches!(
            open_version(&stranger, "acme", "db", 1, &sealed, &wrapped),
            Err(AtRestError::UnknownMasterKey { .. })
        ));
        // Moved to another secret or version: refused.
        assert!(open_version(&keyring, "acme", "db", 2, &sealed, &wrapped).is_err());
        assert!(open_version(&keyring, "other", "db", 1, &sealed, &wrapped).is_err());
    }

    #[test]
    fn rewrapping_under_a_new_master_key_keeps_the_values() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let (sealed, wrapped) = seal_version(&old, "acme", "db", 3, &values());
        let data_key =
            unwrap_data_key(&MasterKeyring::new(vec![old]), "acme", "db", 3, &wrapped).unwrap();
        let rewrapped = wrap_data_key(&new, "acme", "db", 3, &data_key);
        let keyring = MasterKeyring::new(vec![new]);
        assert_eq!(
            open_version(&keyring, "acme", "db", 3, &sealed, &rewrapped).unwrap(),
            values()
        );
    }

    #[test]
    fn a_tampered_ciphertext_is_refused() {
        let master = MasterKey::generate();
        let (mut sealed, wrapped) = seal_version(&master, "acme", "db", 1, &values());
        let mut bytes = from_hex(&sealed.ciphertext).unwrap();
        bytes[3] ^= 0x40;
        sealed.ciphertext = to_hex(&bytes);
        let error = open_version(
            &MasterKeyring::new(vec![master]),
            "acme",
            "db",
            1,
            &sealed,
            &wrapped,
        )
        .unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"));
    }
}
