//! Staged rollouts that widen (`UpgradeWidened`) and activations gated on readiness
//! (`UpgradeActivatedWhenReady`) over `tend_core::reduce`: a rollout never narrows, every
//! device already in stays in, an activation counts only once enough members are ready,
//! and the result is the same in any order.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey};
use tend_core::maintenance::{
    MaintenanceFact, UpgradeActivated, UpgradeActivatedWhenReady, UpgradeMetadata, UpgradeReady,
    UpgradeWidened,
};
use tend_core::{
    reduce, DeviceId, Epoch, Hash32, JournalNamespace, Payload, ProtocolVersion, UnsignedFact,
    VerifiedFact,
};

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn device(i: u8) -> DeviceId {
    DeviceId(key(i).verifying_key().to_bytes())
}

/// An authority of devices 0..3 whose admin is device 0, and its genesis.
fn authority() -> (JournalNamespace, VerifiedFact) {
    let mut members: Vec<DeviceId> = (0..3).map(device).collect();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [9; 32],
        members,
        threshold: 2,
        group_key: GroupKey(SigningKey::from_bytes(&[77; 32]).verifying_key().to_bytes()),
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

const PACKAGE: Hash32 = Hash32([42; 32]);

fn published(ns: JournalNamespace, percent: u8) -> VerifiedFact {
    write(
        ns,
        0,
        1,
        MaintenanceFact::UpgradePublished(UpgradeMetadata {
            package_id: PACKAGE,
            version: ProtocolVersion {
                major: 1,
                minor: 1,
                patch: 0,
            },
            artifact_hash: Hash32([1; 32]),
            artifact_size: 1,
            fence: None,
            cohort_percent: percent,
        }),
    )
}

fn widen(ns: JournalNamespace, author: u8, epoch: u64, percent: u8) -> VerifiedFact {
    write(
        ns,
        author,
        epoch,
        MaintenanceFact::UpgradeWidened(UpgradeWidened {
            package_id: PACKAGE,
            cohort_percent: percent,
        }),
    )
}

const V11: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 1,
    patch: 0,
};

fn ready(ns: JournalNamespace, author: u8, epoch: u64) -> VerifiedFact {
    write(
        ns,
        author,
        epoch,
        MaintenanceFact::UpgradeReady(UpgradeReady {
            package_id: PACKAGE,
            version: V11,
        }),
    )
}

fn activation() -> UpgradeActivated {
    UpgradeActivated {
        package_id: PACKAGE,
        to_version: V11,
        activation_fence: None,
    }
}

fn activate_when(ns: JournalNamespace, epoch: u64, min_ready: u16) -> VerifiedFact {
    write(
        ns,
        0,
        epoch,
        MaintenanceFact::UpgradeActivatedWhenReady(UpgradeActivatedWhenReady {
            activation: activation(),
            min_ready,
        }),
    )
}

fn fleet() -> Vec<DeviceId> {
    (0..2_000u32)
        .map(|i| DeviceId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect()
}

fn in_rollout(facts: &[VerifiedFact], ns: JournalNamespace, devices: &[DeviceId]) -> Vec<DeviceId> {
    let s = reduce(ns, facts);
    let u = &s.upgrades[&PACKAGE];
    devices
        .iter()
        .filter(|d| u.metadata.includes(d))
        .copied()
        .collect()
}

#[test]
fn widening_from_20_to_50_percent_keeps_every_device_in_and_adds_more() {
    let (ns, genesis) = authority();
    let devices = fleet();
    let at_20 = vec![genesis.clone(), published(ns, 20)];
    let at_50 = [at_20.clone(), vec![widen(ns, 0, 2, 50)]].concat();
    let before = in_rollout(&at_20, ns, &devices);
    let after = in_rollout(&at_50, ns, &devices);
    assert!(before.len() > 300 && before.len() < 500, "{}", before.len());
    assert!(before.iter().all(|d| after.contains(d)), "a device left");
    assert!(
        after.len() > before.len() + 400,
        "{} -> {}",
        before.len(),
        after.len()
    );
    assert_eq!(
        reduce(ns, &at_50).upgrades[&PACKAGE]
            .metadata
            .cohort_percent,
        50
    );
}

#[test]
fn a_rollout_never_narrows_and_only_the_admin_widens() {
    let (ns, genesis) = authority();
    let facts = vec![
        genesis,
        published(ns, 20),
        widen(ns, 0, 3, 60),
        // A later, smaller percent does not narrow.
        widen(ns, 0, 4, 30),
        // Not the admin: kept as evidence, ignored.
        widen(ns, 1, 5, 90),
        // Above 100 %: malformed.
        widen(ns, 0, 5, 101),
        // Not above the publication's epoch.
        widen(ns, 0, 1, 80),
    ];
    let s = reduce(ns, &facts);
    assert_eq!(s.upgrades[&PACKAGE].metadata.cohort_percent, 60);
    for ignored in &facts[4..] {
        assert!(s.ignored.contains(&ignored.id()), "{:?}", ignored.payload());
    }
    assert!(!s.ignored.contains(&facts[3].id()));
}

#[test]
fn an_activation_counts_only_once_the_journal_holds_enough_ready_members() {
    let (ns, genesis) = authority();
    let base = vec![genesis, published(ns, 100)];
    let gated = activate_when(ns, 3, 2);
    // One ready member of the two required: the activation waits, it does not count.
    let early = [base.clone(), vec![ready(ns, 1, 2), gated.clone()]].concat();
    let s = reduce(ns, &early);
    let u = &s.upgrades[&PACKAGE];
    assert_eq!(u.activated, None);
    assert!(u.pending_activations.contains_key(&gated.id()));
    assert!(!s.ignored.contains(&gated.id()));
    // The second ready member, even sorting after the activation, makes it count.
    let met = [early, vec![ready(ns, 2, 3)]].concat();
    let s = reduce(ns, &met);
    assert_eq!(s.upgrades[&PACKAGE].activated, Some(activation()));
    assert!(s.upgrades[&PACKAGE].pending_activations.is_empty());
    // A bare activation (older releases) needs one ready member: with none it does not
    // count, whatever the admin wrote.
    let bare = write(ns, 0, 2, MaintenanceFact::UpgradeActivated(activation()));
    let s = reduce(ns, [&base[0], &base[1], &bare]);
    assert_eq!(s.upgrades[&PACKAGE].activated, None);
    let s = reduce(ns, [&base[0], &base[1], &bare, &ready(ns, 1, 4)]);
    assert_eq!(s.upgrades[&PACKAGE].activated, Some(activation()));
    // The same member twice is one ready member.
    let twice = [base, vec![ready(ns, 1, 2), ready(ns, 1, 3), gated]].concat();
    assert_eq!(reduce(ns, &twice).upgrades[&PACKAGE].activated, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The reducer keeps the highest valid percent whatever the order of arrival, each
    /// arrival only adds devices to the rollout, and the final state is the same.
    #[test]
    fn widening_is_order_independent_and_monotone(
        initial in 0u8..=100,
        widenings in prop::collection::vec((0u8..2, 1u64..6, 0u8..=110), 0..8),
        seed in any::<u64>(),
    ) {
        let (ns, genesis) = authority();
        let devices = &fleet()[..300];
        let facts: Vec<VerifiedFact> = widenings
            .iter()
            .map(|(author, epoch, pct)| widen(ns, *author, *epoch, *pct))
            .collect();
        let expected = widenings
            .iter()
            .filter(|(author, epoch, pct)| *author == 0 && *epoch > 1 && *pct <= 100)
            .map(|(_, _, pct)| *pct)
            .fold(initial, u8::max);
        let mut arrival = facts.clone();
        let mut rng = seed;
        for i in (1..arrival.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            arrival.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let mut seen = vec![genesis.clone(), published(ns, initial)];
        let mut last = in_rollout(&seen, ns, devices);
        for f in arrival {
            seen.push(f);
            let now = in_rollout(&seen, ns, devices);
            prop_assert!(last.iter().all(|d| now.contains(d)), "a device left the rollout");
            last = now;
        }
        let in_order = [vec![genesis, published(ns, initial)], facts].concat();
        let (a, b) = (reduce(ns, &seen), reduce(ns, &in_order));
        prop_assert_eq!(a.upgrades[&PACKAGE].metadata.cohort_percent, expected);
        prop_assert_eq!(a.state_digest(), b.state_digest());
    }

    /// Whatever the order, an activation counts exactly when some activation's figure is
    /// met by the distinct members whose readiness counts (above the publication), and the
    /// state is the same.
    #[test]
    fn readiness_gating_is_order_independent(
        readies in prop::collection::vec((0u8..3, 1u64..6), 0..6),
        activations in prop::collection::vec((1u64..6, 0u16..4), 1..4),
        seed in any::<u64>(),
    ) {
        let (ns, genesis) = authority();
        let mut facts: Vec<VerifiedFact> = readies.iter().map(|(a, e)| ready(ns, *a, *e)).collect();
        facts.extend(activations.iter().map(|(e, min)| activate_when(ns, *e, *min)));
        let ready_members: std::collections::BTreeSet<u8> = readies
            .iter()
            .filter(|(_, e)| *e > 1)
            .map(|(a, _)| *a)
            .collect();
        let expect = activations
            .iter()
            .any(|(e, min)| *e > 1 && ready_members.len() >= usize::from((*min).max(1)));
        let mut arrival = facts.clone();
        let mut rng = seed;
        for i in (1..arrival.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            arrival.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let base = vec![genesis, published(ns, 100)];
        let a = reduce(ns, &[base.clone(), arrival].concat());
        let b = reduce(ns, &[base, facts].concat());
        prop_assert_eq!(a.upgrades[&PACKAGE].activated.is_some(), expect);
        prop_assert_eq!(a.state_digest(), b.state_digest());
        prop_assert_eq!(&a, &b);
    }
}
