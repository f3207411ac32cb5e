//! FROST Ed25519 signing rounds: nonce commitments (round 1), signature shares (round 2),
//! aggregation, and verification against the authority's group key.
//!
//! Participants are named by [`DeviceId`]; the mapping to FROST identifiers is
//! [`frost_identifier`]. Commitments, shares and public shares are serializable bytes so a
//! coordinator on another device can collect them; nonces never leave memory and are
//! consumed by [`sign_share`], because reusing a nonce leaks the secret share.

use std::collections::BTreeMap;

use frost_ed25519 as frost;
use rand_core::{CryptoRng, RngCore};
use tend_core::{DeviceId, GroupKey};

use crate::dkg::frost_identifier;
use crate::share::{group_key_of, KeyShare};

/// Why a signing step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{have} signers, but the threshold is {need}")]
    NotEnoughSigners { have: usize, need: u16 },
    #[error("device {0:?} is not among the signers of this package")]
    NotASigner(DeviceId),
    #[error("a signer's commitment in the package differs from the one it made")]
    CommitmentMismatch,
    #[error("invalid signature shares from {0:?}")]
    InvalidShares(Vec<DeviceId>),
    #[error("signers of the shares differ from the signers of the commitments")]
    SignerMismatch,
    #[error("the aggregated signature does not verify against the group key")]
    BadSignature,
    #[error("FROST: {0}")]
    Frost(String),
}

/// Round-1 secret nonces of one signer for one signing. Not `Clone`, not serializable:
/// used at most once, by [`sign_share`].
pub struct SigningNonces(frost::round1::SigningNonces);

impl std::fmt::Debug for SigningNonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningNonces(..)")
    }
}

/// A signer's public round-1 commitment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Commitment(frost::round1::SigningCommitments);

impl Commitment {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.serialize().expect("valid commitments serialize")
    }

    /// Parses wire bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignError> {
        frost::round1::SigningCommitments::deserialize(bytes)
            .map(Self)
            .map_err(|e| malformed("commitment", e))
    }
}

/// A signer's round-2 signature share.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SignatureShare(frost::round2::SignatureShare);

impl SignatureShare {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.serialize()
    }

    /// Parses wire bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignError> {
        frost::round2::SignatureShare::deserialize(bytes)
            .map(Self)
            .map_err(|e| malformed("signature share", e))
    }
}

/// The public half of a DKG result: every member's verifying share and the group key.
/// A coordinator needs it to check shares and aggregate.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PublicShares {
    package: frost::keys::PublicKeyPackage,
    group_key: GroupKey,
}

impl PublicShares {
    pub(crate) fn from_frost(package: frost::keys::PublicKeyPackage, group_key: GroupKey) -> Self {
        Self { package, group_key }
    }

    /// The group key.
    pub fn group_key(&self) -> GroupKey {
        self.group_key
    }

    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.package
            .serialize()
            .expect("a valid public package serializes")
    }

    /// Parses wire bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignError> {
        let package = frost::keys::PublicKeyPackage::deserialize(bytes)
            .map_err(|e| malformed("public shares", e))?;
        let group_key =
            group_key_of(package.verifying_key()).map_err(|reason| SignError::Malformed {
                what: "public shares",
                reason,
            })?;
        Ok(Self { package, group_key })
    }
}

fn malformed(what: &'static str, e: impl std::fmt::Display) -> SignError {
    SignError::Malformed {
        what,
        reason: e.to_string(),
    }
}

/// Round 1: fresh nonces and the commitment to publish.
pub fn commit(
    share: &KeyShare,
    rng: &mut (impl RngCore + CryptoRng),
) -> (SigningNonces, Commitment) {
    let (nonces, commitments) = frost::round1::commit(share.key_package().signing_share(), rng);
    (SigningNonces(nonces), Commitment(commitments))
}

fn signing_package(
    commitments: &BTreeMap<DeviceId, Commitment>,
    message: &[u8],
) -> frost::SigningPackage {
    let map = commitments
        .iter()
        .map(|(d, c)| (frost_identifier(d), c.0))
        .collect();
    frost::SigningPackage::new(map, message)
}

/// Round 2: this device's signature share over `message`, given the commitments of every
/// chosen signer (its own included). Consumes the nonces.
pub fn sign_share(
    share: &KeyShare,
    nonces: SigningNonces,
    commitments: &BTreeMap<DeviceId, Commitment>,
    message: &[u8],
) -> Result<SignatureShare, SignError> {
    let me = share.device_id();
    let mine = commitments.get(&me).ok_or(SignError::NotASigner(me))?;
    if mine.0 != *nonces.0.commitments() {
        return Err(SignError::CommitmentMismatch);
    }
    if commitments.len() < usize::from(share.threshold()) {
        return Err(SignError::NotEnoughSigners {
            have: commitments.len(),
            need: share.threshold(),
        });
    }
    let package = signing_package(commitments, message);
    frost::round2::sign(&package, &nonces.0, share.key_package())
        .map(SignatureShare)
        .map_err(|e| SignError::Frost(e.to_string()))
}

/// Checks every share and aggregates them into the group's Ed25519 signature over
/// `message`; the result verifies with [`verify`]. Invalid shares are named.
pub fn aggregate(
    public: &PublicShares,
    commitments: &BTreeMap<DeviceId, Commitment>,
    shares: &BTreeMap<DeviceId, SignatureShare>,
    message: &[u8],
) -> Result<[u8; 64], SignError> {
    if !commitments.keys().eq(shares.keys()) {
        return Err(SignError::SignerMismatch);
    }
    let package = signing_package(commitments, message);
    let frost_shares = shares
        .iter()
        .map(|(d, s)| (frost_identifier(d), s.0))
        .collect();
    let signature = frost::aggregate(&package, &frost_shares, &public.package).map_err(|e| {
        let culprits = e.culprits();
        if culprits.is_empty() {
            SignError::Frost(e.to_string())
        } else {
            SignError::InvalidShares(
                shares
                    .keys()
                    .filter(|d| culprits.contains(&frost_identifier(d)))
                    .copied()
                    .collect(),
            )
        }
    })?;
    let bytes = signature
        .serialize()
        .map_err(|e| SignError::Frost(e.to_string()))?;
    let sig: [u8; 64] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SignError::Frost("signature is not 64 bytes".into()))?;
    // Belt and braces: what we publish must verify the way every reader checks it.
    if !verify(&public.group_key, message, &sig) {
        return Err(SignError::BadSignature);
    }
    Ok(sig)
}

/// Verifies a group signature the way the reducer does: plain Ed25519 `verify_strict`.
pub fn verify(group_key: &GroupKey, message: &[u8], signature: &[u8; 64]) -> bool {
    group_key.verify(message, signature)
}
