//! Push-on-write latency between two real `tend run` processes (issue 16): a put through
//! device A's HTTP API (`PUT /v1/kv/...`) until it arrives on device B's changes feed
//! (`GET /v1/changes`, Server-Sent Events), over loopback iroh, with the device defaults
//! and sync rounds a minute apart (so only pushed rounds carry the writes). Idle: 100 puts,
//! 150 ms apart; loaded: `TEND_BENCH_SECONDS` (default 10) of puts at 200 a second.
//!
//! `cargo bench -p tend-cli --bench push_latency` (release build of the `tend` binary).

#[path = "../tests/api_support/mod.rs"]
mod api_support;
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::Api;
use common::{start_run, terminate, two_device_authority};

const IDLE_PUTS: usize = 100;
const LOAD_PER_SEC: u64 = 200;

/// `tend run` with the HTTP API on and sync rounds a minute apart (only pushed rounds
/// carry the writes); the process, its API and its start line.
fn run(home: &std::path::Path, extra: &[&str]) -> (Child, Api, serde_json::Value) {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--sync-interval",
        "60",
    ];
    args.extend_from_slice(extra);
    let (child, info) = start_run(home, &args);
    let api = Api::of(home, &info);
    (child, api, info)
}

/// Two devices of one 2-of-2 authority, running: A pushes to B, B serves the feed.
struct Pair {
    _dir: tempfile::TempDir,
    a: (Child, Api),
    b: (Child, Api),
}

fn pair() -> Pair {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (a, b) = two_device_authority(dir.path());
    let (run_b, api_b, info_b) = run(&b, &[]);
    let peer = format!(
        "{}@{}",
        info_b["device_id"].as_str().expect("device_id"),
        info_b["listen_addr"].as_str().expect("listen_addr")
    );
    let (run_a, api_a, _) = run(&a, &["--peer", &peer]);
    Pair {
        _dir: dir,
        a: (run_a, api_a),
        b: (run_b, api_b),
    }
}

/// Puts `n` keys on A at `pace` and returns each key's latency to B's feed.
fn measure(p: &Pair, label: &str, n: usize, pace: Duration) {
    // Warm up: a first put and its round open the connection.
    let warm = format!("/v1/kv/bench/{label}-warm");
    assert_eq!(p.a.1.call("PUT", &warm, b"w").status, 200);
    std::thread::sleep(Duration::from_secs(2));
    let mut feed = p.b.1.changes("/v1/changes?since=now", &[]);
    assert_eq!(feed.status, 200);
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let arrived = arrived.clone();
        let label = label.to_owned();
        std::thread::spawn(move || {
            let mut seen = 0;
            while seen < n {
                let Some(ev) = feed.next_event(Duration::from_secs(30)) else {
                    return;
                };
                let v = ev.json();
                let key = v["key"].as_str().unwrap_or_default();
                if v["op"] == "put" && key.starts_with(&format!("{label}-")) {
                    arrived
                        .lock()
                        .expect("lock")
                        .insert(key.to_owned(), Instant::now());
                    seen += 1;
                }
            }
        })
    };
    let mut sent = HashMap::new();
    let start = Instant::now();
    for i in 0..n {
        let due = start + pace * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let key = format!("{label}-{i:05}");
        sent.insert(key.clone(), Instant::now());
        let r = p.a.1.call("PUT", &format!("/v1/kv/bench/{key}"), b"v");
        assert_eq!(r.status, 200, "put {key}");
    }
    let took = start.elapsed();
    reader.join().expect("the feed reader");
    let arrived = arrived.lock().expect("lock");
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(k, t)| Some(arrived.get(k)?.duration_since(*t).as_secs_f64() * 1e3))
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<28} {:>4.0} puts/s  n={:>5} of {n}  p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms",
        n as f64 / took.as_secs_f64(),
        ms.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

fn main() {
    let seconds: u64 = std::env::var("TEND_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let p = pair();
    measure(&p, "idle", IDLE_PUTS, Duration::from_millis(150));
    measure(
        &p,
        "loaded",
        (seconds * LOAD_PER_SEC) as usize,
        Duration::from_micros(1_000_000 / LOAD_PER_SEC),
    );
    terminate(p.a.0);
    terminate(p.b.0);
}
