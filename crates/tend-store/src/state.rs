//! The reduced maintenance state of a namespace, computed from the maintenance table only.
//!
//! Application and unknown facts change nothing in `MaintenanceState` but the highest epoch
//! seen, which the namespace record keeps; so folding the maintenance and authority facts in
//! `(epoch, id)` order and then observing that epoch gives exactly `reduce` of the whole
//! journal, cheaply, and unchanged by pruning (the maintenance table is never pruned).

use redb::ReadableTable;
use tend_core::{Epoch, JournalNamespace, MaintenanceState};

use crate::codec::FactKey;
use crate::error::StoreError;
use crate::facts::AuthorResolver;
use crate::store::{NsRecord, Store, AUTHOR_BY_NO, MAINT, NAMESPACES};

impl Store {
    /// The reduced maintenance state of `ns` (the state of an empty journal if the store has
    /// no fact of it). Cached in memory; the cache is rebuilt from disk after reopening.
    pub fn maintenance_state(&self, ns: JournalNamespace) -> Result<MaintenanceState, StoreError> {
        if let Some(s) = self.lock_states().get(&ns) {
            return Ok(s.clone());
        }
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            return Ok(MaintenanceState::new(ns));
        };
        let maint = self.open_ro(&rtx, MAINT)?;
        let authors = self.open_ro(&rtx, AUTHOR_BY_NO)?;
        let state = self.reduce_in(&maint, &authors, ns, &rec)?;
        // A writer that committed meanwhile has stored a newer state: keep that one.
        self.lock_states()
            .entry(ns)
            .or_insert_with(|| state.clone());
        Ok(state)
    }

    /// Folds the maintenance facts of `ns` read through the given tables (which may belong to
    /// a write transaction in progress).
    pub(crate) fn reduce_in(
        &self,
        maint: &impl ReadableTable<&'static FactKey, &'static [u8]>,
        authors: &impl ReadableTable<u32, &'static [u8; 32]>,
        ns: JournalNamespace,
        rec: &NsRecord,
    ) -> Result<MaintenanceState, StoreError> {
        let mut state = MaintenanceState::new(ns);
        let mut resolver = AuthorResolver::new(authors);
        let (start, end) = crate::codec::epoch_range(rec.no, Epoch::ZERO, None);
        let range = match &end {
            Some(end) => maint.range::<&FactKey>(&start..end),
            None => maint.range::<&FactKey>(&start..),
        }
        .map_err(|e| self.err(e))?;
        for item in range {
            let (k, v) = item.map_err(|e| self.err(e))?;
            // Checked against its id as it is loaded; its signature was checked before it
            // was stored. Not checked again: a fact arriving below folded ones reduces the
            // whole table again, and a signature per maintenance fact each time was a
            // seventh of a 20-device devnet's CPU.
            let stored = resolver.load(&self.path, ns, k.value(), v.value())?;
            let fact = stored.trusted().map_err(|source| StoreError::FactCorrupt {
                path: self.path.clone(),
                source,
            })?;
            state.apply(&fact);
        }
        state.observe_epoch(Epoch(rec.max_epoch));
        Ok(state)
    }
}
