//! A storage peer on loopback (real iroh, real redb) and member devices (real homes) across
//! two membership changes: a member added two epochs after a large value was written reads
//! it from the storage peer alone, through re-encryption; a removed device is refused and
//! cannot open a later blob; the storage peer's disk holds no plaintext.

mod common;

use common::{add_members, loopback, Fleet};
use tend_core::{ContentId, DeviceId};
use tend_node::vault_peer::{
    authority_of, grant_storage_peer, key_current_epoch, StorageServer, VaultClient, VaultNetError,
};
use tend_node::Device;
use tend_storage::{Request, Response};

/// Copies every fact (maintenance ones included) `from` holds that `to` lacks.
fn copy_journal(from: &Device, to: &Device) {
    let ns = from.namespace();
    let mut facts = Vec::new();
    for stored in from.store().scan_maintenance(ns).unwrap() {
        facts.push(stored.unwrap().verify().unwrap());
    }
    for stored in from.store().scan(ns, ..).unwrap() {
        facts.push(stored.unwrap().verify().unwrap());
    }
    facts.sort_by_key(|f| f.order_key());
    facts.dedup_by_key(|f| f.id());
    to.store().insert_batch(&facts).unwrap();
}

/// The blob a large value was stored as (its plaintext CID).
fn value_blob(d: &Device, value: &[u8]) -> ContentId {
    let cid = ContentId::of_raw(value);
    assert!(d
        .store()
        .value_blobs(d.namespace())
        .unwrap()
        .contains_key(&cid));
    cid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_member_reads_old_blobs_from_the_storage_peer_alone() {
    // Epoch 1: a (admin) and b.
    let mut fleet = Fleet::new(4, &[true, true, false, false]);
    let (a, b, c, d) = (fleet.take(0), fleet.take(1), fleet.take(2), fleet.take(3));
    add_members(&a, &[a.device_id(), b.device_id()], 1);
    let peer_home = fleet.dir.path().join("storage");
    let server = StorageServer::start(&peer_home, authority_of(&a).unwrap(), loopback())
        .await
        .unwrap();
    let (peer_id, peer_addr) = (server.device_id(), server.local_addr().unwrap());
    key_current_epoch(&a).unwrap();
    grant_storage_peer(&a, peer_id, true).unwrap();
    copy_journal(&a, &b);

    // b writes a large value (a blob) with a marker and uploads it encrypted.
    let marker0 = b"MARKER-EPOCH-ONE ".repeat(2000);
    b.put("files", "old", &marker0).unwrap();
    let old = value_blob(&b, &marker0);
    let client = VaultClient::connect(b.key(), peer_id, peer_addr)
        .await
        .unwrap();
    let report = client.upload_values(&b).await.unwrap();
    assert_eq!(report.uploaded.len(), 1);
    client.close().await;
    copy_journal(&b, &a);

    // Epoch 2: b removed, c added. Epoch 3: d added. The admin keys each epoch.
    add_members(&a, &[a.device_id(), c.device_id()], 2);
    key_current_epoch(&a).unwrap();
    add_members(&a, &[a.device_id(), c.device_id(), d.device_id()], 3);
    key_current_epoch(&a).unwrap();
    copy_journal(&a, &c);
    copy_journal(&a, &d);

    // c writes a value after b's removal and uploads it (pushing the advances too).
    let marker2 = b"MARKER-EPOCH-THREE ".repeat(2000);
    c.put("files", "new", &marker2).unwrap();
    let new = value_blob(&c, &marker2);
    let client = VaultClient::connect(c.key(), peer_id, peer_addr)
        .await
        .unwrap();
    client.upload_values(&c).await.unwrap();
    client.close().await;
    copy_journal(&c, &d);
    assert_eq!(server.summary().unwrap(), (2, 3));

    // The other members stop; d never had b's blob and reads it from the storage peer.
    drop((a, c));
    assert!(d.store().delete_blob(&old).unwrap() || !d.store().has_blob(&old).unwrap());
    let client = VaultClient::connect(d.key(), peer_id, peer_addr)
        .await
        .unwrap();
    assert_eq!(client.fetch(&d, old).await.unwrap(), marker0);
    let entry = d
        .store()
        .app_state(d.namespace())
        .unwrap()
        .get("files", "old")
        .unwrap();
    assert_eq!(d.read_entry("old", &entry).unwrap().value.0, marker0);

    // d can also fetch the raw bytes of c's blob, which b will never open.
    let state = d.store().maintenance_state(d.namespace()).unwrap();
    let encrypted_new = state.vault.copies[&new];
    let Response::Blob {
        blob, sealed_key, ..
    } = client
        .request(&Request::Get { cid: encrypted_new })
        .await
        .unwrap()
    else {
        panic!("d reads c's blob");
    };
    client.close().await;

    // b, removed: refused by the storage peer, and its ring (epoch 1) opens nothing later.
    let client = VaultClient::connect(b.key(), peer_id, peer_addr)
        .await
        .unwrap();
    let refused = client.request(&Request::Get { cid: encrypted_new }).await;
    assert!(
        matches!(refused, Err(VaultNetError::Refused(_))),
        "{refused:?}"
    );
    let refused = client.upload_values(&b).await;
    assert!(
        matches!(refused, Err(VaultNetError::Refused(_))),
        "{refused:?}"
    );
    client.close().await;
    let b_ring = tend_storage::member::open_ring(&state, b.key().signing_key()).unwrap();
    assert_eq!(b_ring.current_epoch(), 1);
    let opened = tend_storage::member::open_fetched(
        &state,
        &b_ring,
        &encrypted_new,
        &blob,
        &sealed_key,
        3,
        &Vec::<Vec<u8>>::new(),
    );
    assert!(opened.is_err());

    // No plaintext on the storage peer's disk.
    server.shutdown().await;
    for entry in std::fs::read_dir(&peer_home).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for marker in [b"MARKER-EPOCH".as_slice(), b"files"] {
            assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        }
    }
    let _: DeviceId = peer_id;
}

/// Key generation over the network: once the vault is in use, the admin keys each new
/// identity epoch by itself (its ring sealed to the members, fragments from the older one),
/// so a member added by the re-deal opens the new epoch's ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_networked_re_deal_keys_the_new_epoch_when_the_vault_is_in_use() {
    use std::time::Duration;
    use tend_node::{Node, NodeConfig};

    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::thread_rng();
    let cfg = NodeConfig {
        sync_interval: Duration::from_secs(3600),
        upgrades: false,
        ..common::config(vec![])
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        let device = Device::init(&dir.path().join(format!("d{i}")), &mut rng).unwrap();
        nodes.push(Node::start(device, cfg.clone()).await.unwrap());
    }
    for a in &nodes {
        for b in &nodes {
            if a.device_id() != b.device_id() {
                a.add_peer(b.peer_addr()).unwrap();
            }
        }
    }
    let (b, c) = (nodes[1].device_id(), nodes[2].device_id());
    nodes[0]
        .create_authority(2, &[b], Duration::from_secs(20))
        .await
        .unwrap();
    let admin = nodes[0].device();
    let vault = |d: &Device| d.store().maintenance_state(d.namespace()).unwrap();
    // Not in use yet: the first re-deal wrote no key; the admin enables the vault.
    assert!(vault(admin).vault.epoch_keys.is_empty());
    assert_eq!(key_current_epoch(admin).unwrap().len(), 1);

    nodes[0]
        .create_authority(2, &[b, c], Duration::from_secs(20))
        .await
        .unwrap();
    let state = vault(admin);
    assert_eq!(state.identity_epoch(), 2);
    assert!(state.vault.epoch_keys.contains_key(&2));
    assert!(state.vault.rekeys.contains_key(&(1, 2)));
    nodes[2].sync_now().await;
    common::wait_until(
        "c holds the new epoch's key",
        Duration::from_secs(10),
        || vault(nodes[2].device()).vault.epoch_keys.contains_key(&2),
    )
    .await;
    let ring = tend_storage::member::current_ring(
        &vault(nodes[2].device()),
        nodes[2].device().key().signing_key(),
    )
    .unwrap();
    assert_eq!(ring.current_epoch(), 2);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Garbage on the storage peer's ALPN closes that connection and nothing else: a member
/// connected beside it is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_vault_alpn_closes_only_that_connection() {
    use tend_crypto::device::DeviceKey;
    use tend_node::endpoint;

    let mut fleet = Fleet::new(1, &[true]);
    let a = fleet.take(0);
    let server = StorageServer::start(
        &fleet.dir.path().join("storage"),
        authority_of(&a).unwrap(),
        loopback(),
    )
    .await
    .unwrap();
    let (peer_id, peer_addr) = (server.device_id(), server.local_addr().unwrap());
    key_current_epoch(&a).unwrap();
    let member = VaultClient::connect(a.key(), peer_id, peer_addr)
        .await
        .unwrap();

    let stranger = DeviceKey::generate(&mut rand::thread_rng());
    let ep = endpoint::bind_alpns(&stranger, loopback(), Vec::new())
        .await
        .unwrap();
    let conn = ep
        .connect(
            endpoint::endpoint_addr(peer_id, peer_addr).unwrap(),
            tend_storage::VAULT_ALPN,
        )
        .await
        .unwrap();
    for garbage in [vec![0xff; 40], vec![]] {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            break;
        };
        let _ = endpoint::write_frame(&mut send, &garbage).await;
        let _ = send.finish();
        // Either the stream ends without an answer or the connection is closed.
        assert!(endpoint::read_frame(&mut recv, 1 << 20).await.is_err());
    }
    assert!(matches!(
        member.push_facts(&a).await,
        Ok(n) if n > 0
    ));
    member.close().await;
    ep.close().await;
    server.shutdown().await;
}
