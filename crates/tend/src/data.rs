//! The application data types of the library: what a read returns, what a write made, and
//! the batch and scan requests.

use serde::{Deserialize, Serialize};
use tend_core::DeviceId;
use tend_node::data::{self as node_data, Bytes64, DataRequest};

pub use tend_core::app::LogCursor;

use crate::error::{Error, Result};

/// A write that produced a fact: who can find it, and at which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The fact's id (hex): the value's version, for compare-and-set style checks.
    pub id: String,
    /// The epoch it was signed at.
    pub epoch: u64,
    /// The device that wrote it.
    pub author: DeviceId,
}

/// What a key of a collection reads as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value's bytes (a large value is read whole from its blob).
    pub value: Vec<u8>,
    /// The write that this value is.
    pub version: Version,
    /// Concurrent writes of the key that lost to this one (greatest first); empty once a
    /// write that saw them supersedes them.
    pub conflicts: Vec<Version>,
}

/// What one write stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The fact's id (hex).
    pub id: String,
    /// The epoch it was signed at.
    pub epoch: u64,
    /// For a log append: the entry's cursor.
    pub log_cursor: Option<LogCursor>,
}

/// One entry of a log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The entry's stable cursor: read after it, or trim before it.
    pub cursor: LogCursor,
    /// The entry's bytes.
    pub data: Vec<u8>,
    /// The device that appended it.
    pub author: DeviceId,
}

/// What a key of the replicated cache reads as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheEntry {
    /// The entry may be used: it was computed above the key's invalidation floor.
    Valid {
        /// The cached bytes.
        value: Vec<u8>,
        /// The epoch it was computed at.
        computed_at: u64,
    },
    /// The entry was invalidated (computed at or below the key's floor): recompute it.
    Stale {
        /// The cached bytes, no longer to be trusted.
        value: Vec<u8>,
        /// The epoch it was computed at.
        computed_at: u64,
        /// The key's floor.
        floor: u64,
    },
    /// No entry.
    Absent,
}

/// Which keys of a collection [`crate::Device::scan`] returns: those starting with a
/// prefix, after a key, at most a limit (100 unless set, at most 10,000), in key order.
///
/// ```
/// let page = tend::Scan::new().prefix("2024-").after("2024-03").limit(50);
/// # let _ = page;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    pub(crate) prefix: String,
    pub(crate) after: Option<String>,
    pub(crate) limit: usize,
}

impl Default for Scan {
    fn default() -> Self {
        Self::new()
    }
}

impl Scan {
    /// Every key, the first 100.
    pub fn new() -> Self {
        Scan {
            prefix: String::new(),
            after: None,
            limit: 100,
        }
    }

    /// Only keys that start with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Only keys after `key` (the last key of the previous page).
    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after = Some(key.into());
        self
    }

    /// At most `limit` keys (1 to 10,000).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// Writes committed together by [`crate::Device::commit`]: in one transaction, all or
/// none. Each write sees the ones before it (a put supersedes an earlier put of the same
/// key in the batch; appends to one log keep their order).
///
/// ```
/// let batch = tend::Batch::new()
///     .put("todo", "1", b"buy milk")
///     .put("todo", "2", b"call mum")
///     .append("history", b"added two items");
/// assert_eq!(batch.len(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub(crate) ops: Vec<DataRequest>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// How many writes the batch holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds no write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Adds `put(collection, key, value)`.
    pub fn put(mut self, collection: &str, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.ops.push(DataRequest::Put {
            collection: collection.into(),
            key: key.into(),
            value: Bytes64(value.as_ref().to_vec()),
        });
        self
    }

    /// Adds `delete(collection, key)`; the whole batch fails if the key is absent.
    pub fn delete(mut self, collection: &str, key: &str) -> Self {
        self.ops.push(DataRequest::Delete {
            collection: collection.into(),
            key: key.into(),
        });
        self
    }

    /// Adds an append of `data` to `log`.
    pub fn append(mut self, log: &str, data: impl AsRef<[u8]>) -> Self {
        self.ops.push(DataRequest::LogAppend {
            log: log.into(),
            data: Bytes64(data.as_ref().to_vec()),
        });
        self
    }

    /// Adds a trim of `log`: its entries below `before` go.
    pub fn trim(mut self, log: &str, before: LogCursor) -> Self {
        self.ops.push(DataRequest::LogTrim {
            log: log.into(),
            before: before.to_string(),
        });
        self
    }

    /// Adds a replicated cache entry for `key`, computed at the current epoch.
    pub fn cache_put(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.ops.push(DataRequest::CachePut {
            key: key.into(),
            value: Bytes64(value.as_ref().to_vec()),
        });
        self
    }
}

pub(crate) fn device_id(s: &str) -> Result<DeviceId> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("{s:?} is not a device id")))
}

pub(crate) fn log_cursor(s: &str) -> Result<LogCursor> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("{s:?} is not a log cursor")))
}

impl TryFrom<node_data::Version> for Version {
    type Error = Error;

    fn try_from(v: node_data::Version) -> Result<Self> {
        Ok(Version {
            author: device_id(&v.author)?,
            id: v.id,
            epoch: v.epoch,
        })
    }
}

impl TryFrom<node_data::ValueRead> for Entry {
    type Error = Error;

    fn try_from(v: node_data::ValueRead) -> Result<Self> {
        Ok(Entry {
            key: v.key,
            value: v.value.0,
            version: v.version.try_into()?,
            conflicts: v
                .conflicts
                .into_iter()
                .map(Version::try_from)
                .collect::<Result<_>>()?,
        })
    }
}

impl TryFrom<node_data::Written> for Written {
    type Error = Error;

    fn try_from(w: node_data::Written) -> Result<Self> {
        Ok(Written {
            log_cursor: w.cursor.as_deref().map(log_cursor).transpose()?,
            id: w.id,
            epoch: w.epoch,
        })
    }
}

impl TryFrom<node_data::LogEntry> for LogEntry {
    type Error = Error;

    fn try_from(e: node_data::LogEntry) -> Result<Self> {
        Ok(LogEntry {
            cursor: log_cursor(&e.cursor)?,
            data: e.data.0,
            author: device_id(&e.author)?,
        })
    }
}

impl From<node_data::CacheRead> for CacheEntry {
    fn from(c: node_data::CacheRead) -> Self {
        match (c.validity, c.value, c.computed_at) {
            (node_data::CacheValidity::Valid, Some(v), Some(at)) => CacheEntry::Valid {
                value: v.0,
                computed_at: at,
            },
            (node_data::CacheValidity::Stale, Some(v), Some(at)) => CacheEntry::Stale {
                value: v.0,
                computed_at: at,
                floor: c.floor.unwrap_or(at),
            },
            _ => CacheEntry::Absent,
        }
    }
}
