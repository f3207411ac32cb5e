//! `tend sync now`: a sync round on the running device, with its progress.

use std::path::Path;

use clap::Subcommand;
use tend_node::control::Client;

use crate::output::{CmdResult, Output};
use crate::progress::Watch;
use crate::target::no_device;

#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Run a sync round with the best peers now, and show each session's outcome.
    Now,
}

/// `tend sync now`.
pub fn sync(home: &Path, cmd: SyncCommand, json: bool) -> CmdResult {
    match cmd {
        SyncCommand::Now => {
            let mut client = Client::connect(home)?.ok_or_else(|| no_device(home))?;
            let watch = catching_up(home, json);
            let report = client.sync_now();
            drop(watch);
            let report = report?;
            let human = if report.sessions.is_empty() {
                "no peer to sync with".to_string()
            } else {
                report
                    .sessions
                    .iter()
                    .map(|s| {
                        format!(
                            "{}  {}  sent {} received {} (new {}, rejected {})  {} ms",
                            s.peer,
                            s.result,
                            s.facts_sent,
                            s.facts_received,
                            s.facts_accepted,
                            s.facts_rejected,
                            s.duration_ms
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            Ok(Output::new(report, human))
        }
    }
}

/// While a round runs (it reports only at its end): the facts the running device has
/// taken in since, and how fast, from its journal status on a second connection.
fn catching_up(home: &Path, json: bool) -> Watch {
    let mut status = Client::connect(home).ok().flatten();
    let mut facts = move || -> Option<u64> {
        let s = status.as_mut()?.journal_status().ok()?;
        Some(s.namespaces.iter().map(|n| n.facts).sum())
    };
    let start = (facts(), std::time::Instant::now());
    Watch::start(json, "catching up with peers", move || {
        let gained = facts()?.saturating_sub(start.0?);
        let rate = gained as f64 / start.1.elapsed().as_secs_f64().max(0.001);
        Some(format!(
            "catching up with peers: {gained} new facts ({rate:.0}/s)"
        ))
    })
}
