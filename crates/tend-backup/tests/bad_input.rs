//! Bad archives and keys: each is refused with one clear error, and restore leaves no
//! trace (neither the new home nor its temporary sibling exists afterwards).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ed25519_dalek::{Signer, SigningKey};
use tend_backup::format::{member, FRAME_LEN};
use tend_backup::{export_file, verify_file, BackupError, Decryption, Encryption, ExportOptions};
use tend_core::maintenance::{MaintenanceFact, SnapshotCompleted};
use tend_core::{Payload, UnsignedFact, VerifiedFact};
use tend_node::Device;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    device: Device,
    enc: Encryption,
    dec: Decryption,
    archive: PathBuf,
    bytes: Vec<u8>,
}

/// A one-device authority with a snapshot and `n` facts on either side of it.
fn fixture(n: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let d = device(&root, "source");
    add_facts(&d, n, 1..=3, "before");
    let d = snapshot(vec![d], 4).pop().unwrap();
    add_facts(&d, n, 4..=6, "after");
    let (enc, dec) = x25519();
    let archive = root.join("good.age");
    export_file(
        d.store(),
        d.namespace(),
        &archive,
        &ExportOptions::new(&enc),
    )
    .unwrap();
    let bytes = std::fs::read(&archive).unwrap();
    Fixture {
        _dir: dir,
        root,
        device: d,
        enc,
        dec,
        archive,
        bytes,
    }
}

/// Restores `archive` into a new home under `root`; asserts it failed, said so in one
/// line, and left nothing behind.
fn refused(root: &Path, archive: &Path, dec: &Decryption) -> BackupError {
    let home = root.join("target");
    let err = restore(archive, dec, &home).expect_err("restore must fail");
    let line = err.to_string();
    assert!(!line.contains('\n') && !line.is_empty(), "{line:?}");
    assert!(!home.exists(), "the target exists after: {line}");
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("target"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    err
}

fn refused_bytes(f: &Fixture, name: &str, bytes: &[u8], dec: &Decryption) -> BackupError {
    let p = write(&f.root, name, bytes);
    let err = refused(&f.root, &p, dec);
    std::fs::remove_file(p).unwrap();
    err
}

#[test]
fn the_good_archive_restores() {
    let f = fixture(50);
    restore(&f.archive, &f.dec, &f.root.join("ok")).unwrap();
}

#[test]
fn wrong_key_and_wrong_passphrase_are_refused() {
    let f = fixture(50);
    let (_, other) = x25519();
    let e = refused(&f.root, &f.archive, &other);
    assert!(matches!(e, BackupError::WrongKey), "{e}");
    let e = refused(&f.root, &f.archive, &Decryption::Passphrase("guess".into()));
    assert!(matches!(e, BackupError::WrongKey), "{e}");

    let enc = Encryption::Passphrase {
        passphrase: "right".into(),
        work_factor: Some(10),
    };
    let p = f.root.join("pass.age");
    export_file(
        f.device.store(),
        f.device.namespace(),
        &p,
        &ExportOptions::new(&enc),
    )
    .unwrap();
    let e = refused(&f.root, &p, &Decryption::Passphrase("wrong".into()));
    assert!(matches!(e, BackupError::WrongKey), "{e}");
    let e = refused(&f.root, &p, &f.dec);
    assert!(matches!(e, BackupError::WrongKey), "{e}");
    assert!(verify_file(&p, &Decryption::Passphrase("right".into()), None).is_ok());
}

#[test]
fn truncated_files_are_refused() {
    let f = fixture(50);
    let len = f.bytes.len();
    for cut in [
        0,
        1,
        20,
        100,
        200,
        len / 3,
        len / 2,
        len - 200,
        len - 17,
        len - 1,
    ] {
        let e = refused_bytes(&f, "cut.age", &f.bytes[..cut], &f.dec);
        assert!(
            matches!(
                e,
                BackupError::Damaged(_) | BackupError::NotAnAgeFile(_) | BackupError::WrongKey
            ),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let f = fixture(50);
    let len = f.bytes.len();
    // Every byte of the age header and the first payload bytes, then a stride over the rest.
    let mut positions: Vec<usize> = (0..400.min(len)).collect();
    positions.extend((400..len).step_by((len / 300).max(1)));
    positions.push(len - 1);
    for pos in positions {
        let mut bytes = f.bytes.clone();
        bytes[pos] ^= 0x20;
        let p = write(&f.root, "flip.age", &bytes);
        let e = verify_file(&p, &f.dec, None).expect_err("a flipped byte must be caught");
        assert!(!e.to_string().contains('\n'), "{e:?}");
    }
    // And through restore, in a larger archive whose late chunks fail only after the new
    // store was created and partly written: nothing may remain.
    let big = fixture(3_000);
    let len = big.bytes.len();
    assert!(len > 4 * 65_536, "several age chunks: {len}");
    for pos in [len / 5, len / 2, len - 70_000, len - 5_000, len - 20] {
        let mut bytes = big.bytes.clone();
        bytes[pos] ^= 0x01;
        let e = refused_bytes(&big, "flip.age", &bytes, &big.dec);
        assert!(matches!(e, BackupError::Damaged(_)), "at {pos}: {e}");
    }
}

#[test]
fn not_an_archive_is_refused() {
    let f = fixture(5);
    let e = refused_bytes(&f, "junk.age", b"this is not an age file\n", &f.dec);
    assert!(matches!(e, BackupError::NotAnAgeFile(_)), "{e}");
    let e = refused(&f.root, &f.root.join("missing.age"), &f.dec);
    assert!(matches!(e, BackupError::Io { .. }), "{e}");
}

#[test]
fn a_newer_format_is_refused() {
    let f = fixture(5);
    let mut members = unpack(&f.bytes, &f.dec);
    let (name, header) = &mut members[0];
    assert_eq!(name, member::HEADER);
    let mut h: tend_backup::Header = serde_json::from_slice(header).unwrap();
    h.version = tend_backup::ARCHIVE_FORMAT_VERSION + 1;
    *header = serde_json::to_vec(&h).unwrap();
    let e = refused_bytes(&f, "newer.age", &repack(&members, &f.enc, false), &f.dec);
    assert!(
        matches!(e, BackupError::NewerFormat { found, .. } if found == tend_backup::ARCHIVE_FORMAT_VERSION + 1),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade tend"));
}

/// Splits framed facts.
fn frames(bytes: &[u8]) -> Vec<VerifiedFact> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..FRAME_LEN].try_into().unwrap()) as usize;
        out.push(VerifiedFact::decode(&rest[FRAME_LEN..FRAME_LEN + len]).unwrap());
        rest = &rest[FRAME_LEN + len..];
    }
    out
}

fn framed(facts: &[VerifiedFact]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in facts {
        out.extend_from_slice(&(f.bytes().len() as u32).to_be_bytes());
        out.extend_from_slice(f.bytes());
    }
    out
}

#[test]
fn a_snapshot_signed_by_another_authority_is_refused() {
    let f = fixture(20);
    let mut members = unpack(&f.bytes, &f.dec);
    let anchor = members
        .iter_mut()
        .find(|(n, _)| n == member::ANCHOR)
        .unwrap();
    let mut facts = frames(&anchor.1);
    let completion = facts.pop().unwrap();
    let Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) = completion.payload() else {
        panic!("the anchor ends with the completion");
    };
    // The same snapshot, signed by a key that is not this authority's group key, in a
    // fact a real member signed: only the threshold signature is wrong.
    let other = SigningKey::from_bytes(&[9; 32]);
    let msg = c
        .snapshot
        .signing_message(&completion.namespace(), &c.proposal_id);
    let forged = SnapshotCompleted {
        proposal_id: c.proposal_id,
        snapshot: c.snapshot.clone(),
        threshold_signature: other.sign(&msg).to_bytes(),
    };
    let forged = UnsignedFact {
        namespace: completion.namespace(),
        epoch: completion.epoch(),
        payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(forged)),
    }
    .sign(f.device.key().signing_key());
    // The anchor ends at the completion: state facts that now sort after it go.
    facts.retain(|x| x.order_key() < forged.order_key());
    facts.push(forged);
    anchor.1 = framed(&facts);
    let e = refused_bytes(&f, "forged.age", &repack(&members, &f.enc, false), &f.dec);
    assert!(
        matches!(
            e,
            BackupError::Snapshot(tend_snapshot::HydrateError::BadSignature)
        ),
        "{e}"
    );

    // The snapshot (anchor and blob) of a different authority under this one's header.
    let g = fixture(20);
    let theirs = unpack(&g.bytes, &g.dec);
    let mut members = unpack(&f.bytes, &f.dec);
    for (name, data) in members.iter_mut() {
        if name == member::PREFIX || name == member::ANCHOR || name == member::BLOB {
            *data = theirs.iter().find(|(n, _)| n == name).unwrap().1.clone();
        }
    }
    let e = refused_bytes(&f, "spliced.age", &repack(&members, &f.enc, false), &f.dec);
    assert!(matches!(e, BackupError::WrongNamespace { .. }), "{e}");
}

#[test]
fn tampered_members_and_facts_are_refused() {
    let f = fixture(200);
    let first_tail = member::tail(0);

    // A tail fact dropped, the manifest left as it was: the member hash differs.
    let mut members = unpack(&f.bytes, &f.dec);
    let tail = members.iter_mut().find(|(n, _)| *n == first_tail).unwrap();
    let mut facts = frames(&tail.1);
    facts.pop();
    tail.1 = framed(&facts);
    let e = refused_bytes(&f, "t1.age", &repack(&members, &f.enc, true), &f.dec);
    assert!(matches!(e, BackupError::ManifestMismatch(_)), "{e}");
    // The same with honest member hashes: the counts and the tail digest differ.
    let e = refused_bytes(&f, "t2.age", &repack(&members, &f.enc, false), &f.dec);
    assert!(matches!(e, BackupError::ManifestMismatch(_)), "{e}");

    // A fact whose signature no longer verifies.
    let mut members = unpack(&f.bytes, &f.dec);
    let tail = members.iter_mut().find(|(n, _)| *n == first_tail).unwrap();
    let last = tail.1.len() - 1;
    tail.1[last] ^= 0x01;
    let e = refused_bytes(&f, "t3.age", &repack(&members, &f.enc, false), &f.dec);
    assert!(matches!(e, BackupError::BadFact { .. }), "{e}");

    // A member after the manifest, and a member of an unknown name.
    let mut members = unpack(&f.bytes, &f.dec);
    members.push(("tend-backup/extra".into(), b"x".to_vec()));
    let e = refused_bytes(&f, "t4.age", &repack(&members, &f.enc, true), &f.dec);
    assert!(matches!(e, BackupError::NotABackup(_)), "{e}");
}

#[test]
fn a_home_that_holds_something_is_refused_and_left_alone() {
    let f = fixture(5);
    let home = f.root.join("busy");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("keep"), b"mine").unwrap();
    let e = restore(&f.archive, &f.dec, &home).unwrap_err();
    assert!(matches!(e, BackupError::HomeNotEmpty(_)), "{e}");
    assert_eq!(std::fs::read(home.join("keep")).unwrap(), b"mine");
    // An empty directory is fine.
    let empty = f.root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    restore(&f.archive, &f.dec, &empty).unwrap();
    assert!(Device::open(&empty).is_ok());
}

#[test]
fn export_refuses_to_overwrite() {
    let f = fixture(5);
    let e = export_file(
        f.device.store(),
        f.device.namespace(),
        &f.archive,
        &ExportOptions::new(&f.enc),
    )
    .unwrap_err();
    assert!(matches!(e, BackupError::OutputExists(_)), "{e}");
    assert_eq!(std::fs::read(&f.archive).unwrap(), f.bytes);
}

/// The archive with its header and manifest rewritten to `version` (`members` unpacked).
/// The exported device's maintenance state digest, as a restore reports it.
fn source_state_digest(f: &Fixture) -> String {
    let d = &f.device;
    let state = d.store().maintenance_state(d.namespace()).unwrap();
    state.state_digest().to_string()
}

fn with_version(members: &mut [(String, Vec<u8>)], version: u64) {
    for (name, data) in members.iter_mut() {
        if name == member::HEADER {
            let mut h: tend_backup::Header = serde_json::from_slice(data).unwrap();
            h.version = version;
            *data = serde_json::to_vec(&h).unwrap();
        } else if name == member::MANIFEST {
            let mut m: tend_backup::Manifest = serde_json::from_slice(data).unwrap();
            m.version = version;
            *data = serde_json::to_vec(&m).unwrap();
        }
    }
}

#[test]
fn a_version_1_archive_still_restores_and_a_prefix_must_match_the_blob() {
    let f = fixture(30);
    // Version 1 had no prefix member: the blob's facts are found in the blob itself.
    let mut v1 = unpack(&f.bytes, &f.dec);
    v1.retain(|(n, _)| n != member::PREFIX);
    with_version(&mut v1, 1);
    let p = write(&f.root, "v1.age", &repack(&v1, &f.enc, false));
    let home = f.root.join("from-v1");
    let report = restore(&p, &f.dec, &home).unwrap();
    assert_eq!(report.state_digest, source_state_digest(&f));
    // The same layout under version 2 lacks its prefix.
    let mut v2 = v1.clone();
    with_version(&mut v2, 2);
    let e = refused_bytes(&f, "noprefix.age", &repack(&v2, &f.enc, false), &f.dec);
    assert!(matches!(e, BackupError::NotABackup(_)), "{e}");
    // And a version 2 prefix must be the blob's facts: one dropped, or one added.
    let members = unpack(&f.bytes, &f.dec);
    let prefix = frames(&members.iter().find(|(n, _)| n == member::PREFIX).unwrap().1);
    assert!(!prefix.is_empty(), "the genesis at least");
    let mut dropped = members.clone();
    for (n, d) in dropped.iter_mut() {
        if n == member::PREFIX {
            *d = framed(&prefix[..prefix.len() - 1]);
        }
    }
    let e = refused_bytes(&f, "short.age", &repack(&dropped, &f.enc, false), &f.dec);
    // Either the chain admits nothing without it, or the prefix is not the blob's facts.
    assert!(
        matches!(
            e,
            BackupError::Snapshot(_)
                | BackupError::NoGroupKey(_)
                | BackupError::Inadmissible { .. }
                | BackupError::NotABackup(_)
        ),
        "{e}"
    );
    let mut added = members.clone();
    let anchor = frames(&members.iter().find(|(n, _)| n == member::ANCHOR).unwrap().1);
    for (n, d) in added.iter_mut() {
        if n == member::PREFIX {
            let mut more = prefix.clone();
            more.push(anchor[0].clone());
            *d = framed(&more);
        }
    }
    let e = refused_bytes(&f, "long.age", &repack(&added, &f.enc, false), &f.dec);
    assert!(
        matches!(e, BackupError::Snapshot(_) | BackupError::NotABackup(_)),
        "{e}"
    );
}

/// Version 2 put every fact of the blob ahead of it, application facts too; such an
/// archive still restores to the same state. From version 3 the prefix holds the blob's
/// state facts only, and an application fact in it is refused.
#[test]
fn a_version_2_archive_still_restores_and_a_version_3_prefix_holds_state_facts_only() {
    let f = fixture(30);
    let members = unpack(&f.bytes, &f.dec);
    let member_bytes = |name: &str| members.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let prefix = frames(&member_bytes(member::PREFIX));
    let every_fact = tend_snapshot::blob::read_blob(member_bytes(member::BLOB).as_slice(), None)
        .unwrap()
        .facts;
    assert!(
        every_fact.len() > prefix.len(),
        "the blob carries application facts the prefix leaves out"
    );
    assert!(prefix.iter().all(tend_snapshot::blob::is_state_fact));
    let mut full = members.clone();
    for (n, d) in full.iter_mut() {
        if n == member::PREFIX {
            *d = framed(&every_fact);
        }
    }
    let mut v2 = full.clone();
    with_version(&mut v2, 2);
    let p = write(&f.root, "v2.age", &repack(&v2, &f.enc, false));
    let report = restore(&p, &f.dec, &f.root.join("from-v2")).unwrap();
    assert_eq!(report.state_digest, source_state_digest(&f));
    let e = refused_bytes(&f, "v3-full.age", &repack(&full, &f.enc, false), &f.dec);
    assert!(matches!(e, BackupError::NotABackup(_)), "{e}");
}
