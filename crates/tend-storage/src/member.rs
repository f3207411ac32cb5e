//! A member's side of the vault, sans-IO: opening its epoch key ring from the journal,
//! encrypting a blob for the storage peer, opening what the storage peer returns, and the
//! admin's facts for an epoch (its key, the ring sealed to the members, the re-encryption
//! fragments from every older epoch).

use rand_core::{CryptoRng, RngCore};
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::{VaultEpochKey, VaultRekey};
use tend_core::{ContentId, MaintenanceState, Payload};
use tend_vault::{
    decrypt_blob, device_age_identity, device_age_recipient, encrypt_blob, issue_advance_kfrags,
    open_key_ring, seal_key_ring, CapsuleFrag, EncryptedBlob, EpochKeyRing, EpochSecretKey,
    SealedContentKey,
};

use crate::error::StorageError;
use crate::protocol::Request;
use crate::rules::epoch_public_key;

/// The key ring of the newest epoch sealed to this device (its secret only).
pub fn open_ring(
    state: &MaintenanceState,
    device_key: &ed25519_dalek::SigningKey,
) -> Result<EpochKeyRing, StorageError> {
    let identity = device_age_identity(device_key);
    state
        .vault
        .epoch_keys
        .values()
        .rev()
        .find_map(|k| open_key_ring(&k.sealed_ring, &identity).ok())
        .ok_or_else(|| {
            StorageError::CannotOpen("no epoch key ring is sealed to this device".into())
        })
}

/// The ring of the current epoch, which only a member of it can open.
pub fn current_ring(
    state: &MaintenanceState,
    device_key: &ed25519_dalek::SigningKey,
) -> Result<EpochKeyRing, StorageError> {
    let ring = open_ring(state, device_key)?;
    let current = state.identity_epoch();
    if ring.current_epoch() != current {
        return Err(StorageError::CannotOpen(format!(
            "this device holds the ring of epoch {}, not of the current epoch {current}",
            ring.current_epoch()
        )));
    }
    Ok(ring)
}

/// Every epoch secret this device can open from the journal: the members' rings sealed to
/// it and the histories sealed to it as admin, as one ring (None if it opens nothing).
fn collected_secrets(
    state: &MaintenanceState,
    device_key: &ed25519_dalek::SigningKey,
) -> Result<Option<EpochKeyRing>, StorageError> {
    let identity = device_age_identity(device_key);
    let mut secrets = std::collections::BTreeMap::new();
    for k in state.vault.epoch_keys.values() {
        for sealed in [&k.sealed_ring, &k.sealed_history] {
            if let Ok(ring) = open_key_ring(sealed, &identity) {
                for e in ring.epochs() {
                    if let Some(s) = ring.secret(e) {
                        secrets.insert(e, s.clone());
                    }
                }
            }
        }
    }
    let mut ring: Option<EpochKeyRing> = None;
    for (epoch, secret) in secrets {
        ring = Some(match ring {
            None => EpochKeyRing::new(epoch, secret),
            Some(r) => {
                let keep: Vec<u64> = r.epochs().collect();
                r.advance(epoch, secret, &keep)?
            }
        });
    }
    Ok(ring)
}

/// The admin's facts that give the current identity epoch its key, if it has none yet: a
/// fresh secret sealed to every member device (the members' ring holds it alone), the
/// history of every epoch secret sealed to the admin, and, for each older epoch whose secret
/// the admin holds, a 1-of-1 fragment set to the new key for the storage peer. Empty if the
/// epoch has a key already.
pub fn epoch_key_facts(
    rng: &mut (impl RngCore + CryptoRng),
    state: &MaintenanceState,
    admin_key: &ed25519_dalek::SigningKey,
) -> Result<Vec<Payload>, StorageError> {
    let current = state.identity_epoch();
    if state.vault.epoch_keys.contains_key(&current) {
        return Ok(Vec::new());
    }
    let members = state
        .membership()
        .ok_or_else(|| StorageError::CannotOpen("the authority has no genesis".into()))?;
    let secret = EpochSecretKey::generate(rng);
    let public = secret.public_key();
    let known = collected_secrets(state, admin_key)?;
    let (history, rekeys) = match known {
        None => (EpochKeyRing::new(current, secret.clone()), Vec::new()),
        Some(previous) => {
            // An epoch whose secret this admin never received (it became admin later and
            // was no member then) cannot be re-keyed by it: a limit of single-hop Umbral.
            let older: Vec<u64> = previous
                .epochs()
                .filter(|e| state.vault.epoch_keys.contains_key(e))
                .collect();
            let history = previous.advance(current, secret.clone(), &older)?;
            let kfrags = issue_advance_kfrags(rng, &previous, &older, &public, 1, 1)?;
            let rekeys = kfrags
                .into_iter()
                .map(|(from, frags)| {
                    Payload::Maintenance(MaintenanceFact::VaultRekey(VaultRekey {
                        from_epoch: from,
                        to_epoch: current,
                        threshold: 1,
                        kfrags: frags
                            .iter()
                            .map(|k| ByteBuf::from(k.kfrag().to_bytes().to_vec()))
                            .collect(),
                    }))
                })
                .collect();
            (history, rekeys)
        }
    };
    let recipients = members
        .members
        .iter()
        .map(|d| device_age_recipient(&d.0))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = device_age_recipient(&admin_key.verifying_key().to_bytes())?;
    let ring = EpochKeyRing::new(current, secret);
    let mut out = vec![Payload::Maintenance(MaintenanceFact::VaultEpochKey(
        VaultEpochKey {
            identity_epoch: current,
            public_key: public.to_bytes(),
            sealed_ring: ByteBuf::from(seal_key_ring(&ring, &recipients)?),
            sealed_history: ByteBuf::from(seal_key_ring(&history, &[admin])?),
        },
    ))];
    out.extend(rekeys);
    Ok(out)
}

/// Whether a plaintext of `len` bytes, once encrypted (a header and a tag per chunk), fits
/// the one request that carries a blob to the storage peer.
pub fn fits_one_request(len: u64) -> bool {
    use tend_vault::blob::{HEADER_BYTES, TAG_BYTES};
    let chunks = len / u64::from(tend_vault::DEFAULT_CHUNK_BYTES) + 1;
    let encrypted = len
        .saturating_add(HEADER_BYTES as u64)
        .saturating_add(chunks.saturating_mul(TAG_BYTES as u64));
    encrypted <= crate::protocol::MAX_VAULT_BLOB_BYTES as u64
}

/// Encrypts `plaintext` under a fresh content key sealed to the current epoch's key: the
/// `Put` request for the storage peer and the CID of the ciphertext.
pub fn seal_for_storage(
    rng: &mut (impl RngCore + CryptoRng),
    state: &MaintenanceState,
    plaintext: &[u8],
) -> Result<(Request, ContentId), StorageError> {
    let epoch = state.identity_epoch();
    let epoch_key = epoch_public_key(state, epoch)?;
    let (blob, key) = encrypt_blob(rng, plaintext);
    let sealed = SealedContentKey::seal(rng, &key, epoch, &epoch_key);
    let bytes = blob.to_bytes();
    let cid = ContentId::of_raw(&bytes);
    Ok((
        Request::Put {
            sealed_key: ByteBuf::from(sealed.to_bytes().to_vec()),
            blob: ByteBuf::from(bytes),
        },
        cid,
    ))
}

/// Opens a blob the storage peer returned for `cid`: checks the ciphertext against the CID,
/// then opens the sealed key with the ring's secret of its epoch, or, when the ring lacks
/// it, with the ring's secret of `to_epoch` and the capsule fragments (each verified
/// against the capsule and both published epoch keys).
pub fn open_fetched(
    state: &MaintenanceState,
    ring: &EpochKeyRing,
    cid: &ContentId,
    blob: &[u8],
    sealed_key: &[u8],
    to_epoch: u64,
    cfrags: &[impl AsRef<[u8]>],
) -> Result<Vec<u8>, StorageError> {
    if !cid.matches(blob) {
        return Err(StorageError::CidMismatch(*cid));
    }
    let sealed = SealedContentKey::from_bytes(sealed_key)?;
    let content_key = match ring.secret(sealed.epoch()) {
        Some(secret) => sealed.open(secret)?,
        None => {
            let receiving = ring.secret(to_epoch).ok_or_else(|| {
                StorageError::CannotOpen(format!(
                    "no secret of epoch {} or {to_epoch} in this device's ring",
                    sealed.epoch()
                ))
            })?;
            let delegating = epoch_public_key(state, sealed.epoch())?;
            let receiving_public = epoch_public_key(state, to_epoch)?;
            if cfrags.is_empty() {
                return Err(StorageError::CannotOpen(format!(
                    "sealed to epoch {} and no re-encryption to epoch {to_epoch} yet",
                    sealed.epoch()
                )));
            }
            let verified = cfrags
                .iter()
                .map(|c| {
                    CapsuleFrag::from_bytes(c.as_ref())?.verify(
                        sealed.capsule(),
                        &delegating,
                        &receiving_public,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            sealed.open_reencrypted(receiving, &delegating, &verified)?
        }
    };
    let encrypted = EncryptedBlob::from_bytes(blob)?;
    Ok(decrypt_blob(&encrypted, &content_key)?)
}
