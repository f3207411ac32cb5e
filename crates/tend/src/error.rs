//! The one error type of the library: what went wrong, in terms an application can act on.
//! The underlying layers' errors are boxed, so a `Result` stays small.

use std::path::PathBuf;

use tend_node::dkg::DkgNetError;
use tend_node::{DeviceError, NodeError};
use tend_store::StoreError;

/// Why an operation of the library failed.
///
/// The first variants are the ones an application usually handles (bad input, an absent
/// key, a device that is not running); the last ones carry the underlying layer's error
/// for the rest (storage, key files, the network).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The directory already holds a device ([`crate::Device::create`]).
    #[error("{0} already holds a tend device")]
    AlreadyExists(PathBuf),
    /// The directory holds no device ([`crate::Device::open`]).
    #[error("{0} holds no tend device (no store.redb)")]
    NotADevice(PathBuf),
    /// The request was refused before anything was written: a bad name, key, limit or
    /// value, or a write the journal does not accept.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// What the request names does not exist (a key to delete that is absent).
    #[error("not found: {0}")]
    NotFound(String),
    /// What the request names exists, but its bytes are not on this device yet (a large
    /// value whose blob sync has not fetched).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The operation needs the running node ([`crate::Device::start`]).
    #[error("the device is not running: call Device::start first")]
    NotRunning,
    /// [`crate::Device::start`] on a device that already runs.
    #[error("the device is already running")]
    AlreadyRunning,
    /// Creating or joining an authority failed (shape, membership, timeout).
    #[error("authority: {0}")]
    Authority(String),
    /// The device's store (redb), read or written.
    #[error(transparent)]
    Store(Box<StoreError>),
    /// Any other failure of the device's home (key file, journal).
    #[error(transparent)]
    Device(Box<DeviceError>),
    /// The running node (endpoint, sync).
    #[error(transparent)]
    Node(Box<NodeError>),
    /// Key generation over the network.
    #[error(transparent)]
    KeyGeneration(Box<DkgNetError>),
    /// Something the device stored does not read back as it should.
    #[error("the device's data is corrupt: {0}")]
    Corrupt(String),
    /// A background task of the library stopped unexpectedly.
    #[error("a background task failed: {0}")]
    Task(String),
}

impl From<DeviceError> for Error {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::AlreadyInitialised(p) => Error::AlreadyExists(p),
            DeviceError::NotInitialised(p) => Error::NotADevice(p),
            DeviceError::InvalidInput(m) | DeviceError::Rejected(m) => Error::InvalidInput(m),
            DeviceError::NotFound(m) => Error::NotFound(m),
            DeviceError::Unavailable(m) => Error::Unavailable(m),
            DeviceError::Store(s) => s.into(),
            other => Error::Device(Box::new(other)),
        }
    }
}

impl From<NodeError> for Error {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Device(d) => d.into(),
            NodeError::Store(s) => s.into(),
            other => Error::Node(Box::new(other)),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(Box::new(e))
    }
}

impl From<DkgNetError> for Error {
    fn from(e: DkgNetError) -> Self {
        match e {
            DkgNetError::Device(d) => d.into(),
            DkgNetError::Store(s) => s.into(),
            other => Error::KeyGeneration(Box::new(other)),
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

/// What the library's operations return.
pub type Result<T, E = Error> = std::result::Result<T, E>;
