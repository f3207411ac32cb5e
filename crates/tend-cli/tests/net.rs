//! End-to-end tests of `tend run` and the commands that reach it over its control socket.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tend(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs")
}

fn ok_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = tend(home, &all);
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// Starts `tend run --json` and returns it with its start line.
fn start(home: &Path, extra: &[&str]) -> (Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args([
            "--json",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "0.5",
        ])
        .args(extra)
        .env_remove("TEND_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tend run starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("start line");
    let info: serde_json::Value = serde_json::from_str(&line).expect("one JSON line at start");
    (child, info)
}

fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "tend run exited with {s}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tend run did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
