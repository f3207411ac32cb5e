//! The snapshot vote ledger: the digest this member signed per target epoch, kept in its
//! store, so that it signs at most one digest per epoch across restarts and whichever
//! driver runs its ceremony engine (the running node's ceremonies, or the in-process fleet
//! that `tend authority create --member-home` and `tend snapshot propose` on stopped homes
//! use). Two snapshots completing at one epoch would let devices prune for different ones
//! (found by tend-sim, seed 1447).

use tend_core::{Epoch, Hash32};
use tend_snapshot::SnapshotEngine;
use tend_store::{Store, StoreError};

/// Setting holding the votes (target epoch -> digest signed).
const VOTES: &str = "snapshot_votes";

/// Gives `engine` the votes stored; returns how many it then holds.
pub(crate) fn restore(store: &Store, engine: &mut SnapshotEngine) -> Result<usize, StoreError> {
    let votes: Vec<(Epoch, Hash32)> = store.get_setting(VOTES)?.unwrap_or_default();
    engine.restore_votes(votes);
    Ok(engine.votes().len())
}

/// Stores the engine's votes if it cast one since `saved` were stored; returns how many
/// are stored. Called before any output of the engine leaves the device, so a vote is
/// durable before a signature share carrying it is sent.
pub(crate) fn save(
    store: &Store,
    engine: &SnapshotEngine,
    saved: usize,
) -> Result<usize, StoreError> {
    let votes = engine.votes();
    if votes.len() != saved {
        let list: Vec<(Epoch, Hash32)> = votes.iter().map(|(e, h)| (*e, *h)).collect();
        store.put_setting(VOTES, &list)?;
    }
    Ok(votes.len())
}
