//! Epoch encryption keys: a Ristretto key pair per identity epoch, the key ring a member
//! device holds, and its delivery to member devices sealed with age X25519.
//!
//! Delivery uses age (already a dependency of tend-backup) rather than a second ECIES of our
//! own: its X25519 recipient stanza is a reviewed, specified format, a file sealed to several
//! devices is one artifact, and a device removed at a membership change is simply not among
//! the recipients of the new ring. A device's age identity is derived from its Ed25519 device
//! key ([`device_age_identity`]), so its recipient follows from its id alone.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::error::{malformed, VaultError};

/// The secret of one identity epoch's encryption key: a nonzero Ristretto scalar. Zeroed on
/// drop; its `Debug` does not print it.
#[derive(Clone)]
pub struct EpochSecretKey(pub(crate) Scalar);

impl EpochSecretKey {
    /// A fresh random secret.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        loop {
            let s = Scalar::random(rng);
            if s != Scalar::ZERO {
                return Self(s);
            }
        }
    }

    /// The public key `g^sk` that content keys are sealed to.
    pub fn public_key(&self) -> EpochPublicKey {
        EpochPublicKey::new(RistrettoPoint::mul_base(&self.0))
    }

    /// The canonical 32-byte little-endian scalar. Handle as a secret.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Strict decoding: a canonical, nonzero scalar.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        let s = decode_scalar(bytes, "epoch secret key")?;
        if s == Scalar::ZERO {
            return Err(malformed("epoch secret key", "zero"));
        }
        Ok(Self(s))
    }
}

impl Drop for EpochSecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for EpochSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochSecretKey(..)")
    }
}

/// The public encryption key of an identity epoch: a Ristretto point, never the identity.
/// Its encoding is kept beside it (it is hashed into every fragment check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochPublicKey(pub(crate) RistrettoPoint, [u8; 32]);

impl EpochPublicKey {
    fn new(point: RistrettoPoint) -> Self {
        Self(point, point.compress().to_bytes())
    }

    /// The canonical 32-byte compressed Ristretto encoding.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.1
    }

    /// Strict decoding: a canonical Ristretto encoding of a point other than the identity.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        let point = decode_point(bytes, "epoch public key")?;
        Ok(Self(
            point,
            bytes.try_into().expect("decode_point checked 32 bytes"),
        ))
    }
}

/// Decodes a canonical 32-byte Ristretto point that is not the identity.
pub(crate) fn decode_point(bytes: &[u8], what: &'static str) -> Result<RistrettoPoint, VaultError> {
    let compressed =
        CompressedRistretto::from_slice(bytes).map_err(|_| malformed(what, "wrong length"))?;
    // Ristretto decompression refuses every non-canonical encoding.
    let point = compressed
        .decompress()
        .ok_or_else(|| malformed(what, "not a canonical Ristretto point"))?;
    if point == RistrettoPoint::identity() {
        return Err(malformed(what, "the identity point"));
    }
    Ok(point)
}

/// Decodes a canonical 32-byte scalar (below the group order).
pub(crate) fn decode_scalar(bytes: &[u8], what: &'static str) -> Result<Scalar, VaultError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| malformed(what, "wrong length"))?;
    Option::from(Scalar::from_canonical_bytes(bytes))
        .ok_or_else(|| malformed(what, "not a canonical scalar"))
}

const RING_MAGIC: &[u8; 16] = b"tend-vault-ring1";
/// More epochs than any authority will see; bounds what a decoder allocates.
const MAX_RING_EPOCHS: usize = 1 << 16;

/// The epoch secrets a member device holds: the current identity epoch's and those of older
/// epochs whose capsules are still stored.
///
/// Umbral is single-hop (a capsule fragment cannot be re-encrypted again), so at each
/// advance the members issue key fragments from every older epoch still in use straight to
/// the new epoch (see [`crate::issue_advance_kfrags`]); that needs the older secrets.
#[derive(Clone, Debug)]
pub struct EpochKeyRing {
    current: u64,
    secrets: BTreeMap<u64, EpochSecretKey>,
}

impl EpochKeyRing {
    /// A ring holding only `secret` as identity epoch `epoch`'s (e.g. at genesis).
    pub fn new(epoch: u64, secret: EpochSecretKey) -> Self {
        Self {
            current: epoch,
            secrets: BTreeMap::from([(epoch, secret)]),
        }
    }

    /// The ring after an advance to `epoch` (which must be newer than the current one) with
    /// its fresh `secret`, keeping only the older epochs listed in `keep` (those whose
    /// capsules are still stored); secrets of other epochs are dropped (and zeroed).
    pub fn advance(
        &self,
        epoch: u64,
        secret: EpochSecretKey,
        keep: &[u64],
    ) -> Result<Self, VaultError> {
        if epoch <= self.current {
            return Err(malformed(
                "epoch key ring",
                "an advance must go to a newer epoch",
            ));
        }
        let mut secrets = BTreeMap::new();
        for e in keep {
            let old = self.secrets.get(e).ok_or(VaultError::MissingEpoch(*e))?;
            secrets.insert(*e, old.clone());
        }
        secrets.insert(epoch, secret);
        Ok(Self {
            current: epoch,
            secrets,
        })
    }

    /// The current identity epoch.
    pub fn current_epoch(&self) -> u64 {
        self.current
    }

    /// The current epoch's secret.
    pub fn current_secret(&self) -> &EpochSecretKey {
        &self.secrets[&self.current]
    }

    /// The secret of `epoch`, if the ring holds it.
    pub fn secret(&self, epoch: u64) -> Option<&EpochSecretKey> {
        self.secrets.get(&epoch)
    }

    /// The epochs the ring holds, ascending.
    pub fn epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.secrets.keys().copied()
    }

    /// Canonical encoding: magic, current epoch (u64 BE), count (u32 BE), then
    /// `(epoch u64 BE, scalar)` in strictly ascending epoch order. Handle as a secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + 40 * self.secrets.len());
        out.extend_from_slice(RING_MAGIC);
        out.extend_from_slice(&self.current.to_be_bytes());
        out.extend_from_slice(&(self.secrets.len() as u32).to_be_bytes());
        for (epoch, secret) in &self.secrets {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&secret.to_bytes());
        }
        out
    }

    /// Strict decoding of [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VaultError> {
        const WHAT: &str = "epoch key ring";
        if bytes.len() < 28 || &bytes[..16] != RING_MAGIC {
            return Err(malformed(WHAT, "bad magic or too short"));
        }
        let current = u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let count = u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes")) as usize;
        if count == 0 || count > MAX_RING_EPOCHS || bytes.len() != 28 + 40 * count {
            return Err(malformed(WHAT, "wrong length"));
        }
        let mut secrets = BTreeMap::new();
        let mut previous = None;
        for entry in bytes[28..].chunks_exact(40) {
            let epoch = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            if previous.is_some_and(|p| p >= epoch) {
                return Err(malformed(WHAT, "epochs not strictly ascending"));
            }
            previous = Some(epoch);
            secrets.insert(epoch, EpochSecretKey::from_bytes(&entry[8..])?);
        }
        if previous != Some(current) {
            return Err(malformed(
                WHAT,
                "the current epoch must be the newest entry",
            ));
        }
        Ok(Self { current, secrets })
    }
}

/// Seals `ring` to the age X25519 recipients of the member devices of its current epoch.
/// A device left out (removed at this change) cannot open it.
pub fn seal_key_ring(
    ring: &EpochKeyRing,
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<u8>, VaultError> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| VaultError::Age(e.to_string()))?;
    let mut sealed = Vec::new();
    let mut writer = encryptor.wrap_output(&mut sealed)?;
    let mut plain = ring.to_bytes();
    let written = writer.write_all(&plain);
    plain.zeroize();
    written?;
    writer.finish()?;
    Ok(sealed)
}

/// Opens a ring sealed by [`seal_key_ring`] with this device's age identity.
pub fn open_key_ring(
    sealed: &[u8],
    identity: &age::x25519::Identity,
) -> Result<EpochKeyRing, VaultError> {
    let decryptor = age::Decryptor::new(sealed).map_err(|e| VaultError::Age(e.to_string()))?;
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| VaultError::Age(e.to_string()))?;
    let mut plain = Vec::new();
    // A ring of MAX_RING_EPOCHS entries is under 3 MiB; read no more than that.
    let read = reader
        .by_ref()
        .take((28 + 40 * MAX_RING_EPOCHS + 1) as u64)
        .read_to_end(&mut plain);
    let ring = read
        .map_err(VaultError::from)
        .and_then(|_| EpochKeyRing::from_bytes(&plain));
    plain.zeroize();
    ring
}

/// The age X25519 identity of a device, derived from its Ed25519 device key by the standard
/// birational map (the clamped Ed25519 secret scalar is the X25519 secret, as libsodium's
/// `crypto_sign_ed25519_sk_to_curve25519` and age's own `ssh-ed25519` recipients do). So the
/// admin seals a key ring to a device it only knows by its id, even one that joins at this
/// very membership change and could not yet publish anything. Using one key for Ed25519
/// signatures and X25519 key agreement is analysed by Thormarker ("On using the same key
/// pair for Ed25519 and an X25519 based KEM", 2021).
pub fn device_age_identity(device_key: &ed25519_dalek::SigningKey) -> age::x25519::Identity {
    let mut scalar = device_key.to_scalar_bytes();
    let encoded = bech32::encode::<bech32::Bech32>(AGE_SECRET_HRP, &scalar);
    scalar.zeroize();
    let mut encoded = encoded
        .expect("32 bytes fit a Bech32 string")
        .to_uppercase();
    let identity = encoded
        .parse::<age::x25519::Identity>()
        .expect("a Bech32 X25519 secret age just accepts");
    encoded.zeroize();
    identity
}

/// The age X25519 recipient of device `device` (its Ed25519 public key, 32 bytes): the
/// Montgomery form of the point. Refuses bytes that are not an Ed25519 point.
pub fn device_age_recipient(device: &[u8; 32]) -> Result<age::x25519::Recipient, VaultError> {
    let key = ed25519_dalek::VerifyingKey::from_bytes(device)
        .map_err(|_| malformed("device key", "not an Ed25519 point"))?;
    let montgomery = key.to_montgomery().to_bytes();
    bech32::encode::<bech32::Bech32>(AGE_PUBLIC_HRP, &montgomery)
        .map_err(|_| malformed("device key", "not encodable"))?
        .parse::<age::x25519::Recipient>()
        .map_err(|_| malformed("device key", "not an X25519 recipient"))
}

const AGE_SECRET_HRP: bech32::Hrp = bech32::Hrp::parse_unchecked("AGE-SECRET-KEY-");
const AGE_PUBLIC_HRP: bech32::Hrp = bech32::Hrp::parse_unchecked("age");
