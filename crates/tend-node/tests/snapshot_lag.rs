//! A member that missed a snapshot ceremony and some state facts below its epoch: once it
//! learns the completion it must still end with the same journal and state as the
//! signers. Found as the flaky CLI ceremony test (`tend-cli/tests/ceremony.rs`): a device
//! that was behind when the snapshot completed took the completion, after which every
//! fact below the snapshot was `Late` for it and below every session's floor, so the
//! device metadata and proposal it had missed never arrived and digests never agreed.
//! And the other way round: a state fact the cut-off member wrote below the snapshot, which
//! every other replica refuses as `Late`, must go from its journal once it adopts the
//! snapshot, or its journal and state would differ from everyone else's for good.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tend_core::maintenance::CacheInvalidated;
use tend_core::{DeviceId, MaintenanceFact, MaintenanceState, Payload};
use tend_node::{Device, Node};

fn state(node: &Node) -> MaintenanceState {
    let d = node.device();
    d.store().maintenance_state(d.namespace()).expect("state")
}

fn cut(a: &Node, b: &Node) {
    a.block_peer(b.device_id());
    b.block_peer(a.device_id());
}

fn heal(a: &Node, b: &Node) {
    a.unblock_peer(&b.device_id());
    b.unblock_peer(&a.device_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_missed_a_snapshot_gets_the_state_facts_below_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let device = Device::init(&dir.path().join(format!("d{i}")), &mut rng).expect("init");
        nodes.push(Node::start(device, config(vec![])).await.expect("start"));
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    let others: Vec<DeviceId> = nodes[1..].iter().map(|n| n.device_id()).collect();
    nodes[0]
        .create_authority(2, &others, Duration::from_secs(20))
        .await
        .expect("key generation over the network");
    let refs: Vec<&Node> = nodes.iter().collect();
    // Members advertise their metadata once they have joined; let that settle first, so
    // device 2 holds nothing the others lack when it is cut off but what it writes then.
    for n in &nodes {
        wait_until("everyone's metadata", Duration::from_secs(20), || {
            state(n).device_metadata.len() == 3
        })
        .await;
    }
    converge(&refs, Duration::from_secs(20)).await;

    // Device 2 is cut off; the others write a state fact and snapshot above it.
    cut(&nodes[0], &nodes[2]);
    cut(&nodes[1], &nodes[2]);
    let missed = nodes[1]
        .append(Payload::Maintenance(MaintenanceFact::CacheInvalidated(
            CacheInvalidated {
                keys: vec!["missed".into()],
                epoch_floor: state(&nodes[1]).current_epoch(),
            },
        )))
        .expect("append");
    // Meanwhile device 2 writes a state fact of its own that the snapshot will not cover.
    let stray = nodes[2]
        .append(Payload::Maintenance(MaintenanceFact::CacheInvalidated(
            CacheInvalidated {
                keys: vec!["stray".into()],
                epoch_floor: state(&nodes[2]).current_epoch(),
            },
        )))
        .expect("append");
    converge(&refs[..2], Duration::from_secs(20)).await;
    let done = nodes[1]
        .propose_snapshot(None, Duration::from_secs(20))
        .await
        .expect("ceremony between the two connected members");
    assert!(
        missed.epoch() < done.snapshot.epoch && stray.epoch() < done.snapshot.epoch,
        "both facts lie below the snapshot"
    );
    converge(&refs[..2], Duration::from_secs(20)).await;
    assert!(
        !nodes[2]
            .device()
            .store()
            .contains(missed.namespace(), missed.epoch(), &missed.id())
            .unwrap(),
        "device 2 was cut off"
    );

    // Healed, device 2 learns the snapshot and, with it, the state fact below it.
    heal(&nodes[0], &nodes[2]);
    heal(&nodes[1], &nodes[2]);
    wait_until("the snapshot on device 2", Duration::from_secs(20), || {
        state(&nodes[2])
            .latest_snapshot
            .as_ref()
            .is_some_and(|s| s.snapshot == done.snapshot)
    })
    .await;
    // On failure, show what each device holds (epoch and author of every fact).
    let start = Instant::now();
    while !(digest(&nodes[0]) == digest(&nodes[1]) && digest(&nodes[1]) == digest(&nodes[2])) {
        if start.elapsed() > Duration::from_secs(20) {
            for n in &nodes {
                let d = n.device();
                let facts: Vec<String> = d
                    .store()
                    .scan(d.namespace(), ..)
                    .expect("scan")
                    .map(|f| {
                        let f = f.expect("fact");
                        format!("{}@{}", f.id, f.epoch.0)
                    })
                    .collect();
                eprintln!("{}: {facts:?}", n.device_id());
            }
            panic!("no common digest after healing");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(nodes[2]
        .device()
        .store()
        .contains(missed.namespace(), missed.epoch(), &missed.id())
        .unwrap());
    // The stray fact was never part of the journal the others agreed on: it is gone.
    for n in &nodes {
        assert!(!n
            .device()
            .store()
            .contains(stray.namespace(), stray.epoch(), &stray.id())
            .unwrap());
    }
    assert_eq!(
        state(&nodes[2]).state_digest(),
        state(&nodes[1]).state_digest()
    );
    for n in &nodes {
        n.shutdown().await;
    }
}
