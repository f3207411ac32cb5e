//! Reconciliation benchmark: two in-memory item sets of n items differing by d, the
//! difference clustered in the newest epochs or scattered at random, in either direction.
//! The *recent* layouts put all n items in one epoch, written by `TEND_BENCH_DEVICES`
//! devices (default 3) in turn, 10 ms apart, and the d missing items are the d latest
//! writes of one device (one cut off while it wrote them). `recent-id` gives every item a
//! random id, as untimed facts (format 1) have: the d writes scatter over the epoch.
//! `recent-auth` keys those by `(epoch, author, id)`, the only finer clustering derivable
//! from an untimed fact. `recent-time` gives every item the id a timed fact (format 2) has,
//! [`FactId::timed`] of its write time, so the d writes are one recent range.
//!
//! Prints a table: negentropy round trips, bytes on the wire (whole sync messages: Hello,
//! Accept, Reconcile, Want, Facts with d facts of 200 bytes, Done), the lower bound (the
//! missing facts' own bytes, 200 per fact), their ratio, and the CPU time each side spends
//! in reconciliation. Run with `cargo bench -p tend-sync` (release profile); set
//! `TEND_BENCH_N` to change n (default 1,000,000), `TEND_BENCH_FRAME` to change the
//! frame size limit (default: the session default) and `TEND_BENCH_LAYOUTS` to run only
//! some layouts (names as printed, comma-separated).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tend_core::{
    ContextId, DeviceId, Epoch, FactId, JournalNamespace, MaintenanceEpoch, ProtocolVersion,
};
use tend_sync::reconcile::id_list_entries;
use tend_sync::{
    Accept, FenceStatus, Hello, MemItems, Reconciler, SessionConfig, SharedItems, SyncItem,
    SyncMessage,
};

const FACT_BYTES: usize = 200;
const PER_EPOCH: usize = 1000;

#[derive(Clone, Copy)]
enum Layout {
    Clustered,
    Scattered,
    /// One epoch, d recent writes of one device, items keyed by `(epoch, id)`.
    RecentById,
    /// The same, items keyed by `(epoch, author, id)`.
    RecentByAuthor,
    /// The same, every id a timed fact's: its write time first.
    RecentByTime,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Clustered => "clustered",
            Layout::Scattered => "scattered",
            Layout::RecentById => "recent-id",
            Layout::RecentByAuthor => "recent-auth",
            Layout::RecentByTime => "recent-time",
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    /// The responder lacks the d items: the initiator pushes them.
    Push,
    /// The initiator lacks them: it asks with Want and the responder sends them.
    Pull,
}

struct Row {
    rounds: usize,
    neg_bytes: usize,
    wire_bytes: usize,
    init_cpu: Duration,
    resp_cpu: Duration,
    found: usize,
}

fn ns() -> JournalNamespace {
    JournalNamespace::Context(ContextId([9; 32]))
}

fn all_items(n: usize, rng: &mut StdRng) -> Vec<SyncItem> {
    let mut v: Vec<SyncItem> = (0..n)
        .map(|i| SyncItem {
            epoch: Epoch((i / PER_EPOCH) as u64 + 1),
            id: FactId(rng.gen()),
        })
        .collect();
    v.sort_unstable();
    v
}

/// One epoch of n items written by `devices` devices in turn, sorted by the layout's key,
/// with device 0's d missing writes marked: the item set and the mask that goes with it.
fn one_epoch(
    n: usize,
    d: usize,
    devices: usize,
    layout: Layout,
    rng: &mut StdRng,
) -> (Vec<SyncItem>, Vec<bool>) {
    let own: Vec<usize> = (0..n).filter(|i| i % devices == 0).collect();
    let mut miss = vec![false; n];
    for i in &own[own.len() - d.min(own.len())..] {
        miss[*i] = true;
    }
    const START_MS: u64 = 1_765_000_000_000;
    let mut keyed: Vec<(SyncItem, bool)> = (0..n)
        .map(|i| {
            let author = match layout {
                Layout::RecentByAuthor => (i % devices) as u64,
                _ => 0,
            };
            let id = match layout {
                Layout::RecentByTime => FactId::timed(START_MS + 10 * i as u64, &rng.gen()),
                _ => FactId(rng.gen()),
            };
            let item = SyncItem {
                epoch: Epoch(1 + author),
                id,
            };
            (item, miss[i])
        })
        .collect();
    keyed.sort_unstable_by_key(|(item, _)| *item);
    keyed.into_iter().unzip()
}

fn missing(n: usize, d: usize, layout: Layout, rng: &mut StdRng) -> Vec<bool> {
    let mut m = vec![false; n];
    match layout {
        Layout::RecentById | Layout::RecentByAuthor | Layout::RecentByTime => {
            unreachable!("one_epoch marks these")
        }
        Layout::Clustered => m[n - d..].iter_mut().for_each(|x| *x = true),
        Layout::Scattered => {
            for i in rand::seq::index::sample(rng, n, d) {
                m[i] = true;
            }
        }
    }
    m
}

fn envelope(msg: &SyncMessage) -> usize {
    msg.encode().len()
}

fn facts_bytes(count: usize, cfg: &SessionConfig) -> usize {
    // Real Facts messages of 200-byte facts, batched as sessions batch them.
    let per_batch = cfg
        .max_batch_facts
        .min(cfg.max_batch_bytes / FACT_BYTES)
        .max(1);
    let mut total = 0;
    let mut left = count;
    while left > 0 {
        let k = left.min(per_batch);
        total += envelope(&SyncMessage::Facts(vec![vec![0xab; FACT_BYTES]; k]));
        left -= k;
    }
    total
}

fn run(full: &[SyncItem], miss: &[bool], dir: Direction, cfg: &SessionConfig) -> Row {
    let partial: Vec<SyncItem> = full
        .iter()
        .zip(miss)
        .filter(|(_, m)| !**m)
        .map(|(i, _)| *i)
        .collect();
    let full: SharedItems = Arc::new(MemItems::from_sorted(ns(), full.to_vec()));
    let partial: SharedItems = Arc::new(MemItems::from_sorted(ns(), partial));
    let (a, b) = match dir {
        Direction::Push => (full, partial),
        Direction::Pull => (partial, full),
    };
    let mut ini = Reconciler::new(a, cfg.frame_size_limit).unwrap();
    let mut res = Reconciler::new(b, cfg.frame_size_limit).unwrap();
    let (mut init_cpu, mut resp_cpu) = (Duration::ZERO, Duration::ZERO);
    let epoch = MaintenanceEpoch::default();
    let me = DeviceId([1; 32]);

    let t = Instant::now();
    let mut msg = ini.initiate().unwrap();
    init_cpu += t.elapsed();
    let mut neg_bytes = msg.len();
    let mut wire = envelope(&SyncMessage::Hello(Hello {
        protocol: ProtocolVersion::CURRENT,
        namespace: ns(),
        device: me,
        epoch,
        fence: FenceStatus::Satisfied,
        reconcile: msg.clone(),
    }));
    let (mut rounds, mut have, mut need) = (0, 0usize, std::collections::HashSet::new());
    let mut at_once = false;
    loop {
        let t = Instant::now();
        let answer = res.respond(&msg).unwrap();
        resp_cpu += t.elapsed();
        neg_bytes += answer.len();
        if rounds == 0 {
            at_once = answer == [0x61];
        }
        wire += if rounds == 0 {
            envelope(&SyncMessage::Accept(Accept {
                protocol: ProtocolVersion::CURRENT,
                device: me,
                epoch,
                fence: FenceStatus::Satisfied,
                reconcile: answer.clone(),
            }))
        } else {
            envelope(&SyncMessage::Reconcile(answer.clone()))
        };
        rounds += 1;
        let t = Instant::now();
        let step = ini.step(&answer).unwrap();
        init_cpu += t.elapsed();
        have += step.have.len();
        // Wants carry each id once, as sessions deduplicate them, by position in the
        // answer's id lists (a bit each), by id otherwise: the session's encoding.
        let fresh: Vec<FactId> = step
            .need
            .into_iter()
            .filter(|id| need.insert(*id))
            .collect();
        if !fresh.is_empty() {
            let listed = id_list_entries(&answer).unwrap_or_default();
            let pos: HashMap<FactId, usize> =
                listed.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            let mut bits = vec![0u8; listed.len().div_ceil(8)];
            let mut by_id = Vec::new();
            for id in &fresh {
                match pos.get(id) {
                    Some(&i) => bits[i / 8] |= 1 << (i % 8),
                    None => by_id.push(*id),
                }
            }
            while bits.last() == Some(&0) {
                bits.pop();
            }
            if !bits.is_empty() {
                wire += envelope(&SyncMessage::WantIndexed {
                    answer: rounds as u64 - 1,
                    bits,
                });
            }
            for chunk in by_id.chunks(cfg.max_want_ids) {
                wire += envelope(&SyncMessage::Want(chunk.to_vec()));
            }
        }
        match step.next {
            Some(next) => {
                neg_bytes += next.len();
                wire += envelope(&SyncMessage::Reconcile(next.clone()));
                msg = next;
            }
            None => break,
        }
    }
    let found = have + need.len();
    // Sessions that match at once end after Hello/Accept; others close with two Done.
    if !at_once {
        wire += facts_bytes(found, cfg) + 2 * envelope(&SyncMessage::Done);
    }
    Row {
        rounds,
        neg_bytes,
        wire_bytes: wire,
        init_cpu,
        resp_cpu,
        found,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let n: usize = std::env::var("TEND_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut cfg = SessionConfig::default();
    if let Some(f) = std::env::var("TEND_BENCH_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.frame_size_limit = f;
    }
    let devices: usize = std::env::var("TEND_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut rng = StdRng::seed_from_u64(7);
    let full = all_items(n, &mut rng);
    println!(
        "n = {n}, {PER_EPOCH} items per epoch ({devices} devices, one epoch in the recent layouts), frame size limit {} bytes, facts counted as {FACT_BYTES} bytes",
        cfg.frame_size_limit
    );
    println!(
        "{:<11} {:<5} {:>7} {:>6} {:>11} {:>11} {:>11} {:>7} {:>10} {:>10}",
        "layout",
        "dir",
        "d",
        "rtt",
        "neg bytes",
        "wire bytes",
        "lower bnd",
        "ratio",
        "init ms",
        "resp ms"
    );
    let only = std::env::var("TEND_BENCH_LAYOUTS").ok();
    for layout in [
        Layout::Clustered,
        Layout::Scattered,
        Layout::RecentById,
        Layout::RecentByAuthor,
        Layout::RecentByTime,
    ] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|l| l == layout.name()))
        {
            continue;
        }
        for dir in [Direction::Push, Direction::Pull] {
            for d in [0usize, 1, 1_000, 100_000] {
                if d > n {
                    continue;
                }
                let row = match layout {
                    Layout::RecentById | Layout::RecentByAuthor | Layout::RecentByTime => {
                        if d > n / devices {
                            continue;
                        }
                        let (items, miss) = one_epoch(n, d, devices, layout, &mut rng);
                        run(&items, &miss, dir, &cfg)
                    }
                    _ => {
                        let miss = missing(n, d, layout, &mut rng);
                        run(&full, &miss, dir, &cfg)
                    }
                };
                assert_eq!(row.found, d, "reconciliation found the difference");
                let lower = d * FACT_BYTES;
                let ratio = if d == 0 {
                    "-".to_string()
                } else {
                    format!("{:.3}", row.wire_bytes as f64 / lower as f64)
                };
                println!(
                    "{:<11} {:<5} {:>7} {:>6} {:>11} {:>11} {:>11} {:>7} {:>10.1} {:>10.1}",
                    layout.name(),
                    match dir {
                        Direction::Push => "push",
                        Direction::Pull => "pull",
                    },
                    d,
                    row.rounds,
                    row.neg_bytes,
                    row.wire_bytes,
                    lower,
                    ratio,
                    row.init_cpu.as_secs_f64() * 1e3,
                    row.resp_cpu.as_secs_f64() * 1e3,
                );
            }
        }
    }
}
