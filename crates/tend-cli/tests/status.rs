//! `tend status`: one screen on a stopped device (from the store) and on a running one
//! (through its control socket, with its peers).

mod common;

use std::time::Duration;

use common::{ok_json, start_run, tend, terminate, two_device_authority, wait_until};

#[test]
fn status_on_a_stopped_device_counts_state_and_sees_pending_gc() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let init = ok_json(&home, &["init"]);
    ok_json(&home, &["put", "notes", "a", "1"]);
    ok_json(&home, &["put", "notes", "a", "2"]);
    ok_json(&home, &["put", "notes", "b", "3"]);
    ok_json(&home, &["log", "append", "todo", "milk"]);

    let s = ok_json(&home, &["status"]);
    assert_eq!(s["running"], false);
    assert_eq!(s["device_id"], init["device_id"]);
    assert_eq!(s["namespace"], init["namespace"]);
    assert_eq!(s["live_keys"], 2);
    assert_eq!(s["log_entries"], 1);
    assert!(s["store_bytes"].as_u64().unwrap() > 0);
    assert!(s["latest_snapshot"].is_null());
    assert_eq!(s["gc_pending"], false);
    assert!(s["peers"].is_null());

    ok_json(&home, &["snapshot", "propose"]);
    let s = ok_json(&home, &["status"]);
    let epoch = s["latest_snapshot"]["epoch"].as_u64().unwrap();
    assert_eq!(s["snapshot_epoch"], epoch);
    assert_eq!(s["gc_pending"], true, "{s}");
    let text = String::from_utf8(tend(&home, &["status"]).stdout).unwrap();
    assert!(text.contains("stopped"), "{text}");
    assert!(
        text.contains(&format!("snapshot   epoch {epoch}")),
        "{text}"
    );
    assert!(text.contains("pending"), "{text}");

    ok_json(&home, &["gc"]);
    let s = ok_json(&home, &["status"]);
    assert_eq!(s["gc_pending"], false, "{s}");
    assert_eq!(s["live_keys"], 2);
}

#[test]
fn status_on_a_running_device_shows_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_device_authority(dir.path());
    let (ra, ia) = start_run(&a, &["--listen", "127.0.0.1:0", "--sync-interval", "0.5"]);
    let peer = format!(
        "{}@{}",
        ia["device_id"].as_str().unwrap(),
        ia["listen_addr"].as_str().unwrap()
    );
    let (rb, _ib) = start_run(
        &b,
        &[
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "0.5",
            "--peer",
            &peer,
        ],
    );
    ok_json(&b, &["put", "notes", "x", "1"]);
    wait_until("b has synced with a", Duration::from_secs(30), || {
        let s = ok_json(&b, &["status"]);
        s["peers"].as_array().is_some_and(|p| {
            p.iter().any(|p| {
                p["device_id"] == ia["device_id"] && p["successful_syncs"].as_u64() > Some(0)
            })
        })
    });
    let s = ok_json(&b, &["status"]);
    assert_eq!(s["running"], true);
    assert!(s["listen_addr"].is_string());
    assert!(s["facts"].as_u64().unwrap() > 0);
    let text = String::from_utf8(tend(&b, &["status"]).stdout).unwrap();
    assert!(text.contains("running"), "{text}");
    assert!(text.contains("score"), "{text}");
    terminate(rb);
    terminate(ra);
}
