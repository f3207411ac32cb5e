//! Vault facts and their reduction: an identity epoch's encryption key with its key ring
//! sealed to the members, the re-encryption key fragments of an epoch advance, the admin's
//! grant that admits a storage peer, and a member's record of a blob's encrypted copy
//! (docs/ARCHITECTURE.md section 14).
//!
//! tend-core only carries the bytes (it has no curve arithmetic); `tend-vault` decodes the
//! keys, fragments and sealed rings, and refuses malformed ones where they are used.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ids::{ContentId, DeviceId, Epoch};

/// Admin: the public encryption key of identity epoch `identity_epoch`, its secret sealed
/// with age to every member device of that epoch, and the history (the secrets of every
/// epoch with a key) sealed to the admin alone, who issues the next advance's re-encryption
/// fragments. Written by the admin that signs the membership change (or enables the vault),
/// at an epoch of that membership.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultEpochKey {
    pub identity_epoch: u64,
    /// A canonical Ristretto point (`tend_vault::EpochPublicKey`).
    #[serde(with = "crate::encoding::fixed_bytes")]
    pub public_key: [u8; 32],
    /// `tend_vault::seal_key_ring` of a ring holding this epoch's secret only, to the
    /// members' X25519 recipients: members read older blobs through re-encryption.
    pub sealed_ring: ByteBuf,
    /// `tend_vault::seal_key_ring` of the ring of every epoch with a key, to the admin.
    pub sealed_history: ByteBuf,
}

/// Admin: Umbral key fragments from the key of identity epoch `from_epoch` to that of
/// `to_epoch` (the current one when written), any `threshold` of which re-encrypt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultRekey {
    pub from_epoch: u64,
    pub to_epoch: u64,
    pub threshold: u16,
    /// Encoded `tend_vault::KeyFrag`s.
    pub kfrags: Vec<ByteBuf>,
}

/// Admin: admits (`granted`) or revokes a storage peer, named by its device (endpoint) id.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageGrant {
    pub peer: DeviceId,
    pub granted: bool,
}

/// Any member: the blob `blob` (a plaintext CID of the store) has an encrypted copy named
/// `encrypted` (the CID of its ciphertext) on the storage peers. Storage peers never receive
/// this fact: it links a plaintext CID to a ciphertext.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultCopy {
    pub blob: ContentId,
    pub encrypted: ContentId,
}

/// The reduced vault state of a journal (a part of `MaintenanceState`).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct VaultState {
    /// Identity epoch -> its key; the first valid fact in `(epoch, id)` order wins.
    pub epoch_keys: BTreeMap<u64, VaultEpochKey>,
    /// `(from, to)` -> the fragments; the first valid fact wins.
    pub rekeys: BTreeMap<(u64, u64), VaultRekey>,
    /// Storage peer -> whether it is admitted (the latest grant or revocation wins).
    pub storage_peers: BTreeMap<DeviceId, bool>,
    /// Plaintext blob -> its first recorded encrypted copy.
    pub copies: BTreeMap<ContentId, ContentId>,
}

impl VaultState {
    /// Whether `peer` holds a standing grant.
    pub fn is_storage_peer(&self, peer: &DeviceId) -> bool {
        self.storage_peers.get(peer).copied().unwrap_or(false)
    }

    /// Folds an epoch key written at `identity_epoch_at` (the identity epoch governing the
    /// fact's epoch): it must name that epoch, so a key cannot be planted for another one.
    pub(crate) fn apply_epoch_key(&mut self, k: &VaultEpochKey, identity_epoch_at: u64) -> bool {
        if k.identity_epoch != identity_epoch_at || self.epoch_keys.contains_key(&k.identity_epoch)
        {
            return false;
        }
        self.epoch_keys.insert(k.identity_epoch, k.clone());
        true
    }

    /// Folds re-encryption fragments: from an older epoch to the one governing the fact.
    pub(crate) fn apply_rekey(&mut self, r: &VaultRekey, identity_epoch_at: u64) -> bool {
        let ok = r.from_epoch < r.to_epoch
            && r.to_epoch == identity_epoch_at
            && r.threshold >= 1
            && usize::from(r.threshold) <= r.kfrags.len()
            && !self.rekeys.contains_key(&(r.from_epoch, r.to_epoch));
        if ok {
            self.rekeys.insert((r.from_epoch, r.to_epoch), r.clone());
        }
        ok
    }

    pub(crate) fn apply_grant(&mut self, g: &StorageGrant) {
        self.storage_peers.insert(g.peer, g.granted);
    }

    pub(crate) fn apply_copy(&mut self, c: &VaultCopy) {
        self.copies.entry(c.blob).or_insert(c.encrypted);
    }

    /// A canonical encoding for the maintenance state digest (maps become sorted lists).
    pub(crate) fn digest_body(&self) -> impl Serialize + '_ {
        let keys: Vec<_> = self.epoch_keys.values().collect();
        let rekeys: Vec<_> = self.rekeys.values().collect();
        let peers: Vec<_> = self.storage_peers.iter().collect();
        let copies: Vec<_> = self.copies.iter().collect();
        (keys, rekeys, peers, copies)
    }
}

/// The identity epoch of the membership governing facts at `epoch`, if any.
pub(crate) fn identity_epoch_at(state: &crate::reduce::MaintenanceState, epoch: Epoch) -> u64 {
    state.membership_at(epoch).map_or(0, |m| m.identity_epoch)
}
