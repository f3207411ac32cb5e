//! The storage peer: its rules over its redb state, answering one request at a time. The
//! network layer (tend-node's `vault_peer`) only moves frames.

use std::path::Path;

use rand_core::{CryptoRng, RngCore};
use serde_bytes::ByteBuf;
use tend_core::{AuthorityId, DeviceId};

use crate::error::StorageError;
use crate::protocol::{Request, Response};
use crate::rules::{reencrypt_sealed, PeerRules};
use crate::store::VaultStore;

/// A storage peer of one authority.
pub struct StoragePeer {
    rules: PeerRules,
    store: VaultStore,
}

/// What one round of re-encryption did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyReport {
    /// Fragment sets applied.
    pub sets: u64,
    /// Sealed keys re-encrypted.
    pub keys: u64,
}

impl StoragePeer {
    /// Opens the peer's redb file at `path` (created if absent) for `authority`; `me` is the
    /// peer's device (endpoint) id, which a grant must name.
    pub fn open(path: &Path, authority: AuthorityId, me: DeviceId) -> Result<Self, StorageError> {
        let store = VaultStore::open(path, authority)?;
        let rules = PeerRules::new(authority, me, store.facts()?);
        Ok(Self { rules, store })
    }

    pub fn rules(&self) -> &PeerRules {
        &self.rules
    }

    pub fn store(&self) -> &VaultStore {
        &self.store
    }

    /// Answers one request from `peer`. Refusals are answers, not errors; an error is a
    /// failure of the peer's own store.
    pub fn handle(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
        peer: &DeviceId,
        request: Request,
    ) -> Result<Response, StorageError> {
        let refused = |e: StorageError| Response::Refused {
            reason: e.to_string(),
        };
        match request {
            Request::PushFacts { facts } => {
                let new = match self.rules.admit(peer, &facts) {
                    Ok(new) => new,
                    Err(e) => return Ok(refused(e)),
                };
                let count = new.len() as u64;
                self.store.insert_facts(&new)?;
                self.rules.apply(new);
                self.apply_rekeys(rng)?;
                Ok(Response::FactsAdmitted { new: count })
            }
            Request::Put { sealed_key, blob } => {
                if let Err(e) = self.rules.authorize(peer) {
                    return Ok(refused(e));
                }
                let (cid, sealed) = match self.rules.check_put(&sealed_key, &blob) {
                    Ok(checked) => checked,
                    Err(e) => return Ok(refused(e)),
                };
                // A blob sealed to an older epoch than the current one (a member that had
                // not seen the advance) is re-encrypted at once if fragments exist.
                let current = self.rules.current_epoch();
                let mut due = Vec::new();
                if sealed.epoch() < current {
                    if let Ok(kfrags) = self.rules.verified_rekey(sealed.epoch(), current) {
                        due.push((current, reencrypt_sealed(rng, &kfrags, &sealed)));
                    }
                }
                self.store.put(&cid, &sealed, &blob, &due)?;
                Ok(Response::Stored { cid })
            }
            Request::Get { cid } => {
                if let Err(e) = self.rules.authorize(peer) {
                    return Ok(refused(e));
                }
                let to_epoch = self.rules.current_epoch();
                Ok(match self.store.get(&cid, to_epoch)? {
                    Some(stored) => Response::Blob {
                        blob: ByteBuf::from(stored.blob),
                        sealed_key: ByteBuf::from(stored.sealed_key),
                        to_epoch,
                        cfrags: stored.cfrags.into_iter().map(ByteBuf::from).collect(),
                    },
                    None => Response::Missing { cid },
                })
            }
            Request::Drop { cids } => {
                if let Err(e) = self.rules.authorize(peer) {
                    return Ok(refused(e));
                }
                Ok(Response::Dropped {
                    removed: self.store.remove(&cids)?,
                })
            }
        }
    }

    /// Applies every published fragment set into the current epoch not applied yet: each
    /// stored sealed key of the set's older epoch gets its capsule fragments, without the
    /// blob bodies being read. A set that does not verify is skipped (and stays pending).
    pub fn apply_rekeys(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<RekeyReport, StorageError> {
        let mut report = RekeyReport::default();
        for (from, to) in self.rules.pending_rekeys(&self.store.applied_rekeys()?) {
            let Ok(kfrags) = self.rules.verified_rekey(from, to) else {
                continue;
            };
            let keys = self.store.sealed_keys_of(from)?;
            let cfrags = reencrypt_all(rng, &kfrags, &keys);
            self.store.store_rekey(from, to, &cfrags)?;
            report.sets += 1;
            report.keys += cfrags.len() as u64;
        }
        Ok(report)
    }
}

/// Re-encrypts every key on all cores: each capsule is independent, so the keys are split
/// in one contiguous part per thread, each with its own RNG seeded from `rng`.
fn reencrypt_all(
    rng: &mut (impl RngCore + CryptoRng),
    kfrags: &[tend_vault::VerifiedKeyFrag],
    keys: &[(tend_core::ContentId, tend_vault::SealedContentKey)],
) -> Vec<(tend_core::ContentId, Vec<Vec<u8>>)> {
    use rand::{rngs::StdRng, SeedableRng};
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let part = keys.len().div_ceil(threads).max(1);
    let seeds: Vec<[u8; 32]> = keys
        .chunks(part)
        .map(|_| {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            seed
        })
        .collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .chunks(part)
            .zip(seeds)
            .map(|(part, seed)| {
                scope.spawn(move || {
                    let mut rng = StdRng::from_seed(seed);
                    part.iter()
                        .map(|(cid, sealed)| (*cid, reencrypt_sealed(&mut rng, kfrags, sealed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
