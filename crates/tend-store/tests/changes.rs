//! The changes feed: every admitted fact in admission order, under a cursor that survives
//! reopening, pruning and the migration from format 2.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::ReadableDatabase;

use common::*;
use tend_core::{Epoch, FactId, JournalNamespace, VerifiedFact};
use tend_store::{Change, Store, STORE_FORMAT_VERSION};

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
const CHANGES: redb::TableDefinition<u64, &[u8; 44]> = redb::TableDefinition::new("changes");

fn ids(changes: &[Change]) -> Vec<(Epoch, FactId)> {
    changes.iter().map(|c| (c.epoch, c.id)).collect()
}

fn keys(facts: &[&VerifiedFact]) -> Vec<(Epoch, FactId)> {
    facts.iter().map(|f| f.order_key()).collect()
}

#[test]
fn the_feed_lists_admitted_facts_in_admission_order_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let s = Store::create(&p).unwrap();
    assert_eq!(s.last_change().unwrap(), 0);
    assert!(s.changes_since(0, 10).unwrap().is_empty());

    // Batch 1: sorted by (epoch, id) within the batch, the genesis first.
    let a = app(ns, 5, &k, b"a");
    let b = app(ns, 2, &k, b"b");
    s.insert_batch(&[a.clone(), genesis.clone(), b.clone()])
        .unwrap();
    // Batch 2: a lower epoch than batch 1, admitted later, so listed later; a duplicate
    // and a rejected fact are not listed.
    let c = app(ns, 1, &k, b"c");
    let stranger = app(ns, 1, &key(9), b"not a member");
    let r = s
        .insert_batch(&[c.clone(), a.clone(), stranger.clone()])
        .unwrap();
    assert_eq!((r.inserted, r.duplicates, r.rejected.len()), (1, 1, 1));
    let mut first_batch = vec![&b, &a];
    first_batch.sort_by_key(|f| f.order_key());
    let mut expected = vec![&genesis];
    expected.extend(first_batch);
    expected.push(&c);

    let all = s.changes_since(0, 100).unwrap();
    assert_eq!(ids(&all), keys(&expected));
    assert_eq!(
        all.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(all.iter().all(|c| c.namespace == ns));
    assert_eq!(s.last_change().unwrap(), 4);
    // Paging: limit, and resuming after a cursor.
    assert_eq!(ids(&s.changes_since(0, 2).unwrap()), keys(&expected[..2]));
    assert_eq!(ids(&s.changes_since(2, 100).unwrap()), keys(&expected[2..]));
    assert!(s.changes_since(4, 100).unwrap().is_empty());
    assert!(s.changes_since(u64::MAX, 100).unwrap().is_empty());
    drop(s);

    // The cursor survives a restart, and the sequence continues where it stopped.
    let s = Store::open(&p).unwrap();
    assert_eq!(s.last_change().unwrap(), 4);
    assert_eq!(ids(&s.changes_since(0, 100).unwrap()), keys(&expected));
    let d = app(ns, 3, &k, b"d");
    s.insert_batch(std::slice::from_ref(&d)).unwrap();
    let tail = s.changes_since(4, 100).unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(
        (tail[0].seq, tail[0].epoch, tail[0].id),
        (5, d.epoch(), d.id())
    );
}

#[test]
fn every_namespace_shares_one_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let other = context(7);
    s.insert_batch(&[genesis]).unwrap();
    s.insert_batch(&[app(other, 1, &k, b"x")]).unwrap();
    s.insert_batch(&[app(ns, 1, &k, b"y")]).unwrap();
    let got: Vec<(u64, JournalNamespace)> = s
        .changes_since(0, 10)
        .unwrap()
        .iter()
        .map(|c| (c.seq, c.namespace))
        .collect();
    assert_eq!(got, vec![(1, ns), (2, other), (3, ns)]);
}

#[test]
fn listeners_hear_each_commit_that_appended_changes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    s.on_change(move |seq| h.lock().unwrap().push(seq));
    let k = key(1);
    let (ns, genesis) = authority(&k);
    s.insert_batch(&[genesis, app(ns, 1, &k, b"a")]).unwrap();
    // Nothing new: no call.
    s.insert_batch(&[app(ns, 1, &k, b"a")]).unwrap();
    s.insert_batch(&[]).unwrap();
    s.insert_batch(&[app(ns, 2, &k, b"b")]).unwrap();
    assert_eq!(*heard.lock().unwrap(), vec![2, 3]);
}

#[test]
fn pruning_removes_the_entries_of_what_it_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let mut facts = vec![genesis];
    facts.extend((0..20u64).map(|i| app(ns, 1 + i, &k, &i.to_be_bytes())));
    // Every note below epoch 10 is trimmed (by a trim below 10 too, so that the prefix
    // below a snapshot at 10 no longer needs them), and GC drops them and the trim.
    let trim = trim_notes(ns, 9, &k, 10);
    facts.push(trim.clone());
    s.insert_batch(&facts).unwrap();
    let digest = s.prefix_digest(ns, Epoch(10)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 10, 10, digest)])
        .unwrap();
    let before = s.changes_since(0, 1000).unwrap();
    assert_eq!(before.len(), 23);
    let report = s.prune(ns).unwrap();
    // The genesis leaves the index (it stays for reduction), with the 9 notes and the trim.
    assert_eq!(report.facts, 11);
    // The feed keeps the entries of what the index still holds, in their order and under
    // their cursors; the feed is bounded like the journal.
    let after = s.changes_since(0, 1000).unwrap();
    let index: std::collections::HashSet<_> =
        s.items(ns, ..).unwrap().map(|i| i.unwrap()).collect();
    let kept: Vec<_> = before
        .iter()
        .filter(|c| index.contains(&(c.epoch, c.id)))
        .copied()
        .collect();
    assert_eq!(after, kept);
    assert_eq!(after.len(), 12);
    assert!(after.iter().all(|c| c.id != trim.id()));
    // Cursors go on from where they were.
    s.insert_batch(&[app(ns, 21, &k, b"next")]).unwrap();
    assert_eq!(s.changes_since(0, 1000).unwrap().last().unwrap().seq, 24);
}

/// Rewrites a store at `path` into format 2: no changes table.
fn make_format_2(path: &Path) {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    assert!(tx.delete_table(CHANGES).unwrap());
    tx.open_table(META)
        .unwrap()
        .insert("format_version", 2u32.to_be_bytes().as_slice())
        .unwrap();
    tx.commit().unwrap();
}

fn format_version(path: &Path) -> u32 {
    let db = redb::Database::open(path).unwrap();
    let rtx = db.begin_read().unwrap();
    let meta = rtx.open_table(META).unwrap();
    let v = meta.get("format_version").unwrap().unwrap();
    u32::from_be_bytes(v.value().try_into().unwrap())
}

#[test]
fn a_format_2_store_gets_a_feed_of_everything_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let mut facts = vec![genesis];
    facts.extend((0..20u64).map(|i| app(ns, 1 + i, &k, &i.to_be_bytes())));
    facts.push(trim_notes(ns, 9, &k, 10));
    let other = app(context(3), 4, &k, b"other journal");
    {
        let s = Store::create(&p).unwrap();
        s.insert_batch(&facts).unwrap();
        s.insert_batch(std::slice::from_ref(&other)).unwrap();
        let digest = s.prefix_digest(ns, Epoch(10)).unwrap();
        s.insert_batch(&[snapshot_completed(ns, &k, 10, 10, digest)])
            .unwrap();
        // The genesis and the trim are now in the maintenance table only.
        s.prune(ns).unwrap();
    }
    make_format_2(&p);
    assert_eq!(format_version(&p), 2);

    let s = Store::open(&p).unwrap();
    // Every held fact once, index order (namespace number, epoch, id), including the
    // maintenance facts kept below the floor; nothing that GC removed.
    let feed = s.changes_since(0, 1000).unwrap();
    let mut held: Vec<(JournalNamespace, Epoch, FactId)> = s
        .scan(ns, ..)
        .unwrap()
        .map(|f| f.unwrap())
        .map(|f| (f.namespace, f.epoch, f.id))
        .chain(
            s.scan_maintenance(ns)
                .unwrap()
                .map(|f| f.unwrap())
                .map(|f| (f.namespace, f.epoch, f.id)),
        )
        .collect();
    held.sort_by_key(|(_, e, id)| (*e, *id));
    held.dedup();
    held.push((other.namespace(), other.epoch(), other.id()));
    assert_eq!(
        feed.iter()
            .map(|c| (c.namespace, c.epoch, c.id))
            .collect::<Vec<_>>(),
        held
    );
    assert_eq!(
        feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=held.len() as u64).collect::<Vec<_>>()
    );
    // New admissions continue the sequence.
    s.insert_batch(&[app(ns, 30, &k, b"new")]).unwrap();
    assert_eq!(s.last_change().unwrap(), held.len() as u64 + 1);
    drop(s);
    assert_eq!(format_version(&p), STORE_FORMAT_VERSION);
    assert_eq!(STORE_FORMAT_VERSION, 4);
    // Reopening a migrated store is a plain open.
    let s = Store::open(&p).unwrap();
    assert_eq!(s.last_change().unwrap(), held.len() as u64 + 1);
}

#[test]
fn a_cursor_is_never_given_twice_even_when_the_newest_entries_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let k = key(1);
    let (ns, genesis) = authority(&k);
    {
        let s = Store::create(&p).unwrap();
        s.insert_batch(&[genesis, app(ns, 1, &k, b"a"), app(ns, 2, &k, b"b")])
            .unwrap();
        assert_eq!(s.last_change().unwrap(), 3);
    }
    // Entries go from the end of the feed (as pruning may remove them).
    {
        let db = redb::Database::open(&p).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(CHANGES).unwrap();
            t.remove(3).unwrap();
            t.remove(2).unwrap();
        }
        tx.commit().unwrap();
    }
    let s = Store::open(&p).unwrap();
    assert_eq!(s.last_change().unwrap(), 3, "the mark stays");
    s.insert_batch(&[app(ns, 3, &k, b"c")]).unwrap();
    let feed = s.changes_since(0, 10).unwrap();
    assert_eq!(
        feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 4],
        "a reader that saw cursor 3 still sees the new fact"
    );
    assert_eq!(s.changes_since(3, 10).unwrap().len(), 1);
}
