//! Batch admission, scans, lookups, digests, stats, blobs and settings on real redb files.

mod common;

use common::*;
use tend_core::{reduce, Epoch, FactId, Journal, JournalError};
use tend_store::{Store, StoreError};

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    (dir, s)
}

#[test]
fn facts_come_back_in_epoch_id_order_and_verify() {
    let (_d, s) = new_store();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let mut facts = vec![genesis];
    for i in 0..300u64 {
        facts.push(app(ns, 1 + (i * 7) % 13, &k, &i.to_le_bytes()));
    }
    facts.reverse(); // the genesis last: the batch is sorted anyway
    let r = s.insert_batch(&facts).unwrap();
    assert_eq!(r.inserted, 301);
    assert!(r.rejected.is_empty());

    let mut journal = Journal::new(ns);
    for f in &facts {
        journal.insert(f.clone()).unwrap();
    }
    let stored: Vec<_> = s.scan(ns, ..).unwrap().map(|f| f.unwrap()).collect();
    let expected: Vec<_> = journal.iter().collect();
    assert_eq!(stored.len(), expected.len());
    for (a, b) in stored.iter().zip(&expected) {
        assert_eq!(a.bytes(), b.bytes());
        assert_eq!((a.epoch, a.id), b.order_key());
        assert_eq!(&a.verify().unwrap(), *b);
    }
    let items: Vec<_> = s.items(ns, ..).unwrap().map(|i| i.unwrap()).collect();
    assert_eq!(
        items,
        expected.iter().map(|f| f.order_key()).collect::<Vec<_>>()
    );

    // Epoch ranges.
    let mid: Vec<_> = s
        .scan(ns, Epoch(3)..Epoch(5))
        .unwrap()
        .map(|f| f.unwrap())
        .collect();
    assert!(mid
        .iter()
        .all(|f| f.epoch == Epoch(3) || f.epoch == Epoch(4)));
    assert_eq!(
        mid.len(),
        journal
            .iter()
            .filter(|f| (3..5).contains(&f.epoch().0))
            .count()
    );
    assert_eq!(
        s.items(ns, Epoch(5)..=Epoch(5)).unwrap().count(),
        journal.iter().filter(|f| f.epoch() == Epoch(5)).count()
    );
    assert_eq!(s.items(ns, Epoch(100)..).unwrap().count(), 0);
    assert_eq!(s.items(ns, Epoch(u64::MAX)..).unwrap().count(), 0);

    // Digests agree with tend-core's.
    assert_eq!(s.journal_digest(ns).unwrap(), journal.digest());
    for e in [0, 1, 6, 12, 13, 100] {
        assert_eq!(
            s.prefix_digest(ns, Epoch(e)).unwrap(),
            journal.prefix_digest(Epoch(e))
        );
    }
    // The state equals reduce() over the whole journal.
    assert_eq!(s.maintenance_state(ns).unwrap(), reduce(ns, journal.iter()));

    // Lookups.
    let f = &facts[10];
    assert_eq!(
        s.get(ns, f.epoch(), &f.id()).unwrap().unwrap().bytes(),
        f.bytes()
    );
    assert!(s.contains(ns, f.epoch(), &f.id()).unwrap());
    assert!(!s.contains(ns, f.epoch().next(), &f.id()).unwrap());
    assert!(s.get(ns, f.epoch(), &FactId([0; 32])).unwrap().is_none());
    assert!(s.get(context(9), f.epoch(), &f.id()).unwrap().is_none());

    let st = s.stats(ns).unwrap().unwrap();
    assert_eq!((st.facts, st.maintenance_facts), (301, 1));
    assert_eq!(
        (st.min_epoch, st.max_epoch),
        (Some(Epoch(0)), Some(Epoch(13)))
    );
    assert_eq!(s.namespaces().unwrap(), vec![ns]);
    assert!(s.stats(context(9)).unwrap().is_none());
    assert!(s.file_size().unwrap() > 0);
}

/// One lookup answers for many facts as the store was when it was made: the facts stored
/// before it (an authority genesis and an application fact), not facts stored after it,
/// nor another namespace's.
#[test]
fn a_lookup_sees_the_store_as_it_was_when_made() {
    let (_d, s) = new_store();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let before = app(ns, 1, &k, b"before");
    s.insert_batch(&[genesis.clone(), before.clone()]).unwrap();
    let lookup = s.lookup(ns).unwrap();
    let after = app(ns, 1, &k, b"after");
    s.insert_batch(std::slice::from_ref(&after)).unwrap();
    assert!(lookup.contains(before.epoch(), &before.id()).unwrap());
    assert!(lookup.contains(genesis.epoch(), &genesis.id()).unwrap());
    assert!(!lookup
        .contains(before.epoch().next(), &before.id())
        .unwrap());
    assert!(!lookup.contains(after.epoch(), &after.id()).unwrap());
    assert!(s
        .lookup(ns)
        .unwrap()
        .contains(after.epoch(), &after.id())
        .unwrap());
    let (other, _) = authority(&key(2));
    assert!(!s
        .lookup(other)
        .unwrap()
        .contains(before.epoch(), &before.id())
        .unwrap());
}

#[test]
fn reinsert_is_idempotent() {
    let (_d, s) = new_store();
    let k = key(1);
    let ns = context(1);
    let facts: Vec<_> = (0..50u64)
        .map(|i| app(ns, i % 5, &k, &i.to_le_bytes()))
        .collect();
    let r = s.insert_batch(&facts).unwrap();
    assert_eq!((r.inserted, r.duplicates), (50, 0));
    let digest = s.journal_digest(ns).unwrap();
    let size = s.stats(ns).unwrap().unwrap();
    let r = s.insert_batch(&facts).unwrap();
    assert_eq!((r.inserted, r.duplicates), (0, 50));
    // Duplicates inside one batch, too.
    let doubled: Vec<_> = facts.iter().chain(&facts).cloned().collect();
    let r = s.insert_batch(&doubled).unwrap();
    assert_eq!((r.inserted, r.duplicates), (0, 100));
    assert_eq!(s.journal_digest(ns).unwrap(), digest);
    assert_eq!(s.stats(ns).unwrap().unwrap(), size);
    assert_eq!(s.insert_batch(&[]).unwrap().inserted, 0);
}

#[test]
fn non_members_are_rejected_and_not_stored() {
    let (_d, s) = new_store();
    let (admin, stranger, late_member) = (key(1), key(2), key(3));
    let (ns, genesis) = authority(&admin);

    // Before the genesis only the genesis is admitted.
    let early = app(ns, 1, &admin, b"too early");
    let r = s.insert_batch(std::slice::from_ref(&early)).unwrap();
    assert!(matches!(
        r.rejected[0].error,
        JournalError::NotAMember { .. }
    ));

    let bad = app(ns, 2, &stranger, b"intruder");
    let good = app(ns, 2, &admin, b"hello");
    // The membership change at epoch 5 admits `late_member` for facts at epochs > 5, and is
    // in the same batch as the facts it governs.
    let change = membership(ns, &admin, 5, 1, &[&admin, &late_member]);
    let before_change = app(ns, 4, &late_member, b"not yet");
    let after_change = app(ns, 6, &late_member, b"now a member");
    let r = s
        .insert_batch(&[
            after_change.clone(),
            bad.clone(),
            genesis,
            good.clone(),
            change,
            before_change.clone(),
        ])
        .unwrap();
    assert_eq!(r.inserted, 4);
    let mut rejected: Vec<_> = r.rejected.iter().map(|x| x.id).collect();
    rejected.sort();
    let mut want = vec![bad.id(), before_change.id()];
    want.sort();
    assert_eq!(rejected, want);
    assert!(r.rejected.iter().all(|x| x.error.reason() == "not_member"));
    assert!(!s.contains(ns, bad.epoch(), &bad.id()).unwrap());
    assert!(s
        .contains(ns, after_change.epoch(), &after_change.id())
        .unwrap());
    assert_eq!(s.stats(ns).unwrap().unwrap().facts, 4);
}

#[test]
fn out_of_order_maintenance_facts_are_reduced_in_order() {
    let (_d, s) = new_store();
    let (admin, member) = (key(1), key(2));
    let (ns, genesis) = authority(&admin);
    s.insert_batch(std::slice::from_ref(&genesis)).unwrap();
    // A later membership change first, then facts below it arrive in later batches.
    let change = membership(ns, &admin, 10, 1, &[&admin, &member]);
    let inv_hi = cache_invalidated(ns, 12, &member, "k", 20);
    s.insert_batch(&[change.clone(), inv_hi.clone()]).unwrap();
    let inv_lo = cache_invalidated(ns, 3, &admin, "k", 4);
    let app_lo = app(ns, 2, &admin, b"x");
    let r = s.insert_batch(&[inv_lo.clone(), app_lo.clone()]).unwrap();
    assert_eq!(r.inserted, 2);
    let all = [genesis, change, inv_hi, inv_lo, app_lo];
    assert_eq!(s.maintenance_state(ns).unwrap(), reduce(ns, all.iter()));
}

#[test]
fn late_facts_below_a_snapshot_are_rejected() {
    let (_d, s) = new_store();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let old = app(ns, 3, &k, b"old");
    s.insert_batch(&[genesis, old.clone()]).unwrap();
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    let snap = snapshot_completed(ns, &k, 5, 5, digest);
    s.insert_batch(&[snap]).unwrap();
    assert_eq!(s.maintenance_state(ns).unwrap().snapshot_epoch(), Epoch(5));
    let late = app(ns, 4, &k, b"late");
    let fresh = app(ns, 5, &k, b"fresh");
    let r = s.insert_batch(&[late.clone(), fresh, old]).unwrap();
    assert_eq!((r.inserted, r.duplicates), (1, 1));
    assert_eq!(r.rejected.len(), 1);
    assert!(matches!(
        r.rejected[0].error,
        JournalError::Late {
            snapshot: Epoch(5),
            ..
        }
    ));
}

#[test]
fn several_namespaces_in_one_batch() {
    let (_d, s) = new_store();
    let k = key(1);
    let (a, b) = (context(1), context(2));
    let fa: Vec<_> = (0..20u64).map(|i| app(a, i, &k, b"a")).collect();
    let fb: Vec<_> = (0..30u64).map(|i| app(b, i, &k, b"b")).collect();
    let all: Vec<_> = fa.iter().chain(&fb).cloned().collect();
    s.insert_batch(&all).unwrap();
    assert_eq!(s.items(a, ..).unwrap().count(), 20);
    assert_eq!(s.items(b, ..).unwrap().count(), 30);
    let mut ns = s.namespaces().unwrap();
    ns.sort();
    assert_eq!(ns, vec![a, b]);
}

#[test]
fn blobs_are_content_addressed() {
    let (_d, s) = new_store();
    let data = vec![3u8; 100_000];
    let cid = s.put_blob(0x55, &data).unwrap();
    assert_eq!(cid, tend_core::ContentId::of_raw(&data));
    assert_eq!(s.put_blob(0x55, &data).unwrap(), cid);
    assert!(s.has_blob(&cid).unwrap());
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), data);
    assert_eq!(s.blobs().unwrap(), vec![(cid, 100_000)]);
    let cbor = s.put_blob(0x71, b"\x80").unwrap();
    assert_ne!(cbor, cid);
    assert!(s.delete_blob(&cid).unwrap());
    assert!(!s.delete_blob(&cid).unwrap());
    assert!(!s.has_blob(&cid).unwrap());
    assert!(s.get_blob(&cid).unwrap().is_none());
    assert!(matches!(
        s.put_blob(0x70, b"x"),
        Err(StoreError::UnsupportedCodec { .. })
    ));
}

#[test]
fn settings_are_typed() {
    let (_d, s) = new_store();
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Floors {
        keys: Vec<(String, u64)>,
    }
    let v = Floors {
        keys: vec![("a".into(), 3)],
    };
    assert!(s.get_setting::<Floors>("cache").unwrap().is_none());
    s.put_setting("cache", &v).unwrap();
    assert_eq!(s.get_setting::<Floors>("cache").unwrap(), Some(v));
    let err = s.get_setting::<u64>("cache").unwrap_err();
    assert!(matches!(err, StoreError::Setting { .. }), "{err}");
    assert_eq!(s.setting_keys().unwrap(), vec!["cache".to_string()]);
    assert!(s.delete_setting("cache").unwrap());
    assert!(s.get_setting::<u64>("cache").unwrap().is_none());
}

#[test]
fn a_membership_change_learned_late_drops_the_facts_it_makes_invalid() {
    // Found by tend-sim: a device partitioned from the admin admits facts of a member the
    // admin removed at a lower epoch; once it learns the removal, it must hold what every
    // other replica holds.
    let (admin, b, c) = (key(1), key(2), key(3));
    let (ns, genesis) = authority(&admin);
    let add = membership(ns, &admin, 1, 1, &[&admin, &b, &c]);
    let remove_b = membership(ns, &admin, 3, 2, &[&admin, &c]);
    let b_early = app(ns, 2, &b, b"b at 2, a member then");
    let b_late = app(ns, 5, &b, b"b at 5, removed at 3");
    let c_late = app(ns, 5, &c, b"c at 5");

    // The partitioned replica: b's late fact arrives before the removal.
    let (_d1, late) = {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path().join("s.redb")).unwrap();
        (dir, s)
    };
    late.insert_batch(&[genesis.clone(), add.clone(), b_early.clone()])
        .unwrap();
    let r = late
        .insert_batch(&[b_late.clone(), c_late.clone()])
        .unwrap();
    assert_eq!((r.inserted, r.rejected.len()), (2, 0));
    let r = late.insert_batch(std::slice::from_ref(&remove_b)).unwrap();
    assert_eq!((r.inserted, r.dropped), (1, 1));
    assert!(!late.contains(ns, b_late.epoch(), &b_late.id()).unwrap());
    assert!(late.contains(ns, b_early.epoch(), &b_early.id()).unwrap());
    assert!(late.contains(ns, c_late.epoch(), &c_late.id()).unwrap());

    // A replica that learned everything in order holds the same journal and state.
    let (_d2, ordered) = {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(dir.path().join("s.redb")).unwrap();
        (dir, s)
    };
    let r = ordered
        .insert_batch(&[genesis, add, b_early, remove_b, b_late, c_late])
        .unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(
        late.journal_digest(ns).unwrap(),
        ordered.journal_digest(ns).unwrap()
    );
    assert_eq!(
        late.maintenance_state(ns).unwrap(),
        ordered.maintenance_state(ns).unwrap()
    );
    assert_eq!(late.stats(ns).unwrap(), ordered.stats(ns).unwrap());
}

/// What the store is asked in [`prefix_digests_follow_every_change`].
#[derive(Clone, Debug)]
enum DigestStep {
    Insert {
        epoch: u64,
    },
    Retract {
        nth: usize,
    },
    Digest {
        upto: u64,
    },
    /// A snapshot at this epoch of the prefix as it stands, then GC.
    SnapshotAndPrune {
        epoch: u64,
    },
}

fn digest_step() -> impl proptest::strategy::Strategy<Value = DigestStep> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (1u64..12).prop_map(|epoch| DigestStep::Insert { epoch }),
        1 => any::<usize>().prop_map(|nth| DigestStep::Retract { nth }),
        4 => (0u64..14).prop_map(|upto| DigestStep::Digest { upto }),
        1 => (2u64..10).prop_map(|epoch| DigestStep::SnapshotAndPrune { epoch }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// The store keeps prefix digests it computed; each one it gives must still equal the
    /// digest of the facts it holds, whatever was added, retracted or pruned in between.
    #[test]
    fn prefix_digests_follow_every_change(steps in proptest::collection::vec(digest_step(), 1..40)) {
        let (_d, s) = new_store();
        let k = key(1);
        let (ns, genesis) = authority(&k);
        s.insert_batch(&[genesis]).unwrap();
        let mut written = 0u64;
        for step in steps {
            match step {
                DigestStep::Insert { epoch } => {
                    written += 1;
                    // Refused below a snapshot (`Late`), as on any device.
                    s.insert_batch(&[app(ns, epoch, &k, &written.to_le_bytes())]).unwrap();
                }
                DigestStep::Retract { nth } => {
                    let items: Vec<_> = s.items(ns, Epoch(1)..).unwrap().map(|i| i.unwrap()).collect();
                    if !items.is_empty() {
                        s.retract_data(ns, &[items[nth % items.len()]]).unwrap();
                    }
                }
                DigestStep::Digest { upto } => {
                    let upto = Epoch(upto);
                    let base = s.maintenance_state(ns).unwrap().snapshot_base(upto);
                    let mut held = Journal::new(ns);
                    for f in s.scan(ns, ..).unwrap() {
                        held.insert(f.unwrap().verify().unwrap()).unwrap();
                    }
                    let expected = held.chained_prefix_digest(upto, base);
                    proptest::prop_assert_eq!(s.prefix_digest(ns, upto).unwrap(), expected);
                    // Asked again (now from the memo), the same.
                    proptest::prop_assert_eq!(s.prefix_digest(ns, upto).unwrap(), expected);
                }
                DigestStep::SnapshotAndPrune { epoch } => {
                    let state = s.maintenance_state(ns).unwrap();
                    if state.snapshot_epoch() >= Epoch(epoch) {
                        continue;
                    }
                    let digest = s.prefix_digest(ns, Epoch(epoch)).unwrap();
                    let at = state.current_epoch().0.max(epoch);
                    let done = snapshot_completed(ns, &k, at, epoch, digest);
                    let r = s.insert_batch(&[done]).unwrap();
                    proptest::prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                    s.prune(ns).unwrap();
                }
            }
        }
    }
}

/// Removals leave no entry in the changes feed; `removals` says how many commits removed
/// facts and how high, so a reader of the items knows which of them are still held.
#[test]
fn removals_say_how_high_facts_were_removed() {
    let (_d, s) = new_store();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let low = app(ns, 2, &k, b"low");
    let high = app(ns, 7, &k, b"high");
    s.insert_batch(&[genesis, low, high.clone()]).unwrap();
    assert_eq!(s.removals(ns), (0, None));
    s.retract_data(ns, &[high.order_key()]).unwrap();
    assert_eq!(s.removals(ns), (1, Some(Epoch(7))));
    // Nothing removed: not counted.
    s.retract_data(ns, &[high.order_key()]).unwrap();
    assert_eq!(s.removals(ns).0, 1);
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 5, 5, digest)])
        .unwrap();
    let pruned = s.prune(ns).unwrap();
    assert!(pruned.facts > 0);
    // Pruning removes below the snapshot only; the highest stays the retraction's.
    assert_eq!(s.removals(ns), (2, Some(Epoch(7))));
    assert_eq!(s.removals(context(9)), (2, None));
}
