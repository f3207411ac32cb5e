//! GC-aware reconciliation between running devices: pruned and archive devices reconcile
//! only the items at or above the GC floor both agree on, and a device that missed a newer
//! snapshot learns it in the same session.

mod common;

use std::time::Duration;

use common::*;
use tend_core::{Epoch, Hash32};
use tend_node::{GcPolicy, Node, NodeConfig};

fn floor(n: &Node) -> Epoch {
    let d = n.device();
    d.store()
        .maintenance_state(d.namespace())
        .unwrap()
        .snapshot_epoch()
}

/// Digest of the items at or above `from`.
fn upper_digest(n: &Node, from: Epoch) -> Hash32 {
    let d = n.device();
    let mut h = blake3::Hasher::new();
    for item in d.store().items(d.namespace(), from..).unwrap() {
        let (e, id) = item.unwrap();
        h.update(&e.0.to_be_bytes());
        h.update(id.as_bytes());
    }
    Hash32(*h.finalize().as_bytes())
}

fn state_digest(n: &Node) -> Hash32 {
    let d = n.device();
    d.store()
        .maintenance_state(d.namespace())
        .unwrap()
        .state_digest()
}

fn counter(n: &Node, name: &str) -> f64 {
    metric(&n.metrics().render(), name).unwrap_or(0.0)
}

/// Every pair syncs once, both directions; every session must complete.
async fn sync_pairs(nodes: &[&Node]) {
    for a in nodes {
        for b in nodes {
            if a.device_id() != b.device_id() {
                let out = a.sync_with(b.peer_addr()).await;
                assert!(
                    out.ok,
                    "{} -> {}: {}",
                    a.device_id(),
                    b.device_id(),
                    out.result
                );
            }
        }
    }
}

fn assert_agree(nodes: &[&Node]) {
    let f = floor(nodes[0]);
    for n in nodes {
        assert_eq!(floor(n), f);
        assert_eq!(upper_digest(n, f), upper_digest(nodes[0], f));
        assert_eq!(state_digest(n), state_digest(nodes[0]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_pruned_devices_reconcile_above_the_shared_floor() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    // GC is the test's own step here: the pruning devices do not collect by themselves.
    for i in 0..2 {
        fleet.device(i).set_gc_policy(GcPolicy::Manual).unwrap();
    }
    fleet.device(2).set_gc_policy(GcPolicy::Archive).unwrap();
    bulk_facts(fleet.device(0), "a", 30);
    bulk_facts(fleet.device(1), "b", 30);
    // Sessions only when the test asks, so every one of them is checked.
    let cfg = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        push_on_write: false,
        // No metadata advertisements: every fact here is one the test wrote.
        upgrades: false,
        ..config(vec![])
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(fleet.take(i), cfg.clone()).await.unwrap());
    }
    let (a, b, x) = (&nodes[0], &nodes[1], &nodes[2]);
    let all = [a, b, x];
    sync_pairs(&all).await;

    // Snapshot at E1, then the two pruning devices collect garbage while running.
    let e1 = a
        .device()
        .store()
        .maintenance_state(a.device().namespace())
        .unwrap()
        .current_epoch()
        .next();
    // The bulk log is trimmed below E1, so its entries are not live there: GC reclaims them.
    let trim = tend_node::data::DataRequest::LogTrim {
        log: "bulk".into(),
        before: format!("{}-0-{}", e1.0, "0".repeat(64)),
    };
    tend_node::data::run(a.device(), trim).unwrap();
    sync_pairs(&all).await;
    complete_snapshot(a.device(), e1, &[1]);
    sync_pairs(&all).await;
    for n in [a, b] {
        let r = n.gc(false).unwrap();
        assert_eq!(r.floor, e1.0);
        assert!(r.facts_pruned >= 60, "{r:?}");
        // The running device compacts too: nothing holds its store between sessions.
        assert!(r.compacted, "{r:?}");
        assert_eq!(r.store_bytes_after, n.device().store().file_size().unwrap());
    }
    assert!(x.gc(false).is_err(), "an archive device never prunes");
    // While something holds a's store (an iterator here, as a session's snapshot would),
    // gc leaves compaction for a later call and says so.
    let live = a.device().store().scan(a.device().namespace(), ..).unwrap();
    assert!(!a.gc(false).unwrap().compacted);
    drop(live);
    assert!(a.gc(false).unwrap().compacted);
    for (i, n) in all.iter().enumerate() {
        n.add_fact("note", format!("after-gc-{i}").as_bytes())
            .unwrap();
    }
    sync_pairs(&all).await;
    assert_agree(&all);
    assert!(
        fact_count(x) > fact_count(a),
        "the archive keeps the pruned prefix"
    );

    // b misses the next snapshot: a snapshots at E2 with x, and prunes again.
    for n in [a, x] {
        n.add_fact("note", format!("before-e2-{}", n.device_id()).as_bytes())
            .unwrap();
    }
    sync_pairs(&[a, x]).await;
    sync_pairs(&[b, a]).await;
    let e2 = a
        .device()
        .store()
        .maintenance_state(a.device().namespace())
        .unwrap()
        .current_epoch()
        .next();
    complete_snapshot(a.device(), e2, &[2]);
    sync_pairs(&[a, x]).await;
    a.gc(false).unwrap();
    assert_eq!(floor(b), e1);
    // b (floor E1) opens a session to a (floor E2): the completion reaches b in the same
    // session, b sends nothing below E2, and the next session uses E2.
    let out = b.sync_with(a.peer_addr()).await;
    assert!(out.ok, "{}", out.result);
    assert_eq!(floor(b), e2);
    b.gc(false).unwrap();
    for (i, n) in all.iter().enumerate() {
        n.add_fact("note", format!("after-e2-{i}").as_bytes())
            .unwrap();
    }
    sync_pairs(&all).await;
    assert_agree(&all);

    for n in all {
        assert_eq!(counter(n, "tend_sessions_failed_total"), 0.0);
        // A session whose initiator still used a peer's older floor may carry a few facts
        // below the new one (seen under load in the full test run): they are answered
        // `Late`, counted, and never blamed on the sender. What must hold is that no
        // session failed, no peer was demoted, and every device agrees.
        let late = counter(n, "tend_facts_rejected_total{reason=\"late\"}");
        assert!(late <= 16.0, "{late} facts below a floor were sent");
        for p in n.peers() {
            assert_eq!(p.misbehaviours, 0, "{} demoted", p.device_id);
            assert!(p.trust >= tend_node::peer_table::MEMBER_TRUST, "{p:?}");
        }
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

/// What `get` reads on a device, if anything.
fn read(n: &Node, collection: &str, key: &str) -> Option<Vec<u8>> {
    use tend_node::data::{run, DataRequest, DataResponse};
    let req = DataRequest::Get {
        collection: collection.into(),
        key: key.into(),
    };
    match run(n.device(), req) {
        Ok(DataResponse::Value(Some(v))) => Some(v.value.0),
        _ => None,
    }
}

/// The done-when of the application-state issue, over the network: a member that joins
/// after a snapshot and GC (it never saw the facts below the snapshot, which reconcile
/// no more) reads every live value, the large one included, and the same application
/// state as the device that wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_after_gc_reads_every_live_value() {
    let mut fleet = Fleet::new(2, &[true, false]);
    // The test collects garbage itself, right after the snapshot.
    fleet.device(0).set_gc_policy(GcPolicy::Manual).unwrap();
    let cfg = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        push_on_write: false,
        upgrades: false,
        ..config(vec![])
    };
    let a = Node::start(fleet.take(0), cfg.clone()).await.unwrap();
    let d = a.device();
    d.put("notes", "a", b"0").unwrap();
    d.put("notes", "a", b"1").unwrap();
    d.put("notes", "gone", b"x").unwrap();
    d.delete("notes", "gone").unwrap();
    let large: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    d.put("notes", "large", &large).unwrap();
    a.add_fact("todo", b"buy milk").unwrap();
    let e = d
        .store()
        .maintenance_state(d.namespace())
        .unwrap()
        .current_epoch()
        .next();
    complete_snapshot(a.device(), e, &[1]);
    let r = a.gc(false).unwrap();
    assert!(
        r.facts_pruned >= 3,
        "a=0 and the put and delete of gone: {r:?}"
    );
    assert_eq!(read(&a, "notes", "a").as_deref(), Some(&b"1"[..]));
    // a keeps its snapshot blob as references to the facts GC kept: b hydrates from the
    // bytes a rebuilds from them.
    assert!(r.snapshot_blob_as_facts, "{r:?}");

    let b = Node::start(
        fleet.take(1),
        NodeConfig {
            peers: vec![a.peer_addr()],
            ..cfg
        },
    )
    .await
    .unwrap();
    a.add_peer(b.peer_addr()).unwrap();
    let app_digest = |n: &Node| {
        let d = n.device();
        let floors = d
            .store()
            .maintenance_state(d.namespace())
            .unwrap()
            .cache_floors;
        d.store().app_digest(d.namespace(), &floors).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while read(&b, "notes", "large").as_deref() != Some(&large[..]) {
        assert!(
            std::time::Instant::now() < deadline,
            "b never read the large value (a: {:?}, floor {:?})",
            read(&b, "notes", "a"),
            floor(&b)
        );
        b.sync_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(floor(&b), e);
    assert_eq!(read(&b, "notes", "a").as_deref(), Some(&b"1"[..]));
    assert_eq!(read(&b, "notes", "gone"), None);
    assert_eq!(app_digest(&b), app_digest(&a));
    for n in [&a, &b] {
        n.shutdown().await;
    }
}
