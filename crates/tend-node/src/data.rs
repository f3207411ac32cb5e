//! Application data on a device: collections, logs and the replicated cache
//! (`tend_core::app`), as one request type that the control socket (running device) and
//! the CLI (stopped device) both carry out with [`run`], so the two paths cannot drift.
//!
//! Values are bytes everywhere: base64 in JSON, raw on the CLI's stdout.

use std::sync::Arc;

use tend_core::app::{check_key, check_name, Entry, LogCursor, Value};
use tend_core::{DataOp, Epoch, FactId, Payload};

use crate::data_request::check;
pub use crate::data_request::{
    check_write, Bytes64, CacheRead, CacheValidity, DataRequest, DataResponse, LogEntry, ValueRead,
    Version, Written, MAX_BATCH, MAX_LIMIT, MAX_VALUE_BYTES,
};
use crate::device::{Device, DeviceError};

/// One write, committed in the device's next group commit (see
/// [`crate::write::WriteQueue`]): concurrent single writes share one transaction.
fn write_one(device: &Device, request: DataRequest) -> Result<Written, DeviceError> {
    only_write(device.write_queue().submit(device, vec![request])?)
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
            check_batch(&ops)?;
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
            let entries = device
                .store()
                .log_entries(device.namespace(), &log, after, limit)?;
            let mut out = Vec::new();
            for c in entries {
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

/// Carries out a data write on a running device from an async task: [`run`]'s writes, but
/// waiting for the group commit without holding a thread (see
/// [`crate::write::WriteQueue::enqueue`]). `after_group` runs after each group commit this
/// task has to lead, just after the group's callers are answered (the node tells its
/// sessions of the write; the order does not matter for data writes, which change no
/// membership); a group led by a caller of [`crate::node::Node::data`] is followed by
/// that caller's own call. Reads are not writes: call [`run`] on a blocking thread.
pub async fn write(
    device: &Arc<Device>,
    request: DataRequest,
    after_group: impl Fn() + Send + 'static,
) -> Result<DataResponse, DeviceError> {
    let (ops, batch) = match request {
        DataRequest::Batch { ops } => {
            check_batch(&ops)?;
            (ops, true)
        }
        r if r.is_write() => (vec![r], false),
        _ => {
            return Err(DeviceError::InvalidInput(
                "only writes go through the group commit".into(),
            ))
        }
    };
    let (answer, leader) = device.write_queue().enqueue(ops);
    if let Some(leader) = leader {
        let device = Arc::clone(device);
        tokio::task::spawn_blocking(move || leader.run(&*device, &after_group));
    }
    let written = answer
        .await
        .unwrap_or_else(|_| Err(crate::write::group_lost()))?;
    Ok(if batch {
        DataResponse::Batch(written)
    } else {
        DataResponse::Written(only_write(written)?)
    })
}

fn check_batch(ops: &[DataRequest]) -> Result<(), DeviceError> {
    if ops.len() > MAX_BATCH {
        return Err(DeviceError::InvalidInput(format!(
            "a batch holds at most {MAX_BATCH} writes, not {}",
            ops.len()
        )));
    }
    Ok(())
}

fn only_write(written: Vec<Written>) -> Result<Written, DeviceError> {
    written
        .into_iter()
        .next()
        .ok_or_else(|| DeviceError::InvalidInput("nothing was written".into()))
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
    /// `put(collection, key, value)` (see [`crate::write::WritePlan::put`]), committed on its own.
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

    /// `delete(collection, key)` (see [`crate::write::WritePlan::delete`]), committed on its own.
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
