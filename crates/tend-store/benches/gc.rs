//! GC benchmark: prune and compact a store of N application facts (default 1M) below a
//! verified snapshot that covers 90% of them; prints time and store sizes. One run, not
//! criterion: each sample needs a fresh 1M-fact store. Run with
//! `cargo bench -p tend-store --bench gc` (`TEND_BENCH_FACTS=100000` for a smoke run).

use std::time::Instant;

use ed25519_dalek::{Signer, SigningKey};
use tend_core::maintenance::{SnapshotCompleted, SnapshotV1};
use tend_core::{
    AuthorityFact, AuthorityGenesis, ContentId, DeviceId, Epoch, GroupKey, Hash32,
    JournalNamespace, MaintenanceFact, Payload, UnsignedFact,
};
use tend_store::Store;

const PER_EPOCH: usize = 1_000;

fn main() {
    let n: usize = std::env::var("TEND_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let key = SigningKey::from_bytes(&[9; 32]);
    let me = DeviceId(key.verifying_key().to_bytes());
    let genesis = AuthorityGenesis {
        nonce: [2; 32],
        members: vec![me],
        threshold: 1,
        group_key: GroupKey(me.0),
        admin: me,
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let sign = |epoch: u64, payload: Payload| {
        UnsignedFact {
            namespace: ns,
            epoch: Epoch(epoch),
            payload,
        }
        .sign(&key)
    };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("gc.redb");
    let store = Store::create(&path).expect("store");
    store
        .insert_batch(&[sign(0, Payload::Authority(AuthorityFact::Genesis(genesis)))])
        .expect("genesis");
    let t = Instant::now();
    let make = |i: usize| {
        let mut data = vec![0u8; 64];
        data[..8].copy_from_slice(&(i as u64).to_be_bytes());
        sign(
            1 + (i / PER_EPOCH) as u64,
            Payload::Application {
                kind: "note".into(),
                data,
            },
        )
    };
    for start in (0..n).step_by(10_000) {
        let batch: Vec<_> = (start..(start + 10_000).min(n)).map(make).collect();
        store.insert_batch(&batch).expect("insert");
    }
    eprintln!(
        "signed and stored {n} facts in {:.1} s (setup)",
        t.elapsed().as_secs_f64()
    );

    // A verified snapshot covering the first 90% of epochs.
    let target = 1 + (n * 9 / 10 / PER_EPOCH) as u64;
    let digest = store.prefix_digest(ns, Epoch(target)).expect("digest");
    let proposal_id = Hash32::of(b"gc bench");
    let snapshot = SnapshotV1 {
        epoch: Epoch(target),
        digest,
        blob_cid: ContentId::of_raw(b"blob"),
    };
    let threshold_signature = key
        .sign(&snapshot.signing_message(&ns, &proposal_id))
        .to_bytes();
    let completed = sign(
        target,
        Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
            proposal_id,
            snapshot,
            threshold_signature,
        })),
    );
    store.insert_batch(&[completed]).expect("snapshot");
    let state_before = store.maintenance_state(ns).expect("state").state_digest();
    let size_before = store.file_size().expect("size");

    let t = Instant::now();
    let pruned = store.prune(ns).expect("prune");
    let prune_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let compacted = store.compact().expect("compact");
    let compact_s = t.elapsed().as_secs_f64();
    assert_eq!(
        store.maintenance_state(ns).expect("state").state_digest(),
        state_before
    );

    println!("| facts | pruned | prune | compact | store before | store after | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {n} | {} | {prune_s:.2} s | {compact_s:.2} s | {:.1} MB | {:.1} MB | {:.1}% smaller |",
        pruned.facts,
        size_before as f64 / 1e6,
        compacted.bytes_after as f64 / 1e6,
        100.0 * (1.0 - compacted.bytes_after as f64 / size_before as f64)
    );
}
