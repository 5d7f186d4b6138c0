//! The upgrade checks on real files: signature, hash, architecture, slots and the boot counter.

use super::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn key_pair() -> (Ed25519KeyPair, String) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref());
    (pair, public)
}

fn sign(pair: &Ed25519KeyPair, sha256: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pair.sign(&signed_message(sha256)).as_ref())
}

/// A real ELF of this architecture: the test binary itself.
fn this_binary() -> Vec<u8> {
    std::fs::read(std::env::current_exe().unwrap()).unwrap()
}

fn upgrade_for(pair: &Ed25519KeyPair, bytes: &[u8]) -> AgentUpgrade {
    let sha256 = outpost_proto::hash::sha256_hex(bytes);
    AgentUpgrade {
        signature: sign(pair, &sha256),
        sha256,
    }
}

#[test]
fn a_signed_binary_for_this_arch_is_staged_in_the_inactive_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, public) = key_pair();
    let bytes = this_binary();
    let binary = dir.path().join("download");
    std::fs::write(&binary, &bytes).unwrap();
    let slots = Slots::new(dir.path());
    let upgrade = upgrade_for(&pair, &bytes);
    let slot = stage(&slots, Some(&public), &upgrade, &binary).unwrap();
    assert!(slot.ends_with("agent/slot-a"), "{}", slot.display());
    assert_eq!(std::fs::read(&slot).unwrap(), bytes);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&slot).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // Running from slot-a, the inactive one is slot-b.
    assert!(slots.inactive(&slot).ends_with("slot-b"));
    slots.point_current(&slot).unwrap();
    assert!(same_file(&slots.current_link(), &slot));
}

#[test]
fn bad_binaries_are_refused_by_name_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, public) = key_pair();
    let (other_pair, _) = key_pair();
    let slots = Slots::new(dir.path());
    let bytes = this_binary();
    let binary = dir.path().join("download");
    std::fs::write(&binary, &bytes).unwrap();
    let refused = |public: Option<&str>, upgrade: &AgentUpgrade, path: &Path| {
        let error = stage(&slots, public, upgrade, path)
            .unwrap_err()
            .to_string();
        assert!(
            !dir.path().join(SLOTS_DIR).join("slot-a").exists(),
            "{error}"
        );
        error
    };
    // Signed with another key.
    let wrong = upgrade_for(&other_pair, &bytes);
    let error = refused(Some(&public), &wrong, &binary);
    assert!(
        error.contains("does not verify with the pinned key"),
        "{error}"
    );
    // Unsigned (an empty signature) and no pinned key.
    let mut unsigned = upgrade_for(&pair, &bytes);
    unsigned.signature.clear();
    assert!(refused(Some(&public), &unsigned, &binary).contains("not 64 bytes"));
    let error = refused(None, &upgrade_for(&pair, &bytes), &binary);
    assert!(error.contains("no release public key is pinned"), "{error}");
    // Truncated: the bytes are not what was signed.
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = refused(Some(&public), &upgrade_for(&pair, &bytes), &truncated);
    assert!(error.contains("hashes to"), "{error}");
    // Another architecture, signed all the same.
    let mut other_arch = bytes.clone();
    other_arch[18..20].copy_from_slice(
        &(if own_machine().0 == 183 {
            62u16
        } else {
            183u16
        })
        .to_le_bytes(),
    );
    let other = dir.path().join("other-arch");
    std::fs::write(&other, &other_arch).unwrap();
    let error = refused(Some(&public), &upgrade_for(&pair, &other_arch), &other);
    assert!(error.contains("ELF machine"), "{error}");
    // Not an ELF at all.
    let script = b"#!/bin/sh\nexit 0\n".to_vec();
    let path = dir.path().join("script");
    std::fs::write(&path, &script).unwrap();
    let error = refused(Some(&public), &upgrade_for(&pair, &script), &path);
    assert!(error.contains("not a little-endian ELF"), "{error}");
}

#[test]
fn a_corrupted_slot_is_caught_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = this_binary();
    let sha256 = outpost_proto::hash::sha256_hex(&bytes);
    let slots = Slots::new(dir.path());
    let slot = slots.inactive(Path::new("/nonexistent"));
    slots.write(&slot, &bytes).unwrap();
    check_slot(&slot, &sha256).unwrap();
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&slot, &damaged).unwrap();
    let error = check_slot(&slot, &sha256).unwrap_err().to_string();
    assert!(error.contains("corrupted"), "{error}");
}

#[test]
fn the_previous_binary_rolls_back_when_the_new_one_kept_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open_for_boot(dir.path()).unwrap();
    let bytes = this_binary();
    let slots = Slots::new(dir.path());
    let slot = slots.inactive(Path::new("/nonexistent"));
    slots.write(&slot, &bytes).unwrap();
    // The new binary was started MAX_BOOTS times and never committed; this (the previous)
    // binary starts again: it stays, and says why.
    let record = UpgradeRecord {
        target_sha256: outpost_proto::hash::sha256_hex(&bytes),
        target_path: slot.clone(),
        previous_path: running_binary(),
        previous_sha256: Some("ab".repeat(32)),
        state: UpgradeState::Trying,
        message: String::new(),
        boots: MAX_BOOTS,
        deadline_unix: now_unix() + 60,
    };
    let after = at_boot(&store, dir.path(), Some(record)).unwrap();
    assert_eq!(after.state, UpgradeState::RolledBack);
    assert!(
        after.message.contains("stopped 2 times"),
        "{}",
        after.message
    );
    assert_eq!(store.state().unwrap().upgrade, Some(after));
    // The stable link was made, pointing at the running binary.
    assert!(same_file(&slots.current_link(), &running_binary()));
    // A corrupted slot is rolled back from at once, whatever the counter says.
    let mut record = store.state().unwrap().upgrade.unwrap();
    record.state = UpgradeState::Trying;
    record.boots = 1;
    std::fs::write(&slot, b"\x7fELF damaged").unwrap();
    let after = at_boot(&store, dir.path(), Some(record)).unwrap();
    assert_eq!(after.state, UpgradeState::RolledBack);
    assert!(after.message.contains("corrupted"), "{}", after.message);
    // What the node reports.
    let upgrades = Upgrades::new(Some(after));
    let build = upgrades.build();
    assert_eq!(build.version, version());
    // Back on the previous binary, it reports that one's sha256.
    assert_eq!(build.sha256, Some("ab".repeat(32)));
    assert_eq!(build.upgrade.unwrap().state, UpgradeState::RolledBack);
}
