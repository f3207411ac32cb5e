//! Export: streams the latest snapshot and the journal tail after it into an encrypted
//! archive. It never holds the snapshot blob whole: the store lends a reader over its chunks,
//! and the blob is checked in one pass without decoding its item list, then read again as it
//! is written. The tail then goes out from one store scan in chunks, one at a time.
//! Nothing else it holds grows with the journal.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tend_core::journal::DigestBuilder;
use tend_core::{ContentId, Epoch, JournalNamespace, MaintenanceState};
use tend_snapshot::blob::read_blob;
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// Exports journal `ns` of `store` to `path`, which must not exist. The archive is
/// written next to it under a temporary name and renamed at the end, so a failure
/// leaves no file at `path`.
pub fn export_file(
    store: &Store,
    ns: JournalNamespace,
    path: &Path,
    opts: &ExportOptions<'_>,
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
        let (report, out) = export(store, ns, BufWriter::new(file), opts)?;
        let file = out
            .into_inner()
            .map_err(|e| BackupError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| BackupError::io(&tmp, e))?;
        if path.exists() {
            return Err(BackupError::OutputExists(path.to_owned()));
        }
        std::fs::rename(&tmp, path).map_err(|e| BackupError::io(path, e))?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A path next to `path` that shares its directory (so a rename is atomic).
pub(crate) fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tend-backup".into());
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

/// Exports journal `ns` of `store` into `out` and returns `out` when the archive is
/// complete.
///
/// With a completed snapshot the archive holds its completion, the blob and the facts at
/// and above its epoch E; without one, the whole journal. Facts are streamed from one
/// store scan in `(epoch, id)` order into chunks of at most `opts.chunk_bytes`.
pub fn export<W: Write>(
    store: &Store,
    ns: JournalNamespace,
    out: W,
    opts: &ExportOptions<'_>,
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
    let from = match &snap {
        Some(s) => {
            let counts = store
                .with_blob(&s.cid, |blob| write_snapshot(&mut w, s, blob))?
                .ok_or_else(|| BackupError::BlobMissing(s.blob_cid.clone()))??;
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
    drop(snap);

    // The total is only for the progress bar: a keys-only scan, cheap next to the export.
    let total = match opts.progress {
        Some(_) => store.items(ns, from..)?.count() as u64,
        None => 0,
    };
    let mut digest = DigestBuilder::whole(ns);
    let mut chunk: Vec<u8> = Vec::with_capacity(chunk_bytes);
    let (mut min_epoch, mut max_epoch) = (None, None);
    for stored in store.scan(ns, from..)? {
        let stored = stored?;
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
    cid: ContentId,
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
    // One pass over the blob checks it once more (its structure, its facts verify, its
    // state digest holds; the store checked the CID), so a damaged blob fails here rather
    // than at restore time, and yields its facts for the prefix member: they come after
    // the items inside the blob, and a reader needs them first to check the blob in one
    // pass. The item list is only counted, never decoded into memory. (That each fact is
    // among the items needs the facts ahead; the reader checks it.)
    let summary = read_blob(&mut *blob, None).map_err(tend_snapshot::HydrateError::from)?;
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
    Ok((summary.items, summary.facts.len() as u64, len))
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
    for f in state_facts.iter().chain(std::iter::once(&completion)) {
        frame(&mut anchor, f.bytes());
    }
    let cid = latest.snapshot.blob_cid;
    // Missing is found before anything is written, not half way through the archive.
    if !store.has_blob(&cid)? {
        return Err(BackupError::BlobMissing(cid.to_string()));
    }
    Ok(Some(SnapshotParts {
        epoch: e,
        anchor,
        cid,
        blob_cid: cid.to_string(),
        digest: latest.snapshot.digest.to_string(),
        completion_id: completion.id.to_string(),
        completion_epoch: completion.epoch.0,
    }))
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
        let mut src = HashingReader {
            inner: data.take(size),
            hasher: blake3::Hasher::new(),
            n: 0,
        };
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
        self.members.push(MemberHash {
            name: name.into(),
            size,
            blake3: src.hasher.finalize().to_hex().to_string(),
        });
        Ok(())
    }
}

/// Hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    n: u64,
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
