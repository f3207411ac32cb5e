//! `tend peers`: the running device's peers and scores, and the operator's trust and bans.

use std::path::Path;

use clap::Subcommand;
use tend_node::control::Client;

use crate::output::{CmdResult, Output};
use crate::target::no_device;

/// `tend peers` subcommands.
#[derive(Subcommand, Debug)]
pub enum PeersCommand {
    /// Set this device's trust in a peer, from 0 to 1 (it outweighs the peer's role);
    /// `--clear` goes back to the role's trust.
    Trust {
        device_id: String,
        #[arg(required_unless_present = "clear")]
        trust: Option<f64>,
        #[arg(long, conflicts_with = "trust")]
        clear: bool,
    },
    /// Ban a peer: no sync sessions with it either way until unbanned.
    Ban { device_id: String },
    /// Lift a ban (past misbehaviour is forgiven).
    Unban { device_id: String },
}

/// A Unix time in ms as "N s ago" (or "never").
pub fn ago(unix_ms: Option<u64>) -> String {
    match unix_ms {
        None => "never".into(),
        Some(t) => {
            let now = tend_node::peer_table::unix_ms_now();
            format!("{} s ago", now.saturating_sub(t) / 1000)
        }
    }
}

/// `tend peers [trust|ban|unban]`.
pub fn peers(home: &Path, cmd: Option<PeersCommand>) -> CmdResult {
    let Some(cmd) = cmd else {
        return list_peers(home);
    };
    let (device_id, trust, banned) = match cmd {
        PeersCommand::Trust {
            device_id,
            trust,
            clear,
        } => (device_id, Some(if clear { None } else { trust }), None),
        PeersCommand::Ban { device_id } => (device_id, None, Some(true)),
        PeersCommand::Unban { device_id } => (device_id, None, Some(false)),
    };
    let device = tend_node::peer_table::parse_device(&device_id)?;
    if let Some(Some(t)) = trust {
        tend_node::peer_table::check_trust(Some(t))?;
    }
    let (status, trust_now) = match Client::connect(home)? {
        Some(mut c) => {
            let info = match (trust, banned) {
                (Some(t), _) => c.peer_trust(device_id, t)?,
                (None, Some(b)) => c.peer_ban(device_id, b)?,
                (None, None) => unreachable!("every subcommand sets one"),
            };
            (info.status, info.trust)
        }
        None => {
            // A stopped device: edit the stored table, read at the next start.
            let d = tend_node::Device::open(home)?;
            let state = d.store().maintenance_state(d.namespace())?;
            let p = tend_node::peer_table::edit_stored(d.store(), &state, device, trust, banned)?;
            (format!("{:?}", p.status).to_lowercase(), p.trust_level)
        }
    };
    Ok(Output::new(
        serde_json::json!({ "device_id": device.to_string(), "status": status, "trust": trust_now }),
        format!("peer {device}: {status}, trust {trust_now:.2}"),
    ))
}

fn list_peers(home: &Path) -> CmdResult {
    let mut client = Client::connect(home)?.ok_or_else(|| no_device(home))?;
    let peers = client.peers()?;
    let human = if peers.is_empty() {
        "no peers".to_string()
    } else {
        peers
            .iter()
            .map(|p| {
                format!(
                    "{}  {:<21}  {:<7} score {:.2}  trust {:.2}  ok {}  failed {}  last sync {}{}",
                    p.device_id,
                    p.addr.as_deref().unwrap_or("-"),
                    p.status,
                    p.score,
                    p.trust,
                    p.successful_syncs,
                    p.failed_syncs,
                    ago(p.last_sync_unix_ms),
                    if p.blocked { "  blocked" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(Output::new(peers, human))
}
