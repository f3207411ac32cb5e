//! Fleet-level sync tests over the deterministic simulated network.

mod common;

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use tend_core::{Epoch, ProtocolVersion, VerifiedFact};
use tend_sync::{
    AbortReason, FailReason, FenceStatus, ManagerConfig, Rate, RateConfig, RefuseReason,
    SessionConfig, SessionResult,
};

fn config() -> ManagerConfig {
    ManagerConfig {
        max_concurrent: 8,
        max_per_peer: 2,
        ..ManagerConfig::default()
    }
}

#[test]
fn three_devices_with_disjoint_facts_converge() {
    let mut sim = Sim::new(3, 1, config());
    for d in 0..3 {
        sim.author(d, 40, 1 + d as u64);
    }
    assert!(!sim.converged(&[0, 1, 2]));
    let rounds = sim.rounds_until_converged(&[0, 1, 2], 5, 1);
    assert!(rounds <= 3, "took {rounds} rounds");
    for d in &sim.devices {
        assert_eq!(d.store.journal.len(), 121);
        assert_eq!(d.manager.active(), 0);
        assert!(d.peers.iter().all(|p| p.active_sessions == 0));
    }
    assert!(sim
        .closed
        .iter()
        .all(|c| c.outcome.result == SessionResult::Completed));
}

#[test]
fn five_devices_with_a_healing_partition_converge() {
    let mut sim = Sim::new(5, 7, config());
    sim.drop_prob = 0.02;
    for d in 0..5 {
        sim.author(d, 25, 1);
    }
    for a in [0, 1] {
        for b in [2, 3, 4] {
            sim.blocked.insert((a, b));
        }
    }
    let mut rounds = 0;
    while !(sim.converged(&[0, 1]) && sim.converged(&[2, 3, 4])) {
        sim.round(2);
        rounds += 1;
        assert!(rounds < 20, "sides did not converge: {:?}", sim.digests());
    }
    assert!(!sim.converged(&[0, 1, 2, 3, 4]));
    // New facts on both sides while partitioned, then heal.
    sim.author(0, 10, 9);
    sim.author(4, 10, 9);
    sim.blocked.clear();
    sim.rounds_until_converged(&[0, 1, 2, 3, 4], 20, 2);
    assert!(sim.devices.iter().all(|d| d.store.journal.len() == 146));
}

#[test]
fn a_device_offline_for_ten_thousand_facts_catches_up() {
    let mut sim = Sim::new(3, 3, config());
    sim.devices[2].online = false;
    sim.author(0, 10_000, 1);
    sim.author(1, 50, 2);
    sim.rounds_until_converged(&[0, 1], 5, 1);
    sim.author(2, 5, 3);
    sim.devices[2].online = true;
    let before = sim.closed.len();
    sim.rounds_until_converged(&[0, 1, 2], 5, 1);
    assert_eq!(sim.devices[2].store.journal.len(), 10_056);
    let received: u64 = sim.closed[before..]
        .iter()
        .filter(|c| c.device == 2)
        .map(|c| c.outcome.stats.facts_accepted)
        .sum();
    assert_eq!(received, 10_050);
}

/// Valid fact bytes re-encoded with a non-minimal integer for the version.
fn non_canonical(f: &VerifiedFact) -> Vec<u8> {
    let b = f.bytes();
    assert_eq!(&b[..2], &[0x87, 0x01]);
    let mut out = vec![0x87, 0x18, 0x01];
    out.extend_from_slice(&b[2..]);
    out
}

#[test]
fn forged_non_canonical_and_oversized_facts_are_rejected_and_counted() {
    let mut sim = Sim::new(2, 5, config());
    let ns = sim.namespace();
    sim.author(0, 10, 1); // the honest device's own facts
    sim.author(1, 20, 1); // the peer's valid facts
    let k = sim.devices[1].key.clone();
    let mut forged = note(&k, ns, 2, b"forged".to_vec()).bytes().to_vec();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let bogus = vec![
        forged,
        non_canonical(&note(&k, ns, 2, b"nc".to_vec())),
        note(&k, ns, 2, vec![7; 70_000]).bytes().to_vec(),
        // Valid signature, but the author is not a member.
        note(&key(99), ns, 2, b"stranger".to_vec()).bytes().to_vec(),
    ];
    for (i, b) in bogus.into_iter().enumerate() {
        sim.devices[1]
            .store
            .bogus
            .insert(tend_core::FactId([200 + i as u8; 32]), (Epoch(2), b));
    }
    let own_before = sim.devices[0].store.digest();
    let trust_before = sim.devices[0]
        .peers
        .get(&sim.devices[1].id)
        .unwrap()
        .trust_level;
    sim.open(0, 1).unwrap();
    sim.run();

    let c = sim
        .closed
        .iter()
        .find(|c| c.device == 0)
        .expect("session closed");
    let stats = &c.outcome.stats;
    match &c.outcome.result {
        SessionResult::Failed(r @ FailReason::InvalidFacts { count: 3, .. }) => {
            assert!(r.is_misbehaviour());
        }
        other => panic!("expected failure for invalid facts, got {other:?}"),
    }
    assert_eq!(stats.rejected.get("signature"), Some(&1));
    assert_eq!(stats.rejected.get("oversized"), Some(&1));
    // The DAG-CBOR decoder itself refuses a non-minimal integer ("malformed"); other
    // non-canonical forms that do decode fail the re-encoding check ("non_canonical").
    let nc = stats.rejected.get("non_canonical").unwrap_or(&0)
        + stats.rejected.get("malformed").unwrap_or(&0);
    assert_eq!(nc, 1);
    assert_eq!(stats.rejected.get("not_member"), Some(&1));
    assert_eq!(stats.facts_accepted, 20);
    // Every valid fact arrived and nothing was rolled back.
    let h = &sim.devices[0].store;
    assert_eq!(h.journal.len(), 31);
    assert!(sim.devices[1]
        .store
        .journal
        .iter()
        .all(|f| h.journal.contains(f.epoch(), &f.id())));
    assert_ne!(h.digest(), own_before);
    let trust_after = sim.devices[0]
        .peers
        .get(&sim.devices[1].id)
        .unwrap()
        .trust_level;
    assert!(trust_after < trust_before);
}

#[test]
fn identity_epoch_advance_mid_session_aborts_and_the_retry_succeeds() {
    // A rate limit stretches the transfer over a few seconds of simulated time.
    let cfg = ManagerConfig {
        rate: RateConfig {
            per_peer: Rate {
                facts_per_sec: NonZeroU32::new(50),
                bytes_per_sec: None,
            },
            global: Rate::UNLIMITED,
            ..RateConfig::UNLIMITED
        },
        ..config()
    };
    let mut sim = Sim::new(2, 11, cfg);
    sim.author(0, 300, 1);
    sim.author(1, 300, 1);
    sim.open(0, 1).unwrap();
    // Run until facts flow in both directions.
    while sim.devices[1].store.journal.len() <= 350 || sim.devices[0].store.journal.len() <= 350 {
        assert!(sim.step());
    }
    let (had0, had1) = (
        sim.devices[0].store.journal.len(),
        sim.devices[1].store.journal.len(),
    );
    assert_eq!(sim.devices[0].manager.active(), 1);
    sim.advance_epoch(0, 1);
    // Nothing accepted before the abort is rolled back.
    assert_eq!(sim.devices[0].store.journal.len(), had0);
    assert_eq!(sim.devices[1].store.journal.len(), had1);
    sim.run();
    let ours = sim.outcomes_of(0);
    assert_eq!(
        ours[0],
        &SessionResult::Aborted {
            by_peer: false,
            reason: AbortReason::EpochAdvanced { from: 0, to: 1 }
        }
    );
    assert_eq!(ours.last().unwrap(), &&SessionResult::Completed);
    let theirs = sim.outcomes_of(1);
    assert!(matches!(
        theirs[0],
        SessionResult::Aborted {
            by_peer: true,
            reason: AbortReason::EpochAdvanced { .. }
        }
    ));
    assert!(sim.converged(&[0, 1]));
    assert_eq!(sim.devices[0].store.journal.len(), 601);
}

#[test]
fn unsatisfied_fences_refuse_sessions_with_a_reason() {
    let mut sim = Sim::new(2, 2, config());
    let fence = FenceStatus::NotSatisfied {
        fence: Epoch(10),
        required: ProtocolVersion {
            major: 1,
            minor: 2,
            patch: 0,
        },
        local_epoch: Epoch(3),
    };
    sim.devices[1].fence = fence;
    sim.author(0, 5, 1);
    sim.open(0, 1).unwrap();
    sim.run();
    let r = sim.outcomes_of(0)[0].clone();
    match &r {
        SessionResult::Refused {
            by_peer: true,
            reason: reason @ RefuseReason::FenceNotSatisfied { .. },
        } => assert!(reason.to_string().contains("activation fence at epoch 10")),
        other => panic!("unexpected {other:?}"),
    }
    // The fenced device does not start sessions either.
    sim.open(1, 0).unwrap();
    sim.run();
    assert!(matches!(
        sim.outcomes_of(1).last().unwrap(),
        SessionResult::Refused { by_peer: false, .. }
    ));
    assert!(!sim.converged(&[0, 1]));
}

#[test]
fn session_limits_hold_and_counts_return_to_zero() {
    let cfg = ManagerConfig {
        max_concurrent: 2,
        max_per_peer: 1,
        ..ManagerConfig::default()
    };
    let mut sim = Sim::new(4, 4, cfg);
    for d in 0..4 {
        sim.author(d, 30, 1);
    }
    assert!(sim.open(0, 1).is_some());
    assert!(sim.open(0, 1).is_none(), "per-peer limit");
    assert!(sim.open(0, 2).is_some());
    assert!(sim.open(0, 3).is_none(), "global limit");
    assert_eq!(sim.devices[0].manager.active(), 2);
    sim.run();
    for d in &sim.devices {
        assert_eq!(d.manager.active(), 0);
        assert_eq!(d.manager.peers_with_sessions(), 0);
        assert!(d.peers.iter().all(|p| p.active_sessions == 0));
    }
    sim.rounds_until_converged(&[0, 1, 2, 3], 6, 1);
}

#[test]
fn rate_limits_pace_the_transfer_on_the_injected_clock() {
    let cfg = ManagerConfig {
        rate: RateConfig {
            per_peer: Rate {
                facts_per_sec: NonZeroU32::new(100),
                bytes_per_sec: None,
            },
            global: Rate {
                facts_per_sec: None,
                bytes_per_sec: NonZeroU32::new(1_000_000),
            },
            ..RateConfig::UNLIMITED
        },
        session: SessionConfig {
            idle_timeout: Duration::from_secs(60),
            ..SessionConfig::default()
        },
        ..config()
    };
    let mut sim = Sim::new(2, 9, cfg);
    sim.author(0, 500, 1);
    sim.open(0, 1).unwrap();
    sim.run();
    assert!(sim.converged(&[0, 1]));
    // 500 facts at 100/s with a burst of 100: at least four seconds.
    let took = sim.closed.iter().map(|c| c.at).max().unwrap();
    assert!(took >= Duration::from_secs(4), "took {took:?}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(sim
        .closed
        .iter()
        .all(|c| c.outcome.result == SessionResult::Completed));
}

/// Facts signed once for all property cases.
fn pool() -> &'static Vec<VerifiedFact> {
    static POOL: OnceLock<Vec<VerifiedFact>> = OnceLock::new();
    POOL.get_or_init(|| {
        let keys = [key(1), key(2)];
        let ns = genesis(&keys).namespace();
        (0..300u64)
            .map(|i| {
                note(
                    &keys[(i % 2) as usize],
                    ns,
                    i % 13,
                    i.to_le_bytes().to_vec(),
                )
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn two_devices_always_end_with_equal_digests(
        a in proptest::collection::vec(any::<bool>(), 300),
        b in proptest::collection::vec(any::<bool>(), 300),
        frame in prop_oneof![Just(0u64), Just(4096u64)],
        batch in prop_oneof![Just(1usize), Just(7), Just(512)],
        seed in any::<u64>(),
    ) {
        let cfg = ManagerConfig {
            session: SessionConfig {
                frame_size_limit: frame,
                max_batch_facts: batch,
                max_want_ids: 50,
                ..SessionConfig::default()
            },
            ..config()
        };
        let mut sim = Sim::new(2, seed, cfg);
        for (i, f) in pool().iter().enumerate() {
            if a[i] { sim.devices[0].store.add(f.clone()); }
            if b[i] { sim.devices[1].store.add(f.clone()); }
        }
        sim.open(0, 1).unwrap();
        sim.run();
        prop_assert!(sim.converged(&[0, 1]));
        let union = (0..300).filter(|&i| a[i] || b[i]).count();
        prop_assert_eq!(sim.devices[0].store.journal.len(), union + 1);
        prop_assert!(sim.closed.iter().all(|c| c.outcome.result == SessionResult::Completed));
    }
}

/// Facts received by `device` over all its sessions since `from` (an index in `closed`).
fn received_by(sim: &Sim, device: usize, from: usize) -> u64 {
    sim.closed[from..]
        .iter()
        .filter(|c| c.device == device)
        .map(|c| c.outcome.stats.facts_received)
        .sum()
}

#[test]
fn a_rounds_sessions_ask_for_each_fact_once() {
    // Devices 0 and 1 hold the same facts; device 2 syncs with both at once, as one round,
    // and asks for each missing fact from one of them only.
    let mut sim = Sim::new(3, 12, config());
    sim.author(0, 2_000, 1);
    assert!(sim.open(0, 1).is_some());
    sim.run();
    assert!(sim.converged(&[0, 1]));
    let from = sim.closed.len();
    assert!(sim.open_in(2, 0, Some(1)).is_some());
    assert!(sim.open_in(2, 1, Some(1)).is_some());
    sim.run();
    assert!(sim.converged(&[0, 1, 2]));
    assert_eq!(received_by(&sim, 2, from), 2_000);
    let left: u64 = sim.closed[from..]
        .iter()
        .map(|c| c.outcome.stats.wants_left)
        .sum();
    assert!(left > 0, "the second session found the same facts missing");
    // Ungrouped sessions (separate calls) each bring what they find missing.
    let mut sim = Sim::new(3, 12, config());
    sim.author(0, 500, 1);
    assert!(sim.open(0, 1).is_some());
    sim.run();
    let from = sim.closed.len();
    assert!(sim.open_in(2, 0, Some(1)).is_some());
    assert!(sim.open_in(2, 1, Some(2)).is_some());
    sim.run();
    assert!(sim.converged(&[0, 1, 2]));
    assert_eq!(received_by(&sim, 2, from), 1_000);
}

#[test]
fn a_round_session_that_fails_leaves_its_wants_to_the_next_round() {
    // Device 2 syncs with 0 and 1 as one round; 0 goes away mid-round, so what 2 left to
    // its session with 0 arrives in the next round.
    let mut sim = Sim::new(3, 13, config());
    sim.author(0, 3_000, 1);
    assert!(sim.open(0, 1).is_some());
    sim.run();
    let to_0 = sim.open_in(2, 0, Some(1)).unwrap();
    let to_1 = sim.open_in(2, 1, Some(1)).unwrap();
    // Cut 0 off as soon as 2 asked it for facts and left them to it in the other session.
    let stats = |sim: &Sim, id| {
        sim.devices[2]
            .manager
            .session(id)
            .map(|s| s.stats().clone())
    };
    loop {
        assert!(sim.step(), "the sessions ended before both asked");
        let (Some(a), Some(b)) = (stats(&sim, to_0), stats(&sim, to_1)) else {
            panic!("a session ended before both asked");
        };
        if a.wanted > 0 && b.wants_left > 0 {
            break;
        }
    }
    sim.devices[0].online = false;
    sim.blocked.insert((0, 2));
    sim.blocked.insert((2, 0));
    sim.run();
    assert!(!sim.converged(&[1, 2]));
    assert!(sim.open_in(2, 1, Some(2)).is_some());
    sim.run();
    assert!(sim.converged(&[1, 2]));
}
