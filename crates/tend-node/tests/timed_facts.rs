//! Timed facts (formats 2 and 3) in the running device: a device writes them only once every
//! member announced a release that reads them, stops when a member joins that has not,
//! and a fleet writing them converges. Real devices and nodes on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use tend_core::VerifiedFact;
use tend_node::data::{Bytes64, DataRequest};
use tend_node::{Device, Node};

fn note(device: &Device, text: &str) -> VerifiedFact {
    device
        .add_application_fact("notes", text.as_bytes())
        .expect("append")
}

/// The facts `device` holds that `node` wrote, newest last, with their times.
fn times_of(node: &Node, author: tend_core::DeviceId) -> Vec<Option<u64>> {
    let d = node.device();
    d.store()
        .scan(d.namespace(), ..)
        .expect("scan")
        .map(|f| f.expect("fact").verify().expect("verify"))
        .filter(|f| {
            f.author() == author && !matches!(f.payload(), tend_core::Payload::Maintenance(_))
        })
        .map(|f| f.time_ms())
        .collect()
}

#[test]
fn a_device_writes_timed_facts_only_when_every_member_reads_them() {
    let fleet = Fleet::new(2, &[true, true]);
    let (a, b) = (fleet.device(0), fleet.device(1));
    assert_eq!(note(a, "before anyone announced").time_ms(), None);

    tend_node::upgrade::advertise(a).expect("advertise");
    assert_eq!(
        note(a, "b has not announced").time_ms(),
        None,
        "a member whose release is unknown may not read the timed format"
    );

    tend_node::upgrade::advertise(b).expect("advertise");
    let from_b: Vec<VerifiedFact> = b
        .store()
        .scan_maintenance(b.namespace())
        .expect("scan")
        .map(|f| f.expect("fact").verify().expect("verify"))
        .collect();
    let r = a.store().insert_batch(&from_b).expect("insert");
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    let timed = note(a, "every member reads it");
    let t = timed.time_ms().expect("a timed fact once both announced");
    assert_eq!(
        timed.format(),
        tend_core::FactFormat::TimedZip215 { time_ms: t },
        "both run this release, which reads format 3"
    );
    assert_eq!(
        &timed.id().0[..6],
        &t.to_be_bytes()[2..],
        "the id starts with the time"
    );

    // A new member that has announced nothing: back to the untimed format.
    let mut ids = fleet.ids.clone();
    ids.push(tend_core::DeviceId([7; 32]));
    add_members(a, &ids, 2);
    assert_eq!(note(a, "a third member joined").time_ms(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_writing_timed_facts_converges() {
    let mut fleet = Fleet::new(2, &[true, true]);
    let b = Node::start(fleet.take(1), config(vec![])).await.unwrap();
    let a = Node::start(fleet.take(0), config(vec![b.peer_addr()]))
        .await
        .unwrap();
    b.add_peer(a.peer_addr()).unwrap();
    // Each node announces its release when it starts; once both announcements crossed,
    // writes on either side are timed.
    let (ida, idb) = (a.device().device_id(), b.device().device_id());
    wait_until(
        "both members' announcements everywhere",
        Duration::from_secs(30),
        || {
            [&a, &b].iter().all(|n| {
                let d = n.device();
                d.store()
                    .maintenance_state(d.namespace())
                    .is_ok_and(|s| s.write_format(|| 0).time_ms().is_some())
            })
        },
    )
    .await;
    for (node, who) in [(&a, "a"), (&b, "b")] {
        for i in 0..20 {
            node.data(DataRequest::Put {
                collection: "todo".into(),
                key: format!("{who}{i}"),
                value: Bytes64(vec![i]),
            })
            .expect("put");
        }
        note(node.device(), &format!("from {who}"));
    }
    converge(&[&a, &b], Duration::from_secs(30)).await;
    for node in [&a, &b] {
        for author in [ida, idb] {
            let times = times_of(node, author);
            assert!(
                times.iter().filter(|t| t.is_some()).count() >= 21,
                "each member's 21 writes are timed and held everywhere: {times:?}"
            );
        }
    }
    assert_eq!(digest(&a), digest(&b));
}
