//! Real devices on loopback: iroh endpoints on 127.0.0.1, redb stores in tempdirs.

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use common::*;
use tend_core::authority::{AuthorityFact, MembershipChange};
use tend_core::{GroupKey, Payload};
use tend_node::{Node, NodeConfig, PeerAddr};
use tend_sync::{ManagerConfig, Rate, RateConfig};

/// The common test config without device-metadata advertisements: these tests count
/// facts exactly.
fn quiet(peers: Vec<PeerAddr>) -> NodeConfig {
    NodeConfig {
        upgrades: false,
        ..config(peers)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_with_disjoint_facts_converge() {
    // Device 2 joins with an empty store and learns the journal over the network.
    let mut fleet = Fleet::new(3, &[true, true, false]);
    bulk_facts(fleet.device(0), "a", 40);
    bulk_facts(fleet.device(1), "b", 60);
    let a = Node::start(fleet.take(0), quiet(vec![])).await.unwrap();
    let b = Node::start(fleet.take(1), quiet(vec![a.peer_addr()]))
        .await
        .unwrap();
    let c = Node::start(fleet.take(2), quiet(vec![a.peer_addr(), b.peer_addr()]))
        .await
        .unwrap();
    a.add_peer(b.peer_addr()).unwrap();
    a.add_peer(c.peer_addr()).unwrap();
    b.add_peer(c.peer_addr()).unwrap();
    // Once c knows the journal it writes facts of its own.
    let start = std::time::Instant::now();
    while c
        .device()
        .store()
        .maintenance_state(c.device().namespace())
        .unwrap()
        .membership()
        .is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "c never learned the journal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..25 {
        c.add_fact("note", format!("c-{i}").as_bytes()).unwrap();
    }
    converge(&[&a, &b, &c], Duration::from_secs(20)).await;
    // genesis + membership change + 40 + 60 + 25
    assert_eq!(fact_count(&a), 127);
    assert_eq!(fact_count(&c), 127);
    // Peers persisted for the next start.
    let stored = tend_node::discovery::load_peers(a.device().store()).unwrap();
    assert!(stored.contains(&b.peer_addr()) && stored.contains(&c.peer_addr()));
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_converge_after_a_partition_heals() {
    let mut fleet = Fleet::new(5, &[true; 5]);
    let mut nodes = Vec::new();
    for i in 0..5 {
        nodes.push(Node::start(fleet.take(i), quiet(vec![])).await.unwrap());
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.peer_addr()).collect();
    let left = [0usize, 1];
    let right = [2usize, 3, 4];
    for &l in &left {
        for &r in &right {
            nodes[l].block_peer(addrs[r].device);
            nodes[r].block_peer(addrs[l].device);
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                n.add_peer(*a).unwrap();
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..10 {
            n.add_fact("note", format!("{i}-{k}").as_bytes()).unwrap();
        }
    }
    let side = |idx: &[usize]| idx.iter().map(|&i| &nodes[i]).collect::<Vec<_>>();
    converge(&side(&left), Duration::from_secs(20)).await;
    converge(&side(&right), Duration::from_secs(20)).await;
    assert_ne!(digest(&nodes[0]), digest(&nodes[2]), "the partition leaked");
    assert_eq!(fact_count(&nodes[0]), 2 + 20);
    assert_eq!(fact_count(&nodes[2]), 2 + 30);
    // Heal.
    for &l in &left {
        for &r in &right {
            nodes[l].unblock_peer(&addrs[r].device);
            nodes[r].unblock_peer(&addrs[l].device);
        }
    }
    let all: Vec<&Node> = nodes.iter().collect();
    converge(&all, Duration::from_secs(20)).await;
    assert_eq!(fact_count(&nodes[4]), 2 + 50);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_catches_up_on_10k_facts() {
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "bulk", 10_000);
    let a = Node::start(fleet.take(0), quiet(vec![])).await.unwrap();
    // The device that was offline starts and syncs once, on demand.
    let cfg = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        ..quiet(vec![])
    };
    let b = Node::start(fleet.take(1), cfg).await.unwrap();
    let started = std::time::Instant::now();
    let outcome = b.sync_with(a.peer_addr()).await;
    let took = started.elapsed();
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(fact_count(&b), 10_002);
    // The round at start may have brought them first (this call then waited for it and
    // found nothing left): either way each fact arrived once.
    let received = metric(&b.metrics().render(), "tend_facts_received_total");
    assert_eq!(received, Some(10_000.0), "{outcome:?}");
    eprintln!("10k facts caught up in {took:?}");
    assert!(took < Duration::from_secs(30));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_epoch_advancing_mid_session_aborts_and_the_retry_succeeds() {
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "slow", 1200);
    let ids = fleet.ids.clone();
    // The admin sends at most 500 facts/s per peer, so the session takes seconds.
    let slow = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        manager: ManagerConfig {
            max_per_peer: 2,
            rate: RateConfig {
                per_peer: Rate {
                    facts_per_sec: NonZeroU32::new(500),
                    bytes_per_sec: None,
                },
                global: Rate::UNLIMITED,
                ..RateConfig::UNLIMITED
            },
            ..ManagerConfig::default()
        },
        ..quiet(vec![])
    };
    let a = Node::start(fleet.take(0), slow).await.unwrap();
    let b = Node::start(
        fleet.take(1),
        NodeConfig {
            sync_interval: Duration::from_secs(3600),
            ..quiet(vec![])
        },
    )
    .await
    .unwrap();
    let session = {
        let a = a.clone();
        let peer = b.peer_addr();
        tokio::spawn(async move { a.sync_with(peer).await })
    };
    // The change must land while this session carries the facts: under load the session
    // can take longer than a fixed pause to start, and the change's push-on-write round
    // would then carry them instead (and this one find nothing left, on its first try).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fact_count(&b) < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        fact_count(&b) < 1202,
        "the session ended too early to be interrupted"
    );
    // A membership change merged mid-session (same members, re-dealt): identity epoch 2.
    let mut members = ids.clone();
    members.sort();
    a.append(Payload::Authority(AuthorityFact::MembershipChanged(
        MembershipChange {
            identity_epoch: 2,
            members,
            threshold: 1,
            group_key: GroupKey(ids[0].0),
        },
    )))
    .unwrap();
    let outcome = session.await.unwrap();
    assert!(outcome.ok, "{outcome:?}");
    assert!(outcome.attempts >= 2, "{outcome:?}");
    let text = a.metrics().render();
    assert!(metric(&text, "tend_sessions_aborted_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(digest(&a), digest(&b));
    assert_eq!(
        b.device()
            .store()
            .maintenance_state(b.device().namespace())
            .unwrap()
            .identity_epoch(),
        2
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_counters_after_a_sync() {
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "m", 30);
    let with_metrics = |peers| NodeConfig {
        metrics: Some(loopback()),
        sync_interval: Duration::from_secs(3600),
        ..quiet(peers)
    };
    let a = Node::start(fleet.take(0), with_metrics(vec![]))
        .await
        .unwrap();
    let b = Node::start(fleet.take(1), with_metrics(vec![a.peer_addr()]))
        .await
        .unwrap();
    let report = b.sync_now().await;
    assert!(report.all_ok() && report.sessions.len() == 1, "{report:?}");
    assert_eq!(digest(&a), digest(&b));
    let addr = b.metrics_addr().expect("metrics served");
    let body = http_get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    // The round at start may have run a session too.
    assert!(
        metric(&body, "tend_sessions_opened_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(metric(&body, "tend_sessions_completed_total").unwrap() >= 1.0);
    assert_eq!(metric(&body, "tend_facts_received_total"), Some(30.0));
    assert!(metric(&body, "tend_sync_bytes_received_total").unwrap() > 0.0);
    assert!(metric(&body, "tend_sync_latency_seconds_count").unwrap() >= 1.0);
    let peer_score = format!("tend_peer_score{{peer=\"{}\"}}", a.device_id());
    assert!(metric(&body, &peer_score).unwrap() > 0.5, "{body}");
    // Gauges read from the store and the peer table at the scrape.
    assert_eq!(
        metric(&body, "tend_journal_facts"),
        Some(fact_count(&b) as f64),
        "{body}"
    );
    assert!(metric(&body, "tend_store_bytes").unwrap() > 0.0);
    assert_eq!(metric(&body, "tend_identity_epoch"), Some(1.0));
    let last_sync = format!("tend_peer_last_sync_seconds{{peer=\"{}\"}}", a.device_id());
    assert!(metric(&body, &last_sync).unwrap() > 1.7e9, "{body}");
    // The responder counted what it sent.
    let body_a = http_get(a.metrics_addr().unwrap(), "/metrics").await;
    assert_eq!(metric(&body_a, "tend_facts_sent_total"), Some(30.0));
    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    a.shutdown().await;
    b.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_is_unreachable_and_a_restarted_one_catches_up() {
    let mut fleet = Fleet::new(2, &[true, true]);
    let home_b = fleet.home(1);
    let quick = NodeConfig {
        connect_timeout: Duration::from_secs(1),
        ..quiet(vec![])
    };
    let a = Node::start(fleet.take(0), quick).await.unwrap();
    let b = Node::start(fleet.take(1), quiet(vec![a.peer_addr()]))
        .await
        .unwrap();
    a.add_peer(b.peer_addr()).unwrap();
    converge(&[&a, &b], Duration::from_secs(10)).await;
    let b_addr = b.peer_addr();
    b.shutdown().await;
    drop(b);
    let t = std::time::Instant::now();
    let outcome = a.sync_with(b_addr).await;
    eprintln!("dead peer: {outcome:?} after {:?}", t.elapsed());
    assert!(!outcome.ok);
    for i in 0..20 {
        a.add_fact("note", format!("while b was away {i}").as_bytes())
            .unwrap();
    }
    // A skips the unreachable peer for a while instead of timing out every round.
    let skipped = a.sync_now().await;
    assert!(skipped.sessions.is_empty(), "{skipped:?}");
    // B comes back on the same port, from the same home; it remembers A from its store.
    // (The old endpoint may take a moment to let go of the port and the store.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let b = loop {
        let started = match tend_node::Device::open(&home_b) {
            Ok(device) => Node::start(
                device,
                NodeConfig {
                    listen: b_addr.addr,
                    ..quiet(vec![])
                },
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(node) => break node,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot restart b: {e}"),
        }
    };
    converge(&[&a, &b], Duration::from_secs(15)).await;
    assert_eq!(fact_count(&b), 2 + 20);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_waits_for_the_peers_session_so_each_fact_crosses_once() {
    // b catches up from a (a sends at most 2,000 facts/s, so it takes about a second and a
    // half); a's own round to b starts meanwhile. It waits for b's session to end instead
    // of pushing the same facts alongside, then finds nothing left to send.
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "once", 3_000);
    let paced = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        manager: ManagerConfig {
            max_per_peer: 2,
            rate: RateConfig {
                per_peer: Rate {
                    facts_per_sec: NonZeroU32::new(2_000),
                    bytes_per_sec: None,
                },
                global: Rate::UNLIMITED,
                ..RateConfig::UNLIMITED
            },
            ..ManagerConfig::default()
        },
        ..quiet(vec![])
    };
    let a = Node::start(fleet.take(0), paced).await.unwrap();
    let b = Node::start(
        fleet.take(1),
        NodeConfig {
            sync_interval: Duration::from_secs(3600),
            ..quiet(vec![])
        },
    )
    .await
    .unwrap();
    a.add_peer(b.peer_addr()).unwrap();
    let pull = {
        let b = b.clone();
        let peer = a.peer_addr();
        tokio::spawn(async move { b.sync_with(peer).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fact_count(&b) < 3_002, "b's session ended too early");
    let round = a.sync_now().await;
    let pulled = pull.await.unwrap();
    assert!(pulled.ok, "{pulled:?}");
    assert!(round.sessions.iter().all(|s| s.ok), "{round:?}");
    assert_eq!(digest(&a), digest(&b));
    let sent = metric(&a.metrics().render(), "tend_facts_sent_total").unwrap_or(0.0);
    assert_crossed_about_once(sent, 3_000.0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_opened_at_once_from_both_sides_carry_each_fact_once() {
    // a and b open sessions to each other at the same moment. Either one sees the other's
    // session before opening its own and waits, or both open and the device with the
    // smaller id refuses the other's as busy, which then waits and tries again. Both calls
    // return synced, and each fact crosses once.
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "both", 3_000);
    let paced = |facts_per_sec| NodeConfig {
        sync_interval: Duration::from_secs(3600),
        manager: ManagerConfig {
            max_per_peer: 2,
            rate: RateConfig {
                per_peer: Rate {
                    facts_per_sec: NonZeroU32::new(facts_per_sec),
                    bytes_per_sec: None,
                },
                global: Rate::UNLIMITED,
                ..RateConfig::UNLIMITED
            },
            ..ManagerConfig::default()
        },
        ..quiet(vec![])
    };
    let a = Node::start(fleet.take(0), paced(2_000)).await.unwrap();
    let b = Node::start(fleet.take(1), paced(2_000)).await.unwrap();
    let (from_a, from_b) = tokio::join!(a.sync_with(b.peer_addr()), b.sync_with(a.peer_addr()));
    assert!(from_a.ok, "{from_a:?}");
    assert!(from_b.ok, "{from_b:?}");
    assert_eq!(digest(&a), digest(&b));
    let sent = metric(&a.metrics().render(), "tend_facts_sent_total").unwrap_or(0.0);
    assert_crossed_about_once(sent, 3_000.0);
    a.shutdown().await;
    b.shutdown().await;
}

/// Facts `sent` for `facts` that one session would carry: each crosses once, but for the
/// moment in which a session the peer opened is on its way and not yet registered here,
/// so under load a few can cross twice (ARCHITECTURE section 7). Two sessions carrying
/// everything, as before the wait and the tie-break, send twice as many.
fn assert_crossed_about_once(sent: f64, facts: f64) {
    assert!(
        (facts..facts * 1.3).contains(&sent),
        "{sent} facts sent for {facts}: most should cross once"
    );
}
