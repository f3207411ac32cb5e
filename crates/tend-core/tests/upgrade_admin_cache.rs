//! Rules of upgrades, admin replacement and cache floors over `tend_core::reduce`: retired
//! admins, certified replacements, cache floors, fences and staged-rollout cohorts.

use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey, MembershipChange};
use tend_core::maintenance::{
    cohort_of, AdminReplacement, CacheInvalidated, CertifiedAdminReplacement, MaintenanceFact,
    UpgradeActivated, UpgradeMetadata, UpgradeReady,
};
use tend_core::upgrade::FenceSide;
use tend_core::{
    reduce, DeviceId, Epoch, Hash32, JournalNamespace, MaintenanceState, Payload, ProtocolVersion,
    UnsignedFact, VerifiedFact,
};

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn device(i: u8) -> DeviceId {
    DeviceId(key(i).verifying_key().to_bytes())
}

/// The key standing in for the authority's threshold group key.
fn group_key() -> SigningKey {
    SigningKey::from_bytes(&[77; 32])
}

/// An authority of devices 0..3, admin device 0, and its genesis.
fn authority() -> (JournalNamespace, VerifiedFact) {
    let mut members: Vec<DeviceId> = (0..3).map(device).collect();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [5; 32],
        members,
        threshold: 2,
        group_key: GroupKey(group_key().verifying_key().to_bytes()),
        admin: device(0),
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let fact = UnsignedFact {
        namespace: ns,
        epoch: Epoch(0),
        payload: Payload::Authority(AuthorityFact::Genesis(genesis)),
    }
    .sign(&key(0));
    (ns, fact)
}

fn write(ns: JournalNamespace, author: u8, epoch: u64, m: MaintenanceFact) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Maintenance(m),
    }
    .sign(&key(author))
}

fn v(minor: u16) -> ProtocolVersion {
    ProtocolVersion {
        major: 1,
        minor,
        patch: 0,
    }
}

fn package(p: u8, fence: Option<u64>) -> UpgradeMetadata {
    UpgradeMetadata {
        package_id: Hash32([p; 32]),
        version: v(p.into()),
        artifact_hash: Hash32([p; 32]),
        artifact_size: 1,
        fence: fence.map(Epoch),
        cohort_percent: 100,
    }
}

/// An admin operation of kind `k` (by whoever signs it) at `epoch`.
fn admin_op(ns: JournalNamespace, author: u8, epoch: u64, k: u8, n: u8) -> VerifiedFact {
    match k % 4 {
        0 => write(
            ns,
            author,
            epoch,
            MaintenanceFact::UpgradePublished(package(100 + n, None)),
        ),
        1 => write(
            ns,
            author,
            epoch,
            MaintenanceFact::UpgradeActivated(UpgradeActivated {
                package_id: Hash32([1; 32]),
                to_version: v(1),
                activation_fence: None,
            }),
        ),
        2 => write(
            ns,
            author,
            epoch,
            MaintenanceFact::AdminReplacement(AdminReplacement {
                old_admin: device(author),
                new_admin: device(2),
                activation_epoch: Epoch(epoch + 1),
            }),
        ),
        _ => {
            let mut members: Vec<DeviceId> = (0..3).map(device).collect();
            members.sort();
            UnsignedFact {
                namespace: ns,
                epoch: Epoch(epoch),
                payload: Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
                    identity_epoch: 1,
                    members,
                    threshold: 3,
                    group_key: GroupKey(device(author).0),
                })),
            }
            .sign(&key(author))
        }
    }
}

/// What admin operations change: everything but the list of ignored facts and the
/// highest epoch seen.
fn effects(s: &MaintenanceState) -> impl PartialEq + std::fmt::Debug {
    (
        s.memberships.clone(),
        s.replacements.clone(),
        s.upgrades.clone(),
        s.cache_floors.clone(),
        s.device_metadata.clone(),
        s.admin_at(Epoch(1000)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Rule 8: after `AdminReplacement { 0 -> 1, at E }`, admin operations by device 0 at
    /// epochs >= E change nothing, whatever the arrival order; before E they count.
    #[test]
    fn retired_admin_operations_are_ignored_in_every_order(
        activation in 3u64..8,
        retired in prop::collection::vec((0u64..4, 0u8..4), 1..6),
        early in prop::collection::vec((1u64..3, 0u8..4), 0..4),
        seed in any::<u64>(),
    ) {
        let (ns, genesis) = authority();
        // Package 1 exists so an activation by the retired admin has something to act on.
        let publish = write(ns, 0, 1, MaintenanceFact::UpgradePublished(package(1, None)));
        let replacement = write(ns, 0, 2, MaintenanceFact::AdminReplacement(AdminReplacement {
            old_admin: device(0),
            new_admin: device(1),
            activation_epoch: Epoch(activation),
        }));
        let base = vec![genesis, publish, replacement];
        let retired: Vec<VerifiedFact> = retired
            .iter()
            .enumerate()
            .map(|(n, (de, k))| admin_op(ns, 0, activation + de, *k, n as u8))
            .collect();
        let mut all = base.clone();
        all.extend(retired.iter().cloned());

        let reference = reduce(ns, &all);
        prop_assert_eq!(effects(&reference), effects(&reduce(ns, &base)));
        for f in &retired {
            prop_assert!(reference.ignored.contains(&f.id()), "kept as evidence, ignored");
        }
        prop_assert_eq!(reference.admin_at(Epoch(activation)), Some(device(1)));

        // Every arrival order gives the same state.
        let mut shuffled = all.clone();
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(&reduce(ns, &shuffled), &reference);

        // Before the activation epoch the old admin is still in charge: its operations count.
        let early: Vec<VerifiedFact> = early
            .iter()
            .enumerate()
            .map(|(n, (e, _))| admin_op(ns, 0, *e, 0, 50 + n as u8))
            .collect();
        let mut with_early = all.clone();
        with_early.extend(early.iter().cloned());
        let s = reduce(ns, &with_early);
        for f in &early {
            prop_assert!(!s.ignored.contains(&f.id()));
        }
        prop_assert_eq!(s.upgrades.len(), reference.upgrades.len() + early.len());
    }

    /// Rule 6: a key's floor is the highest floor ever published for it, whatever the
    /// order; an entry cached at `e` is valid only when `e` exceeds it; a late, older
    /// invalidation never lowers a floor.
    #[test]
    fn cache_floors_only_rise(
        invalidations in prop::collection::vec((0u8..3, 0u64..20, 1u64..20), 1..12),
        seed in any::<u64>(),
        probe in 0u64..25,
    ) {
        let (ns, genesis) = authority();
        let facts: Vec<VerifiedFact> = invalidations
            .iter()
            .map(|(k, floor, at)| write(ns, 1, *at, MaintenanceFact::CacheInvalidated(
                CacheInvalidated { keys: vec![format!("k{k}")], epoch_floor: Epoch(*floor) },
            )))
            .collect();
        let mut arrival = facts.clone();
        let mut rng = seed;
        for i in (1..arrival.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            arrival.swap(i, (rng >> 33) as usize % (i + 1));
        }
        // Arrival one fact at a time: floors never go down.
        let mut seen = vec![genesis.clone()];
        let mut last = std::collections::BTreeMap::new();
        for f in &arrival {
            seen.push(f.clone());
            let s = reduce(ns, &seen);
            for (k, floor) in &last {
                prop_assert!(s.cache_floors[k] >= *floor);
            }
            last = s.cache_floors.clone();
        }
        let s = reduce(ns, &seen);
        for k in 0..3u8 {
            let key = format!("k{k}");
            let max = invalidations.iter().filter(|(kk, _, _)| *kk == k).map(|(_, f, _)| *f).max();
            prop_assert_eq!(s.cache_floors.get(&key).map(|e| e.0), max);
            let expect = max.is_none_or(|m| probe > m);
            prop_assert_eq!(s.cache_valid(&key, Epoch(probe)), expect);
        }
    }
}

#[test]
fn certified_replacement_replaces_an_unavailable_admin() {
    let (ns, genesis) = authority();
    let r = AdminReplacement {
        old_admin: device(0),
        new_admin: device(1),
        activation_epoch: Epoch(4),
    };
    let sig = group_key().sign(&r.signing_message(&ns)).to_bytes();
    // Written by device 2, a plain member: the threshold signature is what counts.
    let certified = write(
        ns,
        2,
        2,
        MaintenanceFact::CertifiedAdminReplacement(CertifiedAdminReplacement {
            replacement: r.clone(),
            threshold_signature: sig,
        }),
    );
    let forged = write(
        ns,
        2,
        2,
        MaintenanceFact::CertifiedAdminReplacement(CertifiedAdminReplacement {
            replacement: AdminReplacement {
                new_admin: device(2),
                ..r.clone()
            },
            threshold_signature: sig,
        }),
    );
    let s = reduce(ns, [&genesis, &certified, &forged]);
    assert_eq!(s.admin_at(Epoch(3)), Some(device(0)));
    assert_eq!(s.admin_at(Epoch(4)), Some(device(1)));
    assert!(s.ignored.contains(&forged.id()));
    assert!(s.replacements[0].certified);

    // A signature for another authority does not carry over.
    let other_ns = JournalNamespace::Authority(tend_core::AuthorityId([1; 32]));
    let replayed = CertifiedAdminReplacement {
        replacement: r.clone(),
        threshold_signature: group_key().sign(&r.signing_message(&other_ns)).to_bytes(),
    };
    let replayed = write(
        ns,
        2,
        2,
        MaintenanceFact::CertifiedAdminReplacement(replayed),
    );
    let s = reduce(ns, [&genesis, &replayed]);
    assert_eq!(s.admin_at(Epoch(10)), Some(device(0)));
}

#[test]
fn the_authority_overrides_a_pending_self_replacement_but_not_an_active_one() {
    let (ns, genesis) = authority();
    // The admin hands itself over to device 2 from epoch 10...
    let own = write(
        ns,
        0,
        2,
        MaintenanceFact::AdminReplacement(AdminReplacement {
            old_admin: device(0),
            new_admin: device(2),
            activation_epoch: Epoch(10),
        }),
    );
    let certify = |at: u64, activation: u64| {
        let r = AdminReplacement {
            old_admin: device(0),
            new_admin: device(1),
            activation_epoch: Epoch(activation),
        };
        let sig = group_key().sign(&r.signing_message(&ns)).to_bytes();
        write(
            ns,
            1,
            at,
            MaintenanceFact::CertifiedAdminReplacement(CertifiedAdminReplacement {
                replacement: r,
                threshold_signature: sig,
            }),
        )
    };
    // ...but a quorum replaces it with device 1 before that takes effect.
    let quorum = certify(5, 6);
    let s = reduce(ns, [&genesis, &own, &quorum]);
    assert_eq!(s.admin_at(Epoch(20)), Some(device(1)));
    assert!(s.ignored.contains(&own.id()));
    // Once device 2 is in charge, a certified replacement of device 0 is moot.
    let late = certify(11, 12);
    let s = reduce(ns, [&genesis, &own, &late]);
    assert_eq!(s.admin_at(Epoch(20)), Some(device(2)));
    assert!(s.ignored.contains(&late.id()));
    // A replacement must be scheduled strictly after its own epoch.
    let immediate = write(
        ns,
        0,
        3,
        MaintenanceFact::AdminReplacement(AdminReplacement {
            old_admin: device(0),
            new_admin: device(1),
            activation_epoch: Epoch(3),
        }),
    );
    let s = reduce(ns, [&genesis, &immediate]);
    assert!(s.ignored.contains(&immediate.id()));
}

#[test]
fn fences_refuse_old_versions_from_the_fence_epoch_on() {
    let (ns, genesis) = authority();
    let publish = write(
        ns,
        0,
        1,
        MaintenanceFact::UpgradePublished(package(2, Some(5))),
    );
    // Readiness at the publication's own epoch does not count: the fold could meet it first.
    let early_ready = write(
        ns,
        1,
        1,
        MaintenanceFact::UpgradeReady(UpgradeReady {
            package_id: Hash32([2; 32]),
            version: v(2),
        }),
    );
    let ready = write(
        ns,
        1,
        2,
        MaintenanceFact::UpgradeReady(UpgradeReady {
            package_id: Hash32([2; 32]),
            version: v(2),
        }),
    );
    let activate = |fence: Option<u64>| {
        write(
            ns,
            0,
            3,
            MaintenanceFact::UpgradeActivated(UpgradeActivated {
                package_id: Hash32([2; 32]),
                to_version: v(2),
                activation_fence: fence.map(Epoch),
            }),
        )
    };
    // An activation whose fence differs from the published one is ignored.
    let wrong = activate(None);
    let s = reduce(ns, [&genesis, &publish, &early_ready, &ready, &wrong]);
    assert!(s.ignored.contains(&early_ready.id()));
    assert!(s.ignored.contains(&wrong.id()));
    assert!(s.fence_check(Epoch(9), v(0)).is_ok());

    let s = reduce(ns, [&genesis, &publish, &ready, &activate(Some(5))]);
    assert_eq!(s.package_fact_epoch(&Hash32([2; 32])), Some(Epoch(3)));
    // Grace period below the fence; from it on, only version 1.2 or newer.
    assert!(s.fence_check(Epoch(4), v(0)).is_ok());
    let refusal = s.fence_check(Epoch(5), v(0)).unwrap_err();
    assert_eq!(refusal.side, FenceSide::Local);
    let text = refusal.to_string();
    assert!(
        text.contains("version 1.2.0 mandatory from epoch 5")
            && text.contains("runs version 1.0.0"),
        "{text}"
    );
    assert!(s.fence_check(Epoch(5), v(2)).is_ok());
    assert!(!s.fence_satisfied(Epoch(6), v(1)));
    let peer = s.fence_check_peer(Epoch(6), v(1)).unwrap_err();
    assert!(peer.to_string().contains("the peer runs version 1.1.0"));
}

#[test]
fn cohorts_are_deterministic_and_roughly_proportional() {
    let package_id = Hash32([42; 32]);
    let devices: Vec<DeviceId> = (0..10_000u32)
        .map(|i| DeviceId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    for pct in [0u8, 10, 25, 50, 90, 100] {
        let meta = UpgradeMetadata {
            cohort_percent: pct,
            ..package(1, None)
        };
        let meta = UpgradeMetadata { package_id, ..meta };
        let n = devices.iter().filter(|d| meta.includes(d)).count();
        let expected = devices.len() * usize::from(pct) / 100;
        // 2 percentage points is over 4 standard deviations at 10 000 devices.
        assert!(n.abs_diff(expected) <= 200, "{pct}%: {n} of 10000");
        if pct == 0 {
            assert_eq!(n, 0);
        }
        if pct == 100 {
            assert_eq!(n, devices.len());
        }
    }
    // The same inputs give the same cohort everywhere; a larger rollout keeps the smaller.
    for d in &devices[..100] {
        assert_eq!(cohort_of(&package_id, d), cohort_of(&package_id, d));
        assert!(cohort_of(&package_id, d) < 100);
    }
    let other = Hash32([43; 32]);
    let differs = devices[..100]
        .iter()
        .filter(|d| cohort_of(&package_id, d) != cohort_of(&other, d))
        .count();
    assert!(differs > 80, "each package draws its own cohorts");
}
