//! Data writes as one batch: every write of a [`WritePlan`] is signed against the device's
//! application state plus the writes before it in the same plan (a put supersedes the put
//! just planned for its key; appends to a log take consecutive clock values), and
//! [`WritePlan::commit`] stores them all in one transaction, or none.
//!
//! A single `tend put` is a plan of one write; `DataRequest::Batch` is a plan of many.

use std::collections::HashMap;
use std::sync::Arc;

use serde_bytes::ByteBuf;
use tend_core::app::{
    check_key, check_name, Append, CachePut, Delete, LogCursor, Put, Space, Trim, Value,
    INLINE_VALUE_MAX,
};
use tend_core::maintenance::{BlobTombstone, MaintenanceFact};
use tend_core::{AppState, ContentId, DataOp, Epoch, FactId, Payload, UnsignedFact, VerifiedFact};

use crate::data::{Written, MAX_VALUE_BYTES};
use crate::device::{Device, DeviceError};

type KeyOf = (Space, String, String);

/// Writes being prepared on a device; nothing is stored before [`WritePlan::commit`].
pub struct WritePlan<'d> {
    device: &'d Device,
    state: Arc<AppState>,
    epoch: Epoch,
    /// Heads of the keys this plan wrote, as the plan leaves them.
    heads: HashMap<KeyOf, Vec<(Epoch, FactId)>>,
    /// The next clock value of the logs this plan appended to.
    seqs: HashMap<String, u64>,
    facts: Vec<VerifiedFact>,
    written: Vec<Written>,
}

fn invalid(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::InvalidInput(e.to_string())
}

impl<'d> WritePlan<'d> {
    /// A plan against the device's current state and epoch.
    pub fn new(device: &'d Device) -> Result<Self, DeviceError> {
        let ns = device.namespace();
        Ok(Self {
            device,
            state: device.store().app_state(ns)?,
            epoch: device.store().maintenance_state(ns)?.current_epoch(),
            heads: HashMap::new(),
            seqs: HashMap::new(),
            facts: Vec::new(),
            written: Vec::new(),
        })
    }

    /// How many facts the plan will store.
    pub fn len(&self) -> usize {
        self.facts.len()
    }

    /// Whether the plan holds no write.
    pub fn is_empty(&self) -> bool {
        self.facts.is_empty()
    }

    fn heads(&self, key: &KeyOf) -> Vec<(Epoch, FactId)> {
        match self.heads.get(key) {
            Some(h) => h.clone(),
            None => self.state.head_keys(key.0, &key.1, &key.2),
        }
    }

    fn sign(&mut self, op: DataOp) -> Result<VerifiedFact, DeviceError> {
        op.check().map_err(invalid)?;
        let fact = UnsignedFact {
            namespace: self.device.namespace(),
            epoch: self.epoch,
            payload: Payload::Data(op),
        }
        .sign(self.device.key().signing_key());
        self.facts.push(fact.clone());
        Ok(fact)
    }

    /// The payload of a head: from this plan, or from the store.
    fn payload_of(&self, (epoch, id): (Epoch, FactId)) -> Result<Option<Payload>, DeviceError> {
        if let Some(f) = self.facts.iter().find(|f| f.id() == id) {
            return Ok(Some(f.payload().clone()));
        }
        let stored = self
            .device
            .store()
            .get(self.device.namespace(), epoch, &id)?;
        stored
            .map(|s| s.author_payload().map(|(_, p)| p))
            .transpose()
            .map_err(|e| invalid(format!("stored fact {id}: {e}")))
    }

    /// The blobs the given heads' values live in: overwriting them tombstones them.
    fn tombstone_blobs(
        &mut self,
        heads: &[(Epoch, FactId)],
        keep: Option<ContentId>,
    ) -> Result<(), DeviceError> {
        for h in heads {
            if let Some(Payload::Data(DataOp::Put(p))) = self.payload_of(*h)? {
                if let Some(cid) = p.value.blob().filter(|c| Some(*c) != keep) {
                    let fact = UnsignedFact {
                        namespace: self.device.namespace(),
                        epoch: self.epoch,
                        payload: Payload::Maintenance(MaintenanceFact::BlobTombstone(
                            BlobTombstone { cid },
                        )),
                    }
                    .sign(self.device.key().signing_key());
                    self.facts.push(fact);
                }
            }
        }
        Ok(())
    }

    /// `put(collection, key, value)`, superseding every head of the key (so the device
    /// reads its own latest write). A value above [`INLINE_VALUE_MAX`] goes to the blob
    /// store now (content-addressed: harmless if the plan is dropped) and the fact names it.
    pub fn put(&mut self, collection: &str, key: &str, value: &[u8]) -> Result<(), DeviceError> {
        check_name("collection name", collection).map_err(invalid)?;
        check_key(key).map_err(invalid)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "the value is {} bytes, the limit is {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let k = (Space::Collection, collection.to_owned(), key.to_owned());
        let heads = self.heads(&k);
        let stored = if value.len() > INLINE_VALUE_MAX {
            let cid = self
                .device
                .store()
                .put_blob(tend_core::ids::CODEC_RAW, value)?;
            Value::Blob {
                cid,
                len: value.len() as u64,
            }
        } else {
            Value::Inline(ByteBuf::from(value.to_vec()))
        };
        let blob = stored.blob();
        let fact = self.sign(DataOp::Put(Put {
            collection: collection.into(),
            key: key.into(),
            value: stored,
            supersedes: heads.iter().map(|(_, id)| *id).collect(),
        }))?;
        self.tombstone_blobs(&heads, blob)?;
        self.heads.insert(k, vec![fact.order_key()]);
        self.written.push(written(&fact, None, blob));
        Ok(())
    }

    /// `delete(collection, key)`; fails if the key is absent.
    pub fn delete(&mut self, collection: &str, key: &str) -> Result<(), DeviceError> {
        check_name("collection name", collection).map_err(invalid)?;
        check_key(key).map_err(invalid)?;
        let k = (Space::Collection, collection.to_owned(), key.to_owned());
        let heads = self.heads(&k);
        let present = match self.heads.get(&k) {
            Some(h) => {
                let head = h.first().copied();
                !matches!(
                    head.map(|h| self.payload_of(h)).transpose()?.flatten(),
                    Some(Payload::Data(DataOp::Delete(_))) | None
                )
            }
            None => self.state.get(collection, key).is_some(),
        };
        if !present {
            return Err(DeviceError::NotFound(format!(
                "{collection}/{key} is absent: nothing to delete"
            )));
        }
        let fact = self.sign(DataOp::Delete(Delete {
            collection: collection.into(),
            key: key.into(),
            supersedes: heads.iter().map(|(_, id)| *id).collect(),
        }))?;
        self.tombstone_blobs(&heads, None)?;
        self.heads.insert(k, vec![fact.order_key()]);
        self.written.push(written(&fact, None, None));
        Ok(())
    }

    /// Appends an entry to a log, after every entry this device has seen in it.
    pub fn append(&mut self, log: &str, data: &[u8]) -> Result<(), DeviceError> {
        let seq = match self.seqs.get(log) {
            Some(s) => *s,
            None => self.state.next_seq(log),
        };
        let fact = self.sign(DataOp::Append(Append {
            log: log.into(),
            seq,
            data: ByteBuf::from(data.to_vec()),
        }))?;
        self.seqs.insert(log.to_owned(), seq + 1);
        let cursor = LogCursor::of(&fact);
        self.written.push(written(&fact, cursor, None));
        Ok(())
    }

    /// Drops the entries of a log below a cursor.
    pub fn trim(&mut self, log: &str, before: LogCursor) -> Result<(), DeviceError> {
        let fact = self.sign(DataOp::Trim(Trim {
            log: log.into(),
            before,
        }))?;
        self.written.push(written(&fact, None, None));
        Ok(())
    }

    /// Writes a replicated cache entry, computed at the current epoch.
    pub fn cache_put(&mut self, key: &str, value: &[u8]) -> Result<(), DeviceError> {
        let k = (Space::Cache, String::new(), key.to_owned());
        let heads = self.heads(&k);
        let fact = self.sign(DataOp::CachePut(CachePut {
            key: key.into(),
            value: ByteBuf::from(value.to_vec()),
            supersedes: heads.iter().map(|(_, id)| *id).collect(),
        }))?;
        self.heads.insert(k, vec![fact.order_key()]);
        self.written.push(written(&fact, None, None));
        Ok(())
    }

    /// Stores every planned fact in one transaction; what each write made, in order.
    pub fn commit(self) -> Result<Vec<Written>, DeviceError> {
        let report = self.device.store().insert_batch(&self.facts)?;
        if let Some(r) = report.rejected.first() {
            return Err(DeviceError::Rejected(r.error.to_string()));
        }
        Ok(self.written)
    }
}

fn written(f: &VerifiedFact, cursor: Option<LogCursor>, blob: Option<ContentId>) -> Written {
    Written {
        id: f.id().to_string(),
        epoch: f.epoch().0,
        cursor: cursor.map(|c| c.to_string()),
        blob: blob.map(|c| c.to_string()),
    }
}
