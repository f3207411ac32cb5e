//! Blobs and upgrades over the network: artifacts travel between running nodes over
//! `tend/blob/1` (never copied in-process), a tampered blob server is refused, the upgrade
//! pipeline runs in the node, and activation fences refuse sessions with a reason.

mod common;

use std::time::Duration;

use common::*;
use tend_core::maintenance::UpgradePolicy;
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{Hash32, ProtocolVersion};
use tend_node::blobs::{self, Wanted};
use tend_node::endpoint;
use tend_node::upgrade::{self, ApplyOptions, CommandInstaller};
use tend_node::{Node, NodeConfig};

const V11: ProtocolVersion = ProtocolVersion {
    major: ProtocolVersion::CURRENT.major,
    minor: ProtocolVersion::CURRENT.minor + 1,
    patch: 0,
};

const COPY: &str = r#"cp "$1" "$TEND_HOME/installed""#;

/// Starts nodes for every device of `fleet`, each knowing every other.
async fn start_all(fleet: &mut Fleet, n: usize, cfg: NodeConfig) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(Node::start(fleet.take(i), cfg.clone()).await.unwrap());
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.peer_addr()).collect();
    for n in &nodes {
        for a in &addrs {
            if *a != n.peer_addr() {
                n.add_peer(*a).unwrap();
            }
        }
    }
    nodes
}

fn running(node: &Node) -> ProtocolVersion {
    let d = node.device();
    let st = d.store().maintenance_state(d.namespace()).unwrap();
    upgrade::running_version(d, &st).unwrap()
}

fn metric_of(node: &Node, name: &str) -> f64 {
    metric(&node.metrics().render(), name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_published_on_one_device_reaches_the_others_over_the_network() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    let nodes = start_all(&mut fleet, 3, config(vec![])).await;
    let artifact = vec![7u8; 600 * 1024]; // several content frames
    let meta = upgrade::publish(nodes[0].device(), &artifact, V11, None, 100).unwrap();
    let cid = upgrade::artifact_cid(&meta.artifact_hash);
    wait_until(
        "the artifact on every device",
        Duration::from_secs(20),
        || {
            nodes
                .iter()
                .all(|n| n.device().store().has_blob(&cid).unwrap())
        },
    )
    .await;
    for n in &nodes[1..] {
        assert_eq!(
            n.device().store().get_blob(&cid).unwrap().unwrap(),
            artifact
        );
    }
    // Fetched over the network by each of the others (the publisher stored it itself).
    let fetched: f64 = nodes[1..]
        .iter()
        .map(|n| metric_of(n, "tend_blobs_fetched_total"))
        .sum();
    assert!(fetched >= 2.0, "fetched {fetched}");
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_server_is_refused_and_demoted() {
    let mut fleet = Fleet::new(2, &[true, true]);
    // The server holds a member's key but answers with bytes that are not the blob.
    let liar_dev = fleet.take(1);
    let liar = endpoint::bind(liar_dev.key(), loopback()).await.unwrap();
    let liar_addr = tend_node::PeerAddr {
        device: liar_dev.device_id(),
        addr: endpoint::local_addr(&liar).unwrap(),
    };
    let server = tokio::spawn({
        let liar = liar.clone();
        async move {
            while let Some(incoming) = liar.accept().await {
                let Ok(conn) = incoming.await else { continue };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = endpoint::read_frame(&mut recv, 128).await;
                    let fake = b"not the artifact, but the same length!!".to_vec();
                    let _ = blobs::write_response(
                        &mut send,
                        blobs::status::FOUND,
                        fake.len() as u64,
                        &fake,
                    )
                    .await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            }
        }
    });
    let a = Node::start(fleet.take(0), config(vec![])).await.unwrap();
    a.add_peer(liar_addr).unwrap();
    let genuine = b"the real artifact".to_vec();
    let cid = tend_core::ContentId::of(tend_core::ids::CODEC_RAW, &genuine);
    let report = a
        .fetch_blobs(liar_addr, &[Wanted { cid, size: None }])
        .await;
    assert!(report.fetched.is_empty());
    let why = report.misbehaviour.expect("refused as misbehaviour");
    assert!(why.contains("do not match"), "{why}");
    assert!(!a.device().store().has_blob(&cid).unwrap());
    assert_eq!(
        metric_of(&a, "tend_blobs_rejected_total{reason=\"mismatch\"}"),
        1.0
    );
    let peer = a
        .peers()
        .into_iter()
        .find(|p| p.device_id == liar_addr.device.to_string())
        .unwrap();
    // Demoted: each misbehaviour halves the trust of its role.
    assert!(peer.misbehaviours >= 1, "{peer:?}");
    assert!(peer.trust < tend_node::peer_table::MEMBER_TRUST, "{peer:?}");
    a.shutdown().await;
    server.abort();
    liar.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_running_devices_fetch_install_and_activate_an_upgrade() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    for i in 0..3 {
        upgrade::set_install_command(fleet.device(i), Some(COPY)).unwrap();
    }
    let nodes = start_all(&mut fleet, 3, config(vec![])).await;
    let artifact = b"#!/bin/sh\necho tend 1.1\n".to_vec();
    let meta = upgrade::publish(nodes[0].device(), &artifact, V11, None, 100).unwrap();
    let id = meta.package_id;
    let admin = nodes[0].device().clone();
    wait_until("every device ready", Duration::from_secs(25), || {
        let st = admin.store().maintenance_state(admin.namespace()).unwrap();
        st.readiness(&id, ReadinessPolicy::All)
            .is_some_and(|r| r.satisfied && r.ready.len() == 3)
    })
    .await;
    for n in &nodes {
        let installed = std::fs::read(n.device().home().join("installed")).unwrap();
        assert_eq!(installed, artifact);
        // Staged, not running: the package is not activated yet.
        assert_eq!(running(n), ProtocolVersion::CURRENT);
    }
    upgrade::activate(&admin, &id, ReadinessPolicy::All).unwrap();
    wait_until("every device running 1.1", Duration::from_secs(20), || {
        nodes.iter().all(|n| running(n) == V11)
    })
    .await;
    // Each device advertises the version it now runs.
    wait_until("metadata advertised", Duration::from_secs(20), || {
        let st = admin.store().maintenance_state(admin.namespace()).unwrap();
        nodes.iter().all(|n| {
            st.device_metadata
                .get(&n.device_id())
                .is_some_and(|m| m.running_version == V11)
        })
    })
    .await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_below_the_fence_is_refused_with_a_reason_until_it_upgrades() {
    let mut fleet = Fleet::new(3, &[true; 3]);
    for i in 0..2 {
        upgrade::set_install_command(fleet.device(i), Some(COPY)).unwrap();
    }
    // Device c stays on this release, so it is not among the devices the package waits for.
    upgrade::set_policy(
        fleet.device(2),
        &UpgradePolicy::Pinned(ProtocolVersion::CURRENT),
    )
    .unwrap();
    let nodes = start_all(&mut fleet, 3, config(vec![])).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let admin = a.device().clone();
    let fence = admin
        .store()
        .maintenance_state(admin.namespace())
        .unwrap()
        .current_epoch();
    let meta = upgrade::publish(&admin, b"fork", V11, Some(fence), 100).unwrap();
    let id: Hash32 = meta.package_id;
    let cid = upgrade::artifact_cid(&meta.artifact_hash);
    wait_until(
        "a and b ready, c holding the artifact",
        Duration::from_secs(25),
        || {
            let st = admin.store().maintenance_state(admin.namespace()).unwrap();
            st.readiness(&id, ReadinessPolicy::All)
                .is_some_and(|r| r.satisfied)
                && c.device().store().has_blob(&cid).unwrap()
        },
    )
    .await;
    // c is away while the admin activates the hard fork.
    c.block_peer(a.device_id());
    c.block_peer(b.device_id());
    upgrade::activate(&admin, &id, ReadinessPolicy::All).unwrap();
    wait_until("b running 1.1", Duration::from_secs(20), || {
        running(b) == V11
    })
    .await;

    // c has not seen the activation: the responder refuses its old version, and c shows why.
    let out = c.sync_with(a.peer_addr()).await;
    assert!(!out.ok);
    assert!(
        out.result.contains("refused by the peer") && out.result.contains(&V11.to_string()),
        "{}",
        out.result
    );
    assert!(metric_of(a, "tend_handshake_refusals_total{reason=\"fence\"}") >= 1.0);

    // a reaches c (which accepts: it had not seen the fork); c learns of the activation in
    // that session, ends it at once with the reason (a fence binds mid-session too), and
    // now refuses sessions itself. (A round of b's, or a's own, can reach c first once it
    // is unblocked: then c already refuses this session at its start, for the fence.)
    c.unblock_peer(&a.device_id());
    c.unblock_peer(&b.device_id());
    let pushed = a.sync_with(c.peer_addr()).await;
    assert!(
        pushed.ok
            || (pushed.result.contains("aborted by peer") || pushed.result.contains("refused"))
                && pushed.result.contains("activation fence"),
        "{}",
        pushed.result
    );
    assert!(upgrade::fence_check(c.device()).unwrap().is_err());
    let out = c.sync_with(a.peer_addr()).await;
    assert!(!out.ok);
    assert!(
        out.result.contains("this device runs version"),
        "{}",
        out.result
    );

    // The operator upgrades c from the artifact it already holds: accepted again.
    upgrade::set_policy(c.device(), &UpgradePolicy::Automatic).unwrap();
    let dev = c.device().clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut installer = CommandInstaller {
            command: COPY.into(),
            home: dev.home().to_owned(),
            timeout: Duration::from_secs(30),
        };
        upgrade::apply(
            &dev,
            dev.store(),
            &mut installer,
            &ApplyOptions {
                explicit: true,
                retry: false,
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    assert!(!report.has_failures());
    assert_eq!(running(c), V11);
    let out = c.sync_with(a.peer_addr()).await;
    assert!(out.ok, "{}", out.result);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removes_the_blob_scratch_files_a_killed_process_left() {
    let mut fleet = Fleet::new(1, &[true]);
    let device = fleet.take(0);
    let store = device.store().path().to_owned();
    // What a process killed while building or fetching a blob leaves beside the store,
    // and a file that only looks alike.
    let stale = [
        store.with_extension("blob-1-0"),
        store.with_extension("fetch-4000000-3"),
    ];
    let unrelated = store.with_extension("blob-notes");
    for p in stale.iter().chain([&unrelated]) {
        std::fs::write(p, b"partial").unwrap();
    }
    let node = Node::start(device, config(vec![])).await.unwrap();
    for p in &stale {
        assert!(!p.exists(), "{} is still there", p.display());
    }
    assert!(unrelated.exists(), "a file that is no scratch file went");
    node.shutdown().await;
}
