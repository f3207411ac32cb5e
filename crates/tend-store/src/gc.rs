//! Garbage collection (DESIGN rule 4): pruning facts below the latest verified snapshot and
//! tombstoned blobs, and compacting the file.

use std::sync::TryLockError;

use redb::{ReadableTable, ReadableTableMetadata};
use tend_core::{Epoch, JournalNamespace};

use crate::codec::{self, FactKey};
use crate::error::StoreError;
use crate::store::{Store, BLOB_INDEX, FACTS, NAMESPACES};

/// What [`Store::prune`] removed (or, for a dry run, would remove).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneReport {
    pub namespace: JournalNamespace,
    /// Facts with `epoch < floor` go: the epoch of the latest verified snapshot.
    pub floor: Epoch,
    pub facts: u64,
    /// Stored bytes of those facts (keys and values, before page overhead).
    pub fact_bytes: u64,
    /// Application facts below the floor that stay because the state still needs them
    /// (current values and their conflicts, untrimmed log entries, valid cache entries).
    pub live_kept: u64,
    /// Of `facts`, the maintenance and authority facts (they leave the index but stay in
    /// the maintenance table); the rest are application facts the state no longer needs
    /// (superseded, deleted, trimmed, invalidated).
    pub maintenance: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Whether nothing was actually deleted.
    pub dry_run: bool,
}

/// File sizes around [`Store::compact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactReport {
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Store {
    /// Deletes the facts of `ns` below the latest verified snapshot's epoch, the blobs whose
    /// tombstone precedes it and the item blobs every member has settled past. Maintenance and authority facts stay in the maintenance table, so
    /// [`Store::maintenance_state`] is the same before and after. Fails with
    /// [`StoreError::NoSnapshot`] if `ns` has no verified `SnapshotCompleted`. The freed pages
    /// are reused by later writes; [`Store::compact`] returns them to the file system.
    pub fn prune(&self, ns: JournalNamespace) -> Result<PruneReport, StoreError> {
        self.prune_inner(ns, false)
    }

    /// What [`Store::prune`] would remove, without removing anything.
    pub fn prune_dry_run(&self, ns: JournalNamespace) -> Result<PruneReport, StoreError> {
        self.prune_inner(ns, true)
    }

    fn prune_inner(&self, ns: JournalNamespace, dry_run: bool) -> Result<PruneReport, StoreError> {
        let _writer = self.lock_writer();
        let state = self.maintenance_state(ns)?;
        let floor = state.gc_floor().ok_or_else(|| StoreError::NoSnapshot {
            path: self.path.clone(),
            namespace: ns,
        })?;
        // What the state needs below the floor stays (DESIGN rule 4: the reduced state,
        // application state included, is the same before and after).
        let app = self.app_state_locked(ns, &_writer)?;
        let below = self.live_below_or_all(ns, &app, floor)?;
        let kept_blobs = self.value_blobs_of(ns, &app)?;
        let mut report = PruneReport {
            namespace: ns,
            floor,
            facts: 0,
            fact_bytes: 0,
            live_kept: 0,
            maintenance: 0,
            blobs: 0,
            blob_bytes: 0,
            dry_run,
        };
        // Tombstoned blobs below the snapshot, and the item blobs of snapshots every member
        // has settled (docs/ARCHITECTURE.md section 4a: no member needs them any more, and
        // the settled facts are the same on every device, so waiting for a later snapshot
        // to cover a tombstone would only keep a list of all history for a period longer).
        let latest_blob = state.latest_snapshot.as_ref().map(|l| l.snapshot.blob_cid);
        let mut reclaimable = state.prunable_blobs();
        for cid in state.reclaimable_item_blobs() {
            if !reclaimable.contains(&cid) && Some(cid) != latest_blob {
                reclaimable.push(cid);
            }
        }
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        // With every application fact below the floor live, only maintenance facts leave
        // the index, and the maintenance table keeps them: no blob kept by reference
        // loses one.
        if !dry_run && matches!(below.live, Live::Set(_)) {
            // A blob kept by reference that names a fact about to go is turned back into
            // bytes first (unless it goes too).
            let ns_no = {
                let namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
                self.ns_record(&namespaces, &ns)?.map(|r| r.no)
            };
            if let Some(no) = ns_no {
                let going: Vec<_> = reclaimable
                    .iter()
                    .filter(|cid| !kept_blobs.contains_key(cid))
                    .copied()
                    .collect();
                crate::blob_refs::release_in(
                    self,
                    &tx,
                    no,
                    |epoch, id| epoch < floor && !below.keeps(&(epoch, *id)),
                    &going,
                )?;
            }
        }
        {
            let mut namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            let mut facts = tx.open_table(FACTS).map_err(|e| self.err(e))?;
            let rec = self.ns_record(&namespaces, &ns)?;
            if let (Some(mut rec), Live::All { kept }) = (rec, &below.live) {
                // Only maintenance facts go, and they are few: no walk of the million
                // facts kept. Their entries in the changes feed stay (readers skip an
                // entry whose fact is gone) until a pruning that walks the feed.
                report.live_kept = *kept;
                for (epoch, id) in &below.maintenance {
                    let key = codec::fact_key(rec.no, *epoch, id);
                    let len = if dry_run {
                        facts
                            .get(&key)
                            .map_err(|e| self.err(e))?
                            .map(|v| v.value().len())
                    } else {
                        facts
                            .remove(&key)
                            .map_err(|e| self.err(e))?
                            .map(|v| v.value().len())
                    };
                    if let Some(len) = len {
                        report.facts += 1;
                        report.maintenance += 1;
                        report.fact_bytes += (codec::KEY_LEN + len) as u64;
                    }
                }
                if !dry_run && report.facts > 0 {
                    rec.count = rec.count.saturating_sub(report.facts);
                    namespaces
                        .insert(&ns.to_bytes(), &rec.to_bytes())
                        .map_err(|e| self.err(e))?;
                }
            } else if let Some(mut rec) = rec {
                let start = codec::epoch_start(rec.no, Epoch::ZERO);
                let end = codec::epoch_start(rec.no, floor);
                for item in facts
                    .range::<&FactKey>(&start..&end)
                    .map_err(|e| self.err(e))?
                {
                    let (k, v) = item.map_err(|e| self.err(e))?;
                    let (_, epoch, id) = codec::split_key(k.value());
                    if below.keeps(&(epoch, id)) {
                        report.live_kept += 1;
                        continue;
                    }
                    report.facts += 1;
                    report.fact_bytes += (codec::KEY_LEN + v.value().len()) as u64;
                }
                // Counted under the same writer lock: still exactly these.
                report.maintenance = below.maintenance.len() as u64;
                if !dry_run && report.facts > 0 {
                    facts
                        .retain_in::<&FactKey, _>(&start..&end, |k, _| {
                            let (_, epoch, id) = codec::split_key(k);
                            below.keeps(&(epoch, id))
                        })
                        .map_err(|e| self.err(e))?;
                    rec.count = rec.count.saturating_sub(report.facts);
                    namespaces
                        .insert(&ns.to_bytes(), &rec.to_bytes())
                        .map_err(|e| self.err(e))?;
                    // Pruning drops no untrimmed entry (they are live), but it may drop a
                    // trim, and a fold without it keeps entries above the floor that the
                    // rows no longer hold: then they are built again.
                    if app.logs_trimmed() {
                        crate::app::invalidate_rows(self, &tx, rec.no)?;
                    }
                    // The feed's entries of the pruned facts go too, so it stays bounded
                    // like the journal: a reader resuming from an older cursor misses
                    // nothing live (what it skips was superseded below the snapshot).
                    let mut changes = tx
                        .open_table(crate::changes::CHANGES)
                        .map_err(|e| self.err(e))?;
                    changes
                        .retain(|_, k| {
                            let (no, epoch, id) = codec::split_key(k);
                            no != rec.no || epoch >= floor || below.keeps(&(epoch, id))
                        })
                        .map_err(|e| self.err(e))?;
                }
            }
            let _ = facts.len();
        }
        for cid in reclaimable {
            if kept_blobs.contains_key(&cid) {
                // Tombstoned by one write, still the value of another key.
                continue;
            }
            let key = cid.to_bytes();
            let len = if dry_run {
                let index = tx.open_table(BLOB_INDEX).map_err(|e| self.err(e))?;
                let len = index
                    .get(key.as_slice())
                    .map_err(|e| self.err(e))?
                    .map(|g| g.value().0);
                len
            } else {
                // The index entry and every chunk go in this transaction.
                crate::blobs::remove_blob_in(self, &tx, &key)?
            };
            if let Some(len) = len {
                report.blobs += 1;
                report.blob_bytes += len;
            }
        }
        if dry_run {
            tx.abort().map_err(|e| self.err(e))?;
        } else {
            tx.commit().map_err(|e| self.err(e))?;
            let highest = Epoch(floor.0.saturating_sub(1));
            self.committed(&[(ns, (Epoch::ZERO, highest))], &[(ns, highest)]);
            // The cached state is still right, but holds what the pruned application facts
            // superseded (maintenance facts are not in it).
            if report.facts > report.maintenance {
                self.app_forget(ns);
            }
        }
        Ok(report)
    }

    /// What stays below `floor`: the live set ([`Store::live_below`]), or [`Live::All`]
    /// when every application fact stored below it is live, told by counting: then only
    /// maintenance facts leave the index (the first GC after a snapshot of live records, a
    /// device that has just hydrated, GC run again), and a million live keys are not
    /// listed for nothing.
    fn live_below_or_all(
        &self,
        ns: JournalNamespace,
        app: &tend_core::AppState,
        floor: Epoch,
    ) -> Result<Below, StoreError> {
        // A fact below the floor that is live in the whole journal's state is live in the
        // prefix's too (the prefix has fewer writes to supersede or trim it, and lower
        // cache floors), and the prefix's live facts are stored facts below the floor: if
        // the first are as many as the last, all three are the same.
        let floors = self.prefix_maintenance_state(ns, floor)?.cache_floors;
        let live = self.app_live_len_below(ns, app, &floors, floor)?;
        // Not by walking the million facts below the floor (`Store::count_below`): that
        // walk was a third of a device's CPU in the second after a 1M completion. A wrong
        // count only picks the slower `Live::Set`, or keeps dead facts until the next GC;
        // it never prunes a live one.
        let stored = usize::try_from(self.count_below(ns, floor)?).unwrap_or(usize::MAX);
        let maintenance = self.maintenance_in_index(ns, floor)?;
        let live = if stored == live + maintenance.len() {
            Live::All { kept: live as u64 }
        } else {
            Live::Set(self.live_below_under(ns, floor, &floors)?)
        };
        Ok(Below { live, maintenance })
    }

    /// The maintenance facts below `floor` still in the journal index: pruning takes them
    /// out of it (the maintenance table keeps them).
    fn maintenance_in_index(
        &self,
        ns: JournalNamespace,
        floor: Epoch,
    ) -> Result<std::collections::BTreeSet<(Epoch, tend_core::FactId)>, StoreError> {
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let mut going = std::collections::BTreeSet::new();
        let Some(rec) = self.ns_record(&namespaces, &ns)? else {
            return Ok(going);
        };
        let facts = self.open_ro(&rtx, FACTS)?;
        let maint = self.open_ro(&rtx, crate::store::MAINT)?;
        let start = codec::epoch_start(rec.no, Epoch::ZERO);
        let end = codec::epoch_start(rec.no, floor);
        for item in maint
            .range::<&FactKey>(&start..&end)
            .map_err(|e| self.err(e))?
        {
            let (k, _) = item.map_err(|e| self.err(e))?;
            if facts.get(k.value()).map_err(|e| self.err(e))?.is_some() {
                let (_, epoch, id) = codec::split_key(k.value());
                going.insert((epoch, id));
            }
        }
        Ok(going)
    }

    /// Compacts the file, returning freed space to the file system. It needs the store to
    /// itself: while any transaction or iterator of this store is alive (a running device's
    /// sync session may hold one for a moment) it changes nothing and returns
    /// [`StoreError::Busy`], so try again later. No transaction begins while it runs.
    pub fn compact(&self) -> Result<CompactReport, StoreError> {
        let bytes_before = self.file_size()?;
        // Never wait for the lock: a thread holding it to begin a transaction may itself be
        // waiting for a write transaction whose owner needs the lock again.
        let mut db = match self.db.try_write() {
            Ok(db) => db,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(self.busy()),
        };
        loop {
            match db.compact() {
                Ok(true) => {}
                Ok(false) => break,
                Err(redb::CompactionError::TransactionInProgress) => return Err(self.busy()),
                Err(e) => return Err(self.err(e)),
            }
        }
        drop(db);
        Ok(CompactReport {
            bytes_before,
            bytes_after: self.file_size()?,
        })
    }

    fn busy(&self) -> StoreError {
        StoreError::Busy {
            path: self.path.clone(),
        }
    }
}

/// The facts below the floor that GC keeps.
enum Live {
    /// Every stored one (`kept` of them) but the maintenance facts.
    All { kept: u64 },
    /// These.
    Set(std::collections::BTreeSet<(Epoch, tend_core::FactId)>),
}

/// Below the floor: what stays, and the maintenance facts still in the index, which go
/// (the maintenance table keeps them).
struct Below {
    live: Live,
    maintenance: std::collections::BTreeSet<(Epoch, tend_core::FactId)>,
}

impl Below {
    /// Whether GC keeps the fact at `key` in the index.
    fn keeps(&self, key: &(Epoch, tend_core::FactId)) -> bool {
        match &self.live {
            Live::All { .. } => !self.maintenance.contains(key),
            Live::Set(set) => set.contains(key),
        }
    }
}
