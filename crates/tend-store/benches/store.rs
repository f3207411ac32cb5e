//! Store benchmarks: batched insert of 1M application facts, a full ordered scan, the digest
//! of a 1M-fact prefix, and a verified open of the 1M-fact store. Run with
//! `cargo bench -p tend-store`. The facts are signed once per process (a fixed key, two
//! threads) and kept in memory; signing is not part of any figure.

use std::hint::black_box;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use tend_core::{
    AuthorityFact, AuthorityGenesis, DeviceId, Epoch, GroupKey, JournalNamespace, Payload,
    UnsignedFact, VerifiedFact,
};
use tend_store::Store;

/// The number of facts; `TEND_BENCH_FACTS` overrides it for quick smoke runs.
fn n_facts() -> usize {
    std::env::var("TEND_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}
const BATCH: usize = 10_000;
const PER_EPOCH: usize = 1_000;

struct Fixture {
    ns: JournalNamespace,
    genesis: VerifiedFact,
    facts: Vec<VerifiedFact>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let t = Instant::now();
        let key = SigningKey::from_bytes(&[7; 32]);
        let me = DeviceId(key.verifying_key().to_bytes());
        let g = AuthorityGenesis {
            nonce: [1; 32],
            members: vec![me],
            threshold: 1,
            group_key: GroupKey(me.0),
            admin: me,
        };
        let ns = JournalNamespace::Authority(g.authority_id());
        let genesis = UnsignedFact {
            namespace: ns,
            epoch: Epoch(0),
            payload: Payload::Authority(AuthorityFact::Genesis(g)),
        }
        .sign(&key);
        let make = |i: usize| {
            let mut data = vec![0u8; 64];
            data[..8].copy_from_slice(&(i as u64).to_be_bytes());
            UnsignedFact {
                namespace: ns,
                epoch: Epoch(1 + (i / PER_EPOCH) as u64),
                payload: Payload::Application {
                    kind: "note".into(),
                    data,
                },
            }
            .sign(&key)
        };
        let n = n_facts();
        let half = n / 2;
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| (0..half).map(make).collect::<Vec<_>>());
            let b = s.spawn(|| (half..n).map(make).collect::<Vec<_>>());
            (a.join().unwrap(), b.join().unwrap())
        });
        let mut facts = a;
        facts.extend(b);
        eprintln!(
            "signed {n} facts in {:.1} s (not part of any figure)",
            t.elapsed().as_secs_f64()
        );
        Fixture { ns, genesis, facts }
    })
}

fn fill(path: &Path) -> Store {
    let f = fixture();
    let store = Store::create(path).unwrap();
    store
        .insert_batch(std::slice::from_ref(&f.genesis))
        .unwrap();
    for chunk in f.facts.chunks(BATCH) {
        let r = store.insert_batch(chunk).unwrap();
        assert_eq!(r.inserted as usize, chunk.len());
    }
    store
}

fn bench_dir() -> tempfile::TempDir {
    // On the target's file system (a real disk here), not a tmpfs.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn blocks_on_disk(path: &Path) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).unwrap().len()
    }
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let n_total = f.facts.len();
    let mut g = c.benchmark_group("store");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30));

    g.throughput(Throughput::Elements(n_total as u64));
    g.bench_function("insert_1m_facts_batches_of_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = bench_dir();
                let t = Instant::now();
                let s = fill(&dir.path().join("s.redb"));
                total += t.elapsed();
                drop(s);
            }
            total
        })
    });

    // One filled store for the read benchmarks and the size figures.
    let dir = bench_dir();
    let path = dir.path().join("s.redb");
    let store = fill(&path);
    let len = store.file_size().unwrap();
    let blocks = blocks_on_disk(&path);
    let n = (n_total + 1) as f64;
    eprintln!(
        "size after 1M facts: file {len} B ({:.1} B/fact), allocated blocks {blocks} B ({:.1} B/fact)",
        len as f64 / n,
        blocks as f64 / n
    );
    for u in store.table_usage().unwrap() {
        if u.entries > 0 {
            eprintln!(
                "  table {}: {} entries, stored {:.1} B/entry, metadata {:.1}, fragmented {:.1}, {} leaf + {} branch pages",
                u.table,
                u.entries,
                u.stored_bytes as f64 / u.entries as f64,
                u.metadata_bytes as f64 / u.entries as f64,
                u.fragmented_bytes as f64 / u.entries as f64,
                u.leaf_pages,
                u.branch_pages
            );
        }
    }
    let c = store.compact().unwrap();
    eprintln!(
        "after compact: file {} B ({:.1} B/fact), allocated blocks {} B",
        c.bytes_after,
        c.bytes_after as f64 / n,
        blocks_on_disk(&path)
    );

    g.bench_function("scan_1m_facts", |b| {
        b.iter(|| {
            let mut bytes = 0usize;
            for fact in store.scan(f.ns, ..).unwrap() {
                bytes += fact.unwrap().bytes().len();
            }
            black_box(bytes)
        })
    });
    g.bench_function("scan_1m_items", |b| {
        b.iter(|| black_box(store.items(f.ns, ..).unwrap().count()))
    });
    let upto = Epoch(1 + (n_total / PER_EPOCH) as u64);
    g.bench_function("prefix_digest_1m_facts", |b| {
        b.iter(|| black_box(store.prefix_digest(f.ns, upto).unwrap()))
    });
    g.throughput(Throughput::Elements(1));
    drop(store);
    g.bench_function("open_verified_1m_store", |b| {
        b.iter(|| black_box(Store::open(&path).unwrap()))
    });
    g.finish();
}

criterion_group!(store_benches, benches);
criterion_main!(store_benches);
