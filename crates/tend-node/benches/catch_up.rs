//! Catching up on a million facts from one peer (issue 17, target 3): a member that holds
//! nothing syncs from one peer over loopback iroh, in a process of its own so its peak
//! memory is its own: time, facts per second, bytes on the wire per fact, peak RSS.
//! Twice: from a peer without a snapshot (every fact travels, each signature checked), and
//! from a peer whose journal a snapshot covers (the member hydrates from the blob, trusting
//! the threshold signature).
//!
//! `cargo bench -p tend-node --bench catch_up` (release). `TEND_BENCH_FACTS=100000` for a
//! tenth of the size.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{n_facts, peak_rss_mib, sign_app_facts};
use tend_core::DeviceId;
use tend_node::{Device, Node, NodeConfig, PeerAddr};

fn config() -> NodeConfig {
    NodeConfig {
        sync_interval: Duration::from_secs(3600),
        control_socket: false,
        upgrades: false,
        ..NodeConfig::default()
    }
}

/// Facts in the node's journal.
fn fact_count(node: &Node) -> u64 {
    let ns = node.device().namespace();
    node.device()
        .store()
        .stats(ns)
        .expect("stats")
        .map_or(0, |s| s.facts)
}

/// A counter's value in the node's Prometheus text.
fn metric(node: &Node, name: &str) -> f64 {
    node.metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The follower, in its own process: opens its home, syncs from the peer until it holds
/// `want` facts, and prints what it took. The time is taken when the facts are held, not
/// when the round ends (a round also waits for peers that do not answer).
/// `TEND_BENCH_ROUNDS=1` prints every round's sessions and the session counters.
async fn follow(home: &Path, peer: PeerAddr, want: u64) {
    let node = Node::start(Device::open(home).expect("open"), config())
        .await
        .expect("start");
    node.add_peer(peer).expect("add peer");
    let start = Instant::now();
    let verbose = std::env::var_os("TEND_BENCH_ROUNDS").is_some();
    let rounds = {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                let report = node.sync_now().await;
                if verbose {
                    for s in &report.sessions {
                        println!(
                            "    round at {:.2?}: {} {} after {} sessions: {} received, {} new",
                            start.elapsed(),
                            s.addr,
                            s.result,
                            s.attempts,
                            s.facts_received,
                            s.facts_accepted,
                        );
                    }
                }
                if fact_count(&node) >= want {
                    break;
                }
            }
        })
    };
    loop {
        let held = fact_count(&node);
        if held >= want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "caught up on {held} of {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    let (rss_held, peak_held) = (rss_mib("VmRSS:"), rss_mib("VmHWM:"));
    // Sessions are counted when they end.
    rounds.await.expect("rounds");
    if verbose {
        for line in node.metrics().render().lines() {
            if line.starts_with("tend_sessions_") || line.starts_with("tend_facts_re") {
                println!("    {line}");
            }
        }
        // Where the peak falls: before the facts were held (the sessions) or after (the
        // round's end: blob look-up, which folds the application state).
        println!(
            "    RSS when the facts were held {rss_held:.0} MiB, peak by then {peak_held:.0} MiB"
        );
    }
    let bytes = metric(&node, "tend_sync_bytes_received_total");
    let facts = metric(&node, "tend_facts_received_total");
    println!(
        "  caught up in {took:.2?}: {:.0} facts/s over the journal, {facts:.0} facts and {:.1} MB received ({:.0} bytes per fact held), peak RSS {:.0} MiB",
        want as f64 / took.as_secs_f64(),
        bytes / 1e6,
        bytes / want as f64,
        peak_rss_mib()
    );
    node.shutdown().await;
}

/// A memory figure of this process from /proc/self/status (`VmRSS:`, `VmHWM:`), in MiB.
fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Runs the follower as a child process of this bench binary.
fn follow_in_child(home: &Path, peer: &PeerAddr, want: u64) {
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("TEND_BENCH_FOLLOW", home)
        .env(
            "TEND_BENCH_PEER",
            serde_json::to_string(peer).expect("peer"),
        )
        .env("TEND_BENCH_WANT", want.to_string())
        .status()
        .expect("follower");
    assert!(status.success(), "the follower failed");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(home) = std::env::var("TEND_BENCH_FOLLOW") {
        let peer: PeerAddr =
            serde_json::from_str(&std::env::var("TEND_BENCH_PEER").expect("peer")).expect("peer");
        let want = std::env::var("TEND_BENCH_WANT")
            .expect("want")
            .parse()
            .expect("want");
        return follow(Path::new(&home), peer, want).await;
    }
    let n = n_facts();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    // Two full members (a 2-of-3 authority can complete a snapshot without the third)
    // and two empty joiners' homes made the same way, one per run.
    let homes: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("d{i}"))).collect();
    let mut nodes = Vec::new();
    for home in &homes[..3] {
        let device = Device::init(home, &mut rng).expect("init");
        nodes.push(Node::start(device, config()).await.expect("start"));
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    let others: Vec<DeviceId> = nodes[1..].iter().map(|n| n.device_id()).collect();
    nodes[0]
        .create_authority(2, &others, Duration::from_secs(60))
        .await
        .expect("key generation");
    let ns = nodes[0].device().namespace();
    for node in &nodes {
        while !node
            .device()
            .store()
            .maintenance_state(ns)
            .is_ok_and(|s| s.membership().is_some_and(|m| m.members.len() == 3))
        {
            node.sync_now().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for node in &nodes {
        node.sync_now().await;
    }
    // The third member is the follower: its home is copied before each run.
    let facts = sign_app_facts(nodes[0].device(), n, "catch-up");
    for node in nodes.drain(..) {
        node.shutdown().await;
    }
    copy_dir(&homes[2], &homes[3]);
    for home in &homes[..2] {
        let device = Device::open(home).expect("open");
        for chunk in facts.chunks(10_000) {
            let r = device.store().insert_batch(chunk).expect("insert");
            assert!(r.rejected.is_empty(), "{:?}", r.rejected.first());
        }
    }
    drop(facts);
    let full = Node::start(Device::open(&homes[0]).expect("open"), config())
        .await
        .expect("start");
    let want = fact_count(&full);
    println!("{n} facts per full member, {want} in its journal");

    // The full member's first round (at start, to the members' old addresses) must be
    // over before the follower starts: it would otherwise reach the follower through the
    // follower's own connection and push the same facts in a second session.
    full.sync_now().await;
    println!("without a snapshot (every fact travels):");
    follow_in_child(&homes[2], &full.peer_addr(), want);
    if std::env::var_os("TEND_BENCH_ROUNDS").is_some() {
        for line in full.metrics().render().lines() {
            if line.starts_with("tend_sessions_") || line.starts_with("tend_facts_") {
                println!("    full member: {line}");
            }
        }
    }

    println!("with a snapshot covering them (the follower hydrates from the blob):");
    let second = Node::start(Device::open(&homes[1]).expect("open"), config())
        .await
        .expect("start");
    full.add_peer(second.peer_addr()).expect("add peer");
    second.add_peer(full.peer_addr()).expect("add peer");
    full.propose_snapshot(None, Duration::from_secs(600))
        .await
        .expect("snapshot");
    full.gc(false).expect("gc");
    second.shutdown().await;
    // A follower that held nothing: it must end with the snapshot's live facts.
    let want = fact_count(&full);
    follow_in_child(&homes[3], &full.peer_addr(), want);
    full.shutdown().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}
