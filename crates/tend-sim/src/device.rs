//! One simulated device's store: a durable journal, a write buffer a crash discards, the
//! reduced state and the snapshot blobs, under the same rules the running node applies
//! (`tend_replica`: admission, adopting and settling a snapshot, re-issue), plus the
//! store's own duties the simulator models (dropping facts a late membership change makes
//! inadmissible, GC).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tend_core::journal::{journal_digest, DigestBuilder};
use tend_core::{
    reduce, AppState, AuthorityFact, ContentId, DeviceId, Epoch, FactFormat, FactId, Hash32,
    JournalError, JournalNamespace, MaintenanceState, Payload, ProtocolVersion, UnsignedFact,
    VerifiedFact,
};
use tend_replica::{Admission, Adopted, BlobAt, Replica, Rules};
use tend_snapshot::{BuiltBlob, SignerKey, SnapshotBlob};
use tend_sync::{FenceStatus, MemItems, SharedItems, SyncItem};

/// The order key of a fact: `(epoch, id)`.
pub type Key = (Epoch, FactId);

/// Whether a fact can change the maintenance state (kept by pruning).
pub fn is_state_fact(f: &VerifiedFact) -> bool {
    matches!(f.payload(), Payload::Maintenance(_) | Payload::Authority(_))
}

/// What survives a crash.
#[derive(Clone, Debug)]
pub struct Durable {
    /// Facts written through (fsynced).
    pub facts: BTreeMap<Key, VerifiedFact>,
    /// Snapshot blobs by CID.
    pub blobs: BTreeMap<ContentId, Vec<u8>>,
    /// Signing keys per identity epoch (key files).
    pub keys: BTreeMap<u64, SignerKey>,
    /// The release this device runs.
    pub version: ProtocolVersion,
    /// The snapshot epoch this device has settled (covered set computed, pruned).
    pub settled: Epoch,
    /// The items of the settled snapshot's prefix (what it covers).
    pub covered: BTreeSet<Key>,
    /// The digest this device signed for each target epoch (its "vote").
    pub signed: BTreeMap<Epoch, Hash32>,
    /// What its upgrade pipeline recorded per package (the node keeps it in settings).
    pub upgrade_outcomes: BTreeMap<Hash32, tend_replica::upgrade::LocalStatus>,
    /// Own facts settling could not tell covered or uncovered (`Settlement::set_aside`).
    pub set_aside: Vec<VerifiedFact>,
}

/// What settling a snapshot did, for the invariants.
#[derive(Clone, Debug, Default)]
pub struct Settled {
    pub epoch: Epoch,
    /// Facts dropped because they are below E and not covered (rule 5).
    pub quarantined: Vec<Key>,
    /// Covered facts pruned (non-archive devices).
    pub pruned: Vec<Key>,
    /// Facts re-issued by this device.
    pub reissued: Vec<VerifiedFact>,
    /// Covered application facts dropped because they are live in the device's own
    /// prefix but not in the snapshot's (the device lacked what supersedes them).
    pub stale: Vec<Key>,
    /// Whether pruning changed the application state the device reads (a violation).
    pub changed_app_state: bool,
    /// The completion fact the prune relied on.
    pub completion: Option<FactId>,
}

/// The journal side of a device: the [`FactHost`] sessions admit through.
pub struct Core {
    pub me: DeviceId,
    pub key: SigningKey,
    pub namespace: JournalNamespace,
    pub archive: bool,
    pub durable: Durable,
    /// Facts admitted but not yet durable: a crash discards them.
    pub buffer: BTreeMap<Key, VerifiedFact>,
    /// The reduced state of durable + buffer.
    pub state: MaintenanceState,
    /// Set while the device's fence is not satisfied: no session may admit facts then.
    pub fence_blocked: bool,
    /// Facts admitted through a session while `fence_blocked` (an invariant violation).
    pub crossed_fence: Vec<FactId>,
    /// Whether learning a membership change drops facts it makes inadmissible (the fix
    /// for seed 33; off reproduces the divergence).
    pub revalidate_on_change: bool,
    /// Facts dropped because a membership change learned later made them inadmissible.
    pub invalidated: Vec<VerifiedFact>,
    /// Whether pruning keeps the application facts live in the prefix (the GC rule of
    /// blob format 2; off prunes every application fact below the snapshot, the bug the
    /// application-state invariant must catch).
    pub gc_keeps_live: bool,
    /// Whether settling drops the application facts below the snapshot that are live in
    /// the device's own prefix but not in the snapshot's (the fix for seed 111; off, a
    /// device that settled without some covered facts reads stale values forever).
    pub drop_stale: bool,
    /// Facts that became durable since the simulator last looked (for the oracle).
    pub newly_durable: Vec<VerifiedFact>,
    /// Fact id -> epoch, over durable + buffer.
    index: HashMap<FactId, Epoch>,
}

impl Core {
    /// How many facts the device holds (durable and buffered).
    pub fn held(&self) -> usize {
        self.index.len()
    }

    /// A device holding `genesis` durably.
    pub fn new(key: SigningKey, genesis: &VerifiedFact, archive: bool) -> Self {
        let me = DeviceId(key.verifying_key().to_bytes());
        let namespace = genesis.namespace();
        let mut durable = Durable {
            facts: BTreeMap::new(),
            blobs: BTreeMap::new(),
            keys: BTreeMap::new(),
            version: ProtocolVersion::CURRENT,
            settled: Epoch::ZERO,
            covered: BTreeSet::new(),
            signed: BTreeMap::new(),
            upgrade_outcomes: BTreeMap::new(),
            set_aside: Vec::new(),
        };
        durable.facts.insert(genesis.order_key(), genesis.clone());
        let mut c = Self {
            me,
            key,
            namespace,
            archive,
            durable,
            buffer: BTreeMap::new(),
            state: MaintenanceState::new(namespace),
            fence_blocked: false,
            crossed_fence: Vec::new(),
            revalidate_on_change: true,
            invalidated: Vec::new(),
            gc_keeps_live: true,
            drop_stale: true,
            newly_durable: vec![genesis.clone()],
            index: HashMap::new(),
        };
        c.rebuild();
        c
    }

    /// Recomputes the index and the reduced state from durable + buffer.
    pub fn rebuild(&mut self) {
        self.index = self
            .durable
            .facts
            .keys()
            .chain(self.buffer.keys())
            .map(|(e, id)| (*id, *e))
            .collect();
        self.state = reduce(self.namespace, self.all().map(|(_, f)| f));
    }

    /// Every fact held, durable or buffered, in `(epoch, id)` order.
    pub fn all(&self) -> impl Iterator<Item = (&Key, &VerifiedFact)> {
        // Both maps are ordered; a merged walk keeps the order without allocating.
        let mut a = self.durable.facts.iter().peekable();
        let mut b = self.buffer.iter().peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        })
    }

    /// The application state of every fact held (durable or buffered): what the device
    /// reads, and the heads a new write of a key supersedes.
    pub fn app_state(&self) -> AppState {
        AppState::of(self.all().map(|(_, f)| f))
    }

    /// Whether the device holds the fact (durable or buffered).
    pub fn holds(&self, k: &Key) -> bool {
        self.durable.facts.contains_key(k) || self.buffer.contains_key(k)
    }

    /// The effective items: held facts plus what the settled snapshot covers (a pruned
    /// device still accounts for the covered prefix).
    pub fn effective_items(&self, durable_only: bool) -> BTreeSet<Key> {
        let mut s: BTreeSet<Key> = self.durable.covered.clone();
        s.extend(self.durable.facts.keys().copied());
        if !durable_only {
            s.extend(self.buffer.keys().copied());
        }
        s
    }

    /// Digest of the effective items: equal digests mean equal journals modulo pruning.
    pub fn effective_digest(&self) -> Hash32 {
        journal_digest(self.namespace, self.effective_items(false))
    }

    /// Negentropy items for a session: durable only, so a device never offers a fact a
    /// crash could make it forget.
    pub fn session_items(&self) -> SharedItems {
        let items = self
            .effective_items(true)
            .into_iter()
            .map(|(epoch, id)| SyncItem { epoch, id });
        Arc::new(MemItems::new(self.namespace, items))
    }

    /// Moves the write buffer to durable storage; returns the facts made durable.
    pub fn flush(&mut self) -> Vec<VerifiedFact> {
        let buf = std::mem::take(&mut self.buffer);
        let mut out = Vec::with_capacity(buf.len());
        for (k, f) in buf {
            out.push(f.clone());
            self.durable.facts.insert(k, f);
        }
        self.newly_durable.extend(out.iter().cloned());
        out
    }

    /// A crash: the buffer is gone; the state is recomputed from durable storage.
    pub fn crash(&mut self) {
        self.buffer.clear();
        self.rebuild();
        if self.revalidate_on_change {
            let dropped = self.revalidate();
            self.invalidated.extend(dropped);
        }
    }

    /// The fence status at the device's local epoch and release.
    pub fn fence(&self) -> FenceStatus {
        FenceStatus::from_state(
            &self.state,
            self.state.current_epoch(),
            self.durable.version,
        )
    }

    /// Signs and buffers a fact this device authors, at its current epoch.
    pub fn write(&mut self, payload: Payload) -> VerifiedFact {
        self.write_unsigned(UnsignedFact {
            namespace: self.namespace,
            epoch: self.state.current_epoch(),
            payload,
        })
    }

    /// [`Core::write`] in `format`.
    pub fn write_in(&mut self, payload: Payload, format: FactFormat) -> VerifiedFact {
        let f = UnsignedFact {
            namespace: self.namespace,
            epoch: self.state.current_epoch(),
            payload,
        }
        .sign_with(&self.key, format);
        self.insert_buffered(f.clone());
        f
    }

    /// Stores a fact durably at once, bypassing admission (a DKG result delivered with
    /// the key share).
    pub fn install_durable(&mut self, f: VerifiedFact) {
        if self.holds(&f.order_key()) {
            return;
        }
        self.newly_durable.push(f.clone());
        self.durable.facts.insert(f.order_key(), f);
        self.rebuild();
        if self.revalidate_on_change {
            let dropped = self.revalidate();
            self.invalidated.extend(dropped);
        }
    }

    /// Signs and buffers a fact at a given epoch (package facts go strictly above their
    /// package's publication).
    pub fn write_at(&mut self, epoch: Epoch, payload: Payload) -> VerifiedFact {
        self.write_unsigned(UnsignedFact {
            namespace: self.namespace,
            epoch,
            payload,
        })
    }

    /// Signs and buffers a fact made elsewhere (the snapshot engine).
    pub fn write_unsigned(&mut self, f: UnsignedFact) -> VerifiedFact {
        let f = f.sign(&self.key);
        self.insert_buffered(f.clone());
        f
    }

    fn insert_buffered(&mut self, f: VerifiedFact) {
        let state_fact = is_state_fact(&f);
        let epoch = f.epoch();
        self.index.insert(f.id(), epoch);
        self.buffer.insert(f.order_key(), f);
        if state_fact {
            let before = std::mem::take(&mut self.state.memberships);
            self.state = reduce(self.namespace, self.all().map(|(_, f)| f));
            if self.state.memberships != before && self.revalidate_on_change {
                let dropped = self.revalidate();
                self.invalidated.extend(dropped);
            }
        } else {
            self.state.observe_epoch(epoch);
        }
    }

    /// Keeps the journal equal to what its own state admits: a membership change learned
    /// late (at a lower epoch than facts already held) makes those facts' authors
    /// non-members; they go, or replicas that admitted them before learning of the change
    /// would differ forever from replicas that learned it first (found by the simulator,
    /// seed 33). Repeats until nothing changes, since dropping a membership change can
    /// unseat more authors.
    pub fn revalidate(&mut self) -> Vec<VerifiedFact> {
        let mut dropped = Vec::new();
        loop {
            let bad: Vec<Key> = self
                .all()
                .filter(|(_, f)| {
                    let genesis =
                        matches!(f.payload(), Payload::Authority(AuthorityFact::Genesis(_)));
                    !genesis && !self.state.is_member_at(&f.author(), f.epoch())
                })
                .map(|(k, _)| *k)
                .collect();
            if bad.is_empty() {
                return dropped;
            }
            for k in bad {
                let f = self
                    .durable
                    .facts
                    .remove(&k)
                    .or_else(|| self.buffer.remove(&k));
                dropped.extend(f);
            }
            self.rebuild();
        }
    }

    /// Settles the latest verified snapshot once its blob is at hand, as the node does
    /// (`tend_replica::settle`: uncovered facts below E go and their authors re-issue
    /// them, facts that only look live here go), then, unless this is an archive device,
    /// prunes the covered application facts below E that are not live in the prefix
    /// (GC; DESIGN rule 4).
    ///
    /// `Ok(None)`: nothing to do yet. `Err`: the signed snapshot's blob does not verify
    /// against its own digest (no device could hydrate from it), or a rule failed.
    pub fn settle(&mut self) -> Result<Option<Settled>, String> {
        let Some(s) = self.state.latest_snapshot.clone() else {
            return Ok(None);
        };
        let e = s.snapshot.epoch;
        if self.durable.settled >= e {
            return Ok(None);
        }
        if let Some(bytes) = self.durable.blobs.get(&s.snapshot.blob_cid) {
            let blob = SnapshotBlob::decode(bytes)
                .map_err(|err| format!("blob of snapshot at {e} does not decode: {err}"))?;
            // From version 3 on the items are in the item blob, checked against the
            // blob's reference (and so against the signed digest) when held.
            let items_ok = blob.item_ref.is_none_or(|r| {
                self.durable.blobs.get(&r.cid).is_none_or(|bytes| {
                    tend_snapshot::blob::read_item_blob(
                        &bytes[..],
                        blob.namespace,
                        e,
                        blob.base,
                        &r,
                    )
                    .is_ok()
                })
            });
            if blob.epoch != e || blob.prefix_digest() != s.snapshot.digest || !items_ok {
                return Err(format!(
                    "blob of the verified snapshot at epoch {e} (base {:?}) does not hash to the signed digest",
                    blob.base.map(|b| b.epoch)
                ));
            }
        }
        // One transaction: everything buffered becomes durable with the settle.
        self.flush();
        let rules = Rules {
            drop_stale: self.drop_stale,
        };
        let settled = tend_replica::settle(self, rules).map_err(|err| err.to_string())?;
        if self.durable.settled < e {
            return Ok(None); // the blob is not here yet
        }
        let mut out = Settled {
            epoch: e,
            completion: Some(s.fact_id),
            quarantined: settled.retracted,
            reissued: settled.reissued,
            stale: settled.stale,
            ..Settled::default()
        };
        if !self.archive {
            // What the application state needs below e stays (DESIGN rule 4), so pruning
            // changes no value the device reads.
            let below = ..(e, FactId([0; 32]));
            let floors = self.state.cache_floors.clone();
            let before = self.app_state().digest(&floors);
            let live = tend_snapshot::blob::live_facts(
                self.namespace,
                self.durable.facts.range(below).map(|(_, f)| f),
            );
            let prune: Vec<Key> = self
                .durable
                .facts
                .range(below)
                .filter(|(k, f)| {
                    let keep = self.gc_keeps_live && live.contains(k);
                    !is_state_fact(f) && !keep
                })
                .map(|(k, _)| *k)
                .collect();
            for k in prune {
                self.durable.facts.remove(&k);
                out.pruned.push(k);
            }
            self.rebuild();
            out.changed_app_state = self.app_state().digest(&floors) != before;
        }
        Ok(Some(out))
    }

    /// The items the settled snapshot at `e` covers: below its base, what settling the
    /// base recorded (or, if this device never settled it, the blob's facts there); from
    /// the base on, the blob's items.
    fn coverage(&self, e: Epoch, blob: &SnapshotBlob) -> BTreeSet<Key> {
        let base = blob.base.map_or(Epoch::ZERO, |b| b.epoch);
        let mut covered: BTreeSet<Key> = if self.durable.settled >= base {
            self.durable
                .covered
                .range(..(base, FactId([0; 32])))
                .copied()
                .collect()
        } else {
            blob.facts
                .iter()
                .map(|f| f.order_key())
                .filter(|k| k.0 < base)
                .collect()
        };
        covered.extend(self.items_of(blob).into_iter().filter(|k| k.0 < e));
        covered
    }

    /// A blob's items: its own up to version 2, its item blob's from version 3 on (held
    /// with the snapshot blob: the ceremony keeps both and `Sim::fetch_blobs` fetches both).
    /// Without the item blob, the facts it carries from the base on.
    fn items_of(&self, blob: &SnapshotBlob) -> Vec<Key> {
        let Some(r) = blob.item_ref.filter(|r| blob.items.len() as u64 != r.count) else {
            return blob.items.clone();
        };
        let read = self.durable.blobs.get(&r.cid).and_then(|bytes| {
            tend_snapshot::blob::read_item_blob(
                &bytes[..],
                blob.namespace,
                blob.epoch,
                blob.base,
                &r,
            )
            .ok()
        });
        read.unwrap_or_else(|| {
            let base = blob.base.map_or(Epoch::ZERO, |b| b.epoch);
            blob.facts
                .iter()
                .map(|f| f.order_key())
                .filter(|k| k.0 >= base)
                .collect()
        })
    }

    /// Admits one fact as a session would (a batch of one).
    pub fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        use tend_sync::FactHost;
        let mut host = Admission::new(self);
        let r = host.admit(fact);
        let (facts, adopted) = host.finish();
        self.take_admitted(facts, adopted);
        r
    }

    /// What the node does with a batch a session admitted: write it (here, into the
    /// write buffer a crash discards), then adopt the snapshot it brought.
    pub fn take_admitted(&mut self, facts: Vec<VerifiedFact>, adopted: Option<Adopted>) {
        if self.fence_blocked {
            self.crossed_fence.extend(facts.iter().map(|f| f.id()));
        }
        if facts.is_empty() {
            return;
        }
        for f in facts {
            if !self.holds(&f.order_key()) {
                self.insert_buffered(f);
            }
        }
        if let Some(adopted) = adopted {
            let Ok(_) = tend_replica::adopt(self, &adopted);
        }
    }

    /// Digest of the held items at or above `from` (the tail above a snapshot).
    pub fn tail_digest(&self, from: Epoch) -> Hash32 {
        journal_digest(
            self.namespace,
            self.all().map(|(k, _)| *k).filter(|k| k.0 >= from),
        )
    }
}

impl Core {
    /// The snapshot blob of this device's prefix below `upto`.
    fn own_blob(&self, upto: Epoch) -> SnapshotBlob {
        let items: Vec<Key> = self
            .effective_items(false)
            .into_iter()
            .take_while(|(e, _)| *e < upto)
            .collect();
        let prefix: Vec<&VerifiedFact> = self
            .all()
            .take_while(|((e, _), _)| *e < upto)
            .map(|(_, f)| f)
            .collect();
        let facts = tend_snapshot::blob::blob_facts(self.namespace, prefix);
        SnapshotBlob::from_parts(self.namespace, upto, items, facts)
    }
}

impl Replica for Core {
    type Error = Infallible;

    fn namespace(&self) -> JournalNamespace {
        self.namespace
    }

    fn device_id(&self) -> DeviceId {
        self.me
    }

    fn state(&self) -> Result<MaintenanceState, Infallible> {
        Ok(self.state.clone())
    }

    fn contains(&self, key: Key) -> Result<bool, Infallible> {
        Ok(self.holds(&key))
    }

    fn load_fact(&self, id: &FactId) -> Option<Vec<u8>> {
        let e = self.index.get(id)?;
        self.durable
            .facts
            .get(&(*e, *id))
            .map(|f| f.bytes().to_vec())
    }

    fn prefix_digest(&self, upto: Epoch) -> Result<Hash32, Infallible> {
        // The same chaining rule as tend-snapshot's `JournalView`.
        let mut d = DigestBuilder::chained(self.namespace, upto, self.state.snapshot_base(upto));
        for (e, id) in self.effective_items(false).range(..(upto, FactId([0; 32]))) {
            d.push(*e, *id);
        }
        Ok(d.finish())
    }

    fn build_snapshot_blob(
        &self,
        upto: Epoch,
        _keep: Option<ContentId>,
    ) -> Result<BuiltBlob, Infallible> {
        Ok(BuiltBlob::of(&self.own_blob(upto)))
    }

    fn snapshot_blob(&self, cid: &ContentId) -> Result<BlobAt, Infallible> {
        // Fetched after the next completed session (`Sim::fetch_blobs`).
        Ok(match self.durable.blobs.get(cid) {
            Some(bytes) => BlobAt::Stored(Box::new(std::io::Cursor::new(bytes.clone()))),
            None => BlobAt::Fetching,
        })
    }

    fn scan(
        &self,
        from: Epoch,
        to: Epoch,
        each: &mut dyn FnMut(VerifiedFact),
    ) -> Result<(), Infallible> {
        self.all()
            .filter(|((e, _), _)| *e >= from && *e < to)
            .for_each(|(_, f)| each(f.clone()));
        Ok(())
    }

    fn live_below(&self, epoch: Epoch) -> Result<Vec<Key>, Infallible> {
        let below: Vec<&VerifiedFact> = self
            .all()
            .take_while(|((e, _), _)| *e < epoch)
            .map(|(_, f)| f)
            .collect();
        let live = tend_snapshot::blob::live_facts(self.namespace, below);
        Ok(live.into_iter().collect())
    }

    fn settled(&self) -> Result<Option<Epoch>, Infallible> {
        Ok((self.durable.settled > Epoch::ZERO).then_some(self.durable.settled))
    }

    fn store(&mut self, facts: &[VerifiedFact]) -> Result<(), Infallible> {
        for f in facts {
            if !self.holds(&f.order_key()) {
                self.newly_durable.push(f.clone());
                self.durable.facts.insert(f.order_key(), f.clone());
            }
        }
        self.rebuild();
        if self.revalidate_on_change {
            let dropped = self.revalidate();
            self.invalidated.extend(dropped);
        }
        Ok(())
    }

    fn retract_maintenance(
        &mut self,
        below: Epoch,
        keep: &HashSet<FactId>,
    ) -> Result<Vec<VerifiedFact>, Infallible> {
        let doomed: Vec<Key> = self
            .all()
            .take_while(|((e, _), _)| *e < below)
            .filter(|((_, id), f)| is_state_fact(f) && !keep.contains(id))
            .map(|(k, _)| *k)
            .collect();
        Ok(self.remove(&doomed))
    }

    fn retract_data(&mut self, keys: &[Key]) -> Result<u64, Infallible> {
        let data: Vec<Key> = keys
            .iter()
            .filter(|k| {
                let f = self.durable.facts.get(k).or_else(|| self.buffer.get(k));
                f.is_some_and(|f| !is_state_fact(f))
            })
            .copied()
            .collect();
        Ok(self.remove(&data).len() as u64)
    }

    fn append(&mut self, payload: Payload) -> Result<VerifiedFact, Infallible> {
        // Durable at once, as the node's writes are.
        let f = self.write(payload);
        self.flush();
        Ok(f)
    }

    fn set_aside(&mut self, facts: &[VerifiedFact]) -> Result<(), Infallible> {
        self.durable.set_aside.extend(facts.iter().cloned());
        Ok(())
    }

    fn mark_settled(&mut self, epoch: Epoch) -> Result<(), Infallible> {
        let blob = self
            .state
            .latest_snapshot
            .as_ref()
            .filter(|l| l.snapshot.epoch == epoch)
            .and_then(|l| self.durable.blobs.get(&l.snapshot.blob_cid))
            .and_then(|bytes| SnapshotBlob::decode(bytes).ok());
        // Without the blob, this device holds exactly the prefix (the digests matched):
        // it covers what is held below the epoch.
        let blob = blob.unwrap_or_else(|| self.own_blob(epoch));
        self.durable.covered = self.coverage(epoch, &blob);
        self.durable.settled = epoch;
        Ok(())
    }
}

impl Core {
    /// Deletes the given facts, durable or buffered; returns them.
    fn remove(&mut self, keys: &[Key]) -> Vec<VerifiedFact> {
        let gone: Vec<VerifiedFact> = keys
            .iter()
            .filter_map(|k| {
                self.durable
                    .facts
                    .remove(k)
                    .or_else(|| self.buffer.remove(k))
            })
            .collect();
        if !gone.is_empty() {
            self.rebuild();
        }
        gone
    }
}
