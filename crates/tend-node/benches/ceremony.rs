//! The snapshot ceremony at a million facts (issue 17, target 1): three real nodes on
//! loopback iroh, a 2-of-3 FROST authority made by key generation over the network, the
//! same N application facts in every store, then one `propose_snapshot`: time from the
//! proposal until the completion is in every device's journal, and each phase the
//! coordinator's engine runs (digest, blob) measured on its own.
//!
//! `cargo bench -p tend-node --bench ceremony` (release profile). `TEND_BENCH_FACTS=100000`
//! for the size the 1M figure is compared with; `TEND_BENCH_DEVICES=20
//! TEND_BENCH_THRESHOLD=11` for a larger fleet (issue 17, target 7), every device a node of
//! this process.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{n_facts, peak_rss_mib, process_cpu_time, sign_app_facts};
use tend_core::DeviceId;
use tend_node::replica::DeviceReplica;
use tend_node::{Device, Node, NodeConfig};
use tend_replica::EngineView;
use tend_snapshot::LocalJournal;

fn config() -> NodeConfig {
    NodeConfig {
        // The stores are filled directly and identically; rounds carry the completion
        // (and a member fetches the blob) as they would in a fleet.
        sync_interval: Duration::from_secs(2),
        control_socket: false,
        upgrades: false,
        ..NodeConfig::default()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs `n` facts by the first device and puts them into every store, in a process of its
/// own, so the nodes' peak memory is not the signed facts'.
fn fill(homes: &[std::path::PathBuf], n: usize) {
    let facts = sign_app_facts(&open_when_free(&homes[0]), n, "ceremony");
    for home in homes {
        let device = open_when_free(home);
        for chunk in facts.chunks(10_000) {
            let r = device.store().insert_batch(chunk).expect("insert");
            assert!(r.rejected.is_empty(), "{:?}", r.rejected.first());
        }
    }
}

/// Opens a home the parent's nodes held: a task of a node that was shut down may still be
/// dropping its handle on the store for a moment.
fn open_when_free(home: &std::path::Path) -> Device {
    let start = Instant::now();
    loop {
        match Device::open(home) {
            Err(tend_node::DeviceError::Store(tend_store::StoreError::Locked { .. }))
                if start.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r.expect("open"),
        }
    }
}

fn main() {
    let n = n_facts();
    if let Ok(homes) = std::env::var("TEND_BENCH_FILL") {
        let homes: Vec<_> = homes.split('\n').map(std::path::PathBuf::from).collect();
        return fill(&homes, n);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(n));
}

/// Devices and threshold: `TEND_BENCH_DEVICES` and `TEND_BENCH_THRESHOLD`, else 2 of 3.
fn fleet_size() -> (usize, u16) {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let devices = var("TEND_BENCH_DEVICES").unwrap_or(3).max(2);
    let threshold = var("TEND_BENCH_THRESHOLD").unwrap_or(devices / 2 + 1);
    (devices, threshold.clamp(2, devices) as u16)
}

async fn run(n: usize) {
    let (devices, threshold) = fleet_size();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    let mut nodes = Vec::new();
    for i in 0..devices {
        let device = Device::init(&dir.path().join(format!("d{i}")), &mut rng).expect("init");
        nodes.push(Node::start(device, config()).await.expect("start"));
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    eprintln!("{devices} nodes started; key generation ({threshold} of {devices})");
    let others: Vec<DeviceId> = nodes[1..].iter().map(|n| n.device_id()).collect();
    nodes[0]
        .create_authority(threshold, &others, Duration::from_secs(60))
        .await
        .expect("key generation over the network");
    let ns = nodes[0].device().namespace();
    for node in &nodes {
        wait_until("the membership everywhere", Duration::from_secs(60), || {
            node.device().namespace() == ns
                && node
                    .device()
                    .store()
                    .maintenance_state(ns)
                    .is_ok_and(|s| s.membership().is_some_and(|m| m.members.len() == devices))
        })
        .await;
    }
    eprintln!("authority made; signing {n} facts");
    // Every maintenance fact everywhere first, so the prefixes agree.
    for node in &nodes {
        node.sync_now().await;
    }

    // The facts go into the stores while the nodes are down, as if each device had
    // received them long ago: a running node keeps its sessions' view of its own items.
    let homes: Vec<_> = (0..devices)
        .map(|i| dir.path().join(format!("d{i}")))
        .collect();
    // Each restarts on its port, so the addresses the others hold stay right (a first
    // round dialling a stale one waits out the connect timeout).
    let addrs: Vec<_> = nodes.iter().map(|n| n.peer_addr().addr).collect();
    for node in nodes.drain(..) {
        node.shutdown().await;
    }
    let t = Instant::now();
    let list: Vec<_> = homes.iter().map(|h| h.display().to_string()).collect();
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("TEND_BENCH_FILL", list.join("\n"))
        .status()
        .expect("run the fill");
    assert!(status.success(), "the fill failed");
    let insert = t.elapsed();
    for (home, listen) in homes.iter().zip(addrs) {
        let device = Device::open(home).expect("open");
        let config = NodeConfig { listen, ..config() };
        nodes.push(Node::start(device, config).await.expect("restart"));
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    // A device that has been running holds its application state folded (its API, its
    // rounds' missing-blob check); these were started a moment ago, so fold it now, as
    // their first round would, rather than in the middle of the ceremony.
    let t = Instant::now();
    for node in &nodes {
        node.device()
            .store()
            .app_state(ns)
            .expect("application state");
    }
    let fold = t.elapsed();
    let digests: Vec<_> = nodes
        .iter()
        .map(|n| n.device().digest().expect("digest"))
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "stores differ");

    eprintln!("stores filled in {insert:.2?}; application states folded in {fold:.2?}; measuring the phases");
    // The phases on their own, on the coordinator's store.
    let store = nodes[1].device().store();
    let target = store
        .maintenance_state(ns)
        .expect("state")
        .current_epoch()
        .next();
    let t = Instant::now();
    let replica = DeviceReplica::new(nodes[1].device());
    let view = EngineView::new(&replica).expect("view");
    let view_time = t.elapsed();
    let t = Instant::now();
    let _ = view.prefix_digest(target);
    let digest_time = t.elapsed();
    let t = Instant::now();
    // Hashed only: a `keep` CID it cannot have keeps it out of the store.
    let _ = view.snapshot_blob(target, Some(tend_snapshot::SnapshotBlob::cid_of(&[])));
    let blob_time = t.elapsed();

    // The proposer syncs before it proposes: a round over equal stores.
    let t = Instant::now();
    nodes[1].sync_now().await;
    let round_time = t.elapsed();
    eprintln!(
        "digest {digest_time:.2?}, blob {blob_time:.2?}, round {round_time:.2?}; the ceremony"
    );
    let t = Instant::now();
    let cpu = process_cpu_time();
    let done = nodes[1]
        .propose_snapshot(None, Duration::from_secs(600))
        .await
        .expect("the ceremony completes");
    let proposer = t.elapsed();
    // Each device's own arrival time, polled together.
    let mut arrived: Vec<Option<Duration>> = vec![None; nodes.len()];
    while arrived.iter().any(Option::is_none) {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "timed out waiting for the completion everywhere"
        );
        for (node, at) in nodes.iter().zip(arrived.iter_mut()) {
            if at.is_none()
                && node.device().store().maintenance_state(ns).is_ok_and(|s| {
                    s.latest_snapshot
                        .is_some_and(|l| l.snapshot == done.snapshot)
                })
            {
                *at = Some(t.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let everywhere = arrived.iter().flatten().max().copied().unwrap_or_default();
    // The polling above costs next to nothing; on a machine with fewer cores than nodes
    // the ceremony's wall time is at least this over the core count.
    let cpu = process_cpu_time() - cpu;
    println!("devices: {devices}, threshold {threshold}; facts per device: {n}");
    println!("sign and insert into every store (another process): {insert:.2?}");
    println!("coordinator phases: view {view_time:.2?}, digest {digest_time:.2?}, blob (built and hashed) {blob_time:.2?}, a sync round over equal stores {round_time:.2?}");
    println!("ceremony: completed at the proposer after {proposer:.2?}, on every device after {everywhere:.2?}");
    println!("CPU time of the process (every node) from the proposal until then: {cpu:.2?}");
    let each: Vec<String> = arrived
        .iter()
        .flatten()
        .map(|d| format!("{d:.2?}"))
        .collect();
    println!(
        "completion in each device's journal (the proposer second): {}",
        each.join(", ")
    );
    println!(
        "peak RSS of the process (every node; the facts were signed and stored by another): {:.0} MiB",
        peak_rss_mib()
    );
    for node in nodes {
        node.shutdown().await;
    }
}
