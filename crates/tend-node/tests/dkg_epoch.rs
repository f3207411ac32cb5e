//! Key generation binds the maintenance epoch (ARCHITECTURE section 10): an admin that
//! missed a snapshot must not write the membership change below it. Found by the
//! simulator (`dkg_binds_maintenance_epoch`, seeds 447 and 863); here over the network.

mod common;

use std::time::Duration;

use common::*;
use tend_core::authority::AuthorityFact;
use tend_core::{DeviceId, JournalNamespace, MaintenanceState, Payload};
use tend_crypto::dkg::DkgSession;
use tend_node::ceremony::{MaintMessage, MaintReply};
use tend_node::{Device, Node, NodeConfig};

fn state(node: &Node) -> MaintenanceState {
    let d = node.device();
    d.store().maintenance_state(d.namespace()).expect("state")
}

fn set_blocked(a: &Node, b: &Node, blocked: bool) {
    if blocked {
        a.block_peer(b.device_id());
        b.block_peer(a.device_id());
    } else {
        a.unblock_peer(&b.device_id());
        b.unblock_peer(&a.device_id());
    }
}

/// The epochs of the membership changes in a node's journal, by identity epoch.
fn membership_changes(node: &Node) -> Vec<(u64, u64)> {
    let d = node.device();
    let mut out = Vec::new();
    for f in d.store().scan_maintenance(d.namespace()).expect("scan") {
        let f = f.expect("fact").verify().expect("verify");
        if let Payload::Authority(AuthorityFact::MembershipChanged(c)) = f.payload() {
            out.push((c.identity_epoch, f.epoch().0));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_behind_a_snapshot_syncs_before_key_generation_and_lagging_members_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::thread_rng();
    // Sessions only when asked (so the admin stays behind until something syncs it), no
    // metadata advertisements.
    let cfg = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        upgrades: false,
        ..config(vec![])
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        let device = Device::init(&dir.path().join(format!("d{i}")), &mut rng).expect("init");
        nodes.push(Node::start(device, cfg.clone()).await.expect("start"));
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).expect("add peer");
            }
        }
    }
    let mut members: Vec<DeviceId> = nodes.iter().map(|n| n.device_id()).collect();
    members.sort();
    let others: Vec<DeviceId> = nodes[1..].iter().map(|n| n.device_id()).collect();
    nodes[0]
        .create_authority(2, &others, Duration::from_secs(20))
        .await
        .expect("key generation over the network");
    let ns = nodes[0].device().namespace();
    for n in &nodes {
        wait_until("membership everywhere", Duration::from_secs(10), || {
            n.device().namespace() == ns
                && state(n).membership().is_some_and(|m| m.identity_epoch == 1)
        })
        .await;
    }

    // The admin is cut off while the two others complete a snapshot.
    set_blocked(&nodes[0], &nodes[1], true);
    set_blocked(&nodes[0], &nodes[2], true);
    let done = nodes[1]
        .propose_snapshot(None, Duration::from_secs(20))
        .await
        .expect("snapshot between the two members");
    let e = done.snapshot.epoch;
    nodes[2].sync_now().await;
    for n in &nodes[1..] {
        assert_eq!(state(n).snapshot_epoch(), e);
    }
    let behind = state(&nodes[0]).maintenance_epoch();
    assert!(behind.snapshot_epoch < e, "the admin missed the snapshot");
    set_blocked(&nodes[0], &nodes[1], false);
    set_blocked(&nodes[0], &nodes[2], false);

    // A member refuses an invitation made at another maintenance epoch, with the reason.
    let JournalNamespace::Authority(a) = ns else {
        panic!("an authority journal")
    };
    let stale = MaintMessage::DkgInvite {
        session: DkgSession {
            context: a.0,
            identity_epoch: 2,
            members: members.clone(),
            threshold: 2,
        },
        addrs: vec![],
        maintenance_epoch: behind,
    };
    match nodes[0].send_maint(nodes[1].device_id(), &stale).await {
        Ok(MaintReply::Refused { reason }) => {
            assert!(reason.contains("maintenance epoch mismatch"), "{reason}");
            assert!(reason.contains("sync first"), "{reason}");
        }
        other => panic!("a stale invitation was not refused: {other:?}"),
    }

    // The admin's key generation syncs first, so it runs at the members' epoch and the
    // change lands above the snapshot.
    let created = nodes[0]
        .create_authority(2, &others, Duration::from_secs(20))
        .await
        .expect("a re-deal after syncing");
    assert_eq!(created.identity_epoch, 2);
    for n in &nodes {
        n.sync_now().await;
    }
    for n in &nodes {
        wait_until(
            "identity epoch 2 everywhere",
            Duration::from_secs(10),
            || state(n).identity_epoch() == 2,
        )
        .await;
        let st = state(n);
        assert_eq!(
            st.latest_snapshot.as_ref().map(|s| s.snapshot.clone()),
            Some(done.snapshot.clone()),
            "{} kept the snapshot",
            n.device_id()
        );
        let changes = membership_changes(n);
        let (_, at) = changes
            .iter()
            .find(|(i, _)| *i == 2)
            .copied()
            .expect("the re-deal's change");
        assert!(
            at >= e.0,
            "change at epoch {at} below the snapshot at {}",
            e.0
        );
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(10)).await;
    for n in &nodes {
        n.shutdown().await;
    }
}

/// The same rule in the in-process fleet (`--member-home`, devnet): a re-deal by an admin
/// that missed a snapshot first brings every device to one maintenance epoch.
#[test]
fn the_in_process_fleet_brings_everyone_to_one_epoch_before_a_re_deal() {
    use rand::SeedableRng;
    use std::sync::Arc;
    use tend_core::Epoch;
    use tend_node::fleet::LocalFleet;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let devices: Vec<Arc<Device>> = ["a", "b", "c"]
        .iter()
        .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).expect("init")))
        .collect();
    let mut all = LocalFleet::new(devices.clone());
    all.create_authority(2, &mut rng).expect("authority");
    // The admin (a) is left out of a snapshot by b and c.
    let (a, b) = (&devices[0], &devices[1]);
    let mut bc = LocalFleet::new(vec![b.clone(), devices[2].clone()]);
    let target = Epoch(b.snapshot_status().expect("status").current_epoch + 1);
    let done = bc.snapshot(0, target, &mut rng).expect("snapshot");
    let ns = a.namespace();
    let epoch_of = |d: &Device| {
        d.store()
            .maintenance_state(ns)
            .expect("state")
            .maintenance_epoch()
    };
    assert!(epoch_of(a).snapshot_epoch < done.snapshot.epoch);

    let created = all.create_authority(2, &mut rng).expect("re-deal");
    assert_eq!(created.identity_epoch, 2);
    for d in &devices {
        let st = d.store().maintenance_state(ns).expect("state");
        assert_eq!(st.identity_epoch(), 2, "{} took the change", d.device_id());
        assert_eq!(
            st.snapshot_epoch(),
            done.snapshot.epoch,
            "kept the snapshot"
        );
        let mut at = None;
        for f in d.store().scan_maintenance(ns).expect("scan") {
            let f = f.expect("fact").verify().expect("verify");
            if let Payload::Authority(AuthorityFact::MembershipChanged(c)) = f.payload() {
                if c.identity_epoch == 2 {
                    at = Some(f.epoch());
                }
            }
        }
        let at = at.expect("the re-deal's change");
        assert!(
            at >= done.snapshot.epoch,
            "change at {at:?} below the snapshot"
        );
    }
}
