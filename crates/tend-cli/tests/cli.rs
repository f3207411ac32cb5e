//! End-to-end tests of the `tend` binary: real processes, real homes, real store files.

mod common;

use common::{ok_json, tend};

use std::process::{Command, Output};

/// A failing command prints exactly one line on stderr and exits non-zero.
fn assert_one_line_error(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got {err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn ten_facts_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    let init = ok_json(&home, &["init"]);
    let device_id = init["device_id"].as_str().unwrap().to_string();
    assert_eq!(device_id.len(), 64);

    let mut ids = Vec::new();
    for i in 0..10 {
        let added = ok_json(
            &home,
            &["fact", "add", "--kind", "note", "--data", &format!("n{i}")],
        );
        ids.push(added["id"].as_str().unwrap().to_string());
    }
    // Every command is a fresh process: the store was closed and reopened each time.
    let status = ok_json(&home, &["journal", "status"]);
    assert_eq!(status["device_id"], device_id);
    let ns = &status["namespaces"][0];
    assert_eq!(ns["application_facts"], 10);
    let digest = ns["digest"].as_str().unwrap().to_string();

    let again = ok_json(&home, &["journal", "status"]);
    assert_eq!(again["namespaces"][0]["application_facts"], 10);
    assert_eq!(again["namespaces"][0]["digest"], digest.as_str());

    let list = ok_json(&home, &["journal", "list"]);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "app:note")
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, expected);

    // The key file is owner-only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.join("device.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn init_refuses_an_existing_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    ok_json(&home, &["init"]);
    let key_before = std::fs::read(home.join("device.key")).unwrap();
    let err = assert_one_line_error(&tend(&home, &["init"]));
    assert!(err.contains("already"), "{err}");
    assert_eq!(std::fs::read(home.join("device.key")).unwrap(), key_before);
}

/// `tend init` announces the device's release, so writes made before it ever runs are in
/// the newest fact format (3: timed ids, ZIP-215 signatures), not format 1.
#[test]
fn a_new_device_writes_the_newest_fact_format_before_it_ever_runs() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    ok_json(&home, &["init"]);
    ok_json(&home, &["log", "append", "events", "first"]);
    let device = tend_node::Device::open(&home).unwrap();
    let ns = device.namespace();
    let entry = device
        .store()
        .scan(ns, ..)
        .unwrap()
        .map(|f| f.unwrap().trusted().unwrap())
        .find(|f| tend_core::app::is_data(f.payload()))
        .expect("the appended entry");
    assert_eq!(entry.format().version(), 3);
}

#[test]
fn truncated_and_foreign_store_files_are_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    ok_json(&home, &["init"]);
    ok_json(&home, &["fact", "add", "--kind", "k", "--data", "d"]);
    let store = home.join("store.redb");
    let full = std::fs::read(&store).unwrap();

    for (name, bytes) in [
        ("truncated", full[..full.len() / 3].to_vec()),
        ("header only", full[..600].to_vec()),
        ("foreign", b"SQLite format 3\0 definitely not tend".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&store, &bytes).unwrap();
        for args in [
            &["journal", "status"][..],
            &["fact", "add", "--kind", "k", "--data", "x"],
        ] {
            let err = assert_one_line_error(&tend(&home, args));
            assert!(err.contains("store.redb"), "{name}: {err}");
            assert_eq!(
                std::fs::read(&store).unwrap(),
                bytes,
                "{name}: file was modified"
            );
        }
    }
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    // No home at all.
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args(["journal", "status"])
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(assert_one_line_error(&out).contains("TEND_HOME"));
    // A home that was never initialised.
    assert!(assert_one_line_error(&tend(&home, &["journal", "status"])).contains("tend init"));
    ok_json(&home, &["init"]);
    let before = ok_json(&home, &["journal", "status"]);
    // An empty kind and oversized data are refused before anything is written.
    assert_one_line_error(&tend(&home, &["fact", "add", "--kind", "", "--data", "x"]));
    let big = "x".repeat(70_000);
    assert_one_line_error(&tend(
        &home,
        &["fact", "add", "--kind", "k", "--data", &big],
    ));
    assert_eq!(
        ok_json(&home, &["journal", "status"])["namespaces"],
        before["namespaces"]
    );
    // JSON errors under --json.
    let out = tend(
        &home,
        &["--json", "fact", "add", "--kind", "", "--data", "x"],
    );
    let err: serde_json::Value =
        serde_json::from_slice(&out.stderr).expect("--json errors are JSON");
    assert!(err["error"].as_str().unwrap().contains("kind"));
}

#[test]
fn tend_home_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args(["--json", "init"])
        .env("TEND_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(home.join("store.redb").exists());
}
