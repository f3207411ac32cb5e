//! Encrypted blobs for an untrusted storage peer, and Umbral proxy re-encryption of their
//! content keys when the identity epoch advances (sans-IO).
//!
//! - [`blob`]: each blob under a fresh [`ContentKey`], ChaCha20-Poly1305 in the STREAM
//!   construction over 64 KiB chunks; in memory ([`encrypt_blob`], [`decrypt_blob`]), chunk by
//!   chunk ([`BlobEncryptor`], [`BlobDecryptor`]) or over `io::Read`/`io::Write`
//!   ([`encrypt_stream`], [`decrypt_stream`]).
//! - [`keys`]: an identity epoch's Ristretto key pair ([`EpochSecretKey`], [`EpochPublicKey`]),
//!   the [`EpochKeyRing`] a member device holds, and its delivery sealed with age X25519 to
//!   each member device ([`seal_key_ring`], [`open_key_ring`]).
//! - [`umbral`]: Umbral's threshold proxy re-encryption KEM (Nuñez, "Umbral: A Threshold
//!   Proxy Re-Encryption Scheme", 2018) on Ristretto: capsules, key fragments, capsule
//!   fragments and their checks.
//! - [`envelope`]: a content key sealed to an epoch ([`SealedContentKey`]), and
//!   [`issue_advance_kfrags`], the key fragments an epoch advance hands to the proxy.
//!
//! **What a CID names.** A blob's CID names its *ciphertext* (the canonical encoding of
//! [`EncryptedBlob`]), never the plaintext: maintenance facts (GC, tombstones) name blobs by
//! CID and are read by the storage peer, which must check what it stores and serves without
//! a key; and the CID of a low-entropy plaintext would reveal it to anyone who guesses and
//! hashes candidates. The cost: the same plaintext written twice is two blobs (each write
//! draws a fresh key), so dedup happens only for identical ciphertext.
//!
//! **Threat model.** The storage peer (the proxy) holds encrypted blobs, sealed content
//! keys and key fragments. It can check CIDs and capsules, and re-encrypt capsules, but
//! every function that yields a content key takes an [`EpochSecretKey`], which it never
//! holds; with fewer than `threshold` fragments of a set it holds nothing but random shares.
//! It learns sizes (to the chunk), write times and which blobs are read. An outsider learns
//! no more than the proxy. A device removed at an advance keeps what it had (old plaintext,
//! the ring up to its last epoch: every blob sealed before its removal) and never receives
//! the new epoch's secret, so blobs sealed after its removal stay closed to it. Authorship
//! of a blob is not this crate's concern: anyone may seal to a public epoch key, so a blob
//! is trusted because a signed journal fact names its CID and sealed key.
//!
//! The proxy's material does not type-check as a key (this example must not compile):
//!
//! ```compile_fail
//! fn proxy(kfrag: &tend_vault::VerifiedKeyFrag, sealed: &tend_vault::SealedContentKey) {
//!     let _ = sealed.open(kfrag);
//! }
//! ```
//!
//! while the holder of an epoch secret opens what was sealed to it:
//!
//! ```
//! use rand::rngs::OsRng;
//! use tend_vault::{decrypt_blob, encrypt_blob, EpochSecretKey, SealedContentKey};
//!
//! let epoch = EpochSecretKey::generate(&mut OsRng);
//! let (blob, key) = encrypt_blob(&mut OsRng, b"hello");
//! let sealed = SealedContentKey::seal(&mut OsRng, &key, 1, &epoch.public_key());
//! let opened = sealed.open(&epoch).unwrap();
//! assert_eq!(decrypt_blob(&blob, &opened).unwrap(), b"hello");
//! ```
//!
//! Randomness always comes in as an argument (`&mut impl RngCore + CryptoRng`).

pub mod blob;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod umbral;

pub use blob::{
    decrypt_blob, decrypt_stream, encrypt_blob, encrypt_blob_chunked, encrypt_stream,
    BlobDecryptor, BlobEncryptor, BlobHeader, ContentKey, EncryptedBlob, EncryptedSummary,
    DEFAULT_CHUNK_BYTES,
};
pub use envelope::{issue_advance_kfrags, SealedContentKey};
pub use error::VaultError;
pub use keys::{
    device_age_identity, device_age_recipient, open_key_ring, seal_key_ring, EpochKeyRing,
    EpochPublicKey, EpochSecretKey,
};
pub use umbral::{
    generate_kfrags, reencrypt, Capsule, CapsuleFrag, KeyFrag, VerifiedCapsuleFrag, VerifiedKeyFrag,
};
