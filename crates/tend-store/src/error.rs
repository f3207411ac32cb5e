//! `StoreError`: every way a store operation can fail, each message naming the store file.

use std::path::PathBuf;

use tend_core::{ContentId, DecodeError, JournalNamespace};

/// An error of the store. Every variant names the store file, so a message printed on its own
/// tells the user which file is at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `Store::create` was given a path that already exists.
    #[error("cannot create store {path}: the file already exists")]
    AlreadyExists { path: PathBuf },

    /// `Store::open` was given a path where there is no file.
    #[error("cannot open store {path}: no such file")]
    NotFound { path: PathBuf },

    /// The file exists but is not a tend store (another kind of file, or another program's
    /// redb database). It was not modified.
    #[error("{path} is not a tend store ({reason}); the file was left untouched")]
    NotAStore { path: PathBuf, reason: String },

    /// The store was written by a newer release of tend. It was not modified.
    #[error(
        "store {path} has format version {found}, newer than the version {supported} this release \
         reads; upgrade tend to open it (the file was left untouched)"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The store is from a format this release cannot read (for example a pre-release one).
    #[error(
        "store {path} has format version {found}, which this release cannot read (it reads \
         version {supported}); the file was left untouched"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// The file looks like a tend store but is truncated or damaged. It was not modified.
    #[error("store {path} is truncated or corrupt ({detail}); the file was left untouched")]
    Corrupt { path: PathBuf, detail: String },

    /// Another process (or another handle in this process) has the store open.
    #[error("store {path} is already open in another process")]
    Locked { path: PathBuf },

    /// Compaction needs the store to itself, and a transaction or iterator was alive. Nothing
    /// was changed; compaction can be tried again later.
    #[error("store {path} is busy (a transaction is in progress); compaction was not done")]
    Busy { path: PathBuf },

    /// Pruning needs a verified `SnapshotCompleted` in the namespace (DESIGN rule 4).
    #[error(
        "cannot prune {namespace} in store {path}: the journal has no verified completed snapshot"
    )]
    NoSnapshot {
        path: PathBuf,
        namespace: JournalNamespace,
    },

    /// A stored blob no longer hashes to its content id.
    #[error("blob {cid} in store {path} does not match its content id (disk corruption?)")]
    BlobCorrupt { path: PathBuf, cid: ContentId },

    /// The bytes streamed into a blob writer are not the blob announced (wrong length, or
    /// they do not hash to its content id). Nothing was stored.
    #[error("blob {cid} was not stored in {path}: {detail}")]
    BlobMismatch {
        path: PathBuf,
        // Boxed: a CID is large, and inline it would make every `Result` of the store larger.
        cid: Box<ContentId>,
        detail: String,
    },

    /// A stored maintenance fact no longer verifies.
    #[error("a stored fact in store {path} no longer verifies: {source}")]
    FactCorrupt {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },

    /// A blob codec other than raw or DAG-CBOR was given.
    #[error(
        "store {path}: blob codec {codec:#x} is not supported (use raw 0x55 or dag-cbor 0x71)"
    )]
    UnsupportedCodec { path: PathBuf, codec: u64 },

    /// A setting could not be encoded or decoded.
    #[error("setting {key:?} in store {path}: {detail}")]
    Setting {
        path: PathBuf,
        key: String,
        detail: String,
    },

    /// An error reported by the underlying database.
    #[error("store {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },

    /// An I/O error on the store file.
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// A short stable label, used for metrics and `--json` output.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AlreadyExists { .. } => "exists",
            Self::NotFound { .. } => "not_found",
            Self::NotAStore { .. } => "not_a_store",
            Self::NewerFormat { .. } => "newer_format",
            Self::UnsupportedFormat { .. } => "unsupported_format",
            Self::Corrupt { .. } | Self::BlobCorrupt { .. } | Self::FactCorrupt { .. } => "corrupt",
            Self::Locked { .. } => "locked",
            Self::Busy { .. } => "busy",
            Self::NoSnapshot { .. } => "no_snapshot",
            Self::Setting { .. } => "setting",
            Self::BlobMismatch { .. } => "blob_mismatch",
            Self::UnsupportedCodec { .. } => "codec",
            Self::Database { .. } => "database",
            Self::Io { .. } => "io",
        }
    }

    /// Wraps any redb error, attributing it to the store at `path`. Corruption reported by
    /// redb becomes [`StoreError::Corrupt`].
    pub(crate) fn db(path: &std::path::Path, e: impl Into<redb::Error>) -> Self {
        let source: redb::Error = e.into();
        match source {
            redb::Error::Corrupted(detail) => Self::Corrupt {
                path: path.to_owned(),
                detail,
            },
            redb::Error::DatabaseAlreadyOpen => Self::Locked {
                path: path.to_owned(),
            },
            source => Self::Database {
                path: path.to_owned(),
                source,
            },
        }
    }

    /// A stored record does not have the shape this release writes.
    pub(crate) fn corrupt(path: &std::path::Path, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_owned(),
            detail: detail.into(),
        }
    }
}
