//! DESIGN rule 5 on the author's side, for a device outside a session: once a verified
//! snapshot is known, settle it ([`tend_replica::settle`]): re-issue this device's own
//! facts below it that it does not cover, at the current epoch, and drop what may not stay
//! below it.
//!
//! Such a fact was written while the device had not seen the proposal (a partition, say).
//! Peers will never take it (it is below their floor, `Late`), so without a new copy its
//! payload would be lost.

use tend_core::{Epoch, VerifiedFact};
use tend_replica::{ReplicaError, Rules};

use crate::device::{Device, DeviceError};
use crate::replica::DeviceReplica;

/// What [`reissue_uncovered`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reissued {
    /// The snapshot epoch settled, if a snapshot with a stored blob is known.
    pub snapshot_epoch: Option<Epoch>,
    /// New facts written (one per uncovered fact of this device).
    pub facts: Vec<VerifiedFact>,
    /// The item blob settling waits for (fetched by the next round), if any.
    pub awaiting_items: Option<tend_core::ContentId>,
    /// Own facts that could not be told covered or uncovered, kept aside
    /// ([`tend_replica::Settlement::set_aside`]; also in the `settle.set_aside` setting).
    pub set_aside: Vec<VerifiedFact>,
}

/// Settles the latest verified snapshot once: re-issues this device's uncovered facts
/// below it. Does nothing until the snapshot's blob is in the store (it says what is
/// covered). Idempotent: a settled snapshot is remembered in the store's settings.
pub fn reissue_uncovered(device: &Device) -> Result<Reissued, DeviceError> {
    // The node calls this after rounds and before automatic GC, from different threads:
    // one run at a time, so a payload is never re-issued twice.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let settled = tend_replica::settle(&mut DeviceReplica::new(device), Rules::default()).map_err(
        |e| match e {
            ReplicaError::Store(e) => e,
            ReplicaError::Blob(e) => {
                DeviceError::InvalidInput(format!("stored snapshot blob: {e}"))
            }
        },
    )?;
    let store = device.store();
    let wanted = store.get_setting::<String>(crate::replica::ITEM_BLOB_WANTED)?;
    match settled.awaiting_items {
        // The next round fetches it (`blobs::wanted`), then settles again.
        Some(cid) if wanted != Some(cid.to_string()) => {
            store.put_setting(crate::replica::ITEM_BLOB_WANTED, &cid.to_string())?;
        }
        Some(_) => {}
        // Settled (or nothing to settle): no longer wanted, or every member dropping it
        // at GC would have this device ask every round.
        None if wanted.is_some() => {
            store.delete_setting(crate::replica::ITEM_BLOB_WANTED)?;
            store.delete_setting(crate::replica::ITEM_BLOB_UNAVAILABLE)?;
        }
        None => {}
    }
    Ok(Reissued {
        snapshot_epoch: settled.snapshot_epoch,
        facts: settled.reissued,
        awaiting_items: settled.awaiting_items,
        set_aside: settled.set_aside,
    })
}
