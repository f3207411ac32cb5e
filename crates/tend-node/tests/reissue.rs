//! DESIGN rule 5: a fact written below a snapshot its author had not seen is not lost; the
//! author re-issues it at the current epoch once it learns the snapshot.

use std::sync::Arc;

use rand::SeedableRng;
use tend_core::{Epoch, Payload};
use tend_node::fleet::LocalFleet;
use tend_node::reissue::reissue_uncovered;
use tend_node::Device;

#[test]
fn an_uncovered_fact_below_a_snapshot_is_reissued_by_its_author_and_reaches_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let devices: Vec<Arc<Device>> = ["a", "b", "c"]
        .iter()
        .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).unwrap()))
        .collect();
    let mut all = LocalFleet::new(devices.clone());
    all.create_authority(2, &mut rng).unwrap();
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);

    // A is cut off and writes a fact; B and C snapshot without it.
    let lonely = a
        .add_application_fact("note", b"written during a partition")
        .unwrap();
    let mut bc = LocalFleet::new(vec![b.clone(), c.clone()]);
    let target = Epoch(b.snapshot_status().unwrap().current_epoch + 1);
    let done = bc.snapshot(0, target, &mut rng).unwrap();
    assert!(lonely.epoch() < done.snapshot.epoch);

    // Nothing to do before the snapshot is known.
    assert!(reissue_uncovered(a).unwrap().facts.is_empty());

    // The partition heals: A learns the snapshot and its blob (sync does this).
    all.sync().unwrap();
    let r = reissue_uncovered(a).unwrap();
    assert_eq!(r.snapshot_epoch, Some(done.snapshot.epoch));
    assert_eq!(r.facts.len(), 1);
    let copy = &r.facts[0];
    assert_eq!(copy.payload(), lonely.payload());
    assert!(copy.epoch() >= done.snapshot.epoch);
    // Once per snapshot.
    assert!(reissue_uncovered(a).unwrap().facts.is_empty());

    // The copy reaches everyone; the payload is not lost.
    all.sync().unwrap();
    for d in [b, c] {
        let has = d
            .store()
            .scan(d.namespace(), done.snapshot.epoch..)
            .unwrap()
            .map(|f| f.unwrap().verify().unwrap())
            .any(|f| matches!(f.payload(), Payload::Application { data, .. } if data == b"written during a partition"));
        assert!(has, "{} lacks the re-issued fact", d.device_id());
    }
    // Covered facts are not re-issued: B and C have nothing to do.
    assert!(reissue_uncovered(b).unwrap().facts.is_empty());
}
