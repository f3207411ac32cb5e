//! `tend status`: the one-screen answer to "is my device healthy?": who it is, its
//! authority and epochs, what the journal holds, the latest snapshot and whether GC is
//! pending, and, while it runs, its peers. Through the running device's control socket
//! when one answers, else from the stopped store.

use std::path::Path;

use serde::Serialize;
use tend_node::control::ops::GetSnapshotStatus;
use tend_node::{GcPolicy, JournalStatus, NamespaceStatus, PeerInfo, SnapshotStatus};

use crate::output::{CmdResult, Output};
use crate::target::Target;

/// What `tend status` shows (and prints under `--json`).
#[derive(Serialize)]
struct Status {
    /// Whether a `tend run` answered on the control socket.
    running: bool,
    device_id: String,
    /// The authority namespace the device writes and synchronises.
    namespace: String,
    identity_epoch: u64,
    snapshot_epoch: u64,
    current_epoch: u64,
    facts: u64,
    application_facts: u64,
    maintenance_facts: u64,
    /// Live keys of the application state (`null` on a running device: the control
    /// socket does not report them).
    live_keys: Option<usize>,
    /// Untrimmed log entries (`null` on a running device, as `live_keys`).
    log_entries: Option<usize>,
    store_bytes: u64,
    digest: Option<String>,
    latest_snapshot: Option<tend_node::device::SnapshotSummary>,
    open_proposals: usize,
    gc_policy: GcPolicy,
    /// The latest snapshot covers facts or blobs a GC would prune now.
    gc_pending: bool,
    gc_pending_facts: u64,
    gc_pending_blobs: u64,
    /// Where the running device listens.
    listen_addr: Option<String>,
    /// The running device's peers (`null` when stopped).
    peers: Option<Vec<PeerInfo>>,
}

/// `tend status`.
pub fn status(home: &Path) -> CmdResult {
    let s = match Target::open(home)? {
        Target::Running(mut c) => {
            let node = c.status()?;
            let snap = c.run(GetSnapshotStatus {})?;
            let gc = match snap.latest {
                Some(_) => Some(c.gc(true)?),
                None => None,
            };
            build(
                node.journal,
                snap,
                gc,
                None,
                Some(node.listen_addr),
                Some(node.peers),
            )
        }
        Target::Stopped(d) => {
            let journal = d.status()?;
            let snap = d.snapshot_status()?;
            let gc = match snap.latest {
                Some(_) => Some(d.gc(true)?),
                None => None,
            };
            let app = d.store().app_state(d.namespace())?;
            build(
                journal,
                snap,
                gc,
                Some((app.live_keys(), app.log_len())),
                None,
                None,
            )
        }
    };
    let human = render(&s);
    Ok(Output::new(s, human))
}

fn build(
    journal: JournalStatus,
    snap: SnapshotStatus,
    gc: Option<tend_node::GcReport>,
    app: Option<(usize, usize)>,
    listen_addr: Option<String>,
    peers: Option<Vec<PeerInfo>>,
) -> Status {
    let ns: Option<&NamespaceStatus> = journal
        .namespaces
        .iter()
        .find(|n| n.namespace == journal.current_namespace);
    let (facts_pruned, blobs_pruned) = gc
        .as_ref()
        .map_or((0, 0), |g| (g.facts_pruned, g.blobs_pruned));
    Status {
        running: peers.is_some(),
        device_id: journal.device_id.clone(),
        namespace: journal.current_namespace.clone(),
        identity_epoch: ns.map_or(0, |n| n.identity_epoch),
        snapshot_epoch: ns.map_or(0, |n| n.snapshot_epoch),
        current_epoch: ns.map_or(snap.current_epoch, |n| n.current_epoch),
        facts: ns.map_or(0, |n| n.facts),
        application_facts: ns.map_or(0, |n| n.application_facts),
        maintenance_facts: ns.map_or(0, |n| n.maintenance_facts),
        live_keys: app.map(|a| a.0),
        log_entries: app.map(|a| a.1),
        store_bytes: journal.store_bytes,
        digest: ns.map(|n| n.digest.clone()),
        open_proposals: snap.open_proposals.len(),
        latest_snapshot: snap.latest,
        gc_policy: snap.gc_policy,
        gc_pending: facts_pruned + blobs_pruned > 0,
        gc_pending_facts: facts_pruned,
        gc_pending_blobs: blobs_pruned,
        listen_addr,
        peers,
    }
}

fn render(s: &Status) -> String {
    let count = |n: Option<usize>| {
        n.map_or("- (not reported by a running device)".into(), |n| {
            n.to_string()
        })
    };
    let mut out = format!(
        "device     {}  ({})\nauthority  {}\nepochs     identity {}, snapshot {}, current {}\n\
         facts      {} ({} application, {} maintenance and authority)\n\
         state      {} live keys, {} log entries\nstore      {} bytes\n",
        s.device_id,
        if s.running {
            format!(
                "running, listening on {}",
                s.listen_addr.as_deref().unwrap_or("-")
            )
        } else {
            "stopped".to_string()
        },
        s.namespace,
        s.identity_epoch,
        s.snapshot_epoch,
        s.current_epoch,
        s.facts,
        s.application_facts,
        s.maintenance_facts,
        count(s.live_keys),
        count(s.log_entries),
        s.store_bytes,
    );
    match &s.latest_snapshot {
        Some(l) => out.push_str(&format!(
            "snapshot   epoch {}{}\n",
            l.epoch,
            if l.blob_stored {
                ""
            } else {
                " (blob not stored here)"
            }
        )),
        None => out.push_str("snapshot   none yet\n"),
    }
    if s.open_proposals > 0 {
        out.push_str(&format!("proposals  {} open\n", s.open_proposals));
    }
    out.push_str(&format!(
        "gc         policy {}; {}\n",
        serde_json::to_value(s.gc_policy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        if s.gc_pending {
            format!(
                "pending: {} facts and {} blobs to prune (tend gc)",
                s.gc_pending_facts, s.gc_pending_blobs
            )
        } else {
            "nothing pending".to_string()
        }
    ));
    match &s.peers {
        None => out.push_str("peers      - (the device is not running)\n"),
        Some(p) if p.is_empty() => out.push_str("peers      none\n"),
        Some(peers) => {
            out.push_str("peers\n");
            for p in peers {
                out.push_str(&format!(
                    "  {}  {:<7} score {:.2}  ok {}  failed {}  active {}  last sync {}{}\n",
                    crate::target::short(&p.device_id),
                    p.status,
                    p.score,
                    p.successful_syncs,
                    p.failed_syncs,
                    p.active_sessions,
                    crate::peers::ago(p.last_sync_unix_ms),
                    if p.blocked { "  blocked" } else { "" }
                ));
            }
        }
    }
    out
}
