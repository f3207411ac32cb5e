//! A device's snapshot blob and item blob, built from its store in one scan each and
//! streamed (the ceremony engine asks for them through `tend_replica::EngineView`, the
//! benchmarks and tests read them decoded).

use std::collections::BTreeSet;
use std::io::Write;

use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::{reduce, ContentId, Epoch, FactId, JournalNamespace, VerifiedFact};
use tend_snapshot::blob::{
    read_blob_keys, read_item_blob, write_blob, write_item_blob, BlobHead, ItemRef,
};
use tend_snapshot::SnapshotBlob;
use tend_store::{FactBlob, Store, StoreError};

use crate::blobs::{ScratchBlob, ScratchKind};

/// A snapshot blob's head, the prefix's state facts and the keys of its live application
/// facts ([`StoreJournal::snapshot_parts`]).
type SnapshotParts = (BlobHead, Vec<VerifiedFact>, BTreeSet<(Epoch, FactId)>);

/// Builds one device's snapshot blobs (and item blobs) from its store, streaming.
pub struct StoreJournal<'a> {
    store: &'a Store,
    namespace: JournalNamespace,
}

impl<'a> StoreJournal<'a> {
    /// The builder of `namespace`'s blobs in `store`.
    pub fn new(store: &'a Store, namespace: JournalNamespace) -> Self {
        Self { store, namespace }
    }

    /// The snapshot blob of the prefix below `upto`, decoded, with the items of its item
    /// blob (tests and benchmarks; the ceremony streams both with
    /// [`StoreJournal::write_item_blob`] and [`StoreJournal::write_snapshot_blob`]).
    pub fn try_snapshot_blob(&self, upto: Epoch) -> Result<SnapshotBlob, StoreError> {
        let corrupt = |e: tend_snapshot::BlobError| StoreError::Corrupt {
            path: self.store.path().to_owned(),
            detail: format!("the snapshot blob built from it does not decode: {e}"),
        };
        let mut items = Vec::new();
        let item_ref = self.write_item_blob(upto, &mut items)?;
        let mut bytes = Vec::new();
        self.write_snapshot_blob(upto, &item_ref, &mut bytes)?;
        let mut blob = SnapshotBlob::decode(&bytes).map_err(corrupt)?;
        blob.items = read_item_blob(&items[..], self.namespace, upto, blob.base, &item_ref)
            .map_err(corrupt)?;
        Ok(blob)
    }

    /// The prefix's state facts below `upto` and the base its digest chains on.
    fn state_facts(
        &self,
        upto: Epoch,
    ) -> Result<
        (
            Vec<tend_core::VerifiedFact>,
            Option<tend_core::SnapshotBase>,
        ),
        StoreError,
    > {
        let corrupt = |source| StoreError::FactCorrupt {
            path: self.store.path().to_owned(),
            source,
        };
        let mut state_facts = Vec::new();
        for stored in self.store.scan_maintenance(self.namespace)? {
            let stored = stored?;
            if stored.epoch >= upto {
                break;
            }
            state_facts.push(stored.trusted().map_err(corrupt)?);
        }
        let base = reduce(self.namespace, &state_facts).snapshot_base(upto);
        Ok((state_facts, base))
    }

    /// Writes the item blob of the prefix below `upto` to `out` (every `(epoch, id)` from
    /// the base on, from one key-only scan of the index) and returns the reference the
    /// snapshot blob keeps of it.
    pub fn write_item_blob(
        &self,
        upto: Epoch,
        out: &mut impl Write,
    ) -> Result<ItemRef, StoreError> {
        let ns = self.namespace;
        let (_, base) = self.state_facts(upto)?;
        let from = base.map_or(Epoch::ZERO, |b| b.epoch);
        // One scan, kept (40 bytes an item): the head's count must be the number of items
        // that follow, and a write landing in the prefix between a counting scan and a
        // writing one (a proposal at the next epoch while the device writes at the
        // current one) made a blob the builder itself refused.
        let items = self
            .store
            .items(ns, from..upto)?
            .collect::<Result<Vec<_>, _>>()?;
        write_item_blob::<BuildError>(
            out,
            ns,
            upto,
            base,
            items.len() as u64,
            items.into_iter().map(Ok),
        )
        .map_err(|e| self.build_error(e))
    }

    fn build_error(&self, e: BuildError) -> StoreError {
        match e {
            BuildError::Store(e) => e,
            BuildError::Io(source) => StoreError::Io {
                path: self.store.path().to_owned(),
                source,
            },
        }
    }

    /// The head of the snapshot blob of the prefix below `upto` that names the item blob
    /// `item_ref`, with the prefix's state facts and the keys of its live application
    /// facts, which follow the head in `(epoch, id)` order.
    fn snapshot_parts(&self, upto: Epoch, item_ref: &ItemRef) -> Result<SnapshotParts, StoreError> {
        let ns = self.namespace;
        let (state_facts, base) = self.state_facts(upto)?;
        let live = self.store.live_below(ns, upto)?;
        // The state digest as `SnapshotBlob::from_parts` derives it.
        let mut state = reduce(ns, &state_facts);
        if let Some(e) = item_ref
            .last
            .map(|(e, _)| e)
            .max(live.last().map(|(e, _)| *e))
        {
            state.observe_epoch(e);
        }
        let head = BlobHead {
            namespace: ns,
            epoch: upto,
            base,
            item_ref: *item_ref,
            facts: (state_facts.len() + live.len()) as u64,
            state_digest: state.state_digest(),
        };
        Ok((head, state_facts, live))
    }

    /// Writes the snapshot blob of the prefix below `upto`, naming the item blob
    /// `item_ref` ([`StoreJournal::write_item_blob`]), to `out` as the store's index streams
    /// by: the prefix's state facts and live application facts as their stored canonical
    /// bytes, none of them decoded but the state facts. Memory holds the state facts and
    /// the live set's keys, not the blob.
    pub fn write_snapshot_blob(
        &self,
        upto: Epoch,
        item_ref: &ItemRef,
        out: &mut impl Write,
    ) -> Result<(), StoreError> {
        let (head, state_facts, live) = self.snapshot_parts(upto, item_ref)?;
        // The facts in `(epoch, id)` order: the state facts merged into one scan of the
        // prefix that keeps the live application facts.
        let mut state_facts = state_facts.into_iter().peekable();
        let mut scan = self
            .store
            .scan(self.namespace, ..upto)?
            .filter(|r| r.as_ref().map_or(true, |f| live.contains(&(f.epoch, f.id))));
        let mut next_live = scan.next();
        let facts = std::iter::from_fn(|| {
            let live_key = match &next_live {
                Some(Ok(f)) => Some((f.epoch, f.id)),
                Some(Err(_)) => return next_live.take().map(|r| r.map(|f| f.into_bytes())),
                None => None,
            };
            let state_first = match (state_facts.peek(), live_key) {
                (Some(s), Some(l)) => s.order_key() < l,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if state_first {
                state_facts.next().map(|f| Ok(f.bytes().to_vec()))
            } else {
                let this = next_live.take();
                next_live = scan.next();
                this.map(|r| r.map(|f| f.into_bytes()))
            }
        });
        write_blob::<BuildError, _>(out, &head, facts.map(|r| r.map_err(BuildError::from)))
            .map_err(|e| self.build_error(e))
    }

    /// The snapshot blob of the prefix below `upto`, naming the item blob `item_ref`, as
    /// the store hashes it from the facts it names ([`Store::plan_fact_blob`]): byte for
    /// byte what [`StoreJournal::write_snapshot_blob`] writes, never held or written out.
    pub fn plan_snapshot_blob(
        &self,
        upto: Epoch,
        item_ref: &ItemRef,
    ) -> Result<FactBlob, StoreError> {
        let (head, state_facts, live) = self.snapshot_parts(upto, item_ref)?;
        let mut keys: Vec<(Epoch, FactId)> = Vec::with_capacity(head.facts as usize);
        keys.extend(state_facts.iter().map(|f| f.order_key()));
        keys.extend(live);
        keys.sort_unstable();
        self.store.plan_fact_blob(
            CODEC_DAG_CBOR,
            self.namespace,
            head.leading_bytes(),
            keys,
            head.trailing_bytes(),
        )
    }

    /// Builds the snapshot blob of the prefix below `upto` and its item blob, and keeps
    /// both unless `keep` names another CID (a signer checking a proposal keeps only the
    /// blob it signs). Returns the snapshot blob's CID.
    ///
    /// The item blob is written in one pass into a [`ScratchBlob`] beside the store, hashed
    /// as it goes, and copied into the store if kept. The snapshot blob is hashed by the
    /// store from the facts it carries ([`StoreJournal::plan_snapshot_blob`]) and kept as
    /// references to them ([`Store::put_fact_blob`]): its live facts are never written a
    /// second time (docs/ARCHITECTURE.md section 4a). The item blob goes in first, so a
    /// device holding a snapshot blob it built holds its items too. Memory holds a copy
    /// buffer and the keys of the blob's facts, not the blobs.
    pub fn build_and_keep(
        &self,
        upto: Epoch,
        keep: Option<ContentId>,
    ) -> Result<ContentId, StoreError> {
        let mut items = ScratchBlob::create(self.store, ScratchKind::Built)?;
        let item_ref = self.write_item_blob(upto, &mut items)?;
        let items_cid = items.finish(CODEC_DAG_CBOR)?;
        if items_cid != item_ref.cid {
            return Err(StoreError::Corrupt {
                path: self.store.path().to_owned(),
                detail: "the item blob's bytes do not hash to its reference".into(),
            });
        }
        let blob = self.plan_snapshot_blob(upto, &item_ref)?;
        let cid = *blob.cid();
        if keep.is_none_or(|k| k == cid) {
            if !self.store.has_blob(&items_cid)? {
                items.store_as(self.store, &items_cid)?;
            }
            self.store.put_fact_blob(&blob)?;
        }
        Ok(cid)
    }

    /// Whether the latest snapshot blob is kept as references to its facts already.
    pub fn latest_blob_kept_as_facts(&self) -> Result<bool, StoreError> {
        let state = self.store.maintenance_state(self.namespace)?;
        match state.latest_snapshot.as_ref() {
            Some(latest) => self.store.blob_kept_as_facts(&latest.snapshot.blob_cid),
            None => Ok(false),
        }
    }

    /// Keeps the latest snapshot blob as references to the facts it carries
    /// ([`Store::keep_blob_as_facts`]) once they are all stored: after GC they are the
    /// prefix's live facts and state facts, which the store keeps anyway, so it then holds
    /// them once instead of twice (docs/ARCHITECTURE.md section 4a). Returns whether the
    /// blob is kept that way now; `false` if there is no snapshot, its blob is not stored or
    /// a fact it carries is not (a device that has not caught up: the next GC tries again).
    pub fn keep_latest_blob_as_facts(&self) -> Result<bool, StoreError> {
        let state = self.store.maintenance_state(self.namespace)?;
        let Some(latest) = state.latest_snapshot.as_ref() else {
            return Ok(false);
        };
        let cid = latest.snapshot.blob_cid;
        if self.store.blob_kept_as_facts(&cid)? {
            return Ok(true);
        }
        let Some(keys) = self
            .store
            .with_blob(&cid, |r| read_blob_keys(r, &latest.certified))?
        else {
            return Ok(false);
        };
        let keys = keys.map_err(|e| StoreError::Corrupt {
            path: self.store.path().to_owned(),
            detail: format!("the latest snapshot blob {cid} does not read: {e}"),
        })?;
        self.store
            .keep_blob_as_facts(&cid, self.namespace, keys.facts_at, keys.facts)
    }
}

/// Why streaming a blob failed: reading the store or writing the bytes.
enum BuildError {
    Store(StoreError),
    Io(std::io::Error),
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
