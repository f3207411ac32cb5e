//! Export: streams the latest snapshot and the journal tail after it into an encrypted
//! archive. It never holds the snapshot blob whole: the store lends a reader over its chunks,
//! and the blob is checked in one pass without decoding its item list, then read again as it
//! is written. The tail then goes out from one store scan in chunks, one at a time.
//! Nothing else it holds grows with the journal.
//!
//! A running device keeps writing while it exports (sync, `tend fact add`). The store
//! gives no read view spanning calls: the snapshot part (latest completion, anchor) is
//! read in one read transaction, the tail in another taken later, and export checks while
//! the tail streams that the two still fit (see [`export`]); if not, [`export_file`]
//! starts over.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tend_core::journal::DigestBuilder;
use tend_core::maintenance::{CertifiedBlob, MaintenanceFact};
use tend_core::{ContentId, Epoch, FactId, JournalNamespace, MaintenanceState, Payload};
use tend_snapshot::blob::{stream_blob_facts, BlobTrust};
use tend_store::{BlobReader, Store, StoreError};

use crate::error::BackupError;
use crate::format::{
    frame, member, Header, Manifest, ManifestSnapshot, ManifestTail, MemberHash,
    ARCHIVE_FORMAT_NAME, ARCHIVE_FORMAT_VERSION, FRAME_LEN, MIN_CHUNK_BYTES, TAIL_CHUNK_BYTES,
};
use crate::keys::Encryption;

/// How far an operation has come, for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Units done (facts for export, archive bytes for verify and restore).
    pub done: u64,
    /// Units in all (0 when unknown).
    pub total: u64,
}

/// Options of [`export`].
pub struct ExportOptions<'a> {
    pub encryption: &'a Encryption,
    /// Upper bound of a tail chunk member; clamped to at least [`MIN_CHUNK_BYTES`].
    pub chunk_bytes: usize,
    /// Seconds since the Unix epoch, recorded in the manifest (the library reads no clock).
    pub created_at: Option<u64>,
    /// Called as facts are written.
    pub progress: Option<&'a dyn Fn(Progress)>,
}

impl<'a> ExportOptions<'a> {
    /// Default options for `encryption`.
    pub fn new(encryption: &'a Encryption) -> Self {
        Self {
            encryption,
            chunk_bytes: TAIL_CHUNK_BYTES,
            created_at: None,
            progress: None,
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub namespace: String,
    /// The snapshot epoch E, if the journal had a completed snapshot.
    pub snapshot_epoch: Option<u64>,
    pub blob_bytes: u64,
    /// Maintenance and authority facts the blob carries.
    pub maintenance_facts: u64,
    pub tail_facts: u64,
    pub tail_chunks: u64,
    /// The largest tail chunk: what export held of the tail in memory at most.
    pub largest_chunk_bytes: u64,
    /// Bytes of the encrypted archive.
    pub archive_bytes: u64,
}

/// How many times [`export_file`] writes the archive when the journal keeps changing
/// under it in a way one archive cannot hold ([`BackupError::Concurrent`]: a newer
/// snapshot completed, or an anchor fact was dropped, between export's reads). Each is
/// rare (a snapshot ceremony, a retroactive membership change); three in a row mean the
/// device is busy with maintenance, and the user is told to try again.
pub const EXPORT_ATTEMPTS: u32 = 3;

/// Exports journal `ns` of `store` to `path`, which must not exist. The archive is
/// written next to it under a temporary name and renamed at the end, so a failure
/// leaves no file at `path`. The store may be written meanwhile (a running device):
/// an export that [`export`] finds inconsistent is discarded and written again, up to
/// [`EXPORT_ATTEMPTS`] times.
pub fn export_file(
    store: &Store,
    ns: JournalNamespace,
    path: &Path,
    opts: &ExportOptions<'_>,
) -> Result<ExportReport, BackupError> {
    export_file_between(store, ns, path, opts, &mut || {})
}

/// [`export_file`], running `before_tail` in each attempt between the snapshot part and
/// the tail scan (where tests put a concurrent write).
fn export_file_between(
    store: &Store,
    ns: JournalNamespace,
    path: &Path,
    opts: &ExportOptions<'_>,
    before_tail: &mut dyn FnMut(),
) -> Result<ExportReport, BackupError> {
    let mut attempt = 1;
    loop {
        match export_file_once(store, ns, path, opts, before_tail) {
            Err(BackupError::Concurrent(_)) if attempt < EXPORT_ATTEMPTS => attempt += 1,
            r => return r,
        }
    }
}

fn export_file_once(
    store: &Store,
    ns: JournalNamespace,
    path: &Path,
    opts: &ExportOptions<'_>,
    before_tail: &mut dyn FnMut(),
) -> Result<ExportReport, BackupError> {
    if path.exists() {
        return Err(BackupError::OutputExists(path.to_owned()));
    }
    let tmp = sibling(path, "partial");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| BackupError::io(&tmp, e))?;
    let result = (|| {
        let (report, out) = export_between(store, ns, BufWriter::new(file), opts, before_tail)?;
        let file = out
            .into_inner()
            .map_err(|e| BackupError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| BackupError::io(&tmp, e))?;
        publish(&tmp, path)?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Gives the finished archive `tmp` its name `path` unless something took that name
/// meanwhile (another export, possibly in the same running device): a hard link fails if
/// `path` exists, where a rename would replace it. Where hard links are not supported,
/// a check and a rename, which leaves a short window.
fn publish(tmp: &Path, path: &Path) -> Result<(), BackupError> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(BackupError::OutputExists(path.to_owned()))
        }
        Err(_) => {
            if path.exists() {
                return Err(BackupError::OutputExists(path.to_owned()));
            }
            std::fs::rename(tmp, path).map_err(|e| BackupError::io(path, e))
        }
    }
}

/// A path next to `path` that shares its directory (so a rename is atomic). Unique per
/// call within the process too: a running device may export twice at once.
pub(crate) fn sibling(path: &Path, what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(
        "{}{}-{n}",
        sibling_prefix(path, what),
        std::process::id()
    ))
}

/// The bytes written so far of an archive on its way to `out` (under a temporary name
/// beside it, [`export_file`]), by whichever process writes it: what a CLI shows while a
/// running device exports for it. `None` before the first byte and after the rename.
pub fn bytes_written_towards(out: &Path) -> Option<u64> {
    let prefix = sibling_prefix(out, "partial");
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .max()
}

/// What the names [`sibling`] makes for `path` begin with: `.NAME.WHAT-`, followed by
/// `PID-N`.
pub(crate) fn sibling_prefix(path: &Path, what: &str) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tend-backup".into());
    format!(".{name}.{what}-")
}

/// Exports journal `ns` of `store` into `out` and returns `out` when the archive is
/// complete.
///
/// With a completed snapshot the archive holds its completion, the blob and the facts at
/// and above its epoch E; without one, the whole journal. Facts are streamed from one
/// store scan in `(epoch, id)` order into chunks of at most `opts.chunk_bytes`.
///
/// The store may be written meanwhile. The snapshot part (the latest completion S and
/// the anchor) comes from one read transaction, the blob from another (it is immutable:
/// addressed by its CID), and the tail from one scan, a single later read transaction.
/// The manifest's counts and digest are computed from the facts as they are written, so
/// they match the archive whatever happened. What a reader also checks across the two
/// views is checked here as the tail streams: every anchor fact is in the tail (a
/// membership change may have dropped one meanwhile), and the tail holds no completion
/// of a snapshot newer than S (otherwise the replayed journal's latest snapshot would not
/// be S). Facts that merely arrived meanwhile are in the tail, admitted by the store
/// against the same state a reader rebuilds, which is what a stopped device's export at
/// that moment would write. Either failed check gives [`BackupError::Concurrent`] and a
/// partial archive in `out`: [`export_file`] discards it and starts over.
pub fn export<W: Write>(
    store: &Store,
    ns: JournalNamespace,
    out: W,
    opts: &ExportOptions<'_>,
) -> Result<(ExportReport, W), BackupError> {
    export_between(store, ns, out, opts, &mut || {})
}

/// [`export`], running `before_tail` after the snapshot part is written and before the
/// tail scan starts.
fn export_between<W: Write>(
    store: &Store,
    ns: JournalNamespace,
    out: W,
    opts: &ExportOptions<'_>,
    before_tail: &mut dyn FnMut(),
) -> Result<(ExportReport, W), BackupError> {
    if store.stats(ns)?.is_none() {
        return Err(BackupError::EmptyJournal(ns));
    }
    let state = store.maintenance_state(ns)?;
    let snap = snapshot_parts(store, ns, &state)?;
    let chunk_bytes = opts.chunk_bytes.max(MIN_CHUNK_BYTES);

    let counting = CountingWriter { inner: out, n: 0 };
    let age = opts.encryption.wrap(counting)?;
    let zstd = zstd::stream::write::Encoder::new(age, 3).map_err(damaged_out)?;
    let mut w = TarWriter {
        tar: tar::Builder::new(zstd),
        members: Vec::new(),
        mtime: opts.created_at.unwrap_or(0),
    };

    let header = Header {
        format: ARCHIVE_FORMAT_NAME.into(),
        version: ARCHIVE_FORMAT_VERSION,
        namespace: ns.to_string(),
        has_snapshot: snap.is_some(),
        written_by: concat!("tend ", env!("CARGO_PKG_VERSION")).into(),
    };
    w.append(member::HEADER, &to_json(&header))?;

    let mut report = ExportReport {
        namespace: ns.to_string(),
        snapshot_epoch: None,
        blob_bytes: 0,
        maintenance_facts: 0,
        tail_facts: 0,
        tail_chunks: 0,
        largest_chunk_bytes: 0,
        archive_bytes: 0,
    };
    let mut manifest_snapshot = None;
    let mut anchor_ids = HashSet::new();
    let from = match &snap {
        Some(s) => {
            let counts = match store.with_blob(&s.cid, |blob| write_snapshot(&mut w, s, blob))? {
                Some(counts) => counts?,
                None => return Err(blob_gone(store, ns, s)?),
            };
            anchor_ids.clone_from(&s.anchor_ids);
            let (covered_facts, maintenance_facts, blob_bytes) = counts;
            report.snapshot_epoch = Some(s.epoch.0);
            report.blob_bytes = blob_bytes;
            report.maintenance_facts = maintenance_facts;
            manifest_snapshot = Some(ManifestSnapshot {
                epoch: s.epoch.0,
                blob_cid: s.blob_cid.clone(),
                digest: s.digest.clone(),
                completion_id: s.completion_id.clone(),
                completion_epoch: s.completion_epoch,
                covered_facts,
                maintenance_facts,
            });
            s.epoch
        }
        None => Epoch::ZERO,
    };
    let snap_epoch = snap.as_ref().map(|s| s.epoch);
    drop(snap);

    // The total is only for the progress bar: a keys-only scan, cheap next to the export.
    let total = match opts.progress {
        Some(_) => store.items(ns, from..)?.count() as u64,
        None => 0,
    };
    before_tail();
    // The scan's read transaction starts here; the completions looked up after it
    // include every one it can see (the maintenance table only grows, but for a
    // membership change dropping facts, which the anchor check covers).
    let tail = store.scan(ns, from..)?;
    let newer = newer_completions(store, ns, snap_epoch)?;
    let mut digest = DigestBuilder::whole(ns);
    let mut chunk: Vec<u8> = Vec::with_capacity(chunk_bytes);
    let (mut min_epoch, mut max_epoch) = (None, None);
    for stored in tail {
        let stored = stored?;
        if newer.contains(&stored.id) {
            return Err(BackupError::Concurrent(
                "a newer snapshot completed while the archive was written".into(),
            ));
        }
        anchor_ids.remove(&stored.id);
        if chunk.len() + FRAME_LEN + stored.bytes().len() > chunk_bytes {
            w.append(&member::tail(report.tail_chunks), &chunk)?;
            report.largest_chunk_bytes = report.largest_chunk_bytes.max(chunk.len() as u64);
            report.tail_chunks += 1;
            chunk.clear();
        }
        frame(&mut chunk, stored.bytes());
        digest.push(stored.epoch, stored.id);
        min_epoch.get_or_insert(stored.epoch.0);
        max_epoch = Some(stored.epoch.0);
        report.tail_facts += 1;
        if let Some(p) = opts.progress {
            if report.tail_facts.is_multiple_of(4096) {
                p(Progress {
                    done: report.tail_facts,
                    total,
                });
            }
        }
    }
    if !chunk.is_empty() {
        w.append(&member::tail(report.tail_chunks), &chunk)?;
        report.largest_chunk_bytes = report.largest_chunk_bytes.max(chunk.len() as u64);
        report.tail_chunks += 1;
    }
    drop(chunk);
    if !anchor_ids.is_empty() {
        return Err(BackupError::Concurrent(
            "a membership change dropped facts of the snapshot's anchor while the archive was written"
                .into(),
        ));
    }

    let manifest = Manifest {
        format: ARCHIVE_FORMAT_NAME.into(),
        version: ARCHIVE_FORMAT_VERSION,
        namespace: ns.to_string(),
        authority: match ns {
            JournalNamespace::Authority(a) => Some(a.to_string()),
            JournalNamespace::Context(_) => None,
        },
        snapshot: manifest_snapshot,
        tail: ManifestTail {
            from_epoch: from.0,
            min_epoch,
            max_epoch,
            facts: report.tail_facts,
            chunks: report.tail_chunks,
            digest: digest.finish().to_string(),
        },
        members: std::mem::take(&mut w.members),
        created_at: opts.created_at,
    };
    w.append(member::MANIFEST, &to_json(&manifest))?;
    let zstd = w.tar.into_inner().map_err(damaged_out)?;
    let age = zstd.finish().map_err(damaged_out)?;
    let counting = age.finish().map_err(damaged_out)?;
    report.archive_bytes = counting.n;
    if let Some(p) = opts.progress {
        p(Progress {
            done: report.tail_facts,
            total,
        });
    }
    Ok((report, counting.inner))
}

/// What export needs of the latest snapshot (the blob is read while it is written).
struct SnapshotParts {
    epoch: Epoch,
    anchor: Vec<u8>,
    /// The anchor's fact ids (the completion's included): the tail must hold them all.
    anchor_ids: HashSet<FactId>,
    /// The completion's fact id.
    completion: FactId,
    cid: ContentId,
    /// The blob as the verified completion certifies it.
    certified: CertifiedBlob,
    blob_cid: String,
    digest: String,
    completion_id: String,
    completion_epoch: u64,
}

/// Writes the prefix, anchor and blob members from the blob the store lends; returns the
/// blob's item count, fact count and size.
fn write_snapshot<W: Write>(
    w: &mut TarWriter<W>,
    s: &SnapshotParts,
    blob: &mut BlobReader,
) -> Result<(u64, u64, u64), BackupError> {
    // One pass over the blob checks it once more (its structure, its state digest, that it
    // hashes to the certified CID; the store checked the CID too), so a damaged blob
    // fails here rather than at restore time, and yields its state facts for the prefix
    // member: they come after the items inside the blob, and a reader needs them first
    // (the membership chain gives the group key). The completion's threshold signature
    // vouches for every fact, so none is verified again (a million Ed25519 checks took
    // most of an export), and the live application facts stream by in batches, never
    // held: the blob itself carries them.
    let summary = stream_blob_facts(
        &mut *blob,
        BlobTrust::Certified(&s.certified),
        10_000,
        |_| Ok::<(), BackupError>(()),
    )?;
    let mut prefix = Vec::new();
    for f in &summary.facts {
        frame(&mut prefix, f.bytes());
    }
    w.append(member::PREFIX, &prefix)?;
    w.append(member::ANCHOR, &s.anchor)?;
    // The second pass, in the same read transaction, straight into the archive.
    blob.rewind();
    let len = blob.len();
    w.append_reader(member::BLOB, len, blob)?;
    Ok((summary.items, summary.fact_count, len))
}

fn snapshot_parts(
    store: &Store,
    ns: JournalNamespace,
    state: &MaintenanceState,
) -> Result<Option<SnapshotParts>, BackupError> {
    let Some(latest) = &state.latest_snapshot else {
        return Ok(None);
    };
    let e = latest.snapshot.epoch;
    // The completion and the state facts between E and it (membership changes, admin
    // replacements): a reader needs them to know the group key the completion is signed
    // with before it reads the tail. They are few: the maintenance table holds no
    // application facts.
    let mut state_facts = Vec::new();
    let mut completion = None;
    for stored in store.scan_maintenance(ns)? {
        let stored = stored?;
        if stored.epoch < e {
            continue;
        }
        if stored.id == latest.fact_id {
            completion = Some(stored);
            break;
        }
        state_facts.push(stored);
    }
    let completion = completion.ok_or_else(|| {
        BackupError::Store(StoreError::Corrupt {
            path: store.path().to_owned(),
            detail: format!("the completion fact {} is not stored", latest.fact_id),
        })
    })?;
    let mut anchor = Vec::new();
    let mut anchor_ids = HashSet::new();
    for f in state_facts.iter().chain(std::iter::once(&completion)) {
        frame(&mut anchor, f.bytes());
        anchor_ids.insert(f.id);
    }
    let cid = latest.snapshot.blob_cid;
    let parts = SnapshotParts {
        epoch: e,
        anchor,
        anchor_ids,
        completion: completion.id,
        cid,
        certified: latest.certified,
        blob_cid: cid.to_string(),
        digest: latest.snapshot.digest.to_string(),
        completion_id: completion.id.to_string(),
        completion_epoch: completion.epoch.0,
    };
    // Missing is found before anything is written, not half way through the archive.
    if !store.has_blob(&cid)? {
        return Err(blob_gone(store, ns, &parts)?);
    }
    Ok(Some(parts))
}

/// The error for a snapshot blob the store does not hold: [`BackupError::Concurrent`] if
/// the snapshot is no longer the latest (GC removed the blob of a superseded snapshot
/// while a running device exported), [`BackupError::BlobMissing`] otherwise.
fn blob_gone(
    store: &Store,
    ns: JournalNamespace,
    s: &SnapshotParts,
) -> Result<BackupError, BackupError> {
    let latest = store
        .maintenance_state(ns)?
        .latest_snapshot
        .map(|l| l.fact_id);
    Ok(if latest == Some(s.completion) {
        BackupError::BlobMissing(s.blob_cid.clone())
    } else {
        BackupError::Concurrent(
            "a newer snapshot completed and its predecessor was collected".into(),
        )
    })
}

/// The ids of stored completions of a snapshot newer than `than` (any, without one) that
/// the reducer takes (not among the facts it ignores, e.g. a bad threshold signature).
/// If the tail holds one, a reader replaying it would end on another latest snapshot
/// than the archive's. Only facts at or above `than` are decoded: a completion the
/// store admitted after the archive's snapshot is at or above its epoch, older ones are
/// late; they are the few maintenance facts since the latest snapshot.
fn newer_completions(
    store: &Store,
    ns: JournalNamespace,
    than: Option<Epoch>,
) -> Result<HashSet<FactId>, BackupError> {
    let floor = than.unwrap_or(Epoch::ZERO);
    let mut out = HashSet::new();
    for stored in store.scan_maintenance(ns)? {
        let stored = stored?;
        if stored.epoch < floor {
            continue;
        }
        let fact = stored.verify().map_err(|source| {
            BackupError::Store(StoreError::FactCorrupt {
                path: store.path().to_owned(),
                source,
            })
        })?;
        if let Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) = fact.payload() {
            if than.is_none_or(|e| c.snapshot.epoch > e) {
                out.insert(stored.id);
            }
        }
    }
    if !out.is_empty() {
        let ignored = store.maintenance_state(ns)?.ignored;
        out.retain(|id| !ignored.contains(id));
    }
    Ok(out)
}

struct TarWriter<W: Write> {
    tar: tar::Builder<W>,
    members: Vec<MemberHash>,
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    /// Appends a regular-file member and records its hash for the manifest.
    fn append(&mut self, name: &str, data: &[u8]) -> Result<(), BackupError> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(self.mtime);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(damaged_out)?;
        self.members.push(MemberHash {
            name: name.into(),
            size: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
        });
        Ok(())
    }
}

impl<W: Write> TarWriter<W> {
    /// Appends a regular-file member of `size` bytes read from `data`, hashing it as it goes.
    fn append_reader(&mut self, name: &str, size: u64, data: impl Read) -> Result<(), BackupError> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(self.mtime);
        let mut src = HashingReader::new(data.take(size));
        self.tar
            .append_data(&mut h, name, &mut src)
            .map_err(damaged_out)?;
        if src.n != size {
            // tar would have written a member shorter than its header: the archive is broken.
            return Err(damaged_out(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("member {name}: {} of {size} bytes could be read", src.n),
            )));
        }
        self.members.push(src.member(name));
        Ok(())
    }
}

/// Hashes and counts what passes through: a member as export writes it or a reader
/// reads it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    /// Bytes read so far.
    pub(crate) n: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            n: 0,
        }
    }

    /// The manifest entry of what was read so far, under `name`.
    pub(crate) fn member(&self, name: &str) -> MemberHash {
        MemberHash {
            name: name.into(),
            size: self.n,
            blake3: self.hasher.finalize().to_hex().to_string(),
        }
    }

    /// Drains what the consumer left unread, then returns the entry (unnamed).
    pub(crate) fn finish(mut self) -> io::Result<MemberHash> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.member(""))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    // Our header and manifest are plain structs of strings and integers.
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn damaged_out(e: io::Error) -> BackupError {
    BackupError::io("archive output", e)
}

/// Counts bytes written, so the report can say how large the archive is.
struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_of_an_archive_on_its_way_are_read_from_its_temporary_sibling() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.tend");
        assert_eq!(bytes_written_towards(&out), None);
        let tmp = sibling(&out, "partial");
        std::fs::write(&tmp, [7u8; 1000]).unwrap();
        // Another archive's temporary file beside it is not this one's.
        std::fs::write(sibling(&dir.path().join("b.tend"), "partial"), [7u8; 5000]).unwrap();
        assert_eq!(bytes_written_towards(&out), Some(1000));
        std::fs::rename(&tmp, &out).unwrap();
        assert_eq!(bytes_written_towards(&out), None);
    }
    use std::sync::Arc;
    use tend_core::{UnsignedFact, VerifiedFact};
    use tend_node::fleet::LocalFleet;
    use tend_node::Device;

    fn add_notes(d: &Device, n: usize, epoch: u64) {
        let facts: Vec<_> = (0..n)
            .map(|i| {
                UnsignedFact {
                    namespace: d.namespace(),
                    epoch: Epoch(epoch),
                    payload: Payload::Application {
                        kind: "note".into(),
                        data: format!("{epoch}-{i}").into_bytes(),
                    },
                }
                .sign(d.key().signing_key())
            })
            .collect();
        assert!(d.store().insert_batch(&facts).unwrap().rejected.is_empty());
    }

    fn snapshot(d: Device, target: u64) -> Device {
        let mut fleet = LocalFleet::new(vec![Arc::new(d)]);
        fleet
            .snapshot(0, Epoch(target), &mut rand::rngs::OsRng)
            .expect("snapshot ceremony");
        let d = fleet.into_devices().pop().unwrap();
        Arc::try_unwrap(d).ok().expect("no other handle")
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// A home `a` with a snapshot at 3 and facts after it, and what a running device
    /// of it would store next: a snapshot at 6 (its facts and blob, made on a copy).
    fn home_and_a_newer_snapshot(dir: &Path) -> (PathBuf, Vec<VerifiedFact>, Vec<u8>) {
        let a = dir.join("a");
        let d = Device::init(&a, &mut rand::rngs::OsRng).unwrap();
        add_notes(&d, 50, 1);
        let d = snapshot(d, 3);
        add_notes(&d, 50, 4);
        drop(d);
        let b = dir.join("b");
        copy_dir(&a, &b);
        let later = snapshot(Device::open(&b).unwrap(), 6);
        let ns = later.namespace();
        // The copy's facts the original lacks.
        let original = Device::open(&a).unwrap();
        let mut new_facts = Vec::new();
        for f in later.store().scan(ns, ..).unwrap() {
            let f = f.unwrap();
            if !original.store().contains(ns, f.epoch, &f.id).unwrap() {
                new_facts.push(f.verify().unwrap());
            }
        }
        let latest = later
            .store()
            .maintenance_state(ns)
            .unwrap()
            .latest_snapshot
            .unwrap();
        assert_eq!(latest.snapshot.epoch, Epoch(6));
        let blob = later
            .store()
            .get_blob(&latest.snapshot.blob_cid)
            .unwrap()
            .unwrap();
        (a, new_facts, blob)
    }

    #[test]
    fn a_snapshot_completed_during_the_export_is_caught_and_the_export_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (a, new_facts, blob) = home_and_a_newer_snapshot(dir.path());
        let d = Device::open(&a).unwrap();
        let ns = d.namespace();
        let store = d.store();
        let (enc, dec) = {
            let id = age::x25519::Identity::generate();
            (
                Encryption::Recipients(vec![id.to_public()]),
                crate::Decryption::Identities(vec![id]),
            )
        };
        let opts = ExportOptions::new(&enc);
        // The newer snapshot lands after export read the snapshot at 3 and before it
        // scans the tail, as sync would bring it to a running device.
        let mut landed = false;
        let mut land = || {
            if !landed {
                landed = true;
                store
                    .put_blob(tend_core::ids::CODEC_DAG_CBOR, &blob)
                    .unwrap();
                assert!(store.insert_batch(&new_facts).unwrap().rejected.is_empty());
            }
        };
        let one = export_between(store, ns, Vec::new(), &opts, &mut land);
        assert!(
            matches!(one, Err(BackupError::Concurrent(_))),
            "{:?}",
            one.map(|(r, _)| r)
        );
        drop(d);

        // Again from the start on a fresh copy, through export_file: the second attempt
        // takes the snapshot at 6, and the archive verifies.
        let dir2 = tempfile::tempdir().unwrap();
        let (a, new_facts, blob) = home_and_a_newer_snapshot(dir2.path());
        let d = Device::open(&a).unwrap();
        let (ns, store) = (d.namespace(), d.store());
        let mut landed = false;
        let mut land = || {
            if !landed {
                landed = true;
                store
                    .put_blob(tend_core::ids::CODEC_DAG_CBOR, &blob)
                    .unwrap();
                assert!(store.insert_batch(&new_facts).unwrap().rejected.is_empty());
            }
        };
        let out = dir2.path().join("b.age");
        let report = export_file_between(store, ns, &out, &opts, &mut land).unwrap();
        // (Without the check, this archive of the snapshot at 3 with the completion at 6
        // in its tail is refused: its replayed journal ends on another snapshot.)
        let v = crate::verify_file(&out, &dec, None).unwrap();
        assert_eq!(report.snapshot_epoch, Some(6));
        assert_eq!(v.snapshot_epoch, Some(6));
        assert_eq!(v.tail_facts, report.tail_facts);
    }
}
