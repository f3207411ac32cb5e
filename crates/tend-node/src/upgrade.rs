//! Over-the-air upgrades on a device: publishing and activating packages (admin), and the
//! per-device pipeline fetch -> verify -> install -> `UpgradeReady`.
//!
//! The pipeline of one package is a sans-IO state machine, [`UpgradeSession`], and which
//! packages a device takes is decided by [`plan`], both in `tend_replica::upgrade` so the
//! simulator decides as the node does. The session is fed
//! the blob (or its absence) and the install step's result, each with the
//! [`MaintenanceEpoch`] observed at that moment, and answers with [`UpgradeAction`]s. The
//! driver [`apply`] does the I/O: it reads the artifact from an [`ArtifactSource`] (the
//! blob store), writes it to a file in the home, runs an [`Installer`] (a configured shell
//! command, [`CommandInstaller`]), records the outcome in the store's settings, and writes
//! `UpgradeReady`. A refused artifact or a failed install is recorded, so it is reported
//! again but never retried forever (DESIGN rule 9: an identity-epoch advance aborts a
//! session, which the driver then retries under the new epoch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tend_core::maintenance::{
    DeviceMetadata, MaintenanceFact, UpgradeActivated, UpgradeMetadata, UpgradePolicy,
};
use tend_core::upgrade::{Readiness, ReadinessPolicy};
use tend_core::{
    ContentId, DeviceId, Epoch, Hash32, MaintenanceEpoch, MaintenanceState, Payload,
    ProtocolVersion, UnsignedFact,
};
use tend_store::{Store, StoreError};

use crate::device::{Device, DeviceError};

/// Setting: the shell command that installs an artifact (`$1` is the artifact's path).
pub const INSTALL_COMMAND: &str = "upgrade.install_command";
/// Setting: this device's [`UpgradePolicy`].
pub const POLICY: &str = "upgrade.policy";
/// Setting: how many failed installs of one package before the device stops trying.
pub const MAX_ATTEMPTS: &str = "upgrade.max_attempts";
/// Settings under this prefix hold each package's [`LocalStatus`] (key: prefix + id).
const OUTCOME_PREFIX: &str = "upgrade.outcome.";
/// The largest artifact `publish` accepts: it is held in memory and in one blob.
pub const MAX_ARTIFACT_BYTES: usize = 256 << 20;
/// How often the driver retries a session aborted by an identity-epoch advance.
const MAX_EPOCH_RETRIES: u32 = 3;

/// Why an upgrade operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device {0} is not the admin of this authority; only the admin publishes and activates upgrades")]
    NotAdmin(DeviceId),
    #[error("invalid upgrade: {0}")]
    Invalid(String),
    #[error("no upgrade package {0} in this journal")]
    UnknownPackage(Hash32),
    #[error("package {0} is already published")]
    AlreadyPublished(Hash32),
    #[error("package {0} is already activated")]
    AlreadyActivated(Hash32),
    #[error(
        "package {package_id} is not ready: {ready} of {required} required devices reported ready; \
         activate once they have (the journal does not count an activation before)"
    )]
    NotReady {
        package_id: Hash32,
        ready: usize,
        required: usize,
    },
    #[error("cannot write artifact {path}: {source}")]
    Artifact {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub use tend_replica::upgrade::{
    artifact_cid, plan, BlobInput, Decision, LocalStatus, PlanConfig, Skip, UpgradeAction,
    UpgradeEvent, UpgradeInput, UpgradeSession, DEFAULT_MAX_ATTEMPTS,
};

/// Where the pipeline reads artifacts from.
pub trait ArtifactSource {
    /// The blob under `cid`, as far as this source knows it.
    fn fetch(&self, cid: &ContentId) -> BlobInput;
}

impl ArtifactSource for Store {
    fn fetch(&self, cid: &ContentId) -> BlobInput {
        match self.get_blob(cid) {
            Ok(Some(b)) => BlobInput::Bytes(b),
            Ok(None) => BlobInput::Missing,
            Err(e) => BlobInput::Unreadable(e.to_string()),
        }
    }
}

/// The install step.
pub trait Installer {
    /// Installs the verified artifact at `artifact`; `Err` carries a one-line reason.
    fn install(&mut self, package: &UpgradeMetadata, artifact: &Path) -> Result<(), String>;
}

/// Runs `sh -c COMMAND tend-install ARTIFACT`: the artifact's path is `$1`, and the
/// environment has `TEND_HOME`, `TEND_ARTIFACT`, `TEND_UPGRADE_PACKAGE` and
/// `TEND_UPGRADE_VERSION`. A non-zero exit, a signal or the timeout is a failure.
pub struct CommandInstaller {
    pub command: String,
    pub home: PathBuf,
    pub timeout: Duration,
}

impl Installer for CommandInstaller {
    fn install(&mut self, package: &UpgradeMetadata, artifact: &Path) -> Result<(), String> {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .arg("tend-install")
            .arg(artifact)
            .env("TEND_HOME", &self.home)
            .env("TEND_ARTIFACT", artifact)
            .env("TEND_UPGRADE_PACKAGE", package.package_id.to_string())
            .env("TEND_UPGRADE_VERSION", package.version.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run the install command: {e}"))?;
        // Read stderr on a thread so a chatty command cannot fill the pipe and hang.
        let stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut s) = stderr {
                use std::io::Read;
                let _ = s.read_to_string(&mut text);
            }
            text
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "install command timed out after {} s",
                        self.timeout.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("cannot wait for the install command: {e}")),
            }
        };
        let text = reader.join().unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(match status.code() {
            Some(code) => format!("install command exited with status {code}: {last}"),
            None => format!("install command was killed by a signal: {last}"),
        }
        .trim_end_matches(": ")
        .to_string())
    }
}

/// Options of one pipeline run.
#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    /// Asked for by the operator: manual-policy devices take packages too.
    pub explicit: bool,
    /// Take refused or failed packages again.
    pub retry: bool,
}

/// What the pipeline did with one package.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackageRun {
    pub package_id: String,
    pub version: String,
    pub skipped: Option<Skip>,
    pub events: Vec<UpgradeEvent>,
}

/// What one pipeline run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyReport {
    pub device_id: String,
    pub packages: Vec<PackageRun>,
    /// Sessions aborted by an identity-epoch advance (and retried).
    pub aborted_sessions: u32,
}

impl ApplyReport {
    /// Whether any package was refused or failed to install in this run.
    pub fn has_failures(&self) -> bool {
        self.packages.iter().any(|p| {
            p.events.iter().any(|e| {
                matches!(
                    e,
                    UpgradeEvent::Refused { .. } | UpgradeEvent::InstallFailed { .. }
                )
            })
        })
    }
}

/// This device's upgrade policy (automatic when unset).
pub fn policy(device: &Device) -> Result<UpgradePolicy, UpgradeError> {
    Ok(device
        .store()
        .get_setting(POLICY)?
        .unwrap_or(UpgradePolicy::Automatic))
}

/// Sets this device's upgrade policy and advertises it.
pub fn set_policy(device: &Device, policy: &UpgradePolicy) -> Result<(), UpgradeError> {
    device.store().put_setting(POLICY, policy)?;
    advertise(device)?;
    Ok(())
}

/// The configured install command, if any.
pub fn install_command(device: &Device) -> Result<Option<String>, UpgradeError> {
    Ok(device.store().get_setting(INSTALL_COMMAND)?)
}

/// Sets (or with `None` clears) the install command.
pub fn set_install_command(device: &Device, command: Option<&str>) -> Result<(), UpgradeError> {
    match command {
        Some(c) if c.trim().is_empty() => {
            Err(UpgradeError::Invalid("the install command is empty".into()))
        }
        Some(c) => Ok(device.store().put_setting(INSTALL_COMMAND, c)?),
        None => {
            device.store().delete_setting(INSTALL_COMMAND)?;
            Ok(())
        }
    }
}

/// Failed installs of one package before the device gives up on it.
pub fn max_attempts(device: &Device) -> Result<u32, UpgradeError> {
    Ok(device
        .store()
        .get_setting(MAX_ATTEMPTS)?
        .unwrap_or(DEFAULT_MAX_ATTEMPTS)
        .max(1))
}

/// Every package outcome this device recorded.
pub fn outcomes(device: &Device) -> Result<BTreeMap<Hash32, LocalStatus>, UpgradeError> {
    let mut out = BTreeMap::new();
    for key in device.store().setting_keys()? {
        let Some(hex) = key.strip_prefix(OUTCOME_PREFIX) else {
            continue;
        };
        let Ok(id) = hex.parse::<Hash32>() else {
            continue;
        };
        if let Some(status) = device.store().get_setting::<LocalStatus>(&key)? {
            out.insert(id, status);
        }
    }
    Ok(out)
}

fn record(device: &Device, id: &Hash32, status: &LocalStatus) -> Result<(), UpgradeError> {
    Ok(device
        .store()
        .put_setting(&format!("{OUTCOME_PREFIX}{id}"), status)?)
}

/// The version this device runs for fence checks and `DeviceMetadata`: this build's
/// version, or the highest version it installed of a package the admin has activated
/// (installing stages a release; activation switches to it).
pub fn running_version(
    device: &Device,
    state: &MaintenanceState,
) -> Result<ProtocolVersion, UpgradeError> {
    let installed = outcomes(device)?;
    Ok(running_version_from(state, &installed))
}

fn running_version_from(
    state: &MaintenanceState,
    outcomes: &BTreeMap<Hash32, LocalStatus>,
) -> ProtocolVersion {
    outcomes
        .iter()
        .filter(|(id, _)| {
            state
                .upgrades
                .get(*id)
                .is_some_and(|u| u.activated.is_some())
        })
        .filter_map(|(_, s)| match s {
            LocalStatus::Installed { version } => Some(*version),
            _ => None,
        })
        .chain([ProtocolVersion::CURRENT])
        .max()
        .unwrap_or(ProtocolVersion::CURRENT)
}

/// DESIGN rule 7 for this device: `Ok` unless an activated fence refuses its sessions.
pub fn fence_check(
    device: &Device,
) -> Result<Result<(), tend_core::upgrade::FenceRefusal>, UpgradeError> {
    let state = device.store().maintenance_state(device.namespace())?;
    let running = running_version(device, &state)?;
    Ok(state.fence_check(state.current_epoch(), running))
}

/// Creates a device ([`Device::init`]) that has announced its release ([`advertise`]), as
/// `tend init` and the library's `Device::create` make one: until its release is in its
/// journal a device writes fact format 1 (untimed ids, one signature check each), so a
/// device written to before it ever ran would fill its journal with the slower format.
pub fn init_announced(
    home: &Path,
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> Result<Device, DeviceError> {
    let device = Device::init(home, rng)?;
    advertise(&device).map_err(|e| match e {
        UpgradeError::Device(e) => e,
        UpgradeError::Store(e) => e.into(),
        // Publishing and activating packages fail otherwise; announcing does not.
        other => DeviceError::InvalidInput(other.to_string()),
    })?;
    Ok(device)
}

/// Publishes `DeviceMetadata` (running and supported versions, policy) when the journal
/// does not already say exactly that. Returns whether a fact was written.
pub fn advertise(device: &Device) -> Result<bool, UpgradeError> {
    let state = device.store().maintenance_state(device.namespace())?;
    let outcomes = outcomes(device)?;
    let running = running_version_from(&state, &outcomes);
    let mut supported: Vec<ProtocolVersion> = outcomes
        .values()
        .filter_map(|s| match s {
            LocalStatus::Installed { version } => Some(*version),
            _ => None,
        })
        .chain([ProtocolVersion::CURRENT, running])
        .collect();
    supported.sort();
    supported.dedup();
    let meta = DeviceMetadata {
        running_version: running,
        supported_versions: supported,
        upgrade_policy: policy(device)?,
    };
    let me = device.device_id();
    if state.device_metadata.get(&me) == Some(&meta) {
        return Ok(false);
    }
    // The reducer keeps a device's last metadata in `(epoch, id)` order, so the new fact
    // must sort after the previous one: at the same epoch the ids would decide.
    let mut previous = None;
    for stored in device.store().scan_maintenance(device.namespace())? {
        let stored = stored?;
        if let Ok(f) = stored.verify() {
            if f.author() == me
                && matches!(
                    f.payload(),
                    Payload::Maintenance(MaintenanceFact::DeviceMetadata(_))
                )
            {
                previous = Some(f.epoch());
            }
        }
    }
    let epoch = match previous {
        Some(p) if p >= state.current_epoch() => p.next(),
        _ => state.current_epoch(),
    };
    device.write(UnsignedFact {
        namespace: device.namespace(),
        epoch,
        payload: Payload::Maintenance(MaintenanceFact::DeviceMetadata(meta)),
    })?;
    Ok(true)
}

/// Runs the pipeline for every published package on this device: the driver of
/// [`UpgradeSession`]. Artifacts are written to `<home>/upgrades/` before installing.
pub fn apply(
    device: &Device,
    source: &dyn ArtifactSource,
    installer: &mut dyn Installer,
    opts: &ApplyOptions,
) -> Result<ApplyReport, UpgradeError> {
    let me = device.device_id();
    let mut report = ApplyReport {
        device_id: me.to_string(),
        packages: Vec::new(),
        aborted_sessions: 0,
    };
    let mut runs: BTreeMap<Hash32, PackageRun> = BTreeMap::new();
    let mut retries = 0;
    loop {
        let state = device.store().maintenance_state(device.namespace())?;
        let config = PlanConfig {
            policy: policy(device)?,
            explicit: opts.explicit,
            retry: opts.retry,
            running: running_version(device, &state)?,
            max_attempts: max_attempts(device)?,
        };
        let mut recorded = outcomes(device)?;
        if opts.retry {
            // A retry starts a package afresh, with a new budget of attempts.
            recorded.retain(|_, s| matches!(s, LocalStatus::Installed { .. }));
        }
        let mut aborted = false;
        for (id, decision) in plan(&state, &me, &config, &recorded) {
            let meta = &state.upgrades[&id].metadata;
            let run = runs.entry(id).or_insert_with(|| PackageRun {
                package_id: id.to_string(),
                version: meta.version.to_string(),
                skipped: None,
                events: Vec::new(),
            });
            match decision {
                Decision::Skip(s) => {
                    // A package already handled in an earlier round keeps its events.
                    if run.events.is_empty() {
                        run.skipped = Some(s);
                    }
                }
                Decision::Start(session, actions) => {
                    run.skipped = None;
                    if drive(device, source, installer, session, actions, &mut run.events)? {
                        aborted = true;
                        report.aborted_sessions += 1;
                    }
                }
            }
        }
        if !aborted || retries >= MAX_EPOCH_RETRIES {
            break;
        }
        retries += 1;
    }
    report.packages = runs.into_values().collect();
    advertise(device)?;
    Ok(report)
}

/// Carries out one session's actions until it finishes; returns whether it aborted.
fn drive(
    device: &Device,
    source: &dyn ArtifactSource,
    installer: &mut dyn Installer,
    mut session: UpgradeSession,
    mut actions: Vec<UpgradeAction>,
    events: &mut Vec<UpgradeEvent>,
) -> Result<bool, UpgradeError> {
    let id = session.package().package_id;
    let epoch_now = || -> Result<MaintenanceEpoch, UpgradeError> {
        Ok(device
            .store()
            .maintenance_state(device.namespace())?
            .maintenance_epoch())
    };
    while !actions.is_empty() {
        let mut next = Vec::new();
        for action in actions {
            match action {
                UpgradeAction::FetchBlob { cid } => {
                    let blob = source.fetch(&cid);
                    let epoch = epoch_now()?;
                    next.extend(session.handle(UpgradeInput::Blob { epoch, blob }));
                }
                UpgradeAction::Install { package, artifact } => {
                    let path = write_artifact(device.home(), &package, &artifact)?;
                    let result = installer.install(&package, &path);
                    let epoch = epoch_now()?;
                    next.extend(session.handle(UpgradeInput::InstallFinished { epoch, result }));
                }
                UpgradeAction::Record(status) => record(device, &id, &status)?,
                UpgradeAction::WriteReady(ready) => {
                    let state = device.store().maintenance_state(device.namespace())?;
                    let epoch = state
                        .package_fact_epoch(&ready.package_id)
                        .ok_or(UpgradeError::UnknownPackage(ready.package_id))?;
                    device.write(UnsignedFact {
                        namespace: device.namespace(),
                        epoch,
                        payload: Payload::Maintenance(MaintenanceFact::UpgradeReady(ready)),
                    })?;
                }
                UpgradeAction::Report(e) => events.push(e),
            }
        }
        actions = next;
    }
    Ok(session.is_aborted())
}

/// Writes the artifact to `<home>/upgrades/<package>-<version>.artifact` (via a temporary
/// file and a rename, so an install never sees half an artifact).
fn write_artifact(
    home: &Path,
    package: &UpgradeMetadata,
    bytes: &[u8],
) -> Result<PathBuf, UpgradeError> {
    let dir = home.join("upgrades");
    let path = dir.join(format!(
        "{}-{}.artifact",
        package.package_id, package.version
    ));
    let tmp = dir.join(format!(".{}.tmp", package.package_id));
    let err = |source| UpgradeError::Artifact {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// The package id of an artifact published as `version` with this fence and cohort:
/// BLAKE3 over the canonical tuple, so publishing the same thing twice is recognised.
pub fn package_id(
    version: ProtocolVersion,
    artifact_hash: &Hash32,
    artifact_size: u64,
    fence: Option<Epoch>,
    cohort_percent: u8,
) -> Hash32 {
    let mut input = b"tend-package-v1".to_vec();
    input.extend_from_slice(&tend_core::encoding::to_canonical(&(
        version,
        artifact_hash,
        artifact_size,
        fence,
        cohort_percent,
    )));
    Hash32::of(&input)
}

fn require_admin(device: &Device, state: &MaintenanceState) -> Result<(), UpgradeError> {
    let me = device.device_id();
    if state.is_admin_at(&me, state.current_epoch()) {
        Ok(())
    } else {
        Err(UpgradeError::NotAdmin(me))
    }
}

/// Admin: stores `artifact` as a blob and publishes `UpgradePublished`. A fence makes it a
/// hard fork, which must go to every device (`cohort_percent` 100).
pub fn publish(
    device: &Device,
    artifact: &[u8],
    version: ProtocolVersion,
    fence: Option<Epoch>,
    cohort_percent: u8,
) -> Result<UpgradeMetadata, UpgradeError> {
    let state = device.store().maintenance_state(device.namespace())?;
    require_admin(device, &state)?;
    if cohort_percent > 100 {
        return Err(UpgradeError::Invalid(format!(
            "cohort {cohort_percent}% is above 100%"
        )));
    }
    if fence.is_some() && cohort_percent < 100 {
        return Err(UpgradeError::Invalid(
            "a fenced (hard-fork) upgrade must go to every device: drop --cohort or --fence".into(),
        ));
    }
    if artifact.is_empty() || artifact.len() > MAX_ARTIFACT_BYTES {
        return Err(UpgradeError::Invalid(format!(
            "the artifact is {} bytes; it must hold 1 to {MAX_ARTIFACT_BYTES}",
            artifact.len()
        )));
    }
    let artifact_hash = Hash32::of(artifact);
    let artifact_size = artifact.len() as u64;
    let id = package_id(
        version,
        &artifact_hash,
        artifact_size,
        fence,
        cohort_percent,
    );
    if state.upgrades.contains_key(&id) {
        return Err(UpgradeError::AlreadyPublished(id));
    }
    let cid = device
        .store()
        .put_blob(tend_core::ids::CODEC_RAW, artifact)?;
    debug_assert_eq!(cid, artifact_cid(&artifact_hash));
    let meta = UpgradeMetadata {
        package_id: id,
        version,
        artifact_hash,
        artifact_size,
        fence,
        cohort_percent,
    };
    device.append(Payload::Maintenance(MaintenanceFact::UpgradePublished(
        meta.clone(),
    )))?;
    Ok(meta)
}

/// Admin: widens the staged rollout of `package_id` to `cohort_percent`. Every device in
/// the smaller rollout stays in (a device is in when its cohort is below the percent), and
/// the reducer keeps the highest percent, so a widening can never narrow a rollout.
pub fn widen(
    device: &Device,
    package_id: &Hash32,
    cohort_percent: u8,
) -> Result<UpgradeMetadata, UpgradeError> {
    let state = device.store().maintenance_state(device.namespace())?;
    require_admin(device, &state)?;
    let u = state
        .upgrades
        .get(package_id)
        .ok_or(UpgradeError::UnknownPackage(*package_id))?;
    let current = u.metadata.cohort_percent;
    if cohort_percent > 100 {
        return Err(UpgradeError::Invalid(format!(
            "cohort {cohort_percent}% is above 100%"
        )));
    }
    if cohort_percent <= current {
        return Err(UpgradeError::Invalid(format!(
            "package {package_id} already goes to {current}% of devices; a rollout only \
             widens (give a percent above {current})"
        )));
    }
    let epoch = state
        .package_fact_epoch(package_id)
        .ok_or(UpgradeError::UnknownPackage(*package_id))?;
    device.write(UnsignedFact {
        namespace: device.namespace(),
        epoch,
        payload: Payload::Maintenance(MaintenanceFact::UpgradeWidened(
            tend_core::maintenance::UpgradeWidened {
                package_id: *package_id,
                cohort_percent,
            },
        )),
    })?;
    Ok(UpgradeMetadata {
        cohort_percent,
        ..u.metadata.clone()
    })
}

/// Admin: activates `package_id` when `policy` finds enough devices ready.
pub fn activate(
    device: &Device,
    package_id: &Hash32,
    policy: ReadinessPolicy,
) -> Result<UpgradeActivated, UpgradeError> {
    let state = device.store().maintenance_state(device.namespace())?;
    require_admin(device, &state)?;
    let u = state
        .upgrades
        .get(package_id)
        .ok_or(UpgradeError::UnknownPackage(*package_id))?;
    if u.activated.is_some() {
        return Err(UpgradeError::AlreadyActivated(*package_id));
    }
    let r = state
        .readiness(package_id, policy)
        .ok_or(UpgradeError::UnknownPackage(*package_id))?;
    if !r.satisfied {
        return Err(UpgradeError::NotReady {
            package_id: *package_id,
            ready: r.ready.len(),
            required: r.required,
        });
    }
    let activated = UpgradeActivated {
        package_id: *package_id,
        to_version: u.metadata.version,
        activation_fence: u.metadata.fence,
    };
    let epoch = state
        .package_fact_epoch(package_id)
        .ok_or(UpgradeError::UnknownPackage(*package_id))?;
    // The figure the policy required goes into the journal: every device's reducer counts
    // the activation only once it holds that many ready members.
    let gated = tend_core::maintenance::UpgradeActivatedWhenReady {
        activation: activated.clone(),
        min_ready: u16::try_from(r.required).unwrap_or(u16::MAX),
    };
    device.write(UnsignedFact {
        namespace: device.namespace(),
        epoch,
        payload: Payload::Maintenance(MaintenanceFact::UpgradeActivatedWhenReady(gated)),
    })?;
    // The artifacts of older releases are superseded: tombstoned, GC reclaims them once a
    // snapshot covers the tombstone, so blob storage stays bounded (a device that still
    // needs an older release has long been fenced out or upgraded past it).
    let current = device.store().maintenance_state(device.namespace())?;
    for older in current.upgrades.values().filter(|o| {
        o.metadata.version < activated.to_version && o.metadata.package_id != *package_id
    }) {
        let cid = artifact_cid(&older.metadata.artifact_hash);
        if !current.tombstones.contains_key(&cid) && cid != artifact_cid(&u.metadata.artifact_hash)
        {
            device.append(Payload::Maintenance(MaintenanceFact::BlobTombstone(
                tend_core::maintenance::BlobTombstone { cid },
            )))?;
        }
    }
    Ok(activated)
}

/// One package as `tend upgrade status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackageStatus {
    pub package_id: String,
    pub version: String,
    pub artifact_hash: String,
    pub artifact_size: u64,
    pub fence: Option<u64>,
    pub cohort_percent: u8,
    pub in_cohort: bool,
    pub artifact_stored: bool,
    /// Readiness under the "all eligible devices" policy.
    pub readiness: Readiness,
    pub activated: bool,
    /// The fewest ready members an activation in the journal waits for, while none
    /// counts yet (`None`: no activation is waiting).
    #[serde(default)]
    pub activation_waits_for: Option<u16>,
    /// This device's recorded outcome.
    pub local: Option<LocalStatus>,
}

/// The upgrade view of this device, as `tend upgrade status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeStatus {
    pub device_id: String,
    pub running_version: String,
    pub policy: UpgradePolicy,
    pub install_command: Option<String>,
    pub current_epoch: u64,
    /// Why this device refuses sessions, when an activated fence says so.
    pub fence_refusal: Option<String>,
    pub packages: Vec<PackageStatus>,
}

/// Packages, readiness and this device's outcomes.
pub fn status(device: &Device) -> Result<UpgradeStatus, UpgradeError> {
    let me = device.device_id();
    let state = device.store().maintenance_state(device.namespace())?;
    let local = outcomes(device)?;
    let running = running_version_from(&state, &local);
    let mut packages = Vec::new();
    for (id, u) in &state.upgrades {
        let m = &u.metadata;
        packages.push(PackageStatus {
            package_id: id.to_string(),
            version: m.version.to_string(),
            artifact_hash: m.artifact_hash.to_string(),
            artifact_size: m.artifact_size,
            fence: m.fence.map(|e| e.0),
            cohort_percent: m.cohort_percent,
            in_cohort: m.includes(&me),
            artifact_stored: device.store().has_blob(&artifact_cid(&m.artifact_hash))?,
            readiness: state
                .readiness(id, ReadinessPolicy::All)
                .ok_or(UpgradeError::UnknownPackage(*id))?,
            activated: u.activated.is_some(),
            activation_waits_for: u
                .pending_activations
                .values()
                .map(|(_, min)| *min)
                .min()
                .filter(|_| u.activated.is_none()),
            local: local.get(id).cloned(),
        });
    }
    Ok(UpgradeStatus {
        device_id: me.to_string(),
        running_version: running.to_string(),
        policy: policy(device)?,
        install_command: install_command(device)?,
        current_epoch: state.current_epoch().0,
        fence_refusal: state
            .fence_check(state.current_epoch(), running)
            .err()
            .map(|r| r.to_string()),
        packages,
    })
}
