//! A tend device: its home directory (key, store, settings) and the operations the CLI and
//! the control socket run against it.

pub mod admin;
pub mod allocator;
pub mod api;
pub mod blobs;
pub mod cache;
pub mod ceremony;
pub mod control;
pub mod data;
pub mod data_request;
pub mod device;
pub mod discovery;
pub mod dkg;
pub mod endpoint;
pub mod error;
pub mod fleet;
pub mod maint;
pub mod metrics;
pub mod node;
pub mod peer_table;
pub mod reissue;
pub mod replica;
mod signal;
pub mod snapshot_blob;
pub mod status;
pub mod upgrade;
pub mod vault_peer;
mod votes;
pub mod write;

pub use device::{
    AuthorityStatus, Device, DeviceError, FactSummary, GcPolicy, GcReport, JournalStatus,
    NamespaceStatus, SnapshotStatus,
};
pub use discovery::PeerAddr;
pub use node::{Node, NodeConfig, NodeError, NodeStatus, PeerInfo, PeerOutcome, RoundReport};
