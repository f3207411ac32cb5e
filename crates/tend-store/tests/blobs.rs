//! Blobs in chunks: round trips at the chunk boundaries, streamed writes that commit only
//! verified bytes, deletion and pruning of every chunk, damage found on read, and the
//! migration of format 1 stores (one value per blob).

mod common;

use std::io::{Read, Write};
use std::path::Path;

use redb::ReadableDatabase;

use common::*;
use tend_core::ids::{CODEC_DAG_CBOR, CODEC_RAW};
use tend_core::{ContentId, Epoch};
use tend_store::{Store, StoreError, StoreOptions, BLOB_CHUNK_BYTES};

const C: usize = BLOB_CHUNK_BYTES;

type ChunkKey = (&'static [u8], u32);
const CHUNKS: redb::TableDefinition<ChunkKey, &[u8]> = redb::TableDefinition::new("blob_chunks");
const INDEX: redb::TableDefinition<&[u8], (u64, u32)> = redb::TableDefinition::new("blob_index");
const OLD_BLOBS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blobs");
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// Bytes that differ at every offset a chunk boundary could hide a mix-up in.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn table_entries(s: &Store, table: &str) -> u64 {
    s.table_usage()
        .unwrap()
        .into_iter()
        .find(|u| u.table == table)
        .unwrap_or_else(|| panic!("no table {table}"))
        .entries
}

fn read_all(r: &mut impl Read, buf_len: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn blobs_round_trip_at_every_chunk_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let sizes = [0, 1, C - 1, C, C + 1, 2 * C, 6 * 1024 * 1024 + 3];
    let mut expected_chunks = 0u64;
    for (i, &len) in sizes.iter().enumerate() {
        let data = pattern(len, i as u32);
        let cid = s.put_blob(CODEC_RAW, &data).unwrap();
        assert_eq!(cid, ContentId::of(CODEC_RAW, &data));
        expected_chunks += len.div_ceil(C) as u64;
        assert_eq!(
            table_entries(&s, "blob_chunks"),
            expected_chunks,
            "len {len}"
        );
        assert_eq!(s.get_blob(&cid).unwrap().unwrap(), data, "len {len}");
        // Reads of odd sizes that straddle chunk boundaries.
        for buf_len in [1, 4093, 65_536, C + 17] {
            if buf_len == 1 && len > 3 * C {
                continue; // byte by byte through 6 MiB only costs time
            }
            let mut r = s.blob_reader(&cid).unwrap().unwrap();
            assert_eq!(r.len(), len as u64);
            assert_eq!(read_all(&mut r, buf_len).unwrap(), data, "len {len}");
            // Twice in the same read transaction.
            r.rewind();
            assert_eq!(read_all(&mut r, buf_len).unwrap(), data, "len {len} again");
        }
        // Streamed in uneven writes under a second codec: the same bytes, chunked alike.
        let cbor = ContentId::of(CODEC_DAG_CBOR, &data);
        let mut w = s.blob_writer(&cbor, len as u64).unwrap();
        for piece in data.chunks(7_777) {
            w.write_all(piece).unwrap();
        }
        w.commit().unwrap();
        expected_chunks += len.div_ceil(C) as u64;
        assert_eq!(s.get_blob(&cbor).unwrap().unwrap(), data, "len {len}");
        assert!(s.blobs().unwrap().contains(&(cbor, len as u64)));
    }
    assert_eq!(s.blobs().unwrap().len(), 2 * sizes.len());
    // Storing the same content again changes nothing.
    let data = pattern(C + 1, 4);
    s.put_blob(CODEC_RAW, &data).unwrap();
    assert_eq!(table_entries(&s, "blob_chunks"), expected_chunks);
    assert_eq!(s.blobs().unwrap().len(), 2 * sizes.len());
    // Everything survives reopening.
    let path = s.path().to_owned();
    drop(s);
    let s = Store::open(&path).unwrap();
    for (i, &len) in sizes.iter().enumerate() {
        let data = pattern(len, i as u32);
        let cid = ContentId::of(CODEC_RAW, &data);
        assert_eq!(s.get_blob(&cid).unwrap().unwrap(), data);
    }
}

#[test]
fn a_streamed_write_that_does_not_match_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let data = pattern(3 * C + 5, 1);
    let cid = ContentId::of(CODEC_DAG_CBOR, &data);
    let nothing = |s: &Store| {
        assert!(!s.has_blob(&cid).unwrap());
        assert!(s.get_blob(&cid).unwrap().is_none());
        assert!(s.blobs().unwrap().is_empty());
        assert_eq!(table_entries(s, "blob_chunks"), 0);
        assert_eq!(table_entries(s, "blob_index"), 0);
    };

    // One flipped byte in the last chunk, then in the first.
    for at in [data.len() - 1, 0] {
        let mut bad = data.clone();
        bad[at] ^= 1;
        let mut w = s.blob_writer(&cid, data.len() as u64).unwrap();
        w.write_all(&bad).unwrap();
        let e = w.commit().unwrap_err();
        assert!(matches!(e, StoreError::BlobMismatch { .. }), "{e}");
        nothing(&s);
    }
    // Too short: refused at commit.
    let mut w = s.blob_writer(&cid, data.len() as u64).unwrap();
    w.write_all(&data[..data.len() - 1]).unwrap();
    assert!(matches!(
        w.commit().unwrap_err(),
        StoreError::BlobMismatch { .. }
    ));
    nothing(&s);
    // Too long: refused as it is written, and the writer stays spent.
    let mut w = s.blob_writer(&cid, data.len() as u64).unwrap();
    w.write_all(&data).unwrap();
    assert!(w.write_all(b"x").is_err());
    assert!(matches!(
        w.commit().unwrap_err(),
        StoreError::BlobMismatch { .. }
    ));
    nothing(&s);
    // Written in full but dropped, not committed: aborted.
    let mut w = s.blob_writer(&cid, data.len() as u64).unwrap();
    w.write_all(&data).unwrap();
    // Not visible before the commit either.
    nothing(&s);
    drop(w);
    nothing(&s);
    // The filler of put_blob_with fails half way.
    let r = s
        .put_blob_with(&cid, data.len(), |w| {
            w.write_all(&data[..2 * C]).unwrap();
            Err("the source broke")
        })
        .unwrap();
    assert_eq!(r, Err("the source broke"));
    nothing(&s);
    // And the store is still usable: the right bytes are stored.
    s.put_blob_with(&cid, data.len(), |w| {
        w.write_all(&data).unwrap();
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap();
    assert_eq!(s.get_blob(&cid).unwrap().unwrap(), data);
    assert_eq!(table_entries(&s, "blob_chunks"), 4);
}

#[test]
fn a_crash_in_the_middle_of_a_blob_write_leaves_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    // A small cache, so the chunks already written reach the file before the commit.
    let opts = StoreOptions {
        cache_size: Some(1 << 20),
        ..StoreOptions::default()
    };
    let s = Store::create_with(&p, &opts).unwrap();
    let kept = s.put_blob(CODEC_RAW, &pattern(C + 9, 2)).unwrap();
    let data = pattern(12 * C, 3);
    let cid = ContentId::of(CODEC_RAW, &data);
    let mut w = s.blob_writer(&cid, data.len() as u64).unwrap();
    w.write_all(&data[..10 * C]).unwrap();
    let len_before_copy = std::fs::metadata(&p).unwrap().len();
    // The file as a process killed now would leave it.
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&p, &crashed).unwrap();
    drop(w);
    drop(s);
    assert!(
        len_before_copy > (4 * C) as u64,
        "the chunks never reached the file ({len_before_copy} bytes): the test shows nothing"
    );
    let s = Store::open(&crashed).unwrap();
    assert!(!s.has_blob(&cid).unwrap());
    assert_eq!(s.blobs().unwrap(), vec![(kept, (C + 9) as u64)]);
    assert_eq!(table_entries(&s, "blob_chunks"), 2);
    assert_eq!(s.get_blob(&kept).unwrap().unwrap(), pattern(C + 9, 2));
}

#[test]
fn deleting_a_blob_removes_every_chunk_and_compaction_returns_the_space() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let small = s.put_blob(CODEC_RAW, &pattern(100, 1)).unwrap();
    let big = s.put_blob(CODEC_RAW, &pattern(8 << 20, 2)).unwrap();
    let next = s.put_blob(CODEC_RAW, &pattern(C + 1, 3)).unwrap();
    assert_eq!(
        table_entries(&s, "blob_chunks"),
        1 + (8usize << 20).div_ceil(C) as u64 + 2
    );
    let before = s.file_size().unwrap();
    assert!(s.delete_blob(&big).unwrap());
    assert!(!s.delete_blob(&big).unwrap());
    // Only the neighbours' chunks are left, whole.
    assert_eq!(table_entries(&s, "blob_chunks"), 3);
    assert_eq!(s.get_blob(&small).unwrap().unwrap(), pattern(100, 1));
    assert_eq!(s.get_blob(&next).unwrap().unwrap(), pattern(C + 1, 3));
    let c = s.compact().unwrap();
    assert_eq!(c.bytes_before, before);
    assert!(
        c.bytes_after + (6 << 20) < before,
        "the file shrank only from {before} to {}",
        c.bytes_after
    );
}

#[test]
fn a_large_blob_takes_pages_of_about_its_size() {
    // One value of 19 MiB was one 32 MiB page; in chunks, each fills its 256 KiB page.
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let len = 19 * 1024 * 1024 + 12_345;
    s.put_blob(CODEC_DAG_CBOR, &pattern(len, 9)).unwrap();
    let u = s
        .table_usage()
        .unwrap()
        .into_iter()
        .find(|u| u.table == "blob_chunks")
        .unwrap();
    let pages = u.stored_bytes + u.metadata_bytes + u.fragmented_bytes;
    assert!(pages < (len as u64) * 101 / 100, "{len} bytes in {u:?}");
    assert_eq!(u.leaf_pages, len.div_ceil(C) as u64);
    // redb grows its file ahead of use; compacted, the file is about the blob.
    let size = s.compact().unwrap().bytes_after;
    eprintln!("{len}-byte blob: {u:?}, file {size} bytes after compaction");
    assert!(
        size < (len as u64) * 11 / 10,
        "{len} bytes in a {size}-byte file"
    );
}

#[test]
fn pruning_a_tombstoned_blob_removes_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let old = s.put_blob(CODEC_RAW, &pattern(4 << 20, 1)).unwrap();
    let kept = s.put_blob(CODEC_RAW, &pattern(C + 3, 2)).unwrap();
    let mut facts = vec![genesis];
    facts.extend((0..100u64).map(|i| app(ns, 1 + i / 10, &k, &i.to_be_bytes())));
    facts.push(tombstone(ns, 2, &k, old));
    s.insert_batch(&facts).unwrap();
    let digest = s.prefix_digest(ns, Epoch(5)).unwrap();
    s.insert_batch(&[snapshot_completed(ns, &k, 5, 5, digest)])
        .unwrap();
    let dry = s.prune_dry_run(ns).unwrap();
    assert_eq!((dry.blobs, dry.blob_bytes), (1, 4 << 20));
    assert!(s.has_blob(&old).unwrap());
    let before = s.file_size().unwrap();
    let r = s.prune(ns).unwrap();
    assert_eq!((r.blobs, r.blob_bytes), (1, 4 << 20));
    assert!(!s.has_blob(&old).unwrap());
    assert_eq!(table_entries(&s, "blob_chunks"), 2);
    assert_eq!(s.get_blob(&kept).unwrap().unwrap(), pattern(C + 3, 2));
    let after = s.compact().unwrap().bytes_after;
    assert!(after + (3 << 20) < before, "{before} -> {after}");
}

/// Overwrites chunk `n` of `cid` in the closed store at `path` with `bytes` (raw redb).
fn put_raw_chunk(path: &Path, cid: &ContentId, n: u32, bytes: Option<&[u8]>) {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(CHUNKS).unwrap();
        let key = cid.to_bytes();
        match bytes {
            Some(b) => t.insert((key.as_slice(), n), b).unwrap(),
            None => t.remove((key.as_slice(), n)).unwrap(),
        };
    }
    tx.commit().unwrap();
}

#[test]
fn damaged_or_missing_chunks_are_found_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let data = pattern(3 * C + 100, 5);
    let cid = {
        let s = Store::create(&p).unwrap();
        s.put_blob(CODEC_RAW, &data).unwrap()
    };
    // The last chunk damaged: its bytes are never handed out.
    let mut bad = data[3 * C..].to_vec();
    bad[50] ^= 0x40;
    put_raw_chunk(&p, &cid, 3, Some(&bad));
    {
        let s = Store::open(&p).unwrap();
        let e = s.get_blob(&cid).unwrap_err();
        assert!(matches!(e, StoreError::BlobCorrupt { .. }), "{e}");
        let mut r = s.blob_reader(&cid).unwrap().unwrap();
        let mut seen = Vec::new();
        let e = r.read_to_end(&mut seen).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(seen, data[..3 * C]);
        // A reader that swallows the error still gets a refusal from with_blob.
        let e = s
            .with_blob(&cid, |r| {
                let _ = r.read_to_end(&mut Vec::new());
            })
            .unwrap_err();
        assert!(matches!(e, StoreError::BlobCorrupt { .. }), "{e}");
    }
    // A chunk of the wrong length, then a missing chunk.
    put_raw_chunk(&p, &cid, 3, Some(&data[3 * C..3 * C + 99]));
    let e = Store::open(&p).unwrap().get_blob(&cid).unwrap_err();
    assert!(matches!(e, StoreError::BlobCorrupt { .. }), "{e}");
    put_raw_chunk(&p, &cid, 3, Some(&data[3 * C..]));
    assert_eq!(
        Store::open(&p).unwrap().get_blob(&cid).unwrap().unwrap(),
        data
    );
    put_raw_chunk(&p, &cid, 1, None);
    let e = Store::open(&p).unwrap().get_blob(&cid).unwrap_err();
    assert!(matches!(e, StoreError::BlobCorrupt { .. }), "{e}");
}

/// Rewrites a fresh store at `path` into format 1: blobs as single values in `blobs`.
fn make_format_1(path: &Path, blobs: &[Vec<u8>]) {
    drop(Store::create(path).unwrap());
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    tx.delete_table(CHUNKS).unwrap();
    tx.delete_table(INDEX).unwrap();
    {
        let mut t = tx.open_table(OLD_BLOBS).unwrap();
        for b in blobs {
            t.insert(
                ContentId::of(CODEC_RAW, b).to_bytes().as_slice(),
                b.as_slice(),
            )
            .unwrap();
        }
        tx.open_table(META)
            .unwrap()
            .insert("format_version", 1u32.to_be_bytes().as_slice())
            .unwrap();
    }
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
fn a_format_1_store_is_migrated_on_open_and_serves_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let blobs = vec![
        Vec::new(),
        pattern(10, 1),
        pattern(C, 2),
        pattern(5 * 1024 * 1024 + 1, 3),
    ];
    make_format_1(&p, &blobs);
    assert_eq!(format_version(&p), 1);
    {
        let s = Store::open(&p).unwrap();
        let mut listed = s.blobs().unwrap();
        listed.sort_by_key(|(_, len)| *len);
        assert_eq!(
            listed,
            blobs
                .iter()
                .map(|b| (ContentId::of(CODEC_RAW, b), b.len() as u64))
                .collect::<Vec<_>>()
        );
        for b in &blobs {
            let cid = ContentId::of(CODEC_RAW, b);
            assert!(s.has_blob(&cid).unwrap());
            assert_eq!(&s.get_blob(&cid).unwrap().unwrap(), b);
        }
        assert_eq!(
            table_entries(&s, "blob_chunks"),
            blobs
                .iter()
                .map(|b| b.len().div_ceil(C) as u64)
                .sum::<u64>()
        );
        // Writable in the new layout.
        s.put_blob(CODEC_RAW, &pattern(C + 1, 4)).unwrap();
    }
    assert_eq!(format_version(&p), tend_store::STORE_FORMAT_VERSION);
    {
        // The old table is gone.
        let db = redb::Database::open(&p).unwrap();
        let rtx = db.begin_read().unwrap();
        assert!(rtx.open_table(OLD_BLOBS).is_err());
    }
    // Reopening a migrated store is a plain open.
    let s = Store::open(&p).unwrap();
    assert_eq!(s.blobs().unwrap().len(), blobs.len() + 1);
    assert_eq!(
        &s.get_blob(&ContentId::of(CODEC_RAW, &blobs[3]))
            .unwrap()
            .unwrap(),
        &blobs[3]
    );
}

#[test]
fn a_store_older_than_format_1_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    make_format_1(&p, &[]);
    {
        let db = redb::Database::open(&p).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META)
            .unwrap()
            .insert("format_version", 0u32.to_be_bytes().as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let before = std::fs::read(&p).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert!(
        matches!(e, StoreError::UnsupportedFormat { found: 0, .. }),
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
}
