//! The peer table on real nodes over loopback: a peer that cannot be reached goes offline
//! and is skipped, a peer that misbehaves again and again is banned and refused, an
//! honest sync records its time, and scores, statuses, operator trust and sync times
//! survive a restart.

mod common;

use std::time::Duration;

use common::*;
use iroh::endpoint::ConnectionError;
use tend_node::endpoint::{self, close_code, SYNC_ALPN};
use tend_node::{Device, Node, NodeConfig, PeerAddr, PeerInfo};

fn info(node: &Node, device: &tend_core::DeviceId) -> PeerInfo {
    node.peers()
        .into_iter()
        .find(|p| p.device_id == device.to_string())
        .expect("the peer is known")
}

/// No background rounds: the test drives every session.
fn quiet(peers: Vec<PeerAddr>) -> NodeConfig {
    NodeConfig {
        sync_interval: Duration::from_secs(3600),
        connect_timeout: Duration::from_millis(500),
        ..config(peers)
    }
}

/// Starts the device in `home` again (the old node may take a moment to let go of the
/// store).
async fn restart(home: &std::path::Path) -> Node {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let started = match Device::open(home) {
            Ok(device) => Node::start(device, quiet(vec![]))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(node) => return node,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot restart: {e}"),
        }
    }
}

/// A loopback address nothing listens on.
fn dead_addr() -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind(loopback()).unwrap();
    socket.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_goes_offline_is_skipped_and_the_table_survives_a_restart() {
    let mut fleet = Fleet::new(3, &[true, true, true]);
    let (b_id, c_id) = (fleet.ids[1], fleet.ids[2]);
    let b = Node::start(fleet.take(1), quiet(vec![])).await.unwrap();
    let dead = PeerAddr {
        device: c_id,
        addr: dead_addr(),
    };
    let a = Node::start(fleet.take(0), quiet(vec![b.peer_addr(), dead]))
        .await
        .unwrap();

    // An honest peer: the sync time is recorded, here and in the node status.
    let before = tend_node::peer_table::unix_ms_now();
    assert!(a.sync_with(b.peer_addr()).await.ok);
    let honest = info(&a, &b_id);
    assert_eq!(honest.status, "online");
    let synced_at = honest.last_sync_unix_ms.expect("a sync time");
    assert!(synced_at >= before);
    assert_eq!(a.status().unwrap().last_sync_unix_ms, Some(synced_at));
    // The role's trust: B is a member, not the admin.
    assert_eq!(honest.trust, tend_node::peer_table::MEMBER_TRUST);

    // Three connection failures in a row (the round at start may have made the first):
    // offline, and rounds skip it.
    let mut tries = 0;
    while info(&a, &c_id).status == "online" {
        assert!(tries < 3, "still online after {tries} failures here");
        assert!(!a.sync_with(dead).await.ok);
        tries += 1;
    }
    let c = info(&a, &c_id);
    assert_eq!((c.status.as_str(), c.consecutive_failures), ("offline", 3));
    let round = a.sync_now().await;
    assert!(
        round.sessions.iter().all(|s| s.peer != c_id.to_string()),
        "{round:?}"
    );
    assert!(round
        .sessions
        .iter()
        .any(|s| s.peer == b_id.to_string() && s.ok));

    // The operator's trust outweighs the role's.
    let set = a.edit_peer(b_id, Some(Some(0.3)), None).unwrap();
    assert_eq!((set.trust, set.operator_trust), (0.3, Some(0.3)));
    let (b_before, c_before) = (info(&a, &b_id), info(&a, &c_id));

    // A restart keeps scores, statuses, operator trust and sync times.
    a.shutdown().await;
    drop(a);
    let a = restart(&fleet.home(0)).await;
    for (was, d) in [(b_before, b_id), (c_before, c_id)] {
        let now = info(&a, &d);
        assert_eq!(
            (
                now.status,
                now.trust,
                now.operator_trust,
                now.successful_syncs
            ),
            (
                was.status,
                was.trust,
                was.operator_trust,
                was.successful_syncs
            )
        );
        assert_eq!(
            (now.failed_syncs, now.last_sync_unix_ms, now.score),
            (was.failed_syncs, was.last_sync_unix_ms, was.score)
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_keeps_misbehaving_is_demoted_then_banned_and_refused() {
    let mut fleet = Fleet::new(2, &[true, true]);
    let b = fleet.take(1);
    let b_id = b.device_id();
    let a = Node::start(fleet.take(0), quiet(vec![])).await.unwrap();
    let mut trust = Vec::new();
    for _ in 0..3 {
        let ep = endpoint::bind(b.key(), loopback()).await.unwrap();
        let to = endpoint::endpoint_addr(a.device_id(), a.peer_addr().addr).unwrap();
        let conn = ep.connect(to, SYNC_ALPN).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // An oversized frame: misbehaviour.
        send.write_all(&0x7fff_ffffu32.to_be_bytes()).await.unwrap();
        let _ = send.write_all(b"not really").await;
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        assert!(matches!(closed, Ok(ConnectionError::ApplicationClosed(_))));
        trust.push(info(&a, &b_id).trust);
    }
    // Each misbehaviour halves trust; the third bans.
    let member = tend_node::peer_table::MEMBER_TRUST;
    assert_eq!(trust, vec![member / 2.0, member / 4.0, member / 8.0]);
    assert_eq!(info(&a, &b_id).status, "banned");
    assert_eq!(info(&a, &b_id).misbehaviours, 3);

    // A banned peer is refused before any session, and stays banned after a restart.
    let ep = endpoint::bind(b.key(), loopback()).await.unwrap();
    let to = endpoint::endpoint_addr(a.device_id(), a.peer_addr().addr).unwrap();
    let conn = ep.connect(to, SYNC_ALPN).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code.into_inner(), u64::from(close_code::NOT_MEMBER));
            assert_eq!(&c.reason[..], b"banned by this device");
        }
        other => panic!("unexpected close: {other:?}"),
    }
    a.shutdown().await;
    drop(a);
    let a = restart(&fleet.home(0)).await;
    assert_eq!(info(&a, &b_id).status, "banned");
    // The operator lifts the ban, forgiving the past.
    let lifted = a.edit_peer(b_id, None, Some(false)).unwrap();
    assert_eq!((lifted.status.as_str(), lifted.trust), ("online", member));
    a.shutdown().await;
}
