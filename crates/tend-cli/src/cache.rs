//! `tend cache`: the replicated cache (entries, `put` and `get`) and its invalidation floors
//! (`invalidate`, `check`).

use std::path::Path;

use clap::Subcommand;
use tend_node::cache::{CacheCheck, Invalidation};
use tend_node::control::ops::{CheckCache, InvalidateCache};
use tend_node::data::{Bytes64, CacheRead, CacheValidity, DataRequest, DataResponse};

use crate::data::{run, shown, unexpected, written};
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
        CacheCommand::Put { key, value } => cache_put(home, key, value),
        CacheCommand::Get { key } => cache_get(home, key),
        CacheCommand::Invalidate { keys, floor, local } => {
            let inv = Target::open(home)?.run(InvalidateCache { keys, floor, local })?;
            Ok(invalidation_output(inv, local))
        }
        CacheCommand::Check { key, epoch } => {
            let c = Target::open(home)?.run(CheckCache { key, epoch })?;
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

fn cache_put(home: &Path, key: String, value: String) -> CmdResult {
    let what = format!("cached {key}");
    written(
        run(
            home,
            DataRequest::CachePut {
                key,
                value: Bytes64(value.into_bytes()),
            },
        )?,
        what,
    )
}

fn cache_get(home: &Path, key: String) -> CmdResult {
    let DataResponse::Cache(c) = run(home, DataRequest::CacheGet { key })? else {
        return Err(unexpected());
    };
    let CacheRead {
        key,
        validity,
        value,
        computed_at,
        floor,
    } = &c;
    let floor = floor.map_or("none".into(), |f| f.to_string());
    let human = match validity {
        CacheValidity::Absent => format!("{key}: absent (floor {floor})"),
        _ => format!(
            "{key}: {} {} (computed at epoch {}, floor {floor})",
            if *validity == CacheValidity::Valid {
                "valid"
            } else {
                "stale"
            },
            value.as_ref().map_or(String::new(), |v| shown(&v.0)),
            computed_at.unwrap_or_default(),
        ),
    };
    Ok(Output::new(c, human))
}
