//! `tend run`: a device on its iroh endpoint, with its control socket, discovery,
//! automatic snapshots, metrics and HTTP API, until SIGINT or SIGTERM.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use tend_backup::triggers::TriggerDecision;
use tend_node::ceremony::SnapshotTrigger;
use tend_node::discovery::local::{LocalConfig, DEFAULT_GROUP};
use tend_node::discovery::rendezvous::RendezvousConfig;
use tend_node::{NodeConfig, PeerAddr};

use crate::output::{CmdResult, Output};

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
    /// A storage peer (`tend storage`), DEVICE_ID@IP:PORT: keep this device's large values
    /// there, encrypted, uploading new ones every sync interval (the admin must have run
    /// `tend vault key` and `tend vault grant`).
    #[arg(long, value_name = "DEVICE_ID@IP:PORT")]
    pub storage: Option<PeerAddr>,
    /// Rate limits, incoming and outgoing, per peer and for the device (on by default).
    #[command(flatten)]
    pub limits: crate::limits::RateArgs,
}

/// `tend run`: runs the device until SIGINT or SIGTERM.
pub fn run(home: &Path, args: RunArgs, json: bool) -> CmdResult {
    if !(args.sync_interval.is_finite() && args.sync_interval > 0.0) {
        return Err("--sync-interval must be a positive number of seconds".into());
    }
    let sync_interval = Duration::from_secs_f64(args.sync_interval);
    let storage = args.storage;
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
        if let Some(s) = storage {
            let n = node.clone();
            tend_node::vault_peer::keep_on_storage_peer(
                node.device().clone(),
                s.device,
                s.addr,
                sync_interval,
                move || n.after_local_write(),
            );
        }
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
