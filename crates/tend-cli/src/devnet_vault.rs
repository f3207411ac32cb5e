//! The devnet's storage peer step (issue 18): a `tend storage` process keeps the encrypted
//! large values of a small authority of its own across two membership changes; a member
//! added two epochs later reads an old value from it alone, a removed device is refused and
//! cannot open a later one, and the storage peer's home holds no plaintext.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use tend_core::ContentId;
use tend_node::fleet::LocalFleet;
use tend_node::vault_peer::{
    authority_of, grant_storage_peer, key_current_epoch, VaultClient, VaultNetError,
};
use tend_node::Device;
use tend_storage::member::{open_fetched, open_ring};
use tend_storage::{Request, Response};

type DynError = Box<dyn std::error::Error>;

const MARKER_OLD: &[u8] = b"DEVNET-VAULT-EPOCH-1 ";
const MARKER_NEW: &[u8] = b"DEVNET-VAULT-EPOCH-3 ";

/// Stops the storage peer process if the step fails half-way.
struct StoragePeerProcess(Option<Child>);

impl StoragePeerProcess {
    fn stop(&mut self) -> Result<(), DynError> {
        if let Some(child) = self.0.as_mut() {
            // SIGTERM: the peer closes its endpoint and its redb file cleanly.
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            let status = child.wait()?;
            self.0 = None;
            if !status.success() {
                return Err(format!("tend storage exited with {status}").into());
            }
        }
        Ok(())
    }
}

impl Drop for StoragePeerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sync(devices: &[&Arc<Device>]) -> Result<(), DynError> {
    LocalFleet::new(devices.iter().map(|d| Arc::clone(d)).collect()).sync()?;
    Ok(())
}

/// A re-deal among `devices` (the first is the admin), which keys the new epoch for the
/// vault by itself once the vault is in use.
fn re_deal(devices: &[&Arc<Device>]) -> Result<u64, DynError> {
    let mut fleet = LocalFleet::new(devices.iter().map(|d| Arc::clone(d)).collect());
    let created = fleet.create_authority(2, &mut rand::rngs::OsRng)?;
    let state = devices[0]
        .store()
        .maintenance_state(devices[0].namespace())?;
    if !state.vault.epoch_keys.contains_key(&state.identity_epoch()) {
        return Err(format!("identity epoch {} has no vault key", state.identity_epoch()).into());
    }
    Ok(created.identity_epoch)
}

/// Runs the scenario under `dir`; the detail line of the devnet step.
pub async fn storage_peer_step(dir: &Path) -> Result<String, DynError> {
    let dir = dir.join("vault");
    let mut rng = rand::rngs::OsRng;
    let mut homes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let d = Device::init(&dir.join(name), &mut rng)?;
        d.set_gc_policy(tend_node::GcPolicy::Manual)?;
        homes.push(Arc::new(d));
    }
    let [a, b, c, d] = [&homes[0], &homes[1], &homes[2], &homes[3]];
    // The first re-deal comes before the vault is in use; the admin keys that epoch itself.
    let mut fleet = LocalFleet::new(vec![Arc::clone(a), Arc::clone(b)]);
    let first = fleet.create_authority(2, &mut rng)?.identity_epoch;
    key_current_epoch(a)?;

    // The storage peer: a real `tend storage` process, admitted by the admin's grant.
    let storage_home = dir.join("storage");
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--home")
        .arg(&storage_home)
        .args(["--json", "storage", "--authority"])
        .arg(authority_of(a)?.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout of tend storage")?;
    let mut process = StoragePeerProcess(Some(child));
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let started: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("tend storage printed {line:?}: {e}"))?;
    let peer = started["device"]
        .as_str()
        .ok_or("no device in the start line")?
        .parse()?;
    let addr = started["listen_addr"]
        .as_str()
        .ok_or("no address in the start line")?
        .parse()?;
    grant_storage_peer(a, peer, true)?;
    sync(&[a, b])?;

    // b writes a large value in epoch `first` and uploads it encrypted.
    let old_value = MARKER_OLD.repeat(2000);
    b.put("files", "old", &old_value)?;
    let old = ContentId::of_raw(&old_value);
    let client = VaultClient::connect(b.key(), peer, addr).await?;
    client.upload_values(b).await?;
    client.close().await;
    sync(&[a, b])?;

    // b is removed, c joins; then d joins. The admin keys each new epoch.
    re_deal(&[a, c])?;
    let last = re_deal(&[a, c, d])?;
    sync(&[a, c, d])?;
    let new_value = MARKER_NEW.repeat(2000);
    c.put("files", "new", &new_value)?;
    let new = ContentId::of_raw(&new_value);
    let client = VaultClient::connect(c.key(), peer, addr).await?;
    client.upload_values(c).await?;
    client.close().await;
    sync(&[a, c, d])?;

    // a and c stop; d never held b's blob and reads it from the storage peer alone.
    if d.store().has_blob(&old)? {
        d.store().delete_blob(&old)?;
    }
    let client = VaultClient::connect(d.key(), peer, addr).await?;
    if client.fetch(d, old).await? != old_value {
        return Err("the late member read another value".into());
    }
    let state = d.store().maintenance_state(d.namespace())?;
    let encrypted_new = *state
        .vault
        .copies
        .get(&new)
        .ok_or("c's value has no copy")?;
    let Response::Blob {
        blob, sealed_key, ..
    } = client.request(&Request::Get { cid: encrypted_new }).await?
    else {
        return Err("d cannot fetch c's value".into());
    };
    client.close().await;

    // b, removed: refused, and its ring opens nothing sealed after its removal.
    let client = VaultClient::connect(b.key(), peer, addr).await?;
    let refused = client.request(&Request::Get { cid: encrypted_new }).await;
    client.close().await;
    if !matches!(refused, Err(VaultNetError::Refused(_))) {
        return Err(format!("the removed device was not refused: {refused:?}").into());
    }
    let b_ring = open_ring(&state, b.key().signing_key())?;
    let no_cfrags: Vec<Vec<u8>> = Vec::new();
    if open_fetched(
        &state,
        &b_ring,
        &encrypted_new,
        &blob,
        &sealed_key,
        last,
        &no_cfrags,
    )
    .is_ok()
    {
        return Err("the removed device opened a later blob".into());
    }

    // The storage peer stops; no marker in any file of its home.
    process.stop()?;
    let mut bytes_on_disk = 0;
    for entry in std::fs::read_dir(&storage_home)? {
        let content = std::fs::read(entry?.path())?;
        bytes_on_disk += content.len();
        for marker in [MARKER_OLD, MARKER_NEW] {
            if content.windows(marker.len()).any(|w| w == marker) {
                return Err("plaintext found on the storage peer's disk".into());
            }
        }
    }
    Ok(format!(
        "a member added at identity epoch {last} read a {} KiB value of epoch {first} from the storage peer alone (re-encrypted); the removed device was refused and cannot open a later blob; no plaintext in {bytes_on_disk} bytes of the storage peer's home",
        old_value.len() / 1024
    ))
}
