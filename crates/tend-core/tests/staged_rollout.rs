//! Staged rollouts that widen (`UpgradeWidened`) over `tend_core::reduce`: a rollout never
//! narrows, every device already in stays in, and the result is the same in any order.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey};
use tend_core::maintenance::{MaintenanceFact, UpgradeMetadata, UpgradeWidened};
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
}
