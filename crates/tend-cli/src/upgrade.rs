//! `tend upgrade`, `tend admin` and `tend cache`: over-the-air upgrades, admin replacement
//! and local cache invalidation.
//!
//! Like `tend authority` and `tend snapshot`, commands that need other members (spreading a
//! package, gathering readiness, threshold-signing a replacement) run among the homes given
//! with `--member-home`, in this process, until those exchanges travel over the network.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use tend_core::maintenance::UpgradePolicy;
use tend_core::upgrade::ReadinessPolicy;
use tend_core::{DeviceId, Epoch, Hash32, ProtocolVersion};
use tend_node::fleet::LocalFleet;
use tend_node::upgrade::{self, ApplyOptions, CommandInstaller, Skip, UpgradeEvent};
use tend_node::{admin, cache, Device};

use crate::cli::CmdResult;
use crate::maint::MemberHomes;
use crate::output::Output;

/// How long one install command may run before it counts as failed.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Subcommand, Debug)]
pub enum UpgradeCommand {
    /// Publish an upgrade package (admin only): the artifact is stored as a blob.
    Publish {
        /// The artifact file devices install.
        #[arg(long)]
        artifact: PathBuf,
        /// The protocol version it brings, MAJOR.MINOR.PATCH.
        #[arg(long)]
        version: ProtocolVersion,
        /// Make it a hard fork: from this journal epoch on, older versions are refused.
        #[arg(long)]
        fence: Option<u64>,
        /// Staged rollout: the percentage of devices (by cohort of their id) that take it.
        #[arg(long, default_value_t = 100)]
        cohort: u8,
        #[command(flatten)]
        homes: MemberHomes,
    },
    /// Packages, readiness, this device's outcomes and fence status.
    Status,
    /// Activate a package (admin only) once enough devices are ready.
    Activate {
        package_id: Hash32,
        /// Activate once this many members are ready (default: every eligible device).
        #[arg(long)]
        min_ready: Option<u16>,
        #[command(flatten)]
        homes: MemberHomes,
    },
    /// Run this device's upgrade pipeline now: fetch, verify, install, report ready.
    Apply {
        /// Install with this shell command (`$1` is the artifact's path) instead of the
        /// configured one.
        #[arg(long)]
        install_cmd: Option<String>,
        /// Try refused or failed packages again.
        #[arg(long)]
        retry: bool,
    },
    /// Set this device's install command, upgrade policy or install attempts.
    Configure {
        /// The shell command that installs an artifact (`$1` is its path).
        #[arg(long)]
        install_cmd: Option<String>,
        /// `automatic`, `manual` or `pin:MAJOR.MINOR.PATCH`.
        #[arg(long, value_parser = parse_policy)]
        policy: Option<UpgradePolicy>,
        /// Failed installs of a package before the device stops trying.
        #[arg(long)]
        max_attempts: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Hand the admin role to another member from an epoch on.
    Replace {
        /// The member that becomes admin.
        #[arg(long = "new", value_name = "DEVICE_ID")]
        new: DeviceId,
        /// The epoch from which it is admin (above the current epoch).
        #[arg(long = "at-epoch")]
        at_epoch: u64,
        /// Without the admin: the member homes (this one and --member-home) threshold-sign it.
        #[arg(long)]
        threshold: bool,
        /// With --threshold: the admin to replace (default: the current one).
        #[arg(long, value_name = "DEVICE_ID", requires = "threshold")]
        old: Option<DeviceId>,
        #[command(flatten)]
        homes: MemberHomes,
    },
    /// The admin in charge and its replacements.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Invalidate cache keys: entries cached at or below the floor are stale.
    Invalidate {
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<String>,
        /// The epoch floor (default: the current epoch).
        #[arg(long)]
        floor: Option<u64>,
        /// Raise the floors on this device only, without publishing.
        #[arg(long)]
        local: bool,
    },
    /// Whether an entry cached at EPOCH under KEY is still valid here.
    Check {
        #[arg(long)]
        key: String,
        #[arg(long)]
        epoch: u64,
    },
}

fn parse_policy(s: &str) -> Result<UpgradePolicy, String> {
    match s {
        "automatic" => Ok(UpgradePolicy::Automatic),
        "manual" => Ok(UpgradePolicy::Manual),
        _ => match s.strip_prefix("pin:") {
            Some(v) => v.parse().map(UpgradePolicy::Pinned),
            None => Err(format!(
                "unknown policy {s:?}: use automatic, manual or pin:MAJOR.MINOR.PATCH"
            )),
        },
    }
}

fn policy_text(p: &UpgradePolicy) -> String {
    match p {
        UpgradePolicy::Automatic => "automatic".into(),
        UpgradePolicy::Manual => "manual".into(),
        UpgradePolicy::Pinned(v) => format!("pinned to {v}"),
    }
}

/// This device and the member homes, for in-process exchanges; `None` without members.
fn fleet(
    home: &Path,
    homes: &MemberHomes,
) -> Result<(Arc<Device>, Option<LocalFleet>), Box<dyn std::error::Error>> {
    let me = Arc::new(Device::open(home)?);
    if homes.member_homes.is_empty() {
        return Ok((me, None));
    }
    let mut devices = vec![me.clone()];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok((me, Some(LocalFleet::new(devices))))
}

fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

pub fn upgrade(home: &Path, cmd: UpgradeCommand) -> CmdResult {
    match cmd {
        UpgradeCommand::Publish {
            artifact,
            version,
            fence,
            cohort,
            homes,
        } => {
            let bytes = std::fs::read(&artifact)
                .map_err(|e| format!("cannot read --artifact {}: {e}", artifact.display()))?;
            let (me, fleet) = fleet(home, &homes)?;
            let meta = upgrade::publish(&me, &bytes, version, fence.map(Epoch), cohort)?;
            if let Some(f) = &fleet {
                f.sync()?;
            }
            let json = serde_json::json!({
                "package_id": meta.package_id.to_string(),
                "version": meta.version.to_string(),
                "artifact_hash": meta.artifact_hash.to_string(),
                "artifact_size": meta.artifact_size,
                "fence": meta.fence.map(|e| e.0),
                "cohort_percent": meta.cohort_percent,
            });
            let human = format!(
                "published package {}\nversion {}, {} bytes, hash {}\n{}, cohort {}%",
                meta.package_id,
                meta.version,
                meta.artifact_size,
                meta.artifact_hash,
                meta.fence
                    .map_or("soft upgrade (no fence)".into(), |f| format!(
                        "hard fork, fence at epoch {f}"
                    )),
                meta.cohort_percent
            );
            Ok(Output::new(json, human))
        }
        UpgradeCommand::Status => {
            let s = upgrade::status(&Device::open(home)?)?;
            let mut human = format!(
                "device {}\nrunning {}, policy {}, current epoch {}\ninstall command: {}\n",
                s.device_id,
                s.running_version,
                policy_text(&s.policy),
                s.current_epoch,
                s.install_command.as_deref().unwrap_or("(none)"),
            );
            if let Some(r) = &s.fence_refusal {
                human.push_str(&format!("FENCE: {r}\n"));
            }
            if s.packages.is_empty() {
                human.push_str("no upgrade published\n");
            }
            for p in &s.packages {
                human.push_str(&format!(
                    "\npackage {} version {}{}\n  cohort {}% ({}), ready {}/{}, {}, artifact {}\n  here: {}\n",
                    short(&p.package_id),
                    p.version,
                    p.fence.map_or(String::new(), |f| format!(", fence at epoch {f}")),
                    p.cohort_percent,
                    if p.in_cohort { "this device is in it" } else { "this device is not in it" },
                    p.readiness.ready.len(),
                    p.readiness.eligible.len(),
                    if p.activated { "activated" } else { "not activated" },
                    if p.artifact_stored { "stored" } else { "not stored here" },
                    match &p.local {
                        None => "nothing done yet".to_string(),
                        Some(l) => serde_json::to_string(l).unwrap_or_default(),
                    }
                ));
            }
            Ok(Output::new(s, human))
        }
        UpgradeCommand::Activate {
            package_id,
            min_ready,
            homes,
        } => {
            let (me, fleet) = fleet(home, &homes)?;
            // Gather the members' readiness first, and hand them the activation after.
            if let Some(f) = &fleet {
                f.sync()?;
            }
            let policy = min_ready.map_or(ReadinessPolicy::All, ReadinessPolicy::AtLeast);
            let a = upgrade::activate(&me, &package_id, policy)?;
            if let Some(f) = &fleet {
                f.sync()?;
            }
            let json = serde_json::json!({
                "package_id": a.package_id.to_string(),
                "to_version": a.to_version.to_string(),
                "activation_fence": a.activation_fence.map(|e| e.0),
            });
            let human = format!(
                "activated package {} (version {}){}",
                a.package_id,
                a.to_version,
                a.activation_fence
                    .map_or(String::new(), |f| format!(", fence at epoch {f}"))
            );
            Ok(Output::new(json, human))
        }
        UpgradeCommand::Apply { install_cmd, retry } => {
            let device = Device::open(home)?;
            let command = match install_cmd {
                Some(c) => c,
                None => upgrade::install_command(&device)?.ok_or(
                    "no install command: pass --install-cmd or set one with \
                     `tend upgrade configure --install-cmd`",
                )?,
            };
            let mut installer = CommandInstaller {
                command,
                home: home.to_owned(),
                timeout: INSTALL_TIMEOUT,
            };
            let report = upgrade::apply(
                &device,
                device.store(),
                &mut installer,
                &ApplyOptions {
                    explicit: true,
                    retry,
                },
            )?;
            let mut lines = Vec::new();
            for p in &report.packages {
                let what = match (&p.skipped, p.events.last()) {
                    (Some(s), _) => skip_text(s),
                    (None, Some(_)) => p
                        .events
                        .iter()
                        .map(event_text)
                        .collect::<Vec<_>>()
                        .join(", "),
                    (None, None) => "nothing to do".into(),
                };
                lines.push(format!(
                    "package {} {}: {what}",
                    short(&p.package_id),
                    p.version
                ));
            }
            if lines.is_empty() {
                lines.push("no upgrade published".into());
            }
            if report.has_failures() {
                // One line, and a non-zero exit: the operator asked for an upgrade that did
                // not happen.
                return Err(lines
                    .into_iter()
                    .filter(|l| l.contains("refused") || l.contains("install failed"))
                    .collect::<Vec<_>>()
                    .join("; ")
                    .into());
            }
            Ok(Output::new(report, lines.join("\n")))
        }
        UpgradeCommand::Configure {
            install_cmd,
            policy,
            max_attempts,
        } => {
            let device = Device::open(home)?;
            if let Some(c) = &install_cmd {
                upgrade::set_install_command(&device, Some(c))?;
            }
            if let Some(n) = max_attempts {
                if n == 0 {
                    return Err("--max-attempts must be at least 1".into());
                }
                device.store().put_setting(upgrade::MAX_ATTEMPTS, &n)?;
            }
            if let Some(p) = &policy {
                upgrade::set_policy(&device, p)?;
            }
            let policy = upgrade::policy(&device)?;
            let json = serde_json::json!({
                "install_command": upgrade::install_command(&device)?,
                "policy": policy,
                "max_attempts": upgrade::max_attempts(&device)?,
            });
            let human = format!(
                "install command: {}\npolicy: {}\nmax attempts: {}",
                upgrade::install_command(&device)?
                    .as_deref()
                    .unwrap_or("(none)"),
                policy_text(&policy),
                upgrade::max_attempts(&device)?
            );
            Ok(Output::new(json, human))
        }
    }
}

fn skip_text(s: &Skip) -> String {
    match s {
        Skip::AlreadyReady => "already ready".into(),
        Skip::NotInCohort {
            cohort,
            cohort_percent,
        } => format!("not in the rollout (cohort {cohort}, rollout {cohort_percent}%)"),
        Skip::Manual => "manual policy".into(),
        Skip::Pinned { version } => format!("pinned to {version}"),
        Skip::Refused { reason } => format!("refused earlier: {reason} (use --retry)"),
        Skip::Failed { reason, attempts } => {
            format!("install failed {attempts} times: {reason} (use --retry)")
        }
        Skip::NotAMember => "this device is not a member".into(),
    }
}

fn event_text(e: &UpgradeEvent) -> String {
    match e {
        UpgradeEvent::BlobMissing => "artifact not stored here yet".into(),
        UpgradeEvent::Verified => "verified".into(),
        UpgradeEvent::Refused { reason } => format!("refused: {reason}"),
        UpgradeEvent::Installed => "installed".into(),
        UpgradeEvent::InstallFailed {
            reason, attempts, ..
        } => format!("install failed (attempt {attempts}): {reason}"),
        UpgradeEvent::Ready => "ready".into(),
        UpgradeEvent::Aborted { from, to } => {
            format!("identity epoch {from} -> {to}, retried")
        }
    }
}

pub fn admin(home: &Path, cmd: AdminCommand) -> CmdResult {
    match cmd {
        AdminCommand::Replace {
            new,
            at_epoch,
            threshold,
            old,
            homes,
        } => {
            let (me, fleet) = fleet(home, &homes)?;
            let fact = if threshold {
                let mut devices: Vec<&Device> = vec![&me];
                if let Some(f) = &fleet {
                    devices = f.devices().iter().map(|d| &**d).collect();
                }
                admin::replace_with_threshold(
                    &devices,
                    old,
                    new,
                    Epoch(at_epoch),
                    &mut rand::rngs::OsRng,
                )?
            } else {
                admin::replace(&me, new, Epoch(at_epoch))?
            };
            if let Some(f) = &fleet {
                f.sync()?;
            }
            let json = serde_json::json!({
                "fact_id": fact.id().to_string(),
                "epoch": fact.epoch().0,
                "new_admin": new.to_string(),
                "activation_epoch": at_epoch,
                "threshold_signed": threshold,
            });
            let human = format!(
                "{new} becomes admin at epoch {at_epoch}{}",
                if threshold {
                    " (threshold-signed by the authority)"
                } else {
                    ""
                }
            );
            Ok(Output::new(json, human))
        }
        AdminCommand::Status => {
            let s = admin::status(&Device::open(home)?)?;
            let mut human = format!(
                "admin {}\ncurrent epoch {}\n",
                s.admin.as_deref().unwrap_or("-"),
                s.current_epoch
            );
            for r in &s.replacements {
                human.push_str(&format!(
                    "{} -> {} at epoch {}{}{}\n",
                    short(&r.old_admin),
                    short(&r.new_admin),
                    r.activation_epoch,
                    if r.certified {
                        ", threshold-signed"
                    } else {
                        ""
                    },
                    if r.in_effect { "" } else { " (scheduled)" },
                ));
            }
            human.push_str(&format!(
                "{} facts kept as evidence but ignored",
                s.ignored_facts
            ));
            Ok(Output::new(s, human))
        }
    }
}

pub fn cache(home: &Path, cmd: CacheCommand) -> CmdResult {
    let device = Device::open(home)?;
    match cmd {
        CacheCommand::Invalidate { keys, floor, local } => {
            let inv = if local {
                let floor = match floor {
                    Some(f) => Epoch(f),
                    None => device
                        .store()
                        .maintenance_state(device.namespace())?
                        .current_epoch(),
                };
                cache::invalidate_local(&device, &keys, floor)?
            } else {
                cache::invalidate(&device, &keys, floor.map(Epoch))?.1
            };
            let human = format!(
                "{} {} key(s) at floor {}{}",
                if local {
                    "raised locally"
                } else {
                    "invalidated"
                },
                inv.floors.len(),
                inv.epoch_floor,
                inv.fact_id
                    .as_deref()
                    .map_or(String::new(), |id| format!(" (fact {})", short(id)))
            );
            Ok(Output::new(inv, human))
        }
        CacheCommand::Check { key, epoch } => {
            let c = cache::check(&device, &key, Epoch(epoch))?;
            let human = format!(
                "{}: {} (cached at epoch {}, floor {})",
                c.key,
                if c.valid { "valid" } else { "stale" },
                c.cached_at,
                c.floor.map_or("none".into(), |f| f.to_string())
            );
            Ok(Output::new(c, human))
        }
    }
}
