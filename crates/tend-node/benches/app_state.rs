//! Application state at a million facts (issue 14's benchmarks): 1M puts over 10k keys,
//! then a snapshot and GC (store size against the live data), get latency and scan
//! throughput; and hydration of a snapshot that carries 1M live records (time and peak
//! memory). One process, a real device home and redb store, durable commits.
//!
//! `cargo bench -p tend-node --bench app_state` (release profile). `TEND_BENCH_FACTS=100000`
//! scales both phases down by 10 for a smoke run.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{n_facts, peak_rss_mib};
use ed25519_dalek::{Signer, SigningKey};
use serde_bytes::ByteBuf;
use tend_core::app::{Put, Value};
use tend_core::maintenance::{MaintenanceFact, SnapshotCompleted, SnapshotV1};
use tend_core::VerifiedFact;
use tend_core::{DataOp, Epoch, FactId, Hash32, JournalNamespace, Payload, UnsignedFact};
use tend_node::data::{run, DataRequest, DataResponse};
use tend_node::fleet::StoreJournal;
use tend_node::Device;
use tend_store::Store;

const KEYS: usize = 10_000;
const VALUE_BYTES: usize = 100;
const EPOCHS: u64 = 10;

/// Signs `n` facts on two threads (not timed by the caller's figures).
fn sign_all(
    key: &SigningKey,
    n: usize,
    make: impl Fn(usize) -> UnsignedFact + Sync,
) -> Vec<VerifiedFact> {
    let half = n / 2;
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            (0..half)
                .map(&make)
                .map(|u| u.sign(key))
                .collect::<Vec<_>>()
        });
        let mut b: Vec<_> = (half..n).map(&make).map(|u| u.sign(key)).collect();
        let mut a = a.join().expect("signing thread");
        a.append(&mut b);
        a
    })
}

fn insert(store: &Store, facts: &[VerifiedFact]) -> Duration {
    let t = Instant::now();
    for chunk in facts.chunks(10_000) {
        let r = store.insert_batch(chunk).expect("insert");
        assert!(r.rejected.is_empty(), "{:?}", r.rejected.first());
    }
    t.elapsed()
}

/// A snapshot at `epoch` completed with the one-device authority's key; returns the blob
/// bytes, the size of its item blob (kept beside it, as a signer keeps both) and how long
/// building them took.
fn snapshot(d: &Device, epoch: Epoch) -> (Vec<u8>, u64, Duration) {
    let ns = d.namespace();
    let t = Instant::now();
    let blob = StoreJournal::new(d.store(), ns)
        .try_snapshot_blob(epoch)
        .expect("blob");
    let bytes = blob.encode();
    let items = blob.item_blob().map(|i| i.encode()).unwrap_or_default();
    let built = t.elapsed();
    if !items.is_empty() {
        d.store()
            .put_blob(tend_core::ids::CODEC_DAG_CBOR, &items)
            .expect("store item blob");
    }
    let cid = d
        .store()
        .put_blob(tend_core::ids::CODEC_DAG_CBOR, &bytes)
        .expect("store blob");
    let snapshot = SnapshotV1 {
        epoch,
        digest: blob.prefix_digest(),
        blob_cid: cid,
    };
    let proposal_id = Hash32::of(&epoch.0.to_be_bytes());
    let sig = d
        .key()
        .signing_key()
        .sign(&snapshot.signing_message(&ns, &proposal_id));
    d.write(UnsignedFact {
        namespace: ns,
        epoch,
        payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
            proposal_id,
            snapshot,
            threshold_signature: sig.to_bytes(),
        })),
    })
    .expect("completion");
    assert_eq!(
        d.store().maintenance_state(ns).unwrap().snapshot_epoch(),
        epoch
    );
    (bytes, items.len() as u64, built)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn puts_then_gc(n: usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).expect("init");
    let ns: JournalNamespace = d.namespace();
    let key = d.key().signing_key().clone();
    let per_epoch = n.div_ceil(EPOCHS as usize);
    // Put i writes key i % KEYS; it supersedes the previous put of that key.
    let t = Instant::now();
    let mut facts: Vec<VerifiedFact> = Vec::with_capacity(n);
    let mut heads: Vec<Option<FactId>> = vec![None; KEYS];
    // Sequential: each put names the previous one, so signing is serial per key; sign a
    // round of KEYS puts on two threads at a time.
    for round in 0..n.div_ceil(KEYS) {
        let base = round * KEYS;
        let count = KEYS.min(n - base);
        let made = sign_all(&key, count, |k| {
            let i = base + k;
            let mut value = vec![0u8; VALUE_BYTES];
            value[..8].copy_from_slice(&(i as u64).to_be_bytes());
            UnsignedFact {
                namespace: ns,
                epoch: Epoch(1 + (i / per_epoch) as u64),
                payload: Payload::Data(DataOp::Put(Put {
                    collection: "bench".into(),
                    key: format!("key-{k:05}"),
                    value: Value::Inline(ByteBuf::from(value)),
                    supersedes: heads[k].into_iter().collect(),
                })),
            }
        });
        for (k, f) in made.iter().enumerate() {
            heads[k] = Some(f.id());
        }
        facts.extend(made);
    }
    eprintln!("signed {n} puts in {:.1?} (not a figure)", t.elapsed());
    let took = insert(d.store(), &facts);
    println!(
        "insert {n} puts over {KEYS} keys, batches of 10k: {:.2?} ({:.0} facts/s)",
        took,
        n as f64 / took.as_secs_f64()
    );
    let live_bytes: usize = facts[n.saturating_sub(KEYS)..]
        .iter()
        .map(|f| f.bytes().len())
        .sum();
    drop(facts);

    let (blob, item_bytes, built) = snapshot(&d, Epoch(EPOCHS + 1));
    println!(
        "snapshot blob over {n} items with {KEYS} live records: {:.2?} to build, {} bytes, and an item blob of {item_bytes} bytes",
        built,
        blob.len()
    );
    // The device settles (its prefix digest is the snapshot's) and says so; it is every
    // member of its authority, so GC drops the item blob.
    let settled = tend_node::reissue::reissue_uncovered(&d).expect("settle");
    assert!(settled.facts.is_empty() && settled.awaiting_items.is_none());
    let before = d.store().file_size().unwrap();
    let t = Instant::now();
    let gc = d.gc(false).expect("gc");
    println!(
        "gc: {:.2?}, pruned {} facts, kept {} live; store {} -> {} bytes; live data {} bytes: store/live = {:.2}",
        t.elapsed(),
        gc.facts_pruned,
        gc.live_kept,
        before,
        gc.store_bytes_after,
        live_bytes,
        gc.store_bytes_after as f64 / live_bytes as f64
    );

    println!(
        "  blobs dropped: {} (the item blob, every member having settled)",
        gc.blobs_pruned
    );
    // The snapshot blob is kept as references to the live facts GC kept, and still reads
    // byte for byte as built.
    assert!(
        gc.snapshot_blob_as_facts,
        "the snapshot blob is kept as facts"
    );
    let cid = tend_core::ContentId::of(tend_core::ids::CODEC_DAG_CBOR, &blob);
    assert!(d.store().get_blob(&cid).unwrap().unwrap() == blob);
    for u in d.store().table_usage().unwrap() {
        if u.stored_bytes > 0 {
            println!(
                "  table {}: {} entries, {} bytes stored, {} of metadata, {} fragmented",
                u.table, u.entries, u.stored_bytes, u.metadata_bytes, u.fragmented_bytes
            );
        }
    }
    // Reads on a freshly opened store: the first folds the state once.
    let home = d.home().to_owned();
    drop(d);
    let d = Device::open(&home).expect("open");
    let get = |k: usize| DataRequest::Get {
        collection: "bench".into(),
        key: format!("key-{k:05}"),
    };
    let t = Instant::now();
    run(&d, get(0)).expect("first get");
    println!(
        "first get after open (folds the state): {:.2?}",
        t.elapsed()
    );
    let mut lat = Vec::new();
    for i in 0..10_000usize {
        let t = Instant::now();
        let r = run(&d, get(i * 7919 % KEYS)).expect("get");
        lat.push(t.elapsed());
        assert!(matches!(r, DataResponse::Value(Some(_))));
    }
    println!("get: median {:.1?} over 10k random keys", median(lat));
    let t = Instant::now();
    let mut after = None;
    let mut rows = 0;
    loop {
        let r = run(
            &d,
            DataRequest::Scan {
                collection: "bench".into(),
                prefix: String::new(),
                after: after.clone(),
                limit: 1000,
            },
        )
        .expect("scan");
        let DataResponse::Scan(page) = r else {
            unreachable!()
        };
        if page.is_empty() {
            break;
        }
        rows += page.len();
        after = page.last().map(|v| v.key.clone());
    }
    let took = t.elapsed();
    println!(
        "scan: {rows} keys with values in pages of 1000: {:.2?} ({:.0} keys/s)",
        took,
        rows as f64 / took.as_secs_f64()
    );
}

/// Writes a home with `n` live log entries and a snapshot over them, and the files the
/// hydrating process reads: the blob and the maintenance facts (length-prefixed).
fn prepare_hydration(n: usize, dir: &std::path::Path) {
    let d = Device::init(&dir.join("a"), &mut rand::thread_rng()).expect("init");
    let ns = d.namespace();
    let key = d.key().signing_key().clone();
    let per_epoch = n.div_ceil(EPOCHS as usize);
    let facts = sign_all(&key, n, |i| UnsignedFact {
        namespace: ns,
        epoch: Epoch(1 + (i / per_epoch) as u64),
        payload: Payload::Application {
            kind: "events".into(),
            data: (i as u64).to_be_bytes().repeat(8),
        },
    });
    insert(d.store(), &facts);
    drop(facts);
    let (blob, _, _) = snapshot(&d, Epoch(EPOCHS + 1));
    std::fs::write(dir.join("blob"), &blob).expect("write blob");
    let mut maintenance = Vec::new();
    for f in d.store().scan_maintenance(ns).unwrap() {
        let f = f.unwrap();
        maintenance.extend_from_slice(&(f.bytes().len() as u32).to_be_bytes());
        maintenance.extend_from_slice(f.bytes());
    }
    std::fs::write(dir.join("maintenance"), maintenance).expect("write facts");
}

/// A fresh device of the authority hydrates, in a process of its own: the blob (fetched,
/// stored by CID), then its facts in batches, as a joining member's session admits them.
fn hydrate(n: usize, dir: &std::path::Path) {
    let raw = std::fs::read(dir.join("maintenance")).expect("facts");
    let mut maintenance = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let len = u32::from_be_bytes(raw[at..at + 4].try_into().unwrap()) as usize;
        maintenance.push(VerifiedFact::decode(&raw[at + 4..at + 4 + len]).expect("fact"));
        at += 4 + len;
    }
    let ns = maintenance[0].namespace();
    let completion = maintenance.iter().rev().find_map(|f| match f.payload() {
        Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) => {
            Some((c.clone(), f.author()))
        }
        _ => None,
    });
    let (completion, admin) = completion.expect("completion");
    // The one-device authority's group key is its device key.
    let certified = completion
        .certify(&ns, &tend_core::GroupKey(admin.0))
        .expect("verifies");
    let blob_cid = certified.cid();
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    // With a device's page cache (redb's default would keep up to 1 GiB of pages).
    let store = Store::create_with(dir.join("b.redb"), &tend_node::device::store_options())
        .expect("create");
    // Streamed from the file, as a fetched blob arrives, so the peak is hydration's own
    // (the store checks the bytes against the CID at commit).
    let mut file = std::fs::File::open(dir.join("blob")).expect("blob");
    let len = file.metadata().expect("blob length").len();
    let mut writer = store.blob_writer(&blob_cid, len).expect("writer");
    std::io::copy(&mut file, &mut writer).expect("blob");
    writer.commit().expect("blob matches its CID");
    let reader = store.blob_reader(&blob_cid).unwrap().expect("stored");
    // As the node admits a completion: the blob's facts stream into the store in batches.
    let mut live = 0;
    let trust = tend_snapshot::blob::BlobTrust::Certified(&certified);
    tend_snapshot::blob::stream_blob_facts(reader, trust, 10_000, |batch| {
        live += batch.len();
        store.insert_batch(&batch).expect("insert");
        Ok::<(), tend_snapshot::BlobError>(())
    })
    .expect("read blob");
    store.insert_batch(&maintenance).expect("completion");
    let took = t.elapsed();
    let st = store.maintenance_state(ns).unwrap();
    assert_eq!(st.snapshot_epoch(), Epoch(EPOCHS + 1));
    assert_eq!(store.app_state(ns).unwrap().log_len(), n);
    println!(
        "hydrate a snapshot carrying {live} live records: {:.2?} ({:.0} records/s), peak RSS {:.0} MiB (before: {:.0} MiB)",
        took,
        n as f64 / took.as_secs_f64(),
        peak_rss_mib(),
        rss_before
    );
}

/// Appends through the device's batch path (`DataRequest::Batch`): signing, admission and
/// one transaction per 10,000 writes, as a program embedding the device would write.
fn batch_appends(n: usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).expect("init");
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let ops = chunk
            .iter()
            .map(|i| DataRequest::LogAppend {
                log: "events".into(),
                data: tend_node::data::Bytes64((*i as u64).to_be_bytes().repeat(8)),
            })
            .collect();
        run(&d, DataRequest::Batch { ops }).expect("batch");
    }
    let took = t.elapsed();
    println!(
        "batch appends: {n} in batches of 10,000: {:.2?} ({:.0} facts/s, signing included)",
        took,
        n as f64 / took.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: keep
    // that run tiny so the suite stays fast.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n = if smoke { 20_000 } else { n_facts() };
    // Each phase in a process of its own, so the peak memory of one is not the other's.
    match std::env::var("TEND_BENCH_PHASE").as_deref() {
        Ok("puts") => puts_then_gc(n),
        Ok("batch") => batch_appends(n),
        Ok("hydrate") => hydrate(
            n,
            std::path::Path::new(&std::env::var("TEND_BENCH_DIR").expect("dir")),
        ),
        _ => {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
            let phase = |name: &str| {
                let status = std::process::Command::new(std::env::current_exe().expect("exe"))
                    .args(std::env::args().skip(1))
                    .env("TEND_BENCH_PHASE", name)
                    .env("TEND_BENCH_DIR", dir.path())
                    .status()
                    .expect("run a phase");
                assert!(status.success(), "phase {name} failed");
            };
            phase("batch");
            phase("puts");
            prepare_hydration(n, dir.path());
            phase("hydrate");
        }
    }
}
