//! The content-addressed blob store: blobs keyed by their CID, kept in fixed-size chunks and
//! checked against the CID on every read.
//!
//! Layout (store format 2):
//! - `blob_index`: CID bytes -> `(length, chunk size)`. A blob exists exactly when its index
//!   entry does; the entry is written in the same transaction as the chunks, last.
//! - `blob_chunks`: `(CID bytes, chunk number)` -> at most [`BLOB_CHUNK_BYTES`] bytes. Every
//!   chunk but the last is full.
//!
//! Why chunks: redb keeps a value in one page whose size is rounded up to a power of two, read
//! and written whole. A 19 MiB snapshot blob kept as one value is a 32 MiB page, held in
//! memory by anything that touches it (export, restore, the integrity check on open) and
//! wasting 13 MiB on disk. In chunks, a read or a write holds one chunk at a time.

use std::io::{self, Read, Write};
use std::sync::MutexGuard;

use redb::{ReadOnlyTable, ReadableTable, Table, WriteTransaction};
use tend_core::hashing::BufferedHasher;
use tend_core::ids::{Hash32, CODEC_DAG_CBOR, CODEC_RAW};
use tend_core::ContentId;

use crate::blob_refs::{FactTables, RefCursor, BLOB_REFS, BY_REFERENCE};
use crate::codec::FactKey;
use crate::error::StoreError;
use crate::store::{Store, WriterCache, AUTHOR_BY_NO, BLOB_CHUNKS, BLOB_INDEX, FACTS, MAINT};

/// Bytes per blob chunk: 256 KiB less 256 bytes of room for redb's leaf header and the key
/// (about 53 bytes), so a chunk fills a 256 KiB page exactly instead of spilling into the next
/// power of two (a 512 KiB page). 256 KiB rather than 1 MiB: a reader or writer holds one chunk
/// page at a time, the last chunk of a blob wastes less than one chunk on disk, and it matches
/// the content frames of `tend/blob/1` (at most 256 KiB); the cost, one 41-byte key and one
/// B-tree entry per chunk, is 0.02% of the blob. The size is recorded in each blob's index
/// entry, so a later release may change it without migrating stored blobs.
pub const BLOB_CHUNK_BYTES: usize = 256 * 1024 - 256;

/// The key of chunk `n` of the blob whose CID bytes are `cid`.
pub(crate) type ChunkKey<'a> = (&'a [u8], u32);

fn check_codec(store: &Store, codec: u64) -> Result<(), StoreError> {
    if codec != CODEC_RAW && codec != CODEC_DAG_CBOR {
        return Err(StoreError::UnsupportedCodec {
            path: store.path.clone(),
            codec,
        });
    }
    Ok(())
}

/// Whether the BLAKE3 digest of a blob's bytes is the one its CID names.
pub(crate) fn cid_matches(cid: &ContentId, hasher: &BufferedHasher) -> bool {
    ContentId::from_blake3(cid.codec(), &Hash32::from(hasher.finalize())) == *cid
}

/// How many chunks of `chunk` bytes a blob of `len` bytes has, if that is representable.
fn chunk_count(len: u64, chunk: u32) -> Option<u32> {
    if chunk == 0 {
        return None;
    }
    u32::try_from(len.div_ceil(u64::from(chunk))).ok()
}

/// Removes blob `key` (index entry and every chunk) inside `tx`; returns its length if it
/// was stored.
pub(crate) fn remove_blob_in(
    store: &Store,
    tx: &WriteTransaction,
    key: &[u8],
) -> Result<Option<u64>, StoreError> {
    let mut index = tx.open_table(BLOB_INDEX).map_err(|e| store.err(e))?;
    let Some((len, _)) = index
        .remove(key)
        .map_err(|e| store.err(e))?
        .map(|g| g.value())
    else {
        return Ok(None);
    };
    let mut chunks = tx.open_table(BLOB_CHUNKS).map_err(|e| store.err(e))?;
    // Every chunk number, not only the ones the length implies: a damaged index entry must
    // not leave chunks behind.
    chunks
        .retain_in::<ChunkKey, _>((key, 0)..=(key, u32::MAX), |_, _| false)
        .map_err(|e| store.err(e))?;
    // A blob kept by reference has a recipe instead of chunks; its facts stay.
    tx.open_table(BLOB_REFS)
        .map_err(|e| store.err(e))?
        .retain_in::<ChunkKey, _>((key, 0)..=(key, u32::MAX), |_, _| false)
        .map_err(|e| store.err(e))?;
    Ok(Some(len))
}

/// Writes `bytes` as blob `key` into `tx` in one go (the index entry last). Used by the
/// format 1 migration, which holds each old blob in its own value anyway.
pub(crate) fn insert_blob_in(
    store: &Store,
    index: &mut Table<&'static [u8], (u64, u32)>,
    chunks: &mut Table<ChunkKey<'static>, &'static [u8]>,
    key: &[u8],
    bytes: &[u8],
) -> Result<(), StoreError> {
    for (n, chunk) in bytes.chunks(BLOB_CHUNK_BYTES).enumerate() {
        let n = u32::try_from(n).map_err(|_| store.corrupt("a blob has too many chunks"))?;
        chunks.insert((key, n), chunk).map_err(|e| store.err(e))?;
    }
    index
        .insert(key, (bytes.len() as u64, BLOB_CHUNK_BYTES as u32))
        .map_err(|e| store.err(e))?;
    Ok(())
}

impl Store {
    /// Stores `bytes` under their CID (codec [`CODEC_RAW`] or [`CODEC_DAG_CBOR`]) and returns
    /// it. Storing the same content twice is a no-op.
    pub fn put_blob(&self, codec: u64, bytes: &[u8]) -> Result<ContentId, StoreError> {
        check_codec(self, codec)?;
        let cid = ContentId::of(codec, bytes);
        let mut w = self.blob_writer(&cid, bytes.len() as u64)?;
        // On failure the writer keeps the original error, which commit() returns.
        let _ = w.write_bytes(bytes);
        w.commit()?;
        Ok(cid)
    }

    /// The content of a blob, verified against its CID. Holds the whole blob: prefer
    /// [`Store::blob_reader`] for large ones.
    pub fn get_blob(&self, cid: &ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(mut r) = self.blob_reader(cid)? else {
            return Ok(None);
        };
        // The length comes from the store; cap the up-front reservation so a damaged index
        // entry cannot make us allocate more than a chunk before any byte is read.
        let mut bytes = Vec::with_capacity(r.len().min(BLOB_CHUNK_BYTES as u64) as usize);
        r.read_to_end(&mut bytes).map_err(|e| r.store_error(e))?;
        Ok(Some(bytes))
    }

    /// A reader over the content of blob `cid`, one chunk at a time, within one read
    /// transaction (so a concurrent delete does not cut it short). The bytes are hashed as
    /// they are read, and the last chunk is checked against the CID before any of it is
    /// handed out: a reader that reaches the end has read exactly the stored blob, or gets
    /// an error ([`StoreError::BlobCorrupt`] inside an [`io::Error`] of kind `InvalidData`).
    pub fn blob_reader(&self, cid: &ContentId) -> Result<Option<BlobReader>, StoreError> {
        let rtx = self.read_txn()?;
        let index = self.open_ro(&rtx, BLOB_INDEX)?;
        let key = cid.to_bytes();
        let Some((len, chunk)) = index
            .get(key.as_slice())
            .map_err(|e| self.err(e))?
            .map(|g| g.value())
        else {
            return Ok(None);
        };
        let source = if chunk == BY_REFERENCE {
            Source::Facts(Box::new(FactSource {
                key,
                cursor: None,
                recipes: self.open_ro(&rtx, BLOB_REFS)?,
                facts: self.open_ro(&rtx, FACTS)?,
                maint: self.open_ro(&rtx, MAINT)?,
                authors: self.open_ro(&rtx, AUTHOR_BY_NO)?,
            }))
        } else {
            if chunk_count(len, chunk).is_none() {
                return Err(self.corrupt(format!(
                    "blob {cid}: index entry of {len} bytes in chunks of {chunk}"
                )));
            }
            Source::Chunks {
                key,
                chunk_bytes: chunk,
                chunks: self.open_ro(&rtx, BLOB_CHUNKS)?,
                next_chunk: 0,
            }
        };
        Ok(Some(BlobReader {
            path: self.path.clone(),
            cid: *cid,
            len,
            source,
            current: None,
            at: 0,
            loaded: 0,
            hasher: BufferedHasher::new(),
            verified: false,
            corrupt: false,
        }))
    }

    /// Lends a reader over blob `cid` to `f` (see [`Store::blob_reader`]): the blob is never
    /// held whole, so memory does not grow with it. If the reader found the blob damaged while
    /// `f` ran, the result is [`StoreError::BlobCorrupt`] whatever `f` returned.
    pub fn with_blob<T>(
        &self,
        cid: &ContentId,
        f: impl FnOnce(&mut BlobReader) -> T,
    ) -> Result<Option<T>, StoreError> {
        let Some(mut r) = self.blob_reader(cid)? else {
            return Ok(None);
        };
        let out = f(&mut r);
        if r.corrupt {
            return Err(StoreError::BlobCorrupt {
                path: self.path.clone(),
                cid: *cid,
            });
        }
        Ok(Some(out))
    }

    /// A writer for blob `cid` of exactly `len` bytes, in one write transaction that
    /// [`BlobWriter::commit`] commits only if exactly `len` bytes were written and they hash
    /// to `cid`. Until then nothing is visible, and dropping the writer (or a crash) leaves no
    /// trace of the blob. Other writes to the store wait until the writer is committed or
    /// dropped.
    pub fn blob_writer(&self, cid: &ContentId, len: u64) -> Result<BlobWriter<'_>, StoreError> {
        check_codec(self, cid.codec())?;
        if chunk_count(len, BLOB_CHUNK_BYTES as u32).is_none() {
            return Err(StoreError::BlobMismatch {
                path: self.path.clone(),
                cid: Box::new(*cid),
                detail: format!("{len} bytes is more than a blob can hold"),
            });
        }
        let guard = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let key = cid.to_bytes();
        let exists = tx
            .open_table(BLOB_INDEX)
            .map_err(|e| self.err(e))?
            .get(key.as_slice())
            .map_err(|e| self.err(e))?
            .is_some();
        Ok(BlobWriter {
            store: self,
            _guard: guard,
            tx,
            cid: *cid,
            key,
            len,
            exists,
            buf: Vec::new(),
            next_chunk: 0,
            written: 0,
            hasher: BufferedHasher::new(),
            failed: None,
        })
    }

    /// Stores blob `cid` of exactly `len` bytes, which `fill` writes into a [`BlobWriter`]
    /// (so a streamed blob is never held whole). Commits only if `fill` succeeds, it wrote
    /// exactly `len` bytes and they hash to `cid`; otherwise nothing is stored. `fill`'s own
    /// error comes back as the inner `Err`, unless the store failed underneath it, which is
    /// the outer one.
    pub fn put_blob_with<E>(
        &self,
        cid: &ContentId,
        len: usize,
        fill: impl FnOnce(&mut BlobWriter<'_>) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let mut w = self.blob_writer(cid, len as u64)?;
        let filled = fill(&mut w);
        if let Some(e) = w.failed.take() {
            return Err(e);
        }
        if let Err(e) = filled {
            // Dropping the writer drops its transaction uncommitted, which aborts it.
            return Ok(Err(e));
        }
        w.commit()?;
        Ok(Ok(()))
    }

    /// Whether a blob is stored (without reading or checking it).
    pub fn has_blob(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOB_INDEX)?;
        let found = t
            .get(cid.to_bytes().as_slice())
            .map_err(|e| self.err(e))?
            .is_some();
        Ok(found)
    }

    /// Deletes a blob (its index entry and every chunk, in one transaction); returns whether
    /// it was stored.
    pub fn delete_blob(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let removed = remove_blob_in(self, &tx, &cid.to_bytes())?.is_some();
        tx.commit().map_err(|e| self.err(e))?;
        Ok(removed)
    }

    /// Every stored blob with its size in bytes, in CID byte order.
    pub fn blobs(&self) -> Result<Vec<(ContentId, u64)>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOB_INDEX)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let cid = ContentId::from_bytes(k.value())
                .map_err(|e| self.corrupt(format!("malformed blob key: {e}")))?;
            out.push((cid, v.value().0));
        }
        Ok(out)
    }
}

/// Reads a stored blob chunk by chunk (see [`Store::blob_reader`]), or, for a blob kept by
/// reference, fact by fact (see [`Store::keep_blob_as_facts`]). Holds one chunk (a redb page)
/// or one fact at a time and keeps its read transaction open until dropped.
pub struct BlobReader {
    path: std::path::PathBuf,
    cid: ContentId,
    len: u64,
    source: Source,
    /// The piece being handed out; `at` is the position in it.
    current: Option<Piece>,
    at: usize,
    /// Bytes of the blob loaded (and hashed) so far.
    loaded: u64,
    hasher: BufferedHasher,
    verified: bool,
    /// Set once the blob was found damaged; every later read fails too.
    corrupt: bool,
}

/// Where a reader's bytes come from.
enum Source {
    /// The blob's own chunks.
    Chunks {
        key: Vec<u8>,
        chunk_bytes: u32,
        chunks: ReadOnlyTable<ChunkKey<'static>, &'static [u8]>,
        next_chunk: u32,
    },
    /// Its recipe and the facts it names (boxed: four table handles).
    Facts(Box<FactSource>),
}

/// A blob kept by reference: its recipe and the facts it names; the cursor is opened at
/// the first read.
struct FactSource {
    key: Vec<u8>,
    cursor: Option<RefCursor<'static, redb::Range<'static, &'static FactKey, &'static [u8]>>>,
    recipes: ReadOnlyTable<ChunkKey<'static>, &'static [u8]>,
    facts: ReadOnlyTable<&'static FactKey, &'static [u8]>,
    maint: ReadOnlyTable<&'static FactKey, &'static [u8]>,
    authors: ReadOnlyTable<u32, &'static [u8; 32]>,
}

/// A piece of a blob: a stored chunk, or bytes rebuilt from a recipe.
enum Piece {
    Page(redb::AccessGuard<'static, &'static [u8]>),
    Rebuilt(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Page(g) => g.value(),
            Self::Rebuilt(b) => b,
        }
    }
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("cid", &self.cid)
            .field("len", &self.len)
            .field("loaded", &self.loaded)
            .finish()
    }
}

impl BlobReader {
    /// The blob's length in bytes, as stored.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blob's CID.
    pub fn cid(&self) -> &ContentId {
        &self.cid
    }

    /// Starts over from the first byte, in the same read transaction (for callers that pass
    /// over a blob twice without holding it, such as backup export).
    pub fn rewind(&mut self) {
        self.current = None;
        self.at = 0;
        match &mut self.source {
            Source::Chunks { next_chunk, .. } => *next_chunk = 0,
            Source::Facts(f) => f.cursor = None,
        }
        self.loaded = 0;
        self.hasher = BufferedHasher::new();
        self.verified = false;
    }

    /// Turns an error of this reader back into the store error it carries.
    fn store_error(&self, e: io::Error) -> StoreError {
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<StoreError>()) {
            Some(Ok(err)) => *err,
            Some(Err(other)) => StoreError::Io {
                path: self.path.clone(),
                source: io::Error::new(kind, other),
            },
            None => StoreError::Io {
                path: self.path.clone(),
                source: kind.into(),
            },
        }
    }

    fn corrupt_error(&self) -> StoreError {
        StoreError::BlobCorrupt {
            path: self.path.clone(),
            cid: self.cid,
        }
    }

    fn fail(&mut self, e: StoreError) -> io::Error {
        if matches!(
            e,
            StoreError::BlobCorrupt { .. } | StoreError::Corrupt { .. }
        ) {
            self.corrupt = true;
        }
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// Loads the next piece, checking its length, and the CID once the last one is in.
    fn load_next(&mut self) -> Result<(), StoreError> {
        let left = self.len - self.loaded;
        let piece = match &mut self.source {
            Source::Chunks {
                key,
                chunk_bytes,
                chunks,
                next_chunk,
            } => {
                let want = left.min(u64::from(*chunk_bytes));
                let guard = chunks
                    .get((key.as_slice(), *next_chunk))
                    .map_err(|e| StoreError::db(&self.path, e))?
                    .filter(|g| g.value().len() as u64 == want);
                *next_chunk += 1;
                guard.map(Piece::Page)
            }
            Source::Facts(f) => {
                let FactSource {
                    key,
                    cursor,
                    recipes,
                    facts,
                    maint,
                    authors,
                } = &mut **f;
                let cursor = match cursor {
                    Some(c) => c,
                    None => {
                        cursor.insert(RefCursor::open(recipes, &self.path, key.clone(), |from| {
                            facts
                                .range::<&FactKey>(from..)
                                .map_err(|e| StoreError::db(&self.path, e))
                        })?)
                    }
                };
                let tables = FactTables {
                    facts,
                    maint,
                    authors,
                };
                let mut piece = None;
                while let Some(p) = cursor.next_piece(recipes, &tables, &self.path)? {
                    if !p.is_empty() {
                        piece = Some(p);
                        break;
                    }
                }
                piece.filter(|p| p.len() as u64 <= left).map(Piece::Rebuilt)
            }
        };
        let piece = piece.ok_or_else(|| self.corrupt_error())?;
        self.hasher.update(piece.bytes());
        self.loaded += piece.bytes().len() as u64;
        self.current = Some(piece);
        self.at = 0;
        self.verify_if_complete()
    }

    fn verify_if_complete(&mut self) -> Result<(), StoreError> {
        if self.loaded == self.len && !self.verified {
            if !cid_matches(&self.cid, &self.hasher) {
                self.current = None;
                return Err(self.corrupt_error());
            }
            self.verified = true;
        }
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.corrupt {
            return Err(self.fail(self.corrupt_error()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let exhausted = match &self.current {
            Some(c) => self.at >= c.bytes().len(),
            None => true,
        };
        if exhausted {
            self.current = None;
            let step = if self.loaded < self.len {
                self.load_next()
            } else {
                // An empty blob has no chunk: its CID is checked here.
                self.verify_if_complete()
            };
            if let Err(e) = step {
                return Err(self.fail(e));
            }
        }
        let Some(c) = &self.current else {
            return Ok(0);
        };
        let src = &c.bytes()[self.at..];
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        self.at += n;
        Ok(n)
    }
}

/// Writes a blob chunk by chunk in one write transaction (see [`Store::blob_writer`]): holds
/// at most one chunk of the caller's bytes, hashes them as they go by, and makes the blob
/// visible only in [`BlobWriter::commit`].
pub struct BlobWriter<'s> {
    store: &'s Store,
    /// Serialises writers, as every other write of the store does.
    _guard: MutexGuard<'s, WriterCache>,
    tx: WriteTransaction,
    cid: ContentId,
    key: Vec<u8>,
    len: u64,
    /// Already stored: the bytes are only checked, nothing is written.
    exists: bool,
    /// The partial chunk not yet inserted.
    buf: Vec<u8>,
    next_chunk: u32,
    written: u64,
    hasher: BufferedHasher,
    /// The first failure; the writer refuses everything after it and cannot commit.
    failed: Option<StoreError>,
}

impl std::fmt::Debug for BlobWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("cid", &self.cid)
            .field("len", &self.len)
            .field("written", &self.written)
            .finish()
    }
}

impl BlobWriter<'_> {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The blob's CID.
    pub fn cid(&self) -> &ContentId {
        &self.cid
    }

    fn mismatch(&self, detail: String) -> StoreError {
        StoreError::BlobMismatch {
            path: self.store.path.clone(),
            cid: Box::new(self.cid),
            detail,
        }
    }

    /// Appends `bytes` to the blob. After an error the writer is spent: every later call
    /// fails and [`BlobWriter::commit`] returns the first error.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if let Some(e) = &self.failed {
            // The original error stays for commit(); this is a summary of it.
            return Err(self.mismatch(format!("an earlier write failed: {e}")));
        }
        match self.write_inner(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                let summary = self.mismatch(format!("the write failed: {e}"));
                self.failed = Some(e);
                Err(summary)
            }
        }
    }

    fn write_inner(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        if self.written + bytes.len() as u64 > self.len {
            return Err(self.mismatch(format!(
                "more than the {} bytes announced were written",
                self.len
            )));
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        if self.exists {
            return Ok(());
        }
        while !bytes.is_empty() {
            if self.buf.is_empty() && bytes.len() >= BLOB_CHUNK_BYTES {
                // A whole chunk in the caller's buffer: insert it without copying it first.
                let (chunk, rest) = bytes.split_at(BLOB_CHUNK_BYTES);
                self.insert_chunk(chunk)?;
                bytes = rest;
                continue;
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(BLOB_CHUNK_BYTES);
            }
            let take = (BLOB_CHUNK_BYTES - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == BLOB_CHUNK_BYTES {
                let chunk = std::mem::take(&mut self.buf);
                self.insert_chunk(&chunk)?;
                self.buf = chunk;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn insert_chunk(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let store = self.store;
        // Opened per chunk: a table borrows the transaction, which this writer owns.
        let mut t: Table<ChunkKey, &[u8]> =
            self.tx.open_table(BLOB_CHUNKS).map_err(|e| store.err(e))?;
        t.insert((self.key.as_slice(), self.next_chunk), chunk)
            .map_err(|e| store.err(e))?;
        self.next_chunk += 1;
        Ok(())
    }

    /// Makes the blob visible: commits the chunks and the index entry together, if exactly
    /// the announced length was written and the bytes hash to the CID. Otherwise the
    /// transaction is aborted and nothing is stored.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.written != self.len {
            return Err(self.mismatch(format!(
                "{} bytes were written, {} announced",
                self.written, self.len
            )));
        }
        if !cid_matches(&self.cid, &self.hasher) {
            return Err(self.mismatch("the bytes do not hash to the content id".into()));
        }
        if self.exists {
            return Ok(());
        }
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.insert_chunk(&chunk)?;
        }
        let store = self.store;
        self.tx
            .open_table(BLOB_INDEX)
            .map_err(|e| store.err(e))?
            .insert(self.key.as_slice(), (self.len, BLOB_CHUNK_BYTES as u32))
            .map_err(|e| store.err(e))?;
        let BlobWriter { tx, _guard, .. } = self;
        tx.commit().map_err(|e| store.err(e))
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_bytes(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
