//! Hydration: turning a verified snapshot blob into the state of a fresh device, and the
//! coverage rule for facts that arrive below the snapshot epoch (DESIGN rule 5).

use std::io::Read;

use tend_core::maintenance::SnapshotCompleted;
use tend_core::{
    Epoch, FactId, GroupKey, Hash32, JournalError, JournalNamespace, MaintenanceState, VerifiedFact,
};

use crate::blob::{
    read_item_blob, stream_blob_facts, BlobError, BlobSummary, BlobTrust, ItemRef, SnapshotBlob,
};

/// Facts per batch of a streamed blob read.
const STREAM_BATCH: usize = 10_000;

/// Why a snapshot cannot be hydrated from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HydrateError {
    #[error("the snapshot's threshold signature does not verify against the group key")]
    BadSignature,
    #[error("the blob does not hash to the snapshot's CID")]
    CidMismatch,
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("the blob is for {blob}, expected {expected}")]
    NamespaceMismatch {
        blob: JournalNamespace,
        expected: JournalNamespace,
    },
    #[error("the blob is for epoch {blob}, the snapshot for epoch {snapshot}")]
    EpochMismatch { blob: Epoch, snapshot: Epoch },
    #[error("the blob's items do not hash to the snapshot's digest")]
    DigestMismatch,
    #[error(transparent)]
    Late(#[from] JournalError),
}

/// Where a fact stands relative to a completed snapshot at epoch E.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Coverage {
    /// Below E and in the snapshot: already accounted for, nothing to merge.
    Covered,
    /// Below E and not in the snapshot: answer `Late`; the author re-issues it.
    Late,
    /// At or above E: an ordinary tail fact.
    Tail,
}

/// The state of a device hydrated from a snapshot.
#[derive(Clone, Debug)]
pub struct Hydrated {
    pub namespace: JournalNamespace,
    /// The snapshot epoch E.
    pub epoch: Epoch,
    /// The snapshot's `(epoch, id)` items, ascending; for a blob of version 3, empty until
    /// its item blob is attached ([`Hydrated::attach_items`]).
    pub covered: Vec<(Epoch, FactId)>,
    /// The item blob a version 3 blob names, until its items are attached.
    pub items_elsewhere: Option<ItemRef>,
    /// The `(epoch, id)` of the blob's facts, ascending (covered whatever else is known).
    carried: Vec<(Epoch, FactId)>,
    /// The prefix's maintenance and authority facts (to keep in the journal).
    pub facts: Vec<VerifiedFact>,
    /// The reduced state: the prefix, then every tail fact applied so far.
    pub state: MaintenanceState,
    /// The completion the device was hydrated from.
    pub snapshot: SnapshotCompleted,
    last_tail: Option<(Epoch, FactId)>,
}

/// Verifies a snapshot and hydrates from its blob: the threshold signature against
/// `group_key` (the authority's key at the completion fact's epoch), the blob against the
/// CID, the items against the digest, and the blob's facts against its state digest.
pub fn hydrate(
    blob_bytes: &[u8],
    completed: &SnapshotCompleted,
    namespace: JournalNamespace,
    group_key: &GroupKey,
) -> Result<Hydrated, HydrateError> {
    let snapshot = &completed.snapshot;
    let msg = snapshot.signing_message(&namespace, &completed.proposal_id);
    if !group_key.verify(&msg, &completed.threshold_signature) {
        return Err(HydrateError::BadSignature);
    }
    if SnapshotBlob::cid_of(blob_bytes) != snapshot.blob_cid {
        return Err(HydrateError::CidMismatch);
    }
    let blob = SnapshotBlob::decode(blob_bytes)?;
    if blob.namespace != namespace {
        return Err(HydrateError::NamespaceMismatch {
            blob: blob.namespace,
            expected: namespace,
        });
    }
    if blob.epoch != snapshot.epoch {
        return Err(HydrateError::EpochMismatch {
            blob: blob.epoch,
            snapshot: snapshot.epoch,
        });
    }
    if blob.prefix_digest() != snapshot.digest {
        return Err(HydrateError::DigestMismatch);
    }
    let state = blob.reduced_state();
    let items_elsewhere = blob.item_ref.filter(|r| blob.items.len() as u64 != r.count);
    Ok(Hydrated {
        namespace,
        epoch: blob.epoch,
        covered: blob.items,
        items_elsewhere,
        carried: blob.facts.iter().map(|f| f.order_key()).collect(),
        facts: blob.facts,
        state,
        snapshot: completed.clone(),
        last_tail: None,
    })
}

/// [`hydrate`] from a blob streamed out of `blob` in one pass, holding a bounded buffer and
/// the blob's state facts, never its item list nor its application facts (a restore's
/// memory must not grow with the journal or its live state). The threshold signature is
/// checked before anything is read; then, as the bytes go by, the blob's structure, its
/// items against the prefix digest, its facts against its state digest and the bytes
/// against the CID. Every fact goes to `sink` in batches as it is read (before the CID is
/// checked at the end, so the sink must not trust them: a restore hashes them). The
/// returned summary's facts are the state facts ([`crate::blob::is_state_fact`]); the
/// application facts are read again, once the blob is known to be the certified one, with
/// [`crate::blob::stream_blob_facts`]. It has no item
/// list, so late facts cannot be classified with it (a restore needs no such
/// classification: its tail is at or above the snapshot epoch).
pub fn hydrate_stream(
    blob: impl Read,
    completed: &SnapshotCompleted,
    namespace: JournalNamespace,
    group_key: &GroupKey,
    sink: impl FnMut(Vec<VerifiedFact>) -> Result<(), HydrateError>,
) -> Result<(BlobSummary, MaintenanceState), HydrateError> {
    let snapshot = &completed.snapshot;
    let certified = completed
        .certify(&namespace, group_key)
        .ok_or(HydrateError::BadSignature)?;
    let summary = stream_blob_facts(blob, BlobTrust::Certified(&certified), STREAM_BATCH, sink)?;
    if summary.cid != snapshot.blob_cid {
        return Err(HydrateError::CidMismatch);
    }
    if summary.namespace != namespace {
        return Err(HydrateError::NamespaceMismatch {
            blob: summary.namespace,
            expected: namespace,
        });
    }
    if summary.epoch != snapshot.epoch {
        return Err(HydrateError::EpochMismatch {
            blob: summary.epoch,
            snapshot: snapshot.epoch,
        });
    }
    if summary.prefix_digest != snapshot.digest {
        return Err(HydrateError::DigestMismatch);
    }
    let state = summary.reduced_state();
    Ok((summary, state))
}

impl Hydrated {
    /// Attaches the items of a version 3 snapshot from its item blob (checked against what
    /// the certified snapshot blob says of it), so [`Hydrated::coverage`] is exact.
    pub fn attach_items(&mut self, item_blob: impl Read) -> Result<(), HydrateError> {
        if let Some(r) = self.items_elsewhere {
            let base = self.state.snapshot_base(self.epoch);
            self.covered = read_item_blob(item_blob, self.namespace, self.epoch, base, &r)?;
            self.items_elsewhere = None;
        }
        Ok(())
    }

    /// Where a fact at `(epoch, id)` stands (DESIGN rule 5). Without the items of a
    /// version 3 snapshot only the facts its blob carries count as covered: answering
    /// `Late` for the others is the safe side (the author re-issues; never lost).
    pub fn coverage(&self, epoch: Epoch, id: &FactId) -> Coverage {
        if epoch >= self.epoch {
            Coverage::Tail
        } else if self.covered.binary_search(&(epoch, *id)).is_ok()
            || self.carried.binary_search(&(epoch, *id)).is_ok()
        {
            Coverage::Covered
        } else {
            Coverage::Late
        }
    }

    /// Folds a fact into the state: tail facts are applied, covered facts are already in,
    /// and uncovered facts below E are `Late`. Tail facts must come in ascending
    /// `(epoch, id)` order (use [`Hydrated::apply_tail`] for an unordered set); repeats
    /// are ignored.
    pub fn apply(&mut self, fact: &VerifiedFact) -> Result<Coverage, HydrateError> {
        let coverage = self.coverage(fact.epoch(), &fact.id());
        match coverage {
            Coverage::Covered => {}
            Coverage::Late => {
                return Err(JournalError::Late {
                    fact: fact.id(),
                    epoch: fact.epoch(),
                    snapshot: self.epoch,
                }
                .into())
            }
            Coverage::Tail => {
                if self.last_tail.is_some_and(|l| l >= fact.order_key()) {
                    return Ok(coverage);
                }
                self.last_tail = Some(fact.order_key());
                self.state.apply(fact);
            }
        }
        Ok(coverage)
    }

    /// Applies a set of tail facts in `(epoch, id)` order; the first late fact stops it.
    pub fn apply_tail<'a>(
        &mut self,
        facts: impl IntoIterator<Item = &'a VerifiedFact>,
    ) -> Result<(), HydrateError> {
        let mut sorted: Vec<&VerifiedFact> = facts.into_iter().collect();
        sorted.sort_by_key(|f| f.order_key());
        for f in sorted {
            self.apply(f)?;
        }
        Ok(())
    }

    /// The digest of the hydrated state ([`MaintenanceState::state_digest`]).
    pub fn state_digest(&self) -> Hash32 {
        self.state.state_digest()
    }
}
