//! The durable journal and blob store of tend, on redb.
//!
//! One file holds the journals of any number of namespaces, content-addressed blobs (in chunks),
//! local settings and a `meta` table with the store's magic marker and format version.
//!
//! - Facts are indexed by `(namespace, epoch, id)` (compact keys and values, see the `codec` module),
//!   so a namespace's facts, or its `(epoch, id)` items alone, come out of one ordered range
//!   scan: that is what snapshot digests ([`Store::prefix_digest`]) and reconciliation
//!   ([`Store::items`]) are built on. There is no index by fact id alone.
//! - [`Store::insert_batch`] admits verified facts in one transaction, idempotently, checking
//!   each new fact against the reduced maintenance state (DESIGN rules 2 and 5).
//! - Maintenance and authority facts are also kept in a table of their own that pruning never
//!   touches, so [`Store::maintenance_state`] reduces only them and is the same before and
//!   after [`Store::prune`] (DESIGN rule 4).
//! - [`Store::app_state`] is the application state (`tend_core::app`) of the stored facts,
//!   cached and kept current by every insert; [`Store::live_below`] is what a snapshot
//!   carries and GC keeps.
//! - [`Store::changes_since`] is the changes feed: every admitted fact in admission order
//!   under a sequence number that survives restarts (see the `changes` module).
//! - [`Store::open`] never modifies a file that is not a healthy tend store of a format it
//!   reads (see the `store` module).

pub mod app;
pub mod blob_refs;
pub mod blobs;
pub mod changes;
mod codec;
mod digests;
pub mod error;
pub mod facts;
pub mod gc;
mod overlay;
pub mod settings;
pub mod state;
pub mod store;

pub use blob_refs::FactBlob;
pub use blobs::{BlobReader, BlobWriter, BLOB_CHUNK_BYTES};
pub use changes::Change;
pub use error::StoreError;
pub use facts::{
    FactIter, FactLookup, InsertReport, ItemIter, NamespaceStats, Rejected, StoredFact,
};
pub use gc::{CompactReport, PruneReport};
pub use store::{Store, StoreOptions, TableUsage, STORE_FORMAT_VERSION, STORE_MAGIC};
