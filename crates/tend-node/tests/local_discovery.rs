//! Local-network discovery over real UDP multicast on the loopback interface: devices that
//! were given no peer at all find each other and converge; strangers and forgeries heard
//! on the same group are never used.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use common::*;
use ed25519_dalek::SigningKey;
use tend_node::discovery::local::{encode_announcement, LocalConfig};
use tend_node::discovery::record::AddressRecord;
use tend_node::discovery::rendezvous::unix_ms;
use tend_node::{Device, Node, NodeConfig};

/// A group on a port no other test uses: every test binds a fresh port.
fn fresh_group() -> SocketAddrV4 {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 77), port)
}

fn with_local(group: SocketAddrV4) -> NodeConfig {
    NodeConfig {
        local_discovery: Some(LocalConfig {
            group,
            interval: Duration::from_millis(300),
            lifetime: Duration::from_secs(10),
            ..LocalConfig::new(Ipv4Addr::LOCALHOST)
        }),
        // Exact fact counts below: no device-metadata advertisements.
        upgrades: false,
        ..config(vec![])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_no_peers_find_each_other_on_the_local_network_and_converge() {
    let group = fresh_group();
    let mut fleet = Fleet::new(3, &[true, true, true]);
    bulk_facts(fleet.device(0), "a", 10);
    bulk_facts(fleet.device(1), "b", 20);
    bulk_facts(fleet.device(2), "c", 30);
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(fleet.take(i), with_local(group)).await.unwrap());
    }
    // A device of another authority announces on the same group; nobody uses it.
    let outsider_dir = tempfile::tempdir().unwrap();
    let outsider = Device::init(outsider_dir.path(), &mut rand::thread_rng()).unwrap();
    let outsider_id = outsider.device_id();
    let outsider = Node::start(outsider, with_local(group)).await.unwrap();
    // A forged announcement of member 1, pointing at a port nobody listens on, sent
    // straight to the group by someone without member 1's key.
    let forger = SigningKey::from_bytes(&[42; 32]);
    let now = unix_ms();
    let mut forged = AddressRecord::sign(
        &forger,
        vec![SocketAddr::from(([127, 0, 0, 1], 9))],
        now + 5_000,
        now + 9_000,
    );
    forged.device_id = nodes[1].device_id();
    let sender = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    sender.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    sender.set_multicast_loop_v4(true).unwrap();
    sender.set_multicast_ttl_v4(1).unwrap();
    let sender: std::net::UdpSocket = sender.into();
    sender
        .send_to(&encode_announcement(&forged), SocketAddr::V4(group))
        .unwrap();

    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(30)).await;
    // genesis + membership change + 10 + 20 + 30
    assert_eq!(fact_count(&nodes[0]), 62);
    let kept = members_learn_each_other(&nodes, &outsider_id, Duration::from_secs(10)).await;
    // The forged record's address was never kept.
    assert!(
        kept.iter().flatten().all(|p| p.addr.port() != 9),
        "{kept:?}"
    );
    // The outsider heard everyone, used no one, and has only its own genesis.
    assert_eq!(fact_count(&outsider), 1);
    let refused = |n: &Node, reason: &str| {
        metric(
            &n.metrics().render(),
            &format!("tend_announcements_refused_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // Every member counted the outsider as a stranger and the forgery as invalid
    // (members 0 and 2; member 1 heard a record of itself that it did not sign).
    for n in &nodes {
        assert!(refused(n, "not_member") >= 1.0);
    }
    assert_eq!(refused(&nodes[0], "invalid"), 1.0);
    assert_eq!(refused(&nodes[2], "invalid"), 1.0);
    for n in nodes.iter().chain([&outsider]) {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_is_not_multicast_is_refused_at_start() {
    let fleet_dir = tempfile::tempdir().unwrap();
    let device = Device::init(fleet_dir.path(), &mut rand::thread_rng()).unwrap();
    let err = Node::start(
        device,
        with_local(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 47177)),
    )
    .await
    .expect_err("a unicast group must be refused");
    assert!(err.to_string().contains("multicast"), "{err}");
}
