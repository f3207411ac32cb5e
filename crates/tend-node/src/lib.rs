//! A tend device: its home directory (key, store, settings) and the operations the CLI and
//! the control socket run against it.

pub mod device;

pub use device::{Device, DeviceError, FactSummary, JournalStatus, NamespaceStatus};
