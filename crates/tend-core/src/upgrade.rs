//! Upgrade rules over the reduced state: activation fences (DESIGN rule 7), readiness
//! policies, and the epoch at which package facts are written.
//!
//! A hard fork's fence `F` is the journal epoch from which its `to_version` is mandatory.
//! A device whose local epoch is at or above `F` and that runs an older version does not
//! satisfy the fence: it refuses sessions, and peers refuse it. Below `F` both versions
//! still sync (a grace period the admin chooses by picking `F` above the activation's
//! epoch); a fence at or below the activation's epoch takes effect as soon as a device
//! sees the activation.

use std::collections::BTreeSet;

use crate::ids::{DeviceId, Epoch, Hash32, ProtocolVersion};
use crate::maintenance::UpgradePolicy;
use crate::reduce::MaintenanceState;

/// Whose version failed the fence.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FenceSide {
    /// This device runs a version below the fence.
    Local,
    /// The peer announced a version below the fence.
    Peer,
}

/// Why a session is refused under an activated fence; its `Display` is the line the peer
/// shows.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error(
    "refused: upgrade {package_id} made version {required} mandatory from epoch {fence}; {} version {running} at epoch {local_epoch}",
    match side { FenceSide::Local => "this device runs", FenceSide::Peer => "the peer runs" }
)]
pub struct FenceRefusal {
    pub side: FenceSide,
    pub package_id: Hash32,
    pub fence: Epoch,
    pub required: ProtocolVersion,
    pub running: ProtocolVersion,
    pub local_epoch: Epoch,
}

/// How many devices must be ready before the admin activates a package.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessPolicy {
    /// Every eligible device (a current member in the package's cohort whose advertised
    /// policy does not pin another version).
    All,
    /// At least this many current members.
    AtLeast(u16),
}

/// Readiness of one package under a policy.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Readiness {
    /// Current members that published `UpgradeReady` for the package.
    pub ready: Vec<DeviceId>,
    /// Current members expected to take the package.
    pub eligible: Vec<DeviceId>,
    /// How many ready devices the policy needs.
    pub required: usize,
    pub satisfied: bool,
}

impl MaintenanceState {
    /// DESIGN rule 7: `Ok` when a device at `local_epoch` running `running` satisfies every
    /// activated fence; otherwise the refusal (the one requiring the highest version).
    pub fn fence_check(
        &self,
        local_epoch: Epoch,
        running: ProtocolVersion,
    ) -> Result<(), FenceRefusal> {
        self.fence_violation(local_epoch, running, FenceSide::Local)
    }

    /// The responder's check of a peer that announced `peer_version`: refused when this
    /// device, at `local_epoch`, is past a fence the peer's version does not meet. (A peer
    /// that has not seen the activation cannot refuse itself, so its announced version is
    /// what the responder checks.)
    pub fn fence_check_peer(
        &self,
        local_epoch: Epoch,
        peer_version: ProtocolVersion,
    ) -> Result<(), FenceRefusal> {
        self.fence_violation(local_epoch, peer_version, FenceSide::Peer)
    }

    fn fence_violation(
        &self,
        local_epoch: Epoch,
        running: ProtocolVersion,
        side: FenceSide,
    ) -> Result<(), FenceRefusal> {
        let worst = self
            .upgrades
            .values()
            .filter_map(|u| u.activated.as_ref().map(|a| (u.metadata.package_id, a)))
            .filter_map(|(id, a)| a.activation_fence.map(|f| (a.to_version, f, id)))
            .filter(|(to, fence, _)| local_epoch >= *fence && running < *to)
            .max();
        match worst {
            None => Ok(()),
            Some((required, fence, package_id)) => Err(FenceRefusal {
                side,
                package_id,
                fence,
                required,
                running,
                local_epoch,
            }),
        }
    }

    /// The epoch to stamp a fact about `package_id` (readiness, activation) with: the
    /// current epoch, but strictly above the package's publication, which the reducer
    /// requires. `None` for an unknown package.
    pub fn package_fact_epoch(&self, package_id: &Hash32) -> Option<Epoch> {
        let u = self.upgrades.get(package_id)?;
        Some(self.current_epoch().max(u.published_at.next()))
    }

    /// Which current members are expected to take `package_id`, which are ready, and
    /// whether `policy` allows activation. `None` for an unknown package.
    pub fn readiness(&self, package_id: &Hash32, policy: ReadinessPolicy) -> Option<Readiness> {
        let u = self.upgrades.get(package_id)?;
        let members: BTreeSet<DeviceId> = self
            .membership()
            .map(|m| m.members.clone())
            .unwrap_or_default();
        let eligible: Vec<DeviceId> = members
            .iter()
            .filter(|d| u.metadata.includes(d))
            .filter(|d| {
                !matches!(
                    self.device_metadata.get(*d).map(|m| &m.upgrade_policy),
                    Some(UpgradePolicy::Pinned(v)) if *v != u.metadata.version
                )
            })
            .copied()
            .collect();
        let ready: Vec<DeviceId> = u.ready.intersection(&members).copied().collect();
        let (required, satisfied) = match policy {
            // At least one ready device even when the cohort happens to be empty: activating
            // a package nobody installed helps no one.
            ReadinessPolicy::All => {
                let required = eligible.len().max(1);
                let all = eligible.iter().all(|d| u.ready.contains(d));
                (required, all && !ready.is_empty())
            }
            ReadinessPolicy::AtLeast(n) => {
                let required = usize::from(n).max(1);
                (required, ready.len() >= required)
            }
        };
        Some(Readiness {
            ready,
            eligible,
            required,
            satisfied,
        })
    }
}
