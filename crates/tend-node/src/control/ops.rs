//! Operations that both the control socket (on the running device) and the CLI (on a
//! stopped device) carry out against a [`Device`], so a command gives the same result
//! struct, and therefore the same output, either way.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tend_core::maintenance::{UpgradeMetadata, UpgradePolicy};
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{DeviceId, Epoch, Hash32, ProtocolVersion};

use crate::admin::{self, AdminError};
use crate::cache::{self, Invalidation};
use crate::device::{Device, DeviceError, GcPolicy};
use crate::upgrade::{self, ApplyOptions, ApplyReport, CommandInstaller, UpgradeError};

/// How long one install command may run before it counts as failed.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    // Boxed: these two are large, and every operation returns this type.
    #[error(transparent)]
    Upgrade(Box<UpgradeError>),
    #[error(transparent)]
    Admin(Box<AdminError>),
    #[error(transparent)]
    Store(#[from] tend_store::StoreError),
    #[error("cannot read --artifact {path}: {source}")]
    Artifact {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<UpgradeError> for OpError {
    fn from(e: UpgradeError) -> Self {
        OpError::Upgrade(Box::new(e))
    }
}

impl From<AdminError> for OpError {
    fn from(e: AdminError) -> Self {
        OpError::Admin(Box::new(e))
    }
}

/// What `tend upgrade publish` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// The package id (hex).
    pub package_id: String,
    /// The protocol version it brings.
    pub version: String,
    /// BLAKE3 of the artifact (hex).
    pub artifact_hash: String,
    /// The artifact's size in bytes.
    pub artifact_size: u64,
    /// The hard-fork fence epoch, if any.
    pub fence: Option<u64>,
    /// The staged rollout's percentage.
    pub cohort_percent: u8,
}

impl From<&UpgradeMetadata> for Published {
    fn from(meta: &UpgradeMetadata) -> Self {
        Self {
            package_id: meta.package_id.to_string(),
            version: meta.version.to_string(),
            artifact_hash: meta.artifact_hash.to_string(),
            artifact_size: meta.artifact_size,
            fence: meta.fence.map(|e| e.0),
            cohort_percent: meta.cohort_percent,
        }
    }
}

/// What `tend upgrade activate` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Activated {
    /// The package id (hex).
    pub package_id: String,
    /// The version devices move to.
    pub to_version: String,
    /// From this epoch on, older versions are refused (hard forks only).
    pub activation_fence: Option<u64>,
}

/// A device's upgrade settings, as `tend upgrade configure` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpgradeSettings {
    /// The shell command that installs an artifact.
    pub install_command: Option<String>,
    /// Automatic, manual or pinned.
    pub policy: UpgradePolicy,
    /// Failed installs of a package before the device stops trying.
    pub max_attempts: u32,
}

/// What `tend admin replace` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminReplaced {
    /// The `AdminReplacement` fact's id (hex).
    pub fact_id: String,
    /// The epoch the fact was written at.
    pub epoch: u64,
    /// The member that becomes admin.
    pub new_admin: String,
    /// The epoch from which it is admin.
    pub activation_epoch: u64,
    /// Whether the authority threshold-signed it (rather than the old admin).
    pub threshold_signed: bool,
}

/// What `tend gc --policy` reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcPolicySet {
    /// The device's policy now.
    pub gc_policy: GcPolicy,
}

/// Stores the artifact at `path` as a blob and publishes the package (admin only).
pub fn upgrade_publish(
    device: &Device,
    path: &Path,
    version: ProtocolVersion,
    fence: Option<u64>,
    cohort_percent: u8,
) -> Result<Published, OpError> {
    let bytes = std::fs::read(path).map_err(|source| OpError::Artifact {
        path: path.display().to_string(),
        source,
    })?;
    let meta = upgrade::publish(device, &bytes, version, fence.map(Epoch), cohort_percent)?;
    Ok(Published::from(&meta))
}

/// Widens a package's staged rollout to `cohort_percent` (admin only).
pub fn upgrade_widen(
    device: &Device,
    package_id: &Hash32,
    cohort_percent: u8,
) -> Result<Published, OpError> {
    let meta = upgrade::widen(device, package_id, cohort_percent)?;
    Ok(Published::from(&meta))
}

/// Activates a package once `min_ready` members (default: every eligible one) are ready.
pub fn upgrade_activate(
    device: &Device,
    package_id: &Hash32,
    min_ready: Option<u16>,
) -> Result<Activated, OpError> {
    let policy = min_ready.map_or(ReadinessPolicy::All, ReadinessPolicy::AtLeast);
    let a = upgrade::activate(device, package_id, policy)?;
    Ok(Activated {
        package_id: a.package_id.to_string(),
        to_version: a.to_version.to_string(),
        activation_fence: a.activation_fence.map(|e| e.0),
    })
}

/// Runs the upgrade pipeline now, as the operator asked (manual-policy devices take
/// packages too), with `install_cmd` or the configured install command.
pub fn upgrade_apply(
    device: &Device,
    install_cmd: Option<String>,
    retry: bool,
) -> Result<ApplyReport, OpError> {
    let command = match install_cmd {
        Some(c) => c,
        None => upgrade::install_command(device)?.ok_or_else(|| {
            OpError::Invalid(
                "no install command: pass --install-cmd or set one with \
                 `tend upgrade configure --install-cmd`"
                    .into(),
            )
        })?,
    };
    let mut installer = CommandInstaller {
        command,
        home: device.home().to_owned(),
        timeout: INSTALL_TIMEOUT,
    };
    Ok(upgrade::apply(
        device,
        device.store(),
        &mut installer,
        &ApplyOptions {
            explicit: true,
            retry,
        },
    )?)
}

/// Sets whichever of the install command, policy and install attempts are given, and
/// returns the settings afterwards.
pub fn upgrade_configure(
    device: &Device,
    install_cmd: Option<&str>,
    policy: Option<&UpgradePolicy>,
    max_attempts: Option<u32>,
) -> Result<UpgradeSettings, OpError> {
    // Checked before anything is written, so a bad value changes nothing.
    if max_attempts == Some(0) {
        return Err(OpError::Invalid("--max-attempts must be at least 1".into()));
    }
    if let Some(c) = install_cmd {
        upgrade::set_install_command(device, Some(c))?;
    }
    if let Some(n) = max_attempts {
        device.store().put_setting(upgrade::MAX_ATTEMPTS, &n)?;
    }
    if let Some(p) = policy {
        upgrade::set_policy(device, p)?;
    }
    Ok(UpgradeSettings {
        install_command: upgrade::install_command(device)?,
        policy: upgrade::policy(device)?,
        max_attempts: upgrade::max_attempts(device)?,
    })
}

/// Hands the admin role to `new` from `at_epoch`: signed by this device as the admin, or
/// with `threshold` by the authority through the key shares of `devices` (the first one
/// writes the fact).
pub fn admin_replace(
    devices: &[&Device],
    new: DeviceId,
    at_epoch: u64,
    threshold: bool,
    old: Option<DeviceId>,
) -> Result<AdminReplaced, OpError> {
    let me = *devices
        .first()
        .ok_or_else(|| OpError::Invalid("no device to write the replacement".into()))?;
    let fact = if threshold {
        admin::replace_with_threshold(devices, old, new, Epoch(at_epoch), &mut rand::rngs::OsRng)?
    } else {
        admin::replace(me, new, Epoch(at_epoch))?
    };
    Ok(AdminReplaced {
        fact_id: fact.id().to_string(),
        epoch: fact.epoch().0,
        new_admin: new.to_string(),
        activation_epoch: at_epoch,
        threshold_signed: threshold,
    })
}

/// Invalidates cache `keys` at `floor` (default: the current epoch): published as a fact,
/// or with `local` raised on this device only.
pub fn cache_invalidate(
    device: &Device,
    keys: &[String],
    floor: Option<u64>,
    local: bool,
) -> Result<Invalidation, OpError> {
    if local {
        let floor = match floor {
            Some(f) => Epoch(f),
            None => device
                .store()
                .maintenance_state(device.namespace())?
                .current_epoch(),
        };
        Ok(cache::invalidate_local(device, keys, floor)?)
    } else {
        Ok(cache::invalidate(device, keys, floor.map(Epoch))?.1)
    }
}

/// Sets the device's GC policy.
pub fn set_gc_policy(device: &Device, policy: GcPolicy) -> Result<GcPolicySet, OpError> {
    device.set_gc_policy(policy)?;
    Ok(GcPolicySet { gc_policy: policy })
}
