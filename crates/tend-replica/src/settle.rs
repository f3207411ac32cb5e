//! Adopting a snapshot: what may stay below it, and what this device writes again above it
//! (DESIGN rule 5).
//!
//! A fact below a snapshot that the snapshot does not cover was written or learned while
//! this device was cut off from the signers. Every other replica refuses it as `Late`, so
//! kept here it would leave this replica's journal and state different from all the others
//! for good; it goes, and its author (only its author can) writes the payload again at the
//! current epoch, so nothing valid is lost.

use std::collections::HashSet;

use tend_core::app::is_data;
use tend_core::{DataOp, Epoch, FactId, Payload, VerifiedFact};
use tend_snapshot::blob::read_blob_keys;

use crate::{Adopted, BlobAt, Key, Replica, ReplicaError};

/// Rules that the simulator can switch off one at a time, to show that it catches the
/// divergence each one prevents. Every real device runs [`Rules::default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Settling drops the application facts below the snapshot that are live here but
    /// not in the snapshot (found by tend-sim, seed 111: off, a device that settled
    /// without some covered facts reads deleted or overwritten values forever).
    pub drop_stale: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Self { drop_stale: true }
    }
}

/// What [`settle`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// The snapshot epoch settled, if a snapshot with a stored blob is known.
    pub snapshot_epoch: Option<Epoch>,
    /// New facts written (one per uncovered fact of this device).
    pub reissued: Vec<VerifiedFact>,
    /// Facts below the snapshot that it does not cover, dropped.
    pub retracted: Vec<Key>,
    /// Application facts below the snapshot that only looked live here, dropped.
    pub stale: Vec<Key>,
}

/// Once the batch that adopted a snapshot is written: drops the maintenance and
/// authority facts below it that its blob does not carry, and re-issues this device's own
/// standing facts among them (a cache floor, its metadata, its readiness) at the current
/// epoch. Does nothing if the snapshot is no longer the latest. Returns what was
/// re-issued.
pub fn adopt<R: Replica>(
    replica: &mut R,
    adopted: &Adopted,
) -> Result<Vec<VerifiedFact>, R::Error> {
    let latest = replica.state()?.latest_snapshot.map(|l| l.snapshot.epoch);
    if latest != Some(adopted.epoch) {
        return Ok(Vec::new());
    }
    retract_maintenance(replica, adopted.epoch, &adopted.state_facts).map(|(_, re)| re)
}

/// Drops the maintenance facts below `below` not in `keep`; re-issues this device's own
/// reissuable ones. Returns the keys dropped and the facts re-issued.
fn retract_maintenance<R: Replica>(
    replica: &mut R,
    below: Epoch,
    keep: &HashSet<FactId>,
) -> Result<(Vec<Key>, Vec<VerifiedFact>), R::Error> {
    let dropped = replica.retract_maintenance(below, keep)?;
    if !dropped.is_empty() {
        tracing::info!(
            "dropped {} maintenance facts below snapshot {below} that it does not cover",
            dropped.len()
        );
    }
    let me = replica.device_id();
    let mut reissued = Vec::new();
    for f in &dropped {
        if f.author() == me && f.payload().is_reissuable() {
            match replica.append(f.payload().clone()) {
                Ok(g) => reissued.push(g),
                Err(e) => tracing::warn!("cannot re-issue a retracted maintenance fact: {e}"),
            }
        }
    }
    Ok((dropped.iter().map(|f| f.order_key()).collect(), reissued))
}

/// Settles the latest verified snapshot, once: re-issues this device's facts below it that
/// it does not cover, drops every uncovered fact there, and drops the application facts
/// that only look live here. Does nothing until the snapshot's blob is stored (it says
/// what is covered). Idempotent: a settled snapshot is remembered
/// ([`Replica::mark_settled`]).
///
/// ```ignore
/// let done = tend_replica::settle(&mut replica, Rules::default())?;
/// ```
pub fn settle<R: Replica>(
    replica: &mut R,
    rules: Rules,
) -> Result<Settlement, ReplicaError<R::Error>> {
    let store = ReplicaError::Store;
    let state = replica.state().map_err(store)?;
    let Some(latest) = state.latest_snapshot.as_ref() else {
        return Ok(Settlement::default());
    };
    let epoch = latest.snapshot.epoch;
    let done = Settlement {
        snapshot_epoch: Some(epoch),
        ..Settlement::default()
    };
    let settled = replica.settled().map_err(store)?;
    if settled >= Some(epoch) {
        return Ok(done);
    }
    // A device that holds exactly the snapshot's prefix (the common case: it signed, or
    // synced before the ceremony) has nothing uncovered below it, and its live set there
    // is the one the blob carries: nothing to re-issue or drop, and no blob to read.
    if replica.prefix_digest(epoch).map_err(store)? == latest.snapshot.digest {
        replica.mark_settled(epoch).map_err(store)?;
        return Ok(done);
    }
    let BlobAt::Stored(reader) = replica
        .snapshot_blob(&latest.snapshot.blob_cid)
        .map_err(store)?
    else {
        return Ok(Settlement::default());
    };
    // Only the blob's keys are kept (no facts), and its facts are not verified one by one:
    // the completion that names it is certified.
    let blob = read_blob_keys(reader, &latest.certified)?;
    // From the base on, the blob lists every covered item. Below the base, coverage was
    // settled with the base, unless this device skipped the base snapshot: then it cannot
    // tell covered from uncovered there, and a fact the blob does not carry as live goes,
    // this device's own live ones, deletes and trims re-issued (at-least-once: never lost,
    // though a value that a write this device never received superseded can come back).
    let base = blob.base.map_or(Epoch::ZERO, |b| b.epoch);
    let from = base.min(settled.unwrap_or(Epoch::ZERO));
    let carried = |key: &Key| blob.facts.binary_search(key).is_ok();
    let live_below_base: HashSet<Key> = if from < base {
        replica
            .live_below(base)
            .map_err(store)?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    let me = replica.device_id();
    let mut out = done;
    let mut uncovered = Vec::new();
    replica
        .scan(from, epoch, &mut |fact| {
            let key = fact.order_key();
            // Maintenance facts are settled below, against the blob's facts.
            if !is_data(fact.payload()) {
                return;
            }
            // Below an unsettled base, what this device's own state supersedes or trims is
            // not written again (a new copy would bring the old value back); everything
            // else is (a delete or a trim changes nothing twice, and nothing supersedes an
            // application fact).
            let (covered, wanted) = if key.0 >= base {
                (blob.items.binary_search(&key).is_ok(), true)
            } else {
                let supersedable = matches!(
                    fact.payload(),
                    Payload::Data(DataOp::Put(_) | DataOp::CachePut(_) | DataOp::Append(_))
                );
                (
                    carried(&key),
                    !supersedable || live_below_base.contains(&key),
                )
            };
            if covered {
                return;
            }
            out.retracted.push(key);
            // Only the author may re-issue (the others' authors do it for theirs).
            if wanted && fact.author() == me && fact.payload().is_reissuable() {
                uncovered.push(fact.payload().clone());
            }
        })
        .map_err(store)?;
    for payload in uncovered {
        out.reissued.push(replica.append(payload).map_err(store)?);
    }
    // The originals are `Late` everywhere else: kept here they would be live here only
    // (a value or a log entry twice). Re-issued first, so a crash between the two steps
    // can repeat a payload but never lose one.
    replica.retract_data(&out.retracted).map_err(store)?;
    if blob.version >= 2 {
        // The blob carries every maintenance and authority fact below the snapshot: what
        // else is here went in while this device was cut off (adopted without hydrating,
        // say, when the completion came from the ceremony itself).
        let (dropped, reissued) =
            retract_maintenance(replica, epoch, &blob.state_facts).map_err(store)?;
        out.retracted.extend(dropped);
        out.reissued.extend(reissued);
    }
    // A covered fact this device holds may still look live here because it never received
    // the write that superseded it (a delete, say: the snapshot carries no delete, and
    // nothing below the snapshot is reconciled any more). The blob's application facts are
    // the prefix's live set, certified by the members: what is live here below the
    // snapshot but not carried by it goes. Dropping one can uncover an older write it
    // superseded here, so until none is left (each round removes facts, so it ends).
    if blob.version >= 2 && rules.drop_stale {
        loop {
            let stale: Vec<Key> = replica
                .live_below(epoch)
                .map_err(store)?
                .into_iter()
                .filter(|k| !carried(k))
                .collect();
            if stale.is_empty() || replica.retract_data(&stale).map_err(store)? == 0 {
                break;
            }
            out.stale.extend(stale);
        }
    }
    replica.mark_settled(epoch).map_err(store)?;
    Ok(out)
}
