//! Authority membership facts: the genesis that names the members, threshold and group key,
//! and the membership changes that advance the identity epoch.

use serde::{Deserialize, Serialize};

use crate::encoding::to_canonical;
use crate::ids::{AuthorityId, DeviceId};

/// The authority's threshold group public key (an Ed25519 point). A FROST group signature
/// verifies against it as a plain Ed25519 signature. A one-device authority uses the
/// device's own key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct GroupKey(#[serde(with = "crate::encoding::fixed_bytes")] pub [u8; 32]);

impl GroupKey {
    /// Verifies an Ed25519 (or aggregated FROST Ed25519) signature over `msg`.
    pub fn verify(&self, msg: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }
}

/// The first fact of an authority. Its id is the hash of this body, so the genesis
/// certifies the namespace it lives in.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityGenesis {
    /// Caller-chosen randomness, so two authorities of the same members differ.
    #[serde(with = "crate::encoding::fixed_bytes")]
    pub nonce: [u8; 32],
    /// Sorted, without duplicates.
    pub members: Vec<DeviceId>,
    pub threshold: u16,
    pub group_key: GroupKey,
    /// The first admin; must be a member and the genesis fact's author.
    pub admin: DeviceId,
}

impl AuthorityGenesis {
    /// The id of the authority this genesis creates.
    pub fn authority_id(&self) -> AuthorityId {
        let mut h = blake3::Hasher::new();
        h.update(b"tend-authority-v1");
        h.update(&to_canonical(self));
        AuthorityId(*h.finalize().as_bytes())
    }

    /// Members sorted and unique, 1 <= threshold <= members, admin among them.
    pub fn is_well_formed(&self) -> bool {
        is_member_set(&self.members, self.threshold) && self.members.contains(&self.admin)
    }
}

/// A change of the member set, issued by the admin; it re-deals the group key and
/// advances the identity epoch by one.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipChange {
    /// The identity epoch this change starts: the previous one plus one.
    pub identity_epoch: u64,
    pub members: Vec<DeviceId>,
    pub threshold: u16,
    pub group_key: GroupKey,
}

impl MembershipChange {
    /// Members sorted and unique, 1 <= threshold <= members.
    pub fn is_well_formed(&self) -> bool {
        is_member_set(&self.members, self.threshold)
    }
}

fn is_member_set(members: &[DeviceId], threshold: u16) -> bool {
    members.windows(2).all(|w| w[0] < w[1])
        && threshold >= 1
        && usize::from(threshold) <= members.len()
}

/// Facts about the authority itself.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AuthorityFact {
    Genesis(AuthorityGenesis),
    MembershipChanged(MembershipChange),
}
