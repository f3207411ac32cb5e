//! `tend upgrade`, `tend admin` and `tend cache`: over-the-air upgrades, admin replacement
//! and local cache invalidation.
//!
//! On a running device every command goes through its control socket, and the package,
//! readiness and replacement facts reach the other members by sync. On a stopped device
//! the store is opened here, and commands that need other members (spreading a package,
//! gathering readiness, threshold-signing a replacement) run among the homes given with
//! `--member-home`, in this process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Subcommand;
use tend_core::maintenance::UpgradePolicy;
use tend_core::{DeviceId, Epoch, Hash32, ProtocolVersion};
use tend_node::admin::AdminStatus;
use tend_node::cache::{CacheCheck, Invalidation};
use tend_node::control::ops::{self, Activated, AdminReplaced, Published, UpgradeSettings};
use tend_node::fleet::LocalFleet;
use tend_node::upgrade::{self, ApplyReport, Skip, UpgradeEvent, UpgradeStatus};
use tend_node::{admin, cache, Device};

use crate::maint::MemberHomes;
use crate::output::CmdResult;
use crate::output::Output;
use crate::target::Target;

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
    /// Write a replicated cache entry, computed at the current epoch.
    Put { key: String, value: String },
    /// Read a cache entry: valid, stale (its epoch is not above the key's floor) or absent.
    Get { key: String },
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
    me: Device,
    homes: &MemberHomes,
) -> Result<(Arc<Device>, Option<LocalFleet>), Box<dyn std::error::Error>> {
    let me = Arc::new(me);
    if homes.member_homes.is_empty() {
        return Ok((me, None));
    }
    let mut devices = vec![me.clone()];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok((me, Some(LocalFleet::new(devices))))
}

/// The target, with `--member-home` refused on a running device.
fn target(home: &Path, homes: &MemberHomes) -> Result<Target, Box<dyn std::error::Error>> {
    Target::open(home)?.without_member_homes(&homes.member_homes)
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
            let published = match target(home, &homes)? {
                Target::Running(mut c) => {
                    // The device reads the file from its own working directory.
                    let artifact = std::fs::canonicalize(&artifact).map_err(|e| {
                        format!("cannot read --artifact {}: {e}", artifact.display())
                    })?;
                    c.upgrade_publish(artifact, version.to_string(), fence, cohort)?
                }
                Target::Stopped(d) => {
                    let (me, fleet) = fleet(*d, &homes)?;
                    let p = ops::upgrade_publish(&me, &artifact, version, fence, cohort)?;
                    if let Some(f) = &fleet {
                        f.sync()?;
                    }
                    p
                }
            };
            Ok(published_output(published))
        }
        UpgradeCommand::Status => {
            let s = match Target::open(home)? {
                Target::Running(mut c) => c.upgrade_status()?,
                Target::Stopped(d) => upgrade::status(&d)?,
            };
            Ok(status_output(s))
        }
        UpgradeCommand::Activate {
            package_id,
            min_ready,
            homes,
        } => {
            let a = match target(home, &homes)? {
                Target::Running(mut c) => c.upgrade_activate(package_id.to_string(), min_ready)?,
                Target::Stopped(d) => {
                    let (me, fleet) = fleet(*d, &homes)?;
                    // Gather the members' readiness first, and hand them the activation
                    // after.
                    if let Some(f) = &fleet {
                        f.sync()?;
                    }
                    let a = ops::upgrade_activate(&me, &package_id, min_ready)?;
                    if let Some(f) = &fleet {
                        f.sync()?;
                    }
                    a
                }
            };
            Ok(activated_output(a))
        }
        UpgradeCommand::Apply { install_cmd, retry } => {
            let report = match Target::open(home)? {
                Target::Running(mut c) => c.upgrade_apply(install_cmd, retry)?,
                Target::Stopped(d) => ops::upgrade_apply(&d, install_cmd, retry)?,
            };
            apply_output(report)
        }
        UpgradeCommand::Configure {
            install_cmd,
            policy,
            max_attempts,
        } => {
            let settings = match Target::open(home)? {
                Target::Running(mut c) => c.upgrade_configure(install_cmd, policy, max_attempts)?,
                Target::Stopped(d) => ops::upgrade_configure(
                    &d,
                    install_cmd.as_deref(),
                    policy.as_ref(),
                    max_attempts,
                )?,
            };
            Ok(settings_output(settings))
        }
    }
}

fn published_output(p: Published) -> Output {
    let human = format!(
        "published package {}\nversion {}, {} bytes, hash {}\n{}, cohort {}%",
        p.package_id,
        p.version,
        p.artifact_size,
        p.artifact_hash,
        p.fence
            .map_or("soft upgrade (no fence)".into(), |f| format!(
                "hard fork, fence at epoch {f}"
            )),
        p.cohort_percent
    );
    Output::new(p, human)
}

fn status_output(s: UpgradeStatus) -> Output {
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
    Output::new(s, human)
}

fn activated_output(a: Activated) -> Output {
    let human = format!(
        "activated package {} (version {}){}",
        a.package_id,
        a.to_version,
        a.activation_fence
            .map_or(String::new(), |f| format!(", fence at epoch {f}"))
    );
    Output::new(a, human)
}

fn apply_output(report: ApplyReport) -> CmdResult {
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
        // One line, and a non-zero exit: the operator asked for an upgrade that did not
        // happen.
        return Err(lines
            .into_iter()
            .filter(|l| l.contains("refused") || l.contains("install failed"))
            .collect::<Vec<_>>()
            .join("; ")
            .into());
    }
    Ok(Output::new(report, lines.join("\n")))
}

fn settings_output(s: UpgradeSettings) -> Output {
    let human = format!(
        "install command: {}\npolicy: {}\nmax attempts: {}",
        s.install_command.as_deref().unwrap_or("(none)"),
        policy_text(&s.policy),
        s.max_attempts
    );
    Output::new(s, human)
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
            let r = match target(home, &homes)? {
                // With --threshold, the running device's own share must reach the
                // threshold: signing rounds with other members do not go over the
                // network yet.
                Target::Running(mut c) => c.admin_replace(
                    new.to_string(),
                    at_epoch,
                    threshold,
                    old.map(|o| o.to_string()),
                )?,
                Target::Stopped(d) => {
                    let (me, fleet) = fleet(*d, &homes)?;
                    let devices: Vec<&Device> = match &fleet {
                        Some(f) => f.devices().iter().map(|d| &**d).collect(),
                        None => vec![&me],
                    };
                    let r = ops::admin_replace(&devices, new, at_epoch, threshold, old)?;
                    if let Some(f) = &fleet {
                        f.sync()?;
                    }
                    r
                }
            };
            Ok(replaced_output(r))
        }
        AdminCommand::Status => {
            let s = match Target::open(home)? {
                Target::Running(mut c) => c.admin_status()?,
                Target::Stopped(d) => admin::status(&d)?,
            };
            Ok(admin_status_output(s))
        }
    }
}

fn replaced_output(r: AdminReplaced) -> Output {
    let human = format!(
        "{} becomes admin at epoch {}{}",
        r.new_admin,
        r.activation_epoch,
        if r.threshold_signed {
            " (threshold-signed by the authority)"
        } else {
            ""
        }
    );
    Output::new(r, human)
}

fn admin_status_output(s: AdminStatus) -> Output {
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
    Output::new(s, human)
}

pub fn cache(home: &Path, cmd: CacheCommand) -> CmdResult {
    match cmd {
        CacheCommand::Put { key, value } => crate::data::cache_put(home, key, value),
        CacheCommand::Get { key } => crate::data::cache_get(home, key),
        CacheCommand::Invalidate { keys, floor, local } => {
            let inv = match Target::open(home)? {
                Target::Running(mut c) => c.cache_invalidate(keys, floor, local)?,
                Target::Stopped(d) => ops::cache_invalidate(&d, &keys, floor, local)?,
            };
            Ok(invalidation_output(inv, local))
        }
        CacheCommand::Check { key, epoch } => {
            let c = match Target::open(home)? {
                Target::Running(mut c) => c.cache_check(key, epoch)?,
                Target::Stopped(d) => cache::check(&d, &key, Epoch(epoch))?,
            };
            Ok(check_output(c))
        }
    }
}

fn invalidation_output(inv: Invalidation, local: bool) -> Output {
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
    Output::new(inv, human)
}

fn check_output(c: CacheCheck) -> Output {
    let human = format!(
        "{}: {} (cached at epoch {}, floor {})",
        c.key,
        if c.valid { "valid" } else { "stale" },
        c.cached_at,
        c.floor.map_or("none".into(), |f| f.to_string())
    );
    Output::new(c, human)
}
