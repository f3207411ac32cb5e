//! Encrypted backup and restore of a tend journal, and automated snapshot triggers.
//!
//! A backup is the latest completed snapshot (its completion fact and blob) plus the
//! journal tail at and above its epoch, in a tar archive compressed with zstd and
//! encrypted with age (standard format: the `age` and `tar` commands open it). Export
//! streams the tail in bounded chunks; verify and restore check everything as it streams
//! by (see [`restore`] for the order) and restore writes into a temporary directory that
//! becomes the new home only at the end. The layout is described in [`format`].
//!
//! [`triggers`] decides when a device proposes a snapshot by itself.

pub mod error;
pub mod export;
pub mod format;
pub mod keys;
pub mod restore;
pub mod triggers;

pub use error::BackupError;
pub use export::{
    bytes_written_towards, export, export_file, ExportOptions, ExportReport, Progress,
};
pub use format::{Header, Manifest, ARCHIVE_FORMAT_VERSION, TAIL_CHUNK_BYTES};
pub use keys::{Decryption, Encryption};
pub use restore::{
    remove_stale_restores, restore, restore_home, verify, verify_file, verify_plain, RestoreReport,
    RestoreTarget,
};
pub use triggers::{
    decide, evaluate, JournalStats, SnapshotTriggers, TriggerDecision, TriggerReason,
};

/// The age crate, re-exported so callers build keys with the same version.
pub use age;

/// The redb page cache for a store that export scans or restore writes. Both touch every
/// page of the journal once; with redb's default cache (1 GiB) each page read or written
/// would stay in memory, so memory would grow with the store. Callers open the source and
/// the restore target with [`bounded_store_options`].
pub const STORE_CACHE_BYTES: usize = 16 << 20;

/// Store options with a [`STORE_CACHE_BYTES`] page cache. The integrity check is left to
/// the caller (a device opened normally first has run it).
pub fn bounded_store_options() -> tend_store::StoreOptions {
    tend_store::StoreOptions {
        verify_integrity: false,
        cache_size: Some(STORE_CACHE_BYTES),
    }
}
