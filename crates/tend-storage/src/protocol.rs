//! The `tend/vault/1` messages between a member and a storage peer: one request and one
//! answer per bi-stream, each the canonical DAG-CBOR encoding of the enum in one frame.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::ContentId;

use crate::error::StorageError;

/// ALPN of the storage peer's protocol, version 1.
pub const VAULT_ALPN: &[u8] = b"tend/vault/1";

/// The largest encrypted blob one request carries (the whole blob travels in one frame).
pub const MAX_VAULT_BLOB_BYTES: usize = 64 * 1024 * 1024;
/// The largest frame either side reads: a blob plus its sealed key and fragments.
pub const MAX_FRAME_BYTES: usize = MAX_VAULT_BLOB_BYTES + 64 * 1024;

/// What a member asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Signed journal facts of the kinds the storage peer takes
    /// ([`crate::rules::is_for_storage_peer`]), in their wire encoding.
    PushFacts { facts: Vec<ByteBuf> },
    /// Store an encrypted blob (its canonical `EncryptedBlob` bytes) with its sealed key.
    Put { sealed_key: ByteBuf, blob: ByteBuf },
    /// Fetch an encrypted blob by the CID of its ciphertext.
    Get { cid: ContentId },
}

/// What the storage peer answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// How many of the pushed facts were new.
    FactsAdmitted {
        new: u64,
    },
    Stored {
        cid: ContentId,
    },
    /// The blob, its sealed key, and, if it was sealed to an older epoch than `to_epoch`
    /// (the current one), the capsule fragments re-encrypting it to `to_epoch`.
    Blob {
        blob: ByteBuf,
        sealed_key: ByteBuf,
        to_epoch: u64,
        cfrags: Vec<ByteBuf>,
    },
    Missing {
        cid: ContentId,
    },
    Refused {
        reason: String,
    },
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        to_canonical(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        from_canonical(bytes).map_err(|e| StorageError::Protocol(e.to_string()))
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        to_canonical(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        from_canonical(bytes).map_err(|e| StorageError::Protocol(e.to_string()))
    }
}
