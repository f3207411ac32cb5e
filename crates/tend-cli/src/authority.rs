//! `tend authority`: create a threshold authority (key generation) and show it.
//!
//! On a running device (`tend run`) the command goes through its control socket (the
//! device holds the store), and the exchanges with other members run over the network
//! (`tend_node::ceremony`, `tend_node::dkg`). Without a running device the store is
//! opened here, and they run among the member homes given with `--member-home`, in this
//! process (`tend_node::fleet`).

use std::path::Path;

use clap::Subcommand;
use tend_core::DeviceId;
use tend_node::control::ops::GetAuthorityStatus;
use tend_node::fleet::AuthorityCreated;
use tend_node::AuthorityStatus;

use crate::output::{CmdResult, Output};
use crate::target::{
    member_fleet as fleet, running_without_member_homes as running, MemberHomes, Target,
};

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Make this device's authority a T-of-N threshold authority (DKG among the members).
    Create {
        /// Signatures needed for a snapshot.
        #[arg(long)]
        threshold: u16,
        /// A member's device id (this device is always a member).
        #[arg(long = "member", value_name = "DEVICE_ID")]
        members: Vec<DeviceId>,
        #[command(flatten)]
        homes: MemberHomes,
    },
    /// Members, threshold, group key, identity epoch and admin.
    Status,
}

fn created_output(created: AuthorityCreated) -> Output {
    let human = format!(
        "authority {}\n{}-of-{} members, identity epoch {}\ngroup key {}",
        created.namespace,
        created.threshold,
        created.members.len(),
        created.identity_epoch,
        created.group_key
    );
    Output::new(created, human)
}

pub fn authority(home: &Path, cmd: AuthorityCommand) -> CmdResult {
    match cmd {
        AuthorityCommand::Create {
            threshold,
            members,
            homes,
        } => {
            if let Some(mut client) = running(home, &homes)? {
                let members = members.iter().map(ToString::to_string).collect();
                return Ok(created_output(client.authority_create(threshold, members)?));
            }
            let mut fleet = fleet(home, &homes)?;
            let known: Vec<DeviceId> = fleet.devices().iter().map(|d| d.device_id()).collect();
            if let Some(missing) = members.iter().find(|m| !known.contains(m)) {
                return Err(format!(
                    "member {missing} has no --member-home here (or start the devices with \
                     `tend run` to generate the key over the network)"
                )
                .into());
            }
            let created = fleet.create_authority(threshold, &mut rand::rngs::OsRng)?;
            Ok(created_output(created))
        }
        AuthorityCommand::Status => {
            let s = Target::open(home)?.run(GetAuthorityStatus {})?;
            Ok(authority_status_output(s))
        }
    }
}

fn authority_status_output(s: AuthorityStatus) -> Output {
    let human = format!(
        "authority {}\nidentity epoch {}, current epoch {}\n{}-of-{}, admin {}\ngroup key {}\nmembers\n  {}",
        s.namespace,
        s.identity_epoch,
        s.current_epoch,
        s.threshold,
        s.members.len(),
        s.admin.as_deref().unwrap_or("-"),
        s.group_key,
        s.members.join("\n  ")
    );
    Output::new(s, human)
}
