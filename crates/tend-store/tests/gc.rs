//! Pruning below a verified snapshot (DESIGN rule 4) and compaction.

mod common;

use common::*;
use tend_core::Epoch;
use tend_store::{Store, StoreError};

#[test]
fn prune_needs_a_verified_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    s.insert_batch(&[genesis, app(ns, 1, &k, b"x")]).unwrap();
    let err = s.prune(ns).unwrap_err();
    assert!(matches!(err, StoreError::NoSnapshot { .. }), "{err}");
    assert!(matches!(
        s.prune_dry_run(ns),
        Err(StoreError::NoSnapshot { .. })
    ));
    // A snapshot signed by the wrong key does not count.
    let digest = s.prefix_digest(ns, Epoch(2)).unwrap();
    let forged = snapshot_completed(ns, &key(9), 2, 2, digest);
    let r = s.insert_batch(&[forged]).unwrap();
    assert_eq!(r.rejected.len(), 1); // key(9) is not a member
    assert!(matches!(s.prune(ns), Err(StoreError::NoSnapshot { .. })));
}

#[test]
fn prune_keeps_the_reduced_state_and_drops_tombstoned_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let old_blob = s.put_blob(0x55, &[1u8; 5000]).unwrap();
    let new_blob = s.put_blob(0x55, &[2u8; 5000]).unwrap();
    let kept_blob = s.put_blob(0x55, &[3u8; 5000]).unwrap();
    let mut facts = vec![genesis];
    facts.extend((0..1000u64).map(|i| app(ns, 1 + i / 100, &k, &i.to_be_bytes())));
    facts.push(cache_invalidated(ns, 3, &k, "users", 3));
    facts.push(tombstone(ns, 4, &k, old_blob));
    facts.push(tombstone(ns, 11, &k, new_blob));
    // The app log is trimmed below epoch 8, so its entries there are no longer live.
    facts.push(trim_notes(ns, 7, &k, 8));
    s.insert_batch(&facts).unwrap();
    let digest = s.prefix_digest(ns, Epoch(8)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 8, 8, digest)])
        .unwrap();
    let state = s.maintenance_state(ns).unwrap();
    let suffix_digest_items: Vec<_> = s
        .items(ns, Epoch(8)..)
        .unwrap()
        .map(|x| x.unwrap())
        .collect();

    let dry = s.prune_dry_run(ns).unwrap();
    assert!(dry.dry_run);
    // Genesis (epoch 0), the trimmed entries at epochs 1..=7, the invalidation, the
    // tombstone and the trim itself.
    assert_eq!(dry.facts, 1 + 700 + 2 + 1);
    assert_eq!(dry.live_kept, 0);
    assert_eq!((dry.blobs, dry.blob_bytes), (1, 5000));
    assert_eq!(s.stats(ns).unwrap().unwrap().facts, 1006);

    let r = s.prune(ns).unwrap();
    assert_eq!(
        (r.facts, r.fact_bytes, r.blobs),
        (dry.facts, dry.fact_bytes, 1)
    );
    assert!(!r.dry_run);
    assert_eq!(r.floor, Epoch(8));
    assert!(!s.has_blob(&old_blob).unwrap());
    assert!(s.has_blob(&new_blob).unwrap() && s.has_blob(&kept_blob).unwrap());

    // Same reduced state, also after reopening (recomputed from disk).
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    let st = s.stats(ns).unwrap().unwrap();
    assert_eq!(st.facts, 1006 - dry.facts);
    assert_eq!(st.min_epoch, Some(Epoch(8)));
    assert_eq!(st.maintenance_facts, 5);
    assert_eq!(
        s.items(ns, ..)
            .unwrap()
            .map(|x| x.unwrap())
            .collect::<Vec<_>>(),
        suffix_digest_items
    );
    // Pruned maintenance facts are still there for reduction and lookups.
    assert_eq!(s.scan_maintenance(ns).unwrap().count(), 5);
    assert!(s.contains(ns, Epoch(0), &facts[0].id()).unwrap());
    // Re-sending a pruned maintenance fact is a duplicate, a pruned application fact is late.
    let r2 = s.insert_batch(&facts[..2]).unwrap();
    assert_eq!(r2.duplicates, 1);
    assert_eq!(r2.rejected[0].error.reason(), "late");

    let path = s.path().to_owned();
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    // Pruning again removes nothing.
    let again = s.prune(ns).unwrap();
    assert_eq!((again.facts, again.blobs), (0, 0));
}

#[test]
fn prune_and_compact_shrink_a_100k_fact_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let s = Store::create(&path).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    s.insert_batch(&[genesis]).unwrap();
    let n = 100_000u64;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let mut data = [0u8; 64];
        data[..8].copy_from_slice(&i.to_be_bytes());
        batch.push(app(ns, 1 + i / 1000, &k, &data));
        if batch.len() == 10_000 {
            assert_eq!(s.insert_batch(&batch).unwrap().inserted, 10_000);
            batch.clear();
        }
    }
    let target = 1 + n / 1000;
    // Every entry is trimmed, so none is live below the snapshot.
    s.insert_batch(&[trim_notes(ns, target - 1, &k, target)])
        .unwrap();
    let digest = s.prefix_digest(ns, Epoch(target)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, target, target, digest)])
        .unwrap();
    let state = s.maintenance_state(ns).unwrap();
    let before = s.file_size().unwrap();
    eprintln!("{:#?}", s.table_usage().unwrap()[0]);
    let r = s.prune(ns).unwrap();
    assert_eq!(r.facts, n + 2);
    // While an iterator is alive (as a running device's sync session may hold one),
    // compaction changes nothing and says the store is busy.
    let live = s.scan(ns, ..).unwrap();
    assert!(matches!(s.compact(), Err(StoreError::Busy { .. })));
    assert_eq!(s.file_size().unwrap(), before);
    drop(live);
    let c = s.compact().unwrap();
    assert_eq!(c.bytes_before, before);
    let after = s.file_size().unwrap();
    assert_eq!(c.bytes_after, after);
    eprintln!("100k facts: {before} bytes, after prune+compact: {after} bytes");
    assert!(
        after * 5 <= before,
        "file shrank only from {before} to {after}"
    );
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    assert_eq!(s.stats(ns).unwrap().unwrap().facts, 1);
}

fn put(
    ns: tend_core::JournalNamespace,
    epoch: u64,
    k: &ed25519_dalek::SigningKey,
    key: &str,
    value: tend_core::app::Value,
    supersedes: Vec<tend_core::FactId>,
) -> tend_core::VerifiedFact {
    tend_core::UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: tend_core::Payload::Data(tend_core::DataOp::Put(tend_core::app::Put {
            collection: "c".into(),
            key: key.into(),
            value,
            supersedes,
        })),
    }
    .sign(k)
}

/// DESIGN rule 4 for application data: pruning keeps every live value (and the blob it
/// names, even if another write tombstoned the same content), drops what was superseded,
/// and the application state reads the same before, after and after reopening.
#[test]
fn prune_keeps_live_values_and_their_blobs() {
    use tend_core::app::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let s = Store::create(&path).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let shared = s.put_blob(0x55, &[7u8; 20_000]).unwrap();
    let inline = |b: &[u8]| Value::Inline(serde_bytes::ByteBuf::from(b.to_vec()));
    let blob = Value::Blob {
        cid: shared,
        len: 20_000,
    };
    let a1 = put(ns, 1, &k, "a", inline(b"1"), vec![]);
    let a2 = put(ns, 2, &k, "a", inline(b"2"), vec![a1.id()]);
    // Two keys hold the same large content; one is overwritten (its blob tombstoned).
    let b1 = put(ns, 2, &k, "b", blob.clone(), vec![]);
    let c1 = put(ns, 2, &k, "c", blob, vec![]);
    let c2 = put(ns, 3, &k, "c", inline(b"small"), vec![c1.id()]);
    let facts = vec![
        genesis,
        a1.clone(),
        a2.clone(),
        b1.clone(),
        c1.clone(),
        c2.clone(),
        tombstone(ns, 3, &k, shared),
    ];
    s.insert_batch(&facts).unwrap();
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 5, 5, digest)])
        .unwrap();
    let floors = s.maintenance_state(ns).unwrap().cache_floors;
    let before = s.app_digest(ns, &floors).unwrap();
    let r = s.prune(ns).unwrap();
    assert_eq!(r.live_kept, 3, "a2, b1 and c2 stay: {r:?}");
    assert_eq!(r.blobs, 0, "b still names the tombstoned content");
    assert!(s.has_blob(&shared).unwrap());
    for gone in [&a1, &c1] {
        assert!(!s.contains(ns, gone.epoch(), &gone.id()).unwrap());
    }
    assert_eq!(s.app_digest(ns, &floors).unwrap(), before);
    let e = s.app_state(ns).unwrap().get("c", "a").unwrap();
    assert_eq!(e.winner, a2.order_key());
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.app_digest(ns, &floors).unwrap(), before);
}

/// GC keeps what the prefix's state needs; run again with nothing left to prune (which
/// it tells by counting, without listing the live set) it removes nothing; and a value
/// that a write above the snapshot superseded stays (the whole journal's state no longer
/// reads it, the prefix's does).
#[test]
fn prune_keeps_the_prefix_live_set_and_a_second_prune_removes_nothing() {
    use tend_core::app::Value;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let inline = |b: &[u8]| Value::Inline(serde_bytes::ByteBuf::from(b.to_vec()));
    let a1 = put(ns, 1, &k, "a", inline(b"1"), vec![]);
    let b1 = put(ns, 1, &k, "b", inline(b"1"), vec![]);
    let b2 = put(ns, 2, &k, "b", inline(b"2"), vec![b1.id()]);
    s.insert_batch(&[genesis, a1.clone(), b1.clone(), b2.clone()])
        .unwrap();
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 5, 5, digest)])
        .unwrap();
    let floors = s.maintenance_state(ns).unwrap().cache_floors;
    let first = s.prune(ns).unwrap();
    // b1, and the genesis from the journal index (it stays in the maintenance table).
    assert_eq!((first.facts, first.maintenance), (2, 1), "{first:?}");
    assert!(!s.contains(ns, b1.epoch(), &b1.id()).unwrap());
    let again = s.prune(ns).unwrap();
    assert_eq!((again.facts, again.live_kept), (0, 2), "{again:?}");
    // Above the floor, a write superseding a1.
    let a2 = put(ns, 6, &k, "a", inline(b"2"), vec![a1.id()]);
    s.insert_batch(std::slice::from_ref(&a2)).unwrap();
    let before = s.app_digest(ns, &floors).unwrap();
    let third = s.prune(ns).unwrap();
    assert_eq!((third.facts, third.live_kept), (0, 2), "{third:?}");
    for kept in [&a1, &b2, &a2] {
        assert!(s.contains(ns, kept.epoch(), &kept.id()).unwrap());
    }
    assert_eq!(s.app_digest(ns, &floors).unwrap(), before);
    assert_eq!(
        s.app_state(ns).unwrap().get("c", "a").unwrap().winner,
        a2.order_key()
    );
}

/// The first GC after a snapshot of live records only takes the maintenance facts out of
/// the index (they stay in the maintenance table), whatever a dry run or the state says.
#[test]
fn with_every_record_live_only_maintenance_facts_leave_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let entries: Vec<_> = (0..50u64)
        .map(|i| app(ns, 1 + i % 4, &k, &i.to_le_bytes()))
        .collect();
    let mut batch = vec![genesis.clone()];
    batch.extend(entries.iter().cloned());
    s.insert_batch(&batch).unwrap();
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    let done = snapshot_completed(ns, &k, 5, 5, digest);
    s.insert_batch(std::slice::from_ref(&done)).unwrap();
    let state = s.maintenance_state(ns).unwrap();
    let app_digest = s.app_digest(ns, &state.cache_floors).unwrap();

    let folded = s.app_state(ns).unwrap();
    let dry = s.prune_dry_run(ns).unwrap();
    let pruned = s.prune(ns).unwrap();
    assert_eq!(
        (pruned.facts, pruned.maintenance, pruned.live_kept),
        (1, 1, 50),
        "{pruned:?}"
    );
    // No record went, so the folded application state stays (a million records take
    // seconds to fold again).
    assert!(std::sync::Arc::ptr_eq(&folded, &s.app_state(ns).unwrap()));
    assert_eq!(
        (dry.facts, dry.maintenance, dry.live_kept, dry.fact_bytes),
        (
            pruned.facts,
            pruned.maintenance,
            pruned.live_kept,
            pruned.fact_bytes
        )
    );
    // The genesis left the index (items) but not the store; every entry is still there.
    let items: Vec<_> = s.items(ns, ..).unwrap().map(|i| i.unwrap()).collect();
    assert!(!items.contains(&genesis.order_key()));
    assert!(s.contains(ns, genesis.epoch(), &genesis.id()).unwrap());
    for e in &entries {
        assert!(items.contains(&e.order_key()));
    }
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    assert_eq!(s.app_digest(ns, &state.cache_floors).unwrap(), app_digest);
    let again = s.prune(ns).unwrap();
    assert_eq!((again.facts, again.live_kept), (0, 50), "{again:?}");
}
