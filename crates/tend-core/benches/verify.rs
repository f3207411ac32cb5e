//! What checking a received fact costs: one `VerifiedFact::decode` (canonical decoding and
//! an Ed25519 check) on one core, and `decode_batch` of 512 facts (a sync `Facts` batch) on
//! every core, for each fact format (formats 1 and 2: `verify_strict` per fact; format 3:
//! ZIP-215, one batch equation per thread). This is the ceiling of a catch-up without a
//! snapshot and of backup verification: every fact's signature is checked once.
//!
//! `cargo bench -p tend-core --bench verify`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use tend_core::{
    ContextId, Epoch, FactFormat, JournalNamespace, Payload, UnsignedFact, VerifiedFact,
};

/// 512 facts of about 200 bytes by three authors, as a sync batch carries them.
fn batch(format: impl Fn(u32) -> FactFormat) -> Vec<Vec<u8>> {
    let keys: Vec<SigningKey> = (1..=3u8)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect();
    (0..512u32)
        .map(|i| {
            let f = UnsignedFact {
                namespace: JournalNamespace::Context(ContextId([9; 32])),
                epoch: Epoch(7),
                payload: Payload::Application {
                    kind: "bench".into(),
                    data: vec![i as u8; 60],
                },
            };
            let key = &keys[i as usize % keys.len()];
            f.sign_with(key, format(i)).bytes().to_vec()
        })
        .collect()
}

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    let time_ms = |i: u32| 1_765_000_000_000 + u64::from(i);
    let formats: [(&str, &dyn Fn(u32) -> FactFormat); 3] = [
        ("untimed", &|_| FactFormat::Untimed),
        ("timed", &|i| FactFormat::Timed {
            time_ms: time_ms(i),
        }),
        ("zip215", &|i| FactFormat::TimedZip215 {
            time_ms: time_ms(i),
        }),
    ];
    for (name, format) in formats {
        let facts = batch(format);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("decode_one_{name}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % facts.len();
                VerifiedFact::decode(&facts[i]).expect("valid")
            })
        });
        g.throughput(Throughput::Elements(facts.len() as u64));
        g.bench_function(format!("decode_batch_512_{name}"), |b| {
            b.iter_batched(
                || facts.clone(),
                |facts| VerifiedFact::decode_batch(&facts),
                BatchSize::SmallInput,
            )
        });
    }
    // The signature check alone, over a message of a fact's size: what decoding adds.
    let key = SigningKey::from_bytes(&[1; 32]);
    let msg = [7u8; 180];
    let sig = ed25519_dalek::Signer::sign(&key, &msg);
    let public = key.verifying_key();
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_strict_only", |b| {
        b.iter(|| public.verify_strict(&msg, &sig).expect("valid"))
    });
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
