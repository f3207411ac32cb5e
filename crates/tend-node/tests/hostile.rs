//! Hostile peers against a real node: a non-member key, a member sending forged,
//! non-canonical and oversized facts, and a member sending an oversized frame. The raw
//! client speaks the protocol with tend-sync's own session state machine over a bare iroh
//! endpoint, so it can serve bytes no honest device would.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use iroh::endpoint::{Connection, ConnectionError};
use tend_core::{
    Epoch, FactId, JournalError, Payload, ProtocolVersion, UnsignedFact, VerifiedFact,
};
use tend_crypto::device::DeviceKey;
use tend_node::endpoint::{self, close_code, SYNC_ALPN};
use tend_node::{Device, Node, PeerAddr};
use tend_sync::{
    Action, FactHost, FenceStatus, LocalView, MemItems, Session, SessionConfig, SessionResult,
    SyncItem,
};

/// Serves whatever bytes it was given under whatever id.
struct RawHost {
    bytes: HashMap<FactId, Vec<u8>>,
}

impl FactHost for RawHost {
    fn load_fact(&self, _ns: tend_core::JournalNamespace, id: &FactId) -> Option<Vec<u8>> {
        self.bytes.get(id).cloned()
    }
    fn admit(&mut self, _fact: VerifiedFact) -> Result<bool, JournalError> {
        Ok(true)
    }
    /// It only initiates, so no Hello ever asks; it would let no one in.
    fn is_authorized(&self, _ns: tend_core::JournalNamespace, _peer: &tend_core::DeviceId) -> bool {
        false
    }
}

async fn connect(key: &DeviceKey, to: PeerAddr) -> (iroh::Endpoint, Connection) {
    let ep = endpoint::bind(key, loopback()).await.unwrap();
    let addr = endpoint::endpoint_addr(to.device, to.addr).unwrap();
    let conn = ep.connect(addr, SYNC_ALPN).await.unwrap();
    (ep, conn)
}

/// The application close code and reason the connection ended with.
async fn close_of(conn: &Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("unexpected close: {other:?}"),
    }
}

async fn wait_metric(node: &Node, name: &str, at_least: f64) -> f64 {
    for _ in 0..100 {
        let v = metric(&node.metrics().render(), name).unwrap_or(0.0);
        if v >= at_least {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{name} never reached {at_least}:\n{}",
        node.metrics().render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_key_is_refused_at_the_handshake_and_counted() {
    let mut fleet = Fleet::new(1, &[true]);
    let a = Node::start(fleet.take(0), config(vec![])).await.unwrap();
    let stranger = DeviceKey::generate(&mut rand::thread_rng());
    let (_ep, conn) = connect(&stranger, a.peer_addr()).await;
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, u64::from(close_code::NOT_MEMBER));
    assert_eq!(reason, "not a member of this authority");
    let v = wait_metric(
        &a,
        "tend_handshake_refusals_total{reason=\"not_member\"}",
        1.0,
    )
    .await;
    assert_eq!(v, 1.0);
    assert_eq!(
        metric(&a.metrics().render(), "tend_sessions_opened_total"),
        Some(0.0)
    );
    a.shutdown().await;
}

fn sign_app(key: &DeviceKey, dev: &Device, epoch: Epoch, data: Vec<u8>) -> VerifiedFact {
    UnsignedFact {
        namespace: dev.namespace(),
        epoch,
        payload: Payload::Application {
            kind: "evil".into(),
            data,
        },
    }
    .sign(key.signing_key())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_noncanonical_and_oversized_facts_are_rejected_and_nothing_valid_is_lost() {
    let mut fleet = Fleet::new(2, &[true, true]);
    bulk_facts(fleet.device(0), "a", 20);
    bulk_facts(fleet.device(1), "b", 5);
    let b = fleet.take(1);
    let a = Node::start(fleet.take(0), config(vec![])).await.unwrap();
    let before = fact_count(&a);
    let ns = b.namespace();
    let state = b.store().maintenance_state(ns).unwrap();
    let epoch = state.current_epoch();
    let key = b.key();

    // B's genuine facts, plus three it has no business sending.
    let mut bytes: HashMap<FactId, Vec<u8>> = HashMap::new();
    let mut items = Vec::new();
    for f in b.store().scan(ns, ..).unwrap() {
        let f = f.unwrap();
        items.push(SyncItem {
            epoch: f.epoch,
            id: f.id,
        });
        bytes.insert(f.id, f.into_bytes());
    }
    let mut forged = sign_app(key, &b, epoch, b"forged".to_vec())
        .bytes()
        .to_vec();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let honest = sign_app(key, &b, epoch, b"non-canonical".to_vec())
        .bytes()
        .to_vec();
    assert_eq!(&honest[..2], &[0x87, 0x01]);
    // The version 1 as a two-byte integer: same value, not the canonical form.
    let mut non_canonical = vec![0x87, 0x18, 0x01];
    non_canonical.extend_from_slice(&honest[2..]);
    let oversized = sign_app(key, &b, epoch, vec![7; 70 * 1024])
        .bytes()
        .to_vec();
    for bad in [forged, non_canonical, oversized] {
        let id = FactId(*blake3::hash(&bad).as_bytes());
        items.push(SyncItem { epoch, id });
        bytes.insert(id, bad);
    }

    let (_ep, conn) = connect(key, a.peer_addr()).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let local = LocalView {
        device: b.device_id(),
        namespace: ns,
        protocol: ProtocolVersion::CURRENT,
        epoch: state.maintenance_epoch(),
        fence: FenceStatus::Satisfied,
    };
    let items = Arc::new(MemItems::new(ns, items));
    let mut host = RawHost { bytes };
    let start = std::time::Instant::now();
    let (mut session, mut actions) = Session::initiate(
        start.elapsed(),
        a.device_id(),
        local,
        items,
        SessionConfig::default(),
    )
    .unwrap();
    let result = loop {
        let mut finished = None;
        for act in actions.drain(..) {
            match act {
                Action::Send(b) => {
                    let _ = endpoint::write_frame(&mut send, &b).await;
                }
                Action::Finished(o) => finished = Some(o.result),
                Action::WakeAt(_) => {}
            }
        }
        if let Some(r) = finished {
            break Some(r);
        }
        match endpoint::read_frame(&mut recv, 2 << 20).await {
            Ok(frame) => actions = session.handle(start.elapsed(), &frame, &mut host, None),
            Err(_) => break None,
        }
    };
    // A judged B to misbehave: it aborted the session and closed the connection.
    assert!(
        matches!(
            result,
            None | Some(SessionResult::Aborted { by_peer: true, .. })
        ),
        "{result:?}"
    );
    let (code, _) = close_of(&conn).await;
    assert_eq!(code, u64::from(close_code::MISBEHAVIOUR));

    let text = {
        wait_metric(&a, "tend_sessions_failed_total", 1.0).await;
        a.metrics().render()
    };
    assert_eq!(
        metric(&text, "tend_facts_rejected_total{reason=\"signature\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "tend_facts_rejected_total{reason=\"oversized\"}"),
        Some(1.0)
    );
    let malformed = metric(&text, "tend_facts_rejected_total{reason=\"malformed\"}").unwrap_or(0.0)
        + metric(&text, "tend_facts_rejected_total{reason=\"non_canonical\"}").unwrap_or(0.0);
    assert_eq!(malformed, 1.0, "{text}");
    // Nothing valid is lost: A's facts are all there, and B's genuine ones of the same
    // batch were kept.
    assert_eq!(fact_count(&a), before + 5);
    for f in b.store().scan(ns, ..).unwrap() {
        let f = f.unwrap();
        assert!(a.device().store().contains(ns, f.epoch, &f.id).unwrap());
    }
    // B is demoted.
    let info = a
        .peers()
        .into_iter()
        .find(|p| p.device_id == b.device_id().to_string())
        .expect("b is known");
    assert!(
        info.misbehaviours == 1
            && info.trust < tend_node::peer_table::MEMBER_TRUST
            && info.failed_syncs == 1,
        "{info:?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_disconnects_the_member_that_sent_it() {
    let mut fleet = Fleet::new(2, &[true, true]);
    let b = fleet.take(1);
    let a = Node::start(fleet.take(0), config(vec![])).await.unwrap();
    let (_ep, conn) = connect(b.key(), a.peer_addr()).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&0x7fff_ffffu32.to_be_bytes()).await.unwrap();
    // The device may close on reading the length alone, before these bytes go out.
    let _ = send.write_all(b"not really").await;
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, u64::from(close_code::MISBEHAVIOUR));
    assert_eq!(reason, "oversized frame");
    let info = a
        .peers()
        .into_iter()
        .find(|p| p.device_id == b.device_id().to_string())
        .expect("b is known");
    assert!(
        info.misbehaviours == 1 && info.trust < tend_node::peer_table::MEMBER_TRUST,
        "{info:?}"
    );
    a.shutdown().await;
}
