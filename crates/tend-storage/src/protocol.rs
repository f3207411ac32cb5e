//! The `tend/vault/1` messages between a member and a storage peer: one request and one
//! answer per bi-stream, each the canonical DAG-CBOR encoding of the enum in one frame. A
//! `Put` request and a `Blob` answer are followed by a second frame holding the encrypted
//! blob's bytes raw, so a large blob is neither CBOR-encoded nor decoded.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::ContentId;

use crate::error::StorageError;

/// ALPN of the storage peer's protocol, version 1.
pub const VAULT_ALPN: &[u8] = b"tend/vault/1";

/// The largest encrypted blob one request carries (the whole blob travels in one frame).
pub const MAX_VAULT_BLOB_BYTES: usize = 64 * 1024 * 1024;
/// The largest message frame either side reads (a push of facts is the largest).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// What a member asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Signed journal facts of the kinds the storage peer takes
    /// ([`crate::rules::is_for_storage_peer`]), in their wire encoding.
    PushFacts { facts: Vec<ByteBuf> },
    /// Store an encrypted blob (its canonical `EncryptedBlob` bytes) with its sealed key.
    Put {
        sealed_key: ByteBuf,
        /// Travels in the frame after the message ([`Request::body`]).
        #[serde(skip)]
        blob: ByteBuf,
    },
    /// Fetch an encrypted blob by the CID of its ciphertext.
    Get { cid: ContentId },
    /// Delete these encrypted blobs (by ciphertext CID), their sealed keys and fragments:
    /// a member asks once GC reclaimed their plaintext, so the peer's storage stays bounded.
    Drop { cids: Vec<ContentId> },
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
        /// Travels in the frame after the message ([`Response::body`]).
        #[serde(skip)]
        blob: ByteBuf,
        sealed_key: ByteBuf,
        to_epoch: u64,
        cfrags: Vec<ByteBuf>,
    },
    Missing {
        cid: ContentId,
    },
    /// How many of the blobs a `Drop` named were stored (and are now gone).
    Dropped {
        removed: u64,
    },
    Refused {
        reason: String,
    },
}

impl Request {
    /// The message frame (without the blob of a `Put`).
    pub fn encode(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// The blob a `Put` sends in the next frame.
    pub fn body(&self) -> Option<&[u8]> {
        match self {
            Request::Put { blob, .. } => Some(blob),
            _ => None,
        }
    }

    /// Whether a body frame follows this message.
    pub fn expects_body(&self) -> bool {
        matches!(self, Request::Put { .. })
    }

    /// Puts the body frame's bytes in their place.
    pub fn set_body(&mut self, body: Vec<u8>) {
        if let Request::Put { blob, .. } = self {
            *blob = ByteBuf::from(body);
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        from_canonical(bytes).map_err(|e| StorageError::Protocol(e.to_string()))
    }
}

impl Response {
    /// The message frame (without the blob of a `Blob`).
    pub fn encode(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// The blob a `Blob` answer sends in the next frame.
    pub fn body(&self) -> Option<&[u8]> {
        match self {
            Response::Blob { blob, .. } => Some(blob),
            _ => None,
        }
    }

    /// Whether a body frame follows this message.
    pub fn expects_body(&self) -> bool {
        matches!(self, Response::Blob { .. })
    }

    /// Puts the body frame's bytes in their place.
    pub fn set_body(&mut self, body: Vec<u8>) {
        if let Response::Blob { blob, .. } = self {
            *blob = ByteBuf::from(body);
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        from_canonical(bytes).map_err(|e| StorageError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_travels_as_a_small_message_and_a_raw_body() {
        let request = Request::Put {
            sealed_key: ByteBuf::from(vec![1; 152]),
            blob: ByteBuf::from(vec![2; 100_000]),
        };
        let frame = request.encode();
        assert!(frame.len() < 200, "the blob is not in the message frame");
        let mut back = Request::decode(&frame).unwrap();
        assert!(back.expects_body());
        back.set_body(request.body().unwrap().to_vec());
        assert_eq!(back, request);
        assert!(Request::decode(&[0xff, 0x00, 0x13]).is_err());
        assert!(Response::decode(b"").is_err());
    }
}
