//! Application data requests and their answers (`tend_core::app`'s collections, logs and
//! cache as the control socket and the CLI carry them), their limits, and the checks a write
//! passes before any device sees it. [`crate::data`] carries them out.
//!
//! Values are bytes everywhere: base64 in JSON, raw on the CLI's stdout.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tend_core::app::{check_key, check_name, LogCursor};

use crate::error::DeviceError;

/// Largest value a put accepts (larger values go through the blob store in chunks, but a
/// value is still read whole by `get`).
pub const MAX_VALUE_BYTES: usize = 64 << 20;
/// Most entries one scan or log read returns.
pub const MAX_LIMIT: usize = 10_000;

/// Bytes that travel as base64 in JSON.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Bytes64(pub Vec<u8>);

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::BASE64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        data_encoding::BASE64
            .decode(s.as_bytes())
            .map(Bytes64)
            .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
    }
}

fn default_limit() -> usize {
    100
}

/// One data operation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DataRequest {
    /// `put(collection, key, value)`.
    Put {
        collection: String,
        key: String,
        value: Bytes64,
    },
    /// What a key reads as, with its conflicts.
    Get { collection: String, key: String },
    /// `delete(collection, key)`.
    Delete { collection: String, key: String },
    /// Live keys of a collection in key order.
    Scan {
        collection: String,
        #[serde(default)]
        prefix: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default = "default_limit")]
        limit: usize,
    },
    /// Appends an entry to a log.
    LogAppend { log: String, data: Bytes64 },
    /// Untrimmed entries of a log after a cursor.
    LogRead {
        log: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default = "default_limit")]
        limit: usize,
    },
    /// Drops the entries of a log below a cursor.
    LogTrim { log: String, before: String },
    /// Writes a replicated cache entry, computed at the current epoch.
    CachePut { key: String, value: Bytes64 },
    /// Reads a cache entry: valid, stale or absent.
    CacheGet { key: String },
    /// Several writes committed in one transaction, or none (each later write sees the
    /// earlier ones: a put supersedes the put before it of the same key).
    Batch { ops: Vec<DataRequest> },
}

impl DataRequest {
    /// Whether the request writes a fact.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            DataRequest::Put { .. }
                | DataRequest::Delete { .. }
                | DataRequest::LogAppend { .. }
                | DataRequest::LogTrim { .. }
                | DataRequest::CachePut { .. }
                | DataRequest::Batch { .. }
        )
    }
}

/// A fact a write made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Written {
    pub id: String,
    pub epoch: u64,
    /// The log cursor of an appended entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Blob CID of a large value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// A fact that wrote a value: who, when, which.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    pub id: String,
    pub epoch: u64,
    pub author: String,
}

/// What a key reads as.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ValueRead {
    pub key: String,
    pub value: Bytes64,
    #[serde(flatten)]
    pub version: Version,
    /// Blob CID, when the value is large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// Concurrent writes that lost to this one (greatest first).
    pub conflicts: Vec<Version>,
}

/// A log entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEntry {
    pub cursor: String,
    pub data: Bytes64,
    pub author: String,
}

/// Whether a cache entry may be used.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheValidity {
    Valid,
    Stale,
    Absent,
}

/// What `cache get` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheRead {
    pub key: String,
    pub validity: CacheValidity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Bytes64>,
    /// The epoch the entry was computed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_at: Option<u64>,
    /// The key's floor: the entry is valid only above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u64>,
}

/// The answer to a [`DataRequest`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataResponse {
    Written(Written),
    /// `None`: the key is absent (never written, or deleted).
    Value(Option<ValueRead>),
    Scan(Vec<ValueRead>),
    Log(Vec<LogEntry>),
    Cache(CacheRead),
    /// What each write of a batch made, in order.
    Batch(Vec<Written>),
}

/// Most writes in one batch.
pub const MAX_BATCH: usize = 100_000;

/// Checks what a write request carries without the device: names, keys and sizes, as
/// the device checks them before it plans the write (a bulk import checks each line with
/// it before it sends a batch). Reads and nested batches are refused.
pub fn check_write(request: &DataRequest) -> Result<(), DeviceError> {
    match request {
        DataRequest::Put {
            collection,
            key,
            value,
        } => {
            check(check_name("collection name", collection))?;
            check(check_key(key))?;
            if value.0.len() > MAX_VALUE_BYTES {
                return Err(DeviceError::InvalidInput(format!(
                    "the value is {} bytes, the limit is {MAX_VALUE_BYTES}",
                    value.0.len()
                )));
            }
            Ok(())
        }
        DataRequest::Delete { collection, key } => {
            check(check_name("collection name", collection))?;
            check(check_key(key))
        }
        DataRequest::LogAppend { log, data } => {
            check(check_name("log name", log))?;
            if data.0.len() > tend_core::data::MAX_ENTRY_BYTES {
                return Err(DeviceError::InvalidInput(format!(
                    "a log entry is {} bytes, the limit is {}",
                    data.0.len(),
                    tend_core::data::MAX_ENTRY_BYTES
                )));
            }
            Ok(())
        }
        DataRequest::LogTrim { log, before } => {
            check(check_name("log name", log))?;
            check(before.parse::<LogCursor>()).map(drop)
        }
        DataRequest::CachePut { key, value } => {
            check(check_name("cache key", key))?;
            if value.0.len() > tend_core::app::INLINE_VALUE_MAX {
                return Err(DeviceError::InvalidInput(
                    tend_core::data::DataError::InlineTooLarge(value.0.len()).to_string(),
                ));
            }
            Ok(())
        }
        DataRequest::Batch { .. } => Err(DeviceError::InvalidInput(
            "a batch cannot hold another batch".into(),
        )),
        _ => Err(DeviceError::InvalidInput(
            "a batch holds writes only (put, delete, log_append, log_trim, cache_put)".into(),
        )),
    }
}

/// A failed input check as [`DeviceError::InvalidInput`].
pub(crate) fn check<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, DeviceError> {
    r.map_err(|e| DeviceError::InvalidInput(e.to_string()))
}
