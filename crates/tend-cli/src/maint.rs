//! `tend authority`, `tend snapshot` and `tend gc`: the authority and its snapshots.
//!
//! Key generation and snapshot ceremonies run among the member homes given with
//! `--member-home`, in this process (`tend_node::fleet`), until those messages travel
//! over the network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args as ClapArgs, Subcommand};
use tend_core::{DeviceId, Epoch};
use tend_node::fleet::LocalFleet;
use tend_node::{Device, GcPolicy};

use crate::cli::CmdResult;
use crate::output::Output;

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

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Run a snapshot ceremony covering every fact below EPOCH (default: the current epoch + 1).
    Propose {
        #[arg(long)]
        epoch: Option<u64>,
        #[command(flatten)]
        homes: MemberHomes,
    },
    /// The latest verified snapshot, open proposals and the GC policy.
    Status,
    /// Show or set when this device proposes a snapshot by itself.
    Triggers(crate::backup::TriggersArgs),
}

/// Where the other members' homes are (their devices must not be running).
#[derive(ClapArgs, Debug)]
pub struct MemberHomes {
    /// Home directory of another member device, to run the ceremony with in this process.
    #[arg(long = "member-home", value_name = "DIR")]
    pub member_homes: Vec<PathBuf>,
}

/// `tend gc` options.
#[derive(ClapArgs, Debug)]
pub struct GcArgs {
    /// Report what would be pruned without pruning.
    #[arg(long)]
    pub dry_run: bool,
    /// Set this device's policy: `prune` (default) or `archive` (never prune).
    #[arg(long, value_parser = parse_policy)]
    pub policy: Option<GcPolicy>,
}

fn parse_policy(s: &str) -> Result<GcPolicy, String> {
    match s {
        "prune" => Ok(GcPolicy::Prune),
        "archive" => Ok(GcPolicy::Archive),
        _ => Err(format!("unknown policy {s:?}: use prune or archive")),
    }
}

fn fleet(home: &Path, homes: &MemberHomes) -> Result<LocalFleet, Box<dyn std::error::Error>> {
    let mut devices = vec![Arc::new(Device::open(home)?)];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok(LocalFleet::new(devices))
}

pub fn authority(home: &Path, cmd: AuthorityCommand) -> CmdResult {
    match cmd {
        AuthorityCommand::Create {
            threshold,
            members,
            homes,
        } => {
            let mut fleet = fleet(home, &homes)?;
            let known: Vec<DeviceId> = fleet.devices().iter().map(|d| d.device_id()).collect();
            if let Some(missing) = members.iter().find(|m| !known.contains(m)) {
                return Err(format!(
                    "member {missing} has no --member-home here; key generation runs among \
                     local homes until it runs over the network"
                )
                .into());
            }
            let created = fleet.create_authority(threshold, &mut rand::rngs::OsRng)?;
            let human = format!(
                "authority {}\n{}-of-{} members, identity epoch {}\ngroup key {}",
                created.namespace,
                created.threshold,
                created.members.len(),
                created.identity_epoch,
                created.group_key
            );
            Ok(Output::new(created, human))
        }
        AuthorityCommand::Status => {
            let s = Device::open(home)?.authority_status()?;
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
            Ok(Output::new(s, human))
        }
    }
}

pub fn snapshot(home: &Path, cmd: SnapshotCommand) -> CmdResult {
    match cmd {
        SnapshotCommand::Propose { epoch, homes } => {
            let mut fleet = fleet(home, &homes)?;
            let target = match epoch {
                Some(e) => Epoch(e),
                None => fleet.devices()[0]
                    .snapshot_status()?
                    .current_epoch
                    .checked_add(1)
                    .map(Epoch)
                    .ok_or("epoch overflow")?,
            };
            let done = fleet.snapshot(0, target, &mut rand::rngs::OsRng)?;
            let s = &done.snapshot;
            let json = serde_json::json!({
                "proposal_id": done.proposal_id.to_string(),
                "epoch": s.epoch.0,
                "digest": s.digest.to_string(),
                "blob_cid": s.blob_cid.to_string(),
            });
            let human = format!(
                "snapshot completed at epoch {}\ndigest {}\nblob {}",
                s.epoch, s.digest, s.blob_cid
            );
            Ok(Output::new(json, human))
        }
        SnapshotCommand::Status => {
            let s = Device::open(home)?.snapshot_status()?;
            let mut human = format!(
                "current epoch {}\ngc policy {:?}\n",
                s.current_epoch, s.gc_policy
            );
            match &s.latest {
                Some(l) => human.push_str(&format!(
                    "latest snapshot: epoch {}, digest {}, blob {}{}\n",
                    l.epoch,
                    l.digest,
                    l.blob_cid,
                    if l.blob_stored {
                        ""
                    } else {
                        " (blob not stored here)"
                    }
                )),
                None => human.push_str("no snapshot yet\n"),
            }
            for p in &s.open_proposals {
                human.push_str(&format!(
                    "open proposal {} for epoch {}\n",
                    p.proposal_id, p.target_epoch
                ));
            }
            crate::backup::with_triggers(home, Output::new(s, human))
        }
        SnapshotCommand::Triggers(args) => crate::backup::triggers(home, args),
    }
}

pub fn gc(home: &Path, args: GcArgs) -> CmdResult {
    let mut device = Device::open(home)?;
    if let Some(policy) = args.policy {
        device.set_gc_policy(policy)?;
        return Ok(Output::new(
            serde_json::json!({ "gc_policy": policy }),
            format!("gc policy set to {policy:?}"),
        ));
    }
    let r = device.gc(args.dry_run)?;
    let human = format!(
        "{} {} facts ({} bytes) and {} blobs below epoch {}\nstore {} -> {} bytes",
        if r.dry_run { "would prune" } else { "pruned" },
        r.facts_pruned,
        r.fact_bytes,
        r.blobs_pruned,
        r.floor,
        r.store_bytes_before,
        r.store_bytes_after
    );
    Ok(Output::new(r, human))
}
