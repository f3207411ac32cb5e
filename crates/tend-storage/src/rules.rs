//! The storage peer's rules, sans-IO: which pushed facts it admits, whom it serves, which
//! blobs it stores, and the re-encryption of stored sealed keys an epoch advance asks for.
//!
//! The storage peer never syncs the journal: members push it only the facts it needs to
//! know the members, the admin and its own grant (genesis, membership changes, admin
//! replacements, vault epoch keys, re-encryption fragments, storage grants), each checked
//! by signature and by the same reducer the members run. Application facts, which hold
//! small values in clear, never reach it.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::{CryptoRng, RngCore};
use tend_core::maintenance::MaintenanceFact;
use tend_core::{
    reduce, AuthorityFact, AuthorityId, ContentId, DeviceId, FactId, JournalNamespace,
    MaintenanceState, Payload, VerifiedFact,
};
use tend_vault::{
    reencrypt, BlobHeader, EpochPublicKey, KeyFrag, SealedContentKey, VerifiedKeyFrag,
};

use crate::error::StorageError;
use crate::protocol::MAX_VAULT_BLOB_BYTES;

/// Whether a fact is one members push to a storage peer: what membership, the admin and the
/// vault keys follow from, and nothing that carries application data or links a
/// plaintext blob to its ciphertext.
pub fn is_for_storage_peer(p: &Payload) -> bool {
    use MaintenanceFact as M;
    matches!(
        p,
        Payload::Authority(AuthorityFact::Genesis(_) | AuthorityFact::MembershipChanged(_))
            | Payload::Maintenance(
                M::AdminReplacement(_)
                    | M::CertifiedAdminReplacement(_)
                    | M::VaultEpochKey(_)
                    | M::VaultRekey(_)
                    | M::StorageGrant(_)
            )
    )
}

/// The storage peer's view of one authority: the facts pushed to it and their reduction.
pub struct PeerRules {
    authority: AuthorityId,
    me: DeviceId,
    facts: BTreeMap<FactId, VerifiedFact>,
    state: MaintenanceState,
}

impl PeerRules {
    /// The view over facts admitted earlier (read back from the peer's store).
    pub fn new(
        authority: AuthorityId,
        me: DeviceId,
        facts: impl IntoIterator<Item = VerifiedFact>,
    ) -> Self {
        let facts: BTreeMap<_, _> = facts.into_iter().map(|f| (f.id(), f)).collect();
        let state = reduce(JournalNamespace::Authority(authority), facts.values());
        Self {
            authority,
            me,
            facts,
            state,
        }
    }

    pub fn authority(&self) -> AuthorityId {
        self.authority
    }

    pub fn state(&self) -> &MaintenanceState {
        &self.state
    }

    /// The identity epoch the pushed facts reach.
    pub fn current_epoch(&self) -> u64 {
        self.state.identity_epoch()
    }

    /// Checks a pushed batch and returns its new facts, applying nothing. Refuses the whole
    /// batch if one fact does not verify, belongs to another authority, is of a kind the
    /// storage peer does not take, or has an author who was no member at its epoch; and if
    /// `pusher`, with the batch applied, is not a member of the current identity epoch.
    pub fn admit(
        &self,
        pusher: &DeviceId,
        batch: &[impl AsRef<[u8]> + Sync],
    ) -> Result<Vec<VerifiedFact>, StorageError> {
        let namespace = JournalNamespace::Authority(self.authority);
        let mut new = Vec::new();
        for decoded in VerifiedFact::decode_batch(batch) {
            let f = decoded.map_err(|e| StorageError::BadFact(e.to_string()))?;
            if f.namespace() != namespace {
                return Err(StorageError::BadFact(format!(
                    "fact {} is of another namespace",
                    f.id()
                )));
            }
            if !is_for_storage_peer(f.payload()) {
                return Err(StorageError::BadFact(format!(
                    "fact {} is a {}, which a storage peer does not take",
                    f.id(),
                    f.payload().kind_name()
                )));
            }
            if !self.facts.contains_key(&f.id()) {
                new.push(f);
            }
        }
        let state = reduce(namespace, self.facts.values().chain(new.iter()));
        for f in &new {
            let genesis = matches!(f.payload(), Payload::Authority(AuthorityFact::Genesis(_)));
            // A genesis that does not hash to the authority is ignored by the reducer and
            // leaves no membership; any other fact needs its author a member at its epoch.
            let admitted = if genesis {
                !state.ignored.contains(&f.id())
            } else {
                state.is_member_at(&f.author(), f.epoch())
            };
            if !admitted {
                return Err(StorageError::BadFact(format!(
                    "fact {} is not admissible (author {} at epoch {})",
                    f.id(),
                    f.author(),
                    f.epoch()
                )));
            }
        }
        if !is_current_member(&state, pusher) {
            return Err(StorageError::NotAMember(*pusher));
        }
        Ok(new)
    }

    /// Applies facts [`Self::admit`] returned (after the caller stored them).
    pub fn apply(&mut self, new: Vec<VerifiedFact>) {
        if new.is_empty() {
            return;
        }
        for f in new {
            self.facts.insert(f.id(), f);
        }
        self.state = reduce(
            JournalNamespace::Authority(self.authority),
            self.facts.values(),
        );
    }

    /// Whether `peer` may read and write blobs: this storage peer holds a standing grant and
    /// `peer` is a member of the current identity epoch.
    pub fn authorize(&self, peer: &DeviceId) -> Result<(), StorageError> {
        if !self.state.vault.is_storage_peer(&self.me) {
            return Err(StorageError::NotGranted);
        }
        if !is_current_member(&self.state, peer) {
            return Err(StorageError::NotAMember(*peer));
        }
        Ok(())
    }

    /// Checks a blob to store, without any key: the ciphertext is a well-formed encrypted
    /// blob within the size limit, the sealed key decodes (its capsule passes Umbral's
    /// check) and is sealed to an epoch with a published key, not a future one. Returns the
    /// CID of the ciphertext.
    pub fn check_put(
        &self,
        sealed_key: &[u8],
        blob: &[u8],
    ) -> Result<(ContentId, SealedContentKey), StorageError> {
        if blob.len() > MAX_VAULT_BLOB_BYTES {
            return Err(StorageError::BadBlob(format!(
                "{} bytes exceed the limit of {MAX_VAULT_BLOB_BYTES}",
                blob.len()
            )));
        }
        let sealed = SealedContentKey::from_bytes(sealed_key)
            .map_err(|e| StorageError::BadBlob(e.to_string()))?;
        check_encrypted_layout(blob)?;
        let epoch = sealed.epoch();
        if epoch > self.current_epoch() || !self.state.vault.epoch_keys.contains_key(&epoch) {
            return Err(StorageError::BadBlob(format!(
                "sealed to identity epoch {epoch}, which has no published key"
            )));
        }
        Ok((ContentId::of_raw(blob), sealed))
    }

    /// The published public key of identity epoch `epoch`.
    pub fn epoch_key(&self, epoch: u64) -> Result<EpochPublicKey, StorageError> {
        epoch_public_key(&self.state, epoch)
    }

    /// The re-encryption fragments `from` -> `to` published in the journal, verified against
    /// both epochs' keys; `threshold` of them (all this one peer needs).
    pub fn verified_rekey(&self, from: u64, to: u64) -> Result<Vec<VerifiedKeyFrag>, StorageError> {
        let rekey = self
            .state
            .vault
            .rekeys
            .get(&(from, to))
            .ok_or_else(|| StorageError::BadRekey(format!("no fragments {from} -> {to}")))?;
        let delegating = self.epoch_key(from)?;
        let receiving = self.epoch_key(to)?;
        let mut verified = Vec::new();
        for bytes in rekey.kfrags.iter().take(usize::from(rekey.threshold)) {
            let kfrag =
                KeyFrag::from_bytes(bytes).map_err(|e| StorageError::BadRekey(e.to_string()))?;
            verified.push(
                kfrag
                    .verify(&delegating, &receiving)
                    .map_err(|e| StorageError::BadRekey(e.to_string()))?,
            );
        }
        Ok(verified)
    }

    /// The `(from, to)` fragment sets into the current epoch not yet in `applied`, whose
    /// epoch keys are both published.
    pub fn pending_rekeys(&self, applied: &BTreeSet<(u64, u64)>) -> Vec<(u64, u64)> {
        let current = self.current_epoch();
        self.state
            .vault
            .rekeys
            .keys()
            .filter(|(_, to)| *to == current)
            .filter(|pair| !applied.contains(pair))
            .copied()
            .collect()
    }
}

/// Re-encrypts one stored capsule with every fragment of a set: the encoded capsule
/// fragments a member combines. The proxy learns nothing of the content key.
pub fn reencrypt_sealed(
    rng: &mut (impl RngCore + CryptoRng),
    kfrags: &[VerifiedKeyFrag],
    sealed: &SealedContentKey,
) -> Vec<Vec<u8>> {
    kfrags
        .iter()
        .map(|k| reencrypt(rng, k, sealed.capsule()).to_bytes().to_vec())
        .collect()
}

fn is_current_member(state: &MaintenanceState, device: &DeviceId) -> bool {
    state
        .membership()
        .is_some_and(|m| m.members.contains(device))
}

/// The published public key of `epoch` in a reduced state.
pub fn epoch_public_key(
    state: &MaintenanceState,
    epoch: u64,
) -> Result<EpochPublicKey, StorageError> {
    let key = state
        .vault
        .epoch_keys
        .get(&epoch)
        .ok_or_else(|| StorageError::BadRekey(format!("no key published for epoch {epoch}")))?;
    Ok(EpochPublicKey::from_bytes(&key.public_key)?)
}

/// The canonical layout of an encrypted blob: a valid header and a body of whole sealed
/// chunks ending in a final chunk of 1..=chunk bytes (plus its tag). Authenticity is for
/// members to check; the storage peer checks what it can without a key.
fn check_encrypted_layout(blob: &[u8]) -> Result<(), StorageError> {
    use tend_vault::blob::{HEADER_BYTES as HEADER, TAG_BYTES as TAG};
    let bad = |why: &str| StorageError::BadBlob(why.to_string());
    if blob.len() < HEADER + TAG {
        return Err(bad("shorter than a header and one tag"));
    }
    let header = BlobHeader::from_bytes(&blob[..HEADER]).map_err(|e| bad(&e.to_string()))?;
    let body = blob.len() - HEADER;
    let sealed = header.sealed_chunk_bytes();
    let last = body - (body - 1) / sealed * sealed;
    // Only the empty blob has a final chunk of just a tag.
    if last < TAG || (last == TAG && body != TAG) {
        return Err(bad("the final chunk is shorter than its tag"));
    }
    Ok(())
}
