//! Write throughput (issue 17, writes) on real devices (redb homes in a tempdir):
//! - signing alone on one core (the floor under every signed write);
//! - batch appends through the library (`DataRequest::Batch` of 10,000, signed on every
//!   core, one transaction each);
//! - single durable appends from W concurrent writers through the library
//!   (`tend_node::data::run` on one shared `Device`), whose group commit shares
//!   transactions among them;
//! - the same through a running node's control socket (one `Client` per writer, each
//!   request one `log_append`, answered once durable).
//!
//! `cargo run --release -p tend-node --example write_throughput`
//! (`TEND_BENCH_FACTS=N` sets the batch run's size, default 100,000; `TEND_BENCH_WRITERS=W`
//! the writers, default 64; `TEND_BENCH_SECONDS=S` the length of each concurrent run,
//! default 5; `TEND_BENCH_PHASE=batch|library|socket` runs one phase only, for `perf`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tend_node::control::Client;
use tend_node::data::{run, Bytes64, DataRequest, DataResponse};
use tend_node::{Device, Node, NodeConfig};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn append(i: u64) -> DataRequest {
    DataRequest::LogAppend {
        log: "events".into(),
        // 64 bytes, as in the app_state bench.
        data: Bytes64(i.to_be_bytes().repeat(8)),
    }
}

/// A device that has announced its release, as a running node does at start, so it
/// writes the newest fact format (3: timed ids, which land at the end of the store's
/// index) rather than format 1, which a device writes until its release is known.
fn new_device(dir: &tempfile::TempDir, name: &str) -> Device {
    let d = Device::init(&dir.path().join(name), &mut rand::thread_rng()).expect("init");
    tend_node::upgrade::advertise(&d).expect("announce the release");
    let state = d.store().maintenance_state(d.namespace()).expect("state");
    assert_eq!(state.write_format(|| 1).version(), 3, "writes in format 3");
    d
}

/// The floor under any signed write path: one Ed25519 signature (and the fact's encoding
/// and id) per fact, on one core.
fn sign_only(dir: &tempfile::TempDir) {
    let d = new_device(dir, "sign");
    let facts: Vec<tend_core::UnsignedFact> = (0..20_000u64)
        .map(|i| tend_core::UnsignedFact {
            namespace: d.namespace(),
            epoch: tend_core::Epoch(1),
            payload: tend_core::Payload::Data(tend_core::DataOp::Append(tend_core::app::Append {
                log: "events".into(),
                seq: i,
                data: serde_bytes::ByteBuf::from(i.to_be_bytes().repeat(8)),
            })),
        })
        .collect();
    let n = facts.len();
    let t = Instant::now();
    let signed: Vec<_> = facts
        .into_iter()
        .map(|f| f.sign(d.key().signing_key()))
        .collect();
    let took = t.elapsed();
    println!(
        "signing alone, one core: {n} facts in {took:.2?} ({:.1} us per fact, {:.0} facts/s)",
        took.as_secs_f64() * 1e6 / n as f64,
        n as f64 / took.as_secs_f64()
    );
    drop(signed);
}

fn batch_appends(dir: &tempfile::TempDir, n: u64) {
    let d = new_device(dir, "batch");
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let ops = (i..(i + 10_000).min(n)).map(append).collect();
        let DataResponse::Batch(w) = run(&d, DataRequest::Batch { ops }).expect("batch") else {
            panic!("a batch answers with its writes")
        };
        i += w.len() as u64;
    }
    let took = t.elapsed();
    println!(
        "batch appends (library): {n} in batches of 10,000: {took:.2?} ({:.0} facts/s)",
        n as f64 / took.as_secs_f64()
    );
}

/// Runs `writers` threads, each calling `write` in a loop for `seconds`; facts per second.
fn concurrent(writers: u64, seconds: u64, write: impl Fn(u64, u64) + Sync) -> (u64, Duration) {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let (stop, done, write) = (&stop, &done, &write);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    write(w, i);
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    (done.load(Ordering::Relaxed), t.elapsed())
}

fn library_writers(dir: &tempfile::TempDir, writers: u64, seconds: u64) {
    let d = new_device(dir, &format!("library-{writers}"));
    let (n, took) = concurrent(writers, seconds, |w, i| {
        run(&d, append(w << 32 | i)).expect("append");
    });
    let stats = d.write_queue().stats();
    println!(
        "{writers} concurrent writers (library, single appends): {n} in {took:.2?} ({:.0} facts/s), \
         {} commits ({:.1} writes per commit)",
        n as f64 / took.as_secs_f64(),
        stats.groups,
        stats.jobs as f64 / stats.groups.max(1) as f64
    );
}

fn socket_writers(dir: &tempfile::TempDir, writers: u64, seconds: u64) {
    let d = new_device(dir, "socket");
    let home = d.home().to_owned();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let node = rt
        .block_on(Node::start(
            d,
            NodeConfig {
                control_socket: true,
                sync_interval: Duration::from_secs(3600),
                upgrades: false,
                ..NodeConfig::default()
            },
        ))
        .expect("node starts");
    let clients: Vec<std::sync::Mutex<Client>> = (0..writers)
        .map(|_| {
            std::sync::Mutex::new(
                Client::connect(&home)
                    .expect("connect")
                    .expect("the node answers"),
            )
        })
        .collect();
    let clients = Arc::new(clients);
    let (n, took) = concurrent(writers, seconds, |w, i| {
        let mut c = clients[w as usize].lock().expect("client");
        c.data(append(w << 32 | i)).expect("append");
    });
    let stats = node.device().write_queue().stats();
    println!(
        "{writers} concurrent writers (control socket, single appends): {n} in {took:.2?} \
         ({:.0} facts/s), {} commits ({:.1} writes per commit)",
        n as f64 / took.as_secs_f64(),
        stats.groups,
        stats.jobs as f64 / stats.groups.max(1) as f64
    );
    drop(clients);
    rt.block_on(node.shutdown());
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = env_or("TEND_BENCH_FACTS", 100_000);
    let writers = env_or("TEND_BENCH_WRITERS", 64);
    let seconds = env_or("TEND_BENCH_SECONDS", 5);
    let phase = std::env::var("TEND_BENCH_PHASE").unwrap_or_default();
    println!(
        "{} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if phase.is_empty() || phase == "batch" {
        sign_only(&dir);
        batch_appends(&dir, n);
    }
    if phase.is_empty() || phase == "library" {
        library_writers(&dir, 1, seconds);
        library_writers(&dir, writers, seconds);
    }
    if phase.is_empty() || phase == "socket" {
        socket_writers(&dir, writers, seconds);
    }
}
