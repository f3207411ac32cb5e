//! `tend rendezvous`: a service where devices publish and look up signed, expiring
//! address records.

use std::net::SocketAddr;

use clap::Args as ClapArgs;
use tend_node::discovery::rendezvous::ServerConfig;

use crate::output::{CmdResult, Output};

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
