//! Rate limits on the running device: a member flooding a real node on loopback with
//! sessions and bytes is held to its per-peer limits (sessions refused with a retry time,
//! frames read no faster than the byte rate), every limit is counted in the metrics, and
//! two honest members keep syncing with the same node meanwhile.

mod common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use tend_core::{Payload, UnsignedFact};
use tend_node::endpoint::{self, SYNC_ALPN};
use tend_node::{Node, NodeConfig};
use tend_sync::{RateConfig, RefuseReason, SyncMessage};

fn nz(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

/// Opens a stream, sends `hello`, and reads the first answer.
async fn open(conn: &Connection, hello: &[u8]) -> (SendStream, RecvStream, SyncMessage) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    endpoint::write_frame(&mut send, hello).await.unwrap();
    let frame = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint::read_frame(&mut recv, 2 << 20),
    )
    .await
    .expect("an answer")
    .expect("a frame");
    let msg = SyncMessage::decode(&frame, 2 << 20).unwrap();
    (send, recv, msg)
}

#[derive(Debug, Default)]
struct SessionFlood {
    accepted: u32,
    rate_limited: u32,
    busy: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_slowed_and_the_other_peers_still_sync() {
    // `tend run` has rate limits on unless told otherwise.
    assert_eq!(
        NodeConfig::default().manager.rate,
        RateConfig::device_default()
    );
    let mut fleet = Fleet::new(4, &[true; 4]);
    let flooder = fleet.take(3);
    // The device defaults, with per-peer figures low enough for a short test.
    let mut target_cfg = config(vec![]);
    target_cfg.manager.rate.inbound_per_peer.sessions_per_sec = nz(5);
    target_cfg.manager.rate.inbound_per_peer.bytes_per_sec = nz(256 * 1024);
    let t = Node::start(fleet.take(0), target_cfg).await.unwrap();
    let h1 = Node::start(fleet.take(1), config(vec![t.peer_addr()]))
        .await
        .unwrap();
    let h2 = Node::start(fleet.take(2), config(vec![t.peer_addr()]))
        .await
        .unwrap();
    for h in [&h1, &h2] {
        t.add_peer(h.peer_addr()).unwrap();
    }
    converge(&[&t, &h1, &h2], Duration::from_secs(20)).await;

    // The flooder is a member speaking the protocol over its own endpoint.
    let ep = endpoint::bind(flooder.key(), loopback()).await.unwrap();
    let addr = endpoint::endpoint_addr(t.device_id(), t.listen_addr()).unwrap();
    let conn = ep.connect(addr, SYNC_ALPN).await.unwrap();
    let hello = hello(&flooder, &t.peer_addr());

    // Byte flood: one accepted session, then 1.5 MiB of fact batches (one valid 60 kB
    // fact each, the same one over and over) as fast as the stream takes them, then Done.
    let (mut send, mut recv, first) = open(&conn, &hello).await;
    assert!(matches!(first, SyncMessage::Accept(_)), "{first:?}");
    let big = UnsignedFact {
        namespace: flooder.namespace(),
        epoch: flooder
            .store()
            .maintenance_state(flooder.namespace())
            .unwrap()
            .current_epoch(),
        payload: Payload::Application {
            kind: "flood".into(),
            data: vec![0x5a; 60 * 1024],
        },
    }
    .sign(flooder.key().signing_key());
    let batch = SyncMessage::Facts(vec![big.bytes().to_vec()]).encode();
    let frames = (3 << 19) / batch.len(); // 1.5 MiB
    let flooding = Arc::new(AtomicBool::new(true));
    let byte_flood = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..frames {
                endpoint::write_frame(&mut send, &batch).await.unwrap();
            }
            endpoint::write_frame(&mut send, &SyncMessage::Done.encode())
                .await
                .unwrap();
            // The session ends when the node has read (and answered) everything.
            loop {
                let frame = endpoint::read_frame(&mut recv, 2 << 20).await.unwrap();
                if SyncMessage::decode(&frame, 2 << 20).unwrap() == SyncMessage::Done {
                    break;
                }
            }
            flooding.store(false, Ordering::SeqCst);
            start.elapsed()
        })
    };

    // Session flood, at the same time, for 3 s: sessions back to back, each dropped as
    // soon as it is answered.
    let session_flood = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut tally = SessionFlood::default();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let (mut send, _recv, answer) = open(&conn, &hello).await;
                match answer {
                    SyncMessage::Accept(_) => tally.accepted += 1,
                    SyncMessage::Refuse(RefuseReason::RateLimited { retry_after_ms }) => {
                        assert!(retry_after_ms <= 1000, "{retry_after_ms}");
                        tally.rate_limited += 1;
                    }
                    SyncMessage::Refuse(RefuseReason::Busy) => tally.busy += 1,
                    other => panic!("unexpected answer {other:?}"),
                }
                let _ = send.finish();
            }
            (tally, start.elapsed())
        })
    };

    // Meanwhile the honest members write and must converge with the target.
    let honest_start = Instant::now();
    for (i, h) in [&h1, &h2].into_iter().enumerate() {
        for j in 0..5 {
            h.add_fact("note", format!("honest {i} {j}").as_bytes())
                .unwrap();
        }
    }
    converge(&[&t, &h1, &h2], Duration::from_secs(20)).await;
    let honest = honest_start.elapsed();
    let still_flooding = flooding.load(Ordering::SeqCst);

    let (tally, window) = session_flood.await.unwrap();
    let took = byte_flood.await.unwrap();
    eprintln!(
        "session flood over {window:?}: {tally:?}; 1.5 MiB read in {took:?}; honest members \
         converged in {honest:?} (flood still running: {still_flooding})"
    );
    // Sessions: at most the burst (5) plus 5 per second, the rest refused with a time to
    // come back.
    let allowed = 5 + (5.0 * window.as_secs_f64()).ceil() as u32 + 1;
    assert!(
        tally.accepted <= allowed,
        "{} sessions accepted, at most {allowed} allowed",
        tally.accepted
    );
    assert!(tally.rate_limited > 0, "{tally:?}");
    // Bytes: 256 KiB of burst, then 256 KiB/s (the stream's window lets the flooder run
    // about 1 MiB ahead, which the node reads at the limit too).
    assert!(took >= Duration::from_secs(4), "1.5 MiB read in {took:?}");
    // The honest members synced while the flooder was held back.
    assert!(
        still_flooding,
        "the honest members converged only after the flood"
    );

    let text = t.metrics().render();
    let m = |name: &str| metric(&text, name).unwrap_or(0.0);
    assert!(
        m("tend_rate_limited_total{direction=\"in\",scope=\"peer\",kind=\"sessions\"}")
            >= tally.rate_limited as f64,
        "{text}"
    );
    assert!(m("tend_rate_limited_total{direction=\"in\",scope=\"peer\",kind=\"bytes\"}") >= 1.0);
    assert!(m("tend_handshake_refusals_total{reason=\"rate_limited\"}") >= 1.0);
    assert!(m("tend_rate_limit_wait_seconds_total") >= 3.0, "{text}");
    // Nothing was blamed on the honest members, and the flooder's valid fact was kept.
    assert_eq!(
        m("tend_rate_limited_total{direction=\"in\",scope=\"global\",kind=\"bytes\"}"),
        0.0
    );
    assert!(t
        .device()
        .store()
        .contains(t.device().namespace(), big.epoch(), &big.id())
        .unwrap());
    conn.close(0u32.into(), b"done");
    for n in [&t, &h1, &h2] {
        n.shutdown().await;
    }
}
