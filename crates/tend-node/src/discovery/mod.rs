//! Where peer addresses come from: a small trait, static peers (`--peer`), and the peers
//! persisted in the store's `peers` setting, and the rendezvous service ([`rendezvous`],
//! over the signed records of [`record`]), and local-network announcements of the same
//! records ([`local`]).

pub mod local;
pub mod record;
pub mod rendezvous;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tend_core::DeviceId;
use tend_store::{Store, StoreError};

use crate::device::Device;
use crate::metrics::Metrics;

/// Setting under which learned peers are persisted.
pub const PEERS_SETTING: &str = "peers";

/// A device and a direct address it listens on.
/// Persisted and shown as `DEVICE_ID@IP:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PeerAddr {
    /// The device (and iroh endpoint) id.
    pub device: DeviceId,
    /// A direct UDP address of its endpoint.
    pub addr: SocketAddr,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.device, self.addr)
    }
}

impl From<PeerAddr> for String {
    fn from(p: PeerAddr) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for PeerAddr {
    type Error = ParsePeerError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Why a `DEVICE_ID@ADDR` string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer {input:?}: {detail} (expected DEVICE_ID@IP:PORT)")]
pub struct ParsePeerError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub detail: String,
}

impl FromStr for PeerAddr {
    type Err = ParsePeerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |detail: String| ParsePeerError {
            input: s.into(),
            detail,
        };
        let (id, addr) = s.split_once('@').ok_or_else(|| err("missing '@'".into()))?;
        let device = id
            .parse::<DeviceId>()
            .map_err(|e| err(format!("bad device id: {e}")))?;
        let addr = addr
            .parse::<SocketAddr>()
            .map_err(|e| err(format!("bad address: {e}")))?;
        Ok(PeerAddr { device, addr })
    }
}

/// A source of peer addresses, asked at the start of every sync round.
pub trait AddressSource: Send + Sync {
    /// A short name for logs and status.
    fn name(&self) -> &str;

    /// The peers this source knows now.
    fn peers(&self) -> Vec<PeerAddr>;
}

/// What discovery needs of the running node it feeds: its device, where it listens, its
/// metrics, and where to add an address source. [`crate::Node`] is one.
pub trait DiscoveryHost {
    /// The device (held weakly by the background tasks).
    fn device(&self) -> &Arc<Device>;
    /// The address the endpoint listens on (announced and published).
    fn listen_addr(&self) -> SocketAddr;
    /// The metrics (announcements refused are counted there).
    fn metrics(&self) -> &Metrics;
    /// Adds a peer address source, asked every round.
    fn add_source(&self, source: Box<dyn AddressSource>);
}

/// Whether `peer` is one of the configured peers of `store` (the `peers` setting, which
/// `--peer` fills); `false` if the setting cannot be read.
pub fn is_configured_peer(store: &Store, peer: &DeviceId) -> bool {
    load_peers(store)
        .map(|ps| ps.iter().any(|p| p.device == *peer))
        .unwrap_or(false)
}

/// A fixed list, from `--peer` flags.
#[derive(Clone, Debug, Default)]
pub struct StaticPeers(pub Vec<PeerAddr>);

impl AddressSource for StaticPeers {
    fn name(&self) -> &str {
        "static"
    }

    fn peers(&self) -> Vec<PeerAddr> {
        self.0.clone()
    }
}

/// The persisted peer list of a store.
pub fn load_peers(store: &Store) -> Result<Vec<PeerAddr>, StoreError> {
    Ok(store
        .get_setting::<Vec<PeerAddr>>(PEERS_SETTING)?
        .unwrap_or_default())
}

/// Adds `new` to the persisted peer list (a device's newer address replaces its older
/// one); writes only when something changed.
pub fn remember_peers(store: &Store, new: &[PeerAddr]) -> Result<(), StoreError> {
    let mut peers = load_peers(store)?;
    let before = peers.clone();
    for p in new {
        peers.retain(|q| q.device != p.device);
        peers.push(*p);
    }
    peers.sort();
    if peers != before {
        store.put_setting(PEERS_SETTING, &peers)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addr_parses_and_round_trips() {
        let id = DeviceId([7; 32]);
        let s = format!("{id}@127.0.0.1:4000");
        let p: PeerAddr = s.parse().unwrap();
        assert_eq!(p.device, id);
        assert_eq!(p.addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(p.to_string(), s);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<PeerAddr>(&json).unwrap(), p);
        for bad in [
            "",
            "abc",
            "abc@127.0.0.1:1",
            &format!("{id}@nowhere"),
            &format!("{id}"),
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }
}
