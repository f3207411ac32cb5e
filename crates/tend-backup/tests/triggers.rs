//! Snapshot triggers over a real store, as the running node evaluates them on its timer:
//! the fact limit proposes, a completed snapshot resets the figures, and the age clock
//! starts when the device first sees a snapshot.

mod common;

use common::*;
use tend_backup::triggers::{evaluate, load_triggers, save_triggers};
use tend_backup::{SnapshotTriggers, TriggerDecision, TriggerReason};
use tend_core::Epoch;

#[test]
fn the_node_loop_proposes_at_the_limits_and_resets_after_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(dir.path(), "d");
    let ns = d.namespace();
    assert_eq!(
        load_triggers(d.store()).unwrap(),
        SnapshotTriggers::default()
    );
    save_triggers(
        d.store(),
        &SnapshotTriggers {
            facts: 40,
            bytes: 0,
            age_secs: 100,
        },
    )
    .unwrap();
    add_facts(&d, 30, 1..=2, "a");
    let (decision, stats) = evaluate(d.store(), ns, 1_000).unwrap();
    assert_eq!(decision, TriggerDecision::Idle, "{stats:?}");
    add_facts(&d, 20, 2..=3, "b");
    let (decision, stats) = evaluate(d.store(), ns, 1_010).unwrap();
    assert_eq!(stats.facts_since, 51, "the genesis and 50 facts");
    let TriggerDecision::Propose {
        target_epoch,
        reason: TriggerReason::Facts { .. },
    } = decision
    else {
        panic!("expected a proposal by fact count, got {decision:?}");
    };
    assert_eq!(target_epoch, Epoch(4));

    // The node runs the ceremony at that target; afterwards only ceremony facts are above it.
    let d = snapshot(vec![d], target_epoch.0).pop().unwrap();
    let (decision, stats) = evaluate(d.store(), ns, 2_000).unwrap();
    assert_eq!(decision, TriggerDecision::Idle, "{stats:?}");
    assert_eq!(stats.new_facts_since, 0);
    assert_eq!(
        stats.since_secs,
        Some(2_000),
        "the age clock restarts with the snapshot"
    );

    // One new fact, then the age limit passes.
    add_facts(&d, 1, 4..=4, "c");
    assert_eq!(
        evaluate(d.store(), ns, 2_050).unwrap().0,
        TriggerDecision::Idle
    );
    let (decision, _) = evaluate(d.store(), ns, 2_100).unwrap();
    assert!(
        matches!(
            decision,
            TriggerDecision::Propose {
                reason: TriggerReason::Age {
                    secs: 100,
                    limit: 100
                },
                ..
            }
        ),
        "{decision:?}"
    );
}
