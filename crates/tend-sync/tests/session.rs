//! Session and manager edge cases driven by hand: garbage, refusals, capacity, downgrade.

mod common;

use std::time::Duration;

use common::*;
use tend_core::{ContextId, JournalNamespace};
use tend_sync::{
    Action, FailReason, ManagerConfig, ManagerError, MessageError, RefuseReason, Session,
    SessionConfig, SessionResult, SyncMessage,
};

fn sent(actions: &[Action]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

fn finished(actions: &[Action]) -> Option<SessionResult> {
    actions.iter().find_map(|a| match a {
        Action::Finished(o) => Some(o.result.clone()),
        _ => None,
    })
}

/// Device 0 of `sim` opens a session to device 1, which accepts it admitting through
/// `host`: the initiator, the responder and the responder's first actions.
fn opened(sim: &Sim, host: &mut dyn tend_sync::FactHost) -> (Session, Session, Vec<Action>) {
    let (a, b) = (&sim.devices[0], &sim.devices[1]);
    let now = Duration::ZERO;
    let (ini, out) = Session::initiate(
        now,
        b.id,
        a.local_view(),
        a.store.items(),
        SessionConfig::default(),
    )
    .unwrap();
    let hello = sent(&out).remove(0);
    let (res, out) = Session::accept(
        now,
        a.id,
        &hello,
        b.local_view(),
        b.store.items(),
        SessionConfig::default(),
        host,
    )
    .unwrap();
    (ini, res, out)
}

#[test]
fn garbage_mid_session_fails_it_as_misbehaviour() {
    let mut sim = Sim::new(2, 1, ManagerConfig::default());
    sim.author(0, 50, 1);
    let now = Duration::ZERO;
    let mut store_b = MemStore::new(&genesis(&[key(1), key(2)]));
    let (mut ini, mut res, out) = opened(&sim, &mut store_b);
    assert!(finished(&out).is_none());
    // The responder gets junk instead of the next message.
    let out = res.handle(now, b"\xff\x00junk", &mut store_b, None);
    match finished(&out) {
        Some(SessionResult::Failed(r @ FailReason::Garbage(MessageError::Invalid(_)))) => {
            assert!(r.is_misbehaviour())
        }
        other => panic!("unexpected {other:?}"),
    }
    // The initiator gets an oversized message.
    let mut store_a = MemStore::new(&genesis(&[key(1), key(2)]));
    let big = vec![0u8; SessionConfig::default().max_message_bytes + 1];
    let out = ini.handle(now, &big, &mut store_a, None);
    assert!(matches!(
        finished(&out),
        Some(SessionResult::Failed(FailReason::Garbage(
            MessageError::Oversized { .. }
        )))
    ));
    // A finished session ignores whatever comes later.
    assert!(ini
        .handle(now, b"\xff\x00later", &mut store_a, None)
        .is_empty());
}

#[test]
fn refusals_carry_reasons_and_busy_peers_answer_busy() {
    let mut sim = Sim::new(2, 2, ManagerConfig::default());
    let now = Duration::ZERO;
    // A Hello for a namespace the responder does not keep.
    let mut view = sim.devices[0].local_view();
    view.namespace = JournalNamespace::Context(ContextId([3; 32]));
    let items = std::sync::Arc::new(tend_sync::MemItems::new(view.namespace, []));
    let (_, out) = Session::initiate(
        now,
        sim.devices[1].id,
        view,
        items,
        SessionConfig::default(),
    )
    .unwrap();
    let hello = sent(&out).remove(0);
    let (b_view, b_items, a_id) = (
        sim.devices[1].local_view(),
        sim.devices[1].store.items(),
        sim.devices[0].id,
    );
    let dev = &mut sim.devices[1];
    let (_, out) = Session::accept(
        now,
        a_id,
        &hello,
        b_view,
        b_items.clone(),
        SessionConfig::default(),
        &mut dev.store,
    )
    .unwrap();
    let refusal = SyncMessage::decode(&sent(&out)[0], 1 << 20).unwrap();
    assert!(matches!(
        refusal,
        SyncMessage::Refuse(RefuseReason::UnknownNamespace(_))
    ));
    // A Hello whose device id is not the transport's peer.
    let (_, out) = Session::accept(
        now,
        sim.devices[1].id,
        &hello,
        b_view,
        b_items,
        SessionConfig::default(),
        &mut sim.devices[1].store,
    )
    .unwrap();
    assert!(matches!(
        finished(&out),
        Some(SessionResult::Failed(FailReason::Handshake(_)))
    ));

    // A device at capacity answers an incoming Hello with Refuse(Busy), and the slot
    // comes back when its session closes.
    let cfg = ManagerConfig {
        max_concurrent: 1,
        ..ManagerConfig::default()
    };
    let mut sim = Sim::new(3, 3, cfg);
    let (id1, id2) = (sim.devices[1].id, sim.devices[2].id);
    let (view0, items0) = (sim.devices[0].local_view(), sim.devices[0].store.items());
    let (sid, _) = sim.devices[0]
        .manager
        .open(now, id1, view0, items0.clone())
        .unwrap();
    let (_, out) = Session::initiate(
        now,
        sim.devices[0].id,
        sim.devices[2].local_view(),
        sim.devices[2].store.items(),
        SessionConfig::default(),
    )
    .unwrap();
    let hello2 = sent(&out).remove(0);
    let dev0 = &mut sim.devices[0];
    match dev0
        .manager
        .accept(now, id2, &hello2, view0, items0.clone(), &mut dev0.store)
    {
        Err(ManagerError::AtCapacity {
            refusal, active: 1, ..
        }) => assert_eq!(
            SyncMessage::decode(&refusal, 1 << 20).unwrap(),
            SyncMessage::Refuse(RefuseReason::Busy)
        ),
        other => panic!("unexpected {other:?}"),
    }
    let closed = dev0.manager.close(now, sid);
    assert!(closed
        .iter()
        .any(|a| matches!(a, tend_sync::ManagerAction::Closed { .. })));
    assert_eq!(dev0.manager.active(), 0);
    assert!(dev0
        .manager
        .accept(now, id2, &hello2, view0, items0, &mut dev0.store)
        .is_ok());
}

#[test]
fn silent_peers_time_out_and_release_their_slot() {
    let mut sim = Sim::new(2, 4, ManagerConfig::default());
    sim.author(0, 10, 1);
    sim.blocked.insert((0, 1));
    sim.open(0, 1).unwrap();
    sim.run();
    assert_eq!(
        sim.outcomes_of(0),
        vec![&SessionResult::Failed(FailReason::Timeout)]
    );
    assert_eq!(sim.devices[0].manager.active(), 0);
    let c = &sim.closed[0];
    assert_eq!(c.at, SessionConfig::default().idle_timeout);
}

#[test]
fn equal_sets_sync_in_one_round_trip() {
    let mut sim = Sim::new(2, 5, ManagerConfig::default());
    sim.author(0, 200, 1);
    sim.open(0, 1).unwrap();
    sim.run();
    assert!(sim.converged(&[0, 1]));
    let (before, closed) = (sim.messages, sim.closed.len());
    sim.open(0, 1).unwrap();
    sim.run();
    // Hello and Accept only: the responder saw every range match and closed at once.
    assert_eq!(sim.messages - before, 2);
    assert!(sim.closed[closed..]
        .iter()
        .all(|c| c.outcome.result == SessionResult::Completed));
    assert_eq!(sim.closed.len() - closed, 2);
}

/// A store that says it holds one given fact id, whatever its bytes.
struct Holding<'a> {
    store: &'a mut MemStore,
    held: tend_core::FactId,
}

impl tend_sync::FactHost for Holding<'_> {
    fn load_fact(&self, ns: JournalNamespace, id: &tend_core::FactId) -> Option<Vec<u8>> {
        self.store.load_fact(ns, id)
    }

    fn admit(&mut self, fact: tend_core::VerifiedFact) -> Result<bool, tend_core::JournalError> {
        self.store.admit(fact)
    }

    fn holds(&self, _ns: JournalNamespace, id: &tend_core::FactId) -> bool {
        *id == self.held
    }

    fn is_authorized(&self, ns: JournalNamespace, peer: &tend_core::DeviceId) -> bool {
        self.store.is_authorized(ns, peer)
    }
}

/// A received fact the store already holds is a duplicate, not checked again: its bytes
/// hash to the id of bytes checked before. (Here the "held" bytes would not even decode:
/// a copy checked again would count as invalid and fail the session.)
#[test]
fn a_fact_already_held_is_a_duplicate_without_a_second_check() {
    use tend_sync::FactHost;
    let mut sim = Sim::new(2, 1, ManagerConfig::default());
    sim.author(0, 5, 1);
    let now = Duration::ZERO;
    let mut store_b = MemStore::new(&genesis(&[key(1), key(2)]));
    let junk = b"\xffnot a fact".to_vec();
    let mut host = Holding {
        store: &mut store_b,
        held: tend_core::FactId::of(&junk),
    };
    assert!(host.holds(sim.namespace(), &tend_core::FactId::of(&junk)));
    let (_ini, mut res, out) = opened(&sim, &mut host);
    assert!(finished(&out).is_none());
    let facts = SyncMessage::Facts(vec![junk.clone(); 3]).encode();
    let out = res.handle(now, &facts, &mut host, None);
    assert!(finished(&out).is_none(), "{out:?}");
    assert_eq!(res.stats().facts_duplicate, 3);
    assert_eq!(res.stats().facts_received, 3);
    // Without the store holding it, the same bytes are refused as invalid.
    let other = SyncMessage::Facts(vec![b"\xfeother junk".to_vec(); 50]).encode();
    let out = res.handle(now, &other, &mut host, None);
    assert!(
        matches!(finished(&out), Some(SessionResult::Failed(_))),
        "{out:?}"
    );
}
