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
use tend_core::maintenance::SnapshotSettled;
use tend_core::{ContentId, DataOp, Epoch, FactId, MaintenanceFact, Payload, VerifiedFact};
use tend_snapshot::blob::{read_blob_keys, read_item_ref};

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
    /// The snapshot's item blob, which settling needs (this device holds facts of its own
    /// below the snapshot that its blob does not carry) and the device does not hold yet:
    /// fetch it, then settle again. Nothing was changed meanwhile.
    pub awaiting_items: Option<ContentId>,
    /// This device's own facts below the snapshot that its blob does not carry and that
    /// could not be told covered or uncovered, because no peer held the item blob any
    /// more: dropped from the journal like the uncovered ones, but not re-issued (a covered
    /// put re-issued would come back beside what superseded it). Kept aside
    /// ([`Replica::set_aside`]) and reported, so an operator can write again what the
    /// application still wants.
    pub set_aside: Vec<VerifiedFact>,
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
/// what is covered), nor, from blob format 3 on, while the item blob it needs is not
/// ([`Settlement::awaiting_items`]). Idempotent: a settled snapshot is remembered
/// ([`Replica::mark_settled`]); a member then says so (`SnapshotSettled`).
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
        // Said once settled; again if a crash or a failed write came between.
        if says_settled(replica, &state, epoch) {
            let item_blob = match replica
                .snapshot_blob(&latest.snapshot.blob_cid)
                .map_err(store)?
            {
                BlobAt::Stored(reader) => read_item_ref(reader)?.map(|r| r.cid),
                BlobAt::Fetching | BlobAt::Unavailable => None,
            };
            say_settled(replica, epoch, item_blob);
        }
        return Ok(done);
    }
    // A device that holds exactly the snapshot's prefix (the common case: it signed, or
    // synced before the ceremony) has nothing uncovered below it, and its live set there
    // is the one the blob carries: nothing to re-issue or drop, and no blob to read.
    if replica.prefix_digest(epoch).map_err(store)? == latest.snapshot.digest {
        // The item blob this device will not need, named from the blob's head if stored.
        let item_blob = match replica
            .snapshot_blob(&latest.snapshot.blob_cid)
            .map_err(store)?
        {
            BlobAt::Stored(reader) => read_item_ref(reader)?.map(|r| r.cid),
            BlobAt::Fetching | BlobAt::Unavailable => None,
        };
        finish(replica, epoch, item_blob).map_err(store)?;
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
    // From version 3 on the items are in the item blob. Only this device's own facts need
    // them (only their author re-issues; the others' go unless carried, as the blob's
    // facts are the prefix's whole live set), so it is read only when this device holds
    // own facts from the base on that the blob does not carry (docs/ARCHITECTURE.md 4a).
    let mut items_known = blob.item_ref.is_none();
    let mut read_items = None;
    if !items_known {
        let mut needs_items = false;
        replica
            .scan(base, epoch, &mut |fact| {
                needs_items |= fact.author() == me
                    && is_data(fact.payload())
                    && fact.payload().is_reissuable()
                    && blob.facts.binary_search(&fact.order_key()).is_err();
            })
            .map_err(store)?;
        if needs_items {
            let r = blob
                .item_ref
                .expect("a blob without items inline names its item blob");
            match replica.snapshot_blob(&r.cid).map_err(store)? {
                BlobAt::Stored(reader) => {
                    read_items = Some(blob.read_items(reader)?);
                    items_known = true;
                }
                BlobAt::Fetching => {
                    return Ok(Settlement {
                        awaiting_items: Some(r.cid),
                        ..Settlement::default()
                    })
                }
                // Every member settled and dropped it: the fallback below.
                BlobAt::Unavailable => {}
            }
        }
    }
    let carried_ids: HashSet<FactId> = if items_known {
        HashSet::new()
    } else {
        blob.facts.iter().map(|(_, id)| *id).collect()
    };
    let items: &[Key] = read_items.as_deref().unwrap_or(&blob.items);
    let carried = |key: &Key| blob.facts.binary_search(key).is_ok();
    let mut uncovered = Vec::new();
    let mut set_aside = Vec::new();
    // The data facts kept below the snapshot that it does not carry: only these can be
    // stale (below), so a device whose facts the blob all carries (a member that just
    // hydrated from it) never materialises its live set.
    let mut not_carried = Vec::new();
    let drops_stale = blob.version >= 2 && rules.drop_stale;
    if drops_stale && from > Epoch::ZERO {
        replica
            .scan(Epoch::ZERO, from, &mut |fact| {
                if is_data(fact.payload()) && !carried(&fact.order_key()) {
                    not_carried.push(fact.order_key());
                }
            })
            .map_err(store)?;
    }
    replica
        .scan(from, epoch, &mut |fact| {
            let key = fact.order_key();
            // Maintenance facts are settled below, against the blob's facts.
            if !is_data(fact.payload()) {
                return;
            }
            if key.0 >= base && !items_known {
                // Without the items: a fact the blob does not carry is not live in the
                // prefix whether or not the prefix holds it, so it goes either way. Only
                // its author must know which, to re-issue an uncovered payload.
                if carried(&key) {
                    return;
                }
                out.retracted.push(key);
                if fact.author() != me || !fact.payload().is_reissuable() {
                    return;
                }
                match unresolved_fallback(fact.payload(), &carried_ids) {
                    Fallback::Reissue => uncovered.push(fact.payload().clone()),
                    Fallback::SetAside => set_aside.push(fact),
                }
                return;
            }
            // Below an unsettled base, what this device's own state supersedes or trims is
            // not written again (a new copy would bring the old value back); everything
            // else is (a delete or a trim changes nothing twice, and nothing supersedes an
            // application fact).
            let (covered, wanted) = if key.0 >= base {
                (items.binary_search(&key).is_ok(), true)
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
                // In the prefix but not live there (for a fact below the base, covered
                // means carried).
                if !carried(&key) {
                    not_carried.push(key);
                }
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
    if !set_aside.is_empty() {
        tracing::warn!(
            "{} facts of this device below snapshot {epoch} cannot be told covered or \
             uncovered (no peer holds its item blob any more): set aside, not re-issued",
            set_aside.len()
        );
        replica.set_aside(&set_aside).map_err(store)?;
        out.set_aside = set_aside;
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
    // What is live below the snapshot and not carried is among `not_carried`: every other
    // data fact kept there is carried, or was just retracted.
    if drops_stale && !not_carried.is_empty() {
        not_carried.sort_unstable();
        loop {
            let stale: Vec<Key> = replica
                .live_below(epoch)
                .map_err(store)?
                .into_iter()
                .filter(|k| not_carried.binary_search(k).is_ok())
                .collect();
            if stale.is_empty() || replica.retract_data(&stale).map_err(store)? == 0 {
                break;
            }
            out.stale.extend(stale);
        }
    }
    finish(replica, epoch, blob.item_ref.map(|r| r.cid)).map_err(store)?;
    Ok(out)
}

/// Records a settled snapshot, and tells the others (`SnapshotSettled`), so that once
/// every member has, the item blob can go.
fn finish<R: Replica>(
    replica: &mut R,
    epoch: Epoch,
    item_blob: Option<ContentId>,
) -> Result<(), R::Error> {
    let state = replica.state()?;
    if says_settled(replica, &state, epoch) {
        say_settled(replica, epoch, item_blob);
    }
    replica.mark_settled(epoch)
}

/// Whether this device is a member that has not yet said it settled `epoch` (a device
/// that is not a member could not write it, and is not waited for).
fn says_settled<R: Replica>(
    replica: &R,
    state: &tend_core::MaintenanceState,
    epoch: Epoch,
) -> bool {
    let me = replica.device_id();
    state.membership().is_some_and(|m| m.members.contains(&me))
        && state.snapshot_settled.get(&me).is_none_or(|e| *e < epoch)
}

/// Writes `SnapshotSettled`. A failure only delays dropping the item blob (the next
/// settle says it again), so it is logged, not returned.
fn say_settled<R: Replica>(replica: &mut R, epoch: Epoch, item_blob: Option<ContentId>) {
    let fact = Payload::Maintenance(MaintenanceFact::SnapshotSettled(SnapshotSettled {
        snapshot_epoch: epoch,
        item_blob,
    }));
    if let Err(e) = replica.append(fact) {
        tracing::warn!("cannot say that snapshot {epoch} is settled: {e}");
    }
}

/// What settling does with one of this device's own facts that the snapshot's blob does
/// not carry, when the item list that would say whether the snapshot covers it is gone.
#[derive(Debug, PartialEq, Eq)]
enum Fallback {
    /// Re-issued: uncovered for certain, or harmless to write twice.
    Reissue,
    /// Neither: kept aside and reported.
    SetAside,
}

/// A delete or a trim changes nothing written twice, so it is re-issued. A put that names
/// among the writes it supersedes one the blob carries cannot be covered (covered, it
/// would have superseded that write in the prefix, which would then not be live), so it
/// is re-issued too. Any other put, cache put or log entry may be covered and superseded
/// or trimmed there: re-issued it could come back, dropped silently it could be lost.
fn unresolved_fallback(payload: &Payload, carried: &HashSet<FactId>) -> Fallback {
    let names_carried = |ids: &[FactId]| ids.iter().any(|id| carried.contains(id));
    match payload {
        Payload::Data(DataOp::Delete(_) | DataOp::Trim(_)) => Fallback::Reissue,
        Payload::Data(DataOp::Put(p)) if names_carried(&p.supersedes) => Fallback::Reissue,
        Payload::Data(DataOp::CachePut(c)) if names_carried(&c.supersedes) => Fallback::Reissue,
        _ => Fallback::SetAside,
    }
}
