//! The one error type of tend-vault: every refusal is a typed variant, never a panic.

/// Why a blob, a key, a capsule or a fragment was refused.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Reading the plaintext or ciphertext, or writing the output, failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that do not decode to the named structure (wrong length, bad magic, a point or
    /// scalar that is not canonical, the identity point where a real point is needed).
    #[error("malformed {what}: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    /// A chunk size outside [`crate::blob::MIN_CHUNK_BYTES`]..=[`crate::blob::MAX_CHUNK_BYTES`].
    #[error("chunk size {0} is out of range")]
    ChunkSize(u32),
    /// The content key is not the one this blob was encrypted under (its key commitment
    /// differs), so no chunk is even tried.
    #[error("the content key does not belong to this blob")]
    WrongContentKey,
    /// A ciphertext chunk failed authentication: tampered, reordered, swapped with another
    /// blob's chunk, or a non-final chunk presented as the final one.
    #[error("ciphertext chunk {0} failed authentication")]
    ChunkRejected(u64),
    /// The blob ends before its final chunk (or a chunk is shorter than its tag).
    #[error("the encrypted blob is truncated")]
    Truncated,
    /// More than 2^32 - 1 chunks: the STREAM counter would wrap.
    #[error("the blob is too large for one STREAM")]
    TooLarge,
    /// A capsule whose validity check (`g^s = V * E^H(E, V)`) fails.
    #[error("the capsule is not valid (tampered or forged)")]
    InvalidCapsule,
    /// A key fragment whose commitment or delegator's signature does not verify against the
    /// given delegating and receiving epoch keys.
    #[error("the key fragment does not verify for these epoch keys")]
    InvalidKeyFrag,
    /// A capsule fragment whose correctness proof or key-fragment signature does not verify
    /// for this capsule and these epoch keys.
    #[error("the capsule fragment does not verify for this capsule and these epoch keys")]
    InvalidCapsuleFrag,
    /// Capsule fragments that cannot be combined: none, from different key-fragment sets,
    /// twice the same fragment, or verified against another capsule.
    #[error("capsule fragments cannot be combined: {0}")]
    CapsuleFragsMismatch(&'static str),
    /// A threshold that is 0, larger than the number of shares, or too many shares.
    #[error("threshold {threshold} of {shares} is not allowed")]
    BadThreshold { threshold: usize, shares: usize },
    /// The sealed content key did not open: a wrong or stale epoch key, too few or wrong
    /// capsule fragments, or a tampered envelope. Deliberately one variant: which of these
    /// it was is not observable from the AEAD tag.
    #[error("the sealed content key does not open with this key material")]
    OpenFailed,
    /// The key ring holds no secret for this identity epoch.
    #[error("the key ring holds no secret for identity epoch {0}")]
    MissingEpoch(u64),
    /// age failed to seal or open an epoch key ring (e.g. this device is not a recipient).
    #[error("age: {0}")]
    Age(String),
}

pub(crate) fn malformed(what: &'static str, reason: &'static str) -> VaultError {
    VaultError::Malformed { what, reason }
}
