//! The storage peer over iroh (`tend/vault/1`) and a member's requests to it: a thin
//! tokio layer over `tend-storage`, which decides everything.
//!
//! One request and one answer per bi-stream, each one frame (`endpoint::write_frame`). The
//! storage peer's home holds its device key (`device.key`, its endpoint id, which the
//! admin's `StorageGrant` names) and `vault.redb`. Members bind an outgoing-only endpoint
//! with their device key, so the storage peer sees their device id: on a stopped device
//! (`tend vault`), or from a running one that keeps its large values on the storage peer
//! ([`keep_on_storage_peer`], `tend run --storage`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointAddr};
use rand::rngs::OsRng;
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::{StorageGrant, VaultCopy};
use tend_core::{
    AuthorityId, ContentId, DeviceId, JournalNamespace, MaintenanceState, Payload, VerifiedFact,
};
use tend_crypto::device::DeviceKey;
use tend_storage::member::{
    epoch_key_facts, fits_one_request, open_fetched, open_ring, seal_for_storage,
};
use tend_storage::protocol::{MAX_FRAME_BYTES, MAX_VAULT_BLOB_BYTES};
use tend_storage::{is_for_storage_peer, Request, Response, StorageError, StoragePeer, VAULT_ALPN};

use crate::device::Device;
use crate::endpoint::{self, close_code, EndpointError, FrameError};
use crate::error::DeviceError;

/// The storage peer's redb file in its home.
pub const VAULT_FILE: &str = "vault.redb";

/// Why a storage peer or a member's request to it failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultNetError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] tend_store::StoreError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("the storage peer's stream: {0}")]
    Frame(#[from] FrameError),
    #[error("cannot reach the storage peer: {0}")]
    Connect(String),
    #[error("the storage peer's key file: {0}")]
    Key(String),
    #[error("the storage peer refused: {0}")]
    Refused(String),
    #[error("the storage peer answered {0} unexpectedly")]
    Unexpected(String),
    #[error("blob {0} has no encrypted copy recorded in the journal")]
    NoCopy(ContentId),
    #[error("blob {0} is not on the storage peer")]
    Missing(ContentId),
    #[error("this device's journal has no authority")]
    NoAuthority,
}

/// A running storage peer.
pub struct StorageServer {
    endpoint: Endpoint,
    peer: Arc<Mutex<StoragePeer>>,
    device: DeviceId,
    accept: tokio::task::JoinHandle<()>,
}

impl StorageServer {
    /// Starts the storage peer of `authority` in `home` (created with a fresh device key if
    /// it has none) listening on `listen`.
    pub async fn start(
        home: &Path,
        authority: AuthorityId,
        listen: SocketAddr,
    ) -> Result<Self, VaultNetError> {
        let key = load_or_create_key(home)?;
        let device = key.device_id();
        let path = home.join(VAULT_FILE);
        let peer = tokio::task::spawn_blocking(move || StoragePeer::open(&path, authority, device))
            .await
            .map_err(|e| VaultNetError::Key(e.to_string()))??;
        let peer = Arc::new(Mutex::new(peer));
        let endpoint = endpoint::bind_alpns(&key, listen, vec![VAULT_ALPN.to_vec()]).await?;
        let accept = tokio::spawn(accept_loop(endpoint.clone(), peer.clone()));
        Ok(Self {
            endpoint,
            peer,
            device,
            accept,
        })
    }

    pub fn device_id(&self) -> DeviceId {
        self.device
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        endpoint::local_addr(&self.endpoint)
    }

    /// How many blobs the peer holds, and its current identity epoch.
    pub fn summary(&self) -> Result<(u64, u64), VaultNetError> {
        let peer = lock(&self.peer);
        Ok((peer.store().blob_count()?, peer.rules().current_epoch()))
    }

    /// Stops accepting and closes the endpoint.
    pub async fn shutdown(self) {
        self.accept.abort();
        self.endpoint.close().await;
    }
}

/// The storage peer's device key: loaded from its home, or created (0600) on first start.
pub fn load_or_create_key(home: &Path) -> Result<DeviceKey, VaultNetError> {
    if DeviceKey::path(home).exists() {
        return DeviceKey::load(home).map_err(|e| VaultNetError::Key(e.to_string()));
    }
    std::fs::create_dir_all(home).map_err(|e| VaultNetError::Key(e.to_string()))?;
    let key = DeviceKey::generate(&mut OsRng);
    key.save(home)
        .map_err(|e| VaultNetError::Key(e.to_string()))?;
    Ok(key)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(endpoint: Endpoint, peer: Arc<Mutex<StoragePeer>>) {
    while let Some(incoming) = endpoint.accept().await {
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Ok(conn) = incoming.await {
                serve(peer, conn).await;
            }
        });
    }
}

/// Answers requests on one connection. Who may do what is the rules' decision, per request
/// (a member pushing the facts that make it a member is admitted by them).
async fn serve(peer: Arc<Mutex<StoragePeer>>, conn: Connection) {
    let remote = endpoint::device_of(conn.remote_id());
    while let Ok((send, recv)) = conn.accept_bi().await {
        let peer = peer.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(peer, remote, send, recv).await {
                tracing::debug!("vault request from {remote} failed: {e}");
                conn.close(
                    endpoint::code(close_code::MISBEHAVIOUR),
                    e.to_string().as_bytes(),
                );
            }
        });
    }
}

async fn answer(
    peer: Arc<Mutex<StoragePeer>>,
    remote: DeviceId,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), VaultNetError> {
    let bytes = endpoint::read_frame(&mut recv, MAX_FRAME_BYTES).await?;
    let mut request = Request::decode(&bytes)?;
    if request.expects_body() {
        request.set_body(endpoint::read_frame(&mut recv, MAX_VAULT_BLOB_BYTES).await?);
    }
    // Checks, redb writes and re-encryption are blocking work.
    let response =
        tokio::task::spawn_blocking(move || lock(&peer).handle(&mut OsRng, &remote, request))
            .await
            .map_err(|e| VaultNetError::Unexpected(e.to_string()))?;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("storage peer: {e}");
            Response::Refused {
                reason: "the storage peer failed to store".into(),
            }
        }
    };
    endpoint::write_frame(&mut send, &response.encode()).await?;
    if let Some(body) = response.body() {
        endpoint::write_frame(&mut send, body).await?;
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

/// Keeps a running device's large values on the storage peer `storage` at `addr`: every
/// `interval` it connects, pushes the facts the peer takes and uploads, encrypted, each
/// large value without a copy yet (what `tend vault upload` does), then calls `wrote` when
/// it wrote `VaultCopy` facts, so the device's sessions carry them. A failed pass (the
/// peer down, no grant or vault key yet) is logged and tried again at the next interval;
/// the task ends with the runtime.
pub fn keep_on_storage_peer(
    device: Arc<Device>,
    storage: DeviceId,
    addr: SocketAddr,
    interval: std::time::Duration,
    wrote: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_failure = String::new();
        loop {
            tokio::time::sleep(interval).await;
            let pass = async {
                let client = VaultClient::connect(device.key(), storage, addr).await?;
                let report = client.upload_values(&device).await;
                client.close().await;
                report
            };
            match pass.await {
                Ok(report) => {
                    last_failure.clear();
                    if !report.uploaded.is_empty() {
                        tracing::info!(
                            "{} large values kept on storage peer {storage}",
                            report.uploaded.len()
                        );
                        wrote();
                    }
                }
                // Said once per kind of failure, not at every interval.
                Err(e) => {
                    let why = e.to_string();
                    if why != last_failure {
                        tracing::warn!("storage peer {storage}: {why}");
                        last_failure = why;
                    }
                }
            }
        }
    })
}

/// A member's connection to a storage peer.
pub struct VaultClient {
    endpoint: Endpoint,
    conn: Connection,
}

/// What [`VaultClient::upload_values`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Facts the storage peer had not seen.
    pub facts_new: u64,
    /// Blobs encrypted and stored, as (plaintext CID, ciphertext CID).
    pub uploaded: Vec<(ContentId, ContentId)>,
    /// Large values already copied.
    pub already: u64,
    /// Large values whose encrypted form would exceed what one request carries
    /// (`tend_storage::protocol::MAX_VAULT_BLOB_BYTES`): left out, not failed.
    pub too_large: Vec<ContentId>,
    /// Encrypted copies the peer deleted because GC reclaimed their values.
    pub dropped: u64,
}

impl VaultClient {
    /// Connects with `key` (the member's device key) to the storage peer `storage` at `addr`.
    pub async fn connect(
        key: &DeviceKey,
        storage: DeviceId,
        addr: SocketAddr,
    ) -> Result<Self, VaultNetError> {
        let endpoint =
            endpoint::bind_alpns(key, SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new()).await?;
        let target: EndpointAddr = endpoint::endpoint_addr(storage, addr)?;
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            endpoint.connect(target, VAULT_ALPN),
        )
        .await
        .map_err(|_| VaultNetError::Connect("timed out".into()))?
        .map_err(|e| VaultNetError::Connect(e.to_string()))?;
        Ok(Self { endpoint, conn })
    }

    /// One request and its answer.
    pub async fn request(&self, request: &Request) -> Result<Response, VaultNetError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| VaultNetError::Connect(e.to_string()))?;
        endpoint::write_frame(&mut send, &request.encode()).await?;
        if let Some(body) = request.body() {
            endpoint::write_frame(&mut send, body).await?;
        }
        let _ = send.finish();
        let bytes = endpoint::read_frame(&mut recv, MAX_FRAME_BYTES).await?;
        let mut response = Response::decode(&bytes)?;
        if response.expects_body() {
            response.set_body(endpoint::read_frame(&mut recv, MAX_VAULT_BLOB_BYTES).await?);
        }
        match response {
            Response::Refused { reason } => Err(VaultNetError::Refused(reason)),
            other => Ok(other),
        }
    }

    /// Pushes the facts a storage peer takes (membership, admin, vault keys, grants) from
    /// `device`'s journal; returns how many were new to it.
    pub async fn push_facts(&self, device: &Device) -> Result<u64, VaultNetError> {
        let facts = peer_facts(device)?;
        match self.request(&Request::PushFacts { facts }).await? {
            Response::FactsAdmitted { new } => Ok(new),
            other => Err(VaultNetError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Pushes facts, then encrypts every large value of the journal that has no encrypted
    /// copy yet, stores it on the peer and records the copy (`VaultCopy`) in the journal.
    pub async fn upload_values(&self, device: &Device) -> Result<UploadReport, VaultNetError> {
        let mut report = UploadReport {
            facts_new: self.push_facts(device).await?,
            ..Default::default()
        };
        let ns = device.namespace();
        let state = device.store().maintenance_state(ns)?;
        for (cid, len) in device.store().value_blobs(ns)? {
            if state.vault.copies.contains_key(&cid) {
                report.already += 1;
                continue;
            }
            if !fits_one_request(len) {
                report.too_large.push(cid);
                continue;
            }
            // A value whose blob this device lacks is another member's to upload.
            let Some(plain) = device.store().get_blob(&cid)? else {
                continue;
            };
            let (request, encrypted) = seal_for_storage(&mut OsRng, &state, &plain)?;
            match self.request(&request).await? {
                Response::Stored { cid: stored } if stored == encrypted => {}
                other => return Err(VaultNetError::Unexpected(format!("{other:?}"))),
            }
            device.append(Payload::Maintenance(MaintenanceFact::VaultCopy(
                VaultCopy {
                    blob: cid,
                    encrypted,
                },
            )))?;
            report.uploaded.push((cid, encrypted));
        }
        report.dropped = self.drop_reclaimed(&state).await?;
        Ok(report)
    }

    /// Asks the peer to delete the encrypted copies of values whose tombstone a snapshot
    /// covers (GC reclaims their plaintext the same way), so the peer's storage stays
    /// bounded like the members'. Returns how many it still held.
    pub async fn drop_reclaimed(&self, state: &MaintenanceState) -> Result<u64, VaultNetError> {
        let cids: Vec<ContentId> = state
            .prunable_blobs()
            .iter()
            .filter_map(|blob| state.vault.copies.get(blob).copied())
            .collect();
        if cids.is_empty() {
            return Ok(0);
        }
        match self.request(&Request::Drop { cids }).await? {
            Response::Dropped { removed } => Ok(removed),
            other => Err(VaultNetError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Fetches the encrypted copy of blob `blob` (a plaintext CID of the journal), opens it
    /// with this member's ring (through the peer's capsule fragments if it was sealed to an
    /// older epoch), checks it against `blob` and stores it, so the value reads locally.
    pub async fn fetch(&self, device: &Device, blob: ContentId) -> Result<Vec<u8>, VaultNetError> {
        let ns = device.namespace();
        let state = device.store().maintenance_state(ns)?;
        let encrypted = *state
            .vault
            .copies
            .get(&blob)
            .ok_or(VaultNetError::NoCopy(blob))?;
        // The newest ring sealed to this device: right after a membership change, before the
        // admin keys the new epoch, it still opens what was sealed to the previous one.
        let ring = open_ring(&state, device.key().signing_key())?;
        let answer = self.request(&Request::Get { cid: encrypted }).await?;
        let Response::Blob {
            blob: bytes,
            sealed_key,
            to_epoch,
            cfrags,
        } = answer
        else {
            return match answer {
                Response::Missing { .. } => Err(VaultNetError::Missing(encrypted)),
                other => Err(VaultNetError::Unexpected(format!("{other:?}"))),
            };
        };
        let plain = open_fetched(
            &state,
            &ring,
            &encrypted,
            &bytes,
            &sealed_key,
            to_epoch,
            &cfrags,
        )?;
        if !blob.matches(&plain) {
            return Err(StorageError::CidMismatch(blob).into());
        }
        device.store().put_blob(blob.codec(), &plain)?;
        Ok(plain)
    }

    /// Closes the connection and the endpoint.
    pub async fn close(self) {
        self.conn.close(endpoint::code(close_code::DONE), b"done");
        self.endpoint.close().await;
    }
}

/// The facts of `device`'s journal a storage peer takes, in their wire encoding.
pub fn peer_facts(device: &Device) -> Result<Vec<ByteBuf>, VaultNetError> {
    let mut out = Vec::new();
    for stored in device.store().scan_maintenance(device.namespace())? {
        let stored = stored?;
        let (_, payload) = stored
            .author_payload()
            .map_err(|e| VaultNetError::Unexpected(e.to_string()))?;
        if is_for_storage_peer(&payload) {
            out.push(ByteBuf::from(stored.into_bytes()));
        }
    }
    Ok(out)
}

/// The admin's step after a membership change (or to enable the vault): writes the current
/// identity epoch's key, its ring sealed to every member, and the re-encryption fragments
/// from every older keyed epoch. Nothing if the epoch has its key already.
pub fn key_current_epoch(device: &Device) -> Result<Vec<VerifiedFact>, VaultNetError> {
    let state = device.store().maintenance_state(device.namespace())?;
    let payloads = epoch_key_facts(&mut OsRng, &state, device.key().signing_key())?;
    payloads
        .into_iter()
        .map(|p| device.append(p).map_err(VaultNetError::from))
        .collect()
}

/// After a membership change the admin wrote: [`key_current_epoch`] if the authority uses the
/// vault (an earlier epoch has a key), else nothing.
pub fn key_epoch_if_enabled(device: &Device) -> Result<Vec<VerifiedFact>, VaultNetError> {
    let state = device.store().maintenance_state(device.namespace())?;
    if state.vault.epoch_keys.is_empty() {
        return Ok(Vec::new());
    }
    key_current_epoch(device)
}

/// The admin grants (or revokes) storage peer `peer`.
pub fn grant_storage_peer(
    device: &Device,
    peer: DeviceId,
    granted: bool,
) -> Result<VerifiedFact, VaultNetError> {
    Ok(
        device.append(Payload::Maintenance(MaintenanceFact::StorageGrant(
            StorageGrant { peer, granted },
        )))?,
    )
}

/// The authority of a device's journal.
pub fn authority_of(device: &Device) -> Result<AuthorityId, VaultNetError> {
    match device.namespace() {
        JournalNamespace::Authority(a) => Ok(a),
        JournalNamespace::Context(_) => Err(VaultNetError::NoAuthority),
    }
}

/// The home of a storage peer's files, for messages.
pub fn vault_file(home: &Path) -> PathBuf {
    home.join(VAULT_FILE)
}

/// `tend storage`: runs the storage peer of `authority` from `home` on `listen` until
/// SIGTERM or SIGINT; `started` is called once it listens (after the signal handlers are
/// installed, so a signal right after the announcement stops it cleanly).
pub fn run_blocking(
    home: &Path,
    authority: AuthorityId,
    listen: SocketAddr,
    started: impl FnOnce(DeviceId, SocketAddr),
) -> Result<(), VaultNetError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| VaultNetError::Connect(e.to_string()))?;
    runtime.block_on(async {
        let server = StorageServer::start(home, authority, listen).await?;
        let stop = crate::signal::stop_requested();
        let addr = server.local_addr().unwrap_or(listen);
        started(server.device_id(), addr);
        stop.await;
        server.shutdown().await;
        Ok(())
    })
}

/// Runs `f` with a client connected to the storage peer, on a runtime of its own (for the
/// CLI, which works on a stopped device).
pub fn with_client_blocking<T>(
    key: &DeviceKey,
    storage: DeviceId,
    addr: SocketAddr,
    f: impl AsyncFnOnce(&VaultClient) -> Result<T, VaultNetError>,
) -> Result<T, VaultNetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| VaultNetError::Connect(e.to_string()))?;
    runtime.block_on(async {
        let client = VaultClient::connect(key, storage, addr).await?;
        let out = f(&client).await;
        client.close().await;
        out
    })
}
