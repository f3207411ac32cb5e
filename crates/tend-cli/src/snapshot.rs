//! `tend snapshot`: threshold-signed snapshot ceremonies, their status and triggers.
//!
//! On a running device (`tend run`) the command goes through its control socket (the
//! device holds the store), and the exchanges with other members run over the network
//! (`tend_node::ceremony`, `tend_node::dkg`). Without a running device the store is
//! opened here, and they run among the member homes given with `--member-home`, in this
//! process (`tend_node::fleet`).

use std::path::Path;

use clap::Subcommand;
use tend_backup::triggers::TRIGGERS_SETTING;
use tend_backup::SnapshotTriggers;
use tend_core::Epoch;
use tend_node::control::ops::GetSnapshotStatus;
use tend_node::control::Client;
use tend_node::SnapshotStatus;

use crate::output::{CmdResult, Output};
use crate::target::{
    member_fleet as fleet, running_without_member_homes as running, MemberHomes, Target,
};

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
                let s = c.run(GetSnapshotStatus {})?;
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

#[cfg(test)]
mod tests {
    /// The node lets the socket touch only the settings it lists; the triggers must be
    /// among them or `tend snapshot triggers` fails on a running device.
    #[test]
    fn the_trigger_setting_is_reachable_through_the_socket() {
        assert!(tend_node::control::PLUGIN_SETTINGS.contains(&super::TRIGGERS_SETTING));
    }
}
