//! `tend devnet` end to end: a real fleet on loopback walks the lifecycle and verifies it.

use std::path::Path;
use std::process::Command;

/// Runs `tend --json devnet` with `devices` devices, threshold `threshold` and `facts`
/// facts per device in `dir`, checks that it verified every step and that the fleet (the
/// devices plus the one restored from a backup) ends on one digest, and returns the summary.
fn devnet(dir: &Path, devices: usize, threshold: u16, facts: usize) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .args(["--json", "devnet", "--devices"])
        .arg(devices.to_string())
        .arg("--threshold")
        .arg(threshold.to_string())
        .arg("--facts")
        .arg(facts.to_string())
        .arg("--dir")
        .arg(dir)
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devnet {threshold}-of-{devices} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["verified"], true);
    assert_eq!(summary["threshold"], threshold);
    let rows = summary["devices"].as_array().unwrap();
    // The devices plus the one restored from a backup, all on one journal digest.
    assert_eq!(rows.len(), devices + 1);
    assert!(rows.iter().all(|d| d["digest"] == rows[0]["digest"]));
    // GC shrank every store that was collected; the restored device (last) joined afterwards.
    for d in &rows[..devices] {
        assert!(d["store_bytes_after_gc"].as_u64() < d["store_bytes_before_gc"].as_u64());
    }
    assert!(rows[devices]["store_bytes_after_gc"].is_null());
    assert!(rows[devices]["home"]
        .as_str()
        .unwrap()
        .ends_with("device-restored"));
    // Every step ran, through the last one, which needs the restored device.
    let steps: Vec<&str> = summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps.len(), 18, "{steps:?}");
    assert_eq!(
        steps.last(),
        Some(&"every live value reads the same everywhere")
    );
    summary
}

#[test]
fn devnet_walks_the_lifecycle_and_verifies_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let summary = devnet(dir.path(), 3, 2, 30);
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
        "storage peer (encrypted blobs, re-encryption)",
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

/// The smallest shape: every device must sign, and the restored device is the third.
#[test]
fn devnet_walks_a_two_of_two_fleet() {
    let dir = tempfile::tempdir().unwrap();
    devnet(dir.path(), 2, 2, 3);
}

/// A larger fleet with a higher threshold than the default.
#[test]
fn devnet_walks_a_five_of_eight_fleet() {
    let dir = tempfile::tempdir().unwrap();
    devnet(dir.path(), 8, 5, 2);
}

#[test]
fn devnet_rejects_a_bad_shape_with_one_line() {
    for (devices, threshold) in [("2", "3"), ("1", "2"), ("1", "1"), ("0", "2"), ("3", "1")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tend"))
            .args(["devnet", "--devices", devices, "--threshold", threshold])
            .args(["--facts", "1"])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "--devices {devices} --threshold {threshold}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("need 2 <= threshold <= devices"), "{err}");
    }
}
