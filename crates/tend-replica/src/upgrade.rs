//! The upgrade pipeline's decisions, sans-IO: which published packages this device takes
//! ([`plan`]), and the pipeline of one package ([`UpgradeSession`]: fetch -> verify ->
//! install -> `UpgradeReady`), fed the artifact (or its absence) and the install step's
//! result, each with the [`MaintenanceEpoch`] observed at that moment, and answering with
//! [`UpgradeAction`]s. The running node's driver (`tend_node::upgrade::apply`) does the
//! I/O; the simulator takes its decisions from [`plan`] too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tend_core::maintenance::{UpgradeMetadata, UpgradePolicy, UpgradeReady};
use tend_core::{ContentId, DeviceId, Hash32, MaintenanceEpoch, MaintenanceState, ProtocolVersion};

/// Failed installs of one package before it is left alone, unless asked to retry.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What this device recorded about a package, in its settings (never replicated).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LocalStatus {
    /// Verified and installed; `UpgradeReady` follows (or has followed).
    Installed { version: ProtocolVersion },
    /// The artifact did not match the published hash or size: never installed.
    Refused { reason: String },
    /// The install step failed `attempts` times.
    Failed { reason: String, attempts: u32 },
}

/// Why a package is not taken on this device now.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "skip", rename_all = "snake_case")]
pub enum Skip {
    /// This device already published `UpgradeReady` for it.
    AlreadyReady,
    /// Outside the staged rollout's cohort.
    NotInCohort { cohort: u8, cohort_percent: u8 },
    /// The device's policy is manual and this run was automatic.
    Manual,
    /// The device is pinned to another version.
    Pinned { version: ProtocolVersion },
    /// The artifact was refused before; it is not fetched again unless retried.
    Refused { reason: String },
    /// The install failed too often; it is not run again unless retried.
    Failed { reason: String, attempts: u32 },
    /// The device is not a member of the authority.
    NotAMember,
}

/// Something the pipeline reports.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum UpgradeEvent {
    /// The artifact is not stored here yet; the next run tries again.
    BlobMissing,
    /// The artifact matches the published hash and size.
    Verified,
    /// The artifact is refused and will not be installed.
    Refused {
        reason: String,
    },
    Installed,
    /// The install step failed; `gave_up` when no automatic retry follows.
    InstallFailed {
        reason: String,
        attempts: u32,
        gave_up: bool,
    },
    /// `UpgradeReady` is written.
    Ready,
    /// The identity epoch advanced during the session (DESIGN rule 9); it is retried.
    Aborted {
        from: u64,
        to: u64,
    },
}

/// What the blob store had for the artifact.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum BlobInput {
    Bytes(Vec<u8>),
    Missing,
    /// Stored but unreadable or not matching its own address.
    Unreadable(String),
}

/// An input to an [`UpgradeSession`], with the epoch the driver observed when it made it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum UpgradeInput {
    Blob {
        epoch: MaintenanceEpoch,
        blob: BlobInput,
    },
    InstallFinished {
        epoch: MaintenanceEpoch,
        result: Result<(), String>,
    },
}

/// An effect the driver carries out for an [`UpgradeSession`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum UpgradeAction {
    /// Read the artifact's blob and feed it back as [`UpgradeInput::Blob`].
    FetchBlob {
        cid: ContentId,
    },
    /// Write the verified artifact to a file and run the install step with its path; feed
    /// the result back as [`UpgradeInput::InstallFinished`].
    Install {
        package: UpgradeMetadata,
        artifact: Vec<u8>,
    },
    /// Persist this device's outcome for the package.
    Record(LocalStatus),
    /// Sign and store `UpgradeReady` (at [`MaintenanceState::package_fact_epoch`]).
    WriteReady(UpgradeReady),
    Report(UpgradeEvent),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Fetching,
    Installing,
    Done,
    Aborted,
}

/// The pipeline of one package on one device: fetch, verify, install, ready. Sans-IO.
#[derive(Clone, Debug)]
pub struct UpgradeSession {
    package: UpgradeMetadata,
    epoch: MaintenanceEpoch,
    /// False when this device already installed it (or runs it): verify, then ready.
    install: bool,
    attempts: u32,
    max_attempts: u32,
    stage: Stage,
}

/// The blob address of an artifact: raw bytes whose BLAKE3 hash is `hash`.
pub fn artifact_cid(hash: &Hash32) -> ContentId {
    ContentId::from_blake3(tend_core::ids::CODEC_RAW, hash)
}

impl UpgradeSession {
    /// Starts the pipeline of `package` under `epoch`; the first action fetches the blob.
    pub fn start(
        package: UpgradeMetadata,
        epoch: MaintenanceEpoch,
        install: bool,
        attempts: u32,
        max_attempts: u32,
    ) -> (Self, Vec<UpgradeAction>) {
        let cid = artifact_cid(&package.artifact_hash);
        let s = Self {
            package,
            epoch,
            install,
            attempts,
            max_attempts,
            stage: Stage::Fetching,
        };
        (s, vec![UpgradeAction::FetchBlob { cid }])
    }

    /// The package this session is about.
    pub fn package(&self) -> &UpgradeMetadata {
        &self.package
    }

    /// Whether the session has nothing more to do.
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Done | Stage::Aborted)
    }

    /// Whether the session ended because the identity epoch advanced.
    pub fn is_aborted(&self) -> bool {
        self.stage == Stage::Aborted
    }

    fn epoch_guard(&mut self, now: MaintenanceEpoch, out: &mut Vec<UpgradeAction>) -> bool {
        if now.identity_epoch == self.epoch.identity_epoch {
            return true;
        }
        self.stage = Stage::Aborted;
        out.push(UpgradeAction::Report(UpgradeEvent::Aborted {
            from: self.epoch.identity_epoch,
            to: now.identity_epoch,
        }));
        false
    }

    fn ready(&mut self, out: &mut Vec<UpgradeAction>) {
        out.push(UpgradeAction::WriteReady(UpgradeReady {
            package_id: self.package.package_id,
            version: self.package.version,
        }));
        out.push(UpgradeAction::Report(UpgradeEvent::Ready));
        self.stage = Stage::Done;
    }

    /// Feeds one input in; inputs that do not fit the current stage are ignored.
    pub fn handle(&mut self, input: UpgradeInput) -> Vec<UpgradeAction> {
        let mut out = Vec::new();
        match (self.stage, input) {
            (Stage::Fetching, UpgradeInput::Blob { epoch, blob }) => {
                if !self.epoch_guard(epoch, &mut out) {
                    return out;
                }
                let refuse = |reason: String| {
                    vec![
                        UpgradeAction::Record(LocalStatus::Refused {
                            reason: reason.clone(),
                        }),
                        UpgradeAction::Report(UpgradeEvent::Refused { reason }),
                    ]
                };
                let bytes = match blob {
                    BlobInput::Missing => {
                        self.stage = Stage::Done;
                        out.push(UpgradeAction::Report(UpgradeEvent::BlobMissing));
                        return out;
                    }
                    BlobInput::Unreadable(e) => {
                        self.stage = Stage::Done;
                        return refuse(format!("artifact unreadable: {e}"));
                    }
                    BlobInput::Bytes(b) => b,
                };
                let hash = Hash32::of(&bytes);
                if hash != self.package.artifact_hash {
                    self.stage = Stage::Done;
                    return refuse(format!(
                        "artifact hash {hash} does not match the published {}",
                        self.package.artifact_hash
                    ));
                }
                if bytes.len() as u64 != self.package.artifact_size {
                    self.stage = Stage::Done;
                    return refuse(format!(
                        "artifact is {} bytes, the package says {}",
                        bytes.len(),
                        self.package.artifact_size
                    ));
                }
                out.push(UpgradeAction::Report(UpgradeEvent::Verified));
                if self.install {
                    self.stage = Stage::Installing;
                    out.push(UpgradeAction::Install {
                        package: self.package.clone(),
                        artifact: bytes,
                    });
                } else {
                    self.ready(&mut out);
                }
            }
            (Stage::Installing, UpgradeInput::InstallFinished { epoch, result }) => {
                match result {
                    Ok(()) => {
                        // Recorded before the epoch check: a retry under a new epoch then
                        // skips the install it already did and only writes readiness.
                        out.push(UpgradeAction::Record(LocalStatus::Installed {
                            version: self.package.version,
                        }));
                        out.push(UpgradeAction::Report(UpgradeEvent::Installed));
                        if self.epoch_guard(epoch, &mut out) {
                            self.ready(&mut out);
                        }
                    }
                    Err(reason) => {
                        let attempts = self.attempts.saturating_add(1);
                        self.stage = Stage::Done;
                        out.push(UpgradeAction::Record(LocalStatus::Failed {
                            reason: reason.clone(),
                            attempts,
                        }));
                        out.push(UpgradeAction::Report(UpgradeEvent::InstallFailed {
                            reason,
                            attempts,
                            gave_up: attempts >= self.max_attempts,
                        }));
                    }
                }
            }
            _ => {}
        }
        out
    }
}

/// How this run of the pipeline decides.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub policy: UpgradePolicy,
    /// A run the operator asked for (`tend upgrade apply`): manual devices take packages.
    pub explicit: bool,
    /// Take refused or failed packages again.
    pub retry: bool,
    pub running: ProtocolVersion,
    pub max_attempts: u32,
}

/// What the pipeline does about one package.
#[derive(Clone, Debug)]
pub enum Decision {
    Start(UpgradeSession, Vec<UpgradeAction>),
    Skip(Skip),
}

/// Decides, for every published package, whether this device starts its pipeline. Pure.
pub fn plan(
    state: &MaintenanceState,
    me: &DeviceId,
    config: &PlanConfig,
    outcomes: &BTreeMap<Hash32, LocalStatus>,
) -> Vec<(Hash32, Decision)> {
    let member = state.is_member_at(me, state.current_epoch().next());
    state
        .upgrades
        .iter()
        .map(|(id, u)| {
            let meta = &u.metadata;
            let skip = if !member {
                Some(Skip::NotAMember)
            } else if u.ready.contains(me) {
                Some(Skip::AlreadyReady)
            } else if !meta.includes(me) {
                Some(Skip::NotInCohort {
                    cohort: tend_core::maintenance::cohort_of(id, me),
                    cohort_percent: meta.cohort_percent,
                })
            } else {
                match (&config.policy, outcomes.get(id)) {
                    (UpgradePolicy::Pinned(v), _) if *v != meta.version => {
                        Some(Skip::Pinned { version: *v })
                    }
                    (UpgradePolicy::Manual, _) if !config.explicit => Some(Skip::Manual),
                    (_, Some(LocalStatus::Refused { reason })) if !config.retry => {
                        Some(Skip::Refused {
                            reason: reason.clone(),
                        })
                    }
                    (_, Some(LocalStatus::Failed { reason, attempts }))
                        if !config.retry && *attempts >= config.max_attempts =>
                    {
                        Some(Skip::Failed {
                            reason: reason.clone(),
                            attempts: *attempts,
                        })
                    }
                    _ => None,
                }
            };
            let decision = match skip {
                Some(s) => Decision::Skip(s),
                None => {
                    let installed = matches!(outcomes.get(id), Some(LocalStatus::Installed { .. }))
                        || config.running >= meta.version;
                    let attempts = match outcomes.get(id) {
                        Some(LocalStatus::Failed { attempts, .. }) if !config.retry => *attempts,
                        _ => 0,
                    };
                    let (s, actions) = UpgradeSession::start(
                        meta.clone(),
                        state.maintenance_epoch(),
                        !installed,
                        attempts,
                        config.max_attempts,
                    );
                    Decision::Start(s, actions)
                }
            };
            (*id, decision)
        })
        .collect()
}
