//! The snapshot vote ledger: the digest this member signed per target epoch, kept in its
//! store, so that it signs at most one digest per epoch across restarts and whichever
//! driver runs its ceremony engine (the running node's ceremonies, or the in-process fleet
//! that `tend authority create --member-home` and `tend snapshot propose` on stopped homes
//! use). Two snapshots completing at one epoch would let devices prune for different ones
//! (found by tend-sim, seed 1447).

use std::collections::BTreeMap;

use tend_core::{Epoch, Hash32};
use tend_snapshot::SnapshotEngine;
use tend_store::{Store, StoreError};

/// Setting holding the votes (target epoch -> digest signed).
const VOTES: &str = "snapshot_votes";

/// Gives `engine` the votes stored.
pub(crate) fn restore(store: &Store, engine: &mut SnapshotEngine) -> Result<(), StoreError> {
    let votes: Vec<(Epoch, Hash32)> = store.get_setting(VOTES)?.unwrap_or_default();
    engine.restore_votes(votes);
    Ok(())
}

/// Keeps `votes` (the engine's `CeremonyAction::SaveVotes`), durably, before the driver
/// carries out the engine's next action.
pub(crate) fn save(store: &Store, votes: &BTreeMap<Epoch, Hash32>) -> Result<(), StoreError> {
    let list: Vec<(Epoch, Hash32)> = votes.iter().map(|(e, h)| (*e, *h)).collect();
    store.put_setting(VOTES, &list)
}
