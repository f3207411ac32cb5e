//! Application data through the real binary: values survive a snapshot and GC, on the
//! device and on a device restored from a backup taken after the GC; bytes go in and out
//! unchanged; what GC reclaims is what was superseded; bad input writes nothing; and a
//! running device answers the same commands through its socket.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{fails_in_one_line, ok_json, start_run, tend, terminate};

fn stdout(home: &Path, args: &[&str]) -> Vec<u8> {
    let out = tend(home, args);
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn facts_in_index(home: &Path) -> u64 {
    let s = ok_json(home, &["journal", "status"]);
    s["namespaces"][0]["facts"].as_u64().expect("a fact count")
}

#[test]
fn values_survive_snapshot_gc_and_backup_restore() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    for v in ["0", "1"] {
        ok_json(&home, &["put", "notes", "a", v]);
    }
    ok_json(&home, &["put", "notes", "b", "gone soon"]);
    ok_json(&home, &["delete", "notes", "b"]);
    ok_json(
        &home,
        &["fact", "add", "--kind", "todo", "--data", "buy milk"],
    );
    let entry = ok_json(&home, &["log", "append", "todo", "buy bread"]);
    let cursor = entry["cursor"].as_str().unwrap().to_owned();
    ok_json(&home, &["cache", "put", "ck", "computed"]);
    // A large value is a blob; overwriting it tombstones the blob.
    let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let big_path = dir.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    let put = ok_json(
        &home,
        &[
            "put",
            "notes",
            "big",
            "--value-file",
            big_path.to_str().unwrap(),
        ],
    );
    assert!(put["blob"].is_string(), "a 40 kB value is a blob: {put}");
    assert_eq!(stdout(&home, &["get", "notes", "big"]), big);
    ok_json(&home, &["put", "notes", "big", "small now"]);

    let before = facts_in_index(&home);
    ok_json(&home, &["snapshot", "propose"]);
    let gc = ok_json(&home, &["gc"]);
    // Superseded: a=0, b's put and delete, the big put; its blob goes too.
    assert!(gc["facts_pruned"].as_u64().unwrap() >= 4, "{gc}");
    assert_eq!(gc["blobs_pruned"].as_u64(), Some(1), "{gc}");
    assert!(facts_in_index(&home) < before);
    // The snapshot blob is now rebuilt from the kept facts, which the backup below reads.
    assert_eq!(gc["snapshot_blob_as_facts"], true, "{gc}");

    let check = |home: &Path| {
        assert_eq!(stdout(home, &["get", "notes", "a"]), b"1");
        assert_eq!(stdout(home, &["get", "notes", "big"]), b"small now");
        let err = fails_in_one_line(home, &["get", "notes", "b"]);
        assert!(err.contains("absent"), "{err}");
        let keys: Vec<String> = ok_json(home, &["scan", "notes"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["key"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(keys, ["a", "big"]);
        let log = ok_json(home, &["log", "read", "todo"]);
        assert_eq!(log.as_array().unwrap().len(), 2, "{log}");
        let c = ok_json(home, &["cache", "get", "ck"]);
        assert_eq!(c["validity"], "valid", "{c}");
    };
    check(&home);

    // A backup taken after the GC restores every live value.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let archive = dir.path().join("a.tar.age");
    let (pass_s, archive_s) = (pass.to_str().unwrap(), archive.to_str().unwrap());
    ok_json(
        &home,
        &[
            "backup",
            "export",
            "--out",
            archive_s,
            "--passphrase-file",
            pass_s,
        ],
    );
    let restored = dir.path().join("r");
    ok_json(
        &restored,
        &[
            "backup",
            "restore",
            "--in",
            archive_s,
            "--passphrase-file",
            pass_s,
        ],
    );
    check(&restored);

    // Trimming drops the entries below the cursor.
    ok_json(&home, &["log", "trim", "todo", "--before", &cursor]);
    let log = ok_json(&home, &["log", "read", "todo"]);
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
}

#[test]
fn values_are_bytes_and_read_your_writes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let bytes: Vec<u8> = vec![0, 0xff, 0xfe, b'\n', 7];
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args([
            "--home",
            home.to_str().unwrap(),
            "put",
            "bin",
            "k",
            "--value-file",
            "-",
        ])
        .env_remove("TEND_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(stdout(&home, &["get", "bin", "k"]), bytes);
    let j = ok_json(&home, &["get", "bin", "k"]);
    assert_eq!(j["value"], "AP/+Cgc=");
    assert!(j["conflicts"].as_array().unwrap().is_empty());
    // The device's later write wins at once, within the same epoch.
    ok_json(&home, &["put", "bin", "k", "second"]);
    assert_eq!(stdout(&home, &["get", "bin", "k"]), b"second");
}

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let before = facts_in_index(&home);
    let long = "k".repeat(2000);
    for args in [
        vec!["put", "", "k", "v"],
        vec!["put", "c", "", "v"],
        vec!["put", "c", long.as_str(), "v"],
        vec!["put", "c\u{7}", "k", "v"],
        vec!["log", "read", "todo", "--after", "not-a-cursor"],
        vec!["log", "trim", "todo", "--before", "12"],
        vec!["scan", "c", "--limit", "0"],
        vec!["delete", "c", "never-written"],
    ] {
        fails_in_one_line(&home, &args);
    }
    assert_eq!(facts_in_index(&home), before, "nothing was written");
}

#[test]
fn a_running_device_answers_the_data_commands() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    ok_json(&home, &["put", "notes", "a", "stopped"]);
    let (child, _) = start_run(
        &home,
        &["--listen", "127.0.0.1:0", "--sync-interval", "3600"],
    );
    assert_eq!(stdout(&home, &["get", "notes", "a"]), b"stopped");
    ok_json(&home, &["put", "notes", "a", "running"]);
    ok_json(&home, &["log", "append", "l", "x"]);
    assert_eq!(stdout(&home, &["get", "notes", "a"]), b"running");
    let running_scan = ok_json(&home, &["scan", "notes"]);
    terminate(child);
    assert_eq!(ok_json(&home, &["scan", "notes"]), running_scan);
    assert_eq!(
        ok_json(&home, &["log", "read", "l"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
