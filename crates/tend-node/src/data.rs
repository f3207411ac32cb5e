//! Application data on a device: collections, logs and the replicated cache
//! (`tend_core::app`), as one request type that the control socket (running device) and
//! the CLI (stopped device) both carry out with [`run`], so the two paths cannot drift.
//!
//! Values are bytes everywhere: base64 in JSON, raw on the CLI's stdout.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tend_core::app::{check_key, check_name, Entry, LogCursor, Value};
use tend_core::{DataOp, Epoch, FactId, Payload};

use crate::device::{Device, DeviceError};
use crate::write::WritePlan;

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

/// Adds one write request to a plan; reads are refused.
pub(crate) fn plan_request(p: &mut WritePlan<'_>, request: DataRequest) -> Result<(), DeviceError> {
    check_write(&request)?;
    match request {
        DataRequest::Put {
            collection,
            key,
            value,
        } => p.put(&collection, &key, &value.0),
        DataRequest::Delete { collection, key } => p.delete(&collection, &key),
        DataRequest::LogAppend { log, data } => p.append(&log, &data.0),
        DataRequest::LogTrim { log, before } => p.trim(&log, check(before.parse::<LogCursor>())?),
        DataRequest::CachePut { key, value } => p.cache_put(&key, &value.0),
        _ => Err(DeviceError::InvalidInput(
            "a batch holds writes only (put, delete, log_append, log_trim, cache_put)".into(),
        )),
    }
}

/// One write, committed in the device's next group commit (see
/// [`crate::write::WriteQueue`]): concurrent single writes share one transaction.
fn write_one(device: &Device, request: DataRequest) -> Result<Written, DeviceError> {
    device
        .write_queue()
        .submit(device, vec![request])?
        .into_iter()
        .next()
        .ok_or_else(|| DeviceError::InvalidInput("nothing was written".into()))
}

/// Carries out a data request on a device.
pub fn run(device: &Device, request: DataRequest) -> Result<DataResponse, DeviceError> {
    Ok(match request {
        r @ (DataRequest::Put { .. }
        | DataRequest::Delete { .. }
        | DataRequest::LogAppend { .. }
        | DataRequest::LogTrim { .. }
        | DataRequest::CachePut { .. }) => DataResponse::Written(write_one(device, r)?),
        DataRequest::Batch { ops } => {
            if ops.len() > MAX_BATCH {
                return Err(DeviceError::InvalidInput(format!(
                    "a batch holds at most {MAX_BATCH} writes, not {}",
                    ops.len()
                )));
            }
            DataResponse::Batch(device.write_queue().submit(device, ops)?)
        }
        DataRequest::Get { collection, key } => {
            check(check_name("collection name", &collection))?;
            check(check_key(&key))?;
            let state = device.store().app_state(device.namespace())?;
            DataResponse::Value(match state.get(&collection, &key) {
                Some(e) => Some(device.read_entry(&key, &e)?),
                None => None,
            })
        }
        DataRequest::Scan {
            collection,
            prefix,
            after,
            limit,
        } => {
            check(check_name("collection name", &collection))?;
            let limit = check_limit(limit)?;
            let state = device.store().app_state(device.namespace())?;
            let mut out = Vec::new();
            for (key, e) in state
                .scan(&collection, &prefix, after.as_deref())
                .take(limit)
            {
                out.push(device.read_entry(key, &e)?);
            }
            DataResponse::Scan(out)
        }
        DataRequest::LogRead { log, after, limit } => {
            check(check_name("log name", &log))?;
            let limit = check_limit(limit)?;
            let after = after.map(|a| a.parse::<LogCursor>()).transpose();
            let after = check(after)?;
            let state = device.store().app_state(device.namespace())?;
            let mut out = Vec::new();
            for c in state.log_entries(&log, after).take(limit) {
                let (f_author, payload) = device.load_payload(c.epoch, c.id)?;
                let data = match payload {
                    Payload::Application { data, .. } => data,
                    Payload::Data(DataOp::Append(a)) => a.data.into_vec(),
                    _ => continue,
                };
                out.push(LogEntry {
                    cursor: c.to_string(),
                    data: Bytes64(data),
                    author: f_author.to_string(),
                });
            }
            DataResponse::Log(out)
        }
        DataRequest::CacheGet { key } => {
            check(check_name("cache key", &key))?;
            let ns = device.namespace();
            let floor = device
                .store()
                .maintenance_state(ns)?
                .cache_floors
                .get(&key)
                .copied();
            let entry = device.store().app_state(ns)?.cache_get(&key);
            DataResponse::Cache(match entry {
                None => CacheRead {
                    key,
                    validity: CacheValidity::Absent,
                    value: None,
                    computed_at: None,
                    floor: floor.map(|f| f.0),
                },
                Some(e) => {
                    let (_, payload) = device.load_payload(e.winner.0, e.winner.1)?;
                    let value = match payload {
                        Payload::Data(DataOp::CachePut(c)) => c.value.into_vec(),
                        _ => return Err(corrupt(e.winner.1)),
                    };
                    let valid = floor.is_none_or(|f| e.winner.0 > f);
                    CacheRead {
                        key,
                        validity: if valid {
                            CacheValidity::Valid
                        } else {
                            CacheValidity::Stale
                        },
                        value: Some(Bytes64(value)),
                        computed_at: Some(e.winner.0 .0),
                        floor: floor.map(|f| f.0),
                    }
                }
            })
        }
    })
}

fn check<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, DeviceError> {
    r.map_err(|e| DeviceError::InvalidInput(e.to_string()))
}

fn check_limit(limit: usize) -> Result<usize, DeviceError> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err(DeviceError::InvalidInput(format!(
            "--limit must be 1 to {MAX_LIMIT}"
        )));
    }
    Ok(limit)
}

fn corrupt(id: FactId) -> DeviceError {
    DeviceError::InvalidInput(format!("fact {id} is not the kind its index says"))
}

impl Device {
    /// `put(collection, key, value)` (see [`WritePlan::put`]), committed on its own.
    pub fn put(&self, collection: &str, key: &str, value: &[u8]) -> Result<Written, DeviceError> {
        write_one(
            self,
            DataRequest::Put {
                collection: collection.into(),
                key: key.into(),
                value: Bytes64(value.to_vec()),
            },
        )
    }

    /// `delete(collection, key)` (see [`WritePlan::delete`]), committed on its own.
    pub fn delete(&self, collection: &str, key: &str) -> Result<Written, DeviceError> {
        write_one(
            self,
            DataRequest::Delete {
                collection: collection.into(),
                key: key.into(),
            },
        )
    }

    /// The value and versions of a key's entry.
    pub fn read_entry(&self, key: &str, e: &Entry) -> Result<ValueRead, DeviceError> {
        let (author, payload) = self.load_payload(e.winner.0, e.winner.1)?;
        let Payload::Data(DataOp::Put(put)) = payload else {
            return Err(corrupt(e.winner.1));
        };
        let blob = put.value.blob();
        let value = match put.value {
            Value::Inline(b) => b.into_vec(),
            Value::Blob { cid, .. } => self.store().get_blob(&cid)?.ok_or_else(|| {
                DeviceError::Unavailable(format!(
                    "the value of {key} is blob {cid}, not yet fetched to this device \
                     (sync fetches it from a peer)"
                ))
            })?,
        };
        let mut conflicts = Vec::new();
        for (epoch, id) in &e.conflicts {
            let (author, _) = self.load_payload(*epoch, *id)?;
            conflicts.push(Version {
                id: id.to_string(),
                epoch: epoch.0,
                author: author.to_string(),
            });
        }
        Ok(ValueRead {
            key: key.to_owned(),
            value: Bytes64(value),
            version: Version {
                id: e.winner.1.to_string(),
                epoch: e.winner.0 .0,
                author: author.to_string(),
            },
            blob: blob.map(|c| c.to_string()),
            conflicts,
        })
    }

    /// The author and payload of a stored fact the application state names.
    fn load_payload(
        &self,
        epoch: Epoch,
        id: FactId,
    ) -> Result<(tend_core::DeviceId, Payload), DeviceError> {
        let stored = self
            .store()
            .get(self.namespace(), epoch, &id)?
            .ok_or_else(|| {
                DeviceError::InvalidInput(format!("fact {id} of the state is not stored"))
            })?;
        stored
            .author_payload()
            .map_err(|e| DeviceError::InvalidInput(format!("stored fact {id}: {e}")))
    }
}
