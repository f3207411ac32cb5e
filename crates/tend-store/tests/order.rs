//! Property: the same facts, inserted in any order and batching, give the same journal
//! digests, maintenance states and statistics.

mod common;

use common::*;
use proptest::prelude::*;
use tend_core::{reduce, JournalNamespace, VerifiedFact};
use tend_store::Store;

fn fact(spec: &(u8, u64, u8, u8), auth: JournalNamespace) -> VerifiedFact {
    let (which, epoch, kind, b) = *spec;
    let ns = if which == 0 { auth } else { context(which) };
    let k = key(1 + (b % 2)); // key(2) is a member from epoch 1 on (see below)
    let k = if which == 0 && epoch <= 1 { key(1) } else { k };
    match kind {
        0 => cache_invalidated(ns, epoch, &k, &format!("key{}", b % 3), u64::from(b)),
        1 => tombstone(ns, epoch, &k, tend_core::ContentId::of_raw(&[b])),
        2 => app(ns, epoch, &k, &[b, kind]),
        _ => app_timed(ns, epoch, &k, &[b, kind], u64::from(b) * 1_000),
    }
}

fn load(batches: &[Vec<VerifiedFact>]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(dir.path().join("s.redb")).unwrap();
    for b in batches {
        let r = s.insert_batch(b).unwrap();
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    }
    (dir, s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn order_and_batching_do_not_matter(
        specs in prop::collection::vec((0u8..3, 2u64..12, 0u8..4, any::<u8>()), 1..40),
        seed in any::<u64>(),
        cuts in prop::collection::vec(1usize..8, 1..10),
    ) {
        let admin = key(1);
        let (auth, genesis) = authority(&admin);
        // The authority's genesis and a membership change adding key(2) from epoch 2 on come
        // first; everything else in any order.
        let head = vec![genesis, membership(auth, &admin, 1, 1, &[&admin, &key(2)])];
        let facts: Vec<VerifiedFact> = specs.iter().map(|s| fact(s, auth)).collect();

        let mut one = head.clone();
        one.extend(facts.iter().cloned());
        let (_d1, reference) = load(&[one.clone()]);

        // A seeded shuffle, cut into batches of the given sizes (with repeats).
        let mut shuffled = facts.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut batches = vec![head.clone()];
        let mut rest = &shuffled[..];
        for c in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            let (b, r) = rest.split_at((*c).min(rest.len()));
            let mut b = b.to_vec();
            b.extend(b.first().cloned()); // a duplicate inside the batch
            batches.push(b);
            rest = r;
        }
        batches.push(facts[..facts.len() / 2].to_vec()); // re-sent facts
        let (_d2, other) = load(&batches);

        for ns in [auth, context(1), context(2)] {
            prop_assert_eq!(reference.journal_digest(ns).unwrap(), other.journal_digest(ns).unwrap());
            let state = reference.maintenance_state(ns).unwrap();
            prop_assert_eq!(&state, &other.maintenance_state(ns).unwrap());
            let expected: Vec<&VerifiedFact> = one.iter().filter(|f| f.namespace() == ns).collect();
            prop_assert_eq!(&state, &reduce(ns, expected.iter().copied()));
            prop_assert_eq!(reference.stats(ns).unwrap(), other.stats(ns).unwrap());
        }
        // And after reopening, the state is recomputed from disk to the same value.
        let path = other.path().to_owned();
        drop(other);
        let reopened = Store::open(&path).unwrap();
        for ns in [auth, context(1), context(2)] {
            prop_assert_eq!(reference.maintenance_state(ns).unwrap(), reopened.maintenance_state(ns).unwrap());
        }
    }
}
