//! `tend cache`: the replicated cache (entries, `put` and `get`) and its invalidation floors
//! (`invalidate`, `check`).

use std::path::Path;

use clap::Subcommand;
use tend_core::Epoch;
use tend_node::cache::{self, CacheCheck, Invalidation};
use tend_node::control::ops;

use crate::output::{CmdResult, Output};
use crate::target::{short, Target};

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
