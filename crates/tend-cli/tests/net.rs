//! End-to-end tests of `tend run` and the commands that reach it over its control socket.

mod common;

use common::{ok_json, start_run, tend, terminate};

/// `tend run` on any loopback port with quick sync rounds.
fn start(home: &Path, extra: &[&str]) -> (std::process::Child, serde_json::Value) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--sync-interval", "0.5"];
    args.extend_from_slice(extra);
    start_run(home, &args)
}

use std::path::Path;

#[test]
fn run_serves_the_cli_over_its_control_socket_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let (child, info) = start(&home, &[]);
    let id = info["device_id"].as_str().unwrap().to_string();
    assert!(info["listen_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(home.join("control.sock").exists());

    // The store is locked by the running device: these go through the socket.
    let added = ok_json(&home, &["fact", "add", "--kind", "note", "--data", "live"]);
    assert!(added["id"].is_string());
    let status = ok_json(&home, &["journal", "status"]);
    assert_eq!(status["device_id"], id.as_str());
    // The genesis, the device's metadata advertisement, and the new fact.
    assert_eq!(status["namespaces"][0]["application_facts"], 1);
    assert_eq!(ok_json(&home, &["peers"]), serde_json::json!([]));
    let report = ok_json(&home, &["sync", "now"]);
    assert_eq!(report["sessions"], serde_json::json!([]));

    terminate(child);
    assert!(
        !home.join("control.sock").exists(),
        "socket removed at exit"
    );
    // Offline again: the same commands work on the store directly, or say why not.
    let status = ok_json(&home, &["journal", "status"]);
    // The genesis, the device's metadata advertisement, and the new fact.
    assert_eq!(status["namespaces"][0]["application_facts"], 1);
    let out = tend(&home, &["peers"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no device is running"), "{err}");
}

#[test]
fn a_bad_peer_flag_is_one_line_of_error() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let out = tend(&home, &["run", "--peer", "nonsense"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn peers_trust_ban_and_unban_persist_and_show_with_the_last_sync() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let other = "ab".repeat(32);
    // A stopped device: the stored peer table is edited in place.
    let banned = ok_json(&home, &["peers", "ban", &other]);
    assert_eq!(banned["status"], "banned");
    let err = common::fails_in_one_line(&home, &["peers", "trust", &other, "1.5"]);
    assert!(err.contains("trust must be a number from 0 to 1"), "{err}");
    // The running device starts from the stored table, and changes it over its socket.
    let (child, _) = start(&home, &[]);
    let peers = ok_json(&home, &["peers"]);
    assert_eq!(peers[0]["device_id"], other.as_str());
    assert_eq!(peers[0]["status"], "banned");
    assert_eq!(peers[0]["last_sync_unix_ms"], serde_json::Value::Null);
    let unbanned = ok_json(&home, &["peers", "unban", &other]);
    assert_eq!(unbanned["status"], "online");
    let trusted = ok_json(&home, &["peers", "trust", &other, "0.3"]);
    assert_eq!(trusted["trust"], 0.3);
    let human = String::from_utf8_lossy(&tend(&home, &["peers"]).stdout).into_owned();
    assert!(human.contains("last sync never"), "{human}");
    terminate(child);
    // And the operator's trust survived the stop.
    let (child, _) = start(&home, &[]);
    let peers = ok_json(&home, &["peers"]);
    assert_eq!(peers[0]["operator_trust"], 0.3);
    assert_eq!(peers[0]["status"], "online");
    terminate(child);
}

/// `tend sync now` on a terminal shows what the running device takes in while the round
/// runs (it answers only at the end); piped, or with `--json`, it writes no progress.
/// The terminal is `script`'s pseudo-terminal (util-linux, on every Debian machine).
#[test]
fn sync_now_shows_catching_up_on_a_terminal_and_nothing_when_piped() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = common::two_device_authority(dir.path());
    // Enough facts on a for the round to take a while.
    let lines: String = (0..30_000)
        .map(|i| format!("{{\"key\": \"k{i}\", \"value\": \"v{i}\"}}\n"))
        .collect();
    let ndjson = dir.path().join("puts.ndjson");
    std::fs::write(&ndjson, lines).unwrap();
    ok_json(&a, &["put", "notes", "--ndjson", ndjson.to_str().unwrap()]);
    // Rounds only when asked for.
    let quiet = ["--listen", "127.0.0.1:0", "--sync-interval", "600"];
    let (run_a, info_a) = start_run(&a, &quiet);
    let peer = format!(
        "{}@{}",
        info_a["device_id"].as_str().unwrap(),
        info_a["listen_addr"].as_str().unwrap()
    );
    let (run_b, _) = start_run(&b, &[&quiet[..], &["--peer", &peer]].concat());

    let command = format!(
        "{} --home {} sync now",
        env!("CARGO_BIN_EXE_tend"),
        b.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("TEND_HOME")
        .output()
        .expect("`script` (util-linux) runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("catching up with peers"), "{shown}");
    assert!(shown.contains("completed"), "the report follows: {shown}");

    // Piped, nothing but the report.
    let piped = tend(&b, &["sync", "now"]);
    assert!(piped.status.success());
    assert!(
        piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    terminate(run_b);
    terminate(run_a);
}
