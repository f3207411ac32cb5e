//! A deterministic fault simulator over tend's sans-IO layers, and the fuzz corpus runner.
//!
//! One run (`Sim::new(SimConfig)`, `Sim::run`) drives N devices, each a tend-core journal
//! with its reduced state, a tend-sync `SessionManager` and a tend-snapshot
//! `SnapshotEngine`, from one `StdRng::seed_from_u64(seed)` and a simulated clock. The
//! network drops, duplicates, delays and reorders messages and partitions devices;
//! devices crash (losing their unflushed write buffer) and restart. The workload writes
//! application facts (log appends, and puts, deletes and log trims over a small key space,
//! each superseding the heads of its key the writer holds, so overwrites and concurrent
//! writes are common), changes membership with real FROST DKGs, runs snapshot ceremonies,
//! prunes, publishes and activates upgrades with fences, replaces the admin and lets a
//! retired admin keep issuing operations. Then every fault ends, devices sync until the
//! members agree, and [`invariants::check`] runs:
//!
//! - **agreement**: every pair of final members has the same effective journal digest
//!   (held facts plus the items their settled snapshot covers, so pruned and archive
//!   devices compare equal), the same `MaintenanceState::state_digest`, and settled the
//!   same snapshot; below the snapshot epoch an archive device holds only covered facts
//!   and a pruned device only covered maintenance/authority facts and the application
//!   facts live in the prefix below E (computed over every covered fact, not over the
//!   device's own);
//! - **no live application value lost, every replica reads the whole journal's state**:
//!   each member's `AppState` digest (under the agreed cache floors) equals that of the
//!   journal as it truly is: below E every valid fact the snapshot covers (from the
//!   oracle, pruned or not), at or above E the facts the members hold (uncovered facts
//!   below E were retracted and re-issued, so their re-issues stand in for them); and,
//!   when each prune happens, it leaves the pruning device's application state unchanged
//!   (a value lost there and overwritten before the end is still caught);
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
//!
//! The device model ([`device::Core`]) keeps a durable journal and a write buffer that a
//! crash discards; it serves sync sessions from durable facts only (a device never offers
//! what a crash could make it forget), and the oracle counts a fact once it was durable on
//! some device. When the reducer reports a newer verified snapshot, the device *settles*
//! it: it gets the blob (rebuilt from its own journal when the CID matches, else fetched
//! after a completed session), hydrates the prefix's state facts, drops facts below E that
//! the snapshot does not cover (its own are re-issued at the current epoch, durably),
//! drops facts a late-learned membership change makes inadmissible, drops application
//! facts below E that are live only because it lacks the covered facts superseding them
//! (the blob lists what is live), and prunes covered application facts that are not live
//! in the prefix unless it is an archive device. Each fix the simulator led to has a
//! switch in [`SimConfig`] (and `tend-sim --no-...`) so its seed can be replayed broken.
//!
//! Final members: the member (in its own view) with the newest view is the reference;
//! the devices its membership lists are compared. Facts only ever durable on devices that
//! left the authority are "stranded" and not counted as lost; neither are invalid facts
//! (author not a member at the fact's epoch in the reference state).

pub mod corpus;
pub mod device;
pub mod invariants;
pub mod scenario;
pub mod sim;

pub use scenario::{Scenario, SCENARIOS};
pub use sim::{NetFaults, PartitionStyle, Report, Sim, SimConfig, Stats};

/// Runs one seed with the CI shape.
pub fn run_seed(seed: u64, steps: usize) -> Report {
    Sim::new(SimConfig::small(seed, steps)).run()
}
