//! `tend run`'s rate-limit options on real processes: a device told to accept one session
//! per second from each peer refuses the next with a time to come back, the peer shows
//! why, and the metrics count it; a limit of 0 is refused in one line.

mod common;

use std::time::Duration;

use common::{ok_json, scrape, start_run, tend, terminate, two_device_authority, wait_until};

fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[test]
fn tend_run_limits_the_sessions_a_peer_opens_and_counts_what_it_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_device_authority(dir.path());
    let (ra, ia) = start_run(
        &a,
        &[
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "3600",
            "--metrics",
            "127.0.0.1:0",
            "--limit-sessions-per-peer",
            "1",
        ],
    );
    let peer = format!(
        "{}@{}",
        ia["device_id"].as_str().unwrap(),
        ia["listen_addr"].as_str().unwrap()
    );
    let (rb, _) = start_run(
        &b,
        &[
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "3600",
            "--peer",
            &peer,
        ],
    );
    // b syncs at start and then three times in a row: a takes one session per second.
    let mut results = Vec::new();
    for _ in 0..3 {
        let report = ok_json(&b, &["sync", "now"]);
        for s in report["sessions"].as_array().unwrap() {
            results.push(s["result"].as_str().unwrap().to_string());
        }
    }
    assert!(
        results
            .iter()
            .any(|r| r.contains("refused: too many sessions from this device")),
        "{results:?}"
    );
    let metrics = ia["metrics_addr"].as_str().unwrap().to_string();
    let mut text = String::new();
    wait_until("a counts the refusal", Duration::from_secs(10), || {
        text = scrape(&metrics);
        value(
            &text,
            "tend_rate_limited_total{direction=\"in\",scope=\"peer\",kind=\"sessions\"}",
        ) >= 1.0
    });
    assert!(
        value(
            &text,
            "tend_handshake_refusals_total{reason=\"rate_limited\"}"
        ) >= 1.0,
        "{text}"
    );
    terminate(rb);
    terminate(ra);
}

#[test]
fn a_zero_or_malformed_limit_is_one_line_of_error() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    for bad in [
        ["--limit-sessions", "0"],
        ["--limit-bytes-in-per-peer", "lots"],
    ] {
        let mut args = vec!["run", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(&bad);
        let out = tend(&home, &args);
        assert!(!out.status.success(), "{bad:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(bad[0]) || err.contains(bad[1]), "{err}");
    }
}
