//! The control socket of a running device: status, permissions, bad requests, add_fact,
//! sync_now, and cleanup at shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use tend_node::control::{Client, Request};
use tend_node::{Node, NodeConfig};

fn with_socket(peers: Vec<tend_node::PeerAddr>) -> NodeConfig {
    NodeConfig {
        control_socket: true,
        sync_interval: std::time::Duration::from_secs(3600),
        // Fact counts below are exact: no `DeviceMetadata` advertised at start.
        upgrades: false,
        ..config(peers)
    }
}

/// Runs blocking client calls off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_status_matches_the_store_and_is_owner_only() {
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "x", 12);
    let home = fleet.home(0);
    let a = Node::start(fleet.take(0), with_socket(vec![]))
        .await
        .unwrap();
    let b = Node::start(fleet.take(1), with_socket(vec![a.peer_addr()]))
        .await
        .unwrap();
    let sock = home.join("control.sock");
    assert_eq!(a.control_path().as_deref(), Some(sock.as_path()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let home_mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
    assert_eq!(home_mode, 0o700);

    let h = home.clone();
    let status = blocking(move || Client::connect(&h).unwrap().unwrap().status().unwrap()).await;
    assert_eq!(status.journal, a.device().status().unwrap());
    assert_eq!(status.device_id, a.device_id().to_string());
    assert_eq!(status.listen_addr, a.listen_addr().to_string());

    // add_fact through the socket lands in the running device's store.
    let h = home.clone();
    let added = blocking(move || {
        Client::connect(&h)
            .unwrap()
            .unwrap()
            .add_fact("note", "via socket")
            .unwrap()
    })
    .await;
    assert_eq!(fact_count(&a), 2 + 12 + 1);
    assert!(a
        .device()
        .list(tend_core::Epoch(0), 100)
        .unwrap()
        .iter()
        .any(|f| f.id == added.id));

    // sync_now and peers through b's socket.
    let hb = fleet.home(1);
    let (report, peers) = blocking(move || {
        let mut c = Client::connect(&hb).unwrap().unwrap();
        (c.sync_now().unwrap(), c.peers().unwrap())
    })
    .await;
    assert!(report.all_ok() && !report.sessions.is_empty(), "{report:?}");
    assert_eq!(digest(&a), digest(&b));
    assert!(peers
        .iter()
        .any(|p| p.device_id == a.device_id().to_string() && p.successful_syncs >= 1));

    a.shutdown().await;
    assert!(!sock.exists(), "the socket is removed at shutdown");
    let h = home.clone();
    assert!(blocking(move || Client::connect(&h).unwrap().is_none()).await);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_error_responses() {
    let mut fleet = Fleet::new(1, &[true]);
    let home = fleet.home(0);
    let a = Node::start(fleet.take(0), with_socket(vec![]))
        .await
        .unwrap();
    let h = home.clone();
    blocking(move || {
        let mut c = Client::connect(&h).unwrap().unwrap();
        for bad in [
            "{not json",
            r#"{"cmd":"status"}"#,
            r#"{"v":2,"cmd":"status"}"#,
            r#"{"v":1,"cmd":"launch_missiles"}"#,
            r#"{"v":1,"cmd":"add_fact","kind":"note"}"#,
            r#"[1,2,3]"#,
        ] {
            let r = c.raw(bad).unwrap();
            assert!(!r.ok, "{bad} was accepted");
            assert!(r.error.is_some_and(|e| !e.is_empty()));
        }
        // Invalid input is refused with a reason, and the connection still serves.
        let r = c.request(Request::AddFact {
            kind: String::new(),
            data: "x".into(),
        });
        assert!(r.is_err());
        assert!(c.status().is_ok());
        // An overlong line gets an error, not a crash.
        let long = format!(
            r#"{{"v":1,"cmd":"add_fact","kind":"k","data":"{}"}}"#,
            "a".repeat(600 * 1024)
        );
        // (The device may hang up before reading all of it.)
        if let Ok(r) = c.raw(&long) {
            assert!(!r.ok);
        }
    })
    .await;
    // The device still answers new clients.
    let h = home.clone();
    assert!(blocking(move || Client::connect(&h).unwrap().unwrap().status().is_ok()).await);
    a.shutdown().await;
}
