//! Helpers of the network tests: authorities of real device homes in tempdirs, nodes on
//! loopback, convergence waits, metrics scraping.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tend_core::authority::{AuthorityFact, MembershipChange};
use tend_core::{
    DeviceId, Epoch, GroupKey, Hash32, Payload, ProtocolVersion, UnsignedFact, VerifiedFact,
};
use tend_node::{Device, Node, NodeConfig, PeerAddr};
use tend_sync::{Action, FenceStatus, LocalView, MemItems, Session, SessionConfig, SyncItem};

/// Homes of one authority: device 0 is the admin, the others were added by a membership
/// change. `bootstrap[i]` says whether device i got the admin's genesis and membership
/// change out of band (else it learns them by syncing).
pub struct Fleet {
    pub dir: TempDir,
    pub devices: Vec<Option<Device>>,
    pub ids: Vec<DeviceId>,
}

impl Fleet {
    pub fn new(n: usize, bootstrap: &[bool]) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand::thread_rng();
        let admin = Device::init(&dir.path().join("d0"), &mut rng).expect("init admin");
        let ns = admin.namespace();
        let mut devices = vec![admin];
        for i in 1..n {
            let home = dir.path().join(format!("d{i}"));
            devices.push(Device::init_joining(&home, ns, &mut rng).expect("init joining"));
        }
        let ids: Vec<DeviceId> = devices.iter().map(|d| d.device_id()).collect();
        let change = add_members(&devices[0], &ids, 1);
        let maintenance: Vec<VerifiedFact> = devices[0]
            .store()
            .scan_maintenance(ns)
            .expect("scan")
            .map(|f| f.expect("fact").verify().expect("verify"))
            .collect();
        assert!(maintenance.iter().any(|f| f.id() == change.id()));
        for (i, d) in devices.iter().enumerate().skip(1) {
            if bootstrap.get(i).copied().unwrap_or(true) {
                let r = d.store().insert_batch(&maintenance).expect("bootstrap");
                assert!(r.rejected.is_empty(), "{:?}", r.rejected);
            }
        }
        Fleet {
            dir,
            devices: devices.into_iter().map(Some).collect(),
            ids,
        }
    }

    pub fn take(&mut self, i: usize) -> Device {
        self.devices[i].take().expect("device already taken")
    }

    pub fn device(&self, i: usize) -> &Device {
        self.devices[i].as_ref().expect("device taken")
    }

    pub fn home(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("d{i}"))
    }
}

/// The admin's membership change making `members` (sorted here) the member set. It is
/// signed at epoch 1 or later: a change at the genesis's own epoch may sort before the
/// genesis in `(epoch, id)` order, and a fresh reduction then ignores it.
pub fn add_members(admin: &Device, members: &[DeviceId], identity_epoch: u64) -> VerifiedFact {
    let mut members = members.to_vec();
    members.sort();
    members.dedup();
    let ns = admin.namespace();
    let epoch = admin
        .store()
        .maintenance_state(ns)
        .expect("state")
        .current_epoch()
        .max(Epoch(1));
    let fact = UnsignedFact {
        namespace: ns,
        epoch,
        payload: Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
            identity_epoch,
            members,
            threshold: 1,
            group_key: GroupKey(admin.device_id().0),
        })),
    }
    .sign(admin.key().signing_key());
    let r = admin
        .store()
        .insert_batch(std::slice::from_ref(&fact))
        .expect("insert");
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    fact
}

/// `count` application facts by `device`, signed directly and stored in batches.
pub fn bulk_facts(device: &Device, tag: &str, count: usize) {
    let ns = device.namespace();
    let epoch = device
        .store()
        .maintenance_state(ns)
        .expect("state")
        .current_epoch();
    let facts: Vec<VerifiedFact> = (0..count)
        .map(|i| {
            UnsignedFact {
                namespace: ns,
                epoch,
                payload: Payload::Application {
                    kind: "bulk".into(),
                    data: format!("{tag}-{i}").into_bytes(),
                },
            }
            .sign(device.key().signing_key())
        })
        .collect();
    for chunk in facts.chunks(2000) {
        let r = device.store().insert_batch(chunk).expect("insert");
        assert!(r.rejected.is_empty());
    }
}

/// A config for tests: loopback, fast rounds, no control socket.
pub fn config(peers: Vec<PeerAddr>) -> NodeConfig {
    NodeConfig {
        peers,
        sync_interval: Duration::from_millis(400),
        fanout: 8,
        control_socket: false,
        ..NodeConfig::default()
    }
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn digest(node: &Node) -> Hash32 {
    node.device().digest().expect("digest")
}

/// Waits until every node has the same journal digest; panics after `timeout`.
pub async fn converge(nodes: &[&Node], timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let d: Vec<Hash32> = nodes.iter().map(|n| digest(n)).collect();
        if d.windows(2).all(|w| w[0] == w[1]) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let facts: Vec<u64> = nodes
                .iter()
                .map(|n| {
                    n.device()
                        .status()
                        .map(|s| s.namespaces.iter().map(|x| x.facts).sum())
                        .unwrap_or(0)
                })
                .collect();
            panic!("no convergence after {timeout:?}: facts per node {facts:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Facts in the current journal of a node.
pub fn fact_count(node: &Node) -> u64 {
    let ns = node.device().namespace();
    node.device()
        .store()
        .stats(ns)
        .expect("stats")
        .map_or(0, |s| s.facts)
}

/// The value of one metric line (`name{labels} value`) in a rendering, if present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address `node` has for `device`, as `tend peers` shows it.
pub fn addr_of(node: &Node, device: &DeviceId) -> Option<String> {
    let id = device.to_string();
    node.peers()
        .into_iter()
        .find(|p| p.device_id == id)
        .and_then(|p| p.addr)
}

/// Every node learns every other's listen address within `timeout`, never the outsider's,
/// and keeps what it learned for its next start. Returns what each node keeps.
pub async fn members_learn_each_other(
    nodes: &[Node],
    outsider: &DeviceId,
    timeout: Duration,
) -> Vec<Vec<PeerAddr>> {
    let mut kept = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (j, m) in nodes.iter().enumerate() {
            if i != j {
                wait_until("every member learns every other", timeout, || {
                    addr_of(n, &m.device_id()) == Some(m.listen_addr().to_string())
                })
                .await;
            }
        }
        assert_eq!(addr_of(n, outsider), None);
        let stored = tend_node::discovery::load_peers(n.device().store()).unwrap();
        assert_eq!(stored.len(), nodes.len() - 1, "{stored:?}");
        kept.push(stored);
    }
    kept
}

/// A snapshot at `epoch` completed by device `d` alone (in these tests the authority's group
/// key is the admin's device key): the blob stored on `d`, the completion written at
/// `epoch` or the current epoch if later. Returns the completion and the blob's bytes.
pub fn complete_snapshot(d: &Device, epoch: Epoch, proposal: &[u8]) -> (VerifiedFact, Vec<u8>) {
    use ed25519_dalek::Signer;
    use tend_core::maintenance::{MaintenanceFact, SnapshotCompleted, SnapshotV1};
    let ns = d.namespace();
    let blob = tend_node::fleet::StoreJournal::new(d.store(), ns)
        .try_snapshot_blob(epoch)
        .unwrap();
    let bytes = blob.encode();
    // Kept with its item blob, as the ceremony keeps them.
    if let Some(items) = blob.item_blob() {
        d.store()
            .put_blob(tend_core::ids::CODEC_DAG_CBOR, &items.encode())
            .unwrap();
    }
    let cid = d
        .store()
        .put_blob(tend_core::ids::CODEC_DAG_CBOR, &bytes)
        .unwrap();
    let snapshot = SnapshotV1 {
        epoch,
        digest: blob.prefix_digest(),
        blob_cid: cid,
    };
    let proposal_id = Hash32::of(proposal);
    let sig = d
        .key()
        .signing_key()
        .sign(&snapshot.signing_message(&ns, &proposal_id));
    let at = d
        .store()
        .maintenance_state(ns)
        .unwrap()
        .current_epoch()
        .max(epoch);
    let completion = d
        .write(UnsignedFact {
            namespace: ns,
            epoch: at,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
                proposal_id,
                snapshot,
                threshold_signature: sig.to_bytes(),
            })),
        })
        .unwrap();
    let st = d.store().maintenance_state(ns).unwrap();
    assert_eq!(st.snapshot_epoch(), epoch, "the snapshot verified");
    (completion, bytes)
}

/// The `Hello` a member sends to open a session to `to`.
pub fn hello(member: &Device, to: &PeerAddr) -> Vec<u8> {
    let ns = member.namespace();
    let state = member.store().maintenance_state(ns).unwrap();
    let items: Vec<SyncItem> = member
        .store()
        .items(ns, ..)
        .unwrap()
        .map(|i| {
            let (epoch, id) = i.unwrap();
            SyncItem { epoch, id }
        })
        .collect();
    let local = LocalView {
        device: member.device_id(),
        namespace: ns,
        protocol: ProtocolVersion::CURRENT,
        epoch: state.maintenance_epoch(),
        fence: FenceStatus::Satisfied,
    };
    let (_, actions) = Session::initiate(
        Duration::ZERO,
        to.device,
        local,
        Arc::new(MemItems::new(ns, items)),
        SessionConfig::default(),
    )
    .unwrap();
    actions
        .into_iter()
        .find_map(|a| match a {
            Action::Send(b) => Some(b),
            _ => None,
        })
        .unwrap()
}
