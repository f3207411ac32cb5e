//! A deterministic fault simulator over tend's sans-IO layers, and the fuzz corpus runner.
//!
//! One run (`Sim::new(SimConfig)`, `Sim::run`) drives N devices, each a tend-core journal
//! with its reduced state, a tend-sync `SessionManager` and a tend-snapshot
//! `SnapshotEngine`, from one `StdRng::seed_from_u64(seed)` and a simulated clock. The
//! network drops, duplicates, delays and reorders messages and partitions devices;
//! devices crash (losing their unflushed write buffer) and restart. The workload writes
//! application facts, changes membership with real FROST DKGs, runs snapshot ceremonies,
//! prunes, publishes and activates upgrades with fences, replaces the admin and lets a
//! retired admin keep issuing operations. Then every fault ends, devices sync until the
//! members agree, and [`invariants::check`] runs:
//!
//! - **agreement**: every pair of final members has the same effective journal digest
//!   (held facts plus the items their settled snapshot covers, so pruned and archive
//!   devices compare equal), the same `MaintenanceState::state_digest`, and settled the
//!   same snapshot; below the snapshot epoch an archive device holds only covered facts
//!   and a pruned device only covered maintenance/authority facts;
//! - **no valid fact lost**: every fact that was ever durable on a final member and whose
//!   author is a member at its epoch is, at or above the snapshot epoch, held by every
//!   member; below it, covered by the snapshot, or (answered `Late`) re-issued by its
//!   author with the same payload at or above the snapshot epoch;
//! - **nothing pruned before a verified snapshot**: each prune is checked, when it
//!   happens, against a `SnapshotCompleted` in the device's journal whose threshold
//!   signature verifies against the group key of its epoch;
//! - **no session crossed an activation fence**: no device admitted a fact through a
//!   session while its own fence was unsatisfied;
//! - **no retired admin's later operation took effect**: recomputed from the journal
//!   alone, every admin operation whose author was not the admin at its epoch is in the
//!   reducer's `ignored` set, and the reducer's admin chain matches.

pub mod corpus;
pub mod device;
pub mod invariants;
pub mod sim;

pub use sim::{Report, Sim, SimConfig, Stats};

/// Runs one seed with the CI shape.
pub fn run_seed(seed: u64, steps: usize) -> Report {
    Sim::new(SimConfig::small(seed, steps)).run()
}
