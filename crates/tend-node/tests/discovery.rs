//! Discovery over a real rendezvous server on 127.0.0.1: devices that know only the
//! server find each other, bad records are never used, a moved device is found again.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ed25519_dalek::SigningKey;
use tend_node::discovery::record::{AddressRecord, RecordLimits};
use tend_node::discovery::rendezvous::{
    self, unix_ms, Client, RendezvousConfig, RendezvousError, RendezvousSource, ServerConfig,
};
use tend_node::discovery::AddressSource;
use tend_node::{Device, Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A rendezvous server on a free loopback port.
async fn server() -> (SocketAddr, JoinHandle<()>) {
    let listener = rendezvous::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(rendezvous::serve(listener, ServerConfig::default())),
    )
}

fn quick(server: SocketAddr) -> RendezvousConfig {
    RendezvousConfig {
        interval: Duration::from_millis(200),
        lifetime: Duration::from_secs(10),
        timeout: Duration::from_secs(2),
        ..RendezvousConfig::new(server)
    }
}

/// The test config with no static peer, only the rendezvous.
fn with_rendezvous(server: SocketAddr) -> NodeConfig {
    NodeConfig {
        rendezvous: Some(quick(server)),
        // Exact fact counts below: no device-metadata advertisements.
        upgrades: false,
        ..config(vec![])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_that_know_only_the_rendezvous_find_each_other_and_converge() {
    let (server, _srv) = server().await;
    let mut fleet = Fleet::new(3, &[true, true, true]);
    bulk_facts(fleet.device(0), "a", 10);
    bulk_facts(fleet.device(1), "b", 20);
    bulk_facts(fleet.device(2), "c", 30);
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            Node::start(fleet.take(i), with_rendezvous(server))
                .await
                .unwrap(),
        );
    }
    // A device of another authority publishes to the same server; nobody uses it.
    let outsider_dir = tempfile::tempdir().unwrap();
    let outsider = Device::init(outsider_dir.path(), &mut rand::thread_rng()).unwrap();
    let outsider_id = outsider.device_id();
    let outsider = Node::start(outsider, with_rendezvous(server))
        .await
        .unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(20)).await;
    // genesis + membership change + 10 + 20 + 30
    assert_eq!(fact_count(&nodes[0]), 62);
    members_learn_each_other(&nodes, &outsider_id, Duration::from_secs(5)).await;
    // The outsider's record is on the server all the same: it was simply never asked for.
    let client = Client::new(server, Duration::from_secs(2));
    let rec = client.fetch(outsider_id).await.unwrap().unwrap();
    assert_eq!(rec.addrs, vec![outsider.listen_addr()]);
    // Nor did the outsider learn anything: it has only its own genesis.
    assert_eq!(fact_count(&outsider), 1);
    for n in nodes.iter().chain([&outsider]) {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_forged_expired_future_and_replayed_records() {
    let (server, _srv) = server().await;
    let client = Client::new(server, Duration::from_secs(2));
    let key = SigningKey::from_bytes(&[9; 32]);
    let other = SigningKey::from_bytes(&[10; 32]);
    let at = |port: u16| vec![SocketAddr::from(([127, 0, 0, 1], port))];
    let now = unix_ms();
    let good = AddressRecord::sign(&key, at(4000), now, now + 10_000);
    client.publish(&good).await.unwrap();
    let refused = |r: Result<(), RendezvousError>| match r {
        Err(RendezvousError::Refused {
            status, message, ..
        }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut forged = AddressRecord::sign(&other, at(4001), now + 1, now + 10_000);
    forged.device_id = good.device_id;
    let (status, message) = refused(client.publish(&forged).await);
    assert_eq!(status, 400);
    assert!(message.contains("signature"), "{message}");
    let expired = AddressRecord::sign(&key, at(4002), now - 20_000, now - 10_000);
    let (status, message) = refused(client.publish(&expired).await);
    assert_eq!(status, 400);
    assert!(message.contains("expired"), "{message}");
    let future = AddressRecord::sign(&key, at(4003), now + 3_600_000, now + 3_700_000);
    assert_eq!(refused(client.publish(&future).await).0, 400);
    let long = AddressRecord::sign(&key, at(4004), now, now + 30 * 24 * 3_600_000);
    assert_eq!(refused(client.publish(&long).await).0, 400);
    let older = AddressRecord::sign(&key, at(4005), now - 1, now + 10_000);
    assert_eq!(refused(client.publish(&older).await).0, 409);
    // Through all that, the good record stands.
    assert_eq!(
        client.fetch(good.device_id).await.unwrap(),
        Some(good.clone())
    );
    // A newer one replaces it.
    let newer = AddressRecord::sign(&key, at(4006), now + 1, now + 10_000);
    client.publish(&newer).await.unwrap();
    assert_eq!(client.fetch(good.device_id).await.unwrap(), Some(newer));
    // Garbage is answered, not fatal.
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    s.write_all(b"POST /v1/records HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let unknown = SigningKey::from_bytes(&[11; 32]).verifying_key().to_bytes();
    assert_eq!(
        client.fetch(tend_core::DeviceId(unknown)).await.unwrap(),
        None
    );
}

/// A hostile rendezvous server: accepts every publication and answers every lookup with
/// the record it is given.
async fn hostile_server(answer: Arc<Mutex<String>>) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = if got.starts_with(b"GET") {
                    answer.lock().unwrap().clone()
                } else {
                    "{\"stored\":\"new\"}".to_string()
                };
                let msg = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(msg.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_records_from_the_server_are_not_used() {
    let mut fleet = Fleet::new(2, &[true, true]);
    let a = Arc::new(fleet.take(0));
    let b_id = fleet.ids[1];
    let answer = Arc::new(Mutex::new(String::new()));
    let (server, _srv) = hostile_server(answer.clone()).await;
    let listen = SocketAddr::from(([127, 0, 0, 1], 4999));
    let b_key = fleet.device(1).key().signing_key().clone();
    let now = unix_ms();
    let fake = vec![SocketAddr::from(([127, 0, 0, 1], 5001))];
    let mut forged = AddressRecord::sign(
        &SigningKey::from_bytes(&[3; 32]),
        fake.clone(),
        now,
        now + 60_000,
    );
    forged.device_id = b_id;
    let expired = AddressRecord::sign(&b_key, fake.clone(), now - 60_000, now - 1_000);
    let outsider = AddressRecord::sign(
        &SigningKey::from_bytes(&[4; 32]),
        fake.clone(),
        now,
        now + 60_000,
    );
    let too_long = AddressRecord::sign(&b_key, fake.clone(), now, now + 30 * 24 * 3_600_000);
    for (bad, reason) in [
        (&forged, "signature"),
        (&expired, "expired"),
        (&outsider, "asked for device"),
        (&too_long, "lifetime"),
    ] {
        *answer.lock().unwrap() = serde_json::to_string(bad).unwrap();
        let source = RendezvousSource::start(&a, listen, quick(server));
        wait_until("a refresh", Duration::from_secs(5), || {
            source.published() >= 2
        })
        .await;
        assert!(source.peers().is_empty(), "{reason}: {:?}", source.peers());
        let err = source.last_error().unwrap_or_default();
        assert!(err.contains(reason), "{reason}: {err}");
    }
    // The control: the same server with b's genuine record is believed.
    let good = AddressRecord::sign(&b_key, fake.clone(), now, now + 60_000);
    good.verify(now, &RecordLimits::default()).unwrap();
    *answer.lock().unwrap() = serde_json::to_string(&good).unwrap();
    let source = RendezvousSource::start(&a, listen, quick(server));
    wait_until("b's genuine record", Duration::from_secs(5), || {
        !source.peers().is_empty()
    })
    .await;
    assert_eq!(source.peers()[0].device, b_id);
    assert_eq!(source.peers()[0].addr, fake[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_device_is_found_at_its_new_address() {
    let (server, _srv) = server().await;
    let mut fleet = Fleet::new(2, &[true, true]);
    let home_b = fleet.home(1);
    let a = Node::start(fleet.take(0), with_rendezvous(server))
        .await
        .unwrap();
    let b = Node::start(fleet.take(1), with_rendezvous(server))
        .await
        .unwrap();
    let b_id = b.device_id();
    let old = b.listen_addr();
    a.add_fact("note", b"before").unwrap();
    converge(&[&a, &b], Duration::from_secs(15)).await;
    b.shutdown().await;
    drop(b);
    // The store is released once the node's last task has gone.
    let start = Instant::now();
    let b = loop {
        match Device::open(&home_b) {
            Ok(device) => break Node::start(device, with_rendezvous(server)).await.unwrap(),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("reopen: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reopen b: {e}"),
        }
    };
    assert_ne!(
        b.listen_addr(),
        old,
        "the restarted device listens elsewhere"
    );
    b.add_fact("note", b"after").unwrap();
    a.add_fact("note", b"meanwhile").unwrap();
    wait_until("a learns b's new address", Duration::from_secs(10), || {
        addr_of(&a, &b_id) == Some(b.listen_addr().to_string())
    })
    .await;
    converge(&[&a, &b], Duration::from_secs(20)).await;
    assert_eq!(fact_count(&a), 5);
    for n in [&a, &b] {
        n.shutdown().await;
    }
}
