//! Sealed content keys, Umbral re-encryption across identity epochs, key rings delivered
//! with age, and the refusals: wrong and stale keys, tampered capsules and fragments.

use proptest::prelude::*;
use rand::rngs::{OsRng, StdRng};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tend_vault::umbral::{CAPSULE_BYTES, CFRAG_BYTES, KFRAG_BYTES};
use tend_vault::{
    decrypt_blob, encrypt_blob, generate_kfrags, issue_advance_kfrags, open_key_ring, reencrypt,
    seal_key_ring, Capsule, CapsuleFrag, EpochKeyRing, EpochPublicKey, EpochSecretKey, KeyFrag,
    SealedContentKey, VaultError, VerifiedCapsuleFrag, VerifiedKeyFrag,
};

/// What a reader does with the proxy's answer: verify every fragment, then open.
fn open_via_proxy(
    sealed: &SealedContentKey,
    kfrags: &[VerifiedKeyFrag],
    delegating: &EpochPublicKey,
    receiving: &EpochSecretKey,
) -> Result<tend_vault::ContentKey, VaultError> {
    let cfrags = kfrags
        .iter()
        .map(|k| reencrypt(&mut OsRng, k, sealed.capsule()))
        .map(|c| c.verify(sealed.capsule(), delegating, &receiving.public_key()))
        .collect::<Result<Vec<_>, _>>()?;
    sealed.open_reencrypted(receiving, delegating, &cfrags)
}

#[test]
fn sealed_key_opens_with_its_epoch_secret_only() {
    let epoch0 = EpochSecretKey::generate(&mut OsRng);
    let other = EpochSecretKey::generate(&mut OsRng);
    let (blob, key) = encrypt_blob(&mut OsRng, b"the plaintext");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &epoch0.public_key());
    let opened = sealed.open(&epoch0).unwrap();
    assert_eq!(decrypt_blob(&blob, &opened).unwrap(), b"the plaintext");
    assert!(matches!(sealed.open(&other), Err(VaultError::OpenFailed)));
}

#[test]
fn one_reencryption_with_threshold_fragments() {
    let (a, b) = (
        EpochSecretKey::generate(&mut OsRng),
        EpochSecretKey::generate(&mut OsRng),
    );
    let (blob, key) = encrypt_blob(&mut OsRng, b"history");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 4, &a.public_key());
    let kfrags = generate_kfrags(&mut OsRng, &a, &b.public_key(), 2, 3).unwrap();
    // Any two of the three proxies suffice.
    for pair in [[0, 1], [0, 2], [2, 1]] {
        let chosen: Vec<_> = pair.iter().map(|i| kfrags[*i].clone()).collect();
        let opened = open_via_proxy(&sealed, &chosen, &a.public_key(), &b).unwrap();
        assert_eq!(decrypt_blob(&blob, &opened).unwrap(), b"history");
    }
    // One is not enough, and the failure is a typed error.
    assert!(matches!(
        open_via_proxy(&sealed, &kfrags[..1], &a.public_key(), &b),
        Err(VaultError::OpenFailed)
    ));
    // The wrong receiving secret is refused: the fragments were checked for `b`.
    let c = EpochSecretKey::generate(&mut OsRng);
    let cfrags: Vec<VerifiedCapsuleFrag> = kfrags[..2]
        .iter()
        .map(|k| {
            reencrypt(&mut OsRng, k, sealed.capsule())
                .verify(sealed.capsule(), &a.public_key(), &b.public_key())
                .unwrap()
        })
        .collect();
    assert!(matches!(
        sealed.open_reencrypted(&c, &a.public_key(), &cfrags),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
}

/// Epochs 0 -> 1 -> 2 -> 3: each advance re-keys every epoch still in use straight to the
/// newest one; blobs of every epoch stay readable with the newest secret alone.
#[test]
fn several_advances_keep_every_epoch_readable_with_the_newest_secret() {
    let mut ring = EpochKeyRing::new(0, EpochSecretKey::generate(&mut OsRng));
    let mut public = vec![ring.current_secret().public_key()];
    let mut blobs = Vec::new();
    let mut latest_kfrags = std::collections::BTreeMap::new();
    for epoch in 1..=3u64 {
        // A blob written in the epoch that is ending.
        let text = format!("written in epoch {}", epoch - 1);
        let (blob, key) = encrypt_blob(&mut OsRng, text.as_bytes());
        let sealed =
            SealedContentKey::seal(&mut OsRng, &key, epoch - 1, &public[(epoch - 1) as usize]);
        blobs.push((blob, sealed, text));
        // The advance: a new secret, fragments from every epoch in use to it.
        let next = EpochSecretKey::generate(&mut OsRng);
        let next_public = next.public_key();
        let in_use: Vec<u64> = (0..epoch).collect();
        latest_kfrags =
            issue_advance_kfrags(&mut OsRng, &ring, &in_use, &next_public, 2, 3).unwrap();
        ring = ring.advance(epoch, next, &in_use).unwrap();
        public.push(next_public);
    }
    let newest = ring.current_secret();
    for (blob, sealed, text) in &blobs {
        let delegating = public[sealed.epoch() as usize];
        let kfrags = &latest_kfrags[&sealed.epoch()];
        let key = open_via_proxy(sealed, &kfrags[1..], &delegating, newest).unwrap();
        assert_eq!(decrypt_blob(blob, &key).unwrap(), text.as_bytes());
    }
}

#[test]
fn stale_fragments_fail_cleanly() {
    let keys: Vec<EpochSecretKey> = (0..3)
        .map(|_| EpochSecretKey::generate(&mut OsRng))
        .collect();
    let pk: Vec<EpochPublicKey> = keys.iter().map(EpochSecretKey::public_key).collect();
    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed0 = SealedContentKey::seal(&mut OsRng, &key, 0, &pk[0]);
    let k01 = generate_kfrags(&mut OsRng, &keys[0], &pk[1], 1, 1).unwrap();
    let k12 = generate_kfrags(&mut OsRng, &keys[1], &pk[2], 1, 1).unwrap();

    // A key fragment checked against another pair of epochs is refused.
    let raw = KeyFrag::from_bytes(&k01[0].kfrag().to_bytes()).unwrap();
    assert!(matches!(
        raw.clone().verify(&pk[0], &pk[2]),
        Err(VaultError::InvalidKeyFrag)
    ));
    assert!(matches!(
        raw.clone().verify(&pk[1], &pk[1]),
        Err(VaultError::InvalidKeyFrag)
    ));
    assert!(raw.verify(&pk[0], &pk[1]).is_ok());

    // Last epoch's fragments (0 -> 1) are stale once the ring moved to epoch 2: their
    // capsule fragments do not verify for 0 -> 2, and, verified for 0 -> 1, are refused
    // with epoch 2's secret.
    let stale = reencrypt(&mut OsRng, &k01[0], sealed0.capsule());
    assert!(matches!(
        stale.verify(sealed0.capsule(), &pk[0], &pk[2]),
        Err(VaultError::InvalidCapsuleFrag)
    ));
    let verified_stale = stale.verify(sealed0.capsule(), &pk[0], &pk[1]).unwrap();
    assert!(matches!(
        sealed0.open_reencrypted(&keys[2], &pk[0], &[verified_stale]),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));

    // Fragments 1 -> 2 applied to a capsule of epoch 0 (single-hop: no chaining) fail.
    let wrong_epoch = reencrypt(&mut OsRng, &k12[0], sealed0.capsule());
    assert!(matches!(
        wrong_epoch.verify(sealed0.capsule(), &pk[0], &pk[2]),
        Err(VaultError::InvalidCapsuleFrag)
    ));
    let verified = wrong_epoch
        .verify(sealed0.capsule(), &pk[1], &pk[2])
        .unwrap();
    assert!(matches!(
        sealed0.open_reencrypted(&keys[2], &pk[0], &[verified]),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
}

#[test]
fn tampered_capsule_is_refused() {
    let a = EpochSecretKey::generate(&mut OsRng);
    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &a.public_key());
    let bytes = sealed.to_bytes();
    // Every byte of the capsule: a bad point, a bad scalar, or a failed capsule check.
    for at in 8..8 + CAPSULE_BYTES {
        let mut tampered = bytes;
        tampered[at] ^= 0x02;
        assert!(
            SealedContentKey::from_bytes(&tampered).is_err(),
            "flipping capsule byte {at} went unnoticed"
        );
    }
    // A valid capsule of another sealed key, spliced in: the wrap's associated data refuses.
    let other = SealedContentKey::seal(&mut OsRng, &key, 0, &a.public_key());
    let mut spliced = bytes;
    spliced[8..8 + CAPSULE_BYTES].copy_from_slice(&other.capsule().to_bytes());
    let spliced = SealedContentKey::from_bytes(&spliced).unwrap();
    assert!(matches!(spliced.open(&a), Err(VaultError::OpenFailed)));
    // The epoch number is bound as well, and so is the wrapped key.
    let mut epoch = bytes;
    epoch[7] ^= 1;
    let epoch = SealedContentKey::from_bytes(&epoch).unwrap();
    assert!(matches!(epoch.open(&a), Err(VaultError::OpenFailed)));
    let mut wrapped = bytes;
    wrapped[bytes.len() - 1] ^= 1;
    let wrapped = SealedContentKey::from_bytes(&wrapped).unwrap();
    assert!(matches!(wrapped.open(&a), Err(VaultError::OpenFailed)));
}

#[test]
fn tampered_capsule_and_key_fragments_are_refused() {
    let (a, b) = (
        EpochSecretKey::generate(&mut OsRng),
        EpochSecretKey::generate(&mut OsRng),
    );
    let (pa, pb) = (a.public_key(), b.public_key());
    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &pa);
    let kfrag = generate_kfrags(&mut OsRng, &a, &pb, 1, 1)
        .unwrap()
        .remove(0);
    let cfrag = reencrypt(&mut OsRng, &kfrag, sealed.capsule());
    let bytes = cfrag.to_bytes();
    assert_eq!(CapsuleFrag::from_bytes(&bytes).unwrap(), cfrag);
    // Flip one bit in each byte position: decoding or verification refuses it.
    for at in 0..CFRAG_BYTES {
        let mut tampered = bytes;
        tampered[at] ^= 0x04;
        let result =
            CapsuleFrag::from_bytes(&tampered).and_then(|c| c.verify(sealed.capsule(), &pa, &pb));
        assert!(result.is_err(), "flipping cfrag byte {at} went unnoticed");
    }
    // A genuine fragment of another capsule does not verify for this one.
    let other = SealedContentKey::seal(&mut OsRng, &key, 0, &pa);
    let foreign = reencrypt(&mut OsRng, &kfrag, other.capsule());
    assert!(matches!(
        foreign.verify(sealed.capsule(), &pa, &pb),
        Err(VaultError::InvalidCapsuleFrag)
    ));
    // Key fragments: every flipped byte is refused by decoding or verification.
    let kbytes = kfrag.kfrag().to_bytes();
    for at in 0..KFRAG_BYTES {
        let mut tampered = kbytes;
        tampered[at] ^= 0x04;
        let result = KeyFrag::from_bytes(&tampered).and_then(|k| k.verify(&pa, &pb));
        assert!(result.is_err(), "flipping kfrag byte {at} went unnoticed");
    }
}

#[test]
fn capsule_fragments_that_cannot_be_combined_are_refused() {
    let (a, b) = (
        EpochSecretKey::generate(&mut OsRng),
        EpochSecretKey::generate(&mut OsRng),
    );
    let (pa, pb) = (a.public_key(), b.public_key());
    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &pa);
    let other = SealedContentKey::seal(&mut OsRng, &key, 0, &pa);
    let set1 = generate_kfrags(&mut OsRng, &a, &pb, 2, 2).unwrap();
    let set2 = generate_kfrags(&mut OsRng, &a, &pb, 2, 2).unwrap();
    let frag = |k: &VerifiedKeyFrag, s: &SealedContentKey| {
        reencrypt(&mut OsRng, k, s.capsule())
            .verify(s.capsule(), &pa, &pb)
            .unwrap()
    };
    let mixed = [frag(&set1[0], &sealed), frag(&set2[1], &sealed)];
    assert!(matches!(
        sealed.open_reencrypted(&b, &pa, &mixed),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
    let twice = [frag(&set1[0], &sealed), frag(&set1[0], &sealed)];
    assert!(matches!(
        sealed.open_reencrypted(&b, &pa, &twice),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
    let elsewhere = [frag(&set1[0], &sealed), frag(&set1[1], &other)];
    assert!(matches!(
        sealed.open_reencrypted(&b, &pa, &elsewhere),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
    assert!(matches!(
        sealed.open_reencrypted(&b, &pa, &[]),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
    for (t, n) in [(0, 3), (4, 3), (1, 256)] {
        assert!(matches!(
            generate_kfrags(&mut OsRng, &a, &pb, t, n),
            Err(VaultError::BadThreshold { .. })
        ));
    }
}

/// The proxy holds key fragments and capsules. The API gives it no way to decapsulate (every
/// key-yielding call takes an `EpochSecretKey`); this checks the nearest thing it could try,
/// using a fragment's share as if it were a secret key, opens nothing.
#[test]
fn the_proxys_material_does_not_open_a_sealed_key() {
    let (a, b) = (
        EpochSecretKey::generate(&mut OsRng),
        EpochSecretKey::generate(&mut OsRng),
    );
    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &a.public_key());
    let kfrag = generate_kfrags(&mut OsRng, &a, &b.public_key(), 1, 1)
        .unwrap()
        .remove(0);
    // The share rk = a/d sits at bytes 32..64 of the encoding.
    let share = EpochSecretKey::from_bytes(&kfrag.kfrag().to_bytes()[32..64]).unwrap();
    assert!(matches!(sealed.open(&share), Err(VaultError::OpenFailed)));
    let cfrag = reencrypt(&mut OsRng, &kfrag, sealed.capsule())
        .verify(sealed.capsule(), &a.public_key(), &b.public_key())
        .unwrap();
    assert!(matches!(
        sealed.open_reencrypted(&share, &a.public_key(), &[cfrag]),
        Err(VaultError::CapsuleFragsMismatch(_))
    ));
}

/// The whole story: a ring delivered with age to the members of each epoch; a device
/// removed at the second advance keeps only what it had; a device added later, holding only
/// the newest secret, reads a blob written two epochs before it joined.
#[test]
fn members_removed_and_added_devices_across_two_advances() {
    let alice = age::x25519::Identity::generate();
    let removed = age::x25519::Identity::generate();
    let newcomer = age::x25519::Identity::generate();

    let ring0 = EpochKeyRing::new(0, EpochSecretKey::generate(&mut OsRng));
    let delivered0 = seal_key_ring(&ring0, &[alice.to_public(), removed.to_public()]).unwrap();
    let removed_ring = open_key_ring(&delivered0, &removed).unwrap();
    let pk0 = ring0.current_secret().public_key();
    let (old_blob, old_key) = encrypt_blob(&mut OsRng, b"written at epoch 0");
    let old_sealed = SealedContentKey::seal(&mut OsRng, &old_key, 0, &pk0);

    // Advance to 1 (same members), then to 2: `removed` leaves, `newcomer` joins and is given
    // only the newest secret.
    let s1 = EpochSecretKey::generate(&mut OsRng);
    let ring1 = ring0.advance(1, s1, &[0]).unwrap();
    let s2 = EpochSecretKey::generate(&mut OsRng);
    let pk2 = s2.public_key();
    let kfrags = issue_advance_kfrags(&mut OsRng, &ring1, &[0, 1], &pk2, 1, 2).unwrap();
    let members_ring2 = ring1.advance(2, s2.clone(), &[0, 1]).unwrap();
    let readers_ring2 = ring1.advance(2, s2, &[]).unwrap();
    let delivered2 = seal_key_ring(&members_ring2, &[alice.to_public()]).unwrap();
    let delivered_newcomer = seal_key_ring(&readers_ring2, &[newcomer.to_public()]).unwrap();
    assert!(matches!(
        open_key_ring(&delivered2, &removed),
        Err(VaultError::Age(_))
    ));
    let newcomer_ring = open_key_ring(&delivered_newcomer, &newcomer).unwrap();
    assert_eq!(newcomer_ring.epochs().collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        open_key_ring(&delivered2, &alice)
            .unwrap()
            .epochs()
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );

    // The newcomer reads the epoch-0 blob through the proxy's capsule fragments.
    assert!(matches!(
        old_sealed.open_with_ring(&newcomer_ring),
        Err(VaultError::MissingEpoch(0))
    ));
    let key = open_via_proxy(
        &old_sealed,
        &kfrags[&0][..1],
        &pk0,
        newcomer_ring.current_secret(),
    )
    .unwrap();
    assert_eq!(
        decrypt_blob(&old_blob, &key).unwrap(),
        b"written at epoch 0"
    );

    // The removed device still opens what it could before, never a blob of epoch 2.
    assert!(old_sealed.open_with_ring(&removed_ring).is_ok());
    let (new_blob, new_key) = encrypt_blob(&mut OsRng, b"written at epoch 2");
    let new_sealed = SealedContentKey::seal(&mut OsRng, &new_key, 2, &pk2);
    assert!(matches!(
        new_sealed.open_with_ring(&removed_ring),
        Err(VaultError::MissingEpoch(2))
    ));
    assert!(matches!(
        new_sealed.open(removed_ring.current_secret()),
        Err(VaultError::OpenFailed)
    ));
    let opened = new_sealed.open_with_ring(&newcomer_ring).unwrap();
    assert_eq!(
        decrypt_blob(&new_blob, &opened).unwrap(),
        b"written at epoch 2"
    );
}

#[test]
fn encodings_round_trip_and_decode_strictly() {
    let (a, b) = (
        EpochSecretKey::generate(&mut OsRng),
        EpochSecretKey::generate(&mut OsRng),
    );
    let pa = a.public_key();
    assert_eq!(EpochPublicKey::from_bytes(&pa.to_bytes()).unwrap(), pa);
    assert_eq!(
        EpochSecretKey::from_bytes(&a.to_bytes())
            .unwrap()
            .public_key(),
        pa
    );
    // The identity point, a non-canonical encoding, wrong lengths, a zero or unreduced
    // scalar.
    assert!(EpochPublicKey::from_bytes(&[0u8; 32]).is_err());
    assert!(EpochPublicKey::from_bytes(&[0xffu8; 32]).is_err());
    assert!(EpochPublicKey::from_bytes(&pa.to_bytes()[..31]).is_err());
    assert!(EpochSecretKey::from_bytes(&[0u8; 32]).is_err());
    assert!(EpochSecretKey::from_bytes(&[0xffu8; 32]).is_err());

    let (_, key) = encrypt_blob(&mut OsRng, b"x");
    let sealed = SealedContentKey::seal(&mut OsRng, &key, 9, &pa);
    assert_eq!(
        SealedContentKey::from_bytes(&sealed.to_bytes()).unwrap(),
        sealed
    );
    assert!(SealedContentKey::from_bytes(&sealed.to_bytes()[1..]).is_err());
    let capsule = *sealed.capsule();
    assert_eq!(Capsule::from_bytes(&capsule.to_bytes()).unwrap(), capsule);
    let mut identity_e = capsule.to_bytes();
    identity_e[..32].fill(0);
    assert!(matches!(
        Capsule::from_bytes(&identity_e),
        Err(VaultError::Malformed { .. })
    ));
    let kfrag = generate_kfrags(&mut OsRng, &a, &b.public_key(), 1, 1)
        .unwrap()
        .remove(0);
    let decoded = KeyFrag::from_bytes(&kfrag.kfrag().to_bytes()).unwrap();
    assert_eq!(&decoded, kfrag.kfrag());
    assert!(KeyFrag::from_bytes(&kfrag.kfrag().to_bytes()[..KFRAG_BYTES - 1]).is_err());
    let cfrag = reencrypt(&mut OsRng, &kfrag, &capsule);
    assert!(CapsuleFrag::from_bytes(&cfrag.to_bytes()[..CFRAG_BYTES - 1]).is_err());

    let ring = EpochKeyRing::new(3, a.clone())
        .advance(5, b.clone(), &[3])
        .unwrap();
    let bytes = ring.to_bytes();
    let decoded = EpochKeyRing::from_bytes(&bytes).unwrap();
    assert_eq!(decoded.epochs().collect::<Vec<_>>(), vec![3, 5]);
    assert_eq!(decoded.current_epoch(), 5);
    assert!(EpochKeyRing::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    // Entries out of order, and a current epoch that is not the newest entry.
    let mut swapped = bytes.clone();
    swapped[28..68].copy_from_slice(&bytes[68..108]);
    swapped[68..108].copy_from_slice(&bytes[28..68]);
    assert!(EpochKeyRing::from_bytes(&swapped).is_err());
    let mut current = bytes.clone();
    current[16..24].copy_from_slice(&3u64.to_be_bytes());
    assert!(EpochKeyRing::from_bytes(&current).is_err());
    assert!(
        ring.advance(5, a, &[]).is_err(),
        "an advance must go forward"
    );
    assert!(matches!(
        ring.advance(6, b, &[4]),
        Err(VaultError::MissingEpoch(4))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn random_keys_and_thresholds_reencrypt_correctly(
        seed in any::<u64>(),
        threshold in 1usize..=3,
        spare in 0usize..=2,
    ) {
        let shares = threshold + spare;
        let mut rng = StdRng::seed_from_u64(seed);
        let a = EpochSecretKey::generate(&mut rng);
        let b = EpochSecretKey::generate(&mut rng);
        let (pa, pb) = (a.public_key(), b.public_key());
        let mut kfrags = generate_kfrags(&mut rng, &a, &pb, threshold, shares).unwrap();
        kfrags.shuffle(&mut rng);
        let probe_plain = b"probe".to_vec();
        let (probe, probe_key) = encrypt_blob(&mut rng, &probe_plain);
        let resealed = SealedContentKey::seal(&mut rng, &probe_key, seed, &pa);
        prop_assert_eq!(decrypt_blob(&probe, &resealed.open(&a).unwrap()).unwrap(), probe_plain.clone());
        let cfrags: Vec<_> = kfrags[..threshold]
            .iter()
            .map(|k| reencrypt(&mut rng, k, resealed.capsule()).verify(resealed.capsule(), &pa, &pb).unwrap())
            .collect();
        let k = resealed.open_reencrypted(&b, &pa, &cfrags).unwrap();
        prop_assert_eq!(decrypt_blob(&probe, &k).unwrap(), probe_plain);
        if threshold > 1 {
            prop_assert!(matches!(
                resealed.open_reencrypted(&b, &pa, &cfrags[..threshold - 1]),
                Err(VaultError::OpenFailed)
            ));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Decoders take untrusted bytes: any input of any length is refused or accepted, never
    /// a panic; inputs of the exact length are nearly always refused (random points are
    /// rarely canonical, random capsules never pass the check).
    #[test]
    fn decoders_never_panic_on_random_bytes(
        len in 0usize..400,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut input = vec![0u8; len];
        rand::RngCore::fill_bytes(&mut rng, &mut input);
        let _ = Capsule::from_bytes(&input);
        let _ = KeyFrag::from_bytes(&input);
        let _ = CapsuleFrag::from_bytes(&input);
        let _ = SealedContentKey::from_bytes(&input);
        let _ = EpochKeyRing::from_bytes(&input);
        let _ = EpochPublicKey::from_bytes(&input);
        let _ = EpochSecretKey::from_bytes(&input);
        let _ = tend_vault::BlobHeader::from_bytes(&input);
        let _ = tend_vault::EncryptedBlob::from_bytes(&input);
        let key = tend_vault::ContentKey::generate(&mut rng);
        prop_assert!(tend_vault::decrypt_stream(input.as_slice(), &mut Vec::new(), &key).is_err());
        let mut exact = [0u8; CAPSULE_BYTES];
        rand::RngCore::fill_bytes(&mut rng, &mut exact);
        prop_assert!(Capsule::from_bytes(&exact).is_err());
    }
}
