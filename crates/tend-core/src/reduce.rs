//! The maintenance reducer: a pure function from a fact set to `MaintenanceState`, and the
//! predicates of DESIGN section 3 (admission, GC eligibility, cache validity, fences, admin).
//!
//! Reduction sorts facts by `(epoch, id)` and folds them, so the same set gives the same
//! state whatever the order of arrival or duplication (property-tested in `tests/laws.rs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::authority::{AuthorityFact, GroupKey};
use crate::error::JournalError;
use crate::fact::{Payload, VerifiedFact};
use crate::ids::{
    AuthorityId, ContentId, DeviceId, Epoch, FactId, Hash32, JournalNamespace, MaintenanceEpoch,
    ProtocolVersion,
};
use crate::maintenance::*;

/// The authority's member set as of some identity epoch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Membership {
    pub identity_epoch: u64,
    pub members: BTreeSet<DeviceId>,
    pub threshold: u16,
    pub group_key: GroupKey,
    /// Applies to facts with `epoch > since`: the epoch of the genesis or membership change
    /// that set it. Facts at that same epoch are judged by the membership before it, so the
    /// order of facts within one epoch never decides admission.
    pub since: Epoch,
}

/// A snapshot proposal that has not completed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OpenProposal {
    pub proposal: SnapshotProposed,
    pub proposer: DeviceId,
    pub proposed_at: Epoch,
}

/// A verified, completed snapshot.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CompletedSnapshot {
    pub proposal_id: Hash32,
    pub snapshot: SnapshotV1,
    pub fact_id: FactId,
    /// The epoch of the `SnapshotCompleted` fact (at or above `snapshot.epoch`). A later
    /// snapshot must target above it, so the completion lies inside the later prefix and
    /// the blob's base (read from the prefix's facts) equals the digest's base (read from
    /// the whole state); see [`MaintenanceState::snapshot_base`].
    pub completed_at: Epoch,
    /// The blob, certified by the threshold signature that made this record (only a
    /// verified completion is recorded), so reading it needs no signature check per fact.
    pub certified: crate::maintenance::CertifiedBlob,
}

/// What the journal says about one upgrade package.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UpgradeState {
    pub metadata: UpgradeMetadata,
    pub ready: BTreeSet<DeviceId>,
    pub activated: Option<UpgradeActivated>,
    /// Activations waiting for readiness: fact id -> (activation, ready members it needs).
    /// The first to have its figure met activates the package; the others are then
    /// ignored. (A ready fact may sort after the activation it satisfies, so the check
    /// runs again on every new ready member.)
    pub pending_activations: BTreeMap<FactId, (UpgradeActivated, u16)>,
    /// The epoch of the publishing fact: readiness and activation count only strictly
    /// above it, so the fold meets the package before anything that refers to it.
    pub published_at: Epoch,
}

impl UpgradeState {
    /// Activates the package with the first pending activation (by fact id) whose figure
    /// the ready members meet; returns the other pending activations, now ignored.
    fn settle_pending(&mut self) -> Vec<FactId> {
        if self.activated.is_some() {
            return Vec::new();
        }
        let ready = self.ready.len();
        let met = self
            .pending_activations
            .iter()
            .find(|(_, (_, min))| ready >= usize::from(*min))
            .map(|(id, (a, _))| (*id, a.clone()));
        let Some((counted, a)) = met else {
            return Vec::new();
        };
        self.activated = Some(a);
        std::mem::take(&mut self.pending_activations)
            .into_keys()
            .filter(|id| *id != counted)
            .collect()
    }
}

/// An admin replacement that took effect.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AppliedReplacement {
    pub replacement: AdminReplacement,
    pub fact_id: FactId,
    /// Completed with the authority's threshold signature rather than by the old admin.
    pub certified: bool,
}

/// The reduced maintenance state of one journal.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MaintenanceState {
    pub namespace: JournalNamespace,
    /// Oldest first; empty until the genesis is seen.
    pub memberships: Vec<Membership>,
    pub initial_admin: Option<DeviceId>,
    pub replacements: Vec<AppliedReplacement>,
    pub latest_snapshot: Option<CompletedSnapshot>,
    pub proposals: BTreeMap<Hash32, OpenProposal>,
    pub cache_floors: BTreeMap<String, Epoch>,
    pub upgrades: BTreeMap<Hash32, UpgradeState>,
    pub device_metadata: BTreeMap<DeviceId, DeviceMetadata>,
    /// Blob -> epoch of its tombstone.
    pub tombstones: BTreeMap<ContentId, Epoch>,
    /// Facts kept as evidence but ignored by reduction (e.g. a retired admin's operations).
    pub ignored: BTreeSet<FactId>,
    /// Epoch keys, re-encryption fragments, storage grants, encrypted copies.
    pub vault: crate::vault::VaultState,
    /// Per device, the highest snapshot epoch it said it settled (`SnapshotSettled`).
    /// Bookkeeping for dropping item blobs; not part of [`MaintenanceState::state_digest`].
    pub snapshot_settled: BTreeMap<DeviceId, Epoch>,
    /// Item blob -> epoch of the snapshot that names it, as settled facts report them.
    pub item_blobs: BTreeMap<ContentId, Epoch>,
    max_fact_epoch: Epoch,
}

/// Reduces a fact set to its maintenance state. Order and duplicates do not matter.
pub fn reduce<'a>(
    namespace: JournalNamespace,
    facts: impl IntoIterator<Item = &'a VerifiedFact>,
) -> MaintenanceState {
    let mut sorted: Vec<&VerifiedFact> = facts.into_iter().collect();
    sorted.sort_by_key(|f| f.order_key());
    sorted.dedup_by_key(|f| f.order_key());
    let mut state = MaintenanceState::new(namespace);
    for f in sorted {
        state.apply(f);
    }
    state
}

impl MaintenanceState {
    /// The state of an empty journal.
    pub fn new(namespace: JournalNamespace) -> Self {
        Self {
            namespace,
            memberships: Vec::new(),
            initial_admin: None,
            replacements: Vec::new(),
            latest_snapshot: None,
            proposals: BTreeMap::new(),
            cache_floors: BTreeMap::new(),
            upgrades: BTreeMap::new(),
            device_metadata: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            ignored: BTreeSet::new(),
            vault: Default::default(),
            snapshot_settled: BTreeMap::new(),
            item_blobs: BTreeMap::new(),
            max_fact_epoch: Epoch::ZERO,
        }
    }

    /// Folds one fact in. Facts must come in ascending `(epoch, id)` order; use [`reduce`]
    /// for an unordered set.
    pub fn apply(&mut self, f: &VerifiedFact) {
        self.observe_epoch(f.epoch());
        let (author, epoch) = (f.author(), f.epoch());
        match f.payload() {
            Payload::Authority(AuthorityFact::Genesis(g)) => {
                let ok = self.memberships.is_empty()
                    && g.is_well_formed()
                    && g.admin == author
                    && self.namespace == JournalNamespace::Authority(g.authority_id());
                if ok {
                    self.initial_admin = Some(g.admin);
                    self.memberships.push(Membership {
                        identity_epoch: 0,
                        members: g.members.iter().copied().collect(),
                        threshold: g.threshold,
                        group_key: g.group_key,
                        since: epoch,
                    });
                } else {
                    self.ignored.insert(f.id());
                }
            }
            Payload::Authority(AuthorityFact::MembershipChanged(m)) => {
                let next = self.identity_epoch() + 1;
                if self.is_admin_at(&author, epoch)
                    && m.is_well_formed()
                    && m.identity_epoch == next
                {
                    self.memberships.push(Membership {
                        identity_epoch: m.identity_epoch,
                        members: m.members.iter().copied().collect(),
                        threshold: m.threshold,
                        group_key: m.group_key,
                        since: epoch,
                    });
                } else {
                    self.ignored.insert(f.id());
                }
            }
            Payload::Maintenance(m) => {
                if m.is_admin_operation() && !self.is_admin_at(&author, epoch) {
                    self.ignored.insert(f.id());
                    return;
                }
                self.apply_maintenance(f, m);
            }
            Payload::Application { .. } | Payload::Data(_) | Payload::Unknown { .. } => {}
        }
    }

    fn apply_maintenance(&mut self, f: &VerifiedFact, m: &MaintenanceFact) {
        let (author, epoch) = (f.author(), f.epoch());
        match m {
            MaintenanceFact::SnapshotProposed(p) => {
                let above = self.snapshot_epoch() < p.target_epoch;
                if above && !self.proposals.contains_key(&p.proposal_id) {
                    self.proposals.insert(
                        p.proposal_id,
                        OpenProposal {
                            proposal: p.clone(),
                            proposer: author,
                            proposed_at: epoch,
                        },
                    );
                }
            }
            MaintenanceFact::SnapshotCompleted(c) => {
                let key = self.membership_at(epoch).map(|m| m.group_key);
                let certified = key.and_then(|k| c.certify(&self.namespace, &k));
                let verified = certified.is_some();
                let newer = c.snapshot.epoch > self.snapshot_epoch();
                if let (Some(certified), true) = (certified, newer) {
                    self.latest_snapshot = Some(CompletedSnapshot {
                        proposal_id: c.proposal_id,
                        snapshot: c.snapshot.clone(),
                        fact_id: f.id(),
                        completed_at: epoch,
                        certified,
                    });
                    let floor = c.snapshot.epoch;
                    self.proposals
                        .retain(|_, p| p.proposal.target_epoch > floor);
                } else if !verified {
                    self.ignored.insert(f.id());
                }
            }
            MaintenanceFact::CacheInvalidated(c) => {
                for k in &c.keys {
                    let floor = self.cache_floors.entry(k.clone()).or_default();
                    *floor = (*floor).max(c.epoch_floor);
                }
            }
            MaintenanceFact::UpgradePublished(u) => {
                // The first publication of a package id wins; a cohort above 100% is malformed.
                if u.cohort_percent > 100 || self.upgrades.contains_key(&u.package_id) {
                    self.ignored.insert(f.id());
                } else {
                    self.upgrades.insert(
                        u.package_id,
                        UpgradeState {
                            metadata: u.clone(),
                            ready: BTreeSet::new(),
                            activated: None,
                            pending_activations: BTreeMap::new(),
                            published_at: epoch,
                        },
                    );
                }
            }
            MaintenanceFact::UpgradeWidened(w) => match self.upgrades.get_mut(&w.package_id) {
                // Like readiness, a widening counts only above the publication, so the fold
                // meets the package first; the highest percent wins, so a rollout never
                // narrows and the order of widenings does not matter.
                Some(u) if w.cohort_percent <= 100 && epoch > u.published_at => {
                    u.metadata.cohort_percent = u.metadata.cohort_percent.max(w.cohort_percent);
                }
                _ => {
                    self.ignored.insert(f.id());
                }
            },
            MaintenanceFact::DeviceMetadata(d) => {
                self.device_metadata.insert(author, d.clone());
            }
            MaintenanceFact::UpgradeReady(r) => match self.upgrades.get_mut(&r.package_id) {
                Some(u) if u.metadata.version == r.version && epoch > u.published_at => {
                    u.ready.insert(author);
                    let ignored = u.settle_pending();
                    self.ignored.extend(ignored);
                }
                _ => {
                    self.ignored.insert(f.id());
                }
            },
            // An activation without a figure (older releases) needs one ready member, the
            // least every readiness policy asked for.
            MaintenanceFact::UpgradeActivated(a) => self.apply_activation(f, a, 1),
            MaintenanceFact::UpgradeActivatedWhenReady(w) => {
                self.apply_activation(f, &w.activation, w.min_ready.max(1))
            }
            // The replacement rules live in `crate::admin`.
            MaintenanceFact::AdminReplacement(r) => self.apply_replacement(f, r, None),
            MaintenanceFact::CertifiedAdminReplacement(c) => {
                self.apply_replacement(f, &c.replacement, Some(&c.threshold_signature))
            }
            MaintenanceFact::BlobTombstone(t) => {
                let e = self.tombstones.entry(t.cid).or_insert(epoch);
                *e = (*e).min(epoch);
            }
            // Admin-only (checked above); bound to the identity epoch governing the fact.
            MaintenanceFact::VaultEpochKey(k) => {
                let at = crate::vault::identity_epoch_at(self, epoch);
                if !self.vault.apply_epoch_key(k, at) {
                    self.ignored.insert(f.id());
                }
            }
            MaintenanceFact::VaultRekey(r) => {
                let at = crate::vault::identity_epoch_at(self, epoch);
                if !self.vault.apply_rekey(r, at) {
                    self.ignored.insert(f.id());
                }
            }
            MaintenanceFact::StorageGrant(g) => self.vault.apply_grant(g),
            MaintenanceFact::VaultCopy(c) => self.vault.apply_copy(c),
            // A device settles a snapshot only after it is in its journal, so a claim
            // above the fact's own epoch is ignored.
            MaintenanceFact::SnapshotSettled(s) if s.snapshot_epoch <= epoch => {
                let e = self
                    .snapshot_settled
                    .entry(author)
                    .or_insert(s.snapshot_epoch);
                *e = (*e).max(s.snapshot_epoch);
                if let Some(cid) = s.item_blob {
                    let e = self.item_blobs.entry(cid).or_insert(s.snapshot_epoch);
                    *e = (*e).min(s.snapshot_epoch);
                }
            }
            MaintenanceFact::SnapshotSettled(_) => {
                self.ignored.insert(f.id());
            }
        }
    }

    /// An activation of `a.package_id` that needs `min_ready` ready members: it activates
    /// the package when the journal already holds them, else waits for them
    /// ([`UpgradeState::pending_activations`]). Order-independent: ready members only
    /// accumulate, and every candidate must name the published version and fence, so
    /// whichever candidate is met first, the activation is the same.
    fn apply_activation(&mut self, f: &VerifiedFact, a: &UpgradeActivated, min_ready: u16) {
        let epoch = f.epoch();
        match self.upgrades.get_mut(&a.package_id) {
            // The fence must be the one the package was published with: devices decided to
            // install knowing whether it is a hard fork.
            Some(u)
                if u.activated.is_none()
                    && u.metadata.version == a.to_version
                    && u.metadata.fence == a.activation_fence
                    && epoch > u.published_at =>
            {
                u.pending_activations.insert(f.id(), (a.clone(), min_ready));
                let ignored = u.settle_pending();
                self.ignored.extend(ignored);
            }
            _ => {
                self.ignored.insert(f.id());
            }
        }
    }

    /// A canonical digest of the whole reduced state. Reduction is order-independent, so
    /// two devices that saw the same fact set (or one hydrated from a snapshot plus the
    /// tail) get the same digest whatever order facts arrived in.
    pub fn state_digest(&self) -> Hash32 {
        use crate::encoding::to_canonical;
        // Maps become sorted lists of pairs: DAG-CBOR only allows text map keys.
        let memberships: Vec<_> = self
            .memberships
            .iter()
            .map(|m| {
                let members: Vec<_> = m.members.iter().collect();
                (m.identity_epoch, members, m.threshold, m.group_key, m.since)
            })
            .collect();
        let replacements: Vec<_> = self
            .replacements
            .iter()
            .map(|r| (&r.replacement, r.fact_id))
            .collect();
        let snapshot = self
            .latest_snapshot
            .as_ref()
            .map(|s| (s.proposal_id, &s.snapshot, s.fact_id));
        let proposals: Vec<_> = self
            .proposals
            .values()
            .map(|p| (&p.proposal, p.proposer, p.proposed_at))
            .collect();
        let cache: Vec<_> = self.cache_floors.iter().collect();
        let upgrades: Vec<_> = self
            .upgrades
            .values()
            .map(|u| {
                let ready: Vec<_> = u.ready.iter().collect();
                let pending: Vec<_> = u.pending_activations.iter().collect();
                (&u.metadata, ready, &u.activated, pending)
            })
            .collect();
        let devices: Vec<_> = self.device_metadata.iter().collect();
        let tombstones: Vec<_> = self.tombstones.iter().collect();
        let ignored: Vec<_> = self.ignored.iter().collect();
        let v = &self.vault;
        let no_vault = v.epoch_keys.is_empty()
            && v.rekeys.is_empty()
            && v.storage_peers.is_empty()
            && v.copies.is_empty();
        // A state without vault facts digests as it did before the vault kinds existed:
        // snapshot blobs written then carry that digest, and must still hydrate.
        let body = if no_vault {
            to_canonical(&(
                &self.namespace,
                (memberships, self.initial_admin, replacements, snapshot),
                (proposals, cache, upgrades, devices),
                (tombstones, ignored, self.max_fact_epoch),
            ))
        } else {
            to_canonical(&(
                &self.namespace,
                (memberships, self.initial_admin, replacements, snapshot),
                (proposals, cache, upgrades, devices),
                (tombstones, ignored, self.max_fact_epoch),
                self.vault.digest_body(),
            ))
        };
        let mut h = blake3::Hasher::new();
        h.update(b"tend-maintenance-state-v1");
        h.update(&body);
        Hash32(*h.finalize().as_bytes())
    }

    /// Raises the highest fact epoch seen without folding a fact (for facts that cannot
    /// change maintenance state, such as application facts).
    pub fn observe_epoch(&mut self, epoch: Epoch) {
        self.max_fact_epoch = self.max_fact_epoch.max(epoch);
    }

    /// The authority this journal belongs to, once its genesis is known.
    pub fn authority_id(&self) -> Option<AuthorityId> {
        match self.namespace {
            JournalNamespace::Authority(a) if !self.memberships.is_empty() => Some(a),
            _ => None,
        }
    }

    /// The current membership.
    pub fn membership(&self) -> Option<&Membership> {
        self.memberships.last()
    }

    /// The membership that governs facts at `epoch`.
    pub fn membership_at(&self, epoch: Epoch) -> Option<&Membership> {
        self.memberships.iter().rev().find(|m| epoch > m.since)
    }

    pub fn identity_epoch(&self) -> u64 {
        self.membership().map_or(0, |m| m.identity_epoch)
    }

    /// The epoch of the latest completed snapshot, 0 when there is none.
    pub fn snapshot_epoch(&self) -> Epoch {
        self.latest_snapshot
            .as_ref()
            .map_or(Epoch::ZERO, |s| s.snapshot.epoch)
    }

    /// The epoch pair maintenance sessions carry (DESIGN rule 9).
    pub fn maintenance_epoch(&self) -> MaintenanceEpoch {
        MaintenanceEpoch {
            identity_epoch: self.identity_epoch(),
            snapshot_epoch: self.snapshot_epoch(),
        }
    }

    /// The epoch a device stamps its next fact with: at least every fact seen, every open
    /// proposal's target (so the proposed prefix stops growing), the epoch after the last
    /// membership change, and the latest snapshot.
    pub fn current_epoch(&self) -> Epoch {
        let proposals = self
            .proposals
            .values()
            .map(|p| p.proposal.target_epoch)
            .max();
        let membership = self.memberships.iter().map(|m| m.since.next()).max();
        [
            Some(self.max_fact_epoch),
            proposals,
            membership,
            Some(self.snapshot_epoch()),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default()
    }

    /// The admin in charge at `epoch`: the initial admin, followed along applied
    /// replacements whose activation epoch is at or below `epoch`.
    pub fn admin_at(&self, epoch: Epoch) -> Option<DeviceId> {
        let mut admin = self.initial_admin?;
        let mut chain: Vec<&AdminReplacement> =
            self.replacements.iter().map(|r| &r.replacement).collect();
        chain.sort_by_key(|r| r.activation_epoch);
        for r in chain {
            if r.old_admin == admin && r.activation_epoch <= epoch {
                admin = r.new_admin;
            }
        }
        Some(admin)
    }

    /// Whether `device` may issue admin operations at `epoch` (DESIGN rule 8).
    pub fn is_admin_at(&self, device: &DeviceId, epoch: Epoch) -> bool {
        self.admin_at(epoch).as_ref() == Some(device)
    }

    /// Whether `device` is a member for facts at `epoch`.
    pub fn is_member_at(&self, device: &DeviceId, epoch: Epoch) -> bool {
        self.membership_at(epoch)
            .is_some_and(|m| m.members.contains(device))
    }

    /// DESIGN rules 2 and 5: whether a verified fact not yet in the journal may be merged.
    pub fn check_admission(&self, f: &VerifiedFact) -> Result<(), JournalError> {
        if f.namespace() != self.namespace {
            return Err(JournalError::NamespaceMismatch {
                ours: self.namespace,
                theirs: f.namespace(),
            });
        }
        let snapshot = self.snapshot_epoch();
        if self.latest_snapshot.is_some() && f.epoch() < snapshot {
            return Err(JournalError::Late {
                fact: f.id(),
                epoch: f.epoch(),
                snapshot,
            });
        }
        let genesis = matches!(f.payload(), Payload::Authority(AuthorityFact::Genesis(_)));
        let member = match self.namespace {
            // Before its genesis, an authority journal admits only the genesis; a context
            // journal has no member list of its own.
            JournalNamespace::Authority(_) if self.memberships.is_empty() => genesis,
            JournalNamespace::Authority(_) => self.is_member_at(&f.author(), f.epoch()),
            JournalNamespace::Context(_) => true,
        };
        if member {
            Ok(())
        } else {
            Err(JournalError::NotAMember {
                fact: f.id(),
                epoch: f.epoch(),
            })
        }
    }

    /// The snapshot a prefix digest below `upto` chains on: the latest verified snapshot,
    /// if it lies below `upto`.
    pub fn snapshot_base(&self, upto: Epoch) -> Option<crate::journal::SnapshotBase> {
        self.latest_snapshot
            .as_ref()
            .filter(|s| s.snapshot.epoch < upto)
            .map(|s| crate::journal::SnapshotBase {
                epoch: s.snapshot.epoch,
                digest: s.snapshot.digest,
            })
    }

    /// DESIGN rule 4: facts below the latest verified snapshot may be pruned.
    pub fn gc_floor(&self) -> Option<Epoch> {
        self.latest_snapshot.as_ref().map(|s| s.snapshot.epoch)
    }

    /// Whether a fact at `epoch` may be pruned.
    pub fn is_prunable(&self, epoch: Epoch) -> bool {
        self.gc_floor().is_some_and(|floor| epoch < floor)
    }

    /// Blobs whose tombstone precedes the latest verified snapshot.
    pub fn prunable_blobs(&self) -> Vec<ContentId> {
        self.tombstones
            .iter()
            .filter(|(_, e)| self.is_prunable(**e))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Whether every current member has settled the snapshot at `epoch` or a later one:
    /// then no member needs its item blob any more (docs/ARCHITECTURE.md section 4a).
    /// Never for a journal without members (a context journal).
    pub fn settled_by_every_member(&self, epoch: Epoch) -> bool {
        self.membership().is_some_and(|m| {
            m.members
                .iter()
                .all(|d| self.snapshot_settled.get(d).is_some_and(|s| *s >= epoch))
        })
    }

    /// Item blobs every current member has settled past: GC drops them.
    pub fn reclaimable_item_blobs(&self) -> Vec<ContentId> {
        self.item_blobs
            .iter()
            .filter(|(_, e)| self.settled_by_every_member(**e))
            .map(|(c, _)| *c)
            .collect()
    }

    /// DESIGN rule 6: an entry cached at `cached_at` under `key` is valid only when the
    /// current epoch exceeds the key's floor.
    pub fn cache_valid(&self, key: &str, current: Epoch) -> bool {
        self.cache_floors
            .get(key)
            .is_none_or(|floor| current > *floor)
    }

    /// The oldest running version that a current member announced in its latest
    /// `DeviceMetadata`: what every member reads. `None` before the membership or a
    /// member's metadata is known, and again when a member joins until it announces itself.
    pub fn oldest_member_version(&self) -> Option<ProtocolVersion> {
        let members = &self.membership()?.members;
        // `None` sorts first: one member that has not announced makes the answer `None`.
        members
            .iter()
            .map(|d| self.device_metadata.get(d).map(|md| md.running_version))
            .min()
            .flatten()
    }

    /// The format a device writes a fact in now, `now_ms` being its clock: the newest that
    /// every member reads ([`crate::FactFormat::newest_readable_by`]), since an older release
    /// refuses a fact format it does not know, and would take the peer that sent one for a
    /// misbehaving device. Format 1 while [`MaintenanceState::oldest_member_version`] is
    /// unknown.
    pub fn write_format(&self, now_ms: impl FnOnce() -> u64) -> crate::FactFormat {
        match self.oldest_member_version() {
            Some(oldest) => crate::FactFormat::newest_readable_by(oldest, now_ms()),
            None => crate::FactFormat::Untimed,
        }
    }

    /// The strongest fence of any activated upgrade, with the version that set it.
    pub fn active_fence(&self) -> Option<(Epoch, ProtocolVersion)> {
        self.upgrades
            .values()
            .filter_map(|u| u.activated.as_ref())
            .filter_map(|a| a.activation_fence.map(|f| (f, a.to_version)))
            .max()
    }

    /// DESIGN rule 7: whether a device at `local_epoch` running `version` satisfies every
    /// activated fence (see [`MaintenanceState::fence_check`] for the rule and the reason).
    pub fn fence_satisfied(&self, local_epoch: Epoch, version: ProtocolVersion) -> bool {
        self.fence_check(local_epoch, version).is_ok()
    }
}
