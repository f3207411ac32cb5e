//! End-to-end `tend backup`: export, verify and restore through the binary, bad input
//! with one-line errors and nothing written, the archive opened with standard tools, and
//! `tend snapshot triggers`.

mod common;

use common::{backup_args, fails_in_one_line, ok_json};

use std::io::Read;
use std::path::Path;
use std::process::Command;

use tend_backup::age::secrecy::ExposeSecret;

/// A failing command: one line, starting with `error: `.
fn tend_fails(home: &Path, args: &[&str]) -> String {
    let err = fails_in_one_line(home, args);
    assert!(err.starts_with("error: "), "{err:?}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn export_verify_restore_and_bad_input_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    ok_json(&src, &["init"]);
    for i in 0..20 {
        ok_json(
            &src,
            &["fact", "add", "--kind", "note", "--data", &format!("n{i}")],
        );
    }
    ok_json(&src, &["snapshot", "propose"]);
    for i in 0..5 {
        ok_json(
            &src,
            &["fact", "add", "--kind", "note", "--data", &format!("m{i}")],
        );
    }
    ok_json(&src, &["gc"]);

    let id = tend_backup::age::x25519::Identity::generate();
    let id_file = dir.path().join("key.txt");
    std::fs::write(
        &id_file,
        format!("# test key\n{}\n", id.to_string().expose_secret()),
    )
    .unwrap();
    let recipient = id.to_public().to_string();
    let archive = dir.path().join("b.age");
    let out = ok_json(
        &src,
        &backup_args("export", &archive, "--recipient", &recipient),
    );
    assert_eq!(out["report"]["tail_facts"], 7, "{out}");
    assert!(out["report"]["snapshot_epoch"].is_u64());

    let v = ok_json(
        &src,
        &backup_args("verify", &archive, "--identity", s(&id_file)),
    );
    assert_eq!(v["tail_facts"], 7);

    let new = dir.path().join("new");
    let r = ok_json(
        &new,
        &backup_args("restore", &archive, "--identity", s(&id_file)),
    );
    let source_status = ok_json(&src, &["journal", "status"]);
    let new_status = ok_json(&new, &["journal", "status"]);
    assert_ne!(r["device_id"], source_status["device_id"]);
    let digest = |st: &serde_json::Value| {
        st["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["namespace"] == st["current_namespace"])
            .unwrap()["digest"]
            .clone()
    };
    assert_eq!(digest(&new_status), digest(&source_status));
    assert_eq!(
        ok_json(&new, &["snapshot", "status"])["latest"],
        ok_json(&src, &["snapshot", "status"])["latest"]
    );

    // Bad input: one line, non-zero exit, nothing written.
    let other = dir.path().join("other");
    let e = tend_fails(
        &new,
        &backup_args("restore", &archive, "--identity", s(&id_file)),
    );
    assert!(e.contains("not empty"), "{e}");
    let wrong = dir.path().join("wrong.txt");
    let wrong_id = tend_backup::age::x25519::Identity::generate();
    std::fs::write(&wrong, wrong_id.to_string().expose_secret()).unwrap();
    let e = tend_fails(
        &other,
        &backup_args("restore", &archive, "--identity", s(&wrong)),
    );
    assert!(e.contains("wrong passphrase or key"), "{e}");
    assert!(!other.exists());
    let mut cut = std::fs::read(&archive).unwrap();
    cut.truncate(cut.len() - 10);
    let cut_file = dir.path().join("cut.age");
    std::fs::write(&cut_file, &cut).unwrap();
    let e = tend_fails(
        &other,
        &backup_args("restore", &cut_file, "--identity", s(&id_file)),
    );
    assert!(e.contains("damaged or truncated"), "{e}");
    assert!(!other.exists());
    let e = tend_fails(
        &src,
        &backup_args("export", &archive, "--recipient", &recipient),
    );
    assert!(e.contains("already exists"), "{e}");
    let e = tend_fails(
        &src,
        &backup_args("export", &dir.path().join("x"), "--recipient", "age1nope"),
    );
    assert!(e.contains("invalid recipient"), "{e}");

    // A passphrase archive, and the wrong passphrase.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "hunter2\n").unwrap();
    let parchive = dir.path().join("p.age");
    ok_json(
        &src,
        &backup_args("export", &parchive, "--passphrase-file", s(&pass)),
    );
    std::fs::write(dir.path().join("badpass"), "hunter3\n").unwrap();
    let e = tend_fails(
        &src,
        &backup_args(
            "verify",
            &parchive,
            "--passphrase-file",
            s(&dir.path().join("badpass")),
        ),
    );
    assert!(e.contains("wrong passphrase or key"), "{e}");
    ok_json(
        &src,
        &backup_args("verify", &parchive, "--passphrase-file", s(&pass)),
    );

    // Standard tools open the archive: age (here the age crate, as `age -d` would), then
    // the system's zstd and tar.
    let bytes = std::fs::read(&archive).unwrap();
    let mut plain = Vec::new();
    tend_backup::age::Decryptor::new(bytes.as_slice())
        .unwrap()
        .decrypt(std::iter::once(&id as &dyn tend_backup::age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let tzst = dir.path().join("b.tar.zst");
    std::fs::write(&tzst, &plain).unwrap();
    let list = Command::new("tar")
        .arg("--zstd")
        .arg("-tf")
        .arg(&tzst)
        .output();
    if let Some(list) = list.ok().filter(|o| o.status.success()) {
        let names = String::from_utf8_lossy(&list.stdout).into_owned();
        for m in [
            "tend-backup/HEADER.json",
            "tend-backup/snapshot/anchor.facts",
            "tend-backup/snapshot/blob.dagcbor",
            "tend-backup/tail/00000000.facts",
            "tend-backup/MANIFEST.json",
        ] {
            assert!(names.lines().any(|l| l == m), "{m} in {names}");
        }
    }
}

#[test]
fn snapshot_triggers_are_set_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("h");
    ok_json(&h, &["init"]);
    let t = ok_json(&h, &["snapshot", "triggers"]);
    assert_eq!(t["facts"], 100_000);
    let t = ok_json(
        &h,
        &["snapshot", "triggers", "--facts", "10", "--age-secs", "0"],
    );
    assert_eq!(t["facts"], 10);
    let st = ok_json(&h, &["snapshot", "status"]);
    assert_eq!(st["triggers"]["facts"], 10);
    assert_eq!(st["triggers"]["age_secs"], 0);
    assert_eq!(st["triggers"]["bytes"], 64 << 20);
}
