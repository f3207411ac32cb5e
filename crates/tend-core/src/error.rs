//! Typed errors of the core: decoding and journal admission.

use crate::ids::{Epoch, FactId, JournalNamespace};

/// Why bytes are not a valid fact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("fact is {len} bytes, larger than the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("fact format version {0} is not supported (this release reads versions 1 and 2)")]
    UnsupportedVersion(u64),
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("encoding is not canonical DAG-CBOR")]
    NonCanonical,
    #[error("author key is not a valid Ed25519 public key")]
    BadAuthorKey,
    #[error("signature does not verify")]
    BadSignature,
}

/// Why a verified fact is not admitted into a journal (DESIGN rule 2 and 5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("cannot merge journal {theirs} into journal {ours}")]
    NamespaceMismatch {
        ours: JournalNamespace,
        theirs: JournalNamespace,
    },
    #[error("author of fact {fact} is not a member at epoch {epoch}")]
    NotAMember { fact: FactId, epoch: Epoch },
    #[error("fact {fact} at epoch {epoch} is below the completed snapshot at epoch {snapshot} and not covered by it")]
    Late {
        fact: FactId,
        epoch: Epoch,
        snapshot: Epoch,
    },
}

impl JournalError {
    /// A short stable label, used for metrics and `--json` output.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NamespaceMismatch { .. } => "namespace",
            Self::NotAMember { .. } => "not_member",
            Self::Late { .. } => "late",
        }
    }
}

impl DecodeError {
    /// A short stable label, used for metrics and `--json` output.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::UnsupportedVersion(_) => "version",
            Self::Malformed(_) => "malformed",
            Self::NonCanonical => "non_canonical",
            Self::BadAuthorKey | Self::BadSignature => "signature",
        }
    }
}
