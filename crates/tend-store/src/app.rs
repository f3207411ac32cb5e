//! The application state of a namespace ([`tend_core::app`]) read from the facts table: the
//! whole journal's (cached in memory like the maintenance state, kept up to date by
//! [`Store::insert_batch`]) and a prefix's (what a snapshot carries and GC keeps).
//!
//! The whole journal's untrimmed log entries are not kept in memory: they are rows of the
//! `app_log_entries` table, written in the transaction that stores their facts, so a
//! device holding a million entries holds none of them in memory (docs/ARCHITECTURE.md
//! section 4a). The cached [`AppState`] is [`AppState::indexed`]: registers, each log's
//! trim point, clock and length. A marker per namespace says the rows are exactly the
//! entries of the stored facts; whatever removes data facts in a way that could change
//! them clears it, and the next read rebuilds the rows in one pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, MutexGuard};

use redb::{Table, TableDefinition, WriteTransaction};
use tend_core::app::{digest_of_live, is_data, LogCursor, LogIndex, Put, Value};
use tend_core::fact::read_stored_payload;
use tend_core::{
    reduce, AppState, ContentId, DataOp, DecodeError, DeviceId, Epoch, FactId, Hash32,
    JournalNamespace, MaintenanceState, Payload, VerifiedFact,
};

use crate::error::StoreError;
use crate::facts::StoredFact;
use crate::store::{Store, WriterCache, NAMESPACES};

/// Untrimmed log entries: `namespace number | log name length (u16) | log name | epoch |
/// seq | fact id` (big-endian), so one log's entries are one range, in cursor order.
pub(crate) const APP_LOG: TableDefinition<&[u8], ()> = TableDefinition::new("app_log_entries");

fn log_prefix(ns_no: u32, log: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + log.len() + 48);
    k.extend_from_slice(&ns_no.to_be_bytes());
    // A name fits in 16 bits: the whole fact that carries it is at most 64 KiB
    // (tend_core::MAX_FACT_BYTES) with its other fields.
    k.extend_from_slice(&(log.len() as u16).to_be_bytes());
    k.extend_from_slice(log.as_bytes());
    k
}

fn log_key(ns_no: u32, log: &str, c: &LogCursor) -> Vec<u8> {
    let mut k = log_prefix(ns_no, log);
    k.extend_from_slice(&c.epoch.0.to_be_bytes());
    k.extend_from_slice(&c.seq.to_be_bytes());
    k.extend_from_slice(&c.id.0);
    k
}

/// The log name and cursor of a row key (`None` if malformed).
fn split_log_key(k: &[u8]) -> Option<(&[u8], LogCursor)> {
    let len = usize::from(u16::from_be_bytes(k.get(4..6)?.try_into().ok()?));
    let name = k.get(6..6 + len)?;
    let rest = k.get(6 + len..)?;
    if rest.len() != 48 {
        return None;
    }
    let epoch = u64::from_be_bytes(rest[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(rest[8..16].try_into().ok()?);
    let id = FactId(rest[16..].try_into().ok()?);
    Some((
        name,
        LogCursor {
            epoch: Epoch(epoch),
            seq,
            id,
        },
    ))
}

/// The namespaces whose rows are exactly their entries (a marker per namespace number).
pub(crate) const APP_LOG_MARKS: TableDefinition<u32, ()> =
    TableDefinition::new("app_log_entries_current");

/// The rows of one namespace in a write transaction, as the state's [`LogIndex`].
pub(crate) struct RowIndex<'s, 't> {
    pub(crate) store: &'s Store,
    pub(crate) rows: &'s mut Table<'t, &'static [u8], ()>,
    pub(crate) ns_no: u32,
}

impl LogIndex for RowIndex<'_, '_> {
    type Error = StoreError;

    fn add(&mut self, log: &str, entry: LogCursor) -> Result<bool, StoreError> {
        let key = log_key(self.ns_no, log, &entry);
        let old = self
            .rows
            .insert(key.as_slice(), ())
            .map_err(|e| self.store.err(e))?;
        Ok(old.is_none())
    }

    fn drop_below(&mut self, log: &str, before: LogCursor) -> Result<u64, StoreError> {
        let start = log_prefix(self.ns_no, log);
        let end = log_key(self.ns_no, log, &before);
        let mut dropped = 0;
        for item in self
            .rows
            .extract_from_if::<&[u8], _>(start.as_slice()..end.as_slice(), |_, _| true)
            .map_err(|e| self.store.err(e))?
        {
            item.map_err(|e| self.store.err(e))?;
            dropped += 1;
        }
        Ok(dropped)
    }
}

/// Folds against rows that already hold the entries: nothing to write.
struct RowsHeld;

impl LogIndex for RowsHeld {
    type Error = StoreError;
    fn add(&mut self, _: &str, _: LogCursor) -> Result<bool, StoreError> {
        Ok(false)
    }
    fn drop_below(&mut self, _: &str, _: LogCursor) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Says in `tx` that the rows of namespace `no` may no longer be its entries: the next
/// read of its state rebuilds them.
pub(crate) fn invalidate_rows(
    store: &Store,
    tx: &WriteTransaction,
    no: u32,
) -> Result<(), StoreError> {
    let mut marks = tx.open_table(APP_LOG_MARKS).map_err(|e| store.err(e))?;
    marks.remove(no).map_err(|e| store.err(e))?;
    Ok(())
}

impl StoredFact {
    /// The author and payload, read without checking the signature again (it was checked
    /// before the fact was stored, and the bytes were checked against the id when read).
    pub fn author_payload(&self) -> Result<(DeviceId, Payload), DecodeError> {
        read_stored_payload(self.bytes())
    }
}

impl Store {
    /// The application state of `ns`'s journal as stored, [`AppState::indexed`]: its log
    /// entries are read with [`Store::log_entries`], and its live set and digest with
    /// [`Store::app_live_facts`] and [`Store::app_digest`]. Cached; the first call after
    /// opening folds every stored fact of the namespace once (and rebuilds the entry rows
    /// if they are not known to be current).
    pub fn app_state(&self, ns: JournalNamespace) -> Result<Arc<AppState>, StoreError> {
        if let Some(s) = self.lock_app_states().get(&ns) {
            return Ok(s.clone());
        }
        let writer = self.lock_writer();
        self.app_state_locked(ns, &writer)
    }

    /// [`Store::app_state`] for a caller that holds the writer lock (no write transaction
    /// open). Loading under it means no write lands between the fold and the caching.
    pub(crate) fn app_state_locked(
        &self,
        ns: JournalNamespace,
        _writer: &MutexGuard<'_, WriterCache>,
    ) -> Result<Arc<AppState>, StoreError> {
        if let Some(s) = self.lock_app_states().get(&ns) {
            return Ok(s.clone());
        }
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            // No journal yet, and no rows: the insert that creates it folds its first facts
            // into this state and marks the rows it writes.
            let state = Arc::new(AppState::indexed());
            self.lock_app_states().insert(ns, state.clone());
            return Ok(state);
        };
        let marked = match rtx.open_table(APP_LOG_MARKS) {
            Ok(marks) => marks.get(rec.no).map_err(|e| self.err(e))?.is_some(),
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(crate::store::table_err(&self.path, e)),
        };
        drop(rtx);
        let state = if marked {
            let mut state = AppState::indexed();
            self.fold_into(ns, .., &mut state, &mut RowsHeld)?;
            for (log, len) in self.count_rows(&ns)? {
                state.set_log_len(&log, len);
            }
            state
        } else {
            self.rebuild_rows(ns, rec.no)?
        };
        let state = Arc::new(state);
        self.lock_app_states().insert(ns, state.clone());
        Ok(state)
    }

    /// Folds the whole journal of `ns` again, writing its entry rows afresh, and marks them.
    fn rebuild_rows(&self, ns: JournalNamespace, no: u32) -> Result<AppState, StoreError> {
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let mut state = AppState::indexed();
        {
            let mut rows = tx.open_table(APP_LOG).map_err(|e| self.err(e))?;
            let start = no.to_be_bytes();
            let end = match no.checked_add(1) {
                Some(next) => next.to_be_bytes().to_vec(),
                None => vec![0xff; 5],
            };
            rows.retain_in::<&[u8], _>(start.as_slice()..end.as_slice(), |_, _| false)
                .map_err(|e| self.err(e))?;
            let mut index = RowIndex {
                store: self,
                rows: &mut rows,
                ns_no: no,
            };
            // The writer lock is held: the committed facts this reads are all there are.
            self.fold_into(ns, .., &mut state, &mut index)?;
            let mut marks = tx.open_table(APP_LOG_MARKS).map_err(|e| self.err(e))?;
            marks.insert(no, ()).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(state)
    }

    /// The number of rows of each log of `ns`.
    fn count_rows(&self, ns: &JournalNamespace) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        self.for_each_row(ns, |log, _| {
            let log = String::from_utf8_lossy(log);
            match out.get_mut(log.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    out.insert(log.into_owned(), 1);
                }
            }
        })?;
        Ok(out)
    }

    /// Calls `f` with every entry row of `ns`, by log, in cursor order.
    fn for_each_row(
        &self,
        ns: &JournalNamespace,
        mut f: impl FnMut(&[u8], LogCursor),
    ) -> Result<(), StoreError> {
        let rtx = self.read_txn()?;
        let Some(rec) = self.ns_record(&self.open_ro(&rtx, NAMESPACES)?, ns)? else {
            return Ok(());
        };
        let rows = match rtx.open_table(APP_LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(crate::store::table_err(&self.path, e)),
        };
        let start = rec.no.to_be_bytes();
        for item in rows
            .range::<&[u8]>(start.as_slice()..)
            .map_err(|e| self.err(e))?
        {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let k = k.value();
            if k[..4] != start {
                break;
            }
            let (log, cursor) =
                split_log_key(k).ok_or_else(|| self.corrupt("a malformed log entry row"))?;
            f(log, cursor);
        }
        Ok(())
    }

    /// The untrimmed entries of `log` after `after` (exclusive), ascending, at most `limit`.
    pub fn log_entries(
        &self,
        ns: JournalNamespace,
        log: &str,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogCursor>, StoreError> {
        self.app_state(ns)?;
        let rtx = self.read_txn()?;
        let Some(rec) = self.ns_record(&self.open_ro(&rtx, NAMESPACES)?, &ns)? else {
            return Ok(Vec::new());
        };
        let rows = self.open_ro(&rtx, APP_LOG)?;
        let prefix = log_prefix(rec.no, log);
        let start = match after {
            Some(a) => log_key(rec.no, log, &a),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for item in rows
            .range::<&[u8]>(start.as_slice()..)
            .map_err(|e| self.err(e))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| self.err(e))?;
            let k = k.value();
            if !k.starts_with(&prefix) {
                break;
            }
            let (_, cursor) =
                split_log_key(k).ok_or_else(|| self.corrupt("a malformed log entry row"))?;
            if Some(cursor) != after {
                out.push(cursor);
            }
        }
        Ok(out)
    }

    /// The facts the application state of `ns` needs ([`AppState::live_facts`] of the whole
    /// journal), under the cache `floors`.
    pub fn app_live_facts(
        &self,
        ns: JournalNamespace,
        floors: &BTreeMap<String, Epoch>,
    ) -> Result<BTreeSet<(Epoch, FactId)>, StoreError> {
        let state = self.app_state(ns)?;
        // Collected and built in one go (`FromIterator` sorts, then fills the tree's nodes
        // in order): a million inserts one by one were a tenth of a ceremony step's CPU
        // at 1M entries, and as many allocations.
        let mut live: Vec<_> = state.live_beside_entries(floors).into_iter().collect();
        self.for_each_row(&ns, |_, c| live.push((c.epoch, c.id)))?;
        Ok(live.into_iter().collect())
    }

    /// [`AppState::digest`] of the whole journal of `ns`.
    pub fn app_digest(
        &self,
        ns: JournalNamespace,
        floors: &BTreeMap<String, Epoch>,
    ) -> Result<Hash32, StoreError> {
        Ok(digest_of_live(&self.app_live_facts(ns, floors)?))
    }

    /// [`AppState::live_len_below`] of the whole journal of `ns`, for `state` as cached.
    pub(crate) fn app_live_len_below(
        &self,
        ns: JournalNamespace,
        state: &AppState,
        floors: &BTreeMap<String, Epoch>,
        below: Epoch,
    ) -> Result<usize, StoreError> {
        let mut n = state.live_len_below_beside_entries(floors, below);
        self.for_each_row(&ns, |_, c| {
            if c.epoch < below {
                n += 1;
            }
        })?;
        Ok(n)
    }

    /// The application state of the facts of `ns` in `epochs`, entries in memory.
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

    /// Folds the facts of `ns` in `epochs` into an indexed `state`, entries into `index`.
    fn fold_into(
        &self,
        ns: JournalNamespace,
        epochs: impl std::ops::RangeBounds<Epoch>,
        state: &mut AppState,
        index: &mut impl LogIndex<Error = StoreError>,
    ) -> Result<(), StoreError> {
        for stored in self.scan(ns, epochs)? {
            let stored = stored?;
            let (author, payload) = stored.author_payload().map_err(|e| self.bad_fact(e))?;
            if is_data(&payload) {
                state.apply_indexed((stored.epoch, stored.id), author, &payload, index)?;
            }
        }
        Ok(())
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
        // No data fact at or above `below` (a snapshot of everything so far, the usual
        // proposal): the prefix's application state is the cached one, no fold needed.
        // Maintenance facts there (the proposal itself, which a signer holds by the time
        // it builds the blob) fold into no application state; counting them made every
        // signer fold a million entries into memory again (170 MB and a second at 1M).
        for stored in self.scan(ns, below..)? {
            let fact = stored?.trusted().map_err(|e| self.bad_fact(e))?;
            if tend_core::app::is_data(fact.payload()) {
                return Ok(self.fold_app(ns, ..below)?.live_facts(floors));
            }
        }
        self.app_live_facts(ns, floors)
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

    /// Folds data facts being stored in `tx` into a copy of the cached state of `ns`,
    /// writing their entry rows; the copy is cached once `tx` commits
    /// ([`Store::app_install`]). Without a cached state the rows are left unmarked and the
    /// next read rebuilds them.
    pub(crate) fn app_admit_in(
        &self,
        tx: &WriteTransaction,
        ns: JournalNamespace,
        ns_no: u32,
        facts: &[&VerifiedFact],
    ) -> Result<Option<Arc<AppState>>, StoreError> {
        let Some(mut state) = self.lock_app_states().get(&ns).cloned() else {
            invalidate_rows(self, tx, ns_no)?;
            return Ok(None);
        };
        // A cached state is one whose rows were kept with it since it was folded (what
        // could make them differ also forgets it, under the writer lock).
        let mut marks = tx.open_table(APP_LOG_MARKS).map_err(|e| self.err(e))?;
        marks.insert(ns_no, ()).map_err(|e| self.err(e))?;
        let mut rows = tx.open_table(APP_LOG).map_err(|e| self.err(e))?;
        let mut index = RowIndex {
            store: self,
            rows: &mut rows,
            ns_no,
        };
        let s = Arc::make_mut(&mut state);
        for f in facts {
            s.apply_indexed(f.order_key(), f.author(), f.payload(), &mut index)?;
        }
        Ok(Some(state))
    }

    /// Caches a state [`Store::app_admit_in`] folded, once its transaction committed.
    pub(crate) fn app_install(&self, ns: JournalNamespace, state: Arc<AppState>) {
        self.lock_app_states().insert(ns, state);
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
        self.value_blobs_of(ns, &*self.app_state(ns)?)
    }

    /// [`Store::value_blobs`] of `state`, the cached state of `ns`.
    pub(crate) fn value_blobs_of(
        &self,
        ns: JournalNamespace,
        state: &AppState,
    ) -> Result<BTreeMap<ContentId, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for (epoch, id) in state.value_heads() {
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
