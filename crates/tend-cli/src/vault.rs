//! `tend storage` (run a storage peer of encrypted blobs) and `tend vault ...` (a member's
//! side: key the current identity epoch, grant a storage peer, upload large values
//! encrypted, fetch one back). See docs/ARCHITECTURE.md section 14.
//!
//! The `vault` commands work on a stopped device: they open its store directly.

use std::net::SocketAddr;
use std::path::Path;

use clap::{Args as ClapArgs, Subcommand};
use tend_core::{AuthorityId, DeviceId};
use tend_node::vault_peer::{
    authority_of, grant_storage_peer, key_current_epoch, run_blocking, with_client_blocking,
};
use tend_node::{Device, PeerAddr};

use crate::output::{CmdResult, Output};

/// Options of `tend storage`.
#[derive(ClapArgs, Debug)]
pub struct StorageArgs {
    /// The authority whose encrypted blobs this peer keeps (`tend vault key` prints it).
    #[arg(long)]
    pub authority: AuthorityId,
    /// Address the storage peer listens on (UDP, iroh).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// `tend vault ...`.
#[derive(Subcommand, Debug)]
pub enum VaultCommand {
    /// Admin: give the current identity epoch its encryption key (sealed to every member)
    /// and re-encryption fragments from every older epoch; run after each membership change.
    Key,
    /// Admin: admit a storage peer (its device id, printed by `tend storage`).
    Grant {
        peer: DeviceId,
        /// Revoke the grant instead.
        #[arg(long)]
        revoke: bool,
    },
    /// Push the facts the storage peer needs and upload every large value without an
    /// encrypted copy, encrypted.
    Upload {
        /// The storage peer, as DEVICE_ID@IP:PORT.
        #[arg(long)]
        storage: PeerAddr,
    },
    /// Fetch a large value's encrypted copy from the storage peer, open it and store it.
    Fetch {
        collection: String,
        key: String,
        /// The storage peer, as DEVICE_ID@IP:PORT.
        #[arg(long)]
        storage: PeerAddr,
    },
}

/// `tend storage`: serves until SIGINT or SIGTERM.
pub fn storage(home: &Path, args: StorageArgs, json: bool) -> CmdResult {
    run_blocking(home, args.authority, args.listen, |device, addr| {
        if json {
            println!(
                "{}",
                serde_json::json!({ "device": device.to_string(), "listen_addr": addr.to_string() })
            );
        } else {
            println!("storage peer {device} listening on {addr}");
        }
    })?;
    Ok(Output::new(serde_json::Value::Null, ""))
}

pub fn vault(home: &Path, cmd: VaultCommand) -> CmdResult {
    let device = Device::open(home)?;
    match cmd {
        VaultCommand::Key => {
            let written = key_current_epoch(&device)?;
            let state = device.store().maintenance_state(device.namespace())?;
            let authority = authority_of(&device)?;
            let epoch = state.identity_epoch();
            let human = if written.is_empty() {
                format!("identity epoch {epoch} already has its key (authority {authority})")
            } else {
                format!(
                    "identity epoch {epoch} keyed: {} facts written (authority {authority})",
                    written.len()
                )
            };
            Ok(Output::new(
                serde_json::json!({
                    "authority": authority.to_string(),
                    "identity_epoch": epoch,
                    "facts_written": written.len(),
                }),
                human,
            ))
        }
        VaultCommand::Grant { peer, revoke } => {
            let fact = grant_storage_peer(&device, peer, !revoke)?;
            let verb = if revoke { "revoked" } else { "granted" };
            Ok(Output::new(
                serde_json::json!({ "peer": peer.to_string(), "granted": !revoke, "fact": fact.id().to_string() }),
                format!("storage peer {peer} {verb}"),
            ))
        }
        VaultCommand::Upload { storage } => {
            let report =
                with_client_blocking(device.key(), storage.device, storage.addr, async |c| {
                    c.upload_values(&device).await
                })?;
            let uploaded: Vec<_> = report
                .uploaded
                .iter()
                .map(|(b, e)| serde_json::json!({ "blob": b.to_string(), "encrypted": e.to_string() }))
                .collect();
            Ok(Output::new(
                serde_json::json!({
                    "facts_new": report.facts_new,
                    "uploaded": uploaded,
                    "already": report.already,
                    "too_large": report.too_large.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                    "dropped": report.dropped,
                }),
                format!(
                    "{} values uploaded encrypted, {} already there, {} too large for the storage peer; {} facts new to it; {} reclaimed copies deleted there",
                    report.uploaded.len(),
                    report.already,
                    report.too_large.len(),
                    report.facts_new,
                    report.dropped
                ),
            ))
        }
        VaultCommand::Fetch {
            collection,
            key,
            storage,
        } => {
            let blob = winner_blob(&device, &collection, &key)?;
            let plain =
                with_client_blocking(device.key(), storage.device, storage.addr, async |c| {
                    c.fetch(&device, blob).await
                })?;
            Ok(Output::new(
                serde_json::json!({ "blob": blob.to_string(), "bytes": plain.len() }),
                format!(
                    "{collection}/{key}: {} bytes fetched from the storage peer",
                    plain.len()
                ),
            ))
        }
    }
}

/// The blob the winning write of `collection`/`key` names.
fn winner_blob(
    device: &Device,
    collection: &str,
    key: &str,
) -> Result<tend_core::ContentId, Box<dyn std::error::Error>> {
    let ns = device.namespace();
    let app = device.store().app_state(ns)?;
    let entry = app
        .get(collection, key)
        .ok_or_else(|| format!("{collection}/{key} is absent"))?;
    let (epoch, id) = entry.winner;
    let stored = device
        .store()
        .get(ns, epoch, &id)?
        .ok_or_else(|| format!("the fact {id} of {collection}/{key} is missing"))?;
    let (_, payload) = stored.author_payload()?;
    match payload {
        tend_core::Payload::Data(tend_core::DataOp::Put(put)) => put
            .value
            .blob()
            .ok_or_else(|| format!("{collection}/{key} is a small value, not a blob").into()),
        _ => Err(format!("{collection}/{key} is not a put").into()),
    }
}
