//! The `backup_reader` fuzz corpus (`fuzz/corpus/backup_reader/`) as an ordinary stable
//! test: every file goes through `tend_backup::verify_plain`, the entry point the fuzz
//! target drives (the reader of the decrypted zstd+tar stream). `valid-*` seeds must
//! verify, `invalid-*` seeds must be refused with one line, nothing may panic; seeded
//! mutations of the valid seeds stand in for fuzzing on stable.
//!
//! The seeds are real archives (a one-device authority with a threshold-signed snapshot,
//! exported, then decrypted) and hand-made damage; regenerate them with
//! `cargo test -p tend-backup --test fuzz_corpus -- --ignored write_corpus`.

mod common;

use std::io::Read;
use std::path::PathBuf;

use common::*;
use rand::{Rng, SeedableRng};
use tend_backup::format::{member, Manifest, FRAME_LEN};
use tend_backup::{export_file, verify_plain, ExportOptions, Header};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/backup_reader")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("readable entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("readable corpus file"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_file_is_read_or_refused_without_panic() {
    let (mut valid, mut invalid) = (0, 0);
    for (name, bytes) in corpus() {
        let verdict = verify_plain(bytes.as_slice());
        if name.starts_with("valid-") {
            let report = verdict.unwrap_or_else(|e| panic!("{name} must verify: {e}"));
            assert_eq!(report.archive_bytes, bytes.len() as u64, "{name}");
            valid += 1;
        } else {
            let e = verdict
                .err()
                .unwrap_or_else(|| panic!("{name} must be refused"));
            let line = e.to_string();
            eprintln!("{name}: {line}");
            assert!(!line.is_empty() && !line.contains('\n'), "{name}: {line:?}");
            invalid += 1;
        }
    }
    assert!(valid >= 3, "only {valid} valid seeds");
    assert!(invalid >= 10, "only {invalid} invalid seeds");
}

#[test]
fn seeded_mutations_of_the_valid_seeds_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let seeds: Vec<Vec<u8>> = corpus()
        .into_iter()
        .filter(|(n, _)| n.starts_with("valid-"))
        .map(|(_, b)| b)
        .collect();
    assert!(!seeds.is_empty());
    for seed in &seeds {
        // Damage to the compressed stream mostly stops at zstd; damage to the tar inside,
        // recompressed, reaches the member and fact parsers.
        let tar = zstd::decode_all(seed.as_slice()).expect("a valid seed decompresses");
        for round in 0..150 {
            let (layer, mut bytes) = if round % 3 == 0 {
                ("zstd", seed.clone())
            } else {
                ("tar", tar.clone())
            };
            match rng.gen_range(0..4) {
                0 => {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
                1 => {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.gen();
                }
                2 => bytes.truncate(rng.gen_range(0..bytes.len())),
                _ => {
                    // A run of 0xff: a hostile length somewhere.
                    let i = rng.gen_range(0..bytes.len());
                    let n = rng.gen_range(1..9).min(bytes.len() - i);
                    bytes[i..i + n].fill(0xff);
                }
            }
            if layer == "tar" {
                bytes = zstd::encode_all(bytes.as_slice(), 1).expect("compress");
            }
            let _ = verify_plain(bytes.as_slice());
        }
    }
}

/// Decrypts an archive to the plain zstd+tar stream the reader sees under age.
fn plain(archive: &[u8], dec: &tend_backup::Decryption) -> Vec<u8> {
    let tend_backup::Decryption::Identities(ids) = dec else {
        panic!("an identity");
    };
    let mut out = Vec::new();
    tend_backup::age::Decryptor::new(archive)
        .expect("age header")
        .decrypt(ids.iter().map(|i| i as &dyn tend_backup::age::Identity))
        .expect("decrypt")
        .read_to_end(&mut out)
        .expect("read");
    out
}

/// Splits a plain archive into its members.
fn members(plain: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(plain).expect("zstd"));
    let mut out = Vec::new();
    for e in tar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = String::from_utf8(e.path_bytes().into_owned()).expect("name");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read");
        out.push((name, data));
    }
    out
}

/// Packs members into a plain archive, rewriting the manifest's member list to match
/// (as a forger would), unless `keep_manifest`. `sizes` overrides the size a member's
/// tar header claims (its data stays as it is).
fn pack(members: &[(String, Vec<u8>)], keep_manifest: bool, sizes: &[(&str, u64)]) -> Vec<u8> {
    let mut members = members.to_vec();
    if !keep_manifest {
        restate_manifest(&mut members);
    }
    let mut tar = tar::Builder::new(Vec::new());
    for (n, d) in &members {
        let mut h = tar::Header::new_ustar();
        h.set_path(n).expect("path");
        h.set_size(d.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        match sizes.iter().find(|(m, _)| m == n) {
            Some((_, claimed)) => {
                // The header claims more than follows: the data, then the end of input.
                h.set_size(*claimed);
                h.set_cksum();
                let raw = tar.get_mut();
                raw.extend_from_slice(h.as_bytes());
                raw.extend_from_slice(d);
            }
            None => tar.append(&h, d.as_slice()).expect("append"),
        }
    }
    let raw = if sizes.is_empty() {
        tar.into_inner().expect("tar")
    } else {
        // A truncated archive has no end blocks.
        std::mem::take(tar.get_mut())
    };
    zstd::encode_all(raw.as_slice(), 3).expect("compress")
}

fn set_version(members: &mut [(String, Vec<u8>)], version: u64) {
    for (n, d) in members.iter_mut() {
        if n == member::HEADER {
            let mut h: Header = serde_json::from_slice(d).unwrap();
            h.version = version;
            *d = serde_json::to_vec(&h).unwrap();
        } else if n == member::MANIFEST {
            let mut m: Manifest = serde_json::from_slice(d).unwrap();
            m.version = version;
            *d = serde_json::to_vec(&m).unwrap();
        }
    }
}

fn replace(members: &mut [(String, Vec<u8>)], name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    f(&mut members
        .iter_mut()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1);
}

#[test]
#[ignore = "writes fuzz/corpus/backup_reader; run by hand to regenerate the seeds"]
fn write_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let (enc, dec) = x25519();
    let export = |d: &tend_node::Device, name: &str| {
        let path = dir.path().join(name);
        export_file(d.store(), d.namespace(), &path, &ExportOptions::new(&enc)).unwrap();
        plain(&std::fs::read(&path).unwrap(), &dec)
    };
    // A small journal with a threshold-signed snapshot, and one without any.
    let d = device(dir.path(), "snap");
    add_facts(&d, 6, 1..=3, "before");
    let d = snapshot(vec![d], 4).pop().unwrap();
    add_facts(&d, 6, 4..=6, "after");
    let with_snapshot = export(&d, "snap.age");
    let bare = device(dir.path(), "bare");
    add_facts(&bare, 4, 1..=2, "x");
    let without = export(&bare, "bare.age");

    let m = members(&with_snapshot);
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("valid-snapshot", with_snapshot.clone()),
        ("valid-no-snapshot", without.clone()),
    ];
    // Version 1 had no prefix member.
    let mut v1 = m.clone();
    v1.retain(|(n, _)| n != member::PREFIX);
    set_version(&mut v1, 1);
    seeds.push(("valid-version-1", pack(&v1, false, &[])));
    seeds.push(("valid-repacked", pack(&m, false, &[])));
    // Version 2 carried every fact of the blob ahead of it, application facts too.
    let mut v2 = m.clone();
    let blob = m.iter().find(|(n, _)| n == member::BLOB).unwrap().1.clone();
    let every_fact = tend_snapshot::blob::read_blob(blob.as_slice(), None)
        .unwrap()
        .facts;
    replace(&mut v2, member::PREFIX, |d| {
        d.clear();
        for f in &every_fact {
            d.extend_from_slice(&(f.bytes().len() as u32).to_be_bytes());
            d.extend_from_slice(f.bytes());
        }
    });
    set_version(&mut v2, 2);
    seeds.push(("valid-version-2", pack(&v2, false, &[])));
    // From version 3 that list is refused: the prefix holds state facts only.
    let mut v3_full = v2.clone();
    set_version(&mut v3_full, 3);
    seeds.push((
        "invalid-prefix-with-application-facts",
        pack(&v3_full, false, &[]),
    ));

    seeds.push(("invalid-empty", Vec::new()));
    seeds.push(("invalid-not-zstd", b"tend-backup/HEADER.json".to_vec()));
    seeds.push((
        "invalid-truncated",
        with_snapshot[..with_snapshot.len() / 2].to_vec(),
    ));
    // A zstd frame whose header asks for a 2^31-byte window.
    seeds.push((
        "invalid-zstd-window",
        vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa8, 0x01, 0x00, 0x00],
    ));
    let tar = zstd::decode_all(with_snapshot.as_slice()).unwrap();
    seeds.push(("invalid-uncompressed-tar", tar.clone()));
    let mut newer = m.clone();
    set_version(&mut newer, tend_backup::ARCHIVE_FORMAT_VERSION + 1);
    seeds.push(("invalid-newer-version", pack(&newer, false, &[])));
    let mut no_prefix = v1.clone();
    set_version(&mut no_prefix, 2);
    seeds.push(("invalid-missing-prefix", pack(&no_prefix, false, &[])));
    let mut stale = m.clone();
    replace(&mut stale, &member::tail(0), |d| {
        let len = u32::from_be_bytes(d[..FRAME_LEN].try_into().unwrap()) as usize;
        d.drain(..FRAME_LEN + len);
    });
    seeds.push(("invalid-manifest-stale", pack(&stale, true, &[])));
    seeds.push(("invalid-tail-counts", pack(&stale, false, &[])));
    // Hostile lengths: a member claiming 8 GiB, a fact frame claiming 4 GiB, a blob item
    // list claiming 2^60 bytes, a blob fact list claiming 2^32 facts.
    seeds.push((
        "invalid-member-size",
        pack(&m, false, &[(member::BLOB, 8 << 30)]),
    ));
    let mut frame = m.clone();
    replace(&mut frame, &member::tail(0), |d| d[..FRAME_LEN].fill(0xff));
    seeds.push(("invalid-frame-length", pack(&frame, false, &[])));
    let blob = &m.iter().find(|(n, _)| n == member::BLOB).unwrap().1;
    // A byte string in the blob claiming an absurd length: the namespace's 32-byte id (a
    // blob of format 3 keeps its item list in an item blob of its own, so the items'
    // byte string of the earlier formats is not there to mutate).
    let ns_at = (0..blob.len())
        .find(|&i| blob[i..].starts_with(&[0x58, 0x20]))
        .expect("a 32-byte byte string in the blob");
    let mut huge_string = m.clone();
    replace(&mut huge_string, member::BLOB, |d| {
        let mut head = vec![0x5b];
        head.extend_from_slice(&(40u64 << 55).to_be_bytes());
        d.splice(ns_at..ns_at + 2, head);
    });
    seeds.push(("invalid-blob-length-field", pack(&huge_string, false, &[])));
    let mut flipped_blob = m.clone();
    replace(&mut flipped_blob, member::BLOB, |d| {
        let i = d.len() / 2;
        d[i] ^= 0x01;
    });
    seeds.push(("invalid-blob-flipped", pack(&flipped_blob, false, &[])));
    let mut short_prefix = m.clone();
    replace(&mut short_prefix, member::PREFIX, |d| d.clear());
    seeds.push(("invalid-prefix-empty", pack(&short_prefix, false, &[])));
    let mut extra = m.clone();
    extra.push(("tend-backup/extra".into(), b"x".to_vec()));
    seeds.push(("invalid-member-after-manifest", pack(&extra, true, &[])));
    let mut garbage_end = tar.clone();
    garbage_end.extend_from_slice(b"trailing");
    seeds.push((
        "invalid-trailing-data",
        zstd::encode_all(garbage_end.as_slice(), 3).unwrap(),
    ));

    let out = corpus_dir();
    std::fs::create_dir_all(&out).unwrap();
    for (name, bytes) in seeds {
        let verdict = verify_plain(bytes.as_slice());
        assert_eq!(
            verdict.is_ok(),
            name.starts_with("valid-"),
            "{name}: {verdict:?}"
        );
        std::fs::write(out.join(name), bytes).unwrap();
    }
}
