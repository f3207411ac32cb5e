//! The snapshot ceremony engine's view of a device (`tend_snapshot::LocalJournal`) over its
//! [`Replica`]: written once for every driver of the engine (the node, the in-process
//! fleet, the simulator), so the engine sees the same store view as every other rule.

use tend_core::{ContentId, Epoch, Hash32, MaintenanceState};
use tend_snapshot::{BuiltBlob, LocalJournal, SnapshotBlob};

use crate::Replica;

/// A device's journal as the ceremony engine reads it during one step: the reduced state
/// read once, digests and blobs from the replica.
pub struct EngineView<'a, R> {
    replica: &'a R,
    state: MaintenanceState,
}

impl<'a, R: Replica> EngineView<'a, R> {
    /// Reads the replica's reduced state for one step of the engine.
    pub fn new(replica: &'a R) -> Result<Self, R::Error> {
        Ok(Self {
            state: replica.state()?,
            replica,
        })
    }
}

impl<R: Replica> LocalJournal for EngineView<'_, R> {
    fn state(&self) -> &MaintenanceState {
        &self.state
    }

    fn prefix_digest(&self, upto: Epoch) -> Hash32 {
        // A read error yields a digest no proposal carries, so the device refuses to sign
        // rather than sign something it could not check.
        self.replica.prefix_digest(upto).unwrap_or_else(|e| {
            tracing::warn!("cannot compute the prefix digest below {upto}: {e}");
            Hash32([0; 32])
        })
    }

    fn snapshot_blob(&self, upto: Epoch, keep: Option<ContentId>) -> BuiltBlob {
        self.replica
            .build_snapshot_blob(upto, keep)
            .unwrap_or_else(|e| {
                // The CID of no blob: a proposer's proposal fails, a signer refuses.
                tracing::warn!("cannot build the snapshot blob below {upto}: {e}");
                BuiltBlob {
                    cid: SnapshotBlob::cid_of(&[]),
                    bytes: None,
                    item_blob: None,
                }
            })
    }
}
