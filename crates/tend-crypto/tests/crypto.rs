//! Device keys, DKG, threshold signing and key-share persistence, with real FROST.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tend_core::DeviceId;
use tend_crypto::*;

fn devices(n: usize, rng: &mut StdRng) -> Vec<DeviceKey> {
    let mut keys: Vec<DeviceKey> = (0..n).map(|_| DeviceKey::generate(rng)).collect();
    keys.sort_by_key(|k| k.device_id());
    keys
}

fn session(keys: &[DeviceKey], threshold: u16, epoch: u64) -> DkgSession {
    DkgSession {
        context: [7; 32],
        identity_epoch: epoch,
        members: keys.iter().map(|k| k.device_id()).collect(),
        threshold,
    }
}

fn threshold_sign(shares: &[&KeyShare], msg: &[u8], rng: &mut StdRng) -> [u8; 64] {
    let mut nonces = BTreeMap::new();
    let mut commitments = BTreeMap::new();
    for s in shares {
        let (n, c) = commit(s, rng);
        // Commitments travel as bytes.
        commitments.insert(
            s.device_id(),
            Commitment::from_bytes(&c.to_bytes()).unwrap(),
        );
        nonces.insert(s.device_id(), n);
    }
    let mut sig_shares = BTreeMap::new();
    for s in shares {
        let n = nonces.remove(&s.device_id()).unwrap();
        let share = sign_share(s, n, &commitments, msg).unwrap();
        sig_shares.insert(
            s.device_id(),
            SignatureShare::from_bytes(&share.to_bytes()).unwrap(),
        );
    }
    let public = PublicShares::from_bytes(&shares[0].public_shares().to_bytes()).unwrap();
    aggregate(&public, &commitments, &sig_shares, msg).unwrap()
}

#[test]
fn dkg_2_of_3_and_3_of_5_sign_and_verify_as_ed25519() {
    let mut rng = StdRng::seed_from_u64(1);
    for (n, t) in [(3usize, 2u16), (5, 3)] {
        let keys = devices(n, &mut rng);
        let shares = run_in_memory(&session(&keys, t, 0), &mut rng).unwrap();
        let gk = shares[0].group_key();
        assert!(shares.iter().all(|s| s.group_key() == gk));
        // Any T of them sign.
        let subset: Vec<&KeyShare> = shares.iter().rev().take(t as usize).collect();
        let sig = threshold_sign(&subset, b"hello", &mut rng);
        assert!(verify(&gk, b"hello", &sig));
        assert!(!verify(&gk, b"hellp", &sig));
        // The reducer's check is plain Ed25519 verify_strict.
        assert!(gk.verify(b"hello", &sig));
    }
}

#[test]
fn fewer_than_threshold_cannot_sign_and_bad_shares_are_named() {
    let mut rng = StdRng::seed_from_u64(2);
    let keys = devices(5, &mut rng);
    let shares = run_in_memory(&session(&keys, 3, 0), &mut rng).unwrap();
    let (n0, c0) = commit(&shares[0], &mut rng);
    let (_n1, c1) = commit(&shares[1], &mut rng);
    let commitments: BTreeMap<DeviceId, Commitment> =
        [(shares[0].device_id(), c0), (shares[1].device_id(), c1)].into();
    assert!(matches!(
        sign_share(&shares[0], n0, &commitments, b"m"),
        Err(SignError::NotEnoughSigners { have: 2, need: 3 })
    ));

    // A share computed over another message is detected and its signer named.
    let signers = &shares[..3];
    let mut nonces = Vec::new();
    let mut commitments = BTreeMap::new();
    for s in signers {
        let (n, c) = commit(s, &mut rng);
        nonces.push(n);
        commitments.insert(s.device_id(), c);
    }
    let mut sig_shares = BTreeMap::new();
    for (s, n) in signers.iter().zip(nonces) {
        let msg: &[u8] = if s.device_id() == signers[2].device_id() {
            b"other"
        } else {
            b"m"
        };
        sig_shares.insert(s.device_id(), sign_share(s, n, &commitments, msg).unwrap());
    }
    let err = aggregate(&signers[0].public_shares(), &commitments, &sig_shares, b"m").unwrap_err();
    assert_eq!(err, SignError::InvalidShares(vec![signers[2].device_id()]));
}

#[test]
fn dkg_rejects_foreign_sessions_and_equivocation() {
    let mut rng = StdRng::seed_from_u64(3);
    let keys = devices(3, &mut rng);
    let s = session(&keys, 2, 0);
    let (mut p0, _) = DkgParticipant::start(s.clone(), keys[0].device_id(), &mut rng).unwrap();
    let (_, out1) = DkgParticipant::start(s.clone(), keys[1].device_id(), &mut rng).unwrap();
    let (_, out1b) = DkgParticipant::start(s.clone(), keys[1].device_id(), &mut rng).unwrap();
    let msg = |o: &[DkgAction]| match &o[0] {
        DkgAction::Send(m) => m.clone(),
        DkgAction::Finished(_) => unreachable!(),
    };
    p0.handle(msg(&out1)).unwrap();
    p0.handle(msg(&out1)).unwrap(); // duplicate: ignored
    assert!(matches!(
        p0.handle(msg(&out1b)),
        Err(DkgError::Equivocation { .. })
    ));
    let mut foreign = msg(&out1);
    foreign.session = session(&keys, 3, 0).id();
    assert!(matches!(p0.handle(foreign), Err(DkgError::WrongSession)));
    assert!(DkgMessage::from_bytes(b"\x00garbage").is_err());
    assert!(matches!(
        DkgParticipant::start(session(&keys, 1, 0), keys[0].device_id(), &mut rng),
        Err(DkgError::InvalidSession(_))
    ));
}

#[test]
fn shares_are_saved_0600_reloaded_and_tampering_is_detected() {
    let mut rng = StdRng::seed_from_u64(4);
    let keys = devices(3, &mut rng);
    let shares = run_in_memory(&session(&keys, 2, 5), &mut rng).unwrap();
    let home = tempfile::tempdir().unwrap();
    let path = shares[1].save(home.path()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let loaded = KeyShare::load(home.path(), 5).unwrap();
    assert_eq!(loaded, shares[1]);

    // The reloaded share still signs with another member's share.
    let sig = threshold_sign(&[&loaded, &shares[2]], b"after reload", &mut rng);
    assert!(verify(&loaded.group_key(), b"after reload", &sig));

    // Flip one byte inside the body.
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() - 10;
    bytes[i] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        KeyShare::load(home.path(), 5),
        Err(ShareError::Tampered { .. })
    ));

    // Truncation.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        KeyShare::load(home.path(), 5),
        Err(ShareError::Malformed { .. })
    ));

    // Missing epoch.
    assert!(matches!(
        KeyShare::load(home.path(), 6),
        Err(ShareError::File(KeyFileError::Missing { .. }))
    ));

    // World-readable.
    shares[1].save(home.path()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyShare::load(home.path(), 5).unwrap_err();
    assert!(matches!(
        err,
        ShareError::File(KeyFileError::Permissions { mode: 0o644, .. })
    ));
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn device_keys_save_load_and_typed_errors() {
    let mut rng = StdRng::seed_from_u64(5);
    let home = tempfile::tempdir().unwrap();
    assert!(matches!(
        DeviceKey::load(home.path()),
        Err(KeyFileError::Missing { .. })
    ));
    let key = DeviceKey::generate(&mut rng);
    let path = key.save(home.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        DeviceKey::load(home.path()).unwrap().device_id(),
        key.device_id()
    );
    assert!(matches!(
        key.save(home.path()),
        Err(KeyFileError::AlreadyExists { .. })
    ));

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        DeviceKey::load(home.path()),
        Err(KeyFileError::Permissions { .. })
    ));
    std::fs::write(&path, [1u8; 31]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        DeviceKey::load(home.path()),
        Err(KeyFileError::WrongSize {
            len: 31,
            expected: 32,
            ..
        })
    ));
    // No temp files are left behind.
    let names: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("device.key")]);
}
