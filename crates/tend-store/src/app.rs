//! The application state of a namespace ([`tend_core::app`]) read from the facts table: the
//! whole journal's (cached in memory like the maintenance state, kept up to date by
//! [`Store::insert_batch`]) and a prefix's (what a snapshot carries and GC keeps).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tend_core::app::{is_data, Put, Value};
use tend_core::fact::read_stored_payload;
use tend_core::{
    reduce, AppState, ContentId, DataOp, DecodeError, DeviceId, Epoch, FactId, JournalNamespace,
    MaintenanceState, Payload, VerifiedFact,
};

use crate::error::StoreError;
use crate::facts::StoredFact;
use crate::store::Store;

impl StoredFact {
    /// The author and payload, read without checking the signature again (it was checked
    /// before the fact was stored, and the bytes were checked against the id when read).
    pub fn author_payload(&self) -> Result<(DeviceId, Payload), DecodeError> {
        read_stored_payload(self.bytes())
    }
}

impl Store {
    /// The application state of `ns`'s journal as stored. Cached; the first call after
    /// opening folds every stored fact of the namespace once.
    pub fn app_state(&self, ns: JournalNamespace) -> Result<Arc<AppState>, StoreError> {
        if let Some(s) = self.lock_app_states().get(&ns) {
            return Ok(s.clone());
        }
        let state = Arc::new(self.fold_app(ns, ..)?);
        Ok(self
            .lock_app_states()
            .entry(ns)
            .or_insert_with(|| state)
            .clone())
    }

    fn fold_app(
        &self,
        ns: JournalNamespace,
        epochs: impl std::ops::RangeBounds<Epoch>,
    ) -> Result<AppState, StoreError> {
        let mut state = AppState::default();
        for stored in self.scan(ns, epochs)? {
            let stored = stored?;
            let (author, payload) = stored.author_payload().map_err(|e| self.bad_fact(e))?;
            if is_data(&payload) {
                state.apply_parts((stored.epoch, stored.id), author, &payload);
            }
        }
        Ok(state)
    }

    /// The maintenance state of the prefix `{ f : f.epoch < below }` alone.
    pub fn prefix_maintenance_state(
        &self,
        ns: JournalNamespace,
        below: Epoch,
    ) -> Result<MaintenanceState, StoreError> {
        let mut facts = Vec::new();
        for stored in self.scan_maintenance(ns)? {
            let stored = stored?;
            if stored.epoch >= below {
                break;
            }
            facts.push(self.verify(&stored)?);
        }
        Ok(reduce(ns, &facts))
    }

    /// The `(epoch, id)` of the data facts below `below` that the prefix's application state
    /// needs (`AppState::live_facts` under the prefix's own cache floors): what a snapshot
    /// at `below` carries, and all that GC keeps below it. Facts pruned earlier were not
    /// live, and dropping them changes no fact's liveness, so pruned and archive replicas
    /// compute the same set.
    pub fn live_below(
        &self,
        ns: JournalNamespace,
        below: Epoch,
    ) -> Result<BTreeSet<(Epoch, FactId)>, StoreError> {
        let floors = self.prefix_maintenance_state(ns, below)?.cache_floors;
        self.live_below_under(ns, below, &floors)
    }

    /// [`Store::live_below`] under the prefix's cache floors, already read.
    pub(crate) fn live_below_under(
        &self,
        ns: JournalNamespace,
        below: Epoch,
        floors: &BTreeMap<String, Epoch>,
    ) -> Result<BTreeSet<(Epoch, FactId)>, StoreError> {
        // Nothing at or above `below` (a snapshot of everything so far, the usual
        // proposal): the prefix's application state is the cached one, no fold needed.
        if self.scan(ns, below..)?.next().is_none() {
            return Ok(self.app_state(ns)?.live_facts(floors));
        }
        Ok(self.fold_app(ns, ..below)?.live_facts(floors))
    }

    /// The live data facts below `below` ([`Store::live_below`]), ascending.
    pub fn live_facts_below(
        &self,
        ns: JournalNamespace,
        below: Epoch,
    ) -> Result<Vec<VerifiedFact>, StoreError> {
        let live = self.live_below(ns, below)?;
        let mut out = Vec::with_capacity(live.len());
        // One ordered scan rather than a lookup per live fact.
        for stored in self.scan(ns, ..below)? {
            let stored = stored?;
            if live.contains(&(stored.epoch, stored.id)) {
                out.push(stored.trusted().map_err(|e| self.bad_fact(e))?);
            }
        }
        Ok(out)
    }

    /// Applies newly committed data facts to the cached application state, if cached.
    pub(crate) fn app_admitted(&self, ns: JournalNamespace, facts: &[&VerifiedFact]) {
        if let Some(state) = self.lock_app_states().get_mut(&ns) {
            let state = Arc::make_mut(state);
            for f in facts {
                state.apply(f);
            }
        }
    }

    /// Forgets the cached application state of `ns` (facts were removed); the next read
    /// folds the journal again.
    pub(crate) fn app_forget(&self, ns: JournalNamespace) {
        self.lock_app_states().remove(&ns);
    }

    /// The blobs that the readable values of `ns` live in, with their lengths (GC keeps
    /// them whatever their tombstones say; a device fetches those it lacks).
    pub fn value_blobs(
        &self,
        ns: JournalNamespace,
    ) -> Result<BTreeMap<ContentId, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for (epoch, id) in self.app_state(ns)?.value_heads() {
            let Some(stored) = self.get(ns, epoch, &id)? else {
                continue;
            };
            let (_, payload) = stored.author_payload().map_err(|e| self.bad_fact(e))?;
            if let Payload::Data(DataOp::Put(Put {
                value: Value::Blob { cid, len },
                ..
            })) = payload
            {
                out.insert(cid, len);
            }
        }
        Ok(out)
    }

    fn verify(&self, stored: &StoredFact) -> Result<VerifiedFact, StoreError> {
        stored.verify().map_err(|e| self.bad_fact(e))
    }

    fn bad_fact(&self, source: DecodeError) -> StoreError {
        StoreError::FactCorrupt {
            path: self.path.clone(),
            source,
        }
    }
}
