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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::SeedableRng;

    use super::*;
    use crate::fleet::LocalFleet;
    use crate::Device;

    /// A ceremony the in-process fleet runs on stopped homes records each signer's vote
    /// in its store, where the running node's engine (or a later fleet) restores it from.
    #[test]
    fn votes_cast_by_the_fleet_are_kept_in_each_members_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let devices: Vec<Arc<Device>> = ["a", "b"]
            .iter()
            .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).unwrap()))
            .collect();
        let mut fleet = LocalFleet::new(devices.clone());
        fleet.create_authority(2, &mut rng).unwrap();
        devices[0].add_application_fact("note", b"x").unwrap();
        let target = Epoch(devices[0].snapshot_status().unwrap().current_epoch + 1);
        let done = fleet.snapshot(0, target, &mut rng).unwrap();
        for d in &devices {
            let mut fresh = SnapshotEngine::new(d.device_id());
            restore(d.store(), &mut fresh).unwrap();
            assert_eq!(
                fresh.votes().get(&target),
                Some(&done.snapshot.digest),
                "device {} lost its vote",
                d.device_id()
            );
        }
    }
}
