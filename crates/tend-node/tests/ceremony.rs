//! Key generation and snapshot ceremonies over the network: real iroh endpoints on
//! 127.0.0.1, real redb homes, real FROST.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_bytes::ByteBuf;
use tempfile::TempDir;
use tend_core::maintenance::{SnapshotCompleted, SnapshotV1};
use tend_core::{
    ContentId, DeviceId, Hash32, MaintenanceFact, MaintenanceState, Payload, UnsignedFact,
};
use tend_crypto::dkg::DkgSession;
use tend_crypto::KeyShare;
use tend_node::ceremony::{CeremonyError, MaintMessage, MaintReply};
use tend_node::{Device, Node};

/// Three devices, each created by `tend init` (its own one-device authority), running and
/// knowing each other's addresses.
async fn three_nodes() -> (TempDir, Vec<PathBuf>, Vec<Node>) {
    three_nodes_with(config(vec![])).await
}

async fn three_nodes_with(config: tend_node::NodeConfig) -> (TempDir, Vec<PathBuf>, Vec<Node>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    let mut homes = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let home = dir.path().join(format!("d{i}"));
        let device = Device::init(&home, &mut rng).expect("init");
        nodes.push(Node::start(device, config.clone()).await.expect("start"));
        homes.push(home);
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    (dir, homes, nodes)
}

/// No rounds but those a test or a proposal starts (timed rounds ten minutes apart, one
/// peer each, no pushes).
fn rounds_by_hand() -> tend_node::NodeConfig {
    tend_node::NodeConfig {
        sync_interval: Duration::from_secs(600),
        fanout: 1,
        push_on_write: false,
        ..config(vec![])
    }
}

fn state(node: &Node) -> MaintenanceState {
    let d = node.device();
    d.store().maintenance_state(d.namespace()).expect("state")
}

/// Waits until every node's journal holds the completion `done`; panics after `timeout`.
async fn snapshot_everywhere(nodes: &[Node], done: &SnapshotCompleted, timeout: Duration) {
    for n in nodes {
        wait_until("the completion everywhere", timeout, || {
            state(n)
                .latest_snapshot
                .as_ref()
                .is_some_and(|s| s.snapshot == done.snapshot)
        })
        .await;
    }
}

/// Creates a 2-of-3 authority of the three nodes over the network and waits until every
/// node has the membership.
async fn authority(nodes: &[Node]) {
    let others: Vec<DeviceId> = nodes[1..].iter().map(|n| n.device_id()).collect();
    let created = nodes[0]
        .create_authority(2, &others, Duration::from_secs(20))
        .await
        .expect("key generation over the network");
    assert_eq!(created.threshold, 2);
    assert_eq!(created.members.len(), 3);
    assert_eq!(created.identity_epoch, 1);
    let ns = nodes[0].device().namespace();
    for n in nodes {
        wait_until("membership everywhere", Duration::from_secs(10), || {
            n.device().namespace() == ns
                && state(n)
                    .membership()
                    .is_some_and(|m| m.identity_epoch == 1 && m.members.len() == 3)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkg_over_the_network_then_a_snapshot_ceremony_completes_everywhere() {
    let (_dir, homes, nodes) = three_nodes().await;
    authority(&nodes).await;
    let group_key = state(&nodes[0]).membership().unwrap().group_key;
    // Each member holds exactly its own share, 0600, in its own home.
    for (home, node) in homes.iter().zip(&nodes) {
        let share = KeyShare::load(home, 1).expect("share in its own home");
        assert_eq!(share.device_id(), node.device_id());
        assert_eq!(share.group_key(), group_key);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(KeyShare::path(home, 1))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let frost_files = std::fs::read_dir(home.join("frost")).unwrap().count();
        assert_eq!(frost_files, 1, "only its own share");
    }
    for (i, n) in nodes.iter().enumerate() {
        n.add_fact("note", format!("from {i}").as_bytes()).unwrap();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(15)).await;
    let done = nodes[1]
        .propose_snapshot(None, Duration::from_secs(15))
        .await
        .expect("ceremony over the network");
    snapshot_everywhere(&nodes, &done, Duration::from_secs(15)).await;
    assert_eq!(nodes[1].maint_stats().completed, 1);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// The coordinator sends each member the completion it wrote, with `Closed`: with
/// rounds reaching one peer and far apart, and no pushes, every member holds the
/// completion within moments, and no member opens a session for it (the only session of
/// the ceremony is the proposer's round before proposing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_the_completion_from_the_coordinator_without_a_session() {
    let (_dir, _homes, nodes) = three_nodes_with(rounds_by_hand()).await;
    authority(&nodes).await;
    // No timed rounds here: each node syncs by hand until they agree.
    for _ in 0..20 {
        let d: Vec<_> = nodes.iter().map(digest).collect();
        if d.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        for n in &nodes {
            n.sync_now().await;
        }
    }
    let sessions = || -> u64 {
        nodes
            .iter()
            .map(|n| n.metrics().sessions_opened.get())
            .sum()
    };
    let before = sessions();
    let done = nodes[0]
        .propose_snapshot(None, Duration::from_secs(15))
        .await
        .expect("ceremony over the network");
    snapshot_everywhere(&nodes, &done, Duration::from_secs(5)).await;
    // Both sides count a session: the proposer's round (fanout 1) is two.
    assert!(
        sessions() - before <= 2,
        "{} sessions during the ceremony",
        sessions() - before
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceremony_with_one_member_online_times_out_harmlessly() {
    let (_dir, _homes, nodes) = three_nodes().await;
    authority(&nodes).await;
    nodes[1].shutdown().await;
    nodes[2].shutdown().await;
    let err = nodes[0]
        .propose_snapshot(None, Duration::from_secs(2))
        .await
        .expect_err("no quorum");
    assert!(matches!(err, CeremonyError::TimedOut { .. }), "{err}");
    let s = state(&nodes[0]);
    assert!(s.latest_snapshot.is_none());
    assert!(nodes[0].ceremony_idle());
    // The device goes on working; nothing was pruned.
    nodes[0].add_fact("note", b"after").unwrap();
    nodes[0].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_epoch_advance_mid_ceremony_aborts_and_the_retry_completes() {
    let (_dir, _homes, nodes) = three_nodes().await;
    authority(&nodes).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(15)).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    nodes[2].shutdown().await;
    // The proposal reaches nobody: b is cut off and c is gone.
    a.block_peer(b.device_id());
    b.block_peer(a.device_id());
    let undelivered = a.maint_stats().undelivered;
    let proposer = a.clone();
    let ceremony = tokio::spawn(async move {
        proposer
            .propose_snapshot(None, Duration::from_secs(20))
            .await
    });
    // The proposer syncs first, and c is gone: its connect attempt can take seconds.
    wait_until("the first proposal", Duration::from_secs(15), || {
        !a.open_ceremonies().is_empty()
    })
    .await;
    let first = a.open_ceremonies()[0];
    // The sign requests go out on tasks of their own, which check the block when they run:
    // unblocked before they ran, b would get the first proposal's request and sign it
    // before the re-deal. Both (to b, blocked, and to c, gone) must have failed first.
    wait_until("the sign requests fail", Duration::from_secs(20), || {
        a.maint_stats().undelivered >= undelivered + 2
    })
    .await;
    a.unblock_peer(&b.device_id());
    b.unblock_peer(&a.device_id());
    // The admin re-deals the key among a and b: identity epoch 2, mid-ceremony.
    let created = a
        .create_authority(2, &[b.device_id()], Duration::from_secs(20))
        .await
        .expect("re-deal over the network");
    assert_eq!(created.identity_epoch, 2);
    let done = ceremony
        .await
        .unwrap()
        .expect("the retry completes under the new key");
    assert_ne!(done.proposal_id, first, "completed by a retried proposal");
    for n in [a, b] {
        wait_until("the snapshot on a and b", Duration::from_secs(15), || {
            let s = state(n);
            s.identity_epoch() == 2
                && s.latest_snapshot
                    .as_ref()
                    .is_some_and(|x| x.snapshot == done.snapshot)
        })
        .await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A completion sent outside a session is taken only from a member, and only as a
/// completion of this journal whose threshold signature verifies, followed by nothing but
/// the tombstone of the blob it supersedes: a member cannot use it to write facts around
/// the sync rate limits. Everything else is refused and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_completion_is_taken_only_as_a_members_valid_completion() {
    // c learns nothing but what it is sent.
    let (dir, _homes, nodes) = three_nodes_with(rounds_by_hand()).await;
    authority(&nodes).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in &nodes {
        n.sync_now().await;
    }
    // a and b complete a snapshot while c is cut off.
    for n in [a, b] {
        n.block_peer(c.device_id());
        c.block_peer(n.device_id());
    }
    let done = a
        .propose_snapshot(None, Duration::from_secs(15))
        .await
        .expect("a and b complete a snapshot");
    snapshot_everywhere(&nodes[..2], &done, Duration::from_secs(5)).await;
    b.unblock_peer(&c.device_id());
    c.unblock_peer(&b.device_id());
    let ns = a.device().namespace();
    let latest = state(a).latest_snapshot.expect("the completion");
    let completion = a
        .device()
        .store()
        .get(ns, latest.completed_at, &latest.fact_id)
        .expect("read")
        .expect("the completion fact");
    let completion = ByteBuf::from(completion.bytes().to_vec());
    // A valid fact of the journal, but not a completion.
    let note = b.add_fact("note", b"not a completion").expect("write");
    // A completion whose threshold signature is not the authority's.
    let forged = UnsignedFact {
        namespace: ns,
        epoch: state(b).current_epoch(),
        payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
            proposal_id: Hash32([7; 32]),
            snapshot: SnapshotV1 {
                epoch: state(b).current_epoch(),
                digest: Hash32([1; 32]),
                blob_cid: ContentId::of_raw(b"no such blob"),
            },
            threshold_signature: [3; 64],
        })),
    }
    .sign(b.device().key().signing_key());
    let bytes = |f: &tend_core::VerifiedFact| ByteBuf::from(f.bytes().to_vec());
    for (facts, why) in [
        (
            vec![completion.clone(), bytes(&note)],
            "more than the completion",
        ),
        (
            vec![completion.clone(), completion.clone()],
            "more than the completion",
        ),
        (vec![bytes(&note)], "not a snapshot completion"),
        (vec![bytes(&forged)], "threshold signature does not verify"),
        (vec![ByteBuf::from(vec![0x80, 1, 2])], "bad fact"),
        (vec![], "no completion"),
    ] {
        let r = b
            .send_maint(
                c.device_id(),
                &MaintMessage::Completion {
                    facts,
                    closed: ByteBuf::new(),
                },
            )
            .await;
        assert!(
            matches!(&r, Ok(MaintReply::Refused { reason }) if reason.contains(why)),
            "{why}: {r:?}"
        );
    }
    // From a configured peer that is not a member, even the real completion.
    let outsider = Node::start(
        Device::init(&dir.path().join("x"), &mut rand::thread_rng()).unwrap(),
        config(vec![c.peer_addr()]),
    )
    .await
    .unwrap();
    c.add_peer(outsider.peer_addr()).unwrap();
    let r = outsider
        .send_maint(
            c.device_id(),
            &MaintMessage::Completion {
                facts: vec![completion.clone()],
                closed: ByteBuf::new(),
            },
        )
        .await;
    assert!(
        matches!(&r, Ok(MaintReply::Refused { reason }) if reason.contains("not a member")),
        "{r:?}"
    );
    let holds = |f: &tend_core::VerifiedFact| {
        c.device()
            .store()
            .contains(ns, f.epoch(), &f.id())
            .expect("lookup")
    };
    assert!(
        !holds(&note) && !holds(&forged),
        "a refused fact was written"
    );
    assert!(state(c).latest_snapshot.is_none());
    outsider.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_members_ceremony_and_dkg_messages_are_refused_and_counted() {
    let (dir, _homes, nodes) = three_nodes().await;
    authority(&nodes).await;
    let a = &nodes[0];
    let outsider = Node::start(
        Device::init(&dir.path().join("x"), &mut rand::thread_rng()).unwrap(),
        config(vec![a.peer_addr()]),
    )
    .await
    .unwrap();
    let x = outsider.device_id();
    let ceremony = MaintMessage::Ceremony(ByteBuf::from(vec![0x80]));
    // Not a member and not a configured peer: closed at the handshake.
    let r = outsider.send_maint(a.device_id(), &ceremony).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(a.maint_stats().refused_connections, 1);
    // A configured peer that is not a member gets past the handshake, but every ceremony
    // and key generation message is refused.
    a.add_peer(outsider.peer_addr()).unwrap();
    let mut members = vec![a.device_id(), x];
    members.sort();
    let mut ctx = [0u8; 32];
    ctx[0] = 7;
    let invite = MaintMessage::DkgInvite {
        session: DkgSession {
            context: ctx,
            identity_epoch: 1,
            members,
            threshold: 2,
        },
        addrs: vec![],
        maintenance_epoch: Default::default(),
    };
    let dkg = MaintMessage::Dkg(ByteBuf::from(vec![1, 2, 3]));
    let taken_before = a.maint_stats().dkg_messages;
    for msg in [&ceremony, &invite, &dkg] {
        let r = outsider.send_maint(a.device_id(), msg).await;
        assert!(
            matches!(r, Ok(MaintReply::Refused { .. })),
            "{msg:?} -> {r:?}"
        );
    }
    assert_eq!(a.maint_stats().refused_messages, 3);
    assert_eq!(a.maint_stats().dkg_messages, taken_before);
    assert!(state(a).membership().unwrap().members.len() == 3);
    assert!(state(a).latest_snapshot.is_none());
    outsider.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}
