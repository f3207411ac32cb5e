//! Blobs kept as references to the stored facts they carry: they read byte for byte as
//! before, and deleting a fact one of them names (a retraction, a prune) turns it back
//! into bytes first.

mod common;

use std::io::Read;

use common::*;
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::{ContentId, Epoch, JournalNamespace, Payload, VerifiedFact};
use tend_store::Store;

/// A blob in the shape of a snapshot blob: `head`, then each fact as a CBOR byte string of
/// its canonical bytes, then `tail`.
fn blob_of(head: &[u8], facts: &[&VerifiedFact], tail: &[u8]) -> Vec<u8> {
    let mut out = head.to_vec();
    for f in facts {
        let b = f.bytes();
        // The shortest CBOR head of a byte string of that length (every fact here is
        // shorter than 64 KiB).
        match b.len() {
            n @ 0..=23 => out.push(0x40 | n as u8),
            n @ 24..=0xff => out.extend_from_slice(&[0x58, n as u8]),
            n => {
                out.push(0x59);
                out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
        }
        out.extend_from_slice(b);
    }
    out.extend_from_slice(tail);
    out
}

fn keys(facts: &[&VerifiedFact]) -> Vec<(Epoch, tend_core::FactId)> {
    facts.iter().map(|f| f.order_key()).collect()
}

fn chunk_entries(s: &Store, table: &str) -> u64 {
    s.table_usage()
        .unwrap()
        .into_iter()
        .find(|u| u.table == table)
        .unwrap()
        .entries
}

/// An authority of one device with 40 notes of 300 bytes over epochs 1..=4 and one
/// maintenance fact.
fn journal(s: &Store) -> (JournalNamespace, Vec<VerifiedFact>) {
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let mut facts = vec![genesis];
    facts.extend((0..40u64).map(|i| {
        let mut data = vec![7u8; 300];
        data[..8].copy_from_slice(&i.to_be_bytes());
        app(ns, 1 + i / 10, &k, &data)
    }));
    facts.push(cache_invalidated(ns, 2, &k, "users", 2));
    s.insert_batch(&facts).unwrap();
    facts.sort_by_key(|f| f.order_key());
    (ns, facts)
}

#[test]
fn a_blob_kept_as_facts_reads_the_same_until_a_fact_it_names_goes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let s = Store::create(&path).unwrap();
    let (ns, facts) = journal(&s);
    // Every fact but the genesis (shorter than 256 bytes) and the maintenance fact.
    let named: Vec<&VerifiedFact> = facts.iter().filter(|f| f.bytes().len() >= 256).collect();
    assert!(named.len() >= 40);
    // A head longer than a chunk, so the recipe spans chunks too.
    let head: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let tail = [0x58, 0x20]
        .iter()
        .chain(&[9u8; 32])
        .copied()
        .collect::<Vec<_>>();
    let bytes = blob_of(&head, &named, &tail);
    let cid = s.put_blob(CODEC_DAG_CBOR, &bytes).unwrap();
    let chunks_as_bytes = chunk_entries(&s, "blob_chunks");
    assert!(chunks_as_bytes >= 2);

    // A layout that is not the blob's, or a fact that is not stored: nothing changes.
    assert!(!s
        .keep_blob_as_facts(&cid, ns, head.len() as u64 + 1, keys(&named))
        .unwrap());
    let stranger = app(ns, 3, &key(1), &[5u8; 300]);
    let mut with_stranger = named.clone();
    with_stranger.push(&stranger);
    assert!(!s
        .keep_blob_as_facts(&cid, ns, head.len() as u64, keys(&with_stranger))
        .unwrap());
    assert!(!s.blob_kept_as_facts(&cid).unwrap());

    assert!(s
        .keep_blob_as_facts(&cid, ns, head.len() as u64, keys(&named))
        .unwrap());
    assert!(s.blob_kept_as_facts(&cid).unwrap());
    assert_eq!(chunk_entries(&s, "blob_chunks"), 0);
    assert!(chunk_entries(&s, "blob_fact_refs") >= 2);
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), bytes);
    assert_eq!(s.blobs().unwrap(), vec![(cid, bytes.len() as u64)]);
    // Read part of it, start over, read it whole: the same bytes.
    let mut r = s.blob_reader(&cid).unwrap().unwrap();
    let mut part = vec![0u8; 200_000];
    r.read_exact(&mut part).unwrap();
    r.rewind();
    let mut again = Vec::new();
    r.read_to_end(&mut again).unwrap();
    assert_eq!(again, bytes);
    drop(r);

    // Reopened, it still reads the same; retracting a fact it names turns it back into
    // bytes in the same transaction.
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), bytes);
    assert_eq!(s.retract_data(ns, &[named[5].order_key()]).unwrap(), 1);
    assert!(!s.blob_kept_as_facts(&cid).unwrap());
    assert_eq!(chunk_entries(&s, "blob_fact_refs"), 0);
    assert_eq!(chunk_entries(&s, "blob_chunks"), chunks_as_bytes);
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), bytes);

    // Deleting a blob kept by reference deletes its recipe and leaves its facts.
    let rest: Vec<&VerifiedFact> = named.iter().copied().skip(6).collect();
    let other = blob_of(b"head", &rest, &tail);
    let other_cid = s.put_blob(CODEC_DAG_CBOR, &other).unwrap();
    assert!(s
        .keep_blob_as_facts(&other_cid, ns, 4, keys(&rest))
        .unwrap());
    assert!(s.delete_blob(&other_cid).unwrap());
    assert_eq!(chunk_entries(&s, "blob_fact_refs"), 0);
    assert!(s.get_blob(&other_cid).unwrap().is_none());
    assert!(s.contains(ns, rest[0].epoch(), &rest[0].id()).unwrap());
}

#[test]
fn pruning_turns_back_into_bytes_only_the_blobs_that_name_a_pruned_fact() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, facts) = journal(&s);
    let notes: Vec<&VerifiedFact> = facts
        .iter()
        .filter(|f| matches!(f.payload(), Payload::Application { .. }))
        .collect();
    // The notes below epoch 3 are trimmed, so a snapshot at 3 prunes them.
    let (trimmed, kept): (Vec<&VerifiedFact>, Vec<&VerifiedFact>) =
        notes.iter().partition(|f| f.epoch() < Epoch(3));
    s.insert_batch(&[trim_notes(ns, 2, &k, 3)]).unwrap();
    let tail = [0x41, 0x00];
    let naming_trimmed = blob_of(b"h1", &trimmed, &tail);
    // A maintenance fact below the floor leaves the index but stays in the maintenance
    // table, so a blob naming it (every snapshot blob names its state facts) stays readable.
    let invalidation = facts
        .iter()
        .find(|f| matches!(f.payload(), Payload::Maintenance(_)))
        .unwrap();
    let mut kept_and_state = kept.clone();
    kept_and_state.push(invalidation);
    kept_and_state.sort_by_key(|f| f.order_key());
    let naming_kept = blob_of(b"h2", &kept_and_state, &tail);
    let goes_anyway = blob_of(b"h3", &trimmed[..3], &tail);
    let mut cids: Vec<ContentId> = Vec::new();
    for bytes in [&naming_trimmed, &naming_kept, &goes_anyway] {
        let cid = s.put_blob(CODEC_DAG_CBOR, bytes).unwrap();
        let named: Vec<&VerifiedFact> = facts
            .iter()
            .filter(|f| bytes.windows(f.bytes().len()).any(|w| w == f.bytes()))
            .collect();
        assert!(s.keep_blob_as_facts(&cid, ns, 2, keys(&named)).unwrap());
        cids.push(cid);
    }
    s.insert_batch(&[tombstone(ns, 2, &k, cids[2])]).unwrap();
    let digest = s.prefix_digest(ns, Epoch(3)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 3, 3, digest)])
        .unwrap();

    let report = s.prune(ns).unwrap();
    assert_eq!(report.facts as usize, trimmed.len() + 4); // + genesis, floor, trim, tombstone
    assert_eq!(report.blobs, 1);
    for note in &trimmed {
        assert!(!s.contains(ns, note.epoch(), &note.id()).unwrap());
    }
    // The blob naming pruned notes holds their bytes now; the other keeps referencing.
    assert!(!s.blob_kept_as_facts(&cids[0]).unwrap());
    assert_eq!(s.get_blob(&cids[0]).unwrap().unwrap(), naming_trimmed);
    assert!(s.blob_kept_as_facts(&cids[1]).unwrap());
    assert_eq!(s.get_blob(&cids[1]).unwrap().unwrap(), naming_kept);
    assert!(!s.has_blob(&cids[2]).unwrap());
    assert_eq!(chunk_entries(&s, "blob_fact_refs"), 1);
}

#[test]
fn a_format_3_store_opens_as_format_4_with_its_blobs_as_bytes() {
    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
    const REFS: redb::TableDefinition<(&[u8], u32), &[u8]> =
        redb::TableDefinition::new("blob_fact_refs");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (ns, facts, bytes, cid) = {
        let s = Store::create(&path).unwrap();
        let (ns, facts) = journal(&s);
        let bytes = blob_of(b"head", &[&facts[3], &facts[4]], b"tail");
        let cid = s.put_blob(CODEC_DAG_CBOR, &bytes).unwrap();
        (ns, facts, bytes, cid)
    };
    {
        let db = redb::Database::open(&path).unwrap();
        let tx = db.begin_write().unwrap();
        assert!(tx.delete_table(REFS).unwrap());
        tx.open_table(META)
            .unwrap()
            .insert("format_version", 3u32.to_be_bytes().as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(tend_store::STORE_FORMAT_VERSION, 4);
    assert!(!s.blob_kept_as_facts(&cid).unwrap());
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), bytes);
    assert!(s
        .keep_blob_as_facts(&cid, ns, 4, keys(&[&facts[3], &facts[4]]))
        .unwrap());
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), bytes);
}

#[test]
fn a_blob_planned_from_stored_facts_is_stored_by_reference_only_while_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let (ns, facts) = journal(&s);
    let notes: Vec<&VerifiedFact> = facts
        .iter()
        .filter(|f| matches!(f.payload(), Payload::Application { .. }))
        .collect();
    let tail = vec![0x41, 0x07];
    let plan = |named: &[&VerifiedFact]| {
        s.plan_fact_blob(
            CODEC_DAG_CBOR,
            ns,
            b"head".to_vec(),
            keys(named),
            tail.clone(),
        )
    };
    // The CID the store computes is the hash of the blob's bytes.
    let bytes = blob_of(b"head", &notes, &tail);
    let planned = plan(&notes).unwrap();
    assert_eq!(*planned.cid(), ContentId::of(CODEC_DAG_CBOR, &bytes));
    assert_eq!(planned.len(), bytes.len() as u64);
    assert!(!s.has_blob(planned.cid()).unwrap());
    s.put_fact_blob(&planned).unwrap();
    assert!(s.blob_kept_as_facts(planned.cid()).unwrap());
    assert_eq!(s.get_blob(planned.cid()).unwrap().unwrap(), bytes);
    assert_eq!(chunk_entries(&s, "blob_chunks"), 0);

    // A fact that is not stored cannot be planned; one retracted after planning fails the
    // put, which stores nothing.
    let stranger = app(ns, 3, &key(1), &[5u8; 300]);
    let mut with_stranger = notes.clone();
    with_stranger.push(&stranger);
    with_stranger.sort_by_key(|f| f.order_key());
    assert!(matches!(
        plan(&with_stranger),
        Err(tend_store::StoreError::BlobMismatch { .. })
    ));
    let fewer = plan(&notes[1..]).unwrap();
    assert_eq!(s.retract_data(ns, &[notes[2].order_key()]).unwrap(), 1);
    assert!(matches!(
        s.put_fact_blob(&fewer),
        Err(tend_store::StoreError::BlobMismatch { .. })
    ));
    assert!(!s.has_blob(fewer.cid()).unwrap());
    // The first blob named the retracted fact: it holds its bytes now.
    assert!(!s.blob_kept_as_facts(planned.cid()).unwrap());
    assert_eq!(s.get_blob(planned.cid()).unwrap().unwrap(), bytes);
}
