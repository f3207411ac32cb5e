//! A device's redb store as [`tend_replica`] sees it, so the running node, the CLI and the
//! in-process fleet apply the same rules as the simulator: admission of a session's facts,
//! adopting and settling a snapshot, re-issue.

use std::collections::HashSet;

use tend_core::{
    ContentId, DeviceId, Epoch, FactId, Hash32, JournalNamespace, MaintenanceState, Payload,
    VerifiedFact,
};
use tend_replica::{BlobAt, Key, Replica};
use tend_snapshot::BuiltBlob;
use tend_store::StoreError;

use crate::device::{Device, DeviceError};
use crate::snapshot_blob::StoreJournal;

/// Setting: the snapshot epoch this device last settled ([`tend_replica::settle`]).
const SETTLED: &str = "reissued_below_snapshot";

/// Setting: this device's own facts that settling could neither re-issue nor drop
/// silently (the snapshot's item blob was gone everywhere), as hex canonical bytes
/// ([`tend_replica::Settlement::set_aside`]).
pub const SET_ASIDE: &str = "settle.set_aside";

pub use crate::blobs::{ITEM_BLOB_UNAVAILABLE, ITEM_BLOB_WANTED};

/// What a session driver keeps beside the store that admission needs.
pub(crate) trait SessionIndex {
    /// The epoch of a fact offered to a running session (the store is keyed by
    /// `(epoch, id)`). A fact received but not yet offered is not found: a copy of it that
    /// a second session brings is then checked and admitted as a duplicate.
    fn epoch_of(&self, id: &FactId) -> Option<Epoch>;
    /// Whether no peer holds this snapshot blob (its completion is then admitted alone).
    fn blob_unavailable(&self, cid: &ContentId) -> bool;
    /// Notes a snapshot blob that is not stored, for the next round to fetch.
    fn fetch_blob(&self, cid: &ContentId);
    /// Writes admitted facts in one transaction (counting them); whether any were given
    /// and written.
    fn store_facts(&self, facts: &[VerifiedFact]) -> bool;
}

/// A device's store under the rules of [`tend_replica`].
pub struct DeviceReplica<'a> {
    device: &'a Device,
    session: Option<&'a dyn SessionIndex>,
    /// In a session (one frame's admission, then dropped): one read transaction for the
    /// membership tests of the frame's facts, made at the first and dropped when this
    /// replica writes.
    lookup: std::cell::OnceCell<tend_store::FactLookup<'a>>,
}

impl<'a> DeviceReplica<'a> {
    /// The device's store, outside any session (settling a snapshot, say).
    pub fn new(device: &'a Device) -> Self {
        Self {
            device,
            session: None,
            lookup: std::cell::OnceCell::new(),
        }
    }

    /// The device's store as a session driver admits into it.
    pub(crate) fn in_session(device: &'a Device, session: &'a dyn SessionIndex) -> Self {
        Self {
            device,
            session: Some(session),
            lookup: std::cell::OnceCell::new(),
        }
    }

    fn corrupt(&self, source: tend_core::DecodeError) -> DeviceError {
        StoreError::FactCorrupt {
            path: self.device.store().path().to_owned(),
            source,
        }
        .into()
    }
}

impl Replica for DeviceReplica<'_> {
    type Error = DeviceError;

    fn build_snapshot_blob(
        &self,
        upto: Epoch,
        keep: Option<ContentId>,
    ) -> Result<BuiltBlob, DeviceError> {
        let store = self.device.store();
        let cid = StoreJournal::new(store, self.device.namespace()).build_and_keep(upto, keep)?;
        Ok(BuiltBlob {
            cid,
            bytes: None,
            item_blob: None,
        })
    }

    fn namespace(&self) -> JournalNamespace {
        self.device.namespace()
    }

    fn device_id(&self) -> DeviceId {
        self.device.device_id()
    }

    fn state(&self) -> Result<MaintenanceState, DeviceError> {
        Ok(self.device.store().maintenance_state(self.namespace())?)
    }

    fn contains(&self, (epoch, id): Key) -> Result<bool, DeviceError> {
        if self.session.is_none() {
            return Ok(self.device.store().contains(self.namespace(), epoch, &id)?);
        }
        let lookup = match self.lookup.get() {
            Some(l) => l,
            None => {
                let l = self.device.store().lookup(self.namespace())?;
                self.lookup.get_or_init(|| l)
            }
        };
        Ok(lookup.contains(epoch, &id)?)
    }

    fn load_fact(&self, id: &FactId) -> Option<Vec<u8>> {
        let epoch = self.session?.epoch_of(id)?;
        match self.device.store().get(self.namespace(), epoch, id) {
            Ok(f) => f.map(|f| f.into_bytes()),
            Err(e) => {
                tracing::warn!("cannot load fact {id}: {e}");
                None
            }
        }
    }

    fn prefix_digest(&self, upto: Epoch) -> Result<Hash32, DeviceError> {
        Ok(self.device.store().prefix_digest(self.namespace(), upto)?)
    }

    fn snapshot_blob(&self, cid: &ContentId) -> Result<BlobAt, DeviceError> {
        if self.session.is_some_and(|s| s.blob_unavailable(cid)) {
            return Ok(BlobAt::Unavailable);
        }
        let store = self.device.store();
        if store.get_setting::<String>(ITEM_BLOB_UNAVAILABLE)? == Some(cid.to_string())
            && !store.has_blob(cid)?
        {
            return Ok(BlobAt::Unavailable);
        }
        match self.device.store().blob_reader(cid)? {
            Some(reader) => Ok(BlobAt::Stored(Box::new(reader))),
            None => {
                if let Some(session) = self.session {
                    session.fetch_blob(cid);
                }
                Ok(BlobAt::Fetching)
            }
        }
    }

    fn scan(
        &self,
        from: Epoch,
        to: Epoch,
        each: &mut dyn FnMut(VerifiedFact),
    ) -> Result<(), DeviceError> {
        let store = self.device.store();
        for stored in store.scan(self.namespace(), from..to)? {
            each(stored?.trusted().map_err(|e| self.corrupt(e))?);
        }
        Ok(())
    }

    fn live_below(&self, epoch: Epoch) -> Result<Vec<Key>, DeviceError> {
        let live = self.device.store().live_below(self.namespace(), epoch)?;
        Ok(live.into_iter().collect())
    }

    fn settled(&self) -> Result<Option<Epoch>, DeviceError> {
        Ok(self.device.store().get_setting::<u64>(SETTLED)?.map(Epoch))
    }

    fn store(&mut self, facts: &[VerifiedFact]) -> Result<(), DeviceError> {
        self.lookup.take();
        match self.session {
            Some(session) => {
                session.store_facts(facts);
            }
            None => {
                self.device.store().insert_batch(facts)?;
            }
        }
        Ok(())
    }

    fn retract_maintenance(
        &mut self,
        below: Epoch,
        keep: &HashSet<FactId>,
    ) -> Result<Vec<VerifiedFact>, DeviceError> {
        let store = self.device.store();
        let dropped = store.retract_uncovered_maintenance(self.namespace(), below, keep)?;
        dropped
            .into_iter()
            .map(|f| f.trusted().map_err(|e| self.corrupt(e)))
            .collect()
    }

    fn retract_data(&mut self, keys: &[Key]) -> Result<u64, DeviceError> {
        self.lookup.take();
        Ok(self.device.store().retract_data(self.namespace(), keys)?)
    }

    fn append(&mut self, payload: Payload) -> Result<VerifiedFact, DeviceError> {
        self.lookup.take();
        self.device.append(payload)
    }

    fn mark_settled(&mut self, epoch: Epoch) -> Result<(), DeviceError> {
        self.lookup.take();
        Ok(self.device.store().put_setting(SETTLED, &epoch.0)?)
    }

    fn set_aside(&mut self, facts: &[VerifiedFact]) -> Result<(), DeviceError> {
        self.lookup.take();
        let store = self.device.store();
        let mut kept: Vec<String> = store.get_setting(SET_ASIDE)?.unwrap_or_default();
        kept.extend(facts.iter().map(|f| hex::encode(f.bytes())));
        Ok(store.put_setting(SET_ASIDE, &kept)?)
    }
}
