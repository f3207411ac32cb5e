//! The one error type of tend-storage: every refusal is a typed variant.

use tend_core::{ContentId, DeviceId};

/// Why the storage peer (or a member talking to it) refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The peer is not a member of the authority's current identity epoch (as far as the
    /// storage peer's pushed facts tell).
    #[error("device {0} is not a member of the current identity epoch")]
    NotAMember(DeviceId),
    /// No standing admin-signed grant admits this storage peer.
    #[error("this storage peer holds no grant of the authority")]
    NotGranted,
    /// A pushed fact that does not decode or verify, of another namespace, of a kind the
    /// storage peer does not take, or by an author who was no member at its epoch.
    #[error("fact refused: {0}")]
    BadFact(String),
    /// An encrypted blob or sealed key that does not decode, or is sealed to an epoch
    /// without a published key.
    #[error("blob refused: {0}")]
    BadBlob(String),
    /// The bytes received do not hash to the CID they were fetched as.
    #[error("the blob does not match its CID {0}")]
    CidMismatch(ContentId),
    #[error("blob {0} is not stored here")]
    Missing(ContentId),
    /// Re-encryption material (epoch key, key fragments) that does not verify.
    #[error("re-encryption refused: {0}")]
    BadRekey(String),
    /// This device cannot read: no ring sealed to it, or no secret or fragments for the
    /// blob's epoch.
    #[error("cannot open: {0}")]
    CannotOpen(String),
    #[error(transparent)]
    Vault(#[from] tend_vault::VaultError),
    #[error("the vault store: {0}")]
    Store(String),
    /// A protocol message that does not decode, or an answer of the wrong kind.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The storage peer answered with a refusal.
    #[error("the storage peer refused: {0}")]
    Refused(String),
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
