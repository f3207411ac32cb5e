//! DESIGN rule 5: a fact written below a snapshot its author had not seen is not lost; the
//! author re-issues it at the current epoch once it learns the snapshot.

mod common;

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
            .any(|f| match f.payload() {
                Payload::Data(tend_core::DataOp::Append(a)) => {
                    &a.data[..] == b"written during a partition"
                }
                _ => false,
            });
        assert!(has, "{} lacks the re-issued fact", d.device_id());
    }
    // Covered facts are not re-issued: B and C have nothing to do.
    assert!(reissue_uncovered(b).unwrap().facts.is_empty());
}

/// Regression (tend-sim seed 111): a device that adopts a snapshot without a covered delete
/// (the snapshot carries no delete, and nothing below it is reconciled any more) must not
/// keep reading the value the delete removed. The blob's application facts are the live
/// set below the snapshot; what is live here but not carried by it goes when the device
/// settles the snapshot.
#[test]
fn a_value_deleted_below_a_snapshot_is_not_kept_by_a_device_that_missed_the_delete() {
    use tend_node::data::{run, DataRequest, DataResponse};

    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let a = Device::init(&dir.path().join("a"), &mut rng).unwrap();
    let ns = a.namespace();
    a.put("notes", "k", b"doomed").unwrap();
    a.put("notes", "kept", b"stays").unwrap();
    // B holds A's journal so far (A's device key is the authority's group key).
    let b = Device::init_joining(&dir.path().join("b"), ns, &mut rng).unwrap();
    let held: Vec<_> = a
        .store()
        .scan(ns, ..)
        .unwrap()
        .map(|f| f.unwrap().verify().unwrap())
        .chain(
            a.store()
                .scan_maintenance(ns)
                .unwrap()
                .map(|f| f.unwrap().verify().unwrap()),
        )
        .collect();
    assert!(b.store().insert_batch(&held).unwrap().rejected.is_empty());

    // A deletes the value and snapshots; B never receives the delete.
    a.delete("notes", "k").unwrap();
    let e = Epoch(a.snapshot_status().unwrap().current_epoch + 1);
    let (completion, bytes) = common::complete_snapshot(&a, e, &[1]);
    let blob = tend_snapshot::SnapshotBlob::decode(&bytes).unwrap();
    // B adopts the snapshot as a session does: the blob, its facts, then the completion.
    b.store()
        .put_blob(tend_core::ids::CODEC_DAG_CBOR, &bytes)
        .unwrap();
    let mut batch = blob.facts.clone();
    batch.push(completion);
    b.store().insert_batch(&batch).unwrap();
    let get = |d: &Device, key: &str| match run(
        d,
        DataRequest::Get {
            collection: "notes".into(),
            key: key.into(),
        },
    )
    .unwrap()
    {
        DataResponse::Value(v) => v.map(|v| v.value.0),
        _ => unreachable!(),
    };
    assert_eq!(
        get(&b, "k").as_deref(),
        Some(&b"doomed"[..]),
        "stale before settling"
    );

    reissue_uncovered(&b).unwrap();
    assert_eq!(get(&b, "k"), None, "the deleted value is gone");
    assert_eq!(get(&b, "kept").as_deref(), Some(&b"stays"[..]));
    let digest = |d: &Device| {
        let floors = d.store().maintenance_state(ns).unwrap().cache_floors;
        d.store().app_digest(ns, &floors).unwrap()
    };
    assert_eq!(digest(&b), digest(&a));
}
