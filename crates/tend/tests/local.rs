//! The library on one device, without a network: data through the facade, atomic batches,
//! subscriptions and their cursors across a restart, refused input.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tend::{Batch, CacheEntry, Change, ChangeKind, Cursor, Device, Error, PutValue, Scan};

/// The next change of a subscription, failing the test if none comes within 5 s.
async fn next(changes: &mut (impl Stream<Item = tend::Result<Change>> + Unpin)) -> Change {
    tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("a change within 5 s")
        .expect("the feed stays open")
        .expect("a readable change")
}

/// The data changes (puts, deletes, appends) of a subscription, as short strings.
fn describe(c: &Change) -> Option<String> {
    match &c.kind {
        ChangeKind::Put {
            collection,
            key,
            value: PutValue::Bytes(v),
            ..
        } => Some(format!(
            "put {collection}/{key}={}",
            String::from_utf8_lossy(v)
        )),
        ChangeKind::Delete {
            collection, key, ..
        } => Some(format!("delete {collection}/{key}")),
        ChangeKind::Append { log, data, .. } => {
            Some(format!("append {log}:{}", String::from_utf8_lossy(data)))
        }
        _ => None,
    }
}

/// Takes changes until `n` data changes were seen; returns them described, and the cursor
/// of the last.
async fn take_data(
    changes: &mut (impl Stream<Item = tend::Result<Change>> + Unpin),
    n: usize,
) -> (Vec<String>, Cursor) {
    let mut out = Vec::new();
    let mut last = Cursor::START;
    while out.len() < n {
        let c = next(changes).await;
        assert!(
            c.cursor > last,
            "cursors increase: {:?} after {last:?}",
            c.cursor
        );
        last = c.cursor;
        out.extend(describe(&c));
    }
    (out, last)
}

#[test]
fn collections_logs_and_cache_through_the_facade() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::create(dir.path().join("a")).unwrap();

    let first = d.put("todo", "1", b"buy milk").unwrap();
    let second = d.put("todo", "1", b"buy oat milk").unwrap();
    assert_ne!(first.id, second.id);
    d.put("todo", "2", b"call mum").unwrap();
    d.put("notes", "x", b"elsewhere").unwrap();
    let one = d.get("todo", "1").unwrap().expect("present");
    assert_eq!(
        one.value, b"buy oat milk",
        "the device reads its latest write"
    );
    assert_eq!(one.version.id, second.id);
    assert_eq!(one.version.author, d.id());
    assert!(one.conflicts.is_empty());

    let keys = |s: &Scan| -> Vec<String> {
        d.scan("todo", s)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect()
    };
    assert_eq!(keys(&Scan::new()), ["1", "2"]);
    assert_eq!(keys(&Scan::new().after("1")), ["2"]);
    assert_eq!(keys(&Scan::new().limit(1)), ["1"]);
    assert_eq!(keys(&Scan::new().prefix("2")), ["2"]);

    d.delete("todo", "1").unwrap();
    assert_eq!(d.get("todo", "1").unwrap(), None);
    assert_eq!(keys(&Scan::new()), ["2"]);

    let c1 = d.log_append("history", b"one").unwrap();
    let c2 = d.log_append("history", b"two").unwrap();
    d.log_append("history", b"three").unwrap();
    let all = d.log_read("history", None, 10).unwrap();
    let data: Vec<&[u8]> = all.iter().map(|e| e.data.as_slice()).collect();
    assert_eq!(data, [&b"one"[..], b"two", b"three"]);
    assert_eq!(all[0].cursor, c1);
    assert_eq!(all[0].author, d.id());
    assert_eq!(d.log_read("history", Some(c1), 1).unwrap()[0].cursor, c2);
    d.log_trim("history", c2).unwrap();
    let left: Vec<Vec<u8>> = d
        .log_read("history", None, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(left, [b"two".to_vec(), b"three".to_vec()]);

    assert_eq!(d.cache_get("profile").unwrap(), CacheEntry::Absent);
    d.cache_put("profile", b"cached").unwrap();
    assert!(
        matches!(d.cache_get("profile").unwrap(), CacheEntry::Valid { value, .. } if value == b"cached")
    );

    // What was written is durable: a reopened device reads the same.
    drop(d);
    let d = Device::open(dir.path().join("a")).unwrap();
    assert_eq!(d.get("todo", "2").unwrap().unwrap().value, b"call mum");
    assert_eq!(d.log_read("history", None, 10).unwrap().len(), 2);
}

#[test]
fn a_batch_commits_all_its_writes_in_one_transaction_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::create(dir.path()).unwrap();
    d.put("todo", "old", b"kept").unwrap();

    let written = d
        .commit(
            Batch::new()
                .put("todo", "1", b"a")
                .put("todo", "1", b"b")
                .delete("todo", "old")
                .append("history", b"batched")
                .cache_put("k", b"v"),
        )
        .unwrap();
    assert_eq!(written.len(), 5);
    assert!(written[3].log_cursor.is_some(), "the append's cursor");
    assert_eq!(d.get("todo", "1").unwrap().unwrap().value, b"b");
    assert_eq!(d.get("todo", "old").unwrap(), None);

    // One bad write anywhere in a batch: nothing of it is written, not even the changes
    // feed moves.
    let before = d.last_cursor().unwrap();
    let bad_batches = [
        Batch::new()
            .put("todo", "2", b"x")
            .put("", "3", b"no collection"),
        Batch::new()
            .append("history", b"x")
            .delete("todo", "never-written"),
        Batch::new()
            .put("todo", "2", b"x")
            .put("todo", "bad\nkey", b"control character"),
    ];
    for batch in bad_batches {
        let e = d.commit(batch).unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(_) | Error::NotFound(_)),
            "{e:?}"
        );
    }
    assert_eq!(d.get("todo", "2").unwrap(), None);
    assert_eq!(d.log_read("history", None, 10).unwrap().len(), 1);
    assert_eq!(d.last_cursor().unwrap(), before);
    assert!(d.commit(Batch::new()).unwrap().is_empty());
}

#[test]
fn bad_input_is_refused_with_a_typed_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Device::open(dir.path()).unwrap_err(),
        Error::NotADevice(_)
    ));
    let d = Device::create(dir.path()).unwrap();
    assert!(matches!(
        Device::create(dir.path()).unwrap_err(),
        Error::AlreadyExists(_)
    ));
    let before = d.last_cursor().unwrap();

    let invalid = |r: Result<(), Error>| match r {
        Err(Error::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    invalid(d.put("", "k", b"v").map(drop));
    invalid(d.put("c", "", b"v").map(drop));
    invalid(d.put(&"c".repeat(300), "k", b"v").map(drop));
    invalid(d.get("c", "").map(drop));
    invalid(d.scan("c", &Scan::new().limit(0)).map(drop));
    invalid(d.scan("c", &Scan::new().limit(10_001)).map(drop));
    invalid(d.log_append("", b"x").map(drop));
    invalid(d.log_append("log", vec![0u8; 64 * 1024]).map(drop));
    invalid(d.log_read("log", None, 0).map(drop));
    invalid(d.cache_put("", b"x").map(drop));
    assert!(matches!(
        d.delete("c", "absent").unwrap_err(),
        Error::NotFound(_)
    ));
    assert!(matches!(
        d.add_peer(tend::PeerAddr {
            device: d.id(),
            addr: "127.0.0.1:1".parse().unwrap()
        })
        .unwrap_err(),
        Error::InvalidInput(_)
    ));
    assert!("x1".parse::<Cursor>().is_err());
    assert_eq!(d.last_cursor().unwrap(), before, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_control_refuses_what_a_stopped_or_running_device_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::open_or_create(dir.path()).unwrap();
    assert_eq!(
        Device::open_or_create(dir.path())
            .map(|again| again.id())
            .ok(),
        None,
        "the store is open: a second handle to the same home is refused"
    );
    assert!(!d.is_running());
    assert!(matches!(d.sync_now().await.unwrap_err(), Error::NotRunning));
    assert!(matches!(
        d.create_authority(2, &[d.id()]).await.unwrap_err(),
        Error::NotRunning
    ));
    let addr = d.start(tend::SyncOptions::new()).await.unwrap();
    assert_eq!(addr.device, d.id());
    assert!(addr.addr.ip().is_loopback());
    assert!(matches!(
        d.start(tend::SyncOptions::new()).await.unwrap_err(),
        Error::AlreadyRunning
    ));
    assert!(matches!(
        d.create_authority(2, &[]).await.unwrap_err(),
        Error::InvalidInput(_)
    ));
    // Joining an admin that never runs key generation gives up after the timeout.
    let elsewhere = tempfile::tempdir().unwrap();
    let stranger = Device::create(elsewhere.path()).unwrap();
    let absent_admin = tend::PeerAddr {
        device: stranger.id(),
        addr: "127.0.0.1:9".parse().unwrap(),
    };
    let t = std::time::Instant::now();
    assert!(matches!(
        d.join(absent_admin, Duration::from_millis(300))
            .await
            .unwrap_err(),
        Error::Authority(_)
    ));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(d.authority().unwrap().members, [d.id()], "still alone");
    let status = d.status().unwrap();
    assert!(status.running);
    assert_eq!(status.listen_addr, Some(addr.addr));
    assert_eq!(status.device_id, d.id());
    // Writes work while the node runs, and after it stops.
    d.put("todo", "1", b"while running").unwrap();
    d.stop().await;
    assert!(!d.is_running());
    assert!(!d.status().unwrap().running);
    d.put("todo", "2", b"after stopping").unwrap();
    // It starts again over the same store.
    d.start(tend::SyncOptions::new()).await.unwrap();
    assert_eq!(d.get("todo", "1").unwrap().unwrap().value, b"while running");
    d.stop().await;
    let id = d.id();
    drop(d);
    assert_eq!(
        Device::open_or_create(dir.path()).unwrap().id(),
        id,
        "opened, not made anew"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sees_local_writes_in_order_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("d");
    let d = Device::create(&home).unwrap();
    let start = d.last_cursor().unwrap();

    // A subscriber that is caught up wakes for each later write (the store's listener).
    let mut changes = Box::pin(d.subscribe(start));
    let writer = d.clone();
    let writes = tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            writer
                .put("todo", &i.to_string(), format!("item {i}"))
                .unwrap();
        }
        writer
            .commit(Batch::new().append("history", b"a").delete("todo", "0"))
            .unwrap();
        for i in 3..6 {
            writer
                .put("todo", &i.to_string(), format!("item {i}"))
                .unwrap();
        }
    });
    let (mut seen, saved) = take_data(&mut changes, 5).await;
    writes.await.unwrap();
    // The writes of one batch are admitted together, in fact-id order (the store's rule).
    seen[3..].sort();
    assert_eq!(
        seen,
        [
            "put todo/0=item 0",
            "put todo/1=item 1",
            "put todo/2=item 2",
            "append history:a",
            "delete todo/0",
        ]
    );

    // The app saves `saved`, the process ends (stream and device dropped), it starts again.
    drop(changes);
    drop(d);
    let d = Device::open(&home).unwrap();
    d.put("todo", "6", b"item 6").unwrap();
    let mut resumed =
        Box::pin(d.subscribe(Cursor::from_u64(saved.to_string().parse::<u64>().unwrap())));
    let (rest, _) = take_data(&mut resumed, 4).await;
    assert_eq!(
        rest,
        [
            "put todo/3=item 3",
            "put todo/4=item 4",
            "put todo/5=item 5",
            "put todo/6=item 6",
        ],
        "exactly the changes after the saved cursor"
    );
    // Nothing more: the stream waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resumed.next())
            .await
            .is_err(),
        "no change after the last write"
    );

    // From the start: the whole history, the device's own genesis first.
    let mut all = Box::pin(d.subscribe(Cursor::START));
    let genesis = next(&mut all).await;
    assert_eq!(genesis.cursor, Cursor::from_u64(1));
    assert!(matches!(genesis.kind, ChangeKind::Other { .. }));
    let (everything, _) = take_data(&mut all, 9).await;
    assert_eq!(everything[0], "put todo/0=item 0");
    assert_eq!(everything[8], "put todo/6=item 6");
}

/// A device created by the library announces its release at once, so what it writes
/// before it ever starts is in the newest fact format (3), not format 1.
#[test]
fn a_created_device_writes_the_newest_fact_format_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    let device = Device::create(&home).unwrap();
    device.log_append("events", b"first").unwrap();
    drop(device);
    let device = tend_node::Device::open(&home).unwrap();
    let entry = device
        .store()
        .scan(device.namespace(), ..)
        .unwrap()
        .map(|f| f.unwrap().trusted().unwrap())
        .find(|f| tend_core::app::is_data(f.payload()))
        .expect("the appended entry");
    assert_eq!(entry.format().version(), 3);
}
