//! The threshold snapshot ceremony of tend (sans-IO), the snapshot blob format, hydration
//! of a fresh device from a snapshot, and an in-process driver for tests and `devnet`.
//!
//! Nothing here does I/O or reads a clock: time (milliseconds of a monotonic clock) and
//! randomness come in as arguments, messages and facts go out as values.

pub mod blob;
pub mod ceremony;
pub mod hydrate;
pub mod inprocess;

pub use blob::{BlobError, ItemBlob, ItemRef, SnapshotBlob, SNAPSHOT_BLOB_VERSION};
pub use ceremony::{
    AbortReason, BuiltBlob, CeremonyAction, CeremonyEvent, CeremonyInput, CeremonyMessage,
    JournalView, LocalJournal, MessageBody, Recipient, Refusal, SignerKey, SnapshotEngine,
};
pub use hydrate::{hydrate, Coverage, HydrateError, Hydrated};
pub use inprocess::{DriverError, InProcessAuthority};
