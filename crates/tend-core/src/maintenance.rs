//! Maintenance facts: snapshots, cache invalidation, upgrades, admin replacement and blob
//! tombstones (DESIGN section 2).

use serde::{Deserialize, Serialize};

use crate::encoding::to_canonical;
use crate::ids::{ContentId, DeviceId, Epoch, Hash32, JournalNamespace, ProtocolVersion};

/// A proposal to snapshot the prefix `{ f : f.epoch < target_epoch }`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotProposed {
    pub proposal_id: Hash32,
    pub target_epoch: Epoch,
    /// The proposer's digest of the prefix ([`crate::journal::prefix_digest`]).
    pub digest: Hash32,
}

/// What a completed snapshot certifies.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotV1 {
    pub epoch: Epoch,
    pub digest: Hash32,
    /// The snapshot blob: reduced state plus what a restore needs.
    pub blob_cid: ContentId,
}

impl SnapshotV1 {
    /// The bytes the authority's group key signs for this snapshot.
    pub fn signing_message(&self, namespace: &JournalNamespace, proposal_id: &Hash32) -> Vec<u8> {
        let mut msg = b"tend-snapshot-v1".to_vec();
        msg.extend_from_slice(&to_canonical(&(namespace, proposal_id, self)));
        msg
    }
}

/// A snapshot with the authority's threshold signature.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCompleted {
    pub proposal_id: Hash32,
    pub snapshot: SnapshotV1,
    #[serde(with = "crate::encoding::fixed_bytes")]
    pub threshold_signature: [u8; 64],
}

impl SnapshotCompleted {
    /// Checks the threshold signature against the authority's group key (of the
    /// membership at the completion fact's epoch) and, if it verifies, certifies the blob
    /// the snapshot names: every fact read from bytes that hash to that CID was vouched for
    /// by T members, so it need not be verified one Ed25519 signature at a time.
    pub fn certify(
        &self,
        namespace: &crate::ids::JournalNamespace,
        group_key: &crate::authority::GroupKey,
    ) -> Option<CertifiedBlob> {
        let msg = self.snapshot.signing_message(namespace, &self.proposal_id);
        group_key
            .verify(&msg, &self.threshold_signature)
            .then_some(CertifiedBlob {
                cid: self.snapshot.blob_cid,
            })
    }
}

/// A snapshot blob CID whose completion's threshold signature verified
/// ([`SnapshotCompleted::certify`]). Bytes that hash to it hold facts the members
/// certified: see [`crate::VerifiedFact::decode_certified`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CertifiedBlob {
    cid: ContentId,
}

impl CertifiedBlob {
    /// The certified blob's CID.
    pub fn cid(&self) -> ContentId {
        self.cid
    }
}

/// Cache entries under `keys` are invalid unless the current epoch exceeds `epoch_floor`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheInvalidated {
    pub keys: Vec<String>,
    pub epoch_floor: Epoch,
}

/// A published upgrade package; the artifact is a blob whose BLAKE3 hash is `artifact_hash`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeMetadata {
    pub package_id: Hash32,
    pub version: ProtocolVersion,
    pub artifact_hash: Hash32,
    pub artifact_size: u64,
    /// A hard fork carries a fence; a soft upgrade has none.
    pub fence: Option<Epoch>,
    /// Staged rollout: the percentage of devices (by cohort of their id) that take it.
    pub cohort_percent: u8,
}

impl UpgradeMetadata {
    /// Whether `device` belongs to this package's staged rollout: its cohort
    /// ([`cohort_of`]) is below `cohort_percent`. Every device computes the same answer.
    pub fn includes(&self, device: &DeviceId) -> bool {
        cohort_of(&self.package_id, device) < self.cohort_percent
    }
}

/// A device's cohort for a package, in `0..100`: BLAKE3(`"tend-cohort-v1"`, package id,
/// device id), its first 8 bytes as a little-endian integer, mod 100. Hashing the package
/// id in means each rollout picks a different, but agreed, subset of devices.
pub fn cohort_of(package_id: &Hash32, device: &DeviceId) -> u8 {
    let mut h = blake3::Hasher::new();
    h.update(b"tend-cohort-v1");
    h.update(&package_id.0);
    h.update(&device.0);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    // The modulo bias of 2^64 mod 100 is below 1e-17: irrelevant here.
    (u64::from_le_bytes(first) % 100) as u8
}

/// The admin widens a staged rollout: the package's cohort percent becomes at least
/// `cohort_percent`. The reducer keeps the highest percent seen, so a rollout never
/// narrows, and since a device is in at P % when its cohort is below P, every device in
/// at a smaller percent stays in. A kind of its own (not a second publication, whose
/// different package id would draw a new cohort), so older releases keep it as unknown.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeWidened {
    pub package_id: Hash32,
    pub cohort_percent: u8,
}

/// How a device takes upgrades.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum UpgradePolicy {
    Automatic,
    Manual,
    Pinned(ProtocolVersion),
}

/// What a device advertises about itself.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMetadata {
    pub running_version: ProtocolVersion,
    pub supported_versions: Vec<ProtocolVersion>,
    pub upgrade_policy: UpgradePolicy,
}

/// A device verified and installed a package.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeReady {
    pub package_id: Hash32,
    pub version: ProtocolVersion,
}

/// The admin activated a package; with a fence, devices below it refuse sessions.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeActivated {
    pub package_id: Hash32,
    pub to_version: ProtocolVersion,
    pub activation_fence: Option<Epoch>,
}

/// An activation that counts only once `min_ready` members have published
/// `UpgradeReady` for the package (DESIGN rule 7 readiness, judged by the reducer from the
/// journal rather than trusted to the admin). The admin's `activate` writes the figure its
/// readiness policy required. A kind of its own, so older releases keep it as unknown.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeActivatedWhenReady {
    pub activation: UpgradeActivated,
    /// Distinct members whose `UpgradeReady` for the package the journal must hold (at
    /// least 1 is required whatever this says).
    pub min_ready: u16,
}

/// From `activation_epoch` on, `new_admin` replaces `old_admin`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminReplacement {
    pub old_admin: DeviceId,
    pub new_admin: DeviceId,
    pub activation_epoch: Epoch,
}

impl AdminReplacement {
    /// The bytes the authority's group key signs to replace an admin without the admin
    /// ([`CertifiedAdminReplacement`]). The namespace is included so a signature made for
    /// one authority cannot be replayed in another.
    pub fn signing_message(&self, namespace: &JournalNamespace) -> Vec<u8> {
        let mut msg = b"tend-admin-replacement-v1".to_vec();
        msg.extend_from_slice(&to_canonical(&(namespace, self)));
        msg
    }
}

/// An admin replacement completed with the authority's threshold signature, so a quorum
/// of members can replace an admin that is unavailable (or misbehaving). Any member may
/// write it; the reducer checks the signature against the group key at the fact's epoch.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifiedAdminReplacement {
    pub replacement: AdminReplacement,
    /// FROST Ed25519 signature over [`AdminReplacement::signing_message`].
    #[serde(with = "crate::encoding::fixed_bytes")]
    pub threshold_signature: [u8; 64],
}

/// The blob may be pruned once a snapshot above this fact's epoch completes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobTombstone {
    pub cid: ContentId,
}

/// Its author has settled every snapshot up to `snapshot_epoch` (DESIGN rule 5: it has
/// re-issued its own facts below it that the snapshot did not cover), so it will never
/// need that snapshot's item blob (docs/ARCHITECTURE.md section 4a). Once every current
/// member has said so, devices drop the item blob. A kind of its own (tag 34), so an
/// older release stores and forwards it as unknown.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSettled {
    pub snapshot_epoch: Epoch,
    /// The item blob the settled snapshot's blob names, if it names one (format 3).
    pub item_blob: Option<ContentId>,
}

/// Every maintenance fact kind.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum MaintenanceFact {
    SnapshotProposed(SnapshotProposed),
    SnapshotCompleted(SnapshotCompleted),
    CacheInvalidated(CacheInvalidated),
    UpgradePublished(UpgradeMetadata),
    DeviceMetadata(DeviceMetadata),
    UpgradeReady(UpgradeReady),
    UpgradeActivated(UpgradeActivated),
    AdminReplacement(AdminReplacement),
    BlobTombstone(BlobTombstone),
    /// A separate kind (not a new field of [`AdminReplacement`]) so releases that predate
    /// it keep it as an unknown fact instead of rejecting a non-canonical body.
    CertifiedAdminReplacement(CertifiedAdminReplacement),
    UpgradeWidened(UpgradeWidened),
    UpgradeActivatedWhenReady(UpgradeActivatedWhenReady),
    /// The vault kinds (`crate::vault`, docs/ARCHITECTURE.md section 14).
    VaultEpochKey(crate::vault::VaultEpochKey),
    VaultRekey(crate::vault::VaultRekey),
    StorageGrant(crate::vault::StorageGrant),
    VaultCopy(crate::vault::VaultCopy),
    SnapshotSettled(SnapshotSettled),
}

impl MaintenanceFact {
    /// Whether only the current admin may issue this kind (DESIGN rule 8).
    pub fn is_admin_operation(&self) -> bool {
        matches!(
            self,
            Self::UpgradePublished(_)
                | Self::UpgradeActivated(_)
                | Self::AdminReplacement(_)
                | Self::UpgradeWidened(_)
                | Self::UpgradeActivatedWhenReady(_)
                | Self::VaultEpochKey(_)
                | Self::VaultRekey(_)
                | Self::StorageGrant(_)
        )
    }
}
