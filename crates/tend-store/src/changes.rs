//! The changes feed: every fact the store admitted, in admission order, under a cursor that
//! survives restarts.
//!
//! The `changes` table maps a sequence number (u64, from 1, no gaps) to the fact's index key
//! (namespace number, epoch, fact id). [`Store::insert_batch`] appends one entry per fact
//! it admits, in the same write transaction, in the order it admits them (within a batch:
//! an authority genesis first, then `(epoch, id)` order), so a cursor means "everything the
//! device admitted up to here" and a reader resuming after it misses nothing and sees
//! nothing twice.
//!
//! Entries are never rewritten. Pruning removes the entries of the facts it prunes (so the
//! feed is bounded like the journal); retraction and dropped inadmissible facts leave
//! theirs: a reader looks the fact up and skips an entry whose fact is gone
//! ([`Store::changes_since`] reports such entries; [`Store::get`] answers `None` for them).
//!
//! Listeners registered with [`Store::on_change`] are called after every commit that
//! appended entries, with the last sequence number, so a running device can wake its
//! subscribers without polling.

use std::collections::HashMap;
use std::sync::Arc;

use redb::{ReadableTable, Table, TableDefinition};
use tend_core::{Epoch, FactId, JournalNamespace};

use crate::codec::{self, FactKey};
use crate::error::StoreError;
use crate::store::{Store, FACTS, MAINT, META, NS_BY_NO};

/// Sequence number -> the admitted fact's index key.
pub(crate) const CHANGES: TableDefinition<u64, &FactKey> = TableDefinition::new("changes");

/// A callback told the last sequence number after a commit that appended changes.
pub(crate) type ChangeListener = Arc<dyn Fn(u64) + Send + Sync>;

/// One entry of the changes feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The cursor of this entry: the sequence number, from 1.
    pub seq: u64,
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub id: FactId,
}

/// The `meta` key of the feed's high-water mark: the greatest sequence number ever given.
/// Pruning may remove the newest entries, and their numbers must never be given again (a
/// client that saw one would skip the fact that reused it).
const LAST_SEQ: &str = "changes_last";

/// Commits that removed facts since the store was opened ([`Store::removals`]).
#[derive(Default)]
pub(crate) struct Removals {
    commits: u64,
    highest: HashMap<JournalNamespace, Epoch>,
}

/// Appends entries to the changes table inside a write transaction.
pub(crate) struct ChangeWriter<'txn> {
    table: Table<'txn, u64, &'static FactKey>,
    meta: Table<'txn, &'static str, &'static [u8]>,
    next: u64,
    appended: bool,
}

impl<'txn> ChangeWriter<'txn> {
    pub(crate) fn open(
        store: &Store,
        tx: &'txn redb::WriteTransaction,
    ) -> Result<Self, StoreError> {
        let table = tx.open_table(CHANGES).map_err(|e| store.err(e))?;
        let meta = tx.open_table(META).map_err(|e| store.err(e))?;
        let last = high_water(store, &table, &meta)?;
        let next = last
            .checked_add(1)
            .ok_or_else(|| store.corrupt("the changes feed is full"))?;
        Ok(Self {
            table,
            meta,
            next,
            appended: false,
        })
    }

    pub(crate) fn push(&mut self, store: &Store, key: &FactKey) -> Result<(), StoreError> {
        self.table
            .insert(self.next, key)
            .map_err(|e| store.err(e))?;
        self.next += 1;
        self.appended = true;
        Ok(())
    }

    /// Records the high-water mark; returns the last sequence number written, if any.
    pub(crate) fn finish(mut self, store: &Store) -> Result<Option<u64>, StoreError> {
        if !self.appended {
            return Ok(None);
        }
        let last = self.next - 1;
        self.meta
            .insert(LAST_SEQ, last.to_be_bytes().as_slice())
            .map_err(|e| store.err(e))?;
        Ok(Some(last))
    }
}

/// The greatest sequence number ever given: the recorded mark or the newest entry.
fn high_water(
    store: &Store,
    table: &impl ReadableTable<u64, &'static FactKey>,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    let newest = table
        .last()
        .map_err(|e| store.err(e))?
        .map_or(0, |(k, _)| k.value());
    let recorded = match meta.get(LAST_SEQ).map_err(|e| store.err(e))? {
        None => 0,
        Some(v) => <[u8; 8]>::try_from(v.value())
            .map(u64::from_be_bytes)
            .map_err(|_| store.corrupt("the changes feed's mark is malformed"))?,
    };
    Ok(newest.max(recorded))
}

impl Store {
    /// Up to `limit` entries of the changes feed after cursor `after` (0: from the start),
    /// in admission order. An entry's fact may since have been pruned or retracted: readers
    /// skip entries whose fact [`Store::get`] no longer finds.
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let rtx = self.read_txn()?;
        let changes = self.open_ro(&rtx, CHANGES)?;
        let ns_by_no = self.open_ro(&rtx, NS_BY_NO)?;
        let mut namespaces: HashMap<u32, JournalNamespace> = HashMap::new();
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1) else {
            return Ok(out);
        };
        for item in changes.range(start..).map_err(|e| self.err(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (no, epoch, id) = codec::split_key(v.value());
            let namespace = match namespaces.get(&no) {
                Some(ns) => *ns,
                None => {
                    let bytes = ns_by_no.get(no).map_err(|e| self.err(e))?.ok_or_else(|| {
                        self.corrupt(format!("the changes feed names namespace number {no}"))
                    })?;
                    let ns = JournalNamespace::from_bytes(bytes.value())
                        .ok_or_else(|| self.corrupt("malformed namespace record"))?;
                    namespaces.insert(no, ns);
                    ns
                }
            };
            out.push(Change {
                seq: k.value(),
                namespace,
                epoch,
                id,
            });
        }
        Ok(out)
    }

    /// The greatest cursor the changes feed has given (0 when none): the newest entry's,
    /// or a greater one whose entry pruning removed. Never decreases.
    pub fn last_change(&self) -> Result<u64, StoreError> {
        let rtx = self.read_txn()?;
        let changes = self.open_ro(&rtx, CHANGES)?;
        let meta = self.open_ro(&rtx, META)?;
        high_water(self, &changes, &meta)
    }

    /// How many commits have removed facts since the store was opened, and the highest
    /// epoch of `ns` any of them removed. Removals leave no entry in the changes feed, so
    /// a reader that keeps the items it read at count `n` and follows the feed from there
    /// knows its items from epoch `e` on are still all held when the count is still `n`,
    /// or when the highest epoch removed is below `e` (pruning and settling remove only
    /// below the latest snapshot).
    pub fn removals(&self, ns: JournalNamespace) -> (u64, Option<Epoch>) {
        let removals = self.lock_removals();
        (removals.commits, removals.highest.get(&ns).copied())
    }

    /// Records a commit that removed facts of `ns`, up to epoch `highest` (through
    /// [`Store::committed`]).
    pub(crate) fn record_removal(&self, ns: JournalNamespace, highest: Epoch) {
        let mut removals = self.lock_removals();
        removals.commits += 1;
        let h = removals.highest.entry(ns).or_insert(highest);
        *h = (*h).max(highest);
    }

    /// Registers a callback told the last sequence number after every commit that appended
    /// changes. It runs on the writing thread while the store's writer lock is held (so
    /// calls come in sequence order): it must be quick and must not write to the store.
    pub fn on_change(&self, listener: impl Fn(u64) + Send + Sync + 'static) {
        self.change_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(listener));
    }

    pub(crate) fn notify_changes(&self, last: u64) {
        let listeners = self
            .change_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for l in listeners {
            l(last);
        }
    }

    /// Format 2 -> 3: creates the changes feed and fills it with every fact the store holds
    /// (the journal index and the maintenance facts kept below a pruned floor), in index
    /// order, since their admission order is not known; records format 3. One transaction:
    /// a crash leaves format 2, migrated again on the next open.
    pub(crate) fn migrate_v2(&self) -> Result<(), StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        // A format 2 store has no changes table, unless a test or a tool put one there.
        tx.delete_table(CHANGES).map_err(|e| self.err(e))?;
        tx.open_table(META)
            .map_err(|e| self.err(e))?
            .remove(LAST_SEQ)
            .map_err(|e| self.err(e))?;
        {
            let facts = tx.open_table(FACTS).map_err(|e| self.err(e))?;
            let maint = tx.open_table(MAINT).map_err(|e| self.err(e))?;
            let mut writer = ChangeWriter::open(self, &tx)?;
            let mut a = facts.iter().map_err(|e| self.err(e))?;
            let mut b = maint.iter().map_err(|e| self.err(e))?;
            let mut next_a = self.next_key(&mut a)?;
            let mut next_b = self.next_key(&mut b)?;
            loop {
                let key = match (next_a, next_b) {
                    (None, None) => break,
                    (Some(x), Some(y)) if x == y => {
                        next_a = self.next_key(&mut a)?;
                        next_b = self.next_key(&mut b)?;
                        x
                    }
                    (Some(x), Some(y)) if x < y => {
                        next_a = self.next_key(&mut a)?;
                        x
                    }
                    (Some(x), None) => {
                        next_a = self.next_key(&mut a)?;
                        x
                    }
                    (_, Some(y)) => {
                        next_b = self.next_key(&mut b)?;
                        y
                    }
                };
                writer.push(self, &key)?;
            }
            writer.finish(self)?;
        }
        tx.open_table(META)
            .map_err(|e| self.err(e))?
            .insert("format_version", 3u32.to_be_bytes().as_slice())
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }
}

impl Store {
    fn next_key(
        &self,
        it: &mut redb::Range<'_, &'static FactKey, &'static [u8]>,
    ) -> Result<Option<FactKey>, StoreError> {
        match it.next() {
            None => Ok(None),
            Some(Ok((k, _))) => Ok(Some(*k.value())),
            Some(Err(e)) => Err(self.err(e)),
        }
    }
}
