//! Blob encryption: a fresh content key per blob, ChaCha20-Poly1305 in the STREAM
//! construction over fixed-size chunks, with a canonical byte form whose CID names the
//! ciphertext.
//!
//! STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", CRYPTO 2015) as `aead::stream::StreamBE32` provides it:
//! chunk `i` is sealed under the nonce `prefix(7) || i as u32 BE || last flag`, so dropping
//! the tail, reordering chunks, or splicing in a chunk of another blob fails authentication.
//! Every chunk also authenticates the header bytes as associated data, so changing the
//! chunk size or nonce prefix in the header is refused as well.
//!
//! Canonical bytes of an encrypted blob: the [`BlobHeader`] (47 bytes), then the chunks,
//! each `chunk_bytes + 16` long except the last, which holds 0..=`chunk_bytes` plaintext
//! bytes plus its 16-byte tag. The last chunk is empty only when the whole blob is (so each
//! plaintext has exactly one chunking). The blob's CID is [`ContentId::of_raw`] of these
//! bytes: the CID names the ciphertext (see the crate docs for why).

use std::io::{Read, Write};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use rand_core::{CryptoRng, RngCore};
use tend_core::ContentId;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{malformed, VaultError};

/// Plaintext bytes per chunk by default: 64 KiB, so a reader or writer holds one small chunk
/// and four of them fit in one of the store's 256 KiB blob chunks' worth of memory.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// The smallest chunk size a header may carry (tests use small chunks to get many of them).
pub const MIN_CHUNK_BYTES: u32 = 64;
/// The largest chunk size a header may carry: a reader allocates one chunk of this size.
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;
/// The Poly1305 tag at the end of every chunk.
pub const TAG_BYTES: usize = 16;
/// Length of the encoded [`BlobHeader`].
pub const HEADER_BYTES: usize = 4 + 4 + NONCE_PREFIX_BYTES + 32;

const MAGIC: [u8; 4] = *b"TVB1";
/// StreamBE32 takes the 12-byte ChaCha20-Poly1305 nonce less 4 counter bytes and 1 flag byte.
const NONCE_PREFIX_BYTES: usize = 7;
const STREAM_KEY_CONTEXT: &str = "tend-vault v1 2026-12 blob STREAM key";
const COMMITMENT_CONTEXT: &str = "tend-vault v1 2026-12 blob key commitment";

/// The symmetric key of one blob: 32 random bytes, made fresh for every blob and never
/// reused. Zeroed on drop; its `Debug` does not print it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    /// A fresh random key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self(key)
    }

    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The ChaCha20-Poly1305 key of the STREAM, derived so the content key itself is used
    /// with one primitive only (the commitment below is the other derivation).
    fn stream_cipher(&self) -> ChaCha20Poly1305 {
        let mut stream_key = blake3::derive_key(STREAM_KEY_CONTEXT, &self.0);
        let cipher = ChaCha20Poly1305::new(&stream_key.into());
        stream_key.zeroize();
        cipher
    }

    /// A commitment to the key, stored in the header: ChaCha20-Poly1305 is not key-committing,
    /// so without it one ciphertext could be made to open under two keys; with it, a wrong
    /// key is also refused before any chunk is tried.
    fn commitment(&self) -> [u8; 32] {
        blake3::derive_key(COMMITMENT_CONTEXT, &self.0)
    }
}

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

/// The header of an encrypted blob: its chunk size, STREAM nonce prefix and key commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    chunk_bytes: u32,
    nonce_prefix: [u8; NONCE_PREFIX_BYTES],
    key_commitment: [u8; 32],
}

impl BlobHeader {
    /// Plaintext bytes per chunk (the last chunk may hold fewer).
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Ciphertext bytes of every chunk but the last.
    pub fn sealed_chunk_bytes(&self) -> usize {
        self.chunk_bytes as usize + TAG_BYTES
    }

    /// The canonical encoding: `"TVB1" || chunk_bytes u32 BE || nonce prefix || commitment`.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.chunk_bytes.to_be_bytes());
        out[8..8 + NONCE_PREFIX_BYTES].copy_from_slice(&self.nonce_prefix);
        out[8 + NONCE_PREFIX_BYTES..].copy_from_slice(&self.key_commitment);
        out
    }

    /// Strict decoding of exactly [`HEADER_BYTES`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        let bytes: &[u8; HEADER_BYTES] = bytes
            .try_into()
            .map_err(|_| malformed("blob header", "wrong length"))?;
        if bytes[..4] != MAGIC {
            return Err(malformed("blob header", "bad magic or version"));
        }
        let chunk_bytes = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
        check_chunk_bytes(chunk_bytes)?;
        Ok(Self {
            chunk_bytes,
            nonce_prefix: bytes[8..8 + NONCE_PREFIX_BYTES]
                .try_into()
                .expect("7 bytes"),
            key_commitment: bytes[8 + NONCE_PREFIX_BYTES..]
                .try_into()
                .expect("32 bytes"),
        })
    }
}

fn check_chunk_bytes(chunk_bytes: u32) -> Result<(), VaultError> {
    if (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes) {
        Ok(())
    } else {
        Err(VaultError::ChunkSize(chunk_bytes))
    }
}

/// Seals one blob chunk by chunk; the sans-IO core of [`encrypt_blob`] and
/// [`encrypt_stream`]. Call [`Self::seal_chunk`] for every full chunk and
/// [`Self::seal_last`] exactly once for the final (possibly short or empty) one.
pub struct BlobEncryptor {
    header: BlobHeader,
    header_bytes: [u8; HEADER_BYTES],
    stream: EncryptorBE32<ChaCha20Poly1305>,
}

impl BlobEncryptor {
    /// A new blob under a fresh content key, returned beside the encryptor.
    pub fn new(
        rng: &mut (impl RngCore + CryptoRng),
        chunk_bytes: u32,
    ) -> Result<(Self, ContentKey), VaultError> {
        check_chunk_bytes(chunk_bytes)?;
        let key = ContentKey::generate(rng);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
        rng.fill_bytes(&mut nonce_prefix);
        let header = BlobHeader {
            chunk_bytes,
            nonce_prefix,
            key_commitment: key.commitment(),
        };
        let stream = EncryptorBE32::from_aead(key.stream_cipher(), (&nonce_prefix).into());
        let encryptor = Self {
            header,
            header_bytes: header.to_bytes(),
            stream,
        };
        Ok((encryptor, key))
    }

    /// The header to write before the chunks.
    pub fn header(&self) -> &BlobHeader {
        &self.header
    }

    /// Seals a full, non-final chunk (exactly `chunk_bytes` long).
    pub fn seal_chunk(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        if plaintext.len() != self.header.chunk_bytes as usize {
            return Err(malformed(
                "plaintext chunk",
                "a non-final chunk must be full",
            ));
        }
        self.stream
            .encrypt_next(Payload {
                msg: plaintext,
                aad: &self.header_bytes,
            })
            .map_err(|_| VaultError::TooLarge)
    }

    /// Seals the final chunk (0..=`chunk_bytes` long) and ends the blob.
    pub fn seal_last(self, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        if plaintext.len() > self.header.chunk_bytes as usize {
            return Err(malformed("plaintext chunk", "longer than the chunk size"));
        }
        self.stream
            .encrypt_last(Payload {
                msg: plaintext,
                aad: &self.header_bytes,
            })
            .map_err(|_| VaultError::TooLarge)
    }
}

/// Opens one blob chunk by chunk; the sans-IO core of [`decrypt_blob`] and
/// [`decrypt_stream`].
pub struct BlobDecryptor {
    header: BlobHeader,
    header_bytes: [u8; HEADER_BYTES],
    stream: DecryptorBE32<ChaCha20Poly1305>,
    position: u64,
}

impl BlobDecryptor {
    /// Refuses a key whose commitment differs from the header's before any chunk is read.
    pub fn new(header: &BlobHeader, key: &ContentKey) -> Result<Self, VaultError> {
        // Not secret-dependent timing worth hiding: the commitment is public, and a match
        // only says the caller already holds the key.
        if key.commitment() != header.key_commitment {
            return Err(VaultError::WrongContentKey);
        }
        Ok(Self {
            header: *header,
            header_bytes: header.to_bytes(),
            stream: DecryptorBE32::from_aead(key.stream_cipher(), (&header.nonce_prefix).into()),
            position: 0,
        })
    }

    /// Opens a non-final chunk (`chunk_bytes + 16` bytes).
    pub fn open_chunk(&mut self, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() != self.header.sealed_chunk_bytes() {
            return Err(VaultError::Truncated);
        }
        let position = self.position;
        self.position += 1;
        self.stream
            .decrypt_next(Payload {
                msg: sealed,
                aad: &self.header_bytes,
            })
            .map_err(|_| VaultError::ChunkRejected(position))
    }

    /// Opens the final chunk and ends the blob.
    pub fn open_last(self, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < TAG_BYTES {
            return Err(VaultError::Truncated);
        }
        if sealed.len() > self.header.sealed_chunk_bytes() {
            return Err(malformed(
                "encrypted blob",
                "final chunk longer than a chunk",
            ));
        }
        // An empty final chunk after full ones is a second encoding of the same plaintext:
        // only the empty blob may end with one.
        if sealed.len() == TAG_BYTES && self.position > 0 {
            return Err(malformed("encrypted blob", "empty final chunk after data"));
        }
        let position = self.position;
        self.stream
            .decrypt_last(Payload {
                msg: sealed,
                aad: &self.header_bytes,
            })
            .map_err(|_| VaultError::ChunkRejected(position))
    }
}

/// An encrypted blob held in memory: its header and sealed chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedBlob {
    header: BlobHeader,
    chunks: Vec<Vec<u8>>,
}

impl EncryptedBlob {
    /// The header.
    pub fn header(&self) -> &BlobHeader {
        &self.header
    }

    /// The sealed chunks in order; the last one is the final chunk.
    pub fn chunks(&self) -> &[Vec<u8>] {
        &self.chunks
    }

    /// Length of the canonical encoding.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.chunks.iter().map(Vec::len).sum::<usize>()
    }

    /// The canonical encoding: header, then chunks.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.header.to_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(chunk);
        }
        out
    }

    /// The CID of the canonical encoding (raw codec, BLAKE3), computed without building it.
    /// A storage peer checks a blob it receives against this, without any key.
    pub fn cid(&self) -> ContentId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.header.to_bytes());
        for chunk in &self.chunks {
            hasher.update(chunk);
        }
        ContentId::from_blake3(tend_core::ids::CODEC_RAW, &hasher.finalize().into())
    }

    /// Splits a canonical encoding into header and chunks. Only lengths are checked here;
    /// authenticity is checked on decryption.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        if bytes.len() < HEADER_BYTES {
            return Err(VaultError::Truncated);
        }
        let header = BlobHeader::from_bytes(&bytes[..HEADER_BYTES])?;
        let body = &bytes[HEADER_BYTES..];
        if body.len() < TAG_BYTES {
            return Err(VaultError::Truncated);
        }
        let sealed = header.sealed_chunk_bytes();
        // The final chunk holds the last 1..=sealed bytes: the remainder, or a whole chunk
        // when the body divides evenly (a full final chunk).
        let full = (body.len() - 1) / sealed;
        let mut chunks: Vec<Vec<u8>> = body[..full * sealed]
            .chunks(sealed)
            .map(<[u8]>::to_vec)
            .collect();
        chunks.push(body[full * sealed..].to_vec());
        Ok(Self { header, chunks })
    }
}

/// Encrypts `plaintext` in [`DEFAULT_CHUNK_BYTES`] chunks under a fresh content key.
pub fn encrypt_blob(
    rng: &mut (impl RngCore + CryptoRng),
    plaintext: &[u8],
) -> (EncryptedBlob, ContentKey) {
    encrypt_blob_chunked(rng, plaintext, DEFAULT_CHUNK_BYTES)
        .expect("the default chunk size is in range and a slice has fewer than 2^32 chunks")
}

/// Encrypts `plaintext` in chunks of `chunk_bytes` under a fresh content key.
pub fn encrypt_blob_chunked(
    rng: &mut (impl RngCore + CryptoRng),
    plaintext: &[u8],
    chunk_bytes: u32,
) -> Result<(EncryptedBlob, ContentKey), VaultError> {
    let (mut encryptor, key) = BlobEncryptor::new(rng, chunk_bytes)?;
    let header = *encryptor.header();
    let size = chunk_bytes as usize;
    // The final chunk holds the last 1..=size bytes (or nothing for an empty blob).
    let full = plaintext.len().saturating_sub(1) / size;
    let mut chunks = Vec::with_capacity(full + 1);
    for piece in plaintext[..full * size].chunks(size) {
        chunks.push(encryptor.seal_chunk(piece)?);
    }
    chunks.push(encryptor.seal_last(&plaintext[full * size..])?);
    Ok((EncryptedBlob { header, chunks }, key))
}

/// Decrypts a whole in-memory blob, refusing a wrong key, a tampered, reordered or
/// swapped chunk, and a missing final chunk.
pub fn decrypt_blob(blob: &EncryptedBlob, key: &ContentKey) -> Result<Vec<u8>, VaultError> {
    let mut decryptor = BlobDecryptor::new(&blob.header, key)?;
    let (last, rest) = blob.chunks.split_last().ok_or(VaultError::Truncated)?;
    let mut out = Vec::with_capacity(rest.len() * blob.header.chunk_bytes as usize + last.len());
    for chunk in rest {
        out.extend_from_slice(&decryptor.open_chunk(chunk)?);
    }
    out.extend_from_slice(&decryptor.open_last(last)?);
    Ok(out)
}

/// What [`encrypt_stream`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedSummary {
    /// The header written first.
    pub header: BlobHeader,
    /// The CID of everything written (header and chunks).
    pub cid: ContentId,
    /// Bytes written.
    pub encrypted_len: u64,
    /// Plaintext bytes read.
    pub plaintext_len: u64,
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads one chunk of `buf.len()` bytes after the carried look-ahead byte, and one more
/// byte to learn whether this chunk is the last. Returns (bytes in `buf`, the look-ahead
/// byte if the input goes on).
fn read_chunk(
    input: &mut impl Read,
    carry: Option<u8>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<u8>)> {
    let mut filled = 0;
    if let Some(byte) = carry {
        buf[0] = byte;
        filled = 1;
    }
    filled += read_full(input, &mut buf[filled..])?;
    if filled < buf.len() {
        return Ok((filled, None));
    }
    let mut next = [0u8; 1];
    let more = read_full(input, &mut next)? == 1;
    Ok((filled, more.then_some(next[0])))
}

/// Encrypts everything `plaintext` yields into `out` (header, then chunks), holding one
/// chunk in memory, under a fresh content key.
pub fn encrypt_stream(
    rng: &mut (impl RngCore + CryptoRng),
    mut plaintext: impl Read,
    mut out: impl Write,
    chunk_bytes: u32,
) -> Result<(EncryptedSummary, ContentKey), VaultError> {
    let (mut encryptor, key) = BlobEncryptor::new(rng, chunk_bytes)?;
    let header = *encryptor.header();
    let mut hasher = blake3::Hasher::new();
    let mut emit = |bytes: &[u8], out: &mut dyn Write| -> std::io::Result<()> {
        hasher.update(bytes);
        out.write_all(bytes)
    };
    emit(&header.to_bytes(), &mut out)?;
    let mut encrypted_len = HEADER_BYTES as u64;
    let mut plaintext_len = 0u64;
    let mut buf = vec![0u8; chunk_bytes as usize];
    let mut carry = None;
    loop {
        let (n, next) = read_chunk(&mut plaintext, carry, &mut buf)?;
        plaintext_len += n as u64;
        if next.is_none() {
            let sealed = encryptor.seal_last(&buf[..n])?;
            emit(&sealed, &mut out)?;
            encrypted_len += sealed.len() as u64;
            break;
        }
        let sealed = encryptor.seal_chunk(&buf[..n])?;
        emit(&sealed, &mut out)?;
        encrypted_len += sealed.len() as u64;
        carry = next;
    }
    buf.zeroize();
    out.flush()?;
    let summary = EncryptedSummary {
        header,
        cid: ContentId::from_blake3(tend_core::ids::CODEC_RAW, &hasher.finalize().into()),
        encrypted_len,
        plaintext_len,
    };
    Ok((summary, key))
}

/// Decrypts an encrypted blob read from `encrypted` into `out`, one chunk at a time.
/// Returns the plaintext length. Plaintext of chunks that authenticate is written before a
/// later chunk is checked, as with any streaming AEAD: a caller that must not act on a
/// partial blob writes to a temporary place and keeps it only on `Ok`.
pub fn decrypt_stream(
    mut encrypted: impl Read,
    mut out: impl Write,
    key: &ContentKey,
) -> Result<u64, VaultError> {
    let mut header_bytes = [0u8; HEADER_BYTES];
    if read_full(&mut encrypted, &mut header_bytes)? < HEADER_BYTES {
        return Err(VaultError::Truncated);
    }
    let header = BlobHeader::from_bytes(&header_bytes)?;
    let mut decryptor = BlobDecryptor::new(&header, key)?;
    let mut buf = vec![0u8; header.sealed_chunk_bytes()];
    let mut carry = None;
    let mut written = 0u64;
    loop {
        let (n, next) = read_chunk(&mut encrypted, carry, &mut buf)?;
        if next.is_none() {
            let plain = decryptor.open_last(&buf[..n])?;
            out.write_all(&plain)?;
            written += plain.len() as u64;
            break;
        }
        let plain = decryptor.open_chunk(&buf[..n])?;
        out.write_all(&plain)?;
        written += plain.len() as u64;
        carry = next;
    }
    out.flush()?;
    Ok(written)
}
