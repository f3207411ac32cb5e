//! `tend devnet` end to end: a real fleet on loopback walks the lifecycle and verifies it.

use std::process::Command;

#[test]
fn devnet_walks_the_lifecycle_and_verifies_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args([
            "--json",
            "devnet",
            "--devices",
            "3",
            "--threshold",
            "2",
            "--facts",
            "30",
            "--dir",
        ])
        .arg(dir.path())
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devnet failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["verified"], true);
    let devices = summary["devices"].as_array().unwrap();
    // Three devices plus the one restored from a backup, all on one journal digest.
    assert_eq!(devices.len(), 4);
    assert!(devices.iter().all(|d| d["digest"] == devices[0]["digest"]));
    // GC shrank every store that was collected (the restored device joined afterwards).
    for d in &devices[..3] {
        assert!(d["store_bytes_after_gc"].as_u64() < d["store_bytes_before_gc"].as_u64());
    }
    assert!(devices[3]["store_bytes_after_gc"].is_null());
    let steps: Vec<&str> = summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    for wanted in [
        "authority (DKG)",
        "snapshot ceremony",
        "upgrade activated",
        "admin replacement",
        "backup and restore",
    ] {
        assert!(
            steps.contains(&wanted),
            "step {wanted} missing from {steps:?}"
        );
    }
    assert!(summary["sync_bytes_sent"].as_u64().unwrap() > 0);
    // The homes are real and reopen offline.
    let status = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(dir.path().join("device-0"))
        .args(["--json", "snapshot", "status"])
        .output()
        .unwrap();
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["latest"]["epoch"], summary["snapshot_epoch"]);
}

#[test]
fn devnet_rejects_a_bad_shape_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args(["devnet", "--devices", "2", "--threshold", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
