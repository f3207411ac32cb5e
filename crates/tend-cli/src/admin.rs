//! `tend admin`: the authority's admin and its replacement (by the admin itself, or by a
//! threshold of members when the admin is unavailable).
//!
//! On a running device the command goes through its control socket; on a stopped one the
//! store is opened here, and a threshold replacement is signed among the homes given with
//! `--member-home`, in this process.

use std::path::Path;

use clap::Subcommand;
use tend_core::DeviceId;
use tend_node::admin::AdminStatus;
use tend_node::control::ops::{AdminReplaced, GetAdminStatus, ReplaceAdmin};

use crate::output::{CmdResult, Output};
use crate::target::{among_members, short, target_with_homes as target, MemberHomes, Target};

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

pub fn admin(home: &Path, cmd: AdminCommand) -> CmdResult {
    match cmd {
        AdminCommand::Replace {
            new,
            at_epoch,
            threshold,
            old,
            homes,
        } => {
            let op = ReplaceAdmin {
                new: new.to_string(),
                at_epoch,
                threshold,
                old: old.map(|o| o.to_string()),
            };
            let r = match target(home, &homes)? {
                // With --threshold, the running device's own share must reach the
                // threshold: signing rounds with other members do not go over the
                // network yet.
                Target::Running(mut c) => c.run(op)?,
                Target::Stopped(d) => {
                    among_members(*d, &homes, |devices| Ok(op.run_among(devices)?))?
                }
            };
            Ok(replaced_output(r))
        }
        AdminCommand::Status => {
            let s = Target::open(home)?.run(GetAdminStatus {})?;
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
