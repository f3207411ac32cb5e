//! Snapshot ceremonies with real FROST keys from a real DKG, driven in process.

use rand::rngs::StdRng;
use rand::SeedableRng;
use tend_core::maintenance::{CacheInvalidated, SnapshotCompleted};
use tend_core::{Epoch, GroupKey, MaintenanceFact, Payload, UnsignedFact};
use tend_snapshot::*;

fn authority(n: usize, t: u16, seed: u64) -> InProcessAuthority {
    let mut rng = StdRng::seed_from_u64(seed);
    InProcessAuthority::create(n, t, &mut rng).expect("authority")
}

/// Some history on several devices, synced, then a target epoch above all of it.
fn with_history(auth: &mut InProcessAuthority) -> Epoch {
    for i in 0..auth.device_ids().len() {
        auth.append_application_facts(i, 3, true).unwrap();
    }
    auth.state(0).current_epoch().next()
}

/// An application fact by device `by` at `epoch`, put into every device's journal.
fn note_everywhere(auth: &mut InProcessAuthority, by: usize, epoch: Epoch, data: &[u8]) {
    let fact = UnsignedFact {
        namespace: auth.namespace(),
        epoch,
        payload: Payload::Application {
            kind: "note".into(),
            data: data.to_vec(),
        },
    }
    .sign(auth.device_key(by).signing_key());
    for i in 0..auth.device_ids().len() {
        auth.insert_fact(i, fact.clone()).unwrap();
    }
}

fn events_of(auth: &mut InProcessAuthority) -> Vec<CeremonyEvent> {
    auth.take_events().into_iter().map(|(_, e)| e).collect()
}

fn check_accepted(auth: &InProcessAuthority, c: &SnapshotCompleted) {
    let ns = auth.namespace();
    for i in 0..auth.device_ids().len() {
        let state = auth.state(i);
        let latest = state
            .latest_snapshot
            .as_ref()
            .expect("reducer accepted the snapshot");
        assert_eq!(latest.proposal_id, c.proposal_id);
        assert_eq!(latest.snapshot, c.snapshot);
        let key = state.membership().unwrap().group_key;
        assert!(key.verify(
            &c.snapshot.signing_message(&ns, &c.proposal_id),
            &c.threshold_signature
        ));
    }
}

/// Hydrates a fresh state from `c`'s blob, checked under `group_key`, plus device 0's
/// facts from the snapshot's epoch on, and checks that it is device 0's state.
fn hydrates_to_device_0(
    auth: &InProcessAuthority,
    c: &SnapshotCompleted,
    group_key: &GroupKey,
) -> Hydrated {
    let blob = auth.blob(&c.snapshot.blob_cid).unwrap().to_vec();
    let mut fresh = hydrate(&blob, c, auth.namespace(), group_key).expect("the blob hydrates");
    if let Some(r) = fresh.items_elsewhere {
        let items = auth
            .blob(&r.cid)
            .expect("the item blob is kept with the blob");
        fresh.attach_items(items).unwrap();
        assert!(fresh.items_elsewhere.is_none());
    }
    let tail: Vec<_> = auth
        .journal(0)
        .iter()
        .filter(|f| f.epoch() >= c.snapshot.epoch)
        .cloned()
        .collect();
    fresh.apply_tail(&tail).unwrap();
    assert_eq!(fresh.state_digest(), auth.state(0).state_digest());
    fresh
}

#[test]
fn two_of_three_and_three_of_five_complete_and_verify() {
    for (n, t, seed) in [(3, 2, 1), (5, 3, 2)] {
        let mut auth = authority(n, t, seed);
        let e = with_history(&mut auth);
        let c = auth.run_snapshot(e).unwrap();
        assert_eq!(c.snapshot.epoch, e);
        assert_eq!(c.snapshot.digest, auth.journal(0).prefix_digest(e));
        check_accepted(&auth, &c);
        // The blob the signature certifies is stored and hashes to the CID.
        let blob = auth.blob(&c.snapshot.blob_cid).unwrap();
        assert!(c.snapshot.blob_cid.matches(blob));
        let signed = events_of(&mut auth)
            .iter()
            .filter(|e| matches!(e, CeremonyEvent::Signed { .. }))
            .count();
        assert_eq!(signed, usize::from(t));
    }
}

#[test]
fn a_one_device_authority_signs_with_its_device_key() {
    let mut auth = authority(1, 1, 3);
    let e = with_history(&mut auth);
    let c = auth.run_snapshot(e).unwrap();
    check_accepted(&auth, &c);
}

#[test]
fn a_device_whose_prefix_differs_refuses_to_sign() {
    let mut auth = authority(3, 2, 4);
    let e = with_history(&mut auth);
    // Device 2 has a fact below E that nobody else has seen.
    auth.append_application_facts(2, 1, false).unwrap();
    let c = auth.run_snapshot(e).unwrap();
    let events = auth.take_events();
    let d2 = auth.device_ids()[2];
    assert!(events.iter().any(|(d, ev)| *d == d2
        && matches!(
            ev,
            CeremonyEvent::Refused {
                reason: Refusal::DigestMismatch { .. },
                ..
            }
        )));
    // Two honest devices are enough for 2-of-3.
    assert_eq!(c.snapshot.digest, auth.journal(0).prefix_digest(e));

    // With 3-of-3, the refusal makes the ceremony impossible and it aborts at once.
    let mut auth = authority(3, 3, 5);
    let e = with_history(&mut auth);
    auth.append_application_facts(1, 1, false).unwrap();
    let err = auth.run_snapshot(e).unwrap_err();
    let DriverError::NotCompleted(events) = err else {
        panic!("{err}")
    };
    assert!(events.iter().any(|ev| matches!(
        ev,
        CeremonyEvent::Aborted {
            reason: AbortReason::NotEnoughSigners { .. },
            ..
        }
    )));
    assert!(auth.state(0).latest_snapshot.is_none());
}

#[test]
fn fewer_than_t_shares_never_complete_and_time_out_harmlessly() {
    let mut auth = authority(5, 3, 6);
    let e = with_history(&mut auth);
    auth.set_online(3, false);
    auth.set_online(4, false);
    auth.set_online(2, false);
    assert!(auth.run_snapshot(e).is_err());
    // Nothing completes, however long we wait; the proposal then expires.
    auth.advance_time(120_000);
    let events = events_of(&mut auth);
    assert!(events.iter().any(|ev| matches!(
        ev,
        CeremonyEvent::Aborted {
            reason: AbortReason::TimedOut,
            ..
        }
    )));
    assert!(!events
        .iter()
        .any(|ev| matches!(ev, CeremonyEvent::Completed(_))));
    assert!(auth.state(0).latest_snapshot.is_none());
    let still_open = auth.state(0).proposals.len();
    assert_eq!(
        still_open, 1,
        "the expired proposal stays, harmless, until a snapshot"
    );

    // Back online, a new ceremony completes and clears the stale proposal.
    for i in 2..5 {
        auth.set_online(i, true);
    }
    auth.sync_all().unwrap();
    let c = auth.run_snapshot(e).unwrap();
    check_accepted(&auth, &c);
    assert!(auth.state(0).proposals.is_empty());
}

#[test]
fn forged_and_reused_signatures_are_rejected() {
    let mut auth = authority(3, 2, 7);
    let e1 = with_history(&mut auth);
    let c1 = auth.run_snapshot(e1).unwrap();
    let ns = auth.namespace();
    let admin = auth.device_key(0).signing_key().clone();

    let try_completion = |auth: &InProcessAuthority, c: SnapshotCompleted, epoch: Epoch| {
        let mut journal = auth.journal(0).clone();
        let before = tend_core::reduce(ns, journal.iter()).latest_snapshot;
        let f = UnsignedFact {
            namespace: ns,
            epoch,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)),
        }
        .sign(&admin);
        journal.insert(f.clone()).unwrap();
        let state = tend_core::reduce(ns, journal.iter());
        assert_eq!(
            state.latest_snapshot, before,
            "must not change the latest snapshot"
        );
        assert!(state.ignored.contains(&f.id()));
    };

    auth.append_application_facts(0, 2, true).unwrap();
    let e2 = auth.state(0).current_epoch().next();
    let at = auth.state(0).current_epoch();
    let mut forged = c1.clone();
    forged.snapshot.epoch = e2;
    forged.threshold_signature = [7; 64];
    try_completion(&auth, forged, at);

    // The real signature of proposal 1, replayed for another proposal id or epoch.
    let mut other_proposal = c1.clone();
    other_proposal.proposal_id = tend_core::Hash32([9; 32]);
    other_proposal.snapshot.epoch = e2;
    try_completion(&auth, other_proposal, at);
    let mut other_epoch = c1.clone();
    other_epoch.snapshot.epoch = e2;
    try_completion(&auth, other_epoch, at);

    // After a re-deal, a signature under the old key no longer counts, even for a
    // snapshot it really signed (replayed above the membership change).
    let c2 = auth.run_snapshot(e2).unwrap();
    let new_key = auth.run_dkg().unwrap();
    let after = auth.state(0).current_epoch().next();
    let mut replay = c2.clone();
    replay.snapshot.epoch = after;
    try_completion(&auth, replay, after);
    assert_ne!(
        Some(new_key),
        auth.state(0).memberships.first().map(|m| m.group_key)
    );

    // Hydration checks the signature too.
    let blob = auth.blob(&c1.snapshot.blob_cid).unwrap().to_vec();
    let old_key = auth.state(0).memberships[0].group_key;
    let mut bad = c1.clone();
    bad.threshold_signature[0] ^= 1;
    assert_eq!(
        hydrate(&blob, &bad, ns, &old_key).unwrap_err(),
        HydrateError::BadSignature
    );
    assert!(hydrate(&blob, &c1, ns, &new_key).is_err());
    assert!(hydrate(&blob, &c1, ns, &old_key).is_ok());
}

#[test]
fn identity_epoch_advance_mid_ceremony_aborts_and_retries_under_the_new_key() {
    let mut auth = authority(3, 2, 8);
    let e = with_history(&mut auth);
    let old_key = auth.state(0).membership().unwrap().group_key;
    auth.propose(0, e, 60_000);
    // Deliver a few messages: the sign requests and one commitment.
    for _ in 0..3 {
        auth.step();
    }
    let new_key = auth.run_dkg().unwrap();
    assert_ne!(old_key, new_key);
    auth.run_until_quiet();
    let events = events_of(&mut auth);
    let aborted = events
        .iter()
        .find_map(|ev| match ev {
            CeremonyEvent::Aborted {
                proposal_id,
                reason: AbortReason::EpochChanged { from, to },
            } => Some((*proposal_id, *from, *to)),
            _ => None,
        })
        .expect("the ceremony aborted");
    assert_eq!(aborted.1.identity_epoch, 0);
    assert_eq!(aborted.2.identity_epoch, 1);
    let retried = events
        .iter()
        .find_map(|ev| match ev {
            CeremonyEvent::Retried { old, new, epoch } => Some((*old, *new, *epoch)),
            _ => None,
        })
        .expect("the proposer retried");
    assert_eq!(retried.0, aborted.0);
    assert_eq!(retried.2.identity_epoch, 1);
    let completed = events
        .iter()
        .find_map(|ev| match ev {
            CeremonyEvent::Completed(c) => Some(c.clone()),
            _ => None,
        })
        .expect("the retry completed");
    assert_eq!(completed.proposal_id, retried.1);
    let ns = auth.namespace();
    let msg = completed
        .snapshot
        .signing_message(&ns, &completed.proposal_id);
    assert!(new_key.verify(&msg, &completed.threshold_signature));
    assert!(!old_key.verify(&msg, &completed.threshold_signature));
    check_accepted(&auth, &completed);
}

#[test]
fn a_retry_whose_prefix_grew_meanwhile_moves_past_the_signed_target() {
    let mut auth = authority(3, 2, 8);
    let e = with_history(&mut auth);
    let below = auth.state(1).current_epoch();
    auth.propose(0, e, 60_000);
    // The sign requests and a commitment: every member has voted for the first digest.
    for _ in 0..3 {
        auth.step();
    }
    // A member that missed the proposal wrote below its target meanwhile.
    note_everywhere(&mut auth, 1, below, b"late");
    auth.run_dkg().unwrap();
    auth.run_until_quiet();
    let completed = events_of(&mut auth)
        .into_iter()
        .find_map(|ev| match ev {
            CeremonyEvent::Completed(c) => Some(c),
            _ => None,
        })
        .expect("the retry completed");
    assert!(completed.snapshot.epoch > e, "{:?}", completed.snapshot);
    assert_eq!(
        completed.snapshot.digest,
        auth.journal(0).prefix_digest(completed.snapshot.epoch)
    );
    check_accepted(&auth, &completed);
}

#[test]
fn hydrating_from_the_blob_plus_tail_gives_the_same_state() {
    let mut auth = authority(5, 3, 9);
    let e = with_history(&mut auth);
    let c = auth.run_snapshot(e).unwrap();
    // A tail: application facts and a maintenance fact above E.
    auth.append_application_facts(3, 4, true).unwrap();
    let ns = auth.namespace();
    let epoch = auth.state(1).current_epoch();
    let inval = UnsignedFact {
        namespace: ns,
        epoch,
        payload: Payload::Maintenance(MaintenanceFact::CacheInvalidated(CacheInvalidated {
            keys: vec!["k".into()],
            epoch_floor: epoch,
        })),
    }
    .sign(auth.device_key(1).signing_key());
    for i in 0..5 {
        auth.insert_fact(i, inval.clone()).unwrap();
    }

    let full = auth.state(0);
    let completion_epoch = auth
        .journal(0)
        .iter()
        .find(|f| {
            matches!(
                f.payload(),
                Payload::Maintenance(MaintenanceFact::SnapshotCompleted(_))
            )
        })
        .unwrap()
        .epoch();
    let group_key = full.membership_at(completion_epoch).unwrap().group_key;
    let mut fresh = hydrates_to_device_0(&auth, &c, &group_key);
    assert_eq!(fresh.state, full);

    // Coverage: every prefix fact is covered; a new fact below E is late.
    let some_prefix = auth
        .journal(0)
        .iter()
        .find(|f| f.epoch() < e)
        .unwrap()
        .clone();
    assert_eq!(
        fresh.coverage(some_prefix.epoch(), &some_prefix.id()),
        Coverage::Covered
    );
    assert_eq!(fresh.apply(&some_prefix).unwrap(), Coverage::Covered);
    let late = UnsignedFact {
        namespace: ns,
        epoch: Epoch(0),
        payload: Payload::Application {
            kind: "late".into(),
            data: vec![1],
        },
    }
    .sign(auth.device_key(2).signing_key());
    assert_eq!(fresh.coverage(late.epoch(), &late.id()), Coverage::Late);
    let err = fresh.apply(&late).unwrap_err();
    assert!(matches!(
        err,
        HydrateError::Late(tend_core::JournalError::Late { .. })
    ));

    // A tampered blob is caught by its CID; a blob of a different snapshot too.
    let mut tampered = auth.blob(&c.snapshot.blob_cid).unwrap().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        hydrate(&tampered, &c, ns, &group_key).unwrap_err(),
        HydrateError::CidMismatch
    );
}

#[test]
fn ceremony_messages_round_trip_and_carry_proposal_and_epoch() {
    let mut auth = authority(3, 2, 10);
    let e = with_history(&mut auth);
    auth.propose(0, e, 1_000);
    // Malformed bytes are ignored with a reason, never a panic.
    let mut engine = SnapshotEngine::new(auth.device_ids()[1]);
    let journal = auth.journal(1).clone();
    let view = JournalView::new(&journal);
    let mut rng = StdRng::seed_from_u64(0);
    let out = engine.handle(
        std::time::Duration::ZERO,
        &view,
        CeremonyInput::Message {
            from: auth.device_ids()[0],
            bytes: b"\xff\x00".to_vec(),
        },
        &mut rng,
    );
    assert!(matches!(
        out.as_slice(),
        [CeremonyAction::Event(CeremonyEvent::Ignored { .. })]
    ));
    let blob = SnapshotBlob::from_journal(auth.journal(0), e);
    let decoded = SnapshotBlob::decode(&blob.encode()).unwrap();
    // The items are in the item blob, not in the snapshot blob's bytes.
    assert!(decoded.items.is_empty());
    assert_eq!(
        SnapshotBlob {
            items: blob.items.clone(),
            ..decoded.clone()
        },
        blob
    );
    assert_eq!(decoded.prefix_digest(), auth.journal(0).prefix_digest(e));
}

#[test]
fn a_second_snapshot_chains_on_the_first_and_hydrates() {
    let mut auth = authority(3, 2, 21);
    let e1 = with_history(&mut auth);
    let first = auth.run_snapshot(e1).unwrap();
    let e2 = with_history(&mut auth);
    let second = auth.run_snapshot(e2).unwrap();
    check_accepted(&auth, &second);

    // The second digest covers only facts from E1 on, chained on the first snapshot.
    let base = tend_core::SnapshotBase {
        epoch: e1,
        digest: first.snapshot.digest,
    };
    assert_eq!(
        second.snapshot.digest,
        auth.journal(0).chained_prefix_digest(e2, Some(base))
    );
    assert_ne!(second.snapshot.digest, auth.journal(0).prefix_digest(e2));

    let blob_bytes = auth.blob(&second.snapshot.blob_cid).unwrap().to_vec();
    let blob = SnapshotBlob::decode(&blob_bytes).unwrap();
    assert_eq!(blob.base, Some(base));
    let item_ref = blob.item_ref.expect("a version 3 blob names its item blob");
    let items_bytes = auth
        .blob(&item_ref.cid)
        .expect("kept with the snapshot blob");
    let items = tend_snapshot::blob::read_item_blob(
        items_bytes,
        auth.namespace(),
        e2,
        blob.base,
        &item_ref,
    )
    .unwrap();
    assert_eq!(items.len() as u64, item_ref.count);
    assert!(items.iter().all(|(e, _)| *e >= e1 && *e < e2));

    let full = auth.state(0);
    let completion_epoch = auth
        .journal(0)
        .iter()
        .filter(|f| {
            matches!(
                f.payload(),
                Payload::Maintenance(MaintenanceFact::SnapshotCompleted(_))
            )
        })
        .last()
        .unwrap()
        .epoch();
    let group_key = full.membership_at(completion_epoch).unwrap().group_key;
    hydrates_to_device_0(&auth, &second, &group_key);
    // The first snapshot's blob is superseded: its tombstone lets GC reclaim it once a
    // later snapshot covers the tombstone, so blob storage stays bounded.
    for i in 0..3 {
        assert!(auth
            .state(i)
            .tombstones
            .contains_key(&first.snapshot.blob_cid));
        assert!(!auth
            .state(i)
            .tombstones
            .contains_key(&second.snapshot.blob_cid));
    }
}

/// Regression (tend-sim seeds 234 and 247): when the first completion fact lies above the
/// first snapshot's epoch, a second snapshot targeting at or below that completion would
/// chain its digest on the first snapshot while its blob, built from the prefix's facts,
/// would not see the completion and carry no base: the signed blob never hydrated. Such a
/// target is now refused as stale, and one above the completion hydrates.
#[test]
fn a_target_at_or_below_the_last_completion_is_stale_and_one_above_hydrates() {
    let mut auth = authority(3, 2, 33);
    let e1 = with_history(&mut auth);
    // A fact two epochs above the target, on every device: the proposal and completion
    // are stamped at the current epoch, above E1.
    note_everywhere(&mut auth, 0, Epoch(e1.0 + 2), b"high");
    auth.run_snapshot(e1).unwrap();
    let completed_at = auth.state(0).latest_snapshot.unwrap().completed_at;
    assert!(completed_at > e1);

    let err = auth.run_snapshot(Epoch(e1.0 + 1)).unwrap_err();
    let DriverError::NotCompleted(events) = err else {
        panic!("unexpected error {err}");
    };
    assert!(events.iter().any(|e| matches!(
        e,
        CeremonyEvent::ProposalRejected {
            reason: Refusal::Stale,
            ..
        }
    )));

    let e2 = completed_at.next();
    let second = auth.run_snapshot(e2).unwrap();
    let group_key = auth.state(0).membership().unwrap().group_key;
    hydrates_to_device_0(&auth, &second, &group_key);
}

/// Regression (tend-sim seed 1447): a member signs at most one digest per target epoch.
/// Device 1 commits to proposal A at E; then it learns a fact below E and is asked to
/// sign proposal B at the same E, whose digest now matches its own. Before the fix it
/// committed to both, so two different snapshots could complete at one epoch.
#[test]
fn a_member_signs_at_most_one_digest_per_target_epoch() {
    let mut auth = authority(3, 3, 77);
    let e = with_history(&mut auth);
    auth.set_online(2, false);
    auth.propose(0, e, 60_000);
    auth.run_until_quiet();
    let d1 = auth.device_ids()[1];
    auth.take_events();

    let extra = UnsignedFact {
        namespace: auth.namespace(),
        epoch: Epoch(e.0 - 1),
        payload: Payload::Application {
            kind: "note".into(),
            data: b"learned between the proposals".to_vec(),
        },
    }
    .sign(auth.device_key(2).signing_key());
    auth.set_online(2, true);
    auth.insert_fact(1, extra.clone()).unwrap();
    auth.insert_fact(2, extra).unwrap();
    auth.propose(2, e, 60_000);
    auth.run_until_quiet();
    let events = auth.take_events();
    assert!(
        events.iter().any(|(d, ev)| *d == d1
            && matches!(
                ev,
                CeremonyEvent::Refused {
                    reason: Refusal::AlreadySigned { .. },
                    ..
                }
            )),
        "device 1 must refuse a second digest for epoch {e}: {events:?}"
    );
    assert_eq!(auth.state(1).latest_snapshot, None);
}

/// A member told that a proposal it answered completed, whose journal lacks the
/// completion, is asked to fetch it from the coordinator (which wrote it before telling);
/// one that holds it already, or is told of an abort, is not.
#[test]
fn members_lacking_the_completion_are_told_to_fetch_it_from_the_coordinator() {
    for auto_sync in [false, true] {
        let mut auth = authority(5, 3, 41);
        let e = with_history(&mut auth);
        auth.auto_sync = auto_sync;
        let c = auth.run_snapshot(e).unwrap();
        let ids = auth.device_ids();
        let coordinator = ids[0];
        let mut told: Vec<_> = auth
            .take_events()
            .into_iter()
            .filter_map(|(d, e)| match e {
                CeremonyEvent::CompletionAnnounced {
                    proposal_id,
                    coordinator: from,
                } => {
                    assert_eq!((proposal_id, from), (c.proposal_id, coordinator));
                    Some(d)
                }
                _ => None,
            })
            .collect();
        told.sort();
        if auto_sync {
            assert!(
                told.is_empty(),
                "every member holds the completion: {told:?}"
            );
        } else {
            let mut members = ids[1..].to_vec();
            members.sort();
            assert_eq!(told, members, "every other member answered the request");
            // Only the coordinator's journal has it, and it had it before saying so.
            assert!(auth.state(0).latest_snapshot.is_some());
            assert!((1..5).all(|i| auth.state(i).latest_snapshot.is_none()));
        }
    }

    // An aborted proposal (3-of-3 with one refusal) announces nothing.
    let mut auth = authority(3, 3, 42);
    let e = with_history(&mut auth);
    auth.auto_sync = false;
    auth.append_application_facts(1, 1, false).unwrap();
    assert!(auth.run_snapshot(e).is_err());
    assert!(!events_of(&mut auth)
        .iter()
        .any(|e| matches!(e, CeremonyEvent::CompletionAnnounced { .. })));
}
