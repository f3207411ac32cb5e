//! `tend journal status|list`: the journal's facts, epochs, size and digest.

use std::path::Path;

use clap::Subcommand;
use tend_node::control::ops::ListJournal;
use tend_node::control::Client;
use tend_node::{Device, JournalStatus};

use crate::output::{CmdResult, Output};
use crate::target::Target;

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// Facts per namespace, epochs, store size and digest.
    Status,
    /// List facts in (epoch, id) order.
    List {
        /// Start at this epoch.
        #[arg(long, default_value_t = 0)]
        from_epoch: u64,
        /// At most this many facts.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `tend journal status|list`.
pub fn journal(home: &Path, cmd: JournalCommand) -> CmdResult {
    match cmd {
        JournalCommand::Status => status(home),
        JournalCommand::List { from_epoch, limit } => list(home, from_epoch, limit),
    }
}

fn status(home: &Path) -> CmdResult {
    let status = match journal_status_via_socket(home)? {
        Some(status) => status,
        None => Device::open(home)?.status()?,
    };
    let mut human = format!(
        "device   {}\nstore    {} bytes\n",
        status.device_id, status.store_bytes
    );
    for ns in &status.namespaces {
        human.push_str(&format!(
            "\n{}\n  facts {} in the journal index: application {}, maintenance and authority {}\n  maintenance state reduced from {} maintenance and authority facts: {} in the index, {} pruned from it\n  epochs {}..{}, current epoch {}\n  identity epoch {}, snapshot epoch {}\n  digest {}\n",
            ns.namespace,
            ns.facts,
            ns.application_facts,
            ns.maintenance_facts,
            ns.state_facts,
            ns.maintenance_facts,
            ns.state_facts_pruned,
            ns.min_epoch.map_or("-".into(), |e| e.to_string()),
            ns.max_epoch.map_or("-".into(), |e| e.to_string()),
            ns.current_epoch,
            ns.identity_epoch,
            ns.snapshot_epoch,
            ns.digest,
        ));
    }
    Ok(Output::new(status, human))
}

fn list(home: &Path, from_epoch: u64, limit: usize) -> CmdResult {
    let facts = Target::open(home)?.run(ListJournal { from_epoch, limit })?;
    let human = facts
        .iter()
        .map(|f| {
            format!(
                "{:>6}  {}  {}  {}",
                f.epoch,
                &f.id[..16],
                f.kind,
                f.data.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Output::new(facts, human))
}

/// The journal status from the running device, if one answers in `home`.
fn journal_status_via_socket(
    home: &Path,
) -> Result<Option<JournalStatus>, Box<dyn std::error::Error>> {
    match Client::connect(home)? {
        Some(mut c) => Ok(Some(c.journal_status()?)),
        None => Ok(None),
    }
}
