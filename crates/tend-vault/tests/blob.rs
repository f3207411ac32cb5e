//! Blob encryption: round trips at the chunk boundaries, streaming, and every refusal
//! (wrong key, tampered, reordered, truncated, extended, non-canonical).

use std::io::Read;

use proptest::prelude::*;
use rand::rngs::{OsRng, StdRng};
use rand::SeedableRng;
use tend_core::ContentId;
use tend_vault::blob::{BlobHeader, HEADER_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, TAG_BYTES};
use tend_vault::{
    decrypt_blob, decrypt_stream, encrypt_blob, encrypt_blob_chunked, encrypt_stream,
    BlobDecryptor, BlobEncryptor, EncryptedBlob, VaultError, DEFAULT_CHUNK_BYTES,
};

const SMALL: u32 = 64;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A reader that hands out at most `step` bytes per call, to exercise partial reads.
struct Trickle<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

#[test]
fn round_trip_at_chunk_boundaries_default_chunk_size() {
    let chunk = DEFAULT_CHUNK_BYTES as usize;
    for len in [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 7] {
        let plain = data(len, 3);
        let (blob, key) = encrypt_blob(&mut OsRng, &plain);
        let expected_chunks = if len == 0 { 1 } else { len.div_ceil(chunk) };
        assert_eq!(blob.chunks().len(), expected_chunks, "len {len}");
        assert_eq!(
            blob.encoded_len(),
            HEADER_BYTES + len + TAG_BYTES * expected_chunks
        );
        assert_eq!(decrypt_blob(&blob, &key).unwrap(), plain, "len {len}");
        let reparsed = EncryptedBlob::from_bytes(&blob.to_bytes()).unwrap();
        assert_eq!(reparsed, blob);
    }
}

#[test]
fn cid_names_the_ciphertext_and_differs_per_write() {
    let plain = b"yes".to_vec();
    let (a, _) = encrypt_blob(&mut OsRng, &plain);
    let (b, _) = encrypt_blob(&mut OsRng, &plain);
    assert_eq!(a.cid(), ContentId::of_raw(&a.to_bytes()));
    assert!(a.cid().matches(&a.to_bytes()));
    assert_ne!(
        a.cid(),
        ContentId::of_raw(&plain),
        "a CID of the plaintext leaks it"
    );
    assert_ne!(a.cid(), b.cid(), "a fresh key per write");
}

#[test]
fn streaming_matches_in_memory_and_reads_in_small_pieces() {
    for len in [0usize, 1, 63, 64, 65, 640, 1000] {
        let plain = data(len, 9);
        let mut encrypted = Vec::new();
        let (summary, key) = encrypt_stream(
            &mut OsRng,
            Trickle {
                bytes: &plain,
                step: 7,
            },
            &mut encrypted,
            SMALL,
        )
        .unwrap();
        assert_eq!(summary.plaintext_len, len as u64);
        assert_eq!(summary.encrypted_len, encrypted.len() as u64);
        assert_eq!(summary.cid, ContentId::of_raw(&encrypted));
        let blob = EncryptedBlob::from_bytes(&encrypted).unwrap();
        assert_eq!(blob.cid(), summary.cid);
        assert_eq!(decrypt_blob(&blob, &key).unwrap(), plain, "len {len}");
        let mut out = Vec::new();
        let n = decrypt_stream(
            Trickle {
                bytes: &encrypted,
                step: 5,
            },
            &mut out,
            &key,
        )
        .unwrap();
        assert_eq!(n, len as u64);
        assert_eq!(out, plain, "len {len}");
    }
}

#[test]
fn wrong_content_key_is_refused_before_any_chunk() {
    let (blob, _) = encrypt_blob(&mut OsRng, b"secret");
    let (_, other_key) = encrypt_blob(&mut OsRng, b"secret");
    assert!(matches!(
        decrypt_blob(&blob, &other_key),
        Err(VaultError::WrongContentKey)
    ));
    let mut out = Vec::new();
    assert!(matches!(
        decrypt_stream(blob.to_bytes().as_slice(), &mut out, &other_key),
        Err(VaultError::WrongContentKey)
    ));
    assert!(out.is_empty());
}

#[test]
fn every_flipped_ciphertext_bit_is_refused() {
    let plain = data(3 * SMALL as usize + 5, 1);
    let (blob, key) = encrypt_blob_chunked(&mut OsRng, &plain, SMALL).unwrap();
    let bytes = blob.to_bytes();
    // Every byte of the body, and a few bits of each byte of the header.
    for at in 0..bytes.len() {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x10;
        let result = EncryptedBlob::from_bytes(&tampered).and_then(|b| decrypt_blob(&b, &key));
        assert!(result.is_err(), "flipping byte {at} went unnoticed");
        let mut out = Vec::new();
        assert!(decrypt_stream(tampered.as_slice(), &mut out, &key).is_err());
    }
}

#[test]
fn tampered_chunk_names_its_position() {
    let plain = data(3 * SMALL as usize, 2);
    let (blob, key) = encrypt_blob_chunked(&mut OsRng, &plain, SMALL).unwrap();
    let mut bytes = blob.to_bytes();
    let second_chunk = HEADER_BYTES + SMALL as usize + TAG_BYTES + 3;
    bytes[second_chunk] ^= 1;
    let blob = EncryptedBlob::from_bytes(&bytes).unwrap();
    assert!(matches!(
        decrypt_blob(&blob, &key),
        Err(VaultError::ChunkRejected(1))
    ));
}

#[test]
fn reordered_chunks_are_refused() {
    let plain = data(3 * SMALL as usize + 1, 4);
    let (blob, key) = encrypt_blob_chunked(&mut OsRng, &plain, SMALL).unwrap();
    let sealed = SMALL as usize + TAG_BYTES;
    let bytes = blob.to_bytes();
    let mut swapped = bytes.clone();
    let (first, second) = (HEADER_BYTES, HEADER_BYTES + sealed);
    swapped[first..first + sealed].copy_from_slice(&bytes[second..second + sealed]);
    swapped[second..second + sealed].copy_from_slice(&bytes[first..first + sealed]);
    let blob = EncryptedBlob::from_bytes(&swapped).unwrap();
    assert!(matches!(
        decrypt_blob(&blob, &key),
        Err(VaultError::ChunkRejected(0))
    ));
}

#[test]
fn truncated_blob_is_refused() {
    let plain = data(3 * SMALL as usize, 5);
    let (blob, key) = encrypt_blob_chunked(&mut OsRng, &plain, SMALL).unwrap();
    let bytes = blob.to_bytes();
    let sealed = SMALL as usize + TAG_BYTES;
    // Dropping whole final chunks: the previous chunk was sealed as non-final.
    for keep_chunks in [1, 2] {
        let cut = &bytes[..HEADER_BYTES + keep_chunks * sealed];
        let blob = EncryptedBlob::from_bytes(cut).unwrap();
        assert!(matches!(
            decrypt_blob(&blob, &key),
            Err(VaultError::ChunkRejected(_))
        ));
        let mut out = Vec::new();
        assert!(matches!(
            decrypt_stream(cut, &mut out, &key),
            Err(VaultError::ChunkRejected(_))
        ));
    }
    // Cut inside a chunk, after the header, inside the header.
    for cut_at in [
        bytes.len() - 1,
        HEADER_BYTES + sealed + 10,
        HEADER_BYTES + 3,
    ] {
        let cut = &bytes[..cut_at];
        assert!(EncryptedBlob::from_bytes(cut)
            .and_then(|b| decrypt_blob(&b, &key))
            .is_err());
        let mut out = Vec::new();
        assert!(decrypt_stream(cut, &mut out, &key).is_err());
    }
    for cut_at in [HEADER_BYTES, HEADER_BYTES - 1, 0] {
        assert!(matches!(
            EncryptedBlob::from_bytes(&bytes[..cut_at]),
            Err(VaultError::Truncated) | Err(VaultError::Malformed { .. })
        ));
        assert!(matches!(
            decrypt_stream(&bytes[..cut_at], &mut Vec::new(), &key),
            Err(VaultError::Truncated)
        ));
    }
}

#[test]
fn appended_chunk_is_refused() {
    let plain = data(2 * SMALL as usize, 6);
    let (blob, key) = encrypt_blob_chunked(&mut OsRng, &plain, SMALL).unwrap();
    let mut bytes = blob.to_bytes();
    let last = blob.chunks().last().unwrap().clone();
    bytes.extend_from_slice(&last);
    let blob = EncryptedBlob::from_bytes(&bytes).unwrap();
    assert!(decrypt_blob(&blob, &key).is_err());
    assert!(decrypt_stream(bytes.as_slice(), &mut Vec::new(), &key).is_err());
}

#[test]
fn empty_final_chunk_after_data_is_not_canonical() {
    let (mut encryptor, key) = BlobEncryptor::new(&mut OsRng, SMALL).unwrap();
    let header = *encryptor.header();
    let full = encryptor.seal_chunk(&data(SMALL as usize, 7)).unwrap();
    let empty_last = encryptor.seal_last(&[]).unwrap();
    let mut decryptor = BlobDecryptor::new(&header, &key).unwrap();
    decryptor.open_chunk(&full).unwrap();
    assert!(matches!(
        decryptor.open_last(&empty_last),
        Err(VaultError::Malformed { .. })
    ));
}

#[test]
fn encryptor_refuses_short_middle_chunk_and_bad_chunk_sizes() {
    let (mut encryptor, _) = BlobEncryptor::new(&mut OsRng, SMALL).unwrap();
    assert!(encryptor.seal_chunk(&[1, 2, 3]).is_err());
    for bad in [0, MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1] {
        assert!(matches!(
            BlobEncryptor::new(&mut OsRng, bad),
            Err(VaultError::ChunkSize(b)) if b == bad
        ));
    }
}

#[test]
fn header_decoding_is_strict() {
    let (blob, _) = encrypt_blob(&mut OsRng, b"x");
    let good = blob.header().to_bytes();
    assert_eq!(BlobHeader::from_bytes(&good).unwrap(), *blob.header());
    assert!(BlobHeader::from_bytes(&good[..HEADER_BYTES - 1]).is_err());
    let mut long = good.to_vec();
    long.push(0);
    assert!(BlobHeader::from_bytes(&long).is_err());
    let mut magic = good;
    magic[3] = b'2';
    assert!(BlobHeader::from_bytes(&magic).is_err());
    let mut size = good;
    size[4..8].copy_from_slice(&(MAX_CHUNK_BYTES * 2).to_be_bytes());
    assert!(matches!(
        BlobHeader::from_bytes(&size),
        Err(VaultError::ChunkSize(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_blobs_round_trip(
        seed in any::<u64>(),
        chunk in prop::sample::select(vec![64u32, 100, 4096]),
        extra in 0usize..3,
        shape in prop::sample::select(vec![0usize, 1, 2, 3]),
    ) {
        // Sizes around the boundaries: 0, one chunk, chunk + 1, and a few chunks plus extra.
        let c = chunk as usize;
        let len = match shape { 0 => extra, 1 => c, 2 => c + 1, _ => 3 * c + extra };
        let mut rng = StdRng::seed_from_u64(seed);
        let plain: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
        let (blob, key) = encrypt_blob_chunked(&mut rng, &plain, chunk).unwrap();
        prop_assert_eq!(decrypt_blob(&blob, &key).unwrap(), plain.clone());
        let bytes = blob.to_bytes();
        let mut out = Vec::new();
        decrypt_stream(bytes.as_slice(), &mut out, &key).unwrap();
        prop_assert_eq!(out, plain);
        // Losing the last byte is always noticed.
        let cut = &bytes[..bytes.len() - 1];
        prop_assert!(decrypt_stream(cut, &mut Vec::new(), &key).is_err());
    }
}
