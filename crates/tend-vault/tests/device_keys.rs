//! A device's age identity derived from its Ed25519 key: the admin seals a ring to a device id
//! alone, and only that device opens it.

use rand::rngs::OsRng;
use tend_vault::{
    device_age_identity, device_age_recipient, open_key_ring, seal_key_ring, EpochKeyRing,
    EpochSecretKey,
};

#[test]
fn a_ring_sealed_to_device_ids_opens_only_with_those_device_keys() {
    let a = ed25519_dalek::SigningKey::generate(&mut OsRng);
    let b = ed25519_dalek::SigningKey::generate(&mut OsRng);
    let outsider = ed25519_dalek::SigningKey::generate(&mut OsRng);
    // The recipient computed from the public id alone is the device's own public identity.
    let ra = device_age_recipient(&a.verifying_key().to_bytes()).unwrap();
    assert_eq!(
        ra.to_string(),
        device_age_identity(&a).to_public().to_string()
    );
    let rb = device_age_recipient(&b.verifying_key().to_bytes()).unwrap();
    let secret = EpochSecretKey::generate(&mut OsRng);
    let ring = EpochKeyRing::new(3, secret.clone());
    let sealed = seal_key_ring(&ring, &[ra, rb]).unwrap();
    for member in [&a, &b] {
        let opened = open_key_ring(&sealed, &device_age_identity(member)).unwrap();
        assert_eq!(opened.current_epoch(), 3);
        assert_eq!(opened.current_secret().to_bytes(), secret.to_bytes());
    }
    assert!(open_key_ring(&sealed, &device_age_identity(&outsider)).is_err());
}

#[test]
fn a_device_id_off_the_curve_is_refused() {
    // y = 2 is not the y-coordinate of an Ed25519 point.
    let mut bad = [0u8; 32];
    bad[0] = 2;
    assert!(device_age_recipient(&bad).is_err());
}
