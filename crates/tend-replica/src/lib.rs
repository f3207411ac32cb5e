//! A device's rules over its journal, written once and driven by every device there is:
//! the running node (over its redb store), the in-process fleet and the simulator (over
//! its in-memory model of a store).
//!
//! Sans-IO: the rules read the journal and ask for writes through [`Replica`], and take
//! no clock, randomness or network. What the network does (carrying a session's facts,
//! fetching a blob) stays with the caller.
//!
//! - [`Admission`]: a session's facts, checked against the reduced state as they come
//!   and buffered for one write; a newer snapshot completion is admitted together with the
//!   facts its blob carries (DESIGN rule 5: below the snapshot nothing is reconciled any
//!   more, so what this device missed there would never arrive).
//! - [`adopt`]: once that batch is written, the maintenance facts below the adopted
//!   snapshot that its blob does not list go, and this device re-issues its own.
//! - [`fence_abort`]: which open sessions an activated upgrade fence ends.
//! - [`EngineView`]: the snapshot engine's view of the device (`LocalJournal`), so the
//!   engine sees a device through [`Replica`] like every other rule here.
//! - [`settle`]: once per snapshot, the application facts below it that it does not cover
//!   go (their authors re-issue them at the current epoch), and so do the ones that only
//!   look live here because this device lacks what superseded them.
//!   The snapshot's item blob is read only when this device's own facts need it, and a
//!   member says it settled (`SnapshotSettled`), so the item blob can go once all have.
//! - [`trigger::decide`]: whether the device proposes a snapshot by itself.
//! - [`keygen`]: key generation's decisions (the admin's plan and verdict, a member's
//!   answer to an invitation and its check of the join).

mod admission;
mod engine_view;
mod fence;
pub mod keygen;
mod settle;
pub mod trigger;
pub mod upgrade;

pub use admission::{Admission, Adopted};
pub use engine_view::EngineView;
pub use fence::fence_abort;
pub use settle::{adopt, settle, Rules, Settlement};

use std::collections::HashSet;
use std::io::Read;

use tend_core::{
    ContentId, DeviceId, Epoch, FactId, Hash32, JournalNamespace, MaintenanceState, Payload,
    VerifiedFact,
};

/// The order key of a fact: `(epoch, id)`.
pub type Key = (Epoch, FactId);

/// Where a snapshot blob (or its item blob) stands on this device.
pub enum BlobAt {
    /// Stored; a reader over its bytes.
    Stored(Box<dyn Read + Send>),
    /// Not stored yet; the caller fetches it (and the completion waits for it).
    Fetching,
    /// No peer holds it: the completion is admitted alone.
    Unavailable,
}

/// A device's journal as the rules see it: what they read, and the writes they ask for.
/// Every write is durable when it returns (a crash after it keeps it).
pub trait Replica {
    /// Why the store failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The journal this device keeps.
    fn namespace(&self) -> JournalNamespace;
    /// This device.
    fn device_id(&self) -> DeviceId;
    /// The reduced maintenance state of everything stored.
    fn state(&self) -> Result<MaintenanceState, Self::Error>;
    /// Whether the fact is stored.
    fn contains(&self, key: Key) -> Result<bool, Self::Error>;
    /// The canonical bytes of a stored fact.
    fn load_fact(&self, id: &FactId) -> Option<Vec<u8>>;
    /// The digest of the prefix below `upto`, chained as a snapshot's is
    /// ([`tend_snapshot::LocalJournal::prefix_digest`]).
    fn prefix_digest(&self, upto: Epoch) -> Result<Hash32, Self::Error>;
    /// A snapshot blob or an item blob, if stored.
    fn snapshot_blob(&self, cid: &ContentId) -> Result<BlobAt, Self::Error>;
    /// Builds the snapshot blob of the prefix below `upto` (and its item blob), keeping
    /// them unless `keep` names another CID: what the ceremony engine asks for through
    /// [`EngineView`].
    fn build_snapshot_blob(
        &self,
        upto: Epoch,
        keep: Option<ContentId>,
    ) -> Result<tend_snapshot::BuiltBlob, Self::Error>;
    /// Hands `each` the stored facts with epochs in `[from, to)`, ascending.
    fn scan(
        &self,
        from: Epoch,
        to: Epoch,
        each: &mut dyn FnMut(VerifiedFact),
    ) -> Result<(), Self::Error>;
    /// The application facts below `epoch` that are live in this device's state.
    fn live_below(&self, epoch: Epoch) -> Result<Vec<Key>, Self::Error>;
    /// The snapshot epoch this device last settled ([`settle`]), if any.
    fn settled(&self) -> Result<Option<Epoch>, Self::Error>;

    /// Stores admitted facts (each passed the admission check).
    fn store(&mut self, facts: &[VerifiedFact]) -> Result<(), Self::Error>;
    /// Deletes the maintenance and authority facts below `below` whose ids are not in
    /// `keep`; returns them.
    fn retract_maintenance(
        &mut self,
        below: Epoch,
        keep: &HashSet<FactId>,
    ) -> Result<Vec<VerifiedFact>, Self::Error>;
    /// Deletes the given application facts (maintenance facts are left alone); returns
    /// how many went.
    fn retract_data(&mut self, keys: &[Key]) -> Result<u64, Self::Error>;
    /// Signs `payload` as this device at its current epoch and stores it.
    fn append(&mut self, payload: Payload) -> Result<VerifiedFact, Self::Error>;
    /// Records that the snapshot at `epoch` is settled.
    fn mark_settled(&mut self, epoch: Epoch) -> Result<(), Self::Error>;
    /// Keeps aside (durably, beside the journal) this device's facts that settling could
    /// not tell covered or uncovered ([`Settlement::set_aside`]), for an operator to see.
    fn set_aside(&mut self, facts: &[VerifiedFact]) -> Result<(), Self::Error>;
}

/// Why a rule could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError<E: std::error::Error + 'static> {
    /// The store failed.
    #[error(transparent)]
    Store(E),
    /// A stored snapshot blob does not decode.
    #[error("stored snapshot blob: {0}")]
    Blob(#[from] tend_snapshot::blob::BlobError),
}
