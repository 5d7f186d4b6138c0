//! Secrets on the node (P11): the node's X25519 sealing key (made here, kept in the identity
//! record, never sent), and the unsealing of a plan's secret versions at the moment a process
//! starts — as environment variables, or as 0400 files in a per-instance directory
//! (`OUTPOST_SECRETS_DIR`) on tmpfs where the host has one (else a 0700 directory under the
//! data directory, and status says so). The plan keeps them sealed; nothing is unsealed except
//! to start a process, and a version that does not open (tampered, or sealed for another node)
//! keeps the process from starting and is reported.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use outpost_proto::hash::{sha256_hex, to_hex};
use outpost_proto::plan::Allocation;
use outpost_proto::secret::{NodeSecret, SealError, open_for_node, sealing_public_key};

/// Environment variable naming the instance's secrets directory.
pub const SECRETS_DIR_ENV: &str = "OUTPOST_SECRETS_DIR";
const TMPFS: &str = "/dev/shm";

/// Why an instance's secrets could not be handed over. Never carries a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefusal {
    #[error("waiting for secret {name}: control has not delivered it to this node yet")]
    NotDelivered { name: String },
    #[error("secret {name} refused: {source}")]
    DoesNotOpen { name: String, source: SealError },
    #[error("secret {name} version {version} has no key {key}")]
    MissingKey {
        name: String,
        version: u32,
        key: String,
    },
    #[error("this agent has no sealing key; secrets cannot be opened")]
    NoSealingKey,
    #[error("cannot write secret files in {dir}: {reason}")]
    Io { dir: String, reason: String },
}

/// Where instances' secret directories go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretsRoot {
    pub dir: PathBuf,
    pub on_tmpfs: bool,
}

impl SecretsRoot {
    /// `/dev/shm/outpost-secrets-HASH` (HASH of the data directory, so two agents of one host
    /// never share it) when `/dev/shm` is a writable tmpfs, else `DATA_DIR/secrets`.
    pub fn choose(data_dir: &Path) -> SecretsRoot {
        let tmpfs = Path::new(TMPFS);
        let is_tmpfs = nix::sys::statfs::statfs(tmpfs)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let hash = sha256_hex(canonical.as_os_str().as_encoded_bytes());
        // Made only when an instance needs files, and removed again when the last goes.
        let writable = nix::unistd::access(tmpfs, nix::unistd::AccessFlags::W_OK).is_ok();
        if is_tmpfs && writable {
            let dir = tmpfs.join(format!("outpost-secrets-{}", &hash[..12]));
            return SecretsRoot {
                dir,
                on_tmpfs: true,
            };
        }
        SecretsRoot {
            dir: data_dir.join("secrets"),
            on_tmpfs: false,
        }
    }

    /// The note status shows when secret files cannot go to tmpfs.
    pub fn note(&self) -> Option<String> {
        (!self.on_tmpfs).then(|| {
            format!(
                "no writable tmpfs at {TMPFS}: secret files go to {} (mode 0700) on disk",
                self.dir.display()
            )
        })
    }

    pub fn instance_dir(&self, allocation_id: &str) -> PathBuf {
        self.dir.join(allocation_id)
    }

    /// Removes an instance's secret files (it stopped, restarts or moved away).
    pub fn remove_instance(&self, allocation_id: &str) {
        let dir = self.instance_dir(allocation_id);
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(
                component = "secrets",
                action = "remove_files",
                allocation_id,
                "cannot remove secret files {}: {error}",
                dir.display()
            );
        }
        // The root goes with its last instance (fails, harmlessly, while others remain).
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Removes the secret directories of every instance not in `keep` (at boot: instances that
    /// ended while the agent was down).
    pub fn sweep(&self, keep: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                self.remove_instance(&name);
            }
        }
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// The hash that decides whether a running instance is current: its spec, and for instances
/// that use secrets the versions they use, so a new version restarts them. Without secrets it
/// is the plain spec hash (what older agents recorded).
pub fn desired_hash(allocation: &Allocation, secrets: &[NodeSecret]) -> String {
    let spec_hash = allocation.spec_hash();
    if allocation.spec.secrets.is_empty() {
        return spec_hash;
    }
    let versions: Vec<String> = allocation
        .spec
        .secrets
        .iter()
        .map(|reference| {
            let version = secrets
                .iter()
                .find(|s| s.name == reference.name)
                .map_or(0, |s| s.version);
            format!("{}={version}", reference.name)
        })
        .collect();
    sha256_hex(format!("{spec_hash}|{}", versions.join(",")).as_bytes())
}

/// Opens the secrets `allocation` references and hands them over: returns the environment
/// variables to add, and writes 0400 files into the instance's directory when the allocation
/// asks for files. Nothing is written unless every secret opens.
pub fn materialize(
    sealing_key: Option<&[u8; 32]>,
    node_id: &str,
    allocation: &Allocation,
    secrets: &[NodeSecret],
    root: &SecretsRoot,
) -> Result<BTreeMap<String, String>, SecretRefusal> {
    let mut env = BTreeMap::new();
    let mut files: Vec<(String, String)> = Vec::new();
    if allocation.spec.secrets.is_empty() {
        return Ok(env);
    }
    let key = sealing_key.ok_or(SecretRefusal::NoSealingKey)?;
    for reference in &allocation.spec.secrets {
        let name = reference.name.to_string();
        let delivered = secrets
            .iter()
            .find(|s| s.name == reference.name)
            .ok_or_else(|| SecretRefusal::NotDelivered { name: name.clone() })?;
        let values = open_for_node(key, node_id, &name, delivered.version, &delivered.sealed)
            .map_err(|source| SecretRefusal::DoesNotOpen {
                name: name.clone(),
                source,
            })?;
        let value_of = |key: &String| {
            values
                .get(key)
                .map(str::to_string)
                .ok_or_else(|| SecretRefusal::MissingKey {
                    name: name.clone(),
                    version: delivered.version,
                    key: key.clone(),
                })
        };
        for (variable, key) in &reference.env {
            env.insert(variable.clone(), value_of(key)?);
        }
        for (file, key) in &reference.files {
            files.push((file.clone(), value_of(key)?));
        }
    }
    let id = allocation.id.as_str();
    root.remove_instance(id);
    if !files.is_empty() {
        let dir = root.instance_dir(id);
        let io = |error: std::io::Error| SecretRefusal::Io {
            dir: dir.display().to_string(),
            reason: error.to_string(),
        };
        make_private_dir(&root.dir).map_err(io)?;
        make_private_dir(&dir).map_err(io)?;
        for (file, value) in &files {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(dir.join(file))
                .map_err(io)?;
            out.write_all(value.as_bytes()).map_err(io)?;
        }
        env.insert(SECRETS_DIR_ENV.to_string(), dir.display().to_string());
    }
    Ok(env)
}

/// The node's sealing key from the identity record, or a fresh one (which the caller stores
/// before anything sends the public half). Returns the key and whether it is new.
pub fn load_or_generate_key(stored_hex: Option<&str>) -> Result<([u8; 32], bool), String> {
    if let Some(hex) = stored_hex {
        let key = outpost_proto::secret::key_from_hex("stored sealing key", hex)
            .map_err(|e| e.to_string())?;
        return Ok((key, false));
    }
    let key = crate::os::random_bytes::<32>()
        .map_err(|e| format!("cannot read /dev/urandom for the sealing key: {e}"))?;
    Ok((key, true))
}

/// The public half of the identity's sealing key, as registration sends it (64 hex).
pub fn public_key_of(identity: &crate::store::Identity) -> Option<String> {
    let hex = identity.sealing_private_key_hex.as_deref()?;
    let key = outpost_proto::secret::key_from_hex("stored sealing key", hex).ok()?;
    Some(public_key_hex(&key))
}

/// The public half, as registration sends it (64 hex).
pub fn public_key_hex(private_key: &[u8; 32]) -> String {
    to_hex(&sealing_public_key(private_key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use outpost_proto::secret::{SecretValues, seal_for_node};

    fn allocation(refs_json: &str) -> Allocation {
        let spec = serde_json::from_str(&format!(
            r#"{{"name":"web","command":"/bin/true","secrets":{refs_json}}}"#
        ))
        .unwrap();
        Allocation {
            id: "web-1".try_into().unwrap(),
            node_id: "n1".try_into().unwrap(),
            service: "web".try_into().unwrap(),
            seq: 1,
            spec,
        }
    }

    fn delivered(private: &[u8; 32], node: &str, version: u32) -> NodeSecret {
        let values = SecretValues(BTreeMap::from([
            ("password".to_string(), format!("pw-{version}")),
            ("cert".to_string(), "CERT".to_string()),
        ]));
        NodeSecret {
            name: "db".try_into().unwrap(),
            version,
            seq: u64::from(version),
            sealed: seal_for_node(
                &sealing_public_key(private),
                node,
                "db",
                version,
                &values,
                [3; 32],
                [4; 24],
            ),
        }
    }

    fn root() -> (tempfile::TempDir, SecretsRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = SecretsRoot {
            dir: dir.path().join("secrets"),
            on_tmpfs: false,
        };
        (dir, root)
    }

    #[test]
    fn env_and_0400_files_are_handed_over_and_removed() {
        let key = [9u8; 32];
        let (_dir, root) = root();
        let allocation = allocation(
            r#"[{"name":"db","env":{"DB_PASSWORD":"password"},"files":{"cert.pem":"cert"}}]"#,
        );
        let env = materialize(
            Some(&key),
            "n1",
            &allocation,
            &[delivered(&key, "n1", 2)],
            &root,
        )
        .unwrap();
        assert_eq!(env["DB_PASSWORD"], "pw-2");
        let file = root.instance_dir("web-1").join("cert.pem");
        assert_eq!(
            env[SECRETS_DIR_ENV],
            root.instance_dir("web-1").display().to_string()
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "CERT");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o400);
        // A second start rewrites them; a stop removes them.
        materialize(
            Some(&key),
            "n1",
            &allocation,
            &[delivered(&key, "n1", 3)],
            &root,
        )
        .unwrap();
        root.remove_instance("web-1");
        assert!(!root.instance_dir("web-1").exists());
    }

    #[test]
    fn a_tampered_or_foreign_seal_starts_nothing_and_says_so() {
        let key = [9u8; 32];
        let (_dir, root) = root();
        let allocation = allocation(
            r#"[{"name":"db","env":{"DB_PASSWORD":"password"},"files":{"cert.pem":"cert"}}]"#,
        );
        let mut tampered = delivered(&key, "n1", 1);
        let mut bytes = outpost_proto::hash::from_hex(&tampered.sealed.ciphertext).unwrap();
        bytes[5] ^= 1;
        tampered.sealed.ciphertext = to_hex(&bytes);
        let error = materialize(Some(&key), "n1", &allocation, &[tampered], &root).unwrap_err();
        assert!(
            matches!(error, SecretRefusal::DoesNotOpen { .. }),
            "{error}"
        );
        assert!(!error.to_string().contains("pw-1"));
        assert!(!root.instance_dir("web-1").exists());
        let foreign = delivered(&key, "n2", 1);
        assert!(materialize(Some(&key), "n1", &allocation, &[foreign], &root).is_err());
        assert!(matches!(
            materialize(Some(&key), "n1", &allocation, &[], &root),
            Err(SecretRefusal::NotDelivered { .. })
        ));
    }

    #[test]
    fn a_new_version_changes_the_desired_hash_only_for_its_users() {
        let key = [9u8; 32];
        let user = allocation(r#"[{"name":"db","env":{"DB_PASSWORD":"password"}}]"#);
        let v1 = desired_hash(&user, &[delivered(&key, "n1", 1)]);
        let v2 = desired_hash(&user, &[delivered(&key, "n1", 2)]);
        assert_ne!(v1, v2);
        let plain = allocation("[]");
        assert_eq!(
            desired_hash(&plain, &[delivered(&key, "n1", 2)]),
            plain.spec_hash()
        );
    }
}
