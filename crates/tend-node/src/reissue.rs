//! DESIGN rule 5 on the author's side: once a verified snapshot is known, re-issue this
//! device's own facts below it that the snapshot does not cover, at the current epoch.
//!
//! Such a fact was written while the device had not seen the proposal (a partition, say).
//! Peers will never take it (it is below their floor, `Late`), so without a new copy its
//! payload would be lost. The snapshot blob lists every covered `(epoch, id)` from its
//! base on; facts below the base were settled by the previous snapshot.

use tend_core::app::is_data;
use tend_core::{Epoch, VerifiedFact};
use tend_snapshot::SnapshotBlob;
use tend_store::StoreError;

use crate::device::{Device, DeviceError};

/// Setting: the snapshot epoch whose uncovered facts this device already re-issued.
const SETTLED: &str = "reissued_below_snapshot";

/// What [`reissue_uncovered`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reissued {
    /// The snapshot epoch settled, if a snapshot with a stored blob is known.
    pub snapshot_epoch: Option<Epoch>,
    /// New facts written (one per uncovered fact of this device).
    pub facts: Vec<VerifiedFact>,
}

/// Re-issues this device's uncovered facts below the latest verified snapshot, once per
/// snapshot. Does nothing until the snapshot's blob is in the store (it says what is
/// covered). Idempotent: a settled snapshot is remembered in the store's settings.
pub fn reissue_uncovered(device: &Device) -> Result<Reissued, DeviceError> {
    let store = device.store();
    let ns = device.namespace();
    let state = store.maintenance_state(ns)?;
    let Some(latest) = state.latest_snapshot.as_ref() else {
        return Ok(Reissued::default());
    };
    let epoch = latest.snapshot.epoch;
    let settled: Option<u64> = store.get_setting(SETTLED)?;
    if settled.is_some_and(|s| s >= epoch.0) {
        return Ok(Reissued {
            snapshot_epoch: Some(epoch),
            facts: Vec::new(),
        });
    }
    let Some(bytes) = store.get_blob(&latest.snapshot.blob_cid)? else {
        return Ok(Reissued::default());
    };
    let blob = SnapshotBlob::decode(&bytes)
        .map_err(|e| DeviceError::InvalidInput(format!("stored snapshot blob: {e}")))?;
    let from = blob.base.map_or(Epoch::ZERO, |b| b.epoch);
    let me = device.device_id();
    let mut uncovered = Vec::new();
    let mut retract = Vec::new();
    for stored in store.scan(ns, from..epoch)? {
        let stored = stored?;
        if blob.items.binary_search(&(stored.epoch, stored.id)).is_ok() {
            continue;
        }
        let fact = stored.verify().map_err(|source| StoreError::FactCorrupt {
            path: store.path().to_owned(),
            source,
        })?;
        if !is_data(fact.payload()) {
            // Maintenance facts were settled when the snapshot was adopted.
            continue;
        }
        retract.push(fact.order_key());
        // Only the author may re-issue (the others' authors do it for theirs).
        if fact.author() == me && fact.payload().is_reissuable() {
            uncovered.push(fact.payload().clone());
        }
    }
    let mut facts = Vec::new();
    for payload in uncovered {
        facts.push(device.append(payload)?);
    }
    // The originals are `Late` everywhere else: kept here they would be live here only
    // (a value or a log entry twice). Re-issued first, so a crash between the two steps
    // can repeat a payload but never lose one.
    store.retract_data(ns, &retract)?;
    store.put_setting(SETTLED, &epoch.0)?;
    Ok(Reissued {
        snapshot_epoch: Some(epoch),
        facts,
    })
}
