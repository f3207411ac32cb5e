//! The journal index: batch admission of verified facts, ordered scans, lookups, digests and
//! per-namespace statistics.

use std::collections::{HashMap, HashSet};
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use redb::{ReadOnlyTable, ReadableTable, ReadableTableMetadata, Table, TableDefinition};
use tend_core::journal::DigestBuilder;
use tend_core::{
    AuthorityFact, DecodeError, DeviceId, Epoch, FactId, Hash32, JournalError, JournalNamespace,
    Payload, VerifiedFact,
};

use crate::codec::{self, FactKey};
use crate::error::StoreError;
use crate::store::{
    NsRecord, Store, AUTHORS, AUTHOR_BY_NO, FACTS, MAINT, NAMESPACES, NS_BY_NO, NS_RECORD_LEN,
};

/// A fact as stored: its canonical bytes, checked against its id when read. It is not
/// re-verified (the signature was checked before it was stored); call
/// [`StoredFact::verify`] to get a [`VerifiedFact`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFact {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub id: FactId,
    bytes: Vec<u8>,
}

impl StoredFact {
    /// The canonical wire bytes (hashing to `id`).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The canonical wire bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Decodes and verifies the fact (signature included).
    pub fn verify(&self) -> Result<VerifiedFact, DecodeError> {
        VerifiedFact::decode(&self.bytes)
    }

    /// Decodes the fact without checking its signature again: it was checked before the
    /// fact was stored, and the bytes were checked against the id when read
    /// ([`VerifiedFact::decode_stored`]). For the store's own hot paths.
    pub fn trusted(&self) -> Result<VerifiedFact, DecodeError> {
        VerifiedFact::decode_stored(&self.bytes)
    }
}

/// A fact of a batch that was not admitted, and why (DESIGN rules 2 and 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub id: FactId,
    pub error: JournalError,
}

/// The outcome of [`Store::insert_batch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Facts that were new and admitted.
    pub inserted: u64,
    /// Facts already stored (or repeated within the batch).
    pub duplicates: u64,
    /// Facts refused by admission, in `(namespace, epoch, id)` order; none of them was written.
    pub rejected: Vec<Rejected>,
    /// Held facts deleted because a membership change in this batch shows their author was
    /// not a member at their epoch.
    pub dropped: u64,
}

/// Per-namespace figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceStats {
    pub namespace: JournalNamespace,
    /// Facts in the journal index (after pruning: those at or above the floor).
    pub facts: u64,
    /// Maintenance and authority facts kept for reduction (never pruned).
    pub maintenance_facts: u64,
    /// Lowest and highest epoch in the journal index, if it has any fact.
    pub min_epoch: Option<Epoch>,
    pub max_epoch: Option<Epoch>,
    /// The highest epoch of any fact ever admitted, pruned or not.
    pub max_epoch_seen: Epoch,
}

/// Whether a payload changes the maintenance state (and so lives in the maintenance table).
pub(crate) fn is_maintenance(p: &Payload) -> bool {
    !tend_core::app::is_data(p)
}

fn is_membership_change(p: &Payload) -> bool {
    matches!(p, Payload::Authority(AuthorityFact::MembershipChanged(_)))
}

fn is_genesis(p: &Payload) -> bool {
    matches!(p, Payload::Authority(AuthorityFact::Genesis(_)))
}

/// Resolves author numbers of stored values through the author dictionary, memoised.
pub(crate) struct AuthorResolver<'t, T> {
    table: &'t T,
    memo: HashMap<u32, DeviceId>,
}

impl<'t, T: ReadableTable<u32, &'static [u8; 32]>> AuthorResolver<'t, T> {
    pub(crate) fn new(table: &'t T) -> Self {
        Self::with_memo(table, HashMap::new())
    }

    /// A resolver that starts from what an earlier one learned ([`AuthorResolver::into_memo`]).
    pub(crate) fn with_memo(table: &'t T, memo: HashMap<u32, DeviceId>) -> Self {
        Self { table, memo }
    }

    pub(crate) fn into_memo(self) -> HashMap<u32, DeviceId> {
        self.memo
    }

    fn get(&mut self, path: &Path, no: u32) -> Result<DeviceId, StoreError> {
        if let Some(d) = self.memo.get(&no) {
            return Ok(*d);
        }
        let d = self
            .table
            .get(no)
            .map_err(|e| StoreError::db(path, e))?
            .map(|g| DeviceId(*g.value()))
            .ok_or_else(|| {
                StoreError::corrupt(path, format!("author number {no} is not in the dictionary"))
            })?;
        self.memo.insert(no, d);
        Ok(d)
    }

    /// Rebuilds a stored fact from its key and value, checking it hashes to its id.
    pub(crate) fn load(
        &mut self,
        path: &Path,
        ns: JournalNamespace,
        key: &FactKey,
        value: &[u8],
    ) -> Result<StoredFact, StoreError> {
        let (_, epoch, id) = codec::split_key(key);
        let sv = codec::decode_value(value).ok_or_else(|| {
            StoreError::corrupt(path, format!("fact {id} has a malformed record"))
        })?;
        let author = self.get(path, sv.author_no)?;
        let bytes = codec::rebuild_wire(&ns, epoch, &author, &sv);
        if FactId::of(&bytes) != id {
            return Err(StoreError::corrupt(
                path,
                format!("fact {id} in {ns} does not match its id"),
            ));
        }
        Ok(StoredFact {
            namespace: ns,
            epoch,
            id,
            bytes,
        })
    }
}

type FactRange = redb::Range<'static, &'static FactKey, &'static [u8]>;

fn key_range(ns_no: u32, epochs: &impl RangeBounds<Epoch>) -> (Bound<FactKey>, Bound<FactKey>) {
    let lo = match epochs.start_bound() {
        Bound::Included(e) => Some(*e),
        Bound::Excluded(e) => e.0.checked_add(1).map(Epoch),
        Bound::Unbounded => Some(Epoch::ZERO),
    };
    let hi = match epochs.end_bound() {
        Bound::Included(e) => e.0.checked_add(1).map(Epoch),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    let Some(lo) = lo else {
        // Start beyond the last epoch: an empty range.
        let k = codec::epoch_start(ns_no, Epoch::ZERO);
        return (Bound::Included(k), Bound::Excluded(k));
    };
    let (start, end) = codec::epoch_range(ns_no, lo, hi);
    let end = match end {
        Some(e) if e < start => start,
        Some(e) => e,
        None => return (Bound::Included(start), Bound::Unbounded),
    };
    (Bound::Included(start), Bound::Excluded(end))
}

fn as_refs(b: &(Bound<FactKey>, Bound<FactKey>)) -> (Bound<&FactKey>, Bound<&FactKey>) {
    (b.0.as_ref(), b.1.as_ref())
}

/// A range over any readable fact table, borrowing it.
fn open_range<'t>(
    store: &Store,
    table: &'t impl ReadableTable<&'static FactKey, &'static [u8]>,
    ns_no: u32,
    epochs: &impl RangeBounds<Epoch>,
) -> Result<redb::Range<'t, &'static FactKey, &'static [u8]>, StoreError> {
    let b = key_range(ns_no, epochs);
    table
        .range::<&FactKey>(as_refs(&b))
        .map_err(|e| store.err(e))
}

/// A range over a read-only fact table that outlives the table handle.
fn open_owned_range(
    store: &Store,
    table: &ReadOnlyTable<&'static FactKey, &'static [u8]>,
    ns_no: u32,
    epochs: &impl RangeBounds<Epoch>,
) -> Result<FactRange, StoreError> {
    let b = key_range(ns_no, epochs);
    table
        .range::<&FactKey>(as_refs(&b))
        .map_err(|e| store.err(e))
}

/// Streaming iterator over a namespace's facts in `(epoch, id)` order. It reads from one
/// consistent snapshot of the store, taken when it was created.
pub struct FactIter<'s> {
    store: &'s Store,
    ns: JournalNamespace,
    range: Option<FactRange>,
    authors: Option<ReadOnlyTable<u32, &'static [u8; 32]>>,
    memo: HashMap<u32, DeviceId>,
}

impl Iterator for FactIter<'_> {
    type Item = Result<StoredFact, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.range.as_mut()?.next()?;
        let out = (|| {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            let table = self
                .authors
                .as_ref()
                .ok_or_else(|| self.store.corrupt("author dictionary missing"))?;
            let mut resolver = AuthorResolver {
                table,
                memo: std::mem::take(&mut self.memo),
            };
            let out = resolver.load(&self.store.path, self.ns, k.value(), v.value());
            self.memo = resolver.memo;
            out
        })();
        if out.is_err() {
            self.range = None;
        }
        Some(out)
    }
}

/// Streaming iterator over a namespace's `(epoch, id)` items in order (for reconciliation
/// and digests); it reads keys only.
pub struct ItemIter<'s> {
    store: &'s Store,
    range: Option<FactRange>,
}

impl Iterator for ItemIter<'_> {
    type Item = Result<(Epoch, FactId), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.range.as_mut()?.next()?;
        Some(match item {
            Ok((k, _)) => {
                let (_, e, id) = codec::split_key(k.value());
                Ok((e, id))
            }
            Err(e) => {
                self.range = None;
                Err(self.store.err(e))
            }
        })
    }
}

impl Store {
    /// Deletes held facts above `since` whose author is not a member at their epoch under
    /// `state`: a membership change that arrives after facts it governs (a partition) would
    /// otherwise leave them on this replica only, and replicas would never converge (found
    /// by tend-sim). They were never valid in the journal that every replica converges to.
    fn drop_inadmissible(
        &self,
        t: &mut WriteTables<'_>,
        rec: &mut NsRecord,
        state: &tend_core::MaintenanceState,
        since: Epoch,
    ) -> Result<(u64, Option<Epoch>), StoreError> {
        let (start, end) = codec::epoch_range(rec.no, since.next(), None);
        let mut doomed = Vec::new();
        {
            let mut resolver = AuthorResolver::new(&t.author_by_no);
            let range = match &end {
                Some(end) => t.facts.range::<&FactKey>(&start..end),
                None => t.facts.range::<&FactKey>(&start..),
            }
            .map_err(|e| self.err(e))?;
            for item in range {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let key = *k.value();
                let (_, epoch, id) = codec::split_key(&key);
                let sv = codec::decode_value(v.value())
                    .ok_or_else(|| self.corrupt(format!("fact {id} has a malformed record")))?;
                let author = resolver.get(&self.path, sv.author_no)?;
                if !state.is_member_at(&author, epoch) {
                    doomed.push(key);
                }
            }
        }
        for key in &doomed {
            t.facts.remove(key).map_err(|e| self.err(e))?;
            t.maint.remove(key).map_err(|e| self.err(e))?;
        }
        rec.count = rec.count.saturating_sub(doomed.len() as u64);
        let highest = doomed.iter().map(|k| codec::split_key(k).1).max();
        Ok((doomed.len() as u64, highest))
    }

    /// After a commit that added or removed facts: forgets the prefix digests covering
    /// the epochs it changed (`spans`, see [`crate::digests`]) and records the removals
    /// (`removed`: each namespace that lost facts, up to which epoch; see
    /// [`Store::removals`]). Every such commit calls this once, so neither is forgotten.
    pub(crate) fn committed(
        &self,
        spans: &[(JournalNamespace, (Epoch, Epoch))],
        removed: &[(JournalNamespace, Epoch)],
    ) {
        let mut memo = self.lock_digests();
        for &(ns, (lowest, highest)) in spans {
            memo.touched(ns, lowest, highest);
        }
        drop(memo);
        for &(ns, highest) in removed {
            self.record_removal(ns, highest);
        }
    }

    /// Stores a batch of verified facts in one transaction.
    ///
    /// Facts already stored count as duplicates. New facts are admitted per namespace, an
    /// authority genesis first and then in ascending `(epoch, id)` order, against the reduced maintenance state of their namespace
    /// ([`tend_core::MaintenanceState::check_admission`]), which is updated as facts are
    /// admitted, so a membership change earlier in the batch governs later facts. Rejected
    /// facts are reported and not written. The batch is atomic: on error nothing is stored.
    pub fn insert_batch(&self, facts: &[VerifiedFact]) -> Result<InsertReport, StoreError> {
        let mut report = InsertReport::default();
        if facts.is_empty() {
            return Ok(report);
        }
        let mut sorted: Vec<&VerifiedFact> = facts.iter().collect();
        // An authority genesis has no prerequisite and every other fact of its journal needs
        // it, so it goes first; the rest in ascending (epoch, id) order.
        sorted
            .sort_unstable_by_key(|f| (f.namespace(), !is_genesis(f.payload()), f.epoch(), f.id()));
        let before = sorted.len();
        sorted.dedup_by_key(|f| (f.namespace(), f.id()));
        report.duplicates += (before - sorted.len()) as u64;

        let mut writer = self.lock_writer();
        // The application state is folded in the transaction that stores its facts (its
        // log entries are rows of it), so it is loaded first.
        for group in sorted.chunk_by(|a, b| a.namespace() == b.namespace()) {
            if group.iter().any(|f| tend_core::app::is_data(f.payload())) {
                self.app_state_locked(group[0].namespace(), &writer)?;
            }
        }
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let mut new_authors: HashMap<DeviceId, u32> = HashMap::new();
        let mut new_states = Vec::new();
        let mut new_data: Vec<&VerifiedFact> = Vec::new();
        let mut data_dropped = Vec::new();
        let mut app_states = Vec::new();
        let mut touched = Vec::new();
        let mut removed = Vec::new();
        let last_change;
        {
            let mut changes = crate::changes::ChangeWriter::open(self, &tx)?;
            let mut t = WriteTables {
                facts: tx.open_table(FACTS).map_err(|e| self.err(e))?,
                maint: tx.open_table(MAINT).map_err(|e| self.err(e))?,
                namespaces: tx.open_table(NAMESPACES).map_err(|e| self.err(e))?,
                ns_by_no: tx.open_table(NS_BY_NO).map_err(|e| self.err(e))?,
                authors: tx.open_table(AUTHORS).map_err(|e| self.err(e))?,
                author_by_no: tx.open_table(AUTHOR_BY_NO).map_err(|e| self.err(e))?,
            };
            let mut next_author = u32::try_from(t.author_by_no.len().map_err(|e| self.err(e))?)
                .map_err(|_| self.corrupt("author dictionary too large"))?;
            for group in sorted.chunk_by(|a, b| a.namespace() == b.namespace()) {
                let ns = group[0].namespace();
                let group_start = new_data.len();
                let mut rec = match self.ns_record(&t.namespaces, &ns)? {
                    Some(r) => r,
                    None => {
                        let no = u32::try_from(t.ns_by_no.len().map_err(|e| self.err(e))?)
                            .map_err(|_| self.corrupt("too many namespaces"))?;
                        t.ns_by_no
                            .insert(no, &ns.to_bytes())
                            .map_err(|e| self.err(e))?;
                        NsRecord {
                            no,
                            count: 0,
                            max_epoch: 0,
                        }
                    }
                };
                let cached = self.lock_states().get(&ns).cloned();
                let mut state = match cached {
                    Some(s) => s,
                    None => self.reduce_in(&t.maint, &t.author_by_no, ns, &rec)?,
                };
                let mut last_maint = last_key(self, &t.maint, rec.no)?;
                // The epochs of the facts this batch adds or removes, for the digest memo.
                let mut span: Option<(Epoch, Epoch)> = None;
                // The lowest epoch of a membership change admitted in this batch.
                let mut membership_changed: Option<Epoch> = None;
                for f in group {
                    let key = codec::fact_key(rec.no, f.epoch(), &f.id());
                    let maint = is_maintenance(f.payload());
                    if maint && t.maint.get(&key).map_err(|e| self.err(e))?.is_some() {
                        report.duplicates += 1;
                        continue;
                    }
                    if let Err(error) = state.check_admission(f) {
                        // Already stored facts are duplicates whatever admission says now.
                        if t.facts.get(&key).map_err(|e| self.err(e))?.is_some() {
                            report.duplicates += 1;
                        } else {
                            report.rejected.push(Rejected {
                                namespace: ns,
                                epoch: f.epoch(),
                                id: f.id(),
                                error,
                            });
                        }
                        continue;
                    }
                    let author = f.author();
                    let author_no = match writer
                        .authors
                        .get(&author)
                        .or_else(|| new_authors.get(&author))
                    {
                        Some(n) => *n,
                        None => {
                            let n = next_author;
                            next_author = n
                                .checked_add(1)
                                .ok_or_else(|| self.corrupt("author dictionary full"))?;
                            t.authors.insert(&author.0, n).map_err(|e| self.err(e))?;
                            t.author_by_no
                                .insert(n, &author.0)
                                .map_err(|e| self.err(e))?;
                            new_authors.insert(author, n);
                            n
                        }
                    };
                    let value = codec::value_of(f, author_no).ok_or_else(|| {
                        self.corrupt(format!("fact {} has an unexpected encoding", f.id()))
                    })?;
                    let existed = t
                        .facts
                        .insert(&key, value.as_slice())
                        .map_err(|e| self.err(e))?
                        .is_some();
                    if existed {
                        report.duplicates += 1;
                        continue;
                    }
                    report.inserted += 1;
                    span = Some(span.map_or((f.epoch(), f.epoch()), |(lo, hi)| {
                        (lo.min(f.epoch()), hi.max(f.epoch()))
                    }));
                    changes.push(self, &key)?;
                    rec.count += 1;
                    rec.max_epoch = rec.max_epoch.max(f.epoch().0);
                    if is_membership_change(f.payload()) {
                        membership_changed =
                            Some(membership_changed.map_or(f.epoch(), |e| e.min(f.epoch())));
                    }
                    if maint {
                        t.maint
                            .insert(&key, value.as_slice())
                            .map_err(|e| self.err(e))?;
                        if last_maint.is_some_and(|l| key < l) {
                            // Arrived below facts already folded: reduce again, in order.
                            state = self.reduce_in(&t.maint, &t.author_by_no, ns, &rec)?;
                        } else {
                            state.apply(f);
                            last_maint = Some(key);
                        }
                    } else {
                        state.observe_epoch(f.epoch());
                        new_data.push(f);
                    }
                }
                let group_data: Vec<&VerifiedFact> = new_data[group_start..]
                    .iter()
                    .filter(|f| tend_core::app::is_data(f.payload()))
                    .copied()
                    .collect();
                let mut app = None;
                if !group_data.is_empty() {
                    app = self.app_admit_in(&tx, ns, rec.no, &group_data)?;
                }
                if let Some(since) = membership_changed {
                    let (dropped, highest) =
                        self.drop_inadmissible(&mut t, &mut rec, &state, since)?;
                    if let Some(highest) = highest {
                        let (lo, hi) = span.unwrap_or((since, highest));
                        span = Some((lo.min(since), hi.max(highest)));
                        removed.push((ns, highest));
                    }
                    if dropped > 0 {
                        data_dropped.push(ns);
                        report.dropped += dropped;
                        state = self.reduce_in(&t.maint, &t.author_by_no, ns, &rec)?;
                        crate::app::invalidate_rows(self, &tx, rec.no)?;
                        app = None;
                    }
                }
                if let Some(app) = app {
                    app_states.push((ns, app));
                }
                t.namespaces
                    .insert(&ns.to_bytes(), &rec.to_bytes())
                    .map_err(|e| self.err(e))?;
                new_states.push((ns, state));
                if let Some(span) = span {
                    touched.push((ns, span));
                }
            }
            last_change = changes.finish(self)?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.committed(&touched, &removed);
        writer.authors.extend(new_authors);
        let mut states = self.lock_states();
        for (ns, s) in new_states {
            states.insert(ns, s);
        }
        drop(states);
        for (ns, app) in app_states {
            self.app_install(ns, app);
        }
        for ns in data_dropped {
            self.app_forget(ns);
        }
        // Still under the writer lock, so listeners hear of commits in sequence order.
        if let Some(last) = last_change {
            self.notify_changes(last);
        }
        drop(writer);
        Ok(report)
    }

    /// Deletes the maintenance and authority facts of `ns` below `below` that are not in
    /// `covered`, and reduces the state again; returns how many went.
    ///
    /// Called when a snapshot at `below` is adopted with its blob, whose facts are every
    /// maintenance and authority fact below its epoch (`covered`). A fact below the
    /// snapshot that it does not list was written or learned while this device was cut off
    /// from the signers: every other replica refuses it as `Late`, so keeping it here would
    /// leave this replica's journal and reduced state different from all the others for
    /// good (found by tend-sim, whose `settle` drops it the same way). Application facts
    /// are not touched: rule 5 re-issues the author's own, and GC prunes the rest.
    pub fn retract_uncovered_maintenance(
        &self,
        ns: JournalNamespace,
        below: Epoch,
        covered: &HashSet<FactId>,
    ) -> Result<Vec<StoredFact>, StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let dropped;
        let state;
        {
            let mut facts = tx.open_table(FACTS).map_err(|e| self.err(e))?;
            let mut maint = tx.open_table(MAINT).map_err(|e| self.err(e))?;
            let mut namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            let author_by_no = tx.open_table(AUTHOR_BY_NO).map_err(|e| self.err(e))?;
            let Some(mut rec) = self.ns_record(&namespaces, &ns)? else {
                return Ok(Vec::new());
            };
            let (start, end) = codec::epoch_range(rec.no, Epoch::ZERO, Some(below));
            let end = end.ok_or_else(|| self.corrupt("no end key below an epoch"))?;
            let mut doomed = Vec::new();
            let mut resolver = AuthorResolver::new(&author_by_no);
            for item in maint
                .range::<&FactKey>(&start..&end)
                .map_err(|e| self.err(e))?
            {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let key = *k.value();
                let (_, _, id) = codec::split_key(&key);
                if !covered.contains(&id) {
                    doomed.push((key, resolver.load(&self.path, ns, &key, v.value())?));
                }
            }
            if doomed.is_empty() {
                return Ok(Vec::new());
            }
            for (key, _) in &doomed {
                maint.remove(key).map_err(|e| self.err(e))?;
                // Pruned facts live on in the maintenance table only.
                if facts.remove(key).map_err(|e| self.err(e))?.is_some() {
                    rec.count = rec.count.saturating_sub(1);
                }
            }
            namespaces
                .insert(&ns.to_bytes(), &rec.to_bytes())
                .map_err(|e| self.err(e))?;
            state = self.reduce_in(&maint, &author_by_no, ns, &rec)?;
            dropped = doomed.into_iter().map(|(_, f)| f).collect();
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.committed(&[(ns, (Epoch::ZERO, below))], &[(ns, below)]);
        self.lock_states().insert(ns, state);
        Ok(dropped)
    }

    /// Deletes the given application facts of `ns` (maintenance facts are left alone) in one
    /// transaction; returns how many went. For a device settling a snapshot: its facts
    /// below the snapshot that the snapshot does not cover are `Late` everywhere else, and
    /// their authors re-issue them, so keeping the originals would leave this replica's
    /// state different from the others' for good.
    pub fn retract_data(
        &self,
        ns: JournalNamespace,
        keys: &[(Epoch, FactId)],
    ) -> Result<u64, StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let mut dropped = 0;
        let ns_no = {
            let namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            self.ns_record(&namespaces, &ns)?.map(|r| r.no)
        };
        if let Some(no) = ns_no.filter(|_| !keys.is_empty()) {
            let going: HashSet<(Epoch, FactId)> = keys.iter().copied().collect();
            crate::blob_refs::release_in(self, &tx, no, |e, id| going.contains(&(e, *id)), &[])?;
        }
        {
            let mut facts = tx.open_table(FACTS).map_err(|e| self.err(e))?;
            let maint = tx.open_table(MAINT).map_err(|e| self.err(e))?;
            let mut namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            let Some(mut rec) = self.ns_record(&namespaces, &ns)? else {
                return Ok(0);
            };
            for (epoch, id) in keys {
                let key = codec::fact_key(rec.no, *epoch, id);
                if maint.get(&key).map_err(|e| self.err(e))?.is_some() {
                    continue;
                }
                if facts.remove(&key).map_err(|e| self.err(e))?.is_some() {
                    dropped += 1;
                }
            }
            rec.count = rec.count.saturating_sub(dropped);
            namespaces
                .insert(&ns.to_bytes(), &rec.to_bytes())
                .map_err(|e| self.err(e))?;
            if dropped > 0 {
                crate::app::invalidate_rows(self, &tx, rec.no)?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        if dropped > 0 {
            let lowest = keys.iter().map(|k| k.0).min().unwrap_or(Epoch::ZERO);
            let highest = keys.iter().map(|k| k.0).max().unwrap_or(Epoch::ZERO);
            self.committed(&[(ns, (lowest, highest))], &[(ns, highest)]);
            self.app_forget(ns);
        }
        Ok(dropped)
    }

    /// Streams the facts of `ns` with epochs in `epochs`, in `(epoch, id)` order. Each item is
    /// checked against its id as it is read.
    pub fn scan(
        &self,
        ns: JournalNamespace,
        epochs: impl RangeBounds<Epoch>,
    ) -> Result<FactIter<'_>, StoreError> {
        self.scan_table(FACTS, ns, &epochs)
    }

    /// Streams the maintenance and authority facts of `ns` in `(epoch, id)` order, including
    /// those whose epoch is below a pruned floor (they are kept for reduction).
    pub fn scan_maintenance(&self, ns: JournalNamespace) -> Result<FactIter<'_>, StoreError> {
        self.scan_table(MAINT, ns, &(..))
    }

    fn scan_table(
        &self,
        table: TableDefinition<&'static FactKey, &'static [u8]>,
        ns: JournalNamespace,
        epochs: &impl RangeBounds<Epoch>,
    ) -> Result<FactIter<'_>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let (range, authors) = match self.ns_record(&namespaces, &ns)? {
            Some(rec) => (
                Some(open_owned_range(
                    self,
                    &self.open_ro(&rtx, table)?,
                    rec.no,
                    epochs,
                )?),
                Some(self.open_ro(&rtx, AUTHOR_BY_NO)?),
            ),
            None => (None, None),
        };
        Ok(FactIter {
            store: self,
            ns,
            range,
            authors,
            memo: HashMap::new(),
        })
    }

    /// Streams the `(epoch, id)` items of `ns` with epochs in `epochs`, in order, reading
    /// keys only (the input of Negentropy reconciliation).
    pub fn items(
        &self,
        ns: JournalNamespace,
        epochs: impl RangeBounds<Epoch>,
    ) -> Result<ItemIter<'_>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let range = match self.ns_record(&namespaces, &ns)? {
            Some(rec) => Some(open_owned_range(
                self,
                &self.open_ro(&rtx, FACTS)?,
                rec.no,
                &epochs,
            )?),
            None => None,
        };
        Ok(ItemIter { store: self, range })
    }

    /// The fact `(epoch, id)` of `ns`, if stored (including maintenance facts below a pruned
    /// floor). There is no index by id alone: callers know the epoch from the `(epoch, id)`
    /// items they reconcile over.
    pub fn get(
        &self,
        ns: JournalNamespace,
        epoch: Epoch,
        id: &FactId,
    ) -> Result<Option<StoredFact>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            return Ok(None);
        };
        let key = codec::fact_key(rec.no, epoch, id);
        let author_table = self.open_ro(&rtx, AUTHOR_BY_NO)?;
        let mut authors = AuthorResolver::new(&author_table);
        for def in [FACTS, MAINT] {
            let table = self.open_ro(&rtx, def)?;
            if let Some(v) = table.get(&key).map_err(|e| self.err(e))? {
                return authors.load(&self.path, ns, &key, v.value()).map(Some);
            }
        }
        Ok(None)
    }

    /// Whether the fact `(epoch, id)` of `ns` is stored (in the journal index or, below a
    /// pruned floor, among the kept maintenance facts).
    pub fn contains(
        &self,
        ns: JournalNamespace,
        epoch: Epoch,
        id: &FactId,
    ) -> Result<bool, StoreError> {
        self.lookup(ns)?.contains(epoch, id)
    }

    /// [`Store::contains`] for many facts of `ns` in a row (the facts of a sync batch), in
    /// one read transaction: opening one per fact cost more than the lookup. It sees the
    /// store as it was when made.
    pub fn lookup(&self, ns: JournalNamespace) -> Result<FactLookup<'_>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let tables = match self.ns_record(&namespaces, &ns)? {
            Some(rec) => Some((
                rec.no,
                self.open_ro(&rtx, FACTS)?,
                self.open_ro(&rtx, MAINT)?,
            )),
            None => None,
        };
        Ok(FactLookup {
            store: self,
            tables,
        })
    }
}

/// Membership tests of one namespace against one read transaction ([`Store::lookup`]).
pub struct FactLookup<'s> {
    store: &'s Store,
    /// The namespace's number and the fact tables; `None` if the namespace is unknown.
    #[allow(clippy::type_complexity)]
    tables: Option<(
        u32,
        ReadOnlyTable<&'static FactKey, &'static [u8]>,
        ReadOnlyTable<&'static FactKey, &'static [u8]>,
    )>,
}

impl FactLookup<'_> {
    /// Whether the fact `(epoch, id)` is stored (application or maintenance).
    pub fn contains(&self, epoch: Epoch, id: &FactId) -> Result<bool, StoreError> {
        let Some((ns_no, facts, maint)) = &self.tables else {
            return Ok(false);
        };
        let key = codec::fact_key(*ns_no, epoch, id);
        for table in [facts, maint] {
            if table.get(&key).map_err(|e| self.store.err(e))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Store {
    /// The digest of the prefix `{ f : f.epoch < upto }` of `ns` (DESIGN rule 3), over the
    /// facts in the journal index, with one ordered key scan.
    ///
    /// When a verified snapshot lies below `upto`, the digest chains on it and covers only
    /// the facts from its epoch on, which the store keeps even after pruning.
    pub fn prefix_digest(&self, ns: JournalNamespace, upto: Epoch) -> Result<Hash32, StoreError> {
        let base = self.maintenance_state(ns)?.snapshot_base(upto);
        let generation = match self.lock_digests().get(ns, upto, base) {
            Ok(digest) => return Ok(digest),
            Err(generation) => generation,
        };
        let from = base.map_or(Epoch::ZERO, |b| b.epoch);
        let mut d = DigestBuilder::chained(ns, upto, base);
        for item in self.items(ns, from..upto)? {
            let (e, id) = item?;
            d.push(e, id);
        }
        let digest = d.finish();
        self.lock_digests().keep(generation, ns, upto, base, digest);
        Ok(digest)
    }

    /// The digest of every fact of `ns` in the journal index.
    pub fn journal_digest(&self, ns: JournalNamespace) -> Result<Hash32, StoreError> {
        let mut d = DigestBuilder::whole(ns);
        for item in self.items(ns, ..)? {
            let (e, id) = item?;
            d.push(e, id);
        }
        Ok(d.finish())
    }

    /// The namespaces the store holds facts of, in order.
    pub fn namespaces(&self) -> Result<Vec<JournalNamespace>, StoreError> {
        let rtx = self.read_txn()?;
        let table = self.open_ro(&rtx, NAMESPACES)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let ns = JournalNamespace::from_bytes(k.value())
                .ok_or_else(|| self.corrupt("malformed namespace record"))?;
            out.push(ns);
        }
        Ok(out)
    }

    /// How many facts of `ns` the journal index holds below `upto`, read in one
    /// transaction as the namespace's count less the facts from `upto` on: after a
    /// snapshot at `upto` those are the few written since, where counting the ones below
    /// would walk the whole journal.
    pub(crate) fn count_below(&self, ns: JournalNamespace, upto: Epoch) -> Result<u64, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            return Ok(0);
        };
        let facts = self.open_ro(&rtx, FACTS)?;
        let mut from_upto = 0u64;
        for item in open_range(self, &facts, rec.no, &(upto..))? {
            item.map_err(|e| self.err(e))?;
            from_upto += 1;
        }
        Ok(rec.count.saturating_sub(from_upto))
    }

    /// Figures for one namespace (`None` if the store has never seen it).
    pub fn stats(&self, ns: JournalNamespace) -> Result<Option<NamespaceStats>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            return Ok(None);
        };
        let facts = self.open_ro(&rtx, FACTS)?;
        let mut range = open_range(self, &facts, rec.no, &(..))?;
        let epoch_of =
            |item: Option<Result<_, redb::StorageError>>| -> Result<Option<Epoch>, StoreError> {
                match item {
                    None => Ok(None),
                    Some(Ok((k, _))) => {
                        let k: redb::AccessGuard<'_, &FactKey> = k;
                        Ok(Some(codec::split_key(k.value()).1))
                    }
                    Some(Err(e)) => Err(self.err(e)),
                }
            };
        let min_epoch = epoch_of(range.next())?;
        let max_epoch = epoch_of(range.next_back())?.or(min_epoch);
        let maint = self.open_ro(&rtx, MAINT)?;
        let mut maintenance_facts = 0;
        for item in open_range(self, &maint, rec.no, &(..))? {
            item.map_err(|e| self.err(e))?;
            maintenance_facts += 1;
        }
        Ok(Some(NamespaceStats {
            namespace: ns,
            facts: rec.count,
            maintenance_facts,
            min_epoch,
            max_epoch,
            max_epoch_seen: Epoch(rec.max_epoch),
        }))
    }
}

/// The tables a write transaction works on.
pub(crate) struct WriteTables<'txn> {
    pub facts: Table<'txn, &'static FactKey, &'static [u8]>,
    pub maint: Table<'txn, &'static FactKey, &'static [u8]>,
    pub namespaces: Table<'txn, &'static [u8; 33], &'static [u8; NS_RECORD_LEN]>,
    pub ns_by_no: Table<'txn, u32, &'static [u8; 33]>,
    pub authors: Table<'txn, &'static [u8; 32], u32>,
    pub author_by_no: Table<'txn, u32, &'static [u8; 32]>,
}

/// The greatest key of namespace `ns_no` in `table`.
fn last_key(
    store: &Store,
    table: &impl ReadableTable<&'static FactKey, &'static [u8]>,
    ns_no: u32,
) -> Result<Option<FactKey>, StoreError> {
    let mut range = open_range(store, table, ns_no, &(..))?;
    match range.next_back() {
        None => Ok(None),
        Some(Ok((k, _))) => Ok(Some(*k.value())),
        Some(Err(e)) => Err(store.err(e)),
    }
}
