//! Push-on-write latency (issue 16): two real devices (redb homes in a tempdir, iroh
//! endpoints on 127.0.0.1) in one authority, sync rounds a minute apart, so only pushed
//! rounds carry the writes. Measures the time from a put on device A (`Node::data`) to the
//! commit of that change on device B, as B's changes feed reports it (`Store::on_change`,
//! what the HTTP API's `/v1/changes` and subscriptions wait on): idle (one put at a time)
//! and under a steady load of 200 puts a second, each with the default rate limits (25
//! sessions a second per peer, so pushed rounds start 50 ms apart), with that limit at
//! 10 a second (125 ms; the default until 2026-12-05), and with the session limits off.
//!
//! `cargo run --release -p tend-node --example push_latency`
//! (`TEND_BENCH_SECONDS=N` sets the length of the loaded run, default 10).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tend_core::{DataOp, Payload};
use tend_node::data::{Bytes64, DataRequest};
use tend_node::fleet::LocalFleet;
use tend_node::{Device, Node, NodeConfig};

const IDLE_PUTS: usize = 100;
const LOAD_PER_SEC: u64 = 200;

fn load_seconds() -> u64 {
    std::env::var("TEND_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// When each change arrived on B, by its cursor.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

struct Pair {
    _dir: tempfile::TempDir,
    a: Node,
    b: Node,
    arrivals: Arrivals,
}

/// The incoming session limits both devices run with.
#[derive(Clone, Copy)]
enum SessionLimit {
    Default,
    PerPeer(u32),
    Off,
}

impl SessionLimit {
    fn label(self) -> String {
        match self {
            SessionLimit::Default => "default rate limits".into(),
            SessionLimit::PerPeer(n) => format!("session limit {n}/s per peer"),
            SessionLimit::Off => "session limits off".into(),
        }
    }
}

fn config(limit: SessionLimit) -> NodeConfig {
    let mut c = NodeConfig {
        sync_interval: Duration::from_secs(60),
        control_socket: false,
        upgrades: false,
        ..NodeConfig::default()
    };
    let rate = &mut c.manager.rate;
    match limit {
        SessionLimit::Default => {}
        SessionLimit::PerPeer(n) => {
            rate.inbound_per_peer.sessions_per_sec = std::num::NonZeroU32::new(n);
            rate.inbound_global.sessions_per_sec = std::num::NonZeroU32::new(4 * n);
        }
        SessionLimit::Off => {
            rate.inbound_per_peer.sessions_per_sec = None;
            rate.inbound_global.sessions_per_sec = None;
        }
    }
    c
}

async fn pair(session_limit: SessionLimit) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    let admin = Device::init(&dir.path().join("a"), &mut rng).expect("init a");
    let ns = admin.namespace();
    let joining = Device::init_joining(&dir.path().join("b"), ns, &mut rng).expect("init b");
    let mut fleet = LocalFleet::new(vec![Arc::new(admin), Arc::new(joining)]);
    fleet.create_authority(2, &mut rng).expect("authority");
    let mut devices = fleet
        .into_devices()
        .into_iter()
        .map(|d| Arc::try_unwrap(d).unwrap_or_else(|_| panic!("the fleet still holds a device")));
    let (da, db) = (devices.next().expect("a"), devices.next().expect("b"));
    let arrivals: Arrivals = Arc::default();
    let log = arrivals.clone();
    db.store().on_change(move |seq| {
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((seq, Instant::now()));
    });
    let b = Node::start(db, config(session_limit))
        .await
        .expect("start b");
    let a = Node::start(
        da,
        NodeConfig {
            peers: vec![b.peer_addr()],
            ..config(session_limit)
        },
    )
    .await
    .expect("start a");
    b.add_peer(a.peer_addr()).expect("b learns a");
    let start = Instant::now();
    while a.device().digest().expect("digest") != b.device().digest().expect("digest") {
        assert!(start.elapsed() < Duration::from_secs(20), "no first sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Pair {
        _dir: dir,
        a,
        b,
        arrivals,
    }
}

fn put(i: usize) -> DataRequest {
    DataRequest::Put {
        collection: "bench".into(),
        key: format!("k{i:06}"),
        value: Bytes64(vec![b'v'; 100]),
    }
}

/// Latencies in ms of the puts sent at `sent` (by key index), from B's arrivals.
fn latencies(p: &Pair, sent: &HashMap<usize, Instant>) -> Vec<f64> {
    let arrivals = p.arrivals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // A commit reports its last cursor: every change up to it arrived then.
    let mut lat = Vec::new();
    let store = p.b.device().store();
    let changes = store.changes_since(0, usize::MAX).expect("changes");
    for c in changes {
        let Some(at) = arrivals.iter().find(|(seq, _)| *seq >= c.seq).map(|x| x.1) else {
            continue;
        };
        let Some(stored) = store.get(c.namespace, c.epoch, &c.id).expect("get") else {
            continue;
        };
        let Ok((_, Payload::Data(DataOp::Put(put)))) = stored.author_payload() else {
            continue;
        };
        let Some(i) = put
            .key
            .strip_prefix('k')
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(t) = sent.get(&i) {
            lat.push(at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
        }
    }
    lat
}

fn report(what: &str, mut lat: Vec<f64>, expected: usize) {
    lat.sort_by(f64::total_cmp);
    let n = lat.len();
    assert_eq!(n, expected, "{what}: every put must arrive");
    let pct = |p: f64| lat[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "{what:<44} n={n:>5}  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        pct(0.50),
        pct(0.99),
        lat[n - 1]
    );
}

async fn wait_arrived(p: &Pair, last_key: usize) {
    let start = Instant::now();
    let key = format!("k{last_key:06}");
    loop {
        let r = p.b.data(DataRequest::Get {
            collection: "bench".into(),
            key: key.clone(),
        });
        if matches!(r, Ok(tend_node::data::DataResponse::Value(Some(_)))) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{key} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(session_limit: SessionLimit) {
    let label = session_limit.label();
    // Idle: one put at a time, each after the last arrived and a pause.
    let p = pair(session_limit).await;
    let mut sent = HashMap::new();
    for i in 0..IDLE_PUTS {
        sent.insert(i, Instant::now());
        let a = p.a.clone();
        tokio::task::spawn_blocking(move || a.data(put(i)).expect("put"))
            .await
            .expect("put task");
        wait_arrived(&p, i).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    report(&format!("idle, {label}"), latencies(&p, &sent), IDLE_PUTS);
    p.a.shutdown().await;
    p.b.shutdown().await;

    // Loaded: 200 puts a second from a writer thread, on a fresh pair.
    let p = pair(session_limit).await;
    let n = (LOAD_PER_SEC * load_seconds()) as usize;
    let a = p.a.clone();
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = HashMap::new();
        for i in 0..n {
            let due = start + Duration::from_micros(1_000_000 / LOAD_PER_SEC * i as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sent.insert(i, Instant::now());
            a.data(put(i)).expect("put");
        }
        (sent, start.elapsed())
    });
    let (sent, took) = tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .expect("writer task");
    wait_arrived(&p, n - 1).await;
    report(
        &format!("{:.0} puts/s, {label}", n as f64 / took.as_secs_f64()),
        latencies(&p, &sent),
        n,
    );
    p.a.shutdown().await;
    p.b.shutdown().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run(SessionLimit::Default).await;
        run(SessionLimit::PerPeer(10)).await;
        run(SessionLimit::Off).await;
    });
}
