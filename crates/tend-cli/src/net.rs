//! The networked commands: `tend run` (a device on its iroh endpoint), `tend peers`,
//! `tend sync now`, and the control-socket path of commands that also work offline.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Subcommand};
use tend_backup::triggers::TriggerDecision;
use tend_node::ceremony::SnapshotTrigger;
use tend_node::control::Client;
use tend_node::discovery::local::{LocalConfig, DEFAULT_GROUP};
use tend_node::discovery::rendezvous::{RendezvousConfig, ServerConfig};
use tend_node::{JournalStatus, NodeConfig, PeerAddr};

use crate::output::CmdResult;
use crate::output::Output;
use crate::progress::Watch;

/// Options of `tend run`.
#[derive(ClapArgs, Debug)]
pub struct RunArgs {
    /// Address the endpoint listens on (UDP).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// A static peer, DEVICE_ID@IP:PORT (repeatable); remembered in the store.
    #[arg(long = "peer")]
    pub peers: Vec<PeerAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Seconds between sync rounds.
    #[arg(long, default_value_t = 10.0)]
    pub sync_interval: f64,
    /// A rendezvous server (`tend rendezvous`), IP:PORT: publish this device's address
    /// there every sync round and find the authority's members through it.
    #[arg(long)]
    pub rendezvous: Option<SocketAddr>,
    /// Local-network discovery: announce this device and find the authority's members by
    /// UDP multicast on the interface with this IPv4 address (e.g. 192.168.1.20, or
    /// 127.0.0.1 for devices on this machine only).
    #[arg(long, value_name = "INTERFACE_IP")]
    pub local_discovery: Option<Ipv4Addr>,
    /// The multicast group and port of local-network discovery.
    #[arg(long, value_name = "IP:PORT", default_value_t = DEFAULT_GROUP, requires = "local_discovery")]
    pub local_group: SocketAddrV4,
    /// Serve the local HTTP API (docs/API.md) at http://ADDR/v1/; requests need the token
    /// in HOME/api.token (made when absent).
    #[arg(long, value_name = "IP:PORT")]
    pub api: Option<SocketAddr>,
    /// Rate limits, incoming and outgoing, per peer and for the device (on by default).
    #[command(flatten)]
    pub limits: crate::limits::RateArgs,
}

/// Options of `tend rendezvous`.
#[derive(ClapArgs, Debug)]
pub struct RendezvousArgs {
    /// Address the service listens on (TCP).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Most devices with a record at once.
    #[arg(long, default_value_t = 10_000)]
    pub capacity: usize,
}

#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Run a sync round with the best peers now, and show each session's outcome.
    Now,
}

fn no_device(home: &Path) -> Box<dyn std::error::Error> {
    format!(
        "no device is running in {} (start one with `tend run --home {}`)",
        home.display(),
        home.display()
    )
    .into()
}

/// `tend run`: runs the device until SIGINT or SIGTERM.
pub fn run(home: &Path, args: RunArgs, json: bool) -> CmdResult {
    if !(args.sync_interval.is_finite() && args.sync_interval > 0.0) {
        return Err("--sync-interval must be a positive number of seconds".into());
    }
    let sync_interval = Duration::from_secs_f64(args.sync_interval);
    crate::backup::remove_stale_restores(home);
    let mut config = NodeConfig {
        listen: args.listen,
        peers: args.peers,
        metrics: args.metrics,
        sync_interval,
        rendezvous: args
            .rendezvous
            .map(|server| rendezvous_config(server, sync_interval)),
        local_discovery: args
            .local_discovery
            .map(|interface| local_config(interface, args.local_group, sync_interval)),
        ..NodeConfig::default()
    };
    args.limits.apply(&mut config);
    // The API's port and token are taken before the node starts, so a taken port or a
    // bad token file is an error at once.
    let api = match args.api {
        Some(addr) => Some((
            tend_node::api::load_or_create_token(home)?,
            tend_node::api::bind(addr)?,
        )),
        None => None,
    };
    tend_node::node::run_blocking(home, config, |node| {
        // Automatic snapshots: the node asks on its timer (on the admin only) whether the
        // journal passed a configured fact count, size or age (`tend snapshot triggers`).
        node.set_snapshot_trigger(SnapshotTrigger(Arc::new(|store, ns, now_secs| {
            match tend_backup::triggers::evaluate(store, ns, now_secs) {
                Ok((TriggerDecision::Propose { target_epoch, .. }, _)) => Some(target_epoch),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!("snapshot triggers: {e}");
                    None
                }
            }
        })));
        // `tend backup export` while the device runs: the node writes the archive from
        // its open store (`backup_export` on the control socket).
        node.set_backup_exporter(crate::backup::exporter());
        let api_addr =
            api.and_then(
                |(token, listener)| match tend_node::api::serve(node, listener, token) {
                    Ok(addr) => Some(addr),
                    Err(e) => {
                        eprintln!("error: {e}");
                        None
                    }
                },
            );
        let info = node.start_info();
        if json {
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            if let (Some(o), Some(a)) = (v.as_object_mut(), api_addr) {
                o.insert("api_addr".into(), a.to_string().into());
            }
            println!("{v}");
        } else {
            println!("device  {}", info.device_id);
            println!("listen  {}", info.listen_addr);
            if let Some(m) = &info.metrics_addr {
                println!("metrics http://{m}/metrics");
            }
            if let Some(a) = api_addr {
                println!(
                    "api     http://{a}/v1/ (token in {})",
                    home.join(tend_node::api::TOKEN_FILE).display()
                );
            }
        }
    })?;
    // Everything worth saying was printed at start.
    Ok(Output::new(serde_json::Value::Null, ""))
}

/// How `tend run` uses a rendezvous server: it publishes and resolves once per sync round
/// (so a moved device is found within a round or two), and its records live for ten
/// rounds but at least a minute, so a few lost publications do not make it vanish.
fn rendezvous_config(server: SocketAddr, sync_interval: Duration) -> RendezvousConfig {
    let defaults = RendezvousConfig::new(server);
    RendezvousConfig {
        interval: sync_interval.min(defaults.interval),
        lifetime: (sync_interval * 10).clamp(Duration::from_secs(60), Duration::from_secs(3600)),
        ..defaults
    }
}

/// How `tend run` announces itself on the local network: like the rendezvous, once per
/// sync round at most, with records that outlive a few lost datagrams.
fn local_config(interface: Ipv4Addr, group: SocketAddrV4, sync_interval: Duration) -> LocalConfig {
    let defaults = LocalConfig::new(interface);
    LocalConfig {
        group,
        interval: sync_interval.min(defaults.interval),
        lifetime: (sync_interval * 10).clamp(Duration::from_secs(60), Duration::from_secs(3600)),
        ..defaults
    }
}

/// `tend rendezvous`: serves signed, expiring address records until SIGINT or SIGTERM.
pub fn rendezvous(args: RendezvousArgs, json: bool) -> CmdResult {
    let config = ServerConfig {
        capacity: args.capacity.max(1),
        ..ServerConfig::default()
    };
    tend_node::discovery::rendezvous::run_blocking(args.listen, config, |addr| {
        if json {
            println!("{}", serde_json::json!({ "listen_addr": addr.to_string() }));
        } else {
            println!("rendezvous listening on {addr}");
        }
    })?;
    Ok(Output::new(serde_json::Value::Null, ""))
}

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

/// The journal status from the running device, if one answers in `home`.
pub fn journal_status_via_socket(
    home: &Path,
) -> Result<Option<JournalStatus>, Box<dyn std::error::Error>> {
    match Client::connect(home)? {
        Some(mut c) => Ok(Some(c.journal_status()?)),
        None => Ok(None),
    }
}

/// Adds a fact through the running device, if one answers in `home`.
pub fn add_fact_via_socket(
    home: &Path,
    kind: &str,
    data: &str,
) -> Result<Option<Output>, Box<dyn std::error::Error>> {
    let Some(mut c) = Client::connect(home)? else {
        return Ok(None);
    };
    let fact = c.add_fact(kind, data)?;
    Ok(Some(Output::new(
        serde_json::json!({ "id": fact.id, "epoch": fact.epoch }),
        format!("added fact {} at epoch {}", fact.id, fact.epoch),
    )))
}
