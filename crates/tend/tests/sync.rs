//! Two devices on 127.0.0.1 through the library: an authority formed by key generation over
//! the network, writes on one seen on the other, live, through a subscription.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use tend::{ChangeKind, Cursor, Device, PutValue, SyncOptions};

fn options() -> SyncOptions {
    SyncOptions::new().sync_interval(Duration::from_millis(300))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sees_remote_and_local_changes_in_admission_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = Device::create(dir.path().join("a")).unwrap();
    let b = Device::create(dir.path().join("b")).unwrap();
    let a_addr = a.start(options()).await.unwrap();
    let b_addr = b.start(options()).await.unwrap();
    a.add_peer(b_addr).unwrap();
    b.add_peer(a_addr).unwrap();
    let others = [b.id()];
    let (made, joined) = tokio::join!(
        a.create_authority(2, &others),
        b.join(a_addr, Duration::from_secs(30)),
    );
    let (made, joined) = (made.unwrap(), joined.unwrap());
    assert_eq!(made, joined);
    assert_eq!(made.threshold, 2);
    let mut members = vec![a.id(), b.id()];
    members.sort();
    assert_eq!(made.members, members);
    assert_eq!(a.authority().unwrap(), b.authority().unwrap());

    let from = b.last_cursor().unwrap();
    let mut changes = Box::pin(b.subscribe(from));
    for i in 0..4 {
        a.put("todo", &format!("a{i}"), format!("from a {i}"))
            .unwrap();
        b.put("todo", &format!("b{i}"), format!("from b {i}"))
            .unwrap();
    }
    a.log_append("history", b"a wrote four").unwrap();

    // Every one of the nine writes arrives once, cursors strictly increasing; b's own
    // writes in the order it made them.
    let mut expected: HashSet<String> = (0..4)
        .flat_map(|i| [format!("a{i}"), format!("b{i}")])
        .collect();
    expected.insert("history".into());
    let mut last = from;
    let mut local_order = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !expected.is_empty() {
        let change = tokio::time::timeout_at(deadline, changes.next())
            .await
            .unwrap_or_else(|_| panic!("still missing {expected:?} after 20 s"))
            .expect("the feed stays open")
            .expect("a readable change");
        assert!(change.cursor > last, "admission order");
        last = change.cursor;
        match change.kind {
            ChangeKind::Put {
                collection,
                key,
                value: PutValue::Bytes(v),
            } => {
                assert_eq!(collection, "todo");
                let who = if key.starts_with('a') { a.id() } else { b.id() };
                assert_eq!(change.author, who, "{key}");
                assert_eq!(v, format!("from {} {}", &key[..1], &key[1..]).into_bytes());
                if who == b.id() {
                    local_order.push(key.clone());
                }
                assert!(expected.remove(&key), "{key} seen twice");
            }
            ChangeKind::Append { log, data, .. } => {
                assert_eq!(
                    (log.as_str(), data.as_slice()),
                    ("history", &b"a wrote four"[..])
                );
                assert_eq!(change.author, a.id());
                assert!(expected.remove("history"), "the append seen twice");
            }
            // Maintenance facts (device metadata, ...) may come too.
            _ => {}
        }
    }
    assert_eq!(local_order, ["b0", "b1", "b2", "b3"]);
    assert_eq!(b.get("todo", "a3").unwrap().unwrap().value, b"from a 3");

    // The subscription's view is the feed's: a second subscriber from the same cursor
    // sees the same changes in the same order.
    let mut again = Box::pin(b.subscribe(from));
    let mut replay = Vec::new();
    while replay.last().is_none_or(|c: &Cursor| *c < last) {
        let c = again.next().await.unwrap().unwrap();
        replay.push(c.cursor);
    }
    assert_eq!(*replay.last().unwrap(), last);

    let status = b.status().unwrap();
    assert!(status.peers.iter().any(|p| p.device_id == a.id()));
    a.stop().await;
    b.stop().await;

    // Once stopped and dropped, a device that ran sessions opens again at once, with what
    // sync brought it.
    drop((changes, again, b));
    let b = Device::open(dir.path().join("b")).unwrap();
    assert_eq!(b.get("todo", "a0").unwrap().unwrap().value, b"from a 0");
}
