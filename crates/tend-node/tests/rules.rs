//! Rules that bind on the running device, each against real nodes on loopback: a full
//! session manager is this device's limit, not the peer's fault; an activation fence that
//! becomes unsatisfied ends a session that is already running, with a reason the peer
//! shows; and a device collects garbage by itself after a verified snapshot.

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use common::*;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{DeviceId, ProtocolVersion, VerifiedFact};
use tend_crypto::device::DeviceKey;
use tend_node::endpoint::{self, SYNC_ALPN};
use tend_node::upgrade::{self, ApplyOptions, CommandInstaller};
use tend_node::{Device, GcPolicy, Node, NodeConfig, PeerAddr};
use tend_sync::{ManagerConfig, Rate, RateConfig};

/// Sessions only when a test asks.
fn quiet() -> NodeConfig {
    NodeConfig {
        sync_interval: Duration::from_secs(3600),
        upgrades: false,
        ..config(vec![])
    }
}

fn counter(n: &Node, name: &str) -> f64 {
    metric(&n.metrics().render(), name).unwrap_or(0.0)
}

/// A member that opens a sync session to `to` with a genuine `Hello` and then says
/// nothing, holding one of `to`'s session slots until it closes the connection.
struct SilentSession {
    _ep: iroh::Endpoint,
    conn: Connection,
    _send: SendStream,
    _recv: RecvStream,
}

async fn open_silent_session(member: &Device, to: PeerAddr) -> SilentSession {
    let ep = endpoint::bind(member.key(), loopback()).await.unwrap();
    let addr = endpoint::endpoint_addr(to.device, to.addr).unwrap();
    let conn = ep.connect(addr, SYNC_ALPN).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    endpoint::write_frame(&mut send, &hello(member, &to))
        .await
        .unwrap();
    SilentSession {
        _ep: ep,
        conn,
        _send: send,
        _recv: recv,
    }
}

fn active_with(n: &Node, peer: &DeviceId) -> u32 {
    let id = peer.to_string();
    n.peers()
        .into_iter()
        .find(|p| p.device_id == id)
        .map_or(0, |p| p.active_sessions)
}

fn failed_syncs(n: &Node, peer: &DeviceId) -> u64 {
    let id = peer.to_string();
    n.peers()
        .into_iter()
        .find(|p| p.device_id == id)
        .map_or(0, |p| p.failed_syncs)
}

/// Issue 15 item 7: when this node's own session manager is full, `initiate` used to
/// connect first, then count a failure against the peer and back off from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_session_manager_skips_without_connecting_or_blaming_the_peer() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    let silent = fleet.take(2);
    let one_slot = NodeConfig {
        manager: ManagerConfig {
            max_concurrent: 1,
            ..NodeConfig::default().manager
        },
        connect_timeout: Duration::from_secs(3),
        ..quiet()
    };
    let a = Node::start(fleet.take(0), one_slot).await.unwrap();
    let b = Node::start(fleet.take(1), quiet()).await.unwrap();
    // A member opens a session to a and goes silent: a's only slot is taken.
    let hold = open_silent_session(&silent, a.peer_addr()).await;
    wait_until("a's slot is taken", Duration::from_secs(10), || {
        active_with(&a, &silent.device_id()) == 1
    })
    .await;

    let out = a.sync_with(b.peer_addr()).await;
    assert!(!out.ok);
    assert!(
        out.result.contains("own session limit") && out.result.contains("not the peer's fault"),
        "{}",
        out.result
    );
    assert_eq!(out.attempts, 0, "no session was opened");
    assert_eq!(failed_syncs(&a, &b.device_id()), 0, "b is not blamed");
    // Room is checked before connecting: a peer whose address answers nothing is skipped
    // at once, not after the 3 s connect timeout, and not blamed either.
    let nobody = DeviceKey::generate(&mut rand::thread_rng()).device_id();
    let dead = PeerAddr {
        device: nobody,
        addr: "127.0.0.1:9".parse().unwrap(),
    };
    let started = Instant::now();
    let out = a.sync_with(dead).await;
    assert!(started.elapsed() < Duration::from_secs(1), "{out:?}");
    assert!(out.result.contains("own session limit"), "{}", out.result);
    assert_eq!(failed_syncs(&a, &nobody), 0);
    assert!(counter(&a, "tend_sessions_skipped_total") >= 2.0);
    assert_eq!(counter(&a, "tend_sessions_failed_total"), 0.0);

    // The slot comes back when the silent session ends; b was not put on a backoff, so
    // the very next round picks it and completes.
    hold.conn.close(0u32.into(), b"bye");
    wait_until("a's slot is free", Duration::from_secs(10), || {
        active_with(&a, &silent.device_id()) == 0
    })
    .await;
    a.block_peer(nobody);
    let round = a.sync_now().await;
    let with_b = round
        .sessions
        .iter()
        .find(|s| s.peer == b.device_id().to_string())
        .expect("b is picked at once");
    assert!(with_b.ok, "{}", with_b.result);
    a.shutdown().await;
    b.shutdown().await;
}

const V11: ProtocolVersion = ProtocolVersion {
    major: ProtocolVersion::CURRENT.major,
    minor: ProtocolVersion::CURRENT.minor + 1,
    patch: 0,
};

/// Issue 15 item 3: fences bound only at the handshake; a session open when an
/// activation arrived kept exchanging facts to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_fence_ends_running_sessions_on_both_sides_with_a_reason() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    bulk_facts(fleet.device(0), "slow", 3000);
    // The admin sends at most 300 facts/s to each peer, so each transfer takes ~10 s.
    let slow = NodeConfig {
        manager: ManagerConfig {
            rate: RateConfig {
                per_peer: Rate {
                    facts_per_sec: NonZeroU32::new(300),
                    bytes_per_sec: None,
                },
                ..RateConfig::device_default()
            },
            ..NodeConfig::default().manager
        },
        ..quiet()
    };
    let a = Node::start(fleet.take(0), slow).await.unwrap();
    let b = Node::start(fleet.take(1), quiet()).await.unwrap();
    let c = Node::start(fleet.take(2), quiet()).await.unwrap();
    let admin = a.device().clone();
    // A hard fork to 1.1 with its fence at the current epoch, installed on the admin.
    let fence = admin
        .store()
        .maintenance_state(admin.namespace())
        .unwrap()
        .current_epoch();
    let meta = upgrade::publish(&admin, b"fork", V11, Some(fence), 100).unwrap();
    let report = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let mut installer = CommandInstaller {
                command: r#"cp "$1" "$TEND_HOME/installed""#.into(),
                home: admin.home().to_owned(),
                timeout: Duration::from_secs(30),
            };
            upgrade::apply(
                &admin,
                admin.store(),
                &mut installer,
                &ApplyOptions {
                    explicit: true,
                    retry: false,
                },
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(!report.has_failures(), "{report:?}");

    // b pulls from a (a responds), a pushes to c (c responds); both run 1.0.
    let pull = {
        let (b, a) = (b.clone(), a.peer_addr());
        tokio::spawn(async move { b.sync_with(a).await })
    };
    let push = {
        let (a, c) = (a.clone(), c.peer_addr());
        tokio::spawn(async move { a.sync_with(c).await })
    };
    wait_until("both transfers under way", Duration::from_secs(20), || {
        fact_count(&b) > 100 && fact_count(&c) > 100
    })
    .await;

    // The admin activates: it now runs 1.1 and is past the fence. c learns of the
    // activation from elsewhere (its store, as another session would bring it).
    upgrade::activate(&admin, &meta.package_id, ReadinessPolicy::AtLeast(1)).unwrap();
    let maintenance: Vec<VerifiedFact> = admin
        .store()
        .scan_maintenance(admin.namespace())
        .unwrap()
        .map(|f| f.unwrap().verify().unwrap())
        .collect();
    c.device().store().insert_batch(&maintenance).unwrap();
    let activated = Instant::now();

    // a, as responder, ends b's session: b announced 1.0 at the handshake.
    let pulled = pull.await.unwrap();
    assert!(!pulled.ok, "{pulled:?}");
    assert!(
        pulled.result.contains("aborted by the peer")
            && pulled.result.contains(&V11.to_string())
            && pulled.result.contains("upgrade it"),
        "{}",
        pulled.result
    );
    // c, as responder, ends a's session itself: it runs 1.0 past the fence, and says so.
    let pushed = push.await.unwrap();
    assert!(!pushed.ok, "{pushed:?}");
    assert!(
        pushed.result.contains("aborted by peer")
            && pushed.result.contains("activation fence")
            && pushed.result.contains(&V11.to_string()),
        "{}",
        pushed.result
    );
    assert!(
        activated.elapsed() < Duration::from_secs(5),
        "the sessions ran on for {:?} after the activation",
        activated.elapsed()
    );
    // Neither transfer ran to the end, and no attempt is retried at once.
    for (n, out) in [(&b, &pulled), (&c, &pushed)] {
        assert!(fact_count(n) < 3002, "{} facts", fact_count(n));
        assert_eq!(out.attempts, 1);
    }
    assert!(counter(&a, "tend_fence_aborts_total{side=\"peer\"}") >= 1.0);
    assert!(counter(&c, "tend_fence_aborts_total{side=\"local\"}") >= 1.0);
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

fn file_size(n: &Node) -> u64 {
    n.device().store().file_size().unwrap()
}

/// Issue 15 item 4: the daemon never collected garbage by itself; a store stayed bounded
/// only if an operator ran `tend gc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_devices_collect_garbage_by_themselves_after_a_snapshot() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    // x keeps the old way: it prunes only when the operator says so.
    fleet.device(2).set_gc_policy(GcPolicy::Manual).unwrap();
    bulk_facts(fleet.device(0), "bulk", 4000);
    let nodes: Vec<Node> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(Node::start(fleet.take(i), quiet()).await.unwrap());
        }
        v
    };
    let (a, b, x) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in [b, x] {
        let out = n.sync_with(a.peer_addr()).await;
        assert!(out.ok, "{}", out.result);
    }
    // The bulk log is trimmed below the snapshot, so its entries are garbage there.
    let e = a
        .device()
        .store()
        .maintenance_state(a.device().namespace())
        .unwrap()
        .current_epoch()
        .next();
    let trim = tend_node::data::DataRequest::LogTrim {
        log: "bulk".into(),
        before: format!("{}-0-{}", e.0, "0".repeat(64)),
    };
    tend_node::data::run(a.device(), trim).unwrap();
    for n in [b, x] {
        assert!(n.sync_with(a.peer_addr()).await.ok);
    }
    let before: Vec<(u64, u64)> = nodes
        .iter()
        .map(|n| (fact_count(n), file_size(n)))
        .collect();
    assert!(before.iter().all(|(f, _)| *f >= 4000), "{before:?}");

    // a completes a snapshot (written to its store, as a ceremony does); b adopts it in a
    // session. Nobody runs gc.
    complete_snapshot(a.device(), e, b"auto-gc");
    for n in [b, x] {
        assert!(n.sync_with(a.peer_addr()).await.ok);
    }
    let x_facts = fact_count(x);
    for (i, n) in [a, b].into_iter().enumerate() {
        wait_until(
            "the device collects by itself",
            Duration::from_secs(20),
            || counter(n, "tend_gc_runs_total") >= 1.0,
        )
        .await;
        let (facts, size) = (fact_count(n), file_size(n));
        let reclaimed = counter(n, "tend_gc_bytes_reclaimed_total");
        eprintln!(
            "device {i}: {} -> {facts} facts; {} bytes before the snapshot, {size} after GC, \
             {reclaimed} reclaimed by the collection",
            before[i].0, before[i].1
        );
        assert!(facts + 3900 <= before[i].0, "{facts} facts left");
        assert!(counter(n, "tend_gc_facts_pruned_total") >= 3900.0);
        assert!(reclaimed > 0.0, "the store file did not shrink");
        // Nothing is left for the operator: a manual gc finds nothing more to prune.
        let again = n.gc(false).unwrap();
        assert_eq!(again.facts_pruned, 0, "{again:?}");
    }
    // The device that completed the snapshot ends well below where it started.
    assert!(file_size(a) < before[0].1 / 2, "{} bytes", file_size(a));
    // The manual device kept everything until asked.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(x_facts > before[2].0, "x took the snapshot");
    assert_eq!(fact_count(x), x_facts);
    assert_eq!(counter(x, "tend_gc_runs_total"), 0.0);
    let r = x.gc(false).unwrap();
    assert!(r.facts_pruned >= 3900, "{r:?}");

    // A collected snapshot is not collected again.
    let runs = counter(a, "tend_gc_runs_total");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(counter(a, "tend_gc_runs_total"), runs);
    for n in &nodes {
        n.shutdown().await;
    }
}
