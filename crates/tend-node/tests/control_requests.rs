//! The store requests of the control socket against an in-process node: answers equal
//! what the device gives directly, plug-in settings only, and an answer too long for the
//! client is reported as such.

mod common;

use common::*;
use tend_core::{Epoch, Payload, UnsignedFact};
use tend_node::control::{ops, Client, ControlError, Request, MAX_RESPONSE_BYTES};
use tend_node::{Node, NodeConfig};

fn with_socket() -> NodeConfig {
    NodeConfig {
        control_socket: true,
        sync_interval: std::time::Duration::from_secs(3600),
        upgrades: false,
        ..config(vec![])
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_requests_answer_what_the_device_says() {
    let mut fleet = Fleet::new(1, &[true]);
    bulk_facts(fleet.device(0), "x", 30);
    let home = fleet.home(0);
    let node = Node::start(fleet.take(0), with_socket()).await.unwrap();
    let h = home.clone();
    let (list, authority, snapshot, admin) = blocking(move || {
        let mut c = Client::connect(&h).unwrap().unwrap();
        (
            c.run(ops::ListJournal {
                from_epoch: 0,
                limit: 10,
            })
            .unwrap(),
            c.run(ops::GetAuthorityStatus {}).unwrap(),
            c.run(ops::GetSnapshotStatus {}).unwrap(),
            c.run(ops::GetAdminStatus {}).unwrap(),
        )
    })
    .await;
    let d = node.device();
    assert_eq!(list, d.list(Epoch(0), 10).unwrap());
    assert_eq!(authority, d.authority_status().unwrap());
    assert_eq!(snapshot, d.snapshot_status().unwrap());
    assert_eq!(admin, tend_node::admin::status(d).unwrap());

    // A cache invalidation through the socket is a fact in the running device's journal.
    let before = fact_count(&node);
    let h = home.clone();
    let (inv, check) = blocking(move || {
        let mut c = Client::connect(&h).unwrap().unwrap();
        let inv = c
            .run(ops::InvalidateCache {
                keys: vec!["k".into()],
                floor: None,
                local: false,
            })
            .unwrap();
        let check = c
            .run(ops::CheckCache {
                key: "k".into(),
                epoch: 0,
            })
            .unwrap();
        (inv, check)
    })
    .await;
    assert!(inv.fact_id.is_some());
    assert_eq!(fact_count(&node), before + 1);
    assert!(!check.valid);

    // Only plug-in settings: the node's own state is out of reach.
    let h = home.clone();
    let (peers, triggers) = blocking(move || {
        let mut c = Client::connect(&h).unwrap().unwrap();
        let peers = c.request(Request::PutSetting {
            key: "peers".into(),
            value: serde_json::json!([]),
        });
        c.put_setting("snapshot_triggers", &serde_json::json!({"facts": 5}))
            .unwrap();
        (
            peers,
            c.get_setting::<serde_json::Value>("snapshot_triggers")
                .unwrap(),
        )
    })
    .await;
    assert!(matches!(peers, Err(ControlError::Remote(_))), "{peers:?}");
    assert_eq!(triggers, Some(serde_json::json!({"facts": 5})));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_client_limit_is_refused_with_a_reason() {
    let mut fleet = Fleet::new(1, &[true]);
    let device = fleet.device(0);
    // Facts of ~60 KB each, enough of them to pass the client's limit.
    let ns = device.namespace();
    let epoch = device
        .store()
        .maintenance_state(ns)
        .unwrap()
        .current_epoch();
    let count = MAX_RESPONSE_BYTES / 60_000 + 10;
    let facts: Vec<_> = (0..count)
        .map(|i| {
            UnsignedFact {
                namespace: ns,
                epoch,
                payload: Payload::Application {
                    kind: "big".into(),
                    data: format!("{i:06}{}", "z".repeat(60_000)).into_bytes(),
                },
            }
            .sign(device.key().signing_key())
        })
        .collect();
    device.store().insert_batch(&facts).unwrap();
    let home = fleet.home(0);
    let node = Node::start(fleet.take(0), with_socket()).await.unwrap();
    let h = home.clone();
    let (too_long, fine) = blocking(move || {
        let too_long = Client::connect(&h).unwrap().unwrap().run(ops::ListJournal {
            from_epoch: 0,
            limit: count + 10,
        });
        // A new connection with a smaller question works.
        let fine = Client::connect(&h).unwrap().unwrap().run(ops::ListJournal {
            from_epoch: 0,
            limit: 10,
        });
        (too_long, fine)
    })
    .await;
    match too_long {
        Err(ControlError::BadResponse(why)) => assert!(why.contains("longer than"), "{why}"),
        other => panic!(
            "expected a too-long answer, got {:?}",
            other.map(|l| l.len())
        ),
    }
    assert_eq!(fine.unwrap().len(), 10);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_export_needs_the_plug_in_and_absolute_paths() {
    use std::sync::{Arc, Mutex};
    use tend_node::control::{BackupExporter, ExportRequest, NO_BACKUP_SUPPORT};

    let mut fleet = Fleet::new(1, &[true]);
    let home = fleet.home(0);
    let node = Node::start(fleet.take(0), with_socket()).await.unwrap();
    let export = |out: &str, pass: Option<&str>| {
        let h = home.clone();
        let (out, pass) = (out.into(), pass.map(Into::into));
        blocking(move || {
            Client::connect(&h)
                .unwrap()
                .unwrap()
                .backup_export(out, pass, vec!["age1x".into()])
        })
    };
    // Without the plug-in (`tend run` installs it), a clear refusal.
    match export("/x/b.age", None).await {
        Err(ControlError::Remote(why)) => assert_eq!(why, NO_BACKUP_SUPPORT),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    node.set_backup_exporter(BackupExporter(Arc::new(move |device, req| {
        s.lock().unwrap().push(req.clone());
        if req.out.ends_with("fail.age") {
            return Err("cannot write it".into());
        }
        Ok(serde_json::json!({ "device": device.device_id().to_string() }))
    })));
    // The device's working directory is not the client's: relative paths are refused
    // before the exporter runs.
    for (out, pass) in [("b.age", None), ("/x/b.age", Some("pass"))] {
        match export(out, pass).await {
            Err(ControlError::Remote(why)) => assert!(why.contains("not absolute"), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(seen.lock().unwrap().is_empty());
    let r = export("/x/b.age", Some("/x/pass")).await.unwrap();
    assert_eq!(r["device"], node.device_id().to_string());
    match export("/x/fail.age", None).await {
        Err(ControlError::Remote(why)) => assert_eq!(why, "cannot write it"),
        other => panic!("expected the exporter's error, got {other:?}"),
    }
    assert_eq!(
        seen.lock().unwrap()[0],
        ExportRequest {
            out: "/x/b.age".into(),
            passphrase_file: Some("/x/pass".into()),
            recipients: vec!["age1x".into()],
        }
    );
    node.shutdown().await;
}
