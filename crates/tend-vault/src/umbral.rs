//! Umbral's threshold proxy re-encryption KEM on the Ristretto group.
//!
//! The construction is the KEM of David Nuñez, "Umbral: A Threshold Proxy Re-Encryption
//! Scheme" (NuCypher, 2018, <https://github.com/nucypher/umbral-doc/blob/master/umbral-doc.pdf>),
//! section 3, with its capsule check, its key-fragment signature by the delegator, and its
//! non-interactive proof of correct re-encryption (section 3.2, "Verification of
//! re-encryption"). The group is Ristretto255 from `curve25519-dalek`; the paper's hash
//! functions H2..H6 are BLAKE3 in derive-key mode (one context string per function), widened
//! to 64 bytes and reduced mod the group order; its KDF is BLAKE3 derive-key as well. No
//! primitive is made here: only the paper's equations over a well-kept group and hash.
//!
//! Notation (the paper's): `g` the base point, `U` a second generator with unknown discrete
//! log to `g` (hashed to the group), the delegator `A` holds `a` with `pk_A = g^a`, the
//! receiver `B` holds `b`.
//!
//! - Encapsulate to `pk_A`: random `r, u`; `E = g^r`, `V = g^u`, `s = u + r·H2(E, V)`;
//!   capsule `(E, V, s)`, key `KDF(pk_A^(r+u))`.
//! - Capsule check: `g^s = V · E^H2(E, V)`. Every [`Capsule`] value has passed it.
//! - Decapsulate with `a`: `KDF((E·V)^a)`.
//! - ReKeyGen(a, pk_B, t, N): random `x_A`, `X_A = g^x_A`, `d = H3(X_A, pk_B, pk_B^x_A)`;
//!   a random polynomial `f` of degree `t - 1` with `f(0) = a/d`; `D = H6(pk_A, pk_B, pk_B^a)`.
//!   Fragment `i`: random `id`, `rk = f(H5(id, D))`, `U_1 = U^rk`, and the delegator's
//!   Schnorr signature `(z_1, z_2)` on `(id, pk_A, pk_B, U_1, X_A)`.
//! - ReEncapsulate: `E_1 = E^rk`, `V_1 = V^rk`, plus a proof that the same `rk` is behind
//!   `U_1`, `E_1` and `V_1` (a Chaum-Pedersen proof: `E_2 = E^t`, `V_2 = V^t`, `U_2 = U^t`,
//!   `h = H4(...)`, `z_3 = t + h·rk`).
//! - DecapsulateFrags with `b`: `D = H6(pk_A, pk_B, pk_A^b)`, Lagrange coefficients `λ_i` at
//!   0 over the points `H5(id_i, D)`; `E' = Π E_1,i^λ_i`, `V' = Π V_1,i^λ_i`;
//!   `d = H3(X_A, pk_B, X_A^b)`; key `KDF((E'·V')^d)`, which equals `KDF((E·V)^a)`.
//!
//! Umbral is single-hop: a capsule fragment is not a capsule and cannot be re-encrypted
//! again. A chain of epochs is served by key fragments from each older epoch straight to the
//! newest one (see [`crate::issue_advance_kfrags`]).
//!
//! Threat model of this module: a proxy holds key fragments and capsules; with fewer than
//! `t` fragments of a set it learns nothing of `a/d` (Shamir), and even with all of them it
//! holds only `a/d` for a random `d` known to `B` alone, so it cannot decapsulate. The API
//! makes that visible: every function that yields a key needs an [`EpochSecretKey`]. As the
//! paper states, `t` colluding proxies together with `B` learn `a`; in tend `B` is the next
//! epoch's membership, which may read everything sealed to `a` anyway.

use std::sync::LazyLock;

use curve25519_dalek::ristretto::{RistrettoBasepointTable, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{Identity, VartimeMultiscalarMul};
use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{malformed, VaultError};
use crate::keys::{decode_point, decode_scalar, EpochPublicKey, EpochSecretKey};

const H2_CAPSULE: &str = "tend-vault v1 2026-12 umbral H2 capsule check";
const H3_DH: &str = "tend-vault v1 2026-12 umbral H3 non-interactive DH";
const H4_PROOF: &str = "tend-vault v1 2026-12 umbral H4 re-encryption proof";
const H5_SHARE_X: &str = "tend-vault v1 2026-12 umbral H5 share x-coordinate";
const H6_DELEGATION: &str = "tend-vault v1 2026-12 umbral H6 delegation secret";
const H_KFRAG_SIGNATURE: &str = "tend-vault v1 2026-12 umbral key fragment signature";
const KDF_CONTEXT: &str = "tend-vault v1 2026-12 umbral KEM key";
const U_GENERATOR: &str = "tend-vault v1 2026-12 umbral generator U";

/// Most fragments in one set: plenty for a set of storage peers, and it bounds the work a
/// caller can ask for.
pub const MAX_KFRAGS: usize = 255;

/// The paper's second generator `U`: hashed to the group (Elligator on 64 uniform bytes),
/// so nobody knows its discrete log to `g`.
static U: LazyLock<RistrettoPoint> = LazyLock::new(|| {
    let mut wide = [0u8; 64];
    blake3::Hasher::new_derive_key(U_GENERATOR)
        .finalize_xof()
        .fill(&mut wide);
    RistrettoPoint::from_uniform_bytes(&wide)
});

/// The paper's `H_i : {0,1}* -> Z_q`, each input length-prefixed so the split between
/// inputs is unambiguous.
/// `U` compressed (it goes into every proof challenge) and as a precomputed table (the proxy
/// multiplies it once per capsule).
static U_BYTES: LazyLock<[u8; 32]> = LazyLock::new(|| bytes(&U));
static U_TABLE: LazyLock<RistrettoBasepointTable> =
    LazyLock::new(|| RistrettoBasepointTable::create(&U));

fn hash_to_scalar(context: &str, parts: &[&[u8]]) -> Scalar {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in parts {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let mut wide = [0u8; 64];
    hasher.finalize_xof().fill(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

fn bytes(p: &RistrettoPoint) -> [u8; 32] {
    p.compress().to_bytes()
}

fn random_nonzero(rng: &mut (impl RngCore + CryptoRng)) -> Scalar {
    loop {
        let s = Scalar::random(rng);
        if s != Scalar::ZERO {
            return s;
        }
    }
}

/// The 32-byte key a capsule encapsulates (the paper's `K`). Zeroed on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct KemKey([u8; 32]);

impl KemKey {
    fn derive(shared: &RistrettoPoint) -> Self {
        Self(blake3::derive_key(KDF_CONTEXT, &bytes(shared)))
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for KemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KemKey(..)")
    }
}

/// An Umbral capsule `(E, V, s)`; every value of this type has passed the capsule check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capsule {
    e: RistrettoPoint,
    v: RistrettoPoint,
    s: Scalar,
    // The encoding, kept: compressing a point costs an inversion, and the proxy hashes E and V
    // into every proof.
    encoded: [u8; CAPSULE_BYTES],
}

/// Length of an encoded [`Capsule`]: `E || V || s`.
pub const CAPSULE_BYTES: usize = 96;

impl Capsule {
    /// Encapsulates a fresh key to `delegating` (the epoch public key).
    pub fn encapsulate(
        rng: &mut (impl RngCore + CryptoRng),
        delegating: &EpochPublicKey,
    ) -> (Self, KemKey) {
        let mut r = random_nonzero(rng);
        let mut u = random_nonzero(rng);
        let e = RistrettoPoint::mul_base(&r);
        let v = RistrettoPoint::mul_base(&u);
        let mut encoded = [0u8; CAPSULE_BYTES];
        encoded[..32].copy_from_slice(&bytes(&e));
        encoded[32..64].copy_from_slice(&bytes(&v));
        let s = u + r * Self::h2(&encoded);
        encoded[64..].copy_from_slice(s.as_bytes());
        let mut ru = r + u;
        let key = KemKey::derive(&(delegating.0 * ru));
        r.zeroize();
        u.zeroize();
        ru.zeroize();
        (Self { e, v, s, encoded }, key)
    }

    /// `H2(E, V)` over the encoded points (the first 64 bytes of the encoding).
    fn h2(encoded: &[u8; CAPSULE_BYTES]) -> Scalar {
        hash_to_scalar(H2_CAPSULE, &[&encoded[..32], &encoded[32..64]])
    }

    fn e_bytes(&self) -> &[u8] {
        &self.encoded[..32]
    }

    fn v_bytes(&self) -> &[u8] {
        &self.encoded[32..64]
    }

    fn is_valid(&self) -> bool {
        // g^s == V · E^h, as V == g^s · E^-h.
        let h = Self::h2(&self.encoded);
        RistrettoPoint::vartime_double_scalar_mul_basepoint(&-h, &self.e, &self.s) == self.v
            // Beyond the paper: V = E^-1 passes the check yet makes (E·V)^a the identity for
            // every key, a capsule anyone could open; no honest capsule has it.
            && self.e + self.v != RistrettoPoint::identity()
    }

    /// Decapsulates with the secret of the epoch the capsule was made for. A secret of
    /// another epoch yields a different key, refused when the sealed content key is opened.
    pub fn decapsulate(&self, secret: &EpochSecretKey) -> KemKey {
        KemKey::derive(&((self.e + self.v) * secret.0))
    }

    /// Canonical encoding `E || V || s`.
    pub fn to_bytes(&self) -> [u8; CAPSULE_BYTES] {
        self.encoded
    }

    /// Strict decoding: canonical points other than the identity, a canonical scalar, and the
    /// capsule check.
    pub fn from_bytes(input: &[u8]) -> Result<Self, VaultError> {
        let encoded: [u8; CAPSULE_BYTES] = input
            .try_into()
            .map_err(|_| malformed("capsule", "wrong length"))?;
        let capsule = Self {
            e: decode_point(&input[..32], "capsule")?,
            v: decode_point(&input[32..64], "capsule")?,
            s: decode_scalar(&input[64..], "capsule")?,
            encoded,
        };
        if !capsule.is_valid() {
            return Err(VaultError::InvalidCapsule);
        }
        Ok(capsule)
    }
}

/// `D = H6(pk_A, pk_B, shared)` where `shared = pk_B^a = pk_A^b`.
fn delegation_secret(a: &EpochPublicKey, b: &EpochPublicKey, shared: &RistrettoPoint) -> Scalar {
    hash_to_scalar(
        H6_DELEGATION,
        &[&a.to_bytes(), &b.to_bytes(), &bytes(shared)],
    )
}

/// `d = H3(X_A, pk_B, shared)` where `shared = pk_B^x_A = X_A^b`.
fn dh_factor(precursor: &RistrettoPoint, b: &EpochPublicKey, shared: &RistrettoPoint) -> Scalar {
    hash_to_scalar(H3_DH, &[&bytes(precursor), &b.to_bytes(), &bytes(shared)])
}

fn share_x(id: &Scalar, delegation: &Scalar) -> Scalar {
    hash_to_scalar(H5_SHARE_X, &[id.as_bytes(), delegation.as_bytes()])
}

/// The delegator's signature challenge over `(Y, id, pk_A, pk_B, U_1, X_A)`, the last two
/// as encoded points.
fn kfrag_challenge(
    commitment_y: &RistrettoPoint,
    id: &Scalar,
    a: &EpochPublicKey,
    b: &EpochPublicKey,
    u1: &[u8],
    precursor: &[u8],
) -> Scalar {
    hash_to_scalar(
        H_KFRAG_SIGNATURE,
        &[
            &bytes(commitment_y),
            id.as_bytes(),
            &a.to_bytes(),
            &b.to_bytes(),
            u1,
            precursor,
        ],
    )
}

/// A key fragment: one share of the re-encryption key from epoch key A to epoch key B,
/// signed by A's secret. Its secret part `rk` is zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFrag {
    id: Scalar,
    rk: Scalar,
    precursor: RistrettoPoint,
    commitment: RistrettoPoint,
    z1: Scalar,
    z2: Scalar,
}

/// Length of an encoded [`KeyFrag`]: `id || rk || X_A || U_1 || z_1 || z_2`.
pub const KFRAG_BYTES: usize = 192;

impl Drop for KeyFrag {
    fn drop(&mut self) {
        self.rk.zeroize();
    }
}

impl std::fmt::Debug for KeyFrag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFrag")
            .field("id", &hex_prefix(self.id.as_bytes()))
            .finish_non_exhaustive()
    }
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(6).map(|x| format!("{x:02x}")).collect()
}

impl KeyFrag {
    /// Checks the commitment `U_1 = U^rk` and A's signature over the fragment for these two
    /// epoch keys. A fragment for another pair of epochs (a stale one) fails here.
    pub fn verify(
        self,
        delegating: &EpochPublicKey,
        receiving: &EpochPublicKey,
    ) -> Result<VerifiedKeyFrag, VaultError> {
        let precursor_bytes = bytes(&self.precursor);
        let commitment_bytes = bytes(&self.commitment);
        if &self.rk * &*U_TABLE != self.commitment
            || !kfrag_signature_holds(
                &self.id,
                &commitment_bytes,
                &precursor_bytes,
                &self.z1,
                &self.z2,
                delegating,
                receiving,
            )
        {
            return Err(VaultError::InvalidKeyFrag);
        }
        Ok(VerifiedKeyFrag {
            kfrag: self,
            delegating: *delegating,
            receiving: *receiving,
            precursor_bytes,
            commitment_bytes,
        })
    }

    /// Canonical encoding. It holds a share of the re-encryption key: give it only to the
    /// proxy it is meant for.
    pub fn to_bytes(&self) -> [u8; KFRAG_BYTES] {
        let mut out = [0u8; KFRAG_BYTES];
        out[..32].copy_from_slice(self.id.as_bytes());
        out[32..64].copy_from_slice(self.rk.as_bytes());
        out[64..96].copy_from_slice(&bytes(&self.precursor));
        out[96..128].copy_from_slice(&bytes(&self.commitment));
        out[128..160].copy_from_slice(self.z1.as_bytes());
        out[160..].copy_from_slice(self.z2.as_bytes());
        out
    }

    /// Strict decoding (canonical points and scalars); verify it before use.
    pub fn from_bytes(input: &[u8]) -> Result<Self, VaultError> {
        const WHAT: &str = "key fragment";
        if input.len() != KFRAG_BYTES {
            return Err(malformed(WHAT, "wrong length"));
        }
        Ok(Self {
            id: decode_scalar(&input[..32], WHAT)?,
            rk: decode_scalar(&input[32..64], WHAT)?,
            precursor: decode_point(&input[64..96], WHAT)?,
            commitment: decode_point(&input[96..128], WHAT)?,
            z1: decode_scalar(&input[128..160], WHAT)?,
            z2: decode_scalar(&input[160..], WHAT)?,
        })
    }
}

/// `Y = g^z2 · pk_A^z1`, then `z1 == H(Y, id, pk_A, pk_B, U_1, X_A)`.
fn kfrag_signature_holds(
    id: &Scalar,
    commitment: &[u8],
    precursor: &[u8],
    z1: &Scalar,
    z2: &Scalar,
    delegating: &EpochPublicKey,
    receiving: &EpochPublicKey,
) -> bool {
    let y = RistrettoPoint::vartime_double_scalar_mul_basepoint(z1, &delegating.0, z2);
    kfrag_challenge(&y, id, delegating, receiving, commitment, precursor) == *z1
}

/// A key fragment that verified for a delegating and a receiving epoch key: the only kind a
/// proxy can re-encrypt with.
#[derive(Clone, Debug)]
pub struct VerifiedKeyFrag {
    kfrag: KeyFrag,
    delegating: EpochPublicKey,
    receiving: EpochPublicKey,
    // Compressed once: they go into every capsule fragment the proxy makes.
    precursor_bytes: [u8; 32],
    commitment_bytes: [u8; 32],
}

impl VerifiedKeyFrag {
    /// The fragment, e.g. to encode it for a proxy.
    pub fn kfrag(&self) -> &KeyFrag {
        &self.kfrag
    }

    /// The epoch key it re-encrypts from.
    pub fn delegating(&self) -> &EpochPublicKey {
        &self.delegating
    }

    /// The epoch key it re-encrypts to.
    pub fn receiving(&self) -> &EpochPublicKey {
        &self.receiving
    }
}

/// Makes `shares` key fragments from `delegating`'s secret to `receiving`, any `threshold`
/// of which re-encrypt a capsule (Umbral ReKeyGen).
pub fn generate_kfrags(
    rng: &mut (impl RngCore + CryptoRng),
    delegating: &EpochSecretKey,
    receiving: &EpochPublicKey,
    threshold: usize,
    shares: usize,
) -> Result<Vec<VerifiedKeyFrag>, VaultError> {
    if threshold == 0 || threshold > shares || shares > MAX_KFRAGS {
        return Err(VaultError::BadThreshold { threshold, shares });
    }
    let a = &delegating.0;
    let pk_a = delegating.public_key();
    let mut x_a = random_nonzero(rng);
    let precursor = RistrettoPoint::mul_base(&x_a);
    let precursor_bytes = bytes(&precursor);
    let d = dh_factor(&precursor, receiving, &(receiving.0 * x_a));
    x_a.zeroize();
    let delegation = delegation_secret(&pk_a, receiving, &(receiving.0 * a));
    // f(0) = a/d; d is a hash output, zero only with negligible probability.
    let mut coefficients = Vec::with_capacity(threshold);
    coefficients.push(a * d.invert());
    for _ in 1..threshold {
        coefficients.push(Scalar::random(rng));
    }
    let mut kfrags = Vec::with_capacity(shares);
    for _ in 0..shares {
        let id = Scalar::random(rng);
        let x = share_x(&id, &delegation);
        // Horner's rule.
        let rk = coefficients
            .iter()
            .rev()
            .fold(Scalar::ZERO, |acc, c| acc * x + c);
        let commitment = &rk * &*U_TABLE;
        let commitment_bytes = bytes(&commitment);
        let mut y = random_nonzero(rng);
        let z1 = kfrag_challenge(
            &RistrettoPoint::mul_base(&y),
            &id,
            &pk_a,
            receiving,
            &commitment_bytes,
            &precursor_bytes,
        );
        let z2 = y - a * z1;
        y.zeroize();
        kfrags.push(VerifiedKeyFrag {
            kfrag: KeyFrag {
                id,
                rk,
                precursor,
                commitment,
                z1,
                z2,
            },
            delegating: pk_a,
            receiving: *receiving,
            precursor_bytes,
            commitment_bytes,
        });
    }
    coefficients.zeroize();
    Ok(kfrags)
}

/// A capsule fragment: a capsule re-encrypted by one key fragment, with the proof that it
/// was done with that fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleFrag {
    e1: RistrettoPoint,
    v1: RistrettoPoint,
    id: Scalar,
    precursor: RistrettoPoint,
    // The proof: E_2, V_2, U_2, the fragment's U_1 and signature, and z_3.
    e2: RistrettoPoint,
    v2: RistrettoPoint,
    u2: RistrettoPoint,
    u1: RistrettoPoint,
    z1: Scalar,
    z2: Scalar,
    z3: Scalar,
    // The encoding, built once: the proof challenge hashes the compressed points.
    encoded: [u8; CFRAG_BYTES],
}

/// Length of an encoded [`CapsuleFrag`]: 11 fields of 32 bytes, in the order
/// `E_1, V_1, id, X_A, E_2, V_2, U_2, U_1, z_1, z_2, z_3`.
pub const CFRAG_BYTES: usize = 352;

fn cfrag_field(encoded: &[u8; CFRAG_BYTES], i: usize) -> &[u8] {
    &encoded[32 * i..32 * (i + 1)]
}

/// The proof's challenge `h = H4(E, E_1, E_2, V, V_1, V_2, U, U_1, U_2, id, X_A)`, over the
/// encoded fragment (its first ten fields; `z_3` depends on `h`). Beyond the paper's list,
/// the fragment's id and precursor tie the proof to one key fragment.
fn proof_challenge(capsule: &Capsule, encoded: &[u8; CFRAG_BYTES]) -> Scalar {
    let f = |i| cfrag_field(encoded, i);
    hash_to_scalar(
        H4_PROOF,
        &[
            capsule.e_bytes(),
            f(0),
            f(4),
            capsule.v_bytes(),
            f(1),
            f(5),
            &*U_BYTES,
            f(7),
            f(6),
            f(2),
            f(3),
        ],
    )
}

/// Re-encrypts `capsule` with one verified key fragment (Umbral ReEncapsulate), on the
/// proxy. The proxy needs no secret key and learns no content key.
pub fn reencrypt(
    rng: &mut (impl RngCore + CryptoRng),
    kfrag: &VerifiedKeyFrag,
    capsule: &Capsule,
) -> CapsuleFrag {
    let k = &kfrag.kfrag;
    let e1 = capsule.e * k.rk;
    let v1 = capsule.v * k.rk;
    let mut t = random_nonzero(rng);
    let e2 = capsule.e * t;
    let v2 = capsule.v * t;
    let u2 = &t * &*U_TABLE;
    let mut encoded = [0u8; CFRAG_BYTES];
    let fields: [[u8; 32]; 10] = [
        bytes(&e1),
        bytes(&v1),
        k.id.to_bytes(),
        kfrag.precursor_bytes,
        bytes(&e2),
        bytes(&v2),
        bytes(&u2),
        kfrag.commitment_bytes,
        k.z1.to_bytes(),
        k.z2.to_bytes(),
    ];
    for (slot, field) in encoded.chunks_exact_mut(32).zip(fields) {
        slot.copy_from_slice(&field);
    }
    let h = proof_challenge(capsule, &encoded);
    let z3 = t + h * k.rk;
    t.zeroize();
    encoded[320..].copy_from_slice(z3.as_bytes());
    CapsuleFrag {
        e1,
        v1,
        id: k.id,
        precursor: k.precursor,
        e2,
        v2,
        u2,
        u1: k.commitment,
        z1: k.z1,
        z2: k.z2,
        z3,
        encoded,
    }
}

impl CapsuleFrag {
    /// Checks the re-encryption proof against `capsule` and the key fragment's signature
    /// against the two epoch keys: a fragment made from another capsule, by a forged or stale
    /// key fragment, or tampered with in transit is refused.
    pub fn verify(
        self,
        capsule: &Capsule,
        delegating: &EpochPublicKey,
        receiving: &EpochPublicKey,
    ) -> Result<VerifiedCapsuleFrag, VaultError> {
        let h = proof_challenge(capsule, &self.encoded);
        let holds = |base: &RistrettoPoint, blinded: &RistrettoPoint, image: &RistrettoPoint| {
            // base^z3 == blinded · image^h
            RistrettoPoint::vartime_multiscalar_mul([self.z3, -h], [*base, *image]) == *blinded
        };
        if !holds(&capsule.e, &self.e2, &self.e1)
            || !holds(&capsule.v, &self.v2, &self.v1)
            || !holds(&U, &self.u2, &self.u1)
            || !kfrag_signature_holds(
                &self.id,
                cfrag_field(&self.encoded, 7),
                cfrag_field(&self.encoded, 3),
                &self.z1,
                &self.z2,
                delegating,
                receiving,
            )
        {
            return Err(VaultError::InvalidCapsuleFrag);
        }
        Ok(VerifiedCapsuleFrag {
            cfrag: self,
            capsule: *capsule,
            delegating: *delegating,
            receiving: *receiving,
        })
    }

    /// The canonical encoding.
    pub fn to_bytes(&self) -> [u8; CFRAG_BYTES] {
        self.encoded
    }

    /// Strict decoding (canonical points and scalars); verify it before use.
    pub fn from_bytes(input: &[u8]) -> Result<Self, VaultError> {
        const WHAT: &str = "capsule fragment";
        let encoded: [u8; CFRAG_BYTES] = input
            .try_into()
            .map_err(|_| malformed(WHAT, "wrong length"))?;
        let field = |i: usize| cfrag_field(&encoded, i);
        Ok(Self {
            e1: decode_point(field(0), WHAT)?,
            v1: decode_point(field(1), WHAT)?,
            id: decode_scalar(field(2), WHAT)?,
            precursor: decode_point(field(3), WHAT)?,
            e2: decode_point(field(4), WHAT)?,
            v2: decode_point(field(5), WHAT)?,
            u2: decode_point(field(6), WHAT)?,
            u1: decode_point(field(7), WHAT)?,
            z1: decode_scalar(field(8), WHAT)?,
            z2: decode_scalar(field(9), WHAT)?,
            z3: decode_scalar(field(10), WHAT)?,
            encoded,
        })
    }
}

/// A capsule fragment whose proof verified for one capsule and two epoch keys.
#[derive(Clone, Debug)]
pub struct VerifiedCapsuleFrag {
    cfrag: CapsuleFrag,
    capsule: Capsule,
    delegating: EpochPublicKey,
    receiving: EpochPublicKey,
}

impl VerifiedCapsuleFrag {
    /// The fragment, e.g. to send it to a reader.
    pub fn cfrag(&self) -> &CapsuleFrag {
        &self.cfrag
    }
}

/// Decapsulates a re-encrypted capsule with the receiving epoch's secret and at least
/// `threshold` verified capsule fragments of one key-fragment set (Umbral
/// DecapsulateFrags). Too few fragments yield a wrong key, which the sealed content key
/// refuses to open with.
pub fn decapsulate_reencrypted(
    receiving: &EpochSecretKey,
    delegating: &EpochPublicKey,
    capsule: &Capsule,
    cfrags: &[VerifiedCapsuleFrag],
) -> Result<KemKey, VaultError> {
    let first = cfrags
        .first()
        .ok_or(VaultError::CapsuleFragsMismatch("no capsule fragments"))?;
    if cfrags.iter().any(|c| c.capsule != *capsule) {
        return Err(VaultError::CapsuleFragsMismatch(
            "a fragment was verified against another capsule",
        ));
    }
    let pk_b = receiving.public_key();
    if cfrags
        .iter()
        .any(|c| c.delegating != *delegating || c.receiving != pk_b)
    {
        return Err(VaultError::CapsuleFragsMismatch(
            "a fragment was verified for other epoch keys",
        ));
    }
    let precursor = first.cfrag.precursor;
    if cfrags.iter().any(|c| c.cfrag.precursor != precursor) {
        return Err(VaultError::CapsuleFragsMismatch(
            "fragments come from different key-fragment sets",
        ));
    }
    let b = &receiving.0;
    let delegation = delegation_secret(delegating, &pk_b, &(delegating.0 * b));
    let xs: Vec<Scalar> = cfrags
        .iter()
        .map(|c| share_x(&c.cfrag.id, &delegation))
        .collect();
    for (i, x) in xs.iter().enumerate() {
        if xs[..i].contains(x) {
            return Err(VaultError::CapsuleFragsMismatch("the same fragment twice"));
        }
    }
    // Lagrange coefficient at 0 for point i: Π_{j≠i} x_j / (x_j - x_i).
    let lambdas: Vec<Scalar> = xs
        .iter()
        .enumerate()
        .map(|(i, xi)| {
            let (num, den) = xs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .fold((Scalar::ONE, Scalar::ONE), |(n, d), (_, xj)| {
                    (n * xj, d * (xj - xi))
                });
            num * den.invert()
        })
        .collect();
    let combined = RistrettoPoint::vartime_multiscalar_mul(
        lambdas.iter().chain(lambdas.iter()),
        cfrags
            .iter()
            .map(|c| c.cfrag.e1)
            .chain(cfrags.iter().map(|c| c.cfrag.v1)),
    );
    let d = dh_factor(&precursor, &pk_b, &(precursor * b));
    let shared = combined * d;
    if shared == RistrettoPoint::identity() {
        return Err(VaultError::OpenFailed);
    }
    Ok(KemKey::derive(&shared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    /// A capsule fragment made as an honest prover would, except that `E_1 = E^e_exp` and
    /// `V_1 = V^v_exp`: a proxy that lies about one of the two.
    fn forged_cfrag(
        kfrag: &VerifiedKeyFrag,
        capsule: &Capsule,
        e_exp: Scalar,
        v_exp: Scalar,
    ) -> CapsuleFrag {
        let k = &kfrag.kfrag;
        let t = Scalar::random(&mut OsRng);
        let (e1, v1) = (capsule.e * e_exp, capsule.v * v_exp);
        let (e2, v2, u2) = (capsule.e * t, capsule.v * t, *U * t);
        let mut encoded = [0u8; CFRAG_BYTES];
        let fields = [
            bytes(&e1),
            bytes(&v1),
            k.id.to_bytes(),
            kfrag.precursor_bytes,
            bytes(&e2),
            bytes(&v2),
            bytes(&u2),
            kfrag.commitment_bytes,
            k.z1.to_bytes(),
            k.z2.to_bytes(),
        ];
        for (slot, field) in encoded.chunks_exact_mut(32).zip(fields) {
            slot.copy_from_slice(&field);
        }
        let z3 = t + proof_challenge(capsule, &encoded) * k.rk;
        encoded[320..].copy_from_slice(z3.as_bytes());
        CapsuleFrag::from_bytes(&encoded).unwrap()
    }

    /// Each of the proof's equations matters: a proxy that re-encrypts E or V with another
    /// exponent than the one committed in `U_1`, and proves honestly otherwise, is caught.
    #[test]
    fn proof_catches_a_proxy_lying_about_e1_or_v1() {
        let a = EpochSecretKey::generate(&mut OsRng);
        let b = EpochSecretKey::generate(&mut OsRng);
        let (pa, pb) = (a.public_key(), b.public_key());
        let (capsule, _) = Capsule::encapsulate(&mut OsRng, &pa);
        let kfrag = generate_kfrags(&mut OsRng, &a, &pb, 1, 1)
            .unwrap()
            .remove(0);
        let rk = kfrag.kfrag.rk;
        let other = rk + Scalar::ONE;
        assert!(forged_cfrag(&kfrag, &capsule, rk, rk)
            .verify(&capsule, &pa, &pb)
            .is_ok());
        for (e_exp, v_exp) in [(other, rk), (rk, other)] {
            assert!(matches!(
                forged_cfrag(&kfrag, &capsule, e_exp, v_exp).verify(&capsule, &pa, &pb),
                Err(VaultError::InvalidCapsuleFrag)
            ));
        }
    }

    /// `V = E^-1` with `s = r·(h - 1)` passes the paper's check `g^s = V·E^h`, yet every key
    /// would decapsulate it to the identity point: decoding refuses it.
    #[test]
    fn capsule_that_decapsulates_to_the_identity_is_refused() {
        let r = Scalar::from(7u64);
        let e = RistrettoPoint::mul_base(&r);
        let v = -e;
        let mut encoded = [0u8; CAPSULE_BYTES];
        encoded[..32].copy_from_slice(&bytes(&e));
        encoded[32..64].copy_from_slice(&bytes(&v));
        let s = r * (Capsule::h2(&encoded) - Scalar::ONE);
        encoded[64..].copy_from_slice(s.as_bytes());
        assert_eq!(
            RistrettoPoint::mul_base(&s),
            v + e * Capsule::h2(&encoded),
            "the paper's check alone accepts it"
        );
        assert!(matches!(
            Capsule::from_bytes(&encoded),
            Err(VaultError::InvalidCapsule)
        ));
    }
}
