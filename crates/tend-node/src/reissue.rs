//! DESIGN rule 5 on the author's side: once a verified snapshot is known, re-issue this
//! device's own facts below it that the snapshot does not cover, at the current epoch.
//!
//! Such a fact was written while the device had not seen the proposal (a partition, say).
//! Peers will never take it (it is below their floor, `Late`), so without a new copy its
//! payload would be lost. The snapshot blob lists every covered `(epoch, id)` from its
//! base on; facts below the base were settled by the previous snapshot.

use std::collections::HashSet;

use tend_core::app::is_data;
use tend_core::{Epoch, FactId, VerifiedFact};
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
    // The node calls this after rounds and before automatic GC, from different threads:
    // one run at a time, so a payload is never re-issued twice.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    // A device that holds exactly the snapshot's prefix (the common case: it signed, or
    // synced before the ceremony) has nothing uncovered below it, and its live set there
    // is the one the blob carries: nothing to re-issue or drop, and no blob to read.
    if store.prefix_digest(ns, epoch)? == latest.snapshot.digest {
        store.put_setting(SETTLED, &epoch.0)?;
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
    // A covered fact this device holds may still look live here because it never received
    // the write that superseded it (a delete, say: the snapshot carries no delete, and
    // nothing below the snapshot is reconciled any more). The blob's application facts are
    // the prefix's live set, certified by the members: what is live here below the
    // snapshot but not carried by it goes. Dropping one can uncover an older write it
    // superseded here, so until none is left (each round removes facts, so it ends).
    // Found by tend-sim (seed 111).
    if blob.version >= 2 {
        let carried: HashSet<(Epoch, FactId)> = blob.facts.iter().map(|f| f.order_key()).collect();
        loop {
            let stale: Vec<_> = store
                .live_below(ns, epoch)?
                .into_iter()
                .filter(|k| !carried.contains(k))
                .collect();
            if stale.is_empty() || store.retract_data(ns, &stale)? == 0 {
                break;
            }
        }
    }
    store.put_setting(SETTLED, &epoch.0)?;
    Ok(Reissued {
        snapshot_epoch: Some(epoch),
        facts,
    })
}
