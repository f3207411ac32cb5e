//! Property tests of the laws everything relies on: the journal is a join-semilattice,
//! reduction is order-independent, and the encoding has exactly one form per fact.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use tend_core::authority::{AuthorityGenesis, GroupKey};
use tend_core::maintenance::{
    AdminReplacement, CacheInvalidated, MaintenanceFact, SnapshotProposed,
};
use tend_core::{
    reduce, ContextId, DeviceId, Epoch, FactFormat, Hash32, Journal, JournalNamespace, Payload,
    UnsignedFact, VerifiedFact,
};

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn device(i: u8) -> DeviceId {
    DeviceId(key(i).verifying_key().to_bytes())
}

fn ctx() -> JournalNamespace {
    JournalNamespace::Context(ContextId([9; 32]))
}

/// An authority of devices 0..3 with device 0 as admin, and its genesis fact.
fn authority() -> (JournalNamespace, VerifiedFact) {
    let mut members: Vec<DeviceId> = (0..3).map(device).collect();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [5; 32],
        members,
        threshold: 2,
        group_key: GroupKey(device(0).0),
        admin: device(0),
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let fact = UnsignedFact {
        namespace: ns,
        epoch: Epoch(0),
        payload: Payload::Authority(tend_core::AuthorityFact::Genesis(genesis)),
    }
    .sign(&key(0));
    (ns, fact)
}

fn payload_strategy() -> impl Strategy<Value = Payload> {
    prop_oneof![
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, data)| {
            Payload::Application {
                kind: format!("k{}", k % 3),
                data,
            }
        }),
        (0u8..4, 0u64..6).prop_map(|(k, floor)| Payload::Maintenance(
            MaintenanceFact::CacheInvalidated(CacheInvalidated {
                keys: vec![format!("key{k}")],
                epoch_floor: Epoch(floor),
            })
        )),
        (0u8..3, 0u8..3, 0u64..6).prop_map(|(old, new, at)| Payload::Maintenance(
            MaintenanceFact::AdminReplacement(AdminReplacement {
                old_admin: device(old),
                new_admin: device(new),
                activation_epoch: Epoch(at),
            })
        )),
        (any::<u8>(), 1u64..8).prop_map(|(p, target)| Payload::Maintenance(
            MaintenanceFact::SnapshotProposed(SnapshotProposed {
                proposal_id: Hash32([p; 32]),
                target_epoch: Epoch(target),
                digest: Hash32([0; 32]),
            })
        )),
        (100u64..200, prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(tag, raw)| {
            Payload::Unknown {
                tag,
                raw: tend_core::encoding::to_canonical(&serde_bytes::ByteBuf::from(raw)),
            }
        }),
    ]
}

/// Facts of every format: untimed (1), timed (2) and timed under ZIP-215 (3), at any clock
/// value.
fn facts_strategy(ns: JournalNamespace) -> impl Strategy<Value = Vec<VerifiedFact>> {
    let format = prop_oneof![
        Just(FactFormat::Untimed),
        any::<u64>().prop_map(|time_ms| FactFormat::Timed { time_ms }),
        any::<u64>().prop_map(|time_ms| FactFormat::TimedZip215 { time_ms }),
    ];
    prop::collection::vec((0u8..3, 0u64..6, payload_strategy(), format), 0..24).prop_map(move |v| {
        v.into_iter()
            .map(|(author, epoch, payload, format)| {
                UnsignedFact {
                    namespace: ns,
                    epoch: Epoch(epoch),
                    payload,
                }
                .sign_with(&key(author), format)
            })
            .collect()
    })
}

fn journal(facts: &[VerifiedFact]) -> Journal {
    let mut j = Journal::new(ctx());
    for f in facts {
        j.insert(f.clone()).unwrap();
    }
    j
}

fn merged(a: &Journal, b: &Journal) -> Journal {
    let mut out = a.clone();
    out.merge(b).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merge_is_commutative(a in facts_strategy(ctx()), b in facts_strategy(ctx())) {
        let (a, b) = (journal(&a), journal(&b));
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
    }

    #[test]
    fn merge_is_associative(
        a in facts_strategy(ctx()), b in facts_strategy(ctx()), c in facts_strategy(ctx())
    ) {
        let (a, b, c) = (journal(&a), journal(&b), journal(&c));
        let left = merged(&merged(&a, &b), &c);
        let right = merged(&a, &merged(&b, &c));
        prop_assert_eq!(left.digest(), right.digest());
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merge_is_idempotent(a in facts_strategy(ctx())) {
        let a = journal(&a);
        prop_assert_eq!(merged(&a, &a), a);
    }

    #[test]
    fn reduction_ignores_order_and_duplicates(
        facts in facts_strategy(authority().0),
        perm in any::<prop::sample::Index>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let (ns, genesis) = authority();
        let mut all = facts.clone();
        all.push(genesis);
        let reference = reduce(ns, &all);
        let mut shuffled = all.clone();
        shuffled.rotate_left(perm.index(all.len()));
        shuffled.reverse();
        for d in &dups {
            shuffled.push(all[d.index(all.len())].clone());
        }
        prop_assert_eq!(reduce(ns, &shuffled), reference);
    }

    #[test]
    fn encoding_round_trips(facts in facts_strategy(ctx())) {
        for f in facts {
            let decoded = VerifiedFact::decode(f.bytes()).unwrap();
            prop_assert_eq!(decoded.id(), f.id());
            prop_assert_eq!(decoded.id(), tend_core::FactId::of(f.bytes()));
            prop_assert_eq!(decoded.fact(), f.fact());
            let (author, payload) = tend_core::fact::read_stored_payload(f.bytes()).unwrap();
            prop_assert_eq!(author, f.author());
            prop_assert_eq!(&payload, f.payload());
        }
    }

    /// A timed fact's id starts with its time, so ids of one epoch sort by when they were
    /// written, whatever they say; the rest of the id is the hash of the bytes.
    #[test]
    fn timed_ids_sort_by_time(
        a in payload_strategy(),
        b in payload_strategy(),
        t in 0u64..(1 << 48) - 1,
        later in 1u64..1_000_000,
    ) {
        let t2 = (t + later).min((1 << 48) - 1);
        prop_assume!(t2 > t);
        let sign = |p: Payload, t: u64| UnsignedFact { namespace: ctx(), epoch: Epoch(1), payload: p }
            .sign_timed(&key(0), t);
        let (first, second) = (sign(a, t), sign(b, t2));
        prop_assert!(first.id() < second.id());
        prop_assert_eq!(&first.id().0[..6], &t.to_be_bytes()[2..]);
        let hash = blake3::hash(first.bytes());
        prop_assert_eq!(&first.id().0[6..], &hash.as_bytes()[..26]);
    }

    #[test]
    fn a_flipped_bit_never_passes_as_the_same_fact(
        facts in facts_strategy(ctx()).prop_filter("non-empty", |f| !f.is_empty()),
        pick in any::<prop::sample::Index>(),
        bit in any::<prop::sample::Index>(),
    ) {
        let f = &facts[pick.index(facts.len())];
        let mut bytes = f.bytes().to_vec();
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        // The signature covers every byte but itself and the id covers all of them: a flip
        // is either rejected or (a different, valid signature is impossible) never the same id.
        match VerifiedFact::decode(&bytes) {
            Err(_) => {}
            Ok(g) => prop_assert_ne!(g.id(), f.id()),
        }
    }
}

/// Ids of format-1 facts are BLAKE3 of their bytes, as every release before format 2
/// computed them: a journal's existing ids, references and snapshots stay valid.
#[test]
fn untimed_ids_are_the_hash_of_the_bytes() {
    let f = UnsignedFact {
        namespace: ctx(),
        epoch: Epoch(4),
        payload: Payload::Application {
            kind: "a".into(),
            data: vec![7; 40],
        },
    }
    .sign(&key(2));
    assert_eq!(f.bytes()[..2], [0x87, 0x01]);
    assert_eq!(f.id().0, *blake3::hash(f.bytes()).as_bytes());
    assert_eq!(f.time_ms(), None);
}

/// The time is signed: a timed fact whose time is changed, or that is re-labelled as
/// another format, does not verify.
#[test]
fn the_time_of_a_timed_fact_is_signed() {
    use tend_core::encoding::to_canonical;
    use tend_core::DecodeError;
    let f = UnsignedFact {
        namespace: ctx(),
        epoch: Epoch(2),
        payload: Payload::Application {
            kind: "a".into(),
            data: vec![1],
        },
    }
    .sign_timed(&key(1), 1_765_000_000_000);
    let x = f.fact();
    let (tag, body) = x.payload.to_tag_body();
    let body = serde_bytes::Bytes::new(&body);
    let sig = serde_bytes::Bytes::new(&x.signature);
    let timed_at =
        |t: u64| to_canonical(&(2u64, t, x.namespace, x.epoch, x.author, tag, body, sig));
    let moved = timed_at(1_765_000_000_001);
    assert_eq!(VerifiedFact::decode(&moved), Err(DecodeError::BadSignature));
    let untimed = to_canonical(&(1u64, x.namespace, x.epoch, x.author, tag, body, sig));
    assert_eq!(
        VerifiedFact::decode(&untimed),
        Err(DecodeError::BadSignature)
    );
    let zip215 = to_canonical(&(
        3u64,
        1_765_000_000_000u64,
        x.namespace,
        x.epoch,
        x.author,
        tag,
        body,
        sig,
    ));
    assert_eq!(
        VerifiedFact::decode(&zip215),
        Err(DecodeError::BadSignature)
    );
    let same = timed_at(1_765_000_000_000);
    assert_eq!(VerifiedFact::decode(&same).map(|g| g.id()), Ok(f.id()));
}

/// The id is a total function: bytes that start like a timed fact but are cut short or
/// carry a bad time head still get an id (the hash), never a panic.
#[test]
fn fact_ids_of_junk_are_hashes() {
    for junk in [
        &[0x88u8, 0x02][..],
        &[0x88, 0x02, 0x1b, 1, 2],
        &[0x88, 0x02, 0x1f],
        &[0x88, 0x02, 0x40],
    ] {
        assert_eq!(
            tend_core::FactId::of(junk).0,
            *blake3::hash(junk).as_bytes()
        );
    }
    assert_eq!(
        &tend_core::FactId::of(&[0x88, 0x02, 0x05]).0[..6],
        &[0, 0, 0, 0, 0, 5]
    );
}

#[test]
fn unknown_payload_kinds_are_kept_byte_for_byte() {
    let raw = tend_core::encoding::to_canonical(&("from a newer release", 42u64));
    let f = UnsignedFact {
        namespace: ctx(),
        epoch: Epoch(3),
        payload: Payload::Unknown {
            tag: 4242,
            raw: raw.clone(),
        },
    }
    .sign(&key(1));
    let back = VerifiedFact::decode(f.bytes()).unwrap();
    assert_eq!(back.payload(), &Payload::Unknown { tag: 4242, raw });
    assert_eq!(back.bytes(), f.bytes());
    assert_eq!(back.id(), f.id());
}

#[test]
fn decoding_rejects_bad_input_with_typed_errors() {
    use tend_core::DecodeError;
    let f = UnsignedFact {
        namespace: ctx(),
        epoch: Epoch(1),
        payload: Payload::Application {
            kind: "a".into(),
            data: vec![1, 2, 3],
        },
    }
    .sign(&key(0));
    let bytes = f.bytes();

    // Truncated.
    assert!(matches!(
        VerifiedFact::decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::Malformed(_))
    ));
    // Oversized.
    let big = vec![0u8; tend_core::MAX_FACT_BYTES + 1];
    assert!(matches!(
        VerifiedFact::decode(&big),
        Err(DecodeError::Oversized { .. })
    ));
    // A newer format version (the first array element is the version).
    let mut newer = bytes.to_vec();
    assert_eq!(newer[1], 1);
    newer[1] = 4;
    assert_eq!(
        VerifiedFact::decode(&newer),
        Err(DecodeError::UnsupportedVersion(4))
    );
    // Non-canonical: the epoch 1 written as a two-byte integer (0x18 0x01) instead of 0x01.
    let pos = 1 + 1 + 36; // array header, version, namespace [kind, bytes32]
    assert_eq!(bytes[pos], 0x01);
    let mut long = bytes[..pos].to_vec();
    long.extend_from_slice(&[0x18, 0x01]);
    long.extend_from_slice(&bytes[pos + 1..]);
    assert_eq!(VerifiedFact::decode(&long), Err(DecodeError::NonCanonical));
    // Trailing garbage.
    let mut trailing = bytes.to_vec();
    trailing.push(0);
    assert!(VerifiedFact::decode(&trailing).is_err());
    // A signature by another key.
    let mut forged = bytes.to_vec();
    let n = forged.len();
    forged[n - 1] ^= 0x40;
    assert_eq!(
        VerifiedFact::decode(&forged),
        Err(DecodeError::BadSignature)
    );
}

#[test]
fn merging_different_namespaces_is_an_error() {
    let mut a = Journal::new(ctx());
    let b = Journal::new(JournalNamespace::Context(ContextId([1; 32])));
    assert!(a.merge(&b).is_err());
    let (ns, genesis) = authority();
    assert_ne!(ns, ctx());
    assert!(a.insert(genesis).is_err());
}

/// `decode_batch` is `decode` of each fact, in order, whatever the batch's size (one thread
/// or several) and mix: every fact format (format 3's signatures checked in one batch
/// equation), valid facts of more authors than its key cache holds, forged signatures, an
/// author key that is not a curve point, a small-order author key (which `verify_strict`
/// and format 3 refuse and a plain verification would not), garbage.
#[test]
fn batch_decoding_gives_exactly_what_decoding_each_fact_gives() {
    let sign = |i: usize| {
        let time_ms = 1_765_000_000_000 + i as u64;
        let format = match i % 3 {
            0 => FactFormat::Untimed,
            1 => FactFormat::Timed { time_ms },
            _ => FactFormat::TimedZip215 { time_ms },
        };
        UnsignedFact {
            namespace: ctx(),
            epoch: Epoch(i as u64 % 4),
            payload: Payload::Application {
                kind: "a".into(),
                data: i.to_le_bytes().to_vec(),
            },
        }
        .sign_with(&key((i % 20) as u8), format)
        .bytes()
        .to_vec()
    };
    let with_author = |bytes: &[u8], author: &DeviceId, to: [u8; 32]| {
        let at = bytes
            .windows(32)
            .position(|w| w == author.0)
            .expect("author in the encoding");
        let mut out = bytes.to_vec();
        out[at..at + 32].copy_from_slice(&to);
        out
    };
    let not_a_point = (0u8..=255)
        .map(|b| [b; 32])
        .find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err())
        .expect("some constant bytes are no curve point");
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut batch = Vec::new();
    for i in 0..300 {
        let bytes = sign(i);
        batch.push(match i % 25 {
            3 => {
                let mut forged = bytes;
                let n = forged.len();
                forged[n - 1] ^= 0x40;
                forged
            }
            7 => with_author(&bytes, &device((i % 20) as u8), not_a_point),
            11 => with_author(&bytes, &device((i % 20) as u8), identity),
            17 => bytes[..bytes.len() / 2].to_vec(),
            _ => bytes,
        });
    }
    let one_by_one: Vec<_> = batch.iter().map(|b| VerifiedFact::decode(b)).collect();
    for kind in [
        tend_core::DecodeError::BadAuthorKey,
        tend_core::DecodeError::BadSignature,
    ] {
        assert!(one_by_one.iter().any(|r| r.as_ref().err() == Some(&kind)));
    }
    assert!(one_by_one.iter().filter(|r| r.is_ok()).count() > 250);
    for len in [0, 1, 31, 64, 65, 299, 300] {
        assert_eq!(
            VerifiedFact::decode_batch(&batch[..len]),
            one_by_one[..len],
            "{len} facts"
        );
    }
}
