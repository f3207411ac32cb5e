//! Blob transfer between members over the `tend/blob/1` ALPN: which blobs the reduced
//! state references but the store lacks, the server answering requests for them, and the
//! client that fetches, verifies against the CID and stores them.
//!
//! Wire: one bi-stream per blob. The requester writes one frame holding the CID's bytes;
//! the server answers with a 9-byte header frame (status, then the size as u64 big
//! endian) and, when found, the content in frames of at most [`CHUNK_BYTES`] that add up
//! to exactly that size. Frames are the sync protocol's (u32 big-endian length prefix).
//! Both sides bound a blob by their `max_blob_bytes`; the receiver refuses a larger
//! announcement before reading it, and stores nothing that does not hash to the CID.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use tend_core::{ContentId, MaintenanceState};
use tend_store::{Store, StoreError};

use crate::device::Device;
use crate::discovery::PeerAddr;
use crate::endpoint::{self, close_code, FrameError, BLOB_ALPN};
use crate::metrics::Metrics;
use crate::upgrade::artifact_cid;

/// Setting: the item blob settling waits for; the next round fetches it
/// ([`wanted`]).
pub const ITEM_BLOB_WANTED: &str = "settle.item_blob_wanted";

/// Setting: an item blob that no peer asked held ([`ITEM_BLOB_WANTED`]): settling takes
/// its fallback ([`tend_replica::Settlement::set_aside`]).
pub const ITEM_BLOB_UNAVAILABLE: &str = "settle.item_blob_unavailable";

/// The default largest blob a device serves or accepts: room for a snapshot blob that
/// carries a million live records and more (blobs stream to disk, never held whole).
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 4 << 30;
/// Largest content frame.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Longest request frame (a CID is 36 bytes).
const MAX_REQUEST_BYTES: usize = 128;

/// Response status codes (the first byte of the header frame).
pub mod status {
    /// The content follows.
    pub const FOUND: u8 = 0;
    /// The server does not hold the blob.
    pub const MISSING: u8 = 1;
    /// The blob is larger than the server serves.
    pub const TOO_LARGE: u8 = 2;
}

/// Why fetching a blob from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot reach the peer: {0}")]
    Connect(String),
    #[error("blob stream failed: {0}")]
    Stream(String),
    #[error("the peer does not hold blob {0}")]
    Missing(ContentId),
    #[error("blob {cid} is {size} bytes, over the limit of {max}")]
    TooLarge { cid: ContentId, size: u64, max: u64 },
    #[error("blob {cid} announced as {announced} bytes, the journal says {expected}")]
    WrongSize {
        cid: ContentId,
        announced: u64,
        expected: u64,
    },
    #[error("the peer sent bytes that do not match blob {0}")]
    Mismatch(ContentId),
    #[error("the peer broke the blob protocol: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BlobError {
    /// Whether the peer is to blame (demote and disconnect it).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(
            self,
            BlobError::Mismatch(_) | BlobError::Malformed(_) | BlobError::WrongSize { .. }
        )
    }

    /// The metrics label of a refused blob, if it is one.
    fn reject_label(&self) -> Option<&'static str> {
        match self {
            BlobError::Mismatch(_) => Some("mismatch"),
            BlobError::TooLarge { .. } | BlobError::WrongSize { .. } => Some("oversized"),
            BlobError::Malformed(_) => Some("malformed"),
            _ => None,
        }
    }
}

impl From<FrameError> for BlobError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Oversized { len, max } => {
                BlobError::Malformed(format!("frame of {len} bytes over {max}"))
            }
            other => BlobError::Stream(other.to_string()),
        }
    }
}

/// A blob the device needs, with its size when the journal states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub cid: ContentId,
    pub size: Option<u64>,
}

/// Blobs the reduced state references that the store lacks: every published upgrade's
/// artifact and the latest snapshot's blob, unless tombstoned, and the item blob settling
/// waits for.
pub fn wanted(store: &Store, state: &MaintenanceState) -> Result<Vec<Wanted>, StoreError> {
    let mut out = Vec::new();
    let referenced = state
        .upgrades
        .values()
        .map(|u| Wanted {
            cid: artifact_cid(&u.metadata.artifact_hash),
            size: Some(u.metadata.artifact_size),
        })
        .chain(state.latest_snapshot.as_ref().map(|s| Wanted {
            cid: s.snapshot.blob_cid,
            size: None,
        }));
    for w in referenced {
        if !state.tombstones.contains_key(&w.cid) && !store.has_blob(&w.cid)? {
            out.push(w);
        }
    }
    // The item blob settling waits for (`tend_replica::Settlement::awaiting_items`).
    let item_blob = store
        .get_setting::<String>(ITEM_BLOB_WANTED)?
        .and_then(|c| c.parse::<ContentId>().ok());
    if let Some(cid) = item_blob {
        if !store.has_blob(&cid)? {
            out.push(Wanted { cid, size: None });
        }
    }
    // Large application values: every readable value's blob (tombstoned or not: another
    // key may still name the same content).
    for (cid, len) in store.value_blobs(state.namespace)? {
        if !store.has_blob(&cid)? && !out.iter().any(|w| w.cid == cid) {
            out.push(Wanted {
                cid,
                size: Some(len),
            });
        }
    }
    Ok(out)
}

/// Writes one answer: the header, then the content in chunks.
pub async fn write_response(
    send: &mut SendStream,
    status: u8,
    size: u64,
    content: &[u8],
) -> Result<(), FrameError> {
    let mut header = [0u8; 9];
    header[0] = status;
    header[1..].copy_from_slice(&size.to_be_bytes());
    endpoint::write_frame(send, &header).await?;
    for chunk in content.chunks(CHUNK_BYTES) {
        endpoint::write_frame(send, chunk).await?;
    }
    Ok(())
}

/// Serves blob requests on a member's connection until the peer closes it.
pub async fn serve(device: Arc<Device>, conn: Connection, max_blob_bytes: u64) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let device = device.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&device, send, recv, max_blob_bytes).await {
                tracing::debug!("blob request failed: {e}");
            }
        });
    }
}

async fn answer(
    device: &Arc<Device>,
    mut send: SendStream,
    mut recv: RecvStream,
    max: u64,
) -> Result<(), FrameError> {
    let request = endpoint::read_frame(&mut recv, MAX_REQUEST_BYTES).await?;
    let Ok(cid) = ContentId::from_bytes(&request) else {
        // Not a CID we could hold: say missing rather than guess.
        write_response(&mut send, status::MISSING, 0, &[]).await?;
        let _ = send.finish();
        return Ok(());
    };
    // The blob goes out chunk by chunk as the store reads it, so serving a large snapshot
    // blob holds two frames, not the blob.
    let (size_tx, size_rx) = tokio::sync::oneshot::channel::<Option<u64>>();
    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let d = device.clone();
    tokio::task::spawn_blocking(move || {
        let Some(mut reader) = d.store().blob_reader(&cid).ok().flatten() else {
            let _ = size_tx.send(None);
            return;
        };
        let len = reader.len();
        if size_tx.send(Some(len)).is_err() || len > max {
            return;
        }
        loop {
            let mut frame = Vec::with_capacity(CHUNK_BYTES);
            match (&mut reader)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut frame)
            {
                Ok(0) => return,
                Ok(_) => {
                    if chunk_tx.blocking_send(frame).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Dropping the sender cuts the answer short; the peer checks the CID.
                    tracing::warn!("cannot read blob {cid} to serve it: {e}");
                    return;
                }
            }
        }
    });
    match size_rx.await.ok().flatten() {
        Some(size) if size > max => write_response(&mut send, status::TOO_LARGE, size, &[]).await?,
        Some(size) => {
            write_response(&mut send, status::FOUND, size, &[]).await?;
            let mut sent = 0u64;
            while let Some(frame) = chunk_rx.recv().await {
                sent += frame.len() as u64;
                endpoint::write_frame(&mut send, &frame).await?;
            }
            if sent != size {
                // Reset rather than finish, so the peer sees a broken answer at once.
                let _ = send.reset(0u32.into());
                return Ok(());
            }
        }
        None => write_response(&mut send, status::MISSING, 0, &[]).await?,
    }
    let _ = send.finish();
    // Keep the stream until the peer has read everything.
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
    Ok(())
}

/// Removes the [`ScratchBlob`] files that a process which held this store before left
/// behind (killed mid-way); the running process's own are its to remove.
pub(crate) fn remove_stale_scratch(store_path: &std::path::Path) {
    let (Some(dir), Some(stem)) = (store_path.parent(), store_path.file_stem()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let ours = std::process::id().to_string();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_stem() != Some(stem) {
            continue;
        }
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        let pid = ScratchKind::ALL
            .iter()
            .find_map(|k| ext.strip_prefix(k.name())?.strip_prefix('-'))
            .and_then(|rest| rest.split_once('-'))
            .filter(|(pid, n)| pid.parse::<u32>().is_ok() && n.parse::<u64>().is_ok())
            .map(|(pid, _)| pid);
        if pid.is_some_and(|pid| pid != ours) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!("removed {}, left by a stopped process", path.display()),
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// Why a blob is on its way into the store through a [`ScratchBlob`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScratchKind {
    /// Being built from the journal (`fleet::StoreJournal`, a snapshot blob).
    Built,
    /// Being fetched from a peer ([`request`]).
    Fetched,
}

impl ScratchKind {
    const ALL: [ScratchKind; 2] = [ScratchKind::Built, ScratchKind::Fetched];

    fn name(self) -> &'static str {
        match self {
            ScratchKind::Built => "blob",
            ScratchKind::Fetched => "fetch",
        }
    }
}

/// A blob on its way into the store: written to a scratch file beside the store while it
/// is hashed for its CID, then copied in ([`ScratchBlob::store_as`]), so a blob of
/// hundreds of megabytes is never held in memory and no store write transaction waits on
/// its producer. The file is named after the store file, the kind and this process
/// (`.KIND-PID-N`, which [`remove_stale_scratch`] recognises) and goes when this is dropped.
pub struct ScratchBlob {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hash: blake3::Hasher,
    len: u64,
}

impl ScratchBlob {
    /// Creates the scratch file beside `store`.
    pub fn create(store: &Store, kind: ScratchKind) -> Result<Self, StoreError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = store.path().with_extension(format!(
            "{}-{}-{}",
            kind.name(),
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hash: blake3::Hasher::new(),
            len: 0,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes the file and returns the CID of what was written, under `codec`.
    pub fn finish(&mut self, codec: u64) -> Result<ContentId, StoreError> {
        use std::io::Write;
        self.file.flush().map_err(|e| self.io(e))?;
        let hash = tend_core::Hash32(*self.hash.finalize().as_bytes());
        Ok(ContentId::from_blake3(codec, &hash))
    }

    /// Copies the blob into `store` under `cid` (checked against it again as it goes in).
    pub fn store_as(&self, store: &Store, cid: &ContentId) -> Result<(), StoreError> {
        let mut file = std::fs::File::open(&self.path).map_err(|e| self.io(e))?;
        let len = usize::try_from(self.len).map_err(|_| StoreError::Corrupt {
            path: store.path().to_owned(),
            detail: format!("blob {cid} is larger than this machine can address"),
        })?;
        store
            .put_blob_with(cid, len, |w| std::io::copy(&mut file, w).map(|_| ()))?
            .map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl std::io::Write for ScratchBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write_all(buf)?;
        self.hash.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for ScratchBlob {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Requests one blob on an open connection and streams it into a [`ScratchBlob`] beside
/// `store`, hashing it as it comes: a snapshot blob of a million live records (hundreds of
/// megabytes) is never held in memory. Returns it once it matches its CID.
pub async fn request(
    conn: &Connection,
    want: Wanted,
    max_blob_bytes: u64,
    store: &Store,
) -> Result<ScratchBlob, BlobError> {
    use std::io::Write;
    let cid = want.cid;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| BlobError::Stream(e.to_string()))?;
    endpoint::write_frame(&mut send, &cid.to_bytes()).await?;
    let _ = send.finish();
    let header = endpoint::read_frame(&mut recv, 9).await?;
    let Ok(header) = <[u8; 9]>::try_from(header.as_slice()) else {
        return Err(BlobError::Malformed("short header".into()));
    };
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(&header[1..]);
    let size = u64::from_be_bytes(size_bytes);
    match header[0] {
        status::FOUND => {}
        status::MISSING => return Err(BlobError::Missing(cid)),
        status::TOO_LARGE => {
            return Err(BlobError::TooLarge {
                cid,
                size,
                max: max_blob_bytes,
            })
        }
        other => return Err(BlobError::Malformed(format!("unknown status {other}"))),
    }
    if let Some(expected) = want.size.filter(|e| *e != size) {
        return Err(BlobError::WrongSize {
            cid,
            announced: size,
            expected,
        });
    }
    if size > max_blob_bytes {
        return Err(BlobError::TooLarge {
            cid,
            size,
            max: max_blob_bytes,
        });
    }
    let mut scratch = ScratchBlob::create(store, ScratchKind::Fetched)?;
    while scratch.len() < size {
        let chunk = endpoint::read_frame(&mut recv, CHUNK_BYTES).await?;
        if chunk.is_empty() || scratch.len() + chunk.len() as u64 > size {
            return Err(BlobError::Malformed("content frames do not add up".into()));
        }
        scratch
            .write_all(&chunk)
            .map_err(|e| BlobError::Store(scratch.io(e)))?;
    }
    if scratch.finish(cid.codec())? != cid {
        return Err(BlobError::Mismatch(cid));
    }
    Ok(scratch)
}

/// What fetching from one peer did.
#[derive(Debug, Default)]
pub struct FetchReport {
    /// Blobs verified and stored.
    pub fetched: Vec<ContentId>,
    /// Blobs the peer did not hold (or would not serve).
    pub missing: Vec<ContentId>,
    /// Why the peer is to blame, if it is: the caller demotes it.
    pub misbehaviour: Option<String>,
    /// Why the exchange stopped otherwise (unreachable peer, broken stream).
    pub error: Option<String>,
}

/// Fetches `wanted` from `peer` over one connection: each blob is verified against its
/// CID and stored with the CID's codec. A peer that sends a blob not matching its CID is
/// disconnected, and nothing more is asked of it.
pub async fn fetch(
    endpoint: &Endpoint,
    device: &Arc<Device>,
    metrics: &Metrics,
    peer: PeerAddr,
    wanted: &[Wanted],
    max_blob_bytes: u64,
    connect_timeout: Duration,
) -> FetchReport {
    let mut report = FetchReport::default();
    if wanted.is_empty() {
        return report;
    }
    let addr = match endpoint::endpoint_addr(peer.device, peer.addr) {
        Ok(a) => a,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    let conn = match tokio::time::timeout(connect_timeout, endpoint.connect(addr, BLOB_ALPN)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            report.error = Some(BlobError::Connect(e.to_string()).to_string());
            return report;
        }
        Err(_) => {
            report.error = Some(BlobError::Connect("timed out".into()).to_string());
            return report;
        }
    };
    for w in wanted {
        match request(&conn, *w, max_blob_bytes, device.store()).await {
            Ok(fetched) => {
                let d = device.clone();
                let cid = w.cid;
                let len = fetched.len();
                let stored =
                    tokio::task::spawn_blocking(move || fetched.store_as(d.store(), &cid)).await;
                match stored {
                    Ok(Ok(())) => {
                        metrics.blobs_fetched.inc();
                        metrics.blob_bytes_received.inc_by(len);
                        report.fetched.push(cid);
                    }
                    Ok(Err(e)) => report.error = Some(e.to_string()),
                    Err(e) => report.error = Some(e.to_string()),
                }
            }
            Err(BlobError::Missing(cid)) => report.missing.push(cid),
            Err(e) => {
                if let Some(label) = e.reject_label() {
                    metrics.reject_blob(label);
                }
                if e.is_misbehaviour() {
                    conn.close(
                        endpoint::code(close_code::MISBEHAVIOUR),
                        e.to_string().as_bytes(),
                    );
                    report.misbehaviour = Some(e.to_string());
                    return report;
                }
                if matches!(e, BlobError::TooLarge { .. }) {
                    report.missing.push(w.cid);
                    continue;
                }
                report.error = Some(e.to_string());
                break;
            }
        }
    }
    conn.close(endpoint::code(close_code::DONE), b"done");
    report
}
