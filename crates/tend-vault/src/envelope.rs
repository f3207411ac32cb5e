//! A blob's content key sealed to an identity epoch's key: an Umbral capsule plus the content
//! key wrapped (ChaCha20-Poly1305) under the capsule's KEM key, and the epoch-advance step
//! that issues key fragments from every older epoch still in use.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use rand_core::{CryptoRng, RngCore};

use crate::blob::ContentKey;
use crate::error::{malformed, VaultError};
use crate::keys::{EpochKeyRing, EpochPublicKey, EpochSecretKey};
use crate::umbral::{
    decapsulate_reencrypted, generate_kfrags, Capsule, KemKey, VerifiedCapsuleFrag,
    VerifiedKeyFrag, CAPSULE_BYTES,
};

const WRAPPED_BYTES: usize = 32 + 16;
/// Length of an encoded [`SealedContentKey`]: epoch (8) || capsule (96) || wrapped key (48).
pub const SEALED_KEY_BYTES: usize = 8 + CAPSULE_BYTES + WRAPPED_BYTES;
const WRAP_AAD: &[u8] = b"tend-vault v1 sealed content key";

/// A content key sealed to the public key of identity epoch `epoch`. This is what a storage
/// peer keeps beside the encrypted blob; it can re-encrypt the capsule, never open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedContentKey {
    epoch: u64,
    capsule: Capsule,
    wrapped: [u8; WRAPPED_BYTES],
}

/// The wrap key is used once (each capsule's KEM key is fresh), so a fixed nonce is safe; the
/// associated data binds the epoch and the capsule to the wrapped key.
fn wrap_cipher(kem: &KemKey) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(kem.as_bytes().into())
}

fn wrap_aad(epoch: u64, capsule: &Capsule) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD.len() + 8 + CAPSULE_BYTES);
    aad.extend_from_slice(WRAP_AAD);
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad.extend_from_slice(&capsule.to_bytes());
    aad
}

impl SealedContentKey {
    /// Seals `key` to `epoch`'s public key.
    pub fn seal(
        rng: &mut (impl RngCore + CryptoRng),
        key: &ContentKey,
        epoch: u64,
        epoch_key: &EpochPublicKey,
    ) -> Self {
        let (capsule, kem) = Capsule::encapsulate(rng, epoch_key);
        let wrapped = wrap_cipher(&kem)
            .encrypt(
                &Default::default(),
                Payload {
                    msg: key.as_bytes(),
                    aad: &wrap_aad(epoch, &capsule),
                },
            )
            .expect("ChaCha20-Poly1305 encrypts 32 bytes");
        Self {
            epoch,
            capsule,
            wrapped: wrapped.try_into().expect("32 bytes and a 16-byte tag"),
        }
    }

    /// The identity epoch whose key this was sealed to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The capsule a proxy re-encrypts.
    pub fn capsule(&self) -> &Capsule {
        &self.capsule
    }

    fn unwrap_with(&self, kem: &KemKey) -> Result<ContentKey, VaultError> {
        let plain = wrap_cipher(kem)
            .decrypt(
                &Default::default(),
                Payload {
                    msg: &self.wrapped,
                    aad: &wrap_aad(self.epoch, &self.capsule),
                },
            )
            .map_err(|_| VaultError::OpenFailed)?;
        let bytes: [u8; 32] = plain.try_into().map_err(|_| VaultError::OpenFailed)?;
        Ok(ContentKey::from_bytes(bytes))
    }

    /// Opens with the secret of the epoch it was sealed to.
    pub fn open(&self, secret: &EpochSecretKey) -> Result<ContentKey, VaultError> {
        self.unwrap_with(&self.capsule.decapsulate(secret))
    }

    /// Opens with whatever the ring holds: the secret of the sealing epoch if the ring has
    /// it, else nothing (use [`Self::open_reencrypted`] with capsule fragments).
    pub fn open_with_ring(&self, ring: &EpochKeyRing) -> Result<ContentKey, VaultError> {
        let secret = ring
            .secret(self.epoch)
            .ok_or(VaultError::MissingEpoch(self.epoch))?;
        self.open(secret)
    }

    /// Opens after re-encryption: `receiving` is the newer epoch's secret, `delegating` the
    /// public key of the epoch it was sealed to, `cfrags` at least the threshold of verified
    /// capsule fragments of one key-fragment set.
    pub fn open_reencrypted(
        &self,
        receiving: &EpochSecretKey,
        delegating: &EpochPublicKey,
        cfrags: &[VerifiedCapsuleFrag],
    ) -> Result<ContentKey, VaultError> {
        let kem = decapsulate_reencrypted(receiving, delegating, &self.capsule, cfrags)?;
        self.unwrap_with(&kem)
    }

    /// Canonical encoding: `epoch u64 BE || capsule || wrapped key`.
    pub fn to_bytes(&self) -> [u8; SEALED_KEY_BYTES] {
        let mut out = [0u8; SEALED_KEY_BYTES];
        out[..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..8 + CAPSULE_BYTES].copy_from_slice(&self.capsule.to_bytes());
        out[8 + CAPSULE_BYTES..].copy_from_slice(&self.wrapped);
        out
    }

    /// Strict decoding; the capsule must pass its validity check.
    pub fn from_bytes(input: &[u8]) -> Result<Self, VaultError> {
        if input.len() != SEALED_KEY_BYTES {
            return Err(malformed("sealed content key", "wrong length"));
        }
        Ok(Self {
            epoch: u64::from_be_bytes(input[..8].try_into().expect("8 bytes")),
            capsule: Capsule::from_bytes(&input[8..8 + CAPSULE_BYTES])?,
            wrapped: input[8 + CAPSULE_BYTES..].try_into().expect("48 bytes"),
        })
    }
}

/// The key fragments of one identity-epoch advance: for every older epoch still in use, a
/// set of `shares` fragments (any `threshold` of them suffice) from that epoch's secret to
/// the new epoch's public key.
///
/// Umbral is single-hop, so a chain e -> e+1 -> e+2 is not served by re-encrypting capsule
/// fragments again: every advance re-keys each still-used epoch straight to the newest one,
/// and the proxy re-encrypts the original capsule. The ring (`ring`, the issuing members'
/// ring before the advance) must hold every epoch in `in_use`.
pub fn issue_advance_kfrags(
    rng: &mut (impl RngCore + CryptoRng),
    ring: &EpochKeyRing,
    in_use: &[u64],
    new_epoch_key: &EpochPublicKey,
    threshold: usize,
    shares: usize,
) -> Result<BTreeMap<u64, Vec<VerifiedKeyFrag>>, VaultError> {
    let mut out = BTreeMap::new();
    for epoch in in_use {
        let secret = ring
            .secret(*epoch)
            .ok_or(VaultError::MissingEpoch(*epoch))?;
        out.insert(
            *epoch,
            generate_kfrags(rng, secret, new_epoch_key, threshold, shares)?,
        );
    }
    Ok(out)
}
