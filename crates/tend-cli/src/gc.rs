//! `tend gc`: prune what the latest verified snapshot covers, compact, set the policy.

use std::path::Path;

use clap::Args as ClapArgs;
use tend_node::control::ops::SetGcPolicy;
use tend_node::{GcPolicy, GcReport};

use crate::output::{CmdResult, Output};
use crate::target::Target;

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

pub fn gc(home: &Path, args: GcArgs) -> CmdResult {
    let mut target = Target::open(home)?;
    if let Some(policy) = args.policy {
        let set = target.run(SetGcPolicy { policy })?;
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
