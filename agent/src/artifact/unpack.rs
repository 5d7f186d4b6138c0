//! Unpacking a verified artifact into a fresh directory: a `.tar` or `.tar.gz` archive entry by
//! entry, or a single file (a static binary) placed as `artifact`. Every entry is checked
//! before anything is written: absolute paths, `..`, device files and links that leave the
//! directory are refused naming the entry, and no entry may be written through a link the
//! archive made (so a checked path is the path written). The result is a manifest of every
//! file's size and sha256, against which the cache checks the tree at boot.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name a single-file artifact gets inside its directory.
pub const SINGLE_FILE_NAME: &str = "artifact";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry {entry:?} is refused: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("archive is not readable at entry {entry:?}: {reason}")]
    Malformed { entry: String, reason: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// What the tree holds: regular files with size and sha256, and links with their targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, FileDigest>,
    #[serde(default)]
    pub links: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size_bytes: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size_bytes).sum()
    }
}

/// The kind of artifact, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    Gzip,
    Tar,
    SingleFile,
}

/// Looks at the first bytes: gzip magic, or `ustar` at offset 257.
pub fn detect_kind(head: &[u8]) -> ArtifactKind {
    if head.starts_with(&[0x1f, 0x8b]) {
        ArtifactKind::Gzip
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        ArtifactKind::Tar
    } else {
        ArtifactKind::SingleFile
    }
}

/// Checks an entry path and returns it as a clean relative path (pure).
pub fn safe_relative_path(entry: &str) -> Result<PathBuf, String> {
    let path = Path::new(entry);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into());
            }
            Component::ParentDir => return Err("'..' is not allowed".into()),
        }
    }
    Ok(clean)
}

/// Whether a link at `link_path` (clean, relative) pointing to `target` stays inside (pure).
pub fn link_stays_inside(link_path: &Path, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> = link_path
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(part) => Some(part),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for component in Path::new(target).components() {
        match component {
            Component::Normal(part) => depth.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpacks `blob` into the (fresh, empty) directory `into`.
pub fn unpack(blob: &Path, into: &Path) -> Result<Manifest, UnpackError> {
    let mut head = vec![0u8; 512];
    let read = {
        let mut file = File::open(blob).map_err(io("open", blob))?;
        read_up_to(&mut file, &mut head).map_err(io("read", blob))?
    };
    head.truncate(read);
    let file = BufReader::new(File::open(blob).map_err(io("open", blob))?);
    match detect_kind(&head) {
        ArtifactKind::Gzip => unpack_tar(flate2::read::GzDecoder::new(file), into),
        ArtifactKind::Tar => unpack_tar(file, into),
        ArtifactKind::SingleFile => {
            let mut manifest = Manifest::default();
            let target = into.join(SINGLE_FILE_NAME);
            let digest = copy_file(file, &target, 0o755)?;
            manifest.files.insert(SINGLE_FILE_NAME.to_string(), digest);
            Ok(manifest)
        }
    }
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn copy_file(mut from: impl Read, to: &Path, mode: u32) -> Result<FileDigest, UnpackError> {
    let mut out = File::create(to).map_err(io("create", to))?;
    let mut hasher = Sha256::new();
    let mut size_bytes = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(UnpackError::Malformed {
                    entry: to.display().to_string(),
                    reason: error.to_string(),
                });
            }
        };
        hasher.update(&buffer[..read]);
        out.write_all(&buffer[..read]).map_err(io("write", to))?;
        size_bytes += read as u64;
    }
    out.sync_all().map_err(io("sync", to))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", to))?;
    Ok(FileDigest {
        size_bytes,
        sha256: outpost_proto::hash::to_hex(&hasher.finalize()),
    })
}

fn unpack_tar(reader: impl Read, into: &Path) -> Result<Manifest, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut manifest = Manifest::default();
    let mut links: BTreeSet<PathBuf> = BTreeSet::new();
    let entries = archive.entries().map_err(|e| UnpackError::Malformed {
        entry: String::new(),
        reason: e.to_string(),
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| UnpackError::Malformed {
            entry: String::new(),
            reason: e.to_string(),
        })?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: String| UnpackError::UnsafeEntry {
            entry: raw.clone(),
            reason,
        };
        let relative = safe_relative_path(&raw).map_err(refuse)?;
        if relative.as_os_str().is_empty() {
            continue; // "./"
        }
        if let Some(through) = relative.ancestors().skip(1).find(|a| links.contains(*a)) {
            return Err(refuse(format!(
                "it lies under the link {} the archive made",
                through.display()
            )));
        }
        let target = into.join(&relative);
        let kind = entry.header().entry_type();
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let key = relative.to_string_lossy().into_owned();
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(io("create", &target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                let digest = copy_file(entry, &target, mode)?;
                manifest.files.insert(key, digest);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let link_target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.to_string_lossy().into_owned())
                    .ok_or_else(|| refuse("the link has no target".into()))?;
                if kind == tar::EntryType::Symlink {
                    if !link_stays_inside(&relative, &link_target) {
                        return Err(refuse(format!(
                            "its link target {link_target:?} leaves the artifact"
                        )));
                    }
                    std::os::unix::fs::symlink(&link_target, &target)
                        .map_err(io("link", &target))?;
                    links.insert(relative.clone());
                    manifest.links.insert(key, link_target);
                } else {
                    // A hard link names another entry of the archive by its path.
                    let source = safe_relative_path(&link_target).map_err(|reason| {
                        refuse(format!("its link target {link_target:?}: {reason}"))
                    })?;
                    let digest = manifest
                        .files
                        .get(source.to_string_lossy().as_ref())
                        .cloned()
                        .ok_or_else(|| {
                            refuse(format!(
                                "its link target {link_target:?} is not a file earlier in the archive"
                            ))
                        })?;
                    std::fs::hard_link(into.join(&source), &target).map_err(io("link", &target))?;
                    manifest.files.insert(key, digest);
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(refuse(format!(
                    "entries of type {other:?} (devices, fifos) are not allowed"
                )));
            }
        }
    }
    Ok(manifest)
}

/// Checks a tree against its manifest: every file present with its size and sha256, every
/// link with its target. Returns the first difference.
pub fn check_tree(root: &Path, manifest: &Manifest) -> Result<(), String> {
    for (relative, expected) in &manifest.files {
        let path = root.join(relative);
        let file = File::open(&path).map_err(|e| format!("file {relative}: {e}"))?;
        let mut hasher = Sha256::new();
        let size_bytes = std::io::copy(&mut BufReader::new(file), &mut HashWriter(&mut hasher))
            .map_err(|e| format!("file {relative}: {e}"))?;
        let sha256 = outpost_proto::hash::to_hex(&hasher.finalize());
        if size_bytes != expected.size_bytes || sha256 != expected.sha256 {
            return Err(format!(
                "file {relative} is {size_bytes} bytes with sha256 {sha256}, expected {} bytes with {}",
                expected.size_bytes, expected.sha256
            ));
        }
    }
    for (relative, expected) in &manifest.links {
        let found =
            std::fs::read_link(root.join(relative)).map_err(|e| format!("link {relative}: {e}"))?;
        if found.to_string_lossy() != expected.as_str() {
            return Err(format!(
                "link {relative} points to {}, expected {expected}",
                found.display()
            ));
        }
    }
    Ok(())
}

/// Feeds written bytes to a hasher.
pub struct HashWriter<'a>(pub &'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a tar in memory with raw header paths, so unsafe names can be written.
    fn tar_with(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o755);
            // set_path refuses '..'; write the raw name as a hostile archive would.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<Manifest, UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, bytes).unwrap();
        let into = dir.path().join("out");
        std::fs::create_dir(&into).unwrap();
        let result = unpack(&blob, &into);
        (dir, result)
    }

    #[test]
    fn a_tar_gz_unpacks_with_modes_and_a_manifest() {
        let tar = tar_with(&[
            ("bin/", tar::EntryType::Directory, "", b""),
            (
                "bin/app",
                tar::EntryType::Regular,
                "",
                b"#!/bin/sh\necho hi\n",
            ),
            ("current", tar::EntryType::Symlink, "bin", b""),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let (dir, result) = unpack_bytes(&gz.finish().unwrap());
        let manifest = result.unwrap();
        let out = dir.path().join("out");
        let mode = std::fs::metadata(out.join("bin/app"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(manifest.files["bin/app"].size_bytes, 18);
        assert_eq!(manifest.links["current"], "bin");
        check_tree(&out, &manifest).unwrap();
        std::fs::write(out.join("bin/app"), b"#!/bin/sh\necho evil\n").unwrap();
        let difference = check_tree(&out, &manifest).unwrap_err();
        assert!(difference.contains("bin/app"), "{difference}");
    }

    #[test]
    fn a_single_file_becomes_artifact() {
        let (dir, result) = unpack_bytes(b"\x7fELF not really");
        let manifest = result.unwrap();
        assert!(manifest.files.contains_key(SINGLE_FILE_NAME));
        assert!(dir.path().join("out/artifact").exists());
    }

    #[test]
    fn unsafe_entries_are_refused_by_name() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_with(&[("../evil", tar::EntryType::Regular, "", b"x")]),
                "../evil",
            ),
            (
                tar_with(&[("/etc/evil", tar::EntryType::Regular, "", b"x")]),
                "/etc/evil",
            ),
            (
                tar_with(&[("up", tar::EntryType::Symlink, "../..", b"")]),
                "up",
            ),
            (
                tar_with(&[("abs", tar::EntryType::Symlink, "/etc", b"")]),
                "abs",
            ),
            (
                tar_with(&[
                    ("here", tar::EntryType::Symlink, ".", b""),
                    ("here/x", tar::EntryType::Regular, "", b"x"),
                ]),
                "here/x",
            ),
            (tar_with(&[("dev", tar::EntryType::Char, "", b"")]), "dev"),
            (
                tar_with(&[("hard", tar::EntryType::Link, "/etc/passwd", b"")]),
                "hard",
            ),
        ];
        for (bytes, entry) in cases {
            let (dir, result) = unpack_bytes(&bytes);
            match result {
                Err(UnpackError::UnsafeEntry { entry: named, .. }) => assert_eq!(named, entry),
                other => panic!("{entry}: expected a refusal, got {other:?}"),
            }
            assert!(!dir.path().join("evil").exists());
        }
    }

    proptest! {
        /// A path that passes the check never leaves the directory.
        #[test]
        fn safe_paths_stay_inside(parts in proptest::collection::vec(prop_oneof![
            Just("..".to_string()), Just(".".to_string()), Just("".to_string()), "[a-z]{1,3}"
        ], 1..6), absolute in any::<bool>()) {
            let joined = format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"));
            if let Ok(clean) = safe_relative_path(&joined) {
                prop_assert!(clean.components().all(|c| matches!(c, Component::Normal(_))));
            }
        }

        /// A link judged inside resolves, lexically, to a path inside.
        #[test]
        fn inside_links_resolve_inside(depth in 0usize..4, ups in 0usize..6, down in "[a-z]{0,3}") {
            let link: PathBuf = (0..depth).map(|i| format!("d{i}")).chain(["l".to_string()]).collect();
            let target = format!("{}{}", "../".repeat(ups), down);
            prop_assert_eq!(link_stays_inside(&link, &target), ups <= depth);
        }
    }
}
