//! `tend authority`, `tend snapshot` and `tend gc`: the authority and its snapshots.
//!
//! On a running device (`tend run`), every command goes through its control socket (the
//! device holds the store); key generation and snapshot ceremonies then run over the
//! network with the other running members (`tend_node::ceremony`, `tend_node::dkg`).
//! Without a running device the store is opened here, and ceremonies run among the member
//! homes given with `--member-home`, in this process (`tend_node::fleet`).

use std::path::Path;
use std::sync::Arc;

use clap::{Args as ClapArgs, Subcommand};
use tend_backup::triggers::TRIGGERS_SETTING;
use tend_backup::SnapshotTriggers;
use tend_core::{DeviceId, Epoch};
use tend_node::control::{ops, Client};
use tend_node::fleet::{AuthorityCreated, LocalFleet};
use tend_node::{AuthorityStatus, Device, GcPolicy, GcReport, SnapshotStatus};

use crate::output::CmdResult;
use crate::output::Output;
use crate::target::{MemberHomes, Target};

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

/// `tend gc` options. On a running device, compaction waits until no sync session holds
/// the store (at most two seconds) and is skipped, with a note, if one still does.
#[derive(ClapArgs, Debug)]
pub struct GcArgs {
    /// Report what would be pruned without pruning.
    #[arg(long)]
    pub dry_run: bool,
    /// Set this device's policy: `prune` (default: a running device also collects by
    /// itself after each verified snapshot), `manual` (only when `tend gc` runs) or
    /// `archive` (never prune).
    #[arg(long, value_parser = parse_policy)]
    pub policy: Option<GcPolicy>,
}

fn parse_policy(s: &str) -> Result<GcPolicy, String> {
    match s {
        "prune" => Ok(GcPolicy::Prune),
        "manual" => Ok(GcPolicy::Manual),
        "archive" => Ok(GcPolicy::Archive),
        _ => Err(format!(
            "unknown policy {s:?}: use prune, manual or archive"
        )),
    }
}

fn fleet(home: &Path, homes: &MemberHomes) -> Result<LocalFleet, Box<dyn std::error::Error>> {
    let mut devices = vec![Arc::new(Device::open(home)?)];
    for h in &homes.member_homes {
        devices.push(Arc::new(Device::open(h)?));
    }
    Ok(LocalFleet::new(devices))
}

/// The running device's control client, when there is one and no `--member-home` was
/// given (member homes of running devices are locked by them).
fn running(home: &Path, homes: &MemberHomes) -> Result<Option<Client>, Box<dyn std::error::Error>> {
    let client = Client::connect(home)?;
    if client.is_some() && !homes.member_homes.is_empty() {
        return Err(
            "the device is running: the ceremony runs over the network with the \
                    running members; drop --member-home"
                .into(),
        );
    }
    Ok(client)
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

fn snapshot_output(proposal_id: String, epoch: u64, digest: String, blob_cid: String) -> Output {
    let human = format!("snapshot completed at epoch {epoch}\ndigest {digest}\nblob {blob_cid}");
    let json = serde_json::json!({
        "proposal_id": proposal_id,
        "epoch": epoch,
        "digest": digest,
        "blob_cid": blob_cid,
    });
    Output::new(json, human)
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
            let s = match Target::open(home)? {
                Target::Running(mut c) => c.authority_status()?,
                Target::Stopped(d) => d.authority_status()?,
            };
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

pub fn snapshot(home: &Path, cmd: SnapshotCommand) -> CmdResult {
    match cmd {
        SnapshotCommand::Propose { epoch, homes } => {
            if let Some(mut client) = running(home, &homes)? {
                let d = client.snapshot_propose(epoch, None)?;
                return Ok(snapshot_output(
                    d.proposal_id,
                    d.epoch,
                    d.digest,
                    d.blob_cid,
                ));
            }
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
            Ok(snapshot_output(
                done.proposal_id.to_string(),
                s.epoch.0,
                s.digest.to_string(),
                s.blob_cid.to_string(),
            ))
        }
        SnapshotCommand::Status => match Target::open(home)? {
            Target::Running(mut c) => {
                let s = c.snapshot_status()?;
                let t = c
                    .get_setting::<SnapshotTriggers>(TRIGGERS_SETTING)?
                    .unwrap_or_default();
                crate::backup::add_triggers(snapshot_status_output(s), t)
            }
            Target::Stopped(d) => {
                let out = snapshot_status_output(d.snapshot_status()?);
                // `with_triggers` opens the store itself.
                drop(d);
                crate::backup::with_triggers(home, out)
            }
        },
        SnapshotCommand::Triggers(args) => match Client::connect(home)? {
            Some(c) => triggers_via_socket(c, args),
            None => crate::backup::triggers(home, args),
        },
    }
}

fn snapshot_status_output(s: SnapshotStatus) -> Output {
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
    Output::new(s, human)
}

/// `tend snapshot triggers` on a running device: the same read, merge and write as
/// `crate::backup::triggers` does on the store, through the socket.
fn triggers_via_socket(mut c: Client, args: crate::backup::TriggersArgs) -> CmdResult {
    let mut t = c
        .get_setting::<SnapshotTriggers>(TRIGGERS_SETTING)?
        .unwrap_or_default();
    let changed = crate::backup::merge_triggers(&mut t, &args);
    if changed {
        c.put_setting(TRIGGERS_SETTING, &t)?;
    }
    Ok(crate::backup::triggers_output(t, changed))
}

pub fn gc(home: &Path, args: GcArgs) -> CmdResult {
    let target = Target::open(home)?;
    if let Some(policy) = args.policy {
        let set = match target {
            Target::Running(mut c) => c.set_gc_policy(policy)?,
            Target::Stopped(d) => ops::set_gc_policy(&d, policy)?,
        };
        let human = format!("gc policy set to {:?}", set.gc_policy);
        return Ok(Output::new(set, human));
    }
    let r = match target {
        Target::Running(mut c) => c.gc(args.dry_run)?,
        Target::Stopped(d) => d.gc(args.dry_run)?,
    };
    Ok(gc_output(r))
}

fn gc_output(r: GcReport) -> Output {
    let mut human = format!(
        "{} {} facts ({} bytes) and {} blobs below epoch {}; kept {} live application facts\nstore {} -> {} bytes",
        if r.dry_run { "would prune" } else { "pruned" },
        r.facts_pruned,
        r.fact_bytes,
        r.blobs_pruned,
        r.floor,
        r.live_kept,
        r.store_bytes_before,
        r.store_bytes_after
    );
    if !r.dry_run && !r.compacted {
        human += " (not compacted: the store stayed busy; run `tend gc` again)";
    }
    Output::new(r, human)
}

#[cfg(test)]
mod tests {
    /// The node lets the socket touch only the settings it lists; the triggers must be
    /// among them or `tend snapshot triggers` fails on a running device.
    #[test]
    fn the_trigger_setting_is_reachable_through_the_socket() {
        assert!(tend_node::control::PLUGIN_SETTINGS.contains(&super::TRIGGERS_SETTING));
    }
}
