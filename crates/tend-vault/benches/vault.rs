//! tend-vault benchmarks: the proxy re-encrypting the capsules of 100k blobs, the reader's
//! cost per re-encrypted key, and blob encryption/decryption throughput against a plain copy.
//!
//! `cargo bench -p tend-vault --bench vault`; `TEND_BENCH_CAPSULES=1000` scales the 100k run
//! down for a smoke test.

use std::hint::black_box;
use std::io::{self, Read};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tend_vault::{
    decrypt_stream, encrypt_stream, generate_kfrags, reencrypt, Capsule, ContentKey,
    EpochSecretKey, SealedContentKey, DEFAULT_CHUNK_BYTES,
};

const BLOB_BYTES: usize = 16 << 20;

fn capsule_count() -> usize {
    std::env::var("TEND_BENCH_CAPSULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn reencryption(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(18);
    let old = EpochSecretKey::generate(&mut rng);
    let new = EpochSecretKey::generate(&mut rng);
    let (old_pk, new_pk) = (old.public_key(), new.public_key());
    // One proxy's fragment of a 2-of-3 set: what each proxy holds after an advance.
    let kfrags = generate_kfrags(&mut rng, &old, &new_pk, 2, 3).unwrap();
    let n = capsule_count();
    let setup = Instant::now();
    // The proxy's stored sealed keys, as bytes (what it reads from disk).
    let stored: Vec<[u8; tend_vault::envelope::SEALED_KEY_BYTES]> = (0..n)
        .map(|i| {
            let key = ContentKey::generate(&mut rng);
            SealedContentKey::seal(&mut rng, &key, i as u64 % 7, &old_pk).to_bytes()
        })
        .collect();
    eprintln!("sealed {n} content keys in {:?} (setup)", setup.elapsed());

    let mut group = c.benchmark_group("reencrypt");
    group.bench_function("one_capsule_decode_reencrypt_encode", |b| {
        b.iter(|| {
            let sealed = SealedContentKey::from_bytes(&stored[0]).unwrap();
            black_box(reencrypt(&mut rng, &kfrags[0], sealed.capsule()).to_bytes())
        })
    });
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(format!("{n}_capsules_one_proxy"), |b| {
        b.iter(|| {
            for bytes in &stored {
                let sealed = SealedContentKey::from_bytes(bytes).unwrap();
                black_box(reencrypt(&mut rng, &kfrags[0], sealed.capsule()).to_bytes());
            }
        })
    });
    group.finish();

    // The reader's side, per blob: verify two capsule fragments, combine, unwrap the key.
    let sealed = SealedContentKey::from_bytes(&stored[0]).unwrap();
    let cfrags: Vec<_> = kfrags[..2]
        .iter()
        .map(|k| reencrypt(&mut rng, k, sealed.capsule()))
        .collect();
    let mut group = c.benchmark_group("reader");
    group.bench_function("verify_2_cfrags_and_open", |b| {
        b.iter(|| {
            let verified: Vec<_> = cfrags
                .iter()
                .map(|c| c.verify(sealed.capsule(), &old_pk, &new_pk).unwrap())
                .collect();
            black_box(sealed.open_reencrypted(&new, &old_pk, &verified).unwrap())
        })
    });
    group.bench_function("open_directly", |b| {
        b.iter(|| black_box(sealed.open(&old).unwrap()))
    });
    group.bench_function("seal_content_key", |b| {
        let key = ContentKey::generate(&mut rng);
        b.iter(|| black_box(SealedContentKey::seal(&mut rng, &key, 0, &old_pk)))
    });
    group.bench_function("capsule_check_on_decode", |b| {
        let bytes = sealed.capsule().to_bytes();
        b.iter(|| black_box(Capsule::from_bytes(&bytes).unwrap()))
    });
    group.finish();
}

fn throughput(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(5);
    let plain: Vec<u8> = (0..BLOB_BYTES).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut encrypted = Vec::with_capacity(BLOB_BYTES + BLOB_BYTES / 1000);
    let (_, key) = encrypt_stream(
        &mut rng,
        plain.as_slice(),
        &mut encrypted,
        DEFAULT_CHUNK_BYTES,
    )
    .unwrap();

    let mut group = c.benchmark_group("blob_16mib");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(BLOB_BYTES as u64));
    group.bench_function("plain_copy", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(BLOB_BYTES),
            |out: &mut Vec<u8>| io::copy(&mut plain.as_slice().take(u64::MAX), out).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("encrypt_stream_64k_chunks", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(BLOB_BYTES + BLOB_BYTES / 1000),
            |out: &mut Vec<u8>| {
                encrypt_stream(&mut rng, plain.as_slice(), out, DEFAULT_CHUNK_BYTES).unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("decrypt_stream_64k_chunks", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(BLOB_BYTES),
            |out: &mut Vec<u8>| decrypt_stream(encrypted.as_slice(), out, &key).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("blake3_cid_only", |b| {
        b.iter(|| black_box(blake3::hash(&encrypted)))
    });
    group.finish();
}

criterion_group!(benches, reencryption, throughput);
criterion_main!(benches);
