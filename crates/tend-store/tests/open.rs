//! Creating and opening store files: bad files are refused and left byte-identical.

mod common;

use std::path::Path;

use common::*;
use tend_store::{Store, StoreError};

fn store_with_facts(path: &Path, n: u64) {
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let store = Store::create(path).unwrap();
    let mut facts = vec![genesis];
    facts.extend((0..n).map(|i| app(ns, 1 + i / 100, &k, &i.to_be_bytes())));
    let r = store.insert_batch(&facts).unwrap();
    assert_eq!(r.inserted, n + 1);
    store.put_blob(0x55, &[7u8; 10_000]).unwrap();
}

/// Opens `path` expecting an error, checks the file is unchanged, and returns the error.
fn refused(path: &Path) -> StoreError {
    let before = std::fs::read(path).ok();
    let err = Store::open(path).expect_err("open should fail");
    assert_eq!(std::fs::read(path).ok(), before, "file was modified: {err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in {msg}"
    );
    err
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, b"precious").unwrap();
    let err = Store::create(&p).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
}

#[test]
fn open_refuses_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("none.redb");
    assert!(matches!(
        Store::open(&p).unwrap_err(),
        StoreError::NotFound { .. }
    ));
    assert!(!p.exists());
}

#[test]
fn foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello, this is not a database\n".repeat(500)).unwrap();
    assert!(matches!(refused(&text), StoreError::NotAStore { .. }));

    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(refused(&empty), StoreError::NotAStore { .. }));

    let short = dir.path().join("short");
    std::fs::write(&short, b"redb").unwrap();
    assert!(matches!(refused(&short), StoreError::NotAStore { .. }));

    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
}

#[test]
fn another_programs_redb_file_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&p).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("data");
            tx.open_table(def).unwrap().insert(1, 2).unwrap();
        }
        tx.commit().unwrap();
    }
    let err = refused(&p);
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");

    // Same, with a `meta` table of other types.
    let p2 = dir.path().join("other2.redb");
    {
        let db = redb::Database::create(&p2).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("meta");
            tx.open_table(def).unwrap().insert(1, 2).unwrap();
        }
        tx.commit().unwrap();
    }
    let err = refused(&p2);
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
}

#[test]
fn newer_format_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    store_with_facts(&p, 10);
    {
        let db = redb::Database::open(&p).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
            let mut t = tx.open_table(def).unwrap();
            t.insert("format_version", 99u32.to_be_bytes().as_slice())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let err = refused(&p);
    assert!(
        matches!(
            err,
            StoreError::NewerFormat {
                found: 99,
                supported: tend_store::STORE_FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer"));
}

#[test]
fn truncated_stores_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    store_with_facts(&p, 3000);
    let full = std::fs::read(&p).unwrap();
    for cut in [
        9usize,
        100,
        512,
        4096,
        full.len() / 3,
        full.len() / 2,
        full.len() - 4096,
        full.len() - 1,
    ] {
        let t = dir.path().join(format!("cut{cut}.redb"));
        std::fs::write(&t, &full[..cut]).unwrap();
        let err = refused(&t);
        assert!(
            matches!(
                err,
                StoreError::Corrupt { .. } | StoreError::NotAStore { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn corrupt_stores_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    store_with_facts(&p, 3000);
    let full = std::fs::read(&p).unwrap();
    let mut refused_count = 0;
    // Damage pages throughout the file (after the header region).
    for frac in [2usize, 3, 4, 5, 6, 7, 8, 9] {
        let at = full.len() * (frac - 1) / frac;
        let mut bad = full.clone();
        for b in &mut bad[at..at + 64] {
            *b ^= 0xa5;
        }
        let t = dir.path().join(format!("bad{frac}.redb"));
        std::fs::write(&t, &bad).unwrap();
        let before = std::fs::read(&t).unwrap();
        match Store::open(&t) {
            Err(e) => {
                refused_count += 1;
                assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
            }
            // Damage in free space is harmless; the store must then read fine.
            Ok(s) => {
                drop(s);
            }
        }
        if std::fs::read(&t).unwrap() != before {
            // Opening succeeded (healthy store), so redb may have written its header.
            assert!(Store::open(&t).is_ok());
        }
    }
    assert!(refused_count > 0, "no damage was detected");

    // Damaging the header's commit slots.
    let mut bad = full.clone();
    for b in &mut bad[9..600] {
        *b ^= 0xff;
    }
    let t = dir.path().join("badhead.redb");
    std::fs::write(&t, &bad).unwrap();
    let err = refused(&t);
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let (digest, state, stats) = {
        let s = Store::create(&p).unwrap();
        let mut facts = vec![genesis.clone()];
        facts.extend((0..500u64).map(|i| app(ns, 1 + i / 50, &k, &i.to_be_bytes())));
        facts.push(cache_invalidated(ns, 3, &k, "a", 2));
        s.insert_batch(&facts).unwrap();
        s.put_setting("floor", &7u64).unwrap();
        (
            s.journal_digest(ns).unwrap(),
            s.maintenance_state(ns).unwrap(),
            s.stats(ns).unwrap(),
        )
    };
    let s = Store::open(&p).unwrap();
    assert_eq!(s.journal_digest(ns).unwrap(), digest);
    assert_eq!(s.maintenance_state(ns).unwrap(), state);
    assert_eq!(s.stats(ns).unwrap(), stats);
    assert_eq!(s.get_setting::<u64>("floor").unwrap(), Some(7));
    // Still writable, and re-inserting is idempotent.
    let r = s.insert_batch(&[genesis]).unwrap();
    assert_eq!((r.inserted, r.duplicates), (0, 1));
    drop(s);
    // A second handle on an open store is refused.
    let s = Store::open(&p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let err = Store::open(&p).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    drop(s);
}

#[test]
fn a_store_left_open_by_a_crash_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.redb");
    let k = key(1);
    let (ns, genesis) = authority(&k);
    let digest = {
        let s = Store::create(&p).unwrap();
        let mut facts = vec![genesis];
        facts.extend((0..200u64).map(|i| app(ns, 1 + i / 10, &k, &i.to_be_bytes())));
        s.insert_batch(&facts).unwrap();
        let d = s.journal_digest(ns).unwrap();
        // No clean shutdown: the file keeps its "open for writing" state.
        std::mem::forget(s);
        d
    };
    // The lock of the forgotten handle is still held in this process; copy the file as a
    // crashed process would have left it.
    let copy = dir.path().join("crashed.redb");
    std::fs::copy(&p, &copy).unwrap();
    let s = Store::open(&copy).unwrap();
    assert_eq!(s.journal_digest(ns).unwrap(), digest);
    assert_eq!(s.stats(ns).unwrap().unwrap().facts, 201);
}

#[test]
fn store_is_shareable_between_threads() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

/// A setting written without waiting for the disk reads back at once, and the next
/// durable commit persists it with its own: both are there after reopening.
#[test]
fn unsynced_settings_persist_with_the_next_durable_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = Store::create(&path).unwrap();
        store.put_setting_unsynced("peers", &vec![1u32, 2]).unwrap();
        assert_eq!(
            store.get_setting::<Vec<u32>>("peers").unwrap(),
            Some(vec![1, 2])
        );
        store.put_setting("other", &7u32).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.get_setting::<Vec<u32>>("peers").unwrap(),
        Some(vec![1, 2])
    );
    assert_eq!(store.get_setting::<u32>("other").unwrap(), Some(7));
}
