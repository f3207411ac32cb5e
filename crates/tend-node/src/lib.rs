//! A tend device: its home directory (key, store, settings) and the operations the CLI and
//! the control socket run against it.

pub mod device;
pub mod fleet;

pub use device::{
    AuthorityStatus, Device, DeviceError, FactSummary, GcPolicy, GcReport, JournalStatus,
    NamespaceStatus, SnapshotStatus,
};
