//! The snapshot ceremony at a million facts (issue 17, target 1): real nodes on loopback
//! iroh, a 2-of-3 FROST authority made by key generation over the network, the same N
//! application facts in every store, then one `propose_snapshot`: time from the proposal
//! until the completion is in every device's journal, and each phase the coordinator's
//! engine runs (digest, blob) measured on its own.
//!
//! The ceremony runs with every node in a process of its own, as a fleet runs them: its own
//! malloc arenas (as many as the `tend` binary sets), its own peak RSS and CPU time, each
//! reported. (With every node in one process, two members building their blob at once
//! shared an arena and waited on its lock: half the runs at 1M took 12-14 s instead of 7-8.)
//! The key generation before it runs in this process.
//!
//! `cargo bench -p tend-node --bench ceremony` (release profile). `TEND_BENCH_FACTS=100000`
//! for the size the 1M figure is compared with; `TEND_BENCH_DEVICES=20
//! TEND_BENCH_THRESHOLD=11` for a larger fleet (issue 17, target 7).

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
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
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    };
    if let Ok(spec) = std::env::var("TEND_BENCH_NODE") {
        let (home, listen) = spec.split_once('\n').expect("home and address");
        // As many malloc arenas as the `tend` binary gives one device's process.
        tend_node::allocator::bound_arenas();
        init_tracing();
        let listen = listen.parse().expect("listen address");
        return runtime().block_on(node_process(Path::new(home), listen));
    }
    runtime().block_on(run(n));
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}

/// One node in a process of its own, driven by lines on stdin and reporting on stdout:
/// `ready <digest>` once started; `sync` runs a round (`synced`); `mark` notes the CPU
/// time and the latest snapshot, and from then on `holds` is printed once the journal
/// holds a newer one; `propose` runs a ceremony (`proposed`); `stop` (or the end of
/// stdin) prints `cpu <seconds since the mark> rss <peak MiB since the mark> before <peak
/// MiB before it>` and stops the node.
async fn node_process(home: &Path, listen: SocketAddr) {
    let device = open_when_free(home);
    let node = Node::start(device, NodeConfig { listen, ..config() })
        .await
        .expect("start");
    let ns = node.device().namespace();
    // A device that has been running holds its application state folded (its API, its
    // rounds' missing-blob check); this one was started a moment ago, so fold it now, as
    // its first round would, rather than in the middle of the ceremony.
    node.device()
        .store()
        .app_state(ns)
        .expect("application state");
    println!("ready {}", node.device().digest().expect("digest"));
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let latest = |node: &Node| {
        node.device()
            .store()
            .maintenance_state(ns)
            .expect("state")
            .latest_snapshot
            .map(|l| l.proposal_id)
    };
    let mut cpu = process_cpu_time();
    let mut before = f64::NAN;
    let mut watching = None;
    loop {
        tokio::select! {
            command = commands.recv() => match command.as_deref() {
                Some("sync") => {
                    node.sync_now().await;
                    println!("synced");
                }
                Some("mark") => {
                    cpu = process_cpu_time();
                    before = peak_rss_mib();
                    // Linux: the peak starts again from the current RSS, so the one
                    // reported at the end is the ceremony's.
                    let _ = std::fs::write("/proc/self/clear_refs", "5");
                    watching = Some(latest(&node));
                }
                Some("propose") => {
                    let node = node.clone();
                    tokio::spawn(async move {
                        node.propose_snapshot(None, Duration::from_secs(600))
                            .await
                            .expect("the ceremony completes");
                        println!("proposed");
                    });
                }
                Some("stop") | None => break,
                Some(other) => panic!("unknown command {other}"),
            },
            _ = tokio::time::sleep(Duration::from_millis(2)), if watching.is_some() => {
                if watching.as_ref() != Some(&latest(&node)) {
                    println!("holds");
                    watching = None;
                }
            }
        }
    }
    println!(
        "cpu {} rss {} before {before}",
        (process_cpu_time() - cpu).as_secs_f64(),
        peak_rss_mib()
    );
    node.shutdown().await;
}

/// What a node process's reader reports when the process's stdout ends.
const EXITED: &str = "(exited)";

/// The node processes, their stdin, and every line they print, with the time it was read.
struct Fleet {
    children: Vec<(Child, ChildStdin)>,
    lines: mpsc::Receiver<(usize, String, Instant)>,
}

impl Fleet {
    fn start(homes: &[PathBuf], addrs: &[SocketAddr]) -> Self {
        let (tx, lines) = mpsc::channel();
        let exe = std::env::current_exe().expect("exe");
        let children = homes
            .iter()
            .zip(addrs)
            .enumerate()
            .map(|(i, (home, addr))| {
                let mut child = Command::new(&exe)
                    .env("TEND_BENCH_NODE", format!("{}\n{addr}", home.display()))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start a node process");
                let stdout = child.stdout.take().expect("stdout");
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in std::io::BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if tx.send((i, line, Instant::now())).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send((i, EXITED.to_string(), Instant::now()));
                });
                let stdin = child.stdin.take().expect("stdin");
                (child, stdin)
            })
            .collect();
        Self { children, lines }
    }

    fn tell(&mut self, i: usize, command: &str) {
        writeln!(self.children[i].1, "{command}").expect("a node process stopped");
    }

    /// The next line any node prints ([`EXITED`] once a node's output ends); panics after
    /// ten minutes.
    fn next(&self) -> (usize, String, Instant) {
        self.lines
            .recv_timeout(Duration::from_secs(600))
            .expect("a node process went quiet")
    }

    /// Panics with how node `i`'s process ended.
    fn stopped(&mut self, i: usize) -> ! {
        let status = self.children[i].0.wait();
        panic!("node process {i} stopped early: {status:?}");
    }

    /// Waits for the line `word` from node `i`.
    fn expect(&mut self, i: usize, word: &str) {
        loop {
            match self.next() {
                (j, line, _) if j == i && line == word => return,
                (j, line, _) if line == EXITED => self.stopped(j),
                _ => {}
            }
        }
    }

    /// Waits until every node printed a line starting with `word`; the rest of each.
    fn each_says(&mut self, word: &str) -> Vec<(String, Instant)> {
        let mut got = vec![None; self.children.len()];
        while got.iter().any(Option::is_none) {
            let (i, line, at) = self.next();
            if let Some(rest) = line.strip_prefix(word) {
                got[i] = Some((rest.trim().to_string(), at));
            } else if line == EXITED && got[i].is_none() {
                self.stopped(i);
            }
        }
        got.into_iter().flatten().collect()
    }

    fn stop(self) {
        // Each node says `cpu ...` and stops: what remains to read is each one's end.
        drop(self.lines);
        for (mut child, stdin) in self.children {
            drop(stdin);
            assert!(
                child.wait().expect("wait").success(),
                "a node process failed"
            );
        }
    }
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
    init_tracing();
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
    // Together: one after the other, each would wait for peers already gone to answer its
    // close, and keep its port for seconds.
    futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    drop(nodes);
    let t = Instant::now();
    let list: Vec<_> = homes.iter().map(|h| h.display().to_string()).collect();
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env("TEND_BENCH_FILL", list.join("\n"))
        .status()
        .expect("run the fill");
    assert!(status.success(), "the fill failed");
    let insert = t.elapsed();

    // The phases on their own, on the coordinator's store.
    let (view_time, digest_time, blob_time) = {
        let coordinator = open_when_free(&homes[1]);
        let t = Instant::now();
        let replica = DeviceReplica::new(&coordinator);
        let view = EngineView::new(&replica).expect("view");
        let view_time = t.elapsed();
        let target = view.state().current_epoch().next();
        let t = Instant::now();
        let _ = view.prefix_digest(target);
        let digest_time = t.elapsed();
        let t = Instant::now();
        // Hashed only: a `keep` CID it cannot have keeps it out of the store.
        let _ = view.snapshot_blob(target, Some(tend_snapshot::SnapshotBlob::cid_of(&[])));
        (view_time, digest_time, t.elapsed())
    };
    eprintln!("stores filled in {insert:.2?}; digest {digest_time:.2?}, blob {blob_time:.2?}; starting a process per node");

    for addr in &addrs {
        wait_until(
            "the nodes' ports to be free",
            Duration::from_secs(30),
            || std::net::UdpSocket::bind(addr).is_ok(),
        )
        .await;
    }
    let mut fleet = Fleet::start(&homes, &addrs);
    let digests = fleet.each_says("ready");
    assert!(
        digests.windows(2).all(|w| w[0].0 == w[1].0),
        "stores differ"
    );
    // The proposer syncs before it proposes: a round over equal stores.
    let t = Instant::now();
    fleet.tell(1, "sync");
    fleet.expect(1, "synced");
    let round_time = t.elapsed();
    eprintln!("round {round_time:.2?}; the ceremony");
    for i in 0..devices {
        fleet.tell(i, "mark");
    }
    let t = Instant::now();
    fleet.tell(1, "propose");
    let mut arrived: Vec<Option<Duration>> = vec![None; devices];
    let mut proposer = None;
    while arrived.iter().any(Option::is_none) || proposer.is_none() {
        match fleet.next() {
            (i, line, at) if line == "holds" => arrived[i] = Some(at - t),
            (_, line, at) if line == "proposed" => proposer = Some(at - t),
            (i, line, _) if line == EXITED => fleet.stopped(i),
            (i, line, _) => panic!("node {i} said {line}"),
        }
    }
    let proposer = proposer.expect("the proposer answered");
    let everywhere = arrived.iter().flatten().max().copied().unwrap_or_default();
    for i in 0..devices {
        fleet.tell(i, "stop");
    }
    // `cpu <seconds> rss <MiB> before <MiB>` from each.
    let usage: Vec<(f64, f64, f64)> = fleet
        .each_says("cpu")
        .iter()
        .map(|(rest, _)| {
            let n: Vec<f64> = rest
                .split(' ')
                .step_by(2)
                .map(|v| v.parse().expect("a figure"))
                .collect();
            (n[0], n[1], n[2])
        })
        .collect();
    fleet.stop();
    let cpu: f64 = usage.iter().map(|u| u.0).sum();
    println!("devices: {devices}, threshold {threshold}; facts per device: {n}");
    println!("sign and insert into every store (another process): {insert:.2?}");
    println!("coordinator phases: view {view_time:.2?}, digest {digest_time:.2?}, blob (built and hashed) {blob_time:.2?}, a sync round over equal stores {round_time:.2?}");
    println!("ceremony: completed at the proposer after {proposer:.2?}, on every device after {everywhere:.2?}");
    println!(
        "CPU time of the node processes from the proposal until then: {:.2?} (each: {})",
        Duration::from_secs_f64(cpu),
        usage
            .iter()
            .map(|u| format!("{:.1} ms", u.0 * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
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
        "peak RSS of each node's process during the ceremony (before it: from its start, \
         the application state folded and a sync round): {} MiB",
        usage
            .iter()
            .map(|u| format!("{:.0} ({:.0})", u.1, u.2))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
