//! `tend upgrade`: over-the-air upgrades (publish, apply, activate, configure, status).
//!
//! On a running device every command goes through its control socket, and the package,
//! readiness and replacement facts reach the other members by sync. On a stopped device
//! the store is opened here, and commands that need other members (spreading a package,
//! gathering readiness, threshold-signing a replacement) run among the homes given with
//! `--member-home`, in this process.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use tend_core::maintenance::UpgradePolicy;
use tend_core::{Hash32, ProtocolVersion};
use tend_node::control::ops::{
    ActivateUpgrade, Activated, ApplyUpgrades, ConfigureUpgrades, GetUpgradeStatus, PublishUpgrade,
    Published, UpgradeSettings, WidenUpgrade,
};
use tend_node::upgrade::{ApplyReport, Skip, UpgradeEvent, UpgradeStatus};

use crate::output::{CmdResult, Output};
use crate::target::{short, MemberHomes, Target};

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
    /// Widen a package's staged rollout (admin only): every device already in stays in.
    Widen {
        package_id: Hash32,
        /// The new rollout percentage, above the current one.
        #[arg(long)]
        percent: u8,
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

pub fn upgrade(home: &Path, cmd: UpgradeCommand) -> CmdResult {
    match cmd {
        UpgradeCommand::Publish {
            artifact,
            version,
            fence,
            cohort,
            homes,
        } => {
            // A running device reads the file from its own working directory.
            let artifact = std::fs::canonicalize(&artifact)
                .map_err(|e| format!("cannot read --artifact {}: {e}", artifact.display()))?;
            let op = PublishUpgrade {
                artifact,
                version: version.to_string(),
                fence,
                cohort,
            };
            let published = Target::open(home)?.run_with_members(op, &homes)?;
            Ok(published_output(published))
        }
        UpgradeCommand::Widen {
            package_id,
            percent,
            homes,
        } => {
            let op = WidenUpgrade {
                package_id: package_id.to_string(),
                percent,
            };
            let widened = Target::open(home)?.run_with_members(op, &homes)?;
            let human = format!(
                "widened package {} to {}% of devices (every device already in stays in)",
                widened.package_id, widened.cohort_percent
            );
            Ok(Output::new(widened, human))
        }
        UpgradeCommand::Status => {
            let s = Target::open(home)?.run(GetUpgradeStatus {})?;
            Ok(status_output(s))
        }
        UpgradeCommand::Activate {
            package_id,
            min_ready,
            homes,
        } => {
            // With member homes, their readiness is gathered first and the activation
            // handed to them after.
            let op = ActivateUpgrade {
                package_id: package_id.to_string(),
                min_ready,
            };
            let a = Target::open(home)?.run_with_members(op, &homes)?;
            Ok(activated_output(a))
        }
        UpgradeCommand::Apply { install_cmd, retry } => {
            let report = Target::open(home)?.run(ApplyUpgrades { install_cmd, retry })?;
            apply_output(report)
        }
        UpgradeCommand::Configure {
            install_cmd,
            policy,
            max_attempts,
        } => {
            let settings = Target::open(home)?.run(ConfigureUpgrades {
                install_cmd,
                policy,
                max_attempts,
            })?;
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
            match (p.activated, p.activation_waits_for) {
                (true, _) => "activated".to_string(),
                (false, Some(n)) => format!("activation waiting for {n} ready members"),
                (false, None) => "not activated".to_string(),
            },
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
