//! Every command that needs the store works while `tend run` holds it, through the
//! control socket, and prints exactly what it prints on the stopped device.

mod common;

use std::path::Path;
use std::process::Child;

use common::{fails_in_one_line, ok_json, start_run, tend, terminate};
use tend_node::control::Client;

/// A running `tend run`, killed (by its pid) if the test fails before stopping it.
struct Running(Option<Child>);

impl Running {
    fn start(home: &Path) -> Running {
        // No peers and rare rounds: nothing changes the journal behind the test's back.
        let (child, _) = start_run(
            home,
            &["--listen", "127.0.0.1:0", "--sync-interval", "3600"],
        );
        assert!(home.join("control.sock").exists());
        Running(Some(child))
    }

    fn stop(mut self) {
        if let Some(child) = self.0.take() {
            terminate(child);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tend ARGS` as text, which must succeed.
fn ok_text(home: &Path, args: &[&str]) -> String {
    let out = tend(home, args);
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The read-only commands compared between the running and the stopped device.
const READS: &[&[&str]] = &[
    &["journal", "list"],
    &["journal", "list", "--from-epoch", "1", "--limit", "2"],
    &["journal", "status"],
    &["authority", "status"],
    &["snapshot", "status"],
    &["snapshot", "triggers"],
    &["gc", "--dry-run"],
    &["upgrade", "status"],
    &["upgrade", "configure"],
    &["admin", "status"],
    &["cache", "check", "--key", "users", "--epoch", "0"],
    &["cache", "check", "--key", "other", "--epoch", "0"],
];

/// Each read's `--json` value and its text, with the store file's size taken out: redb
/// trims the file when the device closes it, so the size measured while it runs is larger
/// (both paths report the file as it is).
fn readings(home: &Path) -> Vec<(serde_json::Value, String)> {
    READS
        .iter()
        .map(|args| {
            let mut json = ok_json(home, args);
            if let Some(obj) = json.as_object_mut() {
                for size in ["store_bytes", "store_bytes_before", "store_bytes_after"] {
                    obj.remove(size);
                }
            }
            let text = ok_text(home, args)
                .lines()
                .map(|l| {
                    if l.starts_with("store") {
                        "store (size)"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            (json, text)
        })
        .collect()
}

#[test]
fn store_commands_go_through_the_socket_and_print_what_the_stopped_device_prints() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    for i in 0..5 {
        ok_json(
            &home,
            &["fact", "add", "--kind", "note", "--data", &format!("n{i}")],
        );
    }
    let artifact = dir.path().join("tend-1.1.0.bin");
    std::fs::write(&artifact, b"the new release").unwrap();
    // GC is the operator's step here (a `prune` device would collect by itself right
    // after the snapshot, leaving the dry run below nothing to announce).
    assert_eq!(
        ok_json(&home, &["gc", "--policy", "manual"]),
        serde_json::json!({ "gc_policy": "manual" })
    );

    let device = Running::start(&home);
    // Writes through the socket (each would fail with the store locked otherwise).
    let snap = ok_json(&home, &["snapshot", "propose"]);
    assert!(snap["epoch"].as_u64().is_some_and(|e| e >= 1), "{snap}");
    let triggers = ok_json(&home, &["snapshot", "triggers", "--facts", "1000"]);
    assert_eq!(triggers["facts"], 1000);
    let settings = ok_json(
        &home,
        &[
            "upgrade",
            "configure",
            "--max-attempts",
            "4",
            "--policy",
            "manual",
            "--install-cmd",
            "true",
        ],
    );
    assert_eq!(settings["max_attempts"], 4);
    let inv = ok_json(&home, &["cache", "invalidate", "--key", "users"]);
    assert!(inv["fact_id"].is_string(), "{inv}");
    // A relative artifact path: the CLI resolves it, not the device's working directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tend"))
        .current_dir(dir.path())
        .args(["--json", "--home"])
        .arg(&home)
        .args(["upgrade", "publish", "--artifact", "tend-1.1.0.bin"])
        .args(["--version", "1.1.0"])
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let package = published["package_id"].as_str().unwrap().to_string();
    assert_eq!(published["artifact_size"], 15);
    // The running device installs it (manual policy: only when asked) and is ready...
    let applied = ok_json(&home, &["upgrade", "apply"]);
    assert!(
        applied["packages"][0]["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["event"] == "ready")),
        "{applied}"
    );
    // ...so the admin may activate it.
    let activated = ok_json(&home, &["upgrade", "activate", &package]);
    assert_eq!(activated["to_version"], "1.1.0");
    // --member-home makes no sense while the device runs.
    let err = fails_in_one_line(
        &home,
        &[
            "upgrade",
            "publish",
            "--artifact",
            artifact.to_str().unwrap(),
            "--version",
            "1.2.0",
            "--member-home",
            "/nonexistent",
        ],
    );
    assert!(err.contains("drop --member-home"), "{err}");
    // A refusal reads the same either way.
    let stranger = "ab".repeat(32);
    let replace = ["admin", "replace", "--new", &stranger, "--at-epoch", "99"];
    let refused_running = fails_in_one_line(&home, &replace);

    let running = readings(&home);
    // The snapshot left facts to prune, and live application facts to keep.
    let dry = &running[6].0;
    assert!(
        dry["facts_pruned"].as_u64().is_some_and(|n| n >= 2),
        "{dry}"
    );
    assert!(dry["live_kept"].as_u64().is_some_and(|n| n >= 5), "{dry}");
    device.stop();
    assert!(!home.join("control.sock").exists());

    let stopped = readings(&home);
    for ((args, (json_r, text_r)), (json_s, text_s)) in READS.iter().zip(&running).zip(&stopped) {
        assert_eq!(json_r, json_s, "tend --json {args:?}: running vs stopped");
        assert_eq!(text_r, text_s, "tend {args:?}: running vs stopped");
    }
    assert_eq!(fails_in_one_line(&home, &replace), refused_running);
    // The writes made through the socket are in the store.
    let snapshot_status = &stopped[4].0;
    assert_eq!(snapshot_status["latest"]["epoch"], snap["epoch"]);
    assert_eq!(snapshot_status["triggers"]["facts"], 1000);
    assert_eq!(stopped[8].0, settings);
    assert_eq!(stopped[10].0["valid"], false);
    assert_eq!(stopped[11].0["valid"], true);
    let upgrade = &stopped[7].0;
    assert_eq!(upgrade["packages"][0]["package_id"], package.as_str());
    assert_eq!(upgrade["packages"][0]["activated"], true);

    // gc on the running device prunes what the dry run announced, and compacts.
    let device = Running::start(&home);
    let gc = ok_json(&home, &["gc"]);
    assert_eq!(gc["dry_run"], false);
    assert_eq!(gc["compacted"], true);
    assert_eq!(gc["facts_pruned"], dry["facts_pruned"]);
    assert_eq!(gc["floor"], dry["floor"]);
    let listed = ok_json(&home, &["journal", "list"]);
    let policy = ok_json(&home, &["gc", "--policy", "archive"]);
    assert_eq!(policy, serde_json::json!({ "gc_policy": "archive" }));
    let refused = fails_in_one_line(&home, &["gc"]);
    device.stop();
    assert_eq!(ok_json(&home, &["journal", "list"]), listed);
    assert_eq!(fails_in_one_line(&home, &["gc"]), refused);
    assert_eq!(
        ok_json(&home, &["gc", "--policy", "prune"]),
        serde_json::json!({ "gc_policy": "prune" })
    );
}

#[test]
fn a_bad_request_gets_an_error_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let device = Running::start(&home);
    let mut client = Client::connect(&home)
        .expect("the socket answers")
        .expect("a device runs");
    for bad in [
        r#"{"v":2,"cmd":"authority_status"}"#,
        r#"{"cmd":"authority_status"}"#,
        r#"{"v":1,"cmd":7}"#,
        r#"{"v":1,"cmd":"authority_status""#,
        "\u{1}garbage\u{7f}",
        r#"{"v":1,"cmd":"get_setting","key":"peers"}"#,
        r#"{"v":1,"cmd":"upgrade_publish","artifact":"relative.bin","version":"1.1.0","cohort":100}"#,
    ] {
        let r = client.raw(bad).expect("an answer, not a hang-up");
        assert!(!r.ok, "{bad} was accepted: {r:?}");
        assert!(r.error.is_some_and(|e| !e.is_empty()), "{bad}");
        // Still the same connection, still serving.
        let s = client
            .run(tend_node::control::ops::GetAuthorityStatus {})
            .expect("the connection still serves");
        assert_eq!(s.threshold, 1);
    }
    drop(client);
    device.stop();
}
