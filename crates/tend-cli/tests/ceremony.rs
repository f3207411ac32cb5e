//! `tend authority create --member ...` and `tend snapshot propose` against running
//! devices: key generation and the snapshot ceremony over the network between real
//! `tend run` processes on loopback.

mod common;

use common::{journal_digest, ok_json, start_run, tend, terminate};

/// `tend run` on `listen` with quick sync rounds.
fn start(home: &Path, listen: &str, extra: &[&str]) -> (std::process::Child, serde_json::Value) {
    let mut args = vec!["--listen", listen, "--sync-interval", "0.5"];
    args.extend_from_slice(extra);
    start_run(home, &args)
}

use std::path::Path;
use std::time::{Duration, Instant};

/// Waits until every home's journal `ns` has the same digest, asking for sync rounds
/// meanwhile (a loaded machine may have put peers into connect backoff). On timeout it
/// prints every device's view, stops the devices and prints their journals.
fn wait_for_one_digest(
    homes: &[std::path::PathBuf],
    ns: &str,
    children: &mut Vec<std::process::Child>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let digests: Vec<Option<String>> = homes.iter().map(|h| journal_digest(h, ns)).collect();
        if digests[0].is_some() && digests.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        if Instant::now() >= deadline {
            dump(homes);
            for c in children.drain(..) {
                terminate(c);
            }
            dump(homes);
            panic!("no common digest: {digests:?}");
        }
        for h in homes {
            let _ = tend(h, &["sync", "now"]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints every device's view: through the running devices, or from the stores once
/// they are stopped (for diagnosing a stall).
fn dump(homes: &[std::path::PathBuf]) {
    for h in homes {
        eprintln!("===== {}", h.display());
        for args in [
            &["--json", "journal", "status"][..],
            &["--json", "snapshot", "status"],
            &["--json", "authority", "status"],
            &["--json", "peers"],
            &["--json", "journal", "list"],
            &["--json", "sync", "now"],
        ] {
            let out = tend(h, args);
            eprintln!(
                "--- {args:?}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A free UDP port on loopback (so every device can be given the others' addresses).
fn free_addr() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").to_string()
}

#[test]
fn authority_create_and_snapshot_propose_run_over_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<_> = (0..3).map(|i| dir.path().join(format!("d{i}"))).collect();
    let ids: Vec<String> = homes
        .iter()
        .map(|h| {
            ok_json(h, &["init"])["device_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let mut children = Vec::new();
    for i in 0..3 {
        let mut extra = Vec::new();
        for j in (0..3).filter(|j| *j != i) {
            extra.push("--peer".to_string());
            extra.push(format!("{}@{}", ids[j], addrs[j]));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (child, info) = start(&homes[i], &addrs[i], &extra);
        assert_eq!(info["device_id"], ids[i].as_str());
        children.push(child);
    }
    let out = tend(
        &homes[0],
        &[
            "--json",
            "authority",
            "create",
            "--threshold",
            "2",
            "--member",
            &ids[1],
            "--member",
            &ids[2],
        ],
    );
    // With --json an error is printed on stdout.
    assert!(
        out.status.success(),
        "authority create failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(created["threshold"], 2);
    assert_eq!(created["members"].as_array().unwrap().len(), 3);
    let ns = created["namespace"].as_str().unwrap().to_string();
    // Every member adopts the authority's journal; each holds only its own share.
    for h in &homes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = ok_json(h, &["journal", "status"]);
            if s["current_namespace"] == ns.as_str() {
                break;
            }
            assert!(Instant::now() < deadline, "{} never joined", h.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(std::fs::read_dir(h.join("frost")).unwrap().count(), 1);
    }
    // Once the members hold the same journal, a member proposes; the ceremony runs over
    // the network.
    wait_for_one_digest(&homes, &ns, &mut children);
    let done = ok_json(&homes[1], &["snapshot", "propose"]);
    let epoch = done["epoch"].as_u64().unwrap();
    assert!(epoch >= 1);
    // Without a device running in another member's home, --member-home is refused when
    // this one runs.
    let out = tend(
        &homes[0],
        &["snapshot", "propose", "--member-home", "/nonexistent"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Wait until the completion has reached everyone (same journal digest), then stop.
    wait_for_one_digest(&homes, &ns, &mut children);
    for c in children {
        terminate(c);
    }
    // Offline, every member shows the verified snapshot.
    for h in &homes {
        let s = ok_json(h, &["snapshot", "status"]);
        assert_eq!(s["latest"]["epoch"].as_u64(), Some(epoch), "{s}");
    }
}
