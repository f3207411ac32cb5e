//! Limits that bind mid-session, driven through the session manager: incoming session
//! rates refused with a reason the initiator shows, incoming frames held back, and a fence
//! that becomes unsatisfied while a session runs.

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use common::*;
use tend_core::{Epoch, ProtocolVersion};
use tend_sync::{
    AbortReason, Action, Admit, Direction, InboundRate, InboundTicket, Kind, ManagerConfig,
    ManagerError, Rate, RateConfig, RefuseReason, Role, Scope, Session, SessionConfig,
    SessionResult, SyncMessage,
};

fn nz(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
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

#[test]
fn a_peer_opening_sessions_too_fast_is_refused_with_a_reason_it_can_show() {
    let cfg = ManagerConfig {
        max_per_peer: 8,
        rate: RateConfig {
            inbound_per_peer: InboundRate {
                sessions_per_sec: nz(2),
                ..InboundRate::UNLIMITED
            },
            ..RateConfig::UNLIMITED
        },
        ..ManagerConfig::default()
    };
    let mut sim = Sim::new(2, 7, cfg);
    sim.author(1, 5, 1);
    let now = Duration::from_secs(5);
    let (view0, items0) = (sim.devices[0].local_view(), sim.devices[0].store.items());
    let (mut initiator, out) = Session::initiate(
        now,
        sim.devices[0].id,
        sim.devices[1].local_view(),
        sim.devices[1].store.items(),
        SessionConfig::default(),
    )
    .unwrap();
    let hello = sent(&out).remove(0);
    let id1 = sim.devices[1].id;
    let dev0 = &mut sim.devices[0];
    for _ in 0..2 {
        dev0.manager
            .accept(now, id1, &hello, view0, items0.clone(), &mut dev0.store)
            .expect("within the burst");
    }
    let refusal =
        match dev0
            .manager
            .accept(now, id1, &hello, view0, items0.clone(), &mut dev0.store)
        {
            Err(ManagerError::RateLimited {
                retry_after_ms,
                refusal,
            }) => {
                assert!((1..=500).contains(&retry_after_ms), "{retry_after_ms}");
                refusal
            }
            other => panic!("expected a rate-limit refusal, got {other:?}"),
        };
    // The initiator reads the refusal as the peer's, with a line it can show.
    let out = initiator.handle(now, &refusal, &mut sim.devices[1].store, None);
    let result = out.iter().find_map(|a| match a {
        Action::Finished(o) => Some(o.result.clone()),
        _ => None,
    });
    let Some(SessionResult::Refused {
        by_peer: true,
        reason: reason @ RefuseReason::RateLimited { .. },
    }) = result
    else {
        panic!("unexpected {result:?}");
    };
    assert!(reason.to_string().contains("too many sessions"), "{reason}");
    let dev0 = &mut sim.devices[0];
    let limited = dev0.manager.take_limited();
    assert_eq!(limited.len(), 1, "{limited:?}");
    assert_eq!(
        (
            limited[0].0.direction,
            limited[0].0.scope,
            limited[0].0.kind
        ),
        (Direction::Incoming, Scope::Peer, Kind::Sessions)
    );
    // Half a second later the peer has a session's worth of budget again.
    let later = now + Duration::from_millis(500);
    dev0.manager
        .accept(later, id1, &hello, view0, items0, &mut dev0.store)
        .expect("the budget refilled");
}

#[test]
fn incoming_frames_beyond_the_byte_rate_are_held_back_per_peer() {
    let cfg = ManagerConfig {
        rate: RateConfig {
            inbound_per_peer: InboundRate {
                bytes_per_sec: nz(100_000),
                ..InboundRate::UNLIMITED
            },
            ..RateConfig::UNLIMITED
        },
        ..ManagerConfig::default()
    };
    let mut sim = Sim::new(3, 8, cfg);
    let (flooder, other) = (sim.devices[1].id, sim.devices[2].id);
    let m = &mut sim.devices[0].manager;
    let mut now = Duration::from_secs(1);
    // The flooder offers 1 MB in 10 kB frames as fast as it is let: each frame waits
    // until the limiter admits it, as the node's reader does.
    let mut read = 0usize;
    let start = now;
    while read < 1_000_000 {
        let mut ticket = InboundTicket::default();
        loop {
            match m.admit_incoming(flooder, 10_000, now, &mut ticket) {
                Admit::Now => break,
                Admit::RetryAt(t) => {
                    assert!(t > now);
                    now = t;
                }
            }
        }
        read += 10_000;
    }
    let took = now - start;
    // 100 kB of burst, then 100 kB/s: 9 s for the rest.
    assert!(
        took >= Duration::from_millis(8_900) && took <= Duration::from_millis(9_100),
        "{took:?}"
    );
    // Another peer is not slowed by the flooder's limit.
    let mut ticket = InboundTicket::default();
    assert_eq!(
        m.admit_incoming(other, 10_000, now, &mut ticket),
        Admit::Now
    );
    let limited = m.take_limited();
    let held: u64 = limited
        .iter()
        .filter(|(l, _)| l.direction == Direction::Incoming && l.kind == Kind::Bytes)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(held, 90, "every frame past the burst was held back once");
}

#[test]
fn a_fence_that_becomes_unsatisfied_mid_session_ends_it_on_both_sides_with_a_reason() {
    // Device 0 sends at most 200 facts/s, so pushing 1000 facts takes seconds.
    let cfg = ManagerConfig {
        rate: RateConfig {
            per_peer: Rate {
                facts_per_sec: nz(200),
                bytes_per_sec: None,
            },
            ..RateConfig::UNLIMITED
        },
        ..ManagerConfig::default()
    };
    let mut sim = Sim::new(2, 9, cfg);
    sim.author(0, 1000, 1);
    sim.open(0, 1).expect("room");
    while sim.now < Duration::from_secs(1) {
        assert!(sim.step(), "the session ended too early");
    }
    let before = sim.devices[1].store.journal.len();
    assert!(before > 1 && before < 1001, "{before} facts mid-session");
    // The responder (device 1) learns of an activation whose fence its peer's announced
    // version does not meet: it ends the session, naming the fence.
    let required = ProtocolVersion {
        minor: ProtocolVersion::CURRENT.minor + 1,
        ..ProtocolVersion::CURRENT
    };
    let reason = AbortReason::PeerFenceNotSatisfied {
        fence: Epoch(1),
        required,
        local_epoch: Epoch(3),
    };
    sim.abort_where(1, |s| {
        (s.role() == Role::Responder && s.peer_protocol() < Some(required)).then_some(reason)
    });
    sim.run();
    let results: Vec<(usize, SessionResult)> = sim
        .closed
        .iter()
        .map(|c| (c.device, c.outcome.result.clone()))
        .collect();
    assert!(
        results.contains(&(
            1,
            SessionResult::Aborted {
                by_peer: false,
                reason
            }
        )),
        "{results:?}"
    );
    // The initiator was told why, and does not retry at once.
    let shown = results
        .iter()
        .find(|(d, _)| *d == 0)
        .map(|(_, r)| r.clone())
        .expect("the initiator's session ended");
    assert_eq!(
        shown,
        SessionResult::Aborted {
            by_peer: true,
            reason
        }
    );
    assert!(!shown.should_retry());
    assert!(reason.to_string().contains(&required.to_string()));
    // No fact crossed after the abort, and no session is left open.
    let after = sim.devices[1].store.journal.len();
    assert!(after < 1001, "the session ran to the end");
    assert_eq!(sim.devices[0].manager.active(), 0);
    assert_eq!(sim.devices[1].manager.active(), 0);
    // The message itself round-trips with its fields.
    let bytes = SyncMessage::Abort(reason).encode();
    assert_eq!(
        SyncMessage::decode(&bytes, 1 << 20).unwrap(),
        SyncMessage::Abort(reason)
    );
}
