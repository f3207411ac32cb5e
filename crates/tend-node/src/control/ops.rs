//! Operations that both the control socket (on the running device) and the CLI (on a
//! stopped device) carry out against a [`Device`]. Each is one [`Op`]: a struct whose
//! fields are the request's, its answer type, and one `run`. The socket deserialises the
//! struct and runs it on the running device; the CLI builds the same struct and either
//! sends it or runs it on the store it opened. Parsing, checks and the answer are
//! therefore written once, and the two paths cannot drift.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tend_core::maintenance::{UpgradeMetadata, UpgradePolicy};
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{DeviceId, Epoch, Hash32, ProtocolVersion};

use crate::admin::{self, AdminError, AdminStatus};
use crate::cache::{self, CacheCheck, Invalidation};
use crate::data_request::{DataRequest, DataResponse};
use crate::device::{AuthorityStatus, Device, DeviceError, FactSummary, GcPolicy, SnapshotStatus};
use crate::upgrade::{
    self, ApplyOptions, ApplyReport, CommandInstaller, UpgradeError, UpgradeStatus,
};

/// One operation on a device, defined once for the running and the stopped device.
///
/// ```
/// use tend_node::control::ops::{GetAdminStatus, Op};
/// # fn show(device: &tend_node::Device) -> Result<(), tend_node::control::ops::OpError> {
/// // A stopped device: run it here. A running one: `client.run(GetAdminStatus {})`.
/// let status = GetAdminStatus {}.run(device)?;
/// println!("admin {:?}", status.admin);
/// # Ok(()) }
/// ```
pub trait Op: Serialize + DeserializeOwned + Send + 'static {
    /// The answer: the socket's `result`, and the struct the CLI prints.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Carries the operation out on `device`.
    fn run(self, device: &Device) -> Result<Self::Output, OpError>;

    /// Whether it may write facts. A running device then tells its sessions, since a
    /// membership or epoch change ends those under the old identity epoch.
    fn writes(&self) -> bool {
        false
    }
}

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

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, OpError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e| OpError::Invalid(format!("bad {what} {s:?}: {e}")))
}

/// The device's working directory is not the client's: a path in a request must be
/// absolute, and the CLI makes it so before sending.
fn absolute(path: &Path) -> Result<(), OpError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "the path {} is not absolute",
            path.display()
        )))
    }
}

/// `journal_list`: up to `limit` facts from `from_epoch` on, in `(epoch, id)` order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListJournal {
    /// Start at this epoch.
    #[serde(default)]
    pub from_epoch: u64,
    /// At most this many facts.
    pub limit: usize,
}

impl Op for ListJournal {
    type Output = Vec<FactSummary>;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(device.list(Epoch(self.from_epoch), self.limit)?)
    }
}

/// `authority_status`: members, threshold, group key, identity epoch and admin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetAuthorityStatus {}

impl Op for GetAuthorityStatus {
    type Output = AuthorityStatus;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(device.authority_status()?)
    }
}

/// `snapshot_status`: the latest verified snapshot, open proposals and the GC policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetSnapshotStatus {}

impl Op for GetSnapshotStatus {
    type Output = SnapshotStatus;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(device.snapshot_status()?)
    }
}

/// `set_gc_policy`: sets the device's GC policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetGcPolicy {
    /// `prune`, `archive` or `manual`.
    pub policy: GcPolicy,
}

impl Op for SetGcPolicy {
    type Output = GcPolicySet;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        device.set_gc_policy(self.policy)?;
        Ok(GcPolicySet {
            gc_policy: self.policy,
        })
    }
}

/// `upgrade_status`: packages, readiness, this device's outcomes and fence status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetUpgradeStatus {}

impl Op for GetUpgradeStatus {
    type Output = UpgradeStatus;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(upgrade::status(device)?)
    }
}

/// `upgrade_publish`: stores the artifact as a blob and publishes the package (admin
/// only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishUpgrade {
    /// Absolute path of the artifact file (the device reads it; it runs as the same
    /// user, the socket being owner-only).
    pub artifact: PathBuf,
    /// The protocol version it brings, `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Hard-fork fence epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// Staged rollout percentage.
    pub cohort: u8,
}

impl Op for PublishUpgrade {
    type Output = Published;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        absolute(&self.artifact)?;
        let version: ProtocolVersion = parse("version", &self.version)?;
        let bytes = std::fs::read(&self.artifact).map_err(|source| OpError::Artifact {
            path: self.artifact.display().to_string(),
            source,
        })?;
        let meta = upgrade::publish(device, &bytes, version, self.fence.map(Epoch), self.cohort)?;
        Ok(Published::from(&meta))
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `upgrade_widen`: widens a package's staged rollout (admin only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WidenUpgrade {
    /// The package id (hex).
    pub package_id: String,
    /// The new rollout percentage, above the current one.
    pub percent: u8,
}

impl Op for WidenUpgrade {
    type Output = Published;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        let id: Hash32 = parse("package id", &self.package_id)?;
        let meta = upgrade::widen(device, &id, self.percent)?;
        Ok(Published::from(&meta))
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `upgrade_activate`: activates a package once `min_ready` members (default: every
/// eligible one) are ready (admin only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivateUpgrade {
    /// The package id (hex).
    pub package_id: String,
    /// Activate once this many members are ready (default: every eligible one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready: Option<u16>,
}

impl Op for ActivateUpgrade {
    type Output = Activated;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        let id: Hash32 = parse("package id", &self.package_id)?;
        let policy = self
            .min_ready
            .map_or(ReadinessPolicy::All, ReadinessPolicy::AtLeast);
        let a = upgrade::activate(device, &id, policy)?;
        Ok(Activated {
            package_id: a.package_id.to_string(),
            to_version: a.to_version.to_string(),
            activation_fence: a.activation_fence.map(|e| e.0),
        })
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `upgrade_apply`: runs the upgrade pipeline now, as the operator asked (manual-policy
/// devices take packages too), with `install_cmd` or the configured install command.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyUpgrades {
    /// Install with this shell command instead of the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_cmd: Option<String>,
    /// Try refused or failed packages again.
    #[serde(default)]
    pub retry: bool,
}

impl Op for ApplyUpgrades {
    type Output = ApplyReport;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        let command = match self.install_cmd {
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
                retry: self.retry,
            },
        )?)
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `upgrade_configure`: sets whichever of the install command, policy and install
/// attempts are given, and answers with the settings afterwards.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigureUpgrades {
    /// The shell command that installs an artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_cmd: Option<String>,
    /// The upgrade policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<UpgradePolicy>,
    /// Failed installs before the device stops trying (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl Op for ConfigureUpgrades {
    type Output = UpgradeSettings;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        // Checked before anything is written, so a bad value changes nothing.
        if self.max_attempts == Some(0) {
            return Err(OpError::Invalid("--max-attempts must be at least 1".into()));
        }
        if let Some(c) = &self.install_cmd {
            upgrade::set_install_command(device, Some(c))?;
        }
        if let Some(n) = self.max_attempts {
            device.store().put_setting(upgrade::MAX_ATTEMPTS, &n)?;
        }
        if let Some(p) = &self.policy {
            upgrade::set_policy(device, p)?;
        }
        Ok(UpgradeSettings {
            install_command: upgrade::install_command(device)?,
            policy: upgrade::policy(device)?,
            max_attempts: upgrade::max_attempts(device)?,
        })
    }
    // Changing the policy advertises `DeviceMetadata`, a fact.
    fn writes(&self) -> bool {
        true
    }
}

/// `admin_status`: the admin in charge and its replacements.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetAdminStatus {}

impl Op for GetAdminStatus {
    type Output = AdminStatus;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(admin::status(device)?)
    }
}

/// `admin_replace`: hands the admin role to `new` from `at_epoch`, signed by this device
/// as the admin or, with `threshold`, by the authority.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplaceAdmin {
    /// The new admin's device id (hex).
    pub new: String,
    /// The epoch from which it is admin.
    pub at_epoch: u64,
    /// Threshold-signed by the authority (with this device's share alone, or with the
    /// shares of the devices given to [`ReplaceAdmin::run_among`]).
    #[serde(default)]
    pub threshold: bool,
    /// With `threshold`: the admin to replace (default: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
}

impl ReplaceAdmin {
    /// Runs it with the key shares of `devices` (the first one writes the fact): the
    /// stopped device's `--member-home` path.
    pub fn run_among(self, devices: &[&Device]) -> Result<AdminReplaced, OpError> {
        let new: DeviceId = parse("device id", &self.new)?;
        let old: Option<DeviceId> = self
            .old
            .as_deref()
            .map(|o| parse("device id", o))
            .transpose()?;
        let me = *devices
            .first()
            .ok_or_else(|| OpError::Invalid("no device to write the replacement".into()))?;
        let at = Epoch(self.at_epoch);
        let fact = if self.threshold {
            admin::replace_with_threshold(devices, old, new, at, &mut rand::rngs::OsRng)?
        } else {
            admin::replace(me, new, at)?
        };
        Ok(AdminReplaced {
            fact_id: fact.id().to_string(),
            epoch: fact.epoch().0,
            new_admin: new.to_string(),
            activation_epoch: self.at_epoch,
            threshold_signed: self.threshold,
        })
    }
}

impl Op for ReplaceAdmin {
    type Output = AdminReplaced;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        self.run_among(&[device])
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `cache_invalidate`: invalidates cache `keys` at `floor` (default: the current
/// epoch), published as a fact, or with `local` raised on this device only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InvalidateCache {
    /// The keys.
    pub keys: Vec<String>,
    /// The epoch floor (default: the current epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u64>,
    /// Raise the floors on this device only, without publishing.
    #[serde(default)]
    pub local: bool,
}

impl Op for InvalidateCache {
    type Output = Invalidation;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        if self.local {
            let floor = match self.floor {
                Some(f) => Epoch(f),
                None => device
                    .store()
                    .maintenance_state(device.namespace())?
                    .current_epoch(),
            };
            Ok(cache::invalidate_local(device, &self.keys, floor)?)
        } else {
            Ok(cache::invalidate(device, &self.keys, self.floor.map(Epoch))?.1)
        }
    }
    fn writes(&self) -> bool {
        true
    }
}

/// `cache_check`: whether an entry cached at `epoch` under `key` is still valid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckCache {
    /// The cache key.
    pub key: String,
    /// The epoch the entry was cached at.
    pub epoch: u64,
}

impl Op for CheckCache {
    type Output = CacheCheck;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(cache::check(device, &self.key, Epoch(self.epoch))?)
    }
}

/// `data`: an application data operation (collections, logs, the replicated cache).
impl Op for DataRequest {
    type Output = DataResponse;
    fn run(self, device: &Device) -> Result<Self::Output, OpError> {
        Ok(crate::data::run(device, self)?)
    }
    fn writes(&self) -> bool {
        self.is_write()
    }
}
