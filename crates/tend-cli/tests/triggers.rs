//! Automated snapshot triggers in a real `tend run`: the device proposes by itself once the
//! journal passes the configured fact count.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tend(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .arg("--json")
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tend {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_running_device_snapshots_itself_past_the_fact_trigger() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    tend(&home, &["init"]);
    tend(&home, &["snapshot", "triggers", "--facts", "20"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(&home)
        .args(["--json", "run", "--sync-interval", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    for i in 0..30 {
        tend(
            &home,
            &["fact", "add", "--kind", "n", "--data", &format!("{i}")],
        );
    }
    // The node's timer notices the 30 facts and runs a (one-device) ceremony by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut snapshot_epoch = 0;
    while snapshot_epoch == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        // `journal status` goes through the running device's control socket.
        let status = tend(&home, &["journal", "status"]);
        let current = status["current_namespace"].clone();
        snapshot_epoch = status["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["namespace"] == current)
            .and_then(|n| n["snapshot_epoch"].as_u64())
            .unwrap_or(0);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(snapshot_epoch >= 1, "no automatic snapshot was taken");
    // Offline, the store shows the verified snapshot.
    let snapshot = tend(&home, &["snapshot", "status"])["latest"].clone();
    assert!(!snapshot.is_null(), "no automatic snapshot was taken");
    assert!(snapshot["epoch"].as_u64().unwrap() >= 1);
}
