//! Snapshot benchmarks: a 3-of-5 ceremony in process (real DKG keys, real FROST), and
//! snapshot-blob creation over one million synthetic `(epoch, id)` items.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tend_core::{AuthorityId, Epoch, FactId, JournalNamespace};
use tend_snapshot::{InProcessAuthority, SnapshotBlob};

fn ceremony(c: &mut Criterion) {
    let mut seed = 0u64;
    let mut g = c.benchmark_group("ceremony");
    g.sample_size(20);
    g.bench_function("3_of_5_in_process", |b| {
        b.iter_batched(
            // A fresh authority (DKG, genesis, 100 facts) per ceremony, outside the timing:
            // a reused one would pile up completed snapshots, whose signatures every
            // reduction re-verifies, and measure that history instead of the ceremony.
            || {
                seed += 1;
                let mut rng = StdRng::seed_from_u64(seed);
                let mut auth = InProcessAuthority::create(5, 3, &mut rng).expect("authority");
                for i in 0..5 {
                    auth.append_application_facts(i, 20, true).expect("facts");
                }
                let e = auth.state(0).current_epoch().next();
                (auth, e)
            },
            |(mut auth, e)| auth.run_snapshot(e).expect("snapshot completes"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn blob_1m(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let mut rng = StdRng::seed_from_u64(2);
    // Unsigned synthetic items: signing a million facts would dominate the setup and does
    // not change what the blob holds (ids and epochs).
    let mut items: Vec<(Epoch, FactId)> = (0..N)
        .map(|i| {
            let mut id = [0u8; 32];
            rng.fill_bytes(&mut id);
            (Epoch((i / 1000) as u64), FactId(id))
        })
        .collect();
    items.sort();
    let ns = JournalNamespace::Authority(AuthorityId([1; 32]));
    let e = Epoch(1_000);
    let mut g = c.benchmark_group("snapshot_blob");
    g.sample_size(10);
    g.bench_function("create_1m_items", |b| {
        b.iter_batched(
            || items.clone(),
            |items| {
                let blob = SnapshotBlob::from_parts(ns, e, items, Vec::new());
                let bytes = blob.encode();
                (SnapshotBlob::cid_of(&bytes), blob.prefix_digest())
            },
            BatchSize::LargeInput,
        )
    });
    let bytes = SnapshotBlob::from_parts(ns, e, items.clone(), Vec::new()).encode();
    g.bench_function("decode_1m_items", |b| {
        b.iter(|| SnapshotBlob::decode(&bytes).expect("valid blob"))
    });
    g.finish();
}

criterion_group!(benches, ceremony, blob_1m);
criterion_main!(benches);
