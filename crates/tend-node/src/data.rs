//! Application data on a device: collections, logs and the replicated cache
//! (`tend_core::app`), as one request type that the control socket (running device) and
//! the CLI (stopped device) both carry out with [`run`], so the two paths cannot drift.
//!
//! Values are bytes everywhere: base64 in JSON, raw on the CLI's stdout.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tend_core::app::{
    check_key, check_name, CachePut, Delete, Entry, LogCursor, Put, Space, Trim, Value,
    INLINE_VALUE_MAX,
};
use tend_core::maintenance::{BlobTombstone, MaintenanceFact};
use tend_core::{ContentId, DataOp, Epoch, FactId, Payload, VerifiedFact};

use crate::device::{Device, DeviceError};

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
}

/// Carries out a data request on a device.
pub fn run(device: &Device, request: DataRequest) -> Result<DataResponse, DeviceError> {
    Ok(match request {
        DataRequest::Put {
            collection,
            key,
            value,
        } => DataResponse::Written(device.put(&collection, &key, &value.0)?),
        DataRequest::Get { collection, key } => {
            check(check_name("collection name", &collection))?;
            check(check_key(&key))?;
            let state = device.store().app_state(device.namespace())?;
            DataResponse::Value(match state.get(&collection, &key) {
                Some(e) => Some(device.read_entry(&key, &e)?),
                None => None,
            })
        }
        DataRequest::Delete { collection, key } => {
            DataResponse::Written(device.delete(&collection, &key)?)
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
        DataRequest::LogAppend { log, data } => {
            let f = device.add_application_fact(&log, &data.0)?;
            DataResponse::Written(Written {
                id: f.id().to_string(),
                epoch: f.epoch().0,
                cursor: LogCursor::of(&f).map(|c| c.to_string()),
                blob: None,
            })
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
        DataRequest::LogTrim { log, before } => {
            let before = check(before.parse::<LogCursor>())?;
            let op = DataOp::Trim(Trim { log, before });
            check(op.check())?;
            DataResponse::Written(written(&device.append(Payload::Data(op))?, None))
        }
        DataRequest::CachePut { key, value } => {
            let ns = device.namespace();
            let supersedes = device.store().app_state(ns)?.heads(Space::Cache, "", &key);
            let op = DataOp::CachePut(CachePut {
                key,
                value: serde_bytes::ByteBuf::from(value.0),
                supersedes,
            });
            check(op.check())?;
            DataResponse::Written(written(&device.append(Payload::Data(op))?, None))
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

fn written(f: &VerifiedFact, blob: Option<ContentId>) -> Written {
    Written {
        id: f.id().to_string(),
        epoch: f.epoch().0,
        cursor: None,
        blob: blob.map(|c| c.to_string()),
    }
}

impl Device {
    /// `put(collection, key, value)`: supersedes every head of the key this device holds,
    /// so the device reads its own latest write. A value above
    /// [`INLINE_VALUE_MAX`] goes to the blob store and the fact names its CID; the blobs of
    /// values it overwrites are tombstoned, so GC reclaims them once a snapshot covers that.
    pub fn put(&self, collection: &str, key: &str, value: &[u8]) -> Result<Written, DeviceError> {
        check(check_name("collection name", collection))?;
        check(check_key(key))?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(DeviceError::InvalidInput(format!(
                "the value is {} bytes, the limit is {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let ns = self.namespace();
        let heads = self
            .store()
            .app_state(ns)?
            .head_keys(Space::Collection, collection, key);
        let supersedes = heads.iter().map(|(_, id)| *id).collect();
        let stored = if value.len() > INLINE_VALUE_MAX {
            let cid = self.store().put_blob(tend_core::ids::CODEC_RAW, value)?;
            Value::Blob {
                cid,
                len: value.len() as u64,
            }
        } else {
            Value::Inline(serde_bytes::ByteBuf::from(value.to_vec()))
        };
        let blob = stored.blob();
        let overwritten = self.blobs_of(&heads)?;
        let op = DataOp::Put(Put {
            collection: collection.into(),
            key: key.into(),
            value: stored,
            supersedes,
        });
        check(op.check())?;
        let fact = self.append(Payload::Data(op))?;
        self.tombstone(overwritten.into_iter().filter(|c| Some(*c) != blob))?;
        Ok(written(&fact, blob))
    }

    /// `delete(collection, key)`: supersedes every head of the key; fails if the key is
    /// absent here.
    pub fn delete(&self, collection: &str, key: &str) -> Result<Written, DeviceError> {
        check(check_name("collection name", collection))?;
        check(check_key(key))?;
        let ns = self.namespace();
        let state = self.store().app_state(ns)?;
        if state.get(collection, key).is_none() {
            return Err(DeviceError::NotFound(format!(
                "{collection}/{key} is absent: nothing to delete"
            )));
        }
        let heads = state.head_keys(Space::Collection, collection, key);
        let overwritten = self.blobs_of(&heads)?;
        let supersedes = heads.iter().map(|(_, id)| *id).collect();
        let op = DataOp::Delete(Delete {
            collection: collection.into(),
            key: key.into(),
            supersedes,
        });
        check(op.check())?;
        let fact = self.append(Payload::Data(op))?;
        self.tombstone(overwritten)?;
        Ok(written(&fact, None))
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

    /// The blobs that the named puts' values live in.
    fn blobs_of(&self, heads: &[(Epoch, FactId)]) -> Result<Vec<ContentId>, DeviceError> {
        let mut out = Vec::new();
        for (epoch, id) in heads {
            if let (_, Payload::Data(DataOp::Put(p))) = self.load_payload(*epoch, *id)? {
                out.extend(p.value.blob());
            }
        }
        Ok(out)
    }

    /// Writes a `BlobTombstone` for each blob.
    fn tombstone(&self, cids: impl IntoIterator<Item = ContentId>) -> Result<(), DeviceError> {
        for cid in cids {
            self.append(Payload::Maintenance(MaintenanceFact::BlobTombstone(
                BlobTombstone { cid },
            )))?;
        }
        Ok(())
    }
}
