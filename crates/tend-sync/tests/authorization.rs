//! Who may sync is the host's decision ([`FactHost::is_authorized`] has no default): a
//! responder whose host says no refuses the Hello with `NotAuthorized` and admits nothing.

mod common;

use std::time::Duration;

use common::*;
use tend_core::{DeviceId, FactId, JournalError, JournalNamespace, VerifiedFact};
use tend_sync::{
    Action, FactHost, LocalView, ManagerConfig, RefuseReason, Session, SessionConfig,
    SessionResult, SyncMessage,
};

/// A host that stores like [`MemStore`] but lets no peer in.
struct Refusing<'a> {
    store: &'a mut MemStore,
}

impl FactHost for Refusing<'_> {
    fn load_fact(&self, ns: JournalNamespace, id: &FactId) -> Option<Vec<u8>> {
        self.store.load_fact(ns, id)
    }

    fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        self.store.admit(fact)
    }

    fn is_authorized(&self, _namespace: JournalNamespace, _peer: &DeviceId) -> bool {
        false
    }
}

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

/// The initiator `view` opens a session with `responder`'s device; its Hello is answered by
/// `host`. Returns the responder's actions and the initiator's result of the answer.
fn hello_to(
    sim: &Sim,
    view: LocalView,
    responder: usize,
    host: &mut dyn FactHost,
) -> (Vec<Action>, Option<SessionResult>) {
    let now = Duration::ZERO;
    let items = std::sync::Arc::new(tend_sync::MemItems::new(view.namespace, []));
    let b = &sim.devices[responder];
    let (mut ini, out) =
        Session::initiate(now, b.id, view, items, SessionConfig::default()).unwrap();
    let hello = sent(&out).remove(0);
    let (_, answer) = Session::accept(
        now,
        view.device,
        &hello,
        b.local_view(),
        b.store.items(),
        SessionConfig::default(),
        host,
    )
    .unwrap();
    let mut scratch = MemStore::new(&genesis(&[key(1)]));
    let mut result = None;
    for reply in sent(&answer) {
        result = result.or(finished(&ini.handle(now, &reply, &mut scratch, None)));
    }
    (answer, result)
}

#[test]
fn a_host_that_refuses_is_refused_even_for_a_member() {
    let mut sim = Sim::new(2, 7, ManagerConfig::default());
    sim.author(0, 5, 1);
    let member = sim.devices[0].local_view();
    let mut store = MemStore::new(&genesis(&[key(1), key(2)]));
    let before = store.digest();
    let mut host = Refusing { store: &mut store };
    let (answer, result) = hello_to(&sim, member, 1, &mut host);
    let replies = sent(&answer);
    assert_eq!(replies.len(), 1, "one refusal and nothing else");
    assert_eq!(
        SyncMessage::decode(&replies[0], 1 << 20).unwrap(),
        SyncMessage::Refuse(RefuseReason::NotAuthorized)
    );
    assert_eq!(
        finished(&answer),
        Some(SessionResult::Refused {
            by_peer: false,
            reason: RefuseReason::NotAuthorized
        })
    );
    assert_eq!(
        result,
        Some(SessionResult::Refused {
            by_peer: true,
            reason: RefuseReason::NotAuthorized
        })
    );
    assert_eq!(store.digest(), before, "nothing was admitted");
}

#[test]
fn a_membership_host_refuses_a_stranger_and_accepts_a_member() {
    let sim = Sim::new(2, 7, ManagerConfig::default());
    // A key outside the authority, speaking for its namespace.
    let mut stranger = sim.devices[0].local_view();
    stranger.device = device_id(&key(99));
    let mut store = MemStore::new(&genesis(&[key(1), key(2)]));
    let (answer, result) = hello_to(&sim, stranger, 1, &mut store);
    assert_eq!(
        finished(&answer),
        Some(SessionResult::Refused {
            by_peer: false,
            reason: RefuseReason::NotAuthorized
        })
    );
    assert!(matches!(
        result,
        Some(SessionResult::Refused { by_peer: true, .. })
    ));

    let member = sim.devices[0].local_view();
    let mut store = MemStore::new(&genesis(&[key(1), key(2)]));
    let (answer, _) = hello_to(&sim, member, 1, &mut store);
    assert!(
        !matches!(finished(&answer), Some(SessionResult::Refused { .. })),
        "a member is let in: {:?}",
        finished(&answer)
    );
}
