//! Export and restore round trips over real stores, real age, zstd and tar: 100k facts with
//! a threshold-signed snapshot, a journal without a snapshot, bounded tail chunks, and a
//! restored device converging with its fleet.

mod common;

use common::*;
use tend_backup::format::MIN_CHUNK_BYTES;
use tend_backup::{export_file, verify_file, Encryption, ExportOptions, TAIL_CHUNK_BYTES};
use tend_core::Epoch;
use tend_node::Device;

#[test]
fn export_restore_100k_facts_reproduces_state_and_fact_set() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let d = device(dir.path(), "source");
    // The in-process ceremony re-reads the whole journal several times (slow in a debug
    // build), so most of the 100k facts come after the snapshot; the 1M benchmark covers
    // a large prefix.
    add_facts(&d, 10_000, 1..=10, "before");
    let d = snapshot(vec![d], 11).pop().unwrap();
    add_facts(&d, 90_000, 11..=15, "after");
    eprintln!("setup {:?}", t.elapsed());
    let ns = d.namespace();
    let state = d.store().maintenance_state(ns).unwrap();
    let e = state.snapshot_epoch();
    assert_eq!(e, Epoch(11));

    let (enc, dec) = x25519();
    let archive = dir.path().join("backup.age");
    let t = std::time::Instant::now();
    let report = export_file(d.store(), ns, &archive, &ExportOptions::new(&enc)).unwrap();
    eprintln!("export {:?}: {report:?}", t.elapsed());
    assert_eq!(report.snapshot_epoch, Some(11));
    // The tail: 90k application facts plus the proposal and completion at or above E.
    assert!(report.tail_facts >= 90_000 && report.tail_facts < 90_010);
    // Streaming: the tail went out in several chunks, none above the bound.
    assert!(report.tail_chunks >= 2, "{report:?}");
    assert!(report.largest_chunk_bytes <= TAIL_CHUNK_BYTES as u64);

    let home = dir.path().join("restored");
    let t = std::time::Instant::now();
    let restored_report = restore(&archive, &dec, &home).unwrap();
    eprintln!("restore {:?}", t.elapsed());

    let r = Device::open(&home).unwrap();
    assert_eq!(r.namespace(), ns);
    assert_ne!(
        r.device_id(),
        d.device_id(),
        "a restored home gets a new device key"
    );
    let rs = r.store();
    let restored_state = rs.maintenance_state(ns).unwrap();
    assert_eq!(restored_state.state_digest(), state.state_digest());
    assert_eq!(
        restored_report.state_digest,
        state.state_digest().to_string()
    );
    // The fact set: everything at and above E, and every maintenance fact.
    assert_eq!(tail_digest(rs, ns, e), tail_digest(d.store(), ns, e));
    // Below E the index holds exactly the live application facts the blob carried, and
    // the application state reads the same.
    let below: std::collections::BTreeSet<_> = rs
        .items(ns, ..e)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(below, d.store().live_below(ns, e).unwrap());
    assert!(
        !below.is_empty(),
        "the application facts below E are live log entries"
    );
    let floors = &state.cache_floors;
    assert_eq!(
        rs.app_digest(ns, floors).unwrap(),
        d.store().app_digest(ns, floors).unwrap()
    );
    assert_eq!(maintenance_ids(rs, ns), maintenance_ids(d.store(), ns));
    let cid = state.latest_snapshot.as_ref().unwrap().snapshot.blob_cid;
    assert_eq!(
        rs.get_blob(&cid).unwrap(),
        d.store().get_blob(&cid).unwrap()
    );
}

#[test]
fn a_journal_without_snapshot_is_backed_up_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(dir.path(), "source");
    add_facts(&d, 500, 1..=3, "x");
    let ns = d.namespace();
    let (enc, dec) = x25519();
    let archive = dir.path().join("b.age");
    let report = export_file(d.store(), ns, &archive, &ExportOptions::new(&enc)).unwrap();
    assert_eq!(report.snapshot_epoch, None);
    assert_eq!(report.tail_facts, 501, "the genesis and every fact");
    let members = unpack(&std::fs::read(&archive).unwrap(), &dec);
    let manifest: tend_backup::Manifest =
        serde_json::from_slice(&members.last().unwrap().1).unwrap();
    assert!(manifest.snapshot.is_none());

    let home = dir.path().join("r");
    restore(&archive, &dec, &home).unwrap();
    let r = Device::open(&home).unwrap();
    assert_eq!(
        r.store().journal_digest(ns).unwrap(),
        d.store().journal_digest(ns).unwrap()
    );
    assert_eq!(
        r.store().maintenance_state(ns).unwrap().state_digest(),
        d.store().maintenance_state(ns).unwrap().state_digest()
    );
}

#[test]
fn small_chunks_bound_what_export_holds_and_restore_reads_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(dir.path(), "source");
    add_facts(&d, 5_000, 1..=5, "x");
    let ns = d.namespace();
    let (enc, dec) = x25519();
    let archive = dir.path().join("b.age");
    let mut opts = ExportOptions::new(&enc);
    opts.chunk_bytes = 1; // clamped to the minimum
    let report = export_file(d.store(), ns, &archive, &opts).unwrap();
    assert!(report.largest_chunk_bytes <= MIN_CHUNK_BYTES as u64);
    assert!(report.tail_chunks >= 5, "{report:?}");
    let home = dir.path().join("r");
    let r = restore(&archive, &dec, &home).unwrap();
    assert_eq!(verify_file(&archive, &dec, None).unwrap(), r);
    assert_eq!(r.tail_facts, 5_001);
    assert_eq!(
        Device::open(&home)
            .unwrap()
            .store()
            .journal_digest(ns)
            .unwrap(),
        d.store().journal_digest(ns).unwrap()
    );
}

#[test]
fn a_passphrase_archive_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(dir.path(), "source");
    add_facts(&d, 100, 1..=2, "x");
    let d = snapshot(vec![d], 3).pop().unwrap();
    let pass = write(dir.path(), "pass", b"correct horse battery staple\n");
    let enc = match Encryption::passphrase_file(&pass).unwrap() {
        Encryption::Passphrase { passphrase, .. } => Encryption::Passphrase {
            passphrase,
            work_factor: Some(10),
        },
        other => other,
    };
    let dec = tend_backup::Decryption::passphrase_file(&pass).unwrap();
    let archive = dir.path().join("b.age");
    export_file(
        d.store(),
        d.namespace(),
        &archive,
        &ExportOptions::new(&enc),
    )
    .unwrap();
    let home = dir.path().join("r");
    let r = restore(&archive, &dec, &home).unwrap();
    assert_eq!(r.snapshot_epoch, Some(3));
}

#[test]
fn a_restored_device_joins_sync_and_converges_with_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<Device> = (0..3)
        .map(|i| device(dir.path(), &format!("d{i}")))
        .collect();
    let mut f = fleet(devices);
    f.create_authority(2, &mut rng()).unwrap();
    let devices = unfleet(f);
    let start = devices[0]
        .store()
        .maintenance_state(devices[0].namespace())
        .unwrap();
    let e0 = start.current_epoch().0;
    for (i, d) in devices.iter().enumerate() {
        for j in 0..50 {
            d.add_application_fact("note", format!("{i}-{j}").as_bytes())
                .unwrap();
        }
    }
    let f = fleet(devices);
    f.sync().unwrap();
    let devices = snapshot(unfleet(f), e0 + 1);
    for d in &devices {
        d.add_application_fact("note", b"after the snapshot")
            .unwrap();
    }
    let f = fleet(devices);
    f.sync().unwrap();
    let mut devices = unfleet(f);
    for d in &mut devices {
        // The export below then reads the snapshot blob rebuilt from the kept facts.
        assert!(d.gc(false).unwrap().snapshot_blob_as_facts);
    }

    // Back up a non-admin member and restore on a new machine.
    let (enc, dec) = x25519();
    let archive = dir.path().join("b.age");
    export_file(
        devices[1].store(),
        devices[1].namespace(),
        &archive,
        &ExportOptions::new(&enc),
    )
    .unwrap();
    let home = dir.path().join("restored");
    restore(&archive, &dec, &home).unwrap();
    let restored = Device::open(&home).unwrap();
    let ns = devices[0].namespace();
    assert_eq!(restored.namespace(), ns);
    assert_eq!(
        restored.store().journal_digest(ns).unwrap(),
        devices[1].store().journal_digest(ns).unwrap()
    );

    // The fleet moves on while the restored device is away, then everyone syncs.
    for d in &devices {
        d.add_application_fact("note", b"while restoring").unwrap();
    }
    devices.push(restored);
    let fleet = fleet(devices);
    fleet.sync().unwrap();
    let digests: Vec<_> = fleet
        .devices()
        .iter()
        .map(|d| d.store().journal_digest(ns).unwrap())
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let states: Vec<_> = fleet
        .devices()
        .iter()
        .map(|d| d.store().maintenance_state(ns).unwrap().state_digest())
        .collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]));
}

/// The store calls restore and export rely on to never hold a blob whole: a streamed write
/// commits only verified bytes, and a lent reader sees exactly what was stored.
#[test]
fn the_store_streams_a_blob_in_and_lends_it_out() {
    use std::io::{Read, Write};
    use tend_core::ids::CODEC_DAG_CBOR;
    use tend_core::ContentId;
    let dir = tempfile::tempdir().unwrap();
    let store = tend_store::Store::create(dir.path().join("s.redb")).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let cid = ContentId::of(CODEC_DAG_CBOR, &data);
    // The filler fails: nothing is stored.
    let r = store
        .put_blob_with(&cid, data.len(), |_| Err("the archive broke"))
        .unwrap();
    assert_eq!(r, Err("the archive broke"));
    assert!(!store.has_blob(&cid).unwrap());
    // Bytes that do not hash to the CID: refused, nothing stored.
    let mut bad = data.clone();
    bad[7] ^= 1;
    let e = store.put_blob_with(&cid, data.len(), |w| {
        w.write_all(&bad).unwrap();
        Ok::<(), ()>(())
    });
    assert!(
        matches!(e, Err(tend_store::StoreError::BlobMismatch { .. })),
        "{e:?}"
    );
    assert!(!store.has_blob(&cid).unwrap());
    // The right bytes are stored and lent back as they are.
    store
        .put_blob_with(&cid, data.len(), |w| {
            w.write_all(&data).unwrap();
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
    assert_eq!(store.get_blob(&cid).unwrap().unwrap(), data);
    let lent = store
        .with_blob(&cid, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .unwrap()
        .unwrap();
    assert_eq!(lent, data);
    let other = ContentId::of(CODEC_DAG_CBOR, b"other");
    assert!(store.with_blob(&other, |_| ()).unwrap().is_none());
}
