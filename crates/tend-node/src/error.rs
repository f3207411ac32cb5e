//! The error of a device operation, and how any error is shown as one line.

use std::path::PathBuf;

use tend_crypto::secret_file::KeyFileError;
use tend_store::StoreError;

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0} already holds a tend device; choose another --home")]
    AlreadyInitialised(PathBuf),
    #[error("{0} is not a tend home (no store.redb); run `tend init --home {0}` first")]
    NotInitialised(PathBuf),
    #[error("cannot create home directory {path}: {source}")]
    CreateHome {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store has no current journal; it was not made by `tend init`")]
    NoCurrentJournal,
    #[error("fact rejected: {0}")]
    Rejected(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// What the request names does not exist here (a key to delete that is absent).
    #[error("{0}")]
    NotFound(String),
    /// What the request names exists but its bytes are not on this device yet (a large
    /// value whose blob sync has not fetched).
    #[error("{0}")]
    Unavailable(String),
    /// A write that shared a group commit whose transaction failed (the first caller of
    /// the group gets the error itself, the others its message).
    #[error("the commit this write shared failed: {0}")]
    SharedCommit(String),
    #[error("this is an archive device: it never prunes (change with `tend gc --policy prune`)")]
    ArchiveDevice,
}

/// One line for an error and its causes, joined by ": " (a cause already in the text is
/// not repeated): how the device answers errors, and how the CLI prints its own.
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
