//! The item blob of a snapshot (blob format 3, docs/ARCHITECTURE.md section 4a): the list
//! of every `(epoch, id)` below the snapshot lives beside the snapshot blob, is read only by
//! a device that holds facts of its own the snapshot does not carry, and goes once every
//! member has said it settled the snapshot. Real device homes and stores.

use std::sync::Arc;

use rand::SeedableRng;
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::{ContentId, DataOp, Epoch, Payload, VerifiedFact};
use tend_node::data::{run, DataRequest, DataResponse};
use tend_node::data_request::Bytes64;
use tend_node::fleet::LocalFleet;
use tend_node::reissue::reissue_uncovered;
use tend_node::replica::{ITEM_BLOB_UNAVAILABLE, SET_ASIDE};
use tend_node::Device;

/// A 2-of-3 authority of fresh homes.
fn three(seed: u64) -> (tempfile::TempDir, Vec<Arc<Device>>, rand::rngs::StdRng) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let devices: Vec<Arc<Device>> = ["a", "b", "c"]
        .iter()
        .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).unwrap()))
        .collect();
    LocalFleet::new(devices.clone())
        .create_authority(2, &mut rng)
        .unwrap();
    (dir, devices, rng)
}

fn get(d: &Device, key: &str) -> Option<Vec<u8>> {
    let r = run(
        d,
        DataRequest::Get {
            collection: "notes".into(),
            key: key.into(),
        },
    )
    .unwrap();
    match r {
        DataResponse::Value(v) => v.map(|v| v.value.0),
        _ => unreachable!(),
    }
}

/// The item blob the latest snapshot's blob names, read from the blob's head.
fn item_blob_of(d: &Device) -> ContentId {
    let st = d.store().maintenance_state(d.namespace()).unwrap();
    let cid = st.latest_snapshot.unwrap().snapshot.blob_cid;
    let reader = d
        .store()
        .blob_reader(&cid)
        .unwrap()
        .expect("the snapshot blob");
    tend_snapshot::blob::read_item_ref(reader)
        .unwrap()
        .expect("a blob of format 3 names its item blob")
        .cid
}

fn put_key(f: &VerifiedFact) -> Option<&str> {
    match f.payload() {
        Payload::Data(DataOp::Put(p)) => Some(&p.key),
        _ => None,
    }
}

#[test]
fn the_item_blob_goes_once_every_member_has_settled_and_the_store_shrinks() {
    let (_dir, devices, mut rng) = three(21);
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let mut all = LocalFleet::new(devices.clone());
    // History: 3,000 puts over 10 keys, so the item list is 120 kB beside 10 live values.
    let ops = (0..3000u32)
        .map(|i| DataRequest::Put {
            collection: "notes".into(),
            key: format!("k{}", i % 10),
            value: Bytes64(i.to_be_bytes().to_vec()),
        })
        .collect();
    run(a, DataRequest::Batch { ops }).unwrap();
    all.sync().unwrap();
    let target = Epoch(a.snapshot_status().unwrap().current_epoch + 1);
    let done = all.snapshot(0, target, &mut rng).unwrap();
    all.sync().unwrap();
    let items = item_blob_of(a);
    let items_len = a.store().get_blob(&items).unwrap().unwrap().len() as u64;
    assert!(
        items_len > 3000 * 40,
        "the item blob lists the whole history"
    );
    let snapshot_len = a
        .store()
        .get_blob(&done.snapshot.blob_cid)
        .unwrap()
        .unwrap()
        .len() as u64;
    assert!(
        snapshot_len < items_len / 10,
        "the snapshot blob holds the state and the 10 live values, not the list"
    );

    // A settles and says so; B and C have not: A keeps the item blob through GC.
    reissue_uncovered(a).unwrap();
    all.sync().unwrap();
    let ns = a.namespace();
    let st = a.store().maintenance_state(ns).unwrap();
    assert_eq!(st.snapshot_settled.get(&a.device_id()), Some(&target));
    assert!(st.reclaimable_item_blobs().is_empty());
    let first = a.gc(false).unwrap();
    assert_eq!(first.blobs_pruned, 0);
    assert!(a.store().has_blob(&items).unwrap());

    // Once B and C have said so too, GC drops it; values and the snapshot blob stay.
    reissue_uncovered(b).unwrap();
    reissue_uncovered(c).unwrap();
    all.sync().unwrap();
    let st = a.store().maintenance_state(ns).unwrap();
    assert_eq!(st.reclaimable_item_blobs(), vec![items]);
    let blob_bytes = |d: &Device| d.store().blobs().unwrap().iter().map(|b| b.1).sum::<u64>();
    let held = blob_bytes(a);
    let second = a.gc(false).unwrap();
    assert_eq!(second.blobs_pruned, 1);
    assert!(!a.store().has_blob(&items).unwrap());
    assert_eq!(blob_bytes(a), held - items_len);
    assert!(second.compacted);
    assert!(
        second.store_bytes_after < first.store_bytes_after,
        "the store shrinks: {} -> {}",
        first.store_bytes_after,
        second.store_bytes_after
    );
    assert!(a.store().has_blob(&done.snapshot.blob_cid).unwrap());
    assert_eq!(get(a, "k9"), Some(2999u32.to_be_bytes().to_vec()));
    // Settling again says nothing more.
    let facts = a.store().maintenance_state(ns).unwrap();
    reissue_uncovered(a).unwrap();
    assert_eq!(
        a.store()
            .maintenance_state(ns)
            .unwrap()
            .snapshot_settled
            .len(),
        facts.snapshot_settled.len()
    );
}

/// A device cut off from the ceremony, with a covered put of its own that it superseded
/// itself and an uncovered one written while cut off: it needs the item list to tell them
/// apart, waits for it, and once fetched re-issues the uncovered one alone.
#[test]
fn a_device_that_needs_the_item_blob_fetches_it_and_reissues_exactly_its_uncovered_facts() {
    let (_dir, devices, mut rng) = three(22);
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let all = LocalFleet::new(devices.clone());
    a.put("notes", "mine", b"v1").unwrap();
    a.put("notes", "mine", b"v2").unwrap();
    all.sync().unwrap();
    // A is cut off and writes; B and C snapshot without it.
    a.put("notes", "lonely", b"written during a partition")
        .unwrap();
    let mut bc = LocalFleet::new(vec![b.clone(), c.clone()]);
    let target = Epoch(b.snapshot_status().unwrap().current_epoch + 1);
    bc.snapshot(0, target, &mut rng).unwrap();
    // The partition heals. The in-process fleet copies every blob; a running node fetches
    // only what it wants, so A is left without the item blob here.
    all.sync().unwrap();
    let items = item_blob_of(a);
    assert!(a.store().delete_blob(&items).unwrap());

    // A waits for the item list: nothing re-issued, nothing dropped, and it is wanted.
    let r = reissue_uncovered(a).unwrap();
    assert_eq!(r.awaiting_items, Some(items));
    assert!(r.facts.is_empty());
    assert!(get(a, "lonely").is_some());
    let st = a.store().maintenance_state(a.namespace()).unwrap();
    let wanted = tend_node::blobs::wanted(a.store(), &st).unwrap();
    assert!(wanted.iter().any(|w| w.cid == items));

    // Fetched as `tend/blob/1` stores it (checked against its CID), A settles.
    let bytes = b.store().get_blob(&items).unwrap().unwrap();
    a.store().put_blob(CODEC_DAG_CBOR, &bytes).unwrap();
    let r = reissue_uncovered(a).unwrap();
    assert_eq!(r.awaiting_items, None);
    assert_eq!(
        r.facts.iter().map(put_key).collect::<Vec<_>>(),
        vec![Some("lonely")],
        "the uncovered put alone: the covered v1 would come back beside v2"
    );
    assert!(r.set_aside.is_empty());
    assert_eq!(get(a, "mine").as_deref(), Some(&b"v2"[..]));
    // Settled, it wants the item blob no more (GC will drop it everywhere).
    assert!(a.store().delete_blob(&items).unwrap());
    let st = a.store().maintenance_state(a.namespace()).unwrap();
    let wanted = tend_node::blobs::wanted(a.store(), &st).unwrap();
    assert!(!wanted.iter().any(|w| w.cid == items));
    all.sync().unwrap();
    for d in [a, b, c] {
        assert_eq!(
            get(d, "lonely").as_deref(),
            Some(&b"written during a partition"[..])
        );
        assert_eq!(get(d, "mine").as_deref(), Some(&b"v2"[..]));
    }
}

/// The same device, when no peer holds the item blob any more (every member settled and
/// dropped it, or it was lost): it re-issues what is uncovered for certain or harmless to
/// write twice, and sets aside, reported and kept in a setting, the puts it cannot tell
/// apart. No covered put comes back, and nothing it wrote is thrown away unreported.
#[test]
fn without_the_item_blob_a_device_reissues_what_is_safe_and_sets_aside_the_rest() {
    let (_dir, devices, mut rng) = three(23);
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let all = LocalFleet::new(devices.clone());
    a.put("notes", "mine", b"v1").unwrap();
    a.put("notes", "mine", b"v2").unwrap();
    b.put("notes", "shared", b"from b").unwrap();
    b.put("notes", "gone", b"doomed").unwrap();
    all.sync().unwrap();
    // Cut off, A writes a new key, overwrites B's value and deletes another.
    a.put("notes", "lonely", b"written during a partition")
        .unwrap();
    a.put("notes", "shared", b"a overwrote").unwrap();
    a.delete("notes", "gone").unwrap();
    let mut bc = LocalFleet::new(vec![b.clone(), c.clone()]);
    let target = Epoch(b.snapshot_status().unwrap().current_epoch + 1);
    bc.snapshot(0, target, &mut rng).unwrap();
    all.sync().unwrap();
    let items = item_blob_of(a);
    for d in [a, b, c] {
        d.store().delete_blob(&items).unwrap();
    }
    // What the node records when every peer asked lacks it.
    a.store()
        .put_setting(ITEM_BLOB_UNAVAILABLE, &items.to_string())
        .unwrap();

    let r = reissue_uncovered(a).unwrap();
    assert_eq!(r.awaiting_items, None);
    let mut reissued: Vec<String> = r
        .facts
        .iter()
        .map(|f| f.payload().kind_name() + ":" + put_key(f).unwrap_or("-"))
        .collect();
    reissued.sort();
    assert_eq!(
        reissued,
        vec!["delete:notes:-", "put:notes:shared"],
        "a delete is harmless twice; a put superseding a carried value is uncovered"
    );
    let mut aside: Vec<&str> = r.set_aside.iter().filter_map(put_key).collect();
    aside.sort();
    assert_eq!(
        aside,
        vec!["lonely", "mine"],
        "the covered v1 and the new key"
    );
    let kept: Vec<String> = a.store().get_setting(SET_ASIDE).unwrap().unwrap();
    assert_eq!(kept.len(), 2);
    // No covered put came back, and A reads what every other member reads.
    assert_eq!(get(a, "mine").as_deref(), Some(&b"v2"[..]));
    assert_eq!(get(a, "lonely"), None);
    all.sync().unwrap();
    for d in [a, b, c] {
        assert_eq!(get(d, "shared").as_deref(), Some(&b"a overwrote"[..]));
        assert_eq!(get(d, "gone"), None);
        assert_eq!(get(d, "mine").as_deref(), Some(&b"v2"[..]));
    }
}

/// A device keeps the snapshot blob it builds as references to the facts it carries (store
/// format 4, docs/ARCHITECTURE.md section 4a), and GC keeps those facts, so it holds them
/// once. Through a
/// second snapshot that supersedes every value the first carried, each blob still reads
/// byte for byte as it was built: the first is turned back into bytes before GC prunes
/// the puts it names.
#[test]
fn gc_keeps_the_latest_snapshot_blob_as_facts_and_every_blob_reads_as_built() {
    let (_dir, devices, mut rng) = three(22);
    let a = &devices[0];
    let mut all = LocalFleet::new(devices.clone());
    let puts = |round: u32| DataRequest::Batch {
        ops: (0..200u32)
            .map(|i| DataRequest::Put {
                collection: "notes".into(),
                key: format!("k{}", i % 20),
                value: Bytes64(vec![round as u8; 200 + i as usize]),
            })
            .collect(),
    };
    let mut blobs = Vec::new();
    for round in 0..2u32 {
        run(a, puts(round)).unwrap();
        all.sync().unwrap();
        let target = Epoch(a.snapshot_status().unwrap().current_epoch + 1);
        let done = all.snapshot(0, target, &mut rng).unwrap();
        all.sync().unwrap();
        let cid = done.snapshot.blob_cid;
        // Built by the ceremony as references to the facts it carries, and byte for byte
        // the blob streamed from the journal.
        let built = a.store().get_blob(&cid).unwrap().unwrap();
        let streamed = tend_node::fleet::StoreJournal::new(a.store(), a.namespace())
            .try_snapshot_blob(target)
            .unwrap()
            .encode();
        assert_eq!(built, streamed);
        assert!(a.store().blob_kept_as_facts(&cid).unwrap());
        for d in &devices {
            reissue_uncovered(d).unwrap();
        }
        all.sync().unwrap();
        for d in &devices {
            let r = d.gc(false).unwrap();
            assert!(r.snapshot_blob_as_facts, "{r:?}");
            assert!(d.store().blob_kept_as_facts(&cid).unwrap());
            assert_eq!(d.store().get_blob(&cid).unwrap().unwrap(), built);
        }
        blobs.push((cid, built));
    }
    let (first, first_bytes) = &blobs[0];
    for d in &devices {
        // Its tombstone (written when the second completed) is not covered yet.
        assert!(d.store().has_blob(first).unwrap());
        assert!(!d.store().blob_kept_as_facts(first).unwrap());
        assert_eq!(&d.store().get_blob(first).unwrap().unwrap(), first_bytes);
        assert_eq!(get(d, "k19"), Some(vec![1u8; 399]));
    }
}
