//! A session's facts on their way in: each checked against the reduced state as it
//! arrives and buffered for one write, a newer snapshot completion together with the facts
//! its blob carries.

use std::collections::HashSet;

use tend_core::maintenance::{CertifiedBlob, SnapshotV1};
use tend_core::{
    ContentId, DeviceId, Epoch, FactId, Hash32, JournalError, JournalNamespace, MaintenanceFact,
    MaintenanceState, Payload, VerifiedFact,
};
use tend_snapshot::blob::{is_state_fact, BlobError, BlobTrust};
use tend_sync::FactHost;

use crate::{BlobAt, Replica};

/// Facts of a blob written per store transaction while hydrating, so a snapshot of a
/// million live records holds one batch at a time.
const HYDRATE_BATCH: usize = 10_000;

/// A snapshot adopted in a batch with its blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// The snapshot epoch.
    pub epoch: Epoch,
    /// The ids of the maintenance and authority facts below it that the blob carries:
    /// all that may stay there ([`crate::adopt`]).
    pub state_facts: HashSet<FactId>,
}

/// The admission of one batch of a session's facts: the [`FactHost`] a session state
/// machine admits through. The caller writes [`Admission::finish`]'s facts in one
/// transaction, then hands its [`Adopted`] to [`crate::adopt`].
pub struct Admission<'a, R: Replica> {
    replica: &'a mut R,
    /// `None` if the store could not be read: everything is then refused.
    state: Option<MaintenanceState>,
    pending: Vec<VerifiedFact>,
    pending_ids: HashSet<FactId>,
    adopted: Option<Adopted>,
}

impl<'a, R: Replica> Admission<'a, R> {
    /// A batch admitted against the replica's current state.
    pub fn new(replica: &'a mut R) -> Self {
        let state = match replica.state() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot read the maintenance state; refusing facts: {e}");
                None
            }
        };
        Self {
            replica,
            state,
            pending: Vec::new(),
            pending_ids: HashSet::new(),
            adopted: None,
        }
    }

    /// The replica admitted into.
    pub fn replica(&mut self) -> &mut R {
        self.replica
    }

    /// The facts admitted, in arrival order, and the snapshot adopted with them, if any.
    pub fn finish(self) -> (Vec<VerifiedFact>, Option<Adopted>) {
        (self.pending, self.adopted)
    }

    /// Whether the fact is already stored or buffered.
    fn holds(&self, fact: &VerifiedFact) -> bool {
        self.pending_ids.contains(&fact.id())
            || self.replica.contains(fact.order_key()).unwrap_or(false)
    }

    /// Checks a fact against the running state copy and folds it in.
    fn check_and_apply(&mut self, fact: &VerifiedFact) -> Result<(), JournalError> {
        let ours = self.replica.namespace();
        let Some(state) = self.state.as_mut() else {
            return Err(JournalError::NamespaceMismatch {
                ours,
                theirs: fact.namespace(),
            });
        };
        state.check_admission(fact)?;
        if tend_core::app::is_data(fact.payload()) {
            state.observe_epoch(fact.epoch());
        } else {
            // A membership change earlier in the batch governs later facts.
            state.apply(fact);
        }
        Ok(())
    }

    /// The blob of a snapshot completion newer than the latest one this device knows:
    /// certified when this device knows the group key at the completion's epoch and the
    /// threshold signature verifies against it; else (a device that is joining knows no
    /// member yet) to be read checking every fact's own signature, as the genesis in the
    /// blob is the root of its trust and reduction then verifies the completion.
    fn advances_snapshot(&self, fact: &VerifiedFact) -> Option<SnapshotSource> {
        let Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) = fact.payload() else {
            return None;
        };
        let state = self.state.as_ref()?;
        let newer = state
            .latest_snapshot
            .as_ref()
            .is_none_or(|l| l.snapshot.epoch < c.snapshot.epoch);
        if !newer {
            return None;
        }
        match state.membership_at(fact.epoch()) {
            Some(m) => {
                c.certify(&fact.namespace(), &m.group_key)
                    .map(|blob| SnapshotSource::Certified {
                        blob,
                        snapshot: c.snapshot.clone(),
                    })
            }
            None => Some(SnapshotSource::Unverified(c.snapshot.clone())),
        }
    }

    /// Writes the facts of the snapshot blob `source` names, batch by batch as they are
    /// read, if the blob is stored.
    ///
    /// They are written as they are read rather than buffered with the session's batch,
    /// so hydrating a snapshot of a million live records holds one batch at a time. That
    /// is safe before the completion is written: each is a valid fact of the journal on
    /// its own, checked against the running state as a session's facts are, and the stored
    /// blob matched its CID when it was stored (a crash in between leaves valid facts and a
    /// completion to admit again).
    fn hydrate(&mut self, source: SnapshotSource) -> SnapshotFacts {
        let ns = self.replica.namespace();
        let cid = source.cid();
        let (epoch, digest) = source.snapshot();
        // A device that holds exactly the snapshot's prefix (it signed it, say) has every
        // fact the blob carries and nothing below it to drop.
        let held = |r: &R| r.prefix_digest(epoch).ok() == Some(digest);
        let reader = match self.replica.snapshot_blob(&cid) {
            Ok(BlobAt::Stored(reader)) if !held(self.replica) => reader,
            Ok(BlobAt::Stored(_)) => return SnapshotFacts::Held,
            Ok(BlobAt::Fetching) => return SnapshotFacts::Wait,
            Ok(BlobAt::Unavailable) => return SnapshotFacts::Unavailable,
            Err(e) => {
                tracing::warn!("cannot read snapshot blob {cid}: {e}");
                return SnapshotFacts::Wait;
            }
        };
        let trust = match &source {
            SnapshotSource::Certified { blob, .. } => BlobTrust::Certified(blob),
            SnapshotSource::Unverified(_) => BlobTrust::EachSignature,
        };
        let mut state_facts = HashSet::new();
        let read = tend_snapshot::blob::stream_blob_facts(reader, trust, HYDRATE_BATCH, |batch| {
            if batch.first().is_some_and(|f| f.namespace() != ns) {
                return Err(BlobError::Malformed("a blob of another journal".into()));
            }
            let mut admissible = Vec::with_capacity(batch.len());
            for f in batch {
                if is_state_fact(&f) {
                    state_facts.insert(f.id());
                }
                // Inadmissible ones are not ours to store; the rest go in.
                if !self.holds(&f) && self.check_and_apply(&f).is_ok() {
                    admissible.push(f);
                }
            }
            if let Err(e) = self.replica.store(&admissible) {
                tracing::warn!("cannot store the facts of snapshot blob {cid}: {e}");
            }
            Ok(())
        });
        if let Err(e) = read {
            tracing::warn!("stored snapshot blob {cid} does not decode: {e}");
            return SnapshotFacts::Unavailable;
        }
        SnapshotFacts::Hydrated(Adopted { epoch, state_facts })
    }
}

impl<R: Replica> FactHost for Admission<'_, R> {
    fn load_fact(&self, _namespace: JournalNamespace, id: &FactId) -> Option<Vec<u8>> {
        self.replica.load_fact(id)
    }

    fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        if self.state.is_none() {
            return Err(JournalError::NamespaceMismatch {
                ours: self.replica.namespace(),
                theirs: fact.namespace(),
            });
        }
        if self.holds(&fact) {
            return Ok(false);
        }
        if let Some(source) = self.advances_snapshot(&fact) {
            // Once a completion at E is admitted, every fact below E is `Late` here and
            // sessions reconcile only from E on, so state facts below E that this device
            // missed (it did not take part in the ceremony) would never arrive: its
            // reduced state would differ from the signers' for good. The snapshot's blob
            // carries every maintenance and authority fact below E; they go in first.
            match self.hydrate(source) {
                SnapshotFacts::Hydrated(adopted) => self.adopted = Some(adopted),
                SnapshotFacts::Held | SnapshotFacts::Unavailable => {}
                SnapshotFacts::Wait => return Ok(false),
            }
        }
        self.check_and_apply(&fact)?;
        self.pending_ids.insert(fact.id());
        self.pending.push(fact);
        Ok(true)
    }

    fn holds(&self, _namespace: JournalNamespace, id: &FactId) -> bool {
        self.pending_ids.contains(id) || self.replica.load_fact(id).is_some()
    }

    fn is_authorized(&self, _namespace: JournalNamespace, peer: &DeviceId) -> bool {
        self.state
            .as_ref()
            .and_then(|s| s.membership())
            .is_some_and(|m| m.members.contains(peer))
    }
}

/// A newer snapshot and how its blob's facts are read.
enum SnapshotSource {
    /// Trusting the verified threshold signature over the blob.
    Certified {
        blob: CertifiedBlob,
        snapshot: SnapshotV1,
    },
    /// Checking every fact's signature (the group key is not known yet).
    Unverified(SnapshotV1),
}

impl SnapshotSource {
    fn of(&self) -> &SnapshotV1 {
        match self {
            Self::Certified { snapshot, .. } | Self::Unverified(snapshot) => snapshot,
        }
    }

    fn snapshot(&self) -> (Epoch, Hash32) {
        (self.of().epoch, self.of().digest)
    }

    fn cid(&self) -> ContentId {
        self.of().blob_cid
    }
}

/// What a held-back snapshot completion may be admitted with.
enum SnapshotFacts {
    /// The blob's facts are stored.
    Hydrated(Adopted),
    /// This device holds the snapshot's whole prefix already.
    Held,
    /// No peer holds the blob: admit the completion alone.
    Unavailable,
    /// The blob is being fetched: hold the completion back (the peer offers it again).
    Wait,
}
