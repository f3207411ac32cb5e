//! Blobs kept as references to the stored facts they carry (store format 4).
//!
//! A snapshot blob is mostly its live facts, which GC keeps in the journal index below the
//! snapshot anyway: stored as bytes, the store would hold them twice. So such a blob is
//! kept as a *recipe* that names those facts, and every read rebuilds the bytes from them
//! and checks them against the CID, as any blob read does. A recipe comes from a blob the
//! store hashed from its facts ([`Store::plan_fact_blob`], then [`Store::put_fact_blob`]:
//! a device building a snapshot blob never writes its bytes), or replaces the chunks of a
//! stored blob once every fact it carries is stored ([`Store::keep_blob_as_facts`]).
//!
//! A recipe is kept in `blob_fact_refs` in chunks, as a blob's bytes are (see the `blobs`
//! module), and the blob's `blob_index` entry says [`BY_REFERENCE`] where a chunk size
//! would be. Its bytes:
//! - the namespace number (u32 BE) and the namespace (33 bytes) whose facts it names;
//! - then segments, each led by a tag byte:
//!   - `0`, literal bytes: their length (u32 BE, at most 64 KiB) and the bytes;
//!   - `1`, a run of facts of one epoch: the epoch (u64 BE), the count (u32 BE), then that
//!     many fact ids (32 bytes each). Each fact stands for the DAG-CBOR byte string of its
//!     canonical bytes, which is how a snapshot blob lists its facts.
//!
//! What keeps a recipe readable: every fact it names stays stored. Whatever deletes facts a
//! recipe may name (pruning, retracting application facts) first turns such a blob back
//! into bytes, in the transaction that deletes them.

use std::collections::HashMap;
use std::path::Path;

use redb::{ReadableTable, Table, WriteTransaction};
use tend_core::hashing::BufferedHasher;
use tend_core::ids::Hash32;
use tend_core::{ContentId, DeviceId, Epoch, FactId, JournalNamespace};

use crate::blobs::{cid_matches, ChunkKey, BLOB_CHUNK_BYTES};
use crate::codec::{self, FactKey};
use crate::error::StoreError;
use crate::facts::AuthorResolver;
use crate::store::{Store, AUTHOR_BY_NO, BLOB_CHUNKS, BLOB_INDEX, FACTS, MAINT, NAMESPACES};

/// `(CID bytes, chunk number)` -> a chunk of the recipe of a blob kept by reference.
pub(crate) const BLOB_REFS: redb::TableDefinition<ChunkKey<'static>, &[u8]> =
    redb::TableDefinition::new("blob_fact_refs");

/// The chunk size a `blob_index` entry records for a blob kept by reference.
pub(crate) const BY_REFERENCE: u32 = 0;

/// The longest literal segment: a reader holds one segment at a time.
const LITERAL_MAX: usize = 64 * 1024;
/// The most bytes before or after a blob's facts that a recipe keeps literally.
const LITERAL_LIMIT: u64 = 1 << 20;
/// The most ids in one run, so a writer holds at most this many.
const RUN_MAX: usize = 4096;
const TAG_LITERAL: u8 = 0;
const TAG_RUN: u8 = 1;
const HEADER_LEN: usize = 4 + 33;

fn db(path: &Path) -> impl Fn(redb::StorageError) -> StoreError + '_ {
    move |e| StoreError::db(path, e)
}

fn damaged(path: &Path, detail: &str) -> StoreError {
    StoreError::corrupt(path, format!("a blob recipe is damaged: {detail}"))
}

/// Reads the chunks `(key, 0), (key, 1), ...` of a chunk table as one stream of bytes.
pub(crate) struct ChunkStream {
    key: Vec<u8>,
    next: u32,
    buf: Vec<u8>,
    at: usize,
}

impl ChunkStream {
    pub(crate) fn new(key: Vec<u8>) -> Self {
        Self {
            key,
            next: 0,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// Fills `out`; `false` if the stream had ended before its first byte. A stream that
    /// ends partway through `out` is damaged.
    fn read<T: ReadableTable<ChunkKey<'static>, &'static [u8]>>(
        &mut self,
        table: &T,
        path: &Path,
        out: &mut [u8],
    ) -> Result<bool, StoreError> {
        let mut filled = 0;
        while filled < out.len() {
            if self.at == self.buf.len() {
                let Some(chunk) = table
                    .get((self.key.as_slice(), self.next))
                    .map_err(db(path))?
                else {
                    if filled == 0 {
                        return Ok(false);
                    }
                    return Err(damaged(path, "it ends partway through an entry"));
                };
                self.buf.clear();
                self.buf.extend_from_slice(chunk.value());
                self.at = 0;
                self.next += 1;
                continue;
            }
            let n = (self.buf.len() - self.at).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&self.buf[self.at..self.at + n]);
            self.at += n;
            filled += n;
        }
        Ok(true)
    }

    fn read_all<T: ReadableTable<ChunkKey<'static>, &'static [u8]>>(
        &mut self,
        table: &T,
        path: &Path,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        if out.is_empty() || self.read(table, path, out)? {
            Ok(())
        } else {
            Err(damaged(path, "it ends where an entry should follow"))
        }
    }
}

/// Writes bytes as the chunks `(key, 0), (key, 1), ...` of a chunk table, every chunk but
/// the last [`BLOB_CHUNK_BYTES`] long.
struct ChunkSink {
    key: Vec<u8>,
    next: u32,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn new(key: Vec<u8>) -> Self {
        Self {
            key,
            next: 0,
            buf: Vec::new(),
        }
    }

    fn write(
        &mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
        mut bytes: &[u8],
    ) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            let take = (BLOB_CHUNK_BYTES - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == BLOB_CHUNK_BYTES {
                self.flush(table, path)?;
            }
        }
        Ok(())
    }

    fn flush(
        &mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
    ) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        table
            .insert((self.key.as_slice(), self.next), self.buf.as_slice())
            .map_err(db(path))?;
        self.next += 1;
        self.buf.clear();
        Ok(())
    }
}

/// One entry of a recipe.
enum Step {
    Literal(Vec<u8>),
    Fact(Epoch, FactId),
}

/// Reads a recipe entry by entry.
struct Recipe {
    stream: ChunkStream,
    ns_no: u32,
    ns: JournalNamespace,
    /// The epoch and the ids still to come of the run being read.
    run: Option<(Epoch, u32)>,
}

impl Recipe {
    fn open<T: ReadableTable<ChunkKey<'static>, &'static [u8]>>(
        table: &T,
        path: &Path,
        key: Vec<u8>,
    ) -> Result<Self, StoreError> {
        let mut stream = ChunkStream::new(key);
        let mut header = [0u8; HEADER_LEN];
        stream.read_all(table, path, &mut header)?;
        let (no, ns) = header.split_at(4);
        let ns = JournalNamespace::from_bytes(ns)
            .ok_or_else(|| damaged(path, "its namespace does not parse"))?;
        Ok(Self {
            stream,
            ns_no: u32::from_be_bytes([no[0], no[1], no[2], no[3]]),
            ns,
            run: None,
        })
    }

    fn next<T: ReadableTable<ChunkKey<'static>, &'static [u8]>>(
        &mut self,
        table: &T,
        path: &Path,
    ) -> Result<Option<Step>, StoreError> {
        loop {
            if let Some((epoch, left)) = &mut self.run {
                if *left > 0 {
                    *left -= 1;
                    let epoch = *epoch;
                    let mut id = [0u8; 32];
                    self.stream.read_all(table, path, &mut id)?;
                    return Ok(Some(Step::Fact(epoch, FactId(id))));
                }
                self.run = None;
            }
            let mut tag = [0u8];
            if !self.stream.read(table, path, &mut tag)? {
                return Ok(None);
            }
            match tag[0] {
                TAG_LITERAL => {
                    let mut len = [0u8; 4];
                    self.stream.read_all(table, path, &mut len)?;
                    let len = u32::from_be_bytes(len) as usize;
                    if len > LITERAL_MAX {
                        return Err(damaged(path, "a literal segment is too long"));
                    }
                    let mut bytes = vec![0; len];
                    self.stream.read_all(table, path, &mut bytes)?;
                    return Ok(Some(Step::Literal(bytes)));
                }
                TAG_RUN => {
                    let mut head = [0u8; 12];
                    self.stream.read_all(table, path, &mut head)?;
                    let (epoch, count) = head.split_at(8);
                    let epoch = Epoch(u64::from_be_bytes(epoch.try_into().unwrap_or([0; 8])));
                    let count = u32::from_be_bytes(count.try_into().unwrap_or([0; 4]));
                    self.run = Some((epoch, count));
                }
                _ => return Err(damaged(path, "an entry has an unknown tag")),
            }
        }
    }
}

/// Writes a recipe, gathering consecutive facts of one epoch into runs.
struct RecipeWriter {
    sink: ChunkSink,
    run: Option<(Epoch, Vec<FactId>)>,
}

impl RecipeWriter {
    fn new(
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
        key: Vec<u8>,
        ns_no: u32,
        ns: &JournalNamespace,
    ) -> Result<Self, StoreError> {
        let mut sink = ChunkSink::new(key);
        sink.write(table, path, &ns_no.to_be_bytes())?;
        sink.write(table, path, &ns.to_bytes())?;
        Ok(Self { sink, run: None })
    }

    fn literal(
        &mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.end_run(table, path)?;
        for piece in bytes.chunks(LITERAL_MAX) {
            self.sink.write(table, path, &[TAG_LITERAL])?;
            self.sink
                .write(table, path, &(piece.len() as u32).to_be_bytes())?;
            self.sink.write(table, path, piece)?;
        }
        Ok(())
    }

    fn fact(
        &mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
        epoch: Epoch,
        id: FactId,
    ) -> Result<(), StoreError> {
        match &mut self.run {
            Some((e, ids)) if *e == epoch && ids.len() < RUN_MAX => ids.push(id),
            _ => {
                self.end_run(table, path)?;
                self.run = Some((epoch, vec![id]));
            }
        }
        Ok(())
    }

    fn end_run(
        &mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
    ) -> Result<(), StoreError> {
        let Some((epoch, ids)) = self.run.take() else {
            return Ok(());
        };
        self.sink.write(table, path, &[TAG_RUN])?;
        self.sink.write(table, path, &epoch.0.to_be_bytes())?;
        self.sink
            .write(table, path, &(ids.len() as u32).to_be_bytes())?;
        for id in &ids {
            self.sink.write(table, path, &id.0)?;
        }
        Ok(())
    }

    fn finish(
        mut self,
        table: &mut Table<ChunkKey<'static>, &'static [u8]>,
        path: &Path,
    ) -> Result<(), StoreError> {
        self.end_run(table, path)?;
        self.sink.flush(table, path)
    }
}

/// The tables a blob's facts are read from.
pub(crate) struct FactTables<'t, F, A> {
    pub facts: &'t F,
    pub maint: &'t F,
    pub authors: &'t A,
}

impl<F, A> FactTables<'_, F, A>
where
    F: ReadableTable<&'static FactKey, &'static [u8]>,
    A: ReadableTable<u32, &'static [u8; 32]>,
{
    /// The DAG-CBOR byte string of fact `(epoch, id)`'s canonical bytes, if it is stored
    /// (in the journal index, or below a pruned floor in the maintenance table).
    fn entry(
        &self,
        path: &Path,
        ns: JournalNamespace,
        ns_no: u32,
        (epoch, id): (Epoch, FactId),
        memo: &mut HashMap<u32, DeviceId>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = codec::fact_key(ns_no, epoch, &id);
        let value = match self.facts.get(&key).map_err(db(path))? {
            Some(v) => v,
            None => match self.maint.get(&key).map_err(db(path))? {
                Some(v) => v,
                None => return Ok(None),
            },
        };
        self.entry_of(path, ns, &key, value.value(), memo).map(Some)
    }

    /// [`FactTables::entry`] of the stored value `value` of fact `key`.
    fn entry_of(
        &self,
        path: &Path,
        ns: JournalNamespace,
        key: &FactKey,
        value: &[u8],
        memo: &mut HashMap<u32, DeviceId>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut authors = AuthorResolver::with_memo(self.authors, std::mem::take(memo));
        let loaded = authors.load(path, ns, key, value);
        *memo = authors.into_memo();
        let bytes = loaded?.into_bytes();
        let mut entry = Vec::with_capacity(bytes.len() + 9);
        codec::put_bytes(&mut entry, &bytes);
        Ok(entry)
    }
}

/// A fact table's values at ascending keys, found by walking one range instead of a
/// lookup per key (a snapshot blob names its facts in key order).
struct Ascending<'a, I> {
    range: I,
    /// The first entry at or after the last key asked for.
    current: Option<(FactKey, redb::AccessGuard<'a, &'static [u8]>)>,
}

type FactEntry<'a> = (
    redb::AccessGuard<'a, &'static FactKey>,
    redb::AccessGuard<'a, &'static [u8]>,
);

impl<'a, I: Iterator<Item = Result<FactEntry<'a>, redb::StorageError>>> Ascending<'a, I> {
    fn new(range: I) -> Self {
        Self {
            range,
            current: None,
        }
    }

    /// The value at `key`, which must not be below a key asked for before.
    fn get(&mut self, path: &Path, key: &FactKey) -> Result<Option<&[u8]>, StoreError> {
        loop {
            if matches!(&self.current, Some((k, _)) if k >= key) {
                break;
            }
            match self.range.next() {
                None => {
                    self.current = None;
                    return Ok(None);
                }
                Some(item) => {
                    let (k, v) = item.map_err(db(path))?;
                    self.current = Some((*k.value(), v));
                }
            }
        }
        Ok(match &self.current {
            Some((k, v)) if k == key => Some(v.value()),
            _ => None,
        })
    }
}

/// Whether `facts` are strictly ascending, as [`Ascending`] needs.
fn ascending(facts: &[(Epoch, FactId)]) -> bool {
    facts.windows(2).all(|w| w[0] < w[1])
}

/// Finds facts along one range of the journal index while they come in key order (a
/// snapshot blob's do), by a lookup per fact otherwise.
pub(crate) struct Lookup<'a, I> {
    held: Ascending<'a, I>,
    last: Option<FactKey>,
    memo: HashMap<u32, DeviceId>,
}

impl<'a, I: Iterator<Item = Result<FactEntry<'a>, redb::StorageError>>> Lookup<'a, I> {
    /// Along `range`, the journal index from the first key that will be asked for on.
    fn new(range: I) -> Self {
        Self {
            held: Ascending::new(range),
            last: None,
            memo: HashMap::new(),
        }
    }

    /// [`FactTables::entry`] of fact `(epoch, id)` of `ns`, numbered `ns_no`.
    fn entry<F, A>(
        &mut self,
        tables: &FactTables<'_, F, A>,
        path: &Path,
        (ns, ns_no): (JournalNamespace, u32),
        (epoch, id): (Epoch, FactId),
    ) -> Result<Option<Vec<u8>>, StoreError>
    where
        F: ReadableTable<&'static FactKey, &'static [u8]>,
        A: ReadableTable<u32, &'static [u8; 32]>,
    {
        let key = codec::fact_key(ns_no, epoch, &id);
        let in_order = self.last.is_none_or(|last| last < key);
        self.last = Some(key);
        let found = match in_order {
            true => self.held.get(path, &key)?,
            false => None,
        };
        match found {
            Some(value) => tables
                .entry_of(path, ns, &key, value, &mut self.memo)
                .map(Some),
            // Out of order, or only in the maintenance table (a state fact below a floor).
            None => tables.entry(path, ns, ns_no, (epoch, id), &mut self.memo),
        }
    }
}

/// Rebuilds the bytes of a blob kept by reference, one piece at a time (a literal segment
/// or one fact).
pub(crate) struct RefCursor<'a, I> {
    recipe: Recipe,
    lookup: Lookup<'a, I>,
}

impl<'a, I: Iterator<Item = Result<FactEntry<'a>, redb::StorageError>>> RefCursor<'a, I> {
    /// Opens the recipe of blob `key`; `range` gives the journal index from a key on.
    pub(crate) fn open<T: ReadableTable<ChunkKey<'static>, &'static [u8]>>(
        recipes: &T,
        path: &Path,
        key: Vec<u8>,
        range: impl FnOnce(&FactKey) -> Result<I, StoreError>,
    ) -> Result<Self, StoreError> {
        let recipe = Recipe::open(recipes, path, key)?;
        let lookup = Lookup::new(range(&codec::epoch_start(recipe.ns_no, Epoch::ZERO))?);
        Ok(Self { recipe, lookup })
    }

    /// The next piece of the blob, `None` at its end.
    pub(crate) fn next_piece<R, F, A>(
        &mut self,
        recipes: &R,
        facts: &FactTables<'_, F, A>,
        path: &Path,
    ) -> Result<Option<Vec<u8>>, StoreError>
    where
        R: ReadableTable<ChunkKey<'static>, &'static [u8]>,
        F: ReadableTable<&'static FactKey, &'static [u8]>,
        A: ReadableTable<u32, &'static [u8; 32]>,
    {
        let (ns, ns_no) = (self.recipe.ns, self.recipe.ns_no);
        let (epoch, id) = match self.recipe.next(recipes, path)? {
            None => return Ok(None),
            Some(Step::Literal(bytes)) => return Ok(Some(bytes)),
            Some(Step::Fact(epoch, id)) => (epoch, id),
        };
        let entry = self.lookup.entry(facts, path, (ns, ns_no), (epoch, id))?;
        entry.map(Some).ok_or_else(|| {
            StoreError::corrupt(
                path,
                format!("a blob kept by reference names fact {id}, which is not stored"),
            )
        })
    }
}

/// Turns back into bytes, inside `tx`, every blob of namespace number `ns_no` kept by
/// reference that names a fact `doomed` says is about to leave the journal index and that
/// the maintenance table does not keep either (a reader finds a fact in either; blobs in
/// `skip` are deleted in the same transaction and left alone). Call it before deleting the
/// facts, and before opening the tables it uses (the blob, fact and author tables).
/// Returns how many blobs it turned back.
pub(crate) fn release_in(
    store: &Store,
    tx: &WriteTransaction,
    ns_no: u32,
    doomed: impl Fn(Epoch, &FactId) -> bool,
    skip: &[ContentId],
) -> Result<u64, StoreError> {
    let path = store.path();
    let skip: Vec<Vec<u8>> = skip.iter().map(ContentId::to_bytes).collect();
    let mut todo = Vec::new();
    {
        let recipes = tx.open_table(BLOB_REFS).map_err(|e| store.err(e))?;
        let maint = tx.open_table(MAINT).map_err(|e| store.err(e))?;
        let kept_elsewhere = |epoch, id: &FactId| -> Result<bool, StoreError> {
            let key = codec::fact_key(ns_no, epoch, id);
            Ok(maint.get(&key).map_err(|e| store.err(e))?.is_some())
        };
        let mut keys = Vec::new();
        for item in recipes.iter().map_err(|e| store.err(e))? {
            let (k, _) = item.map_err(|e| store.err(e))?;
            let (key, n) = k.value();
            if n == 0 && !skip.iter().any(|s| s.as_slice() == key) {
                keys.push(key.to_vec());
            }
        }
        for key in keys {
            let mut recipe = Recipe::open(&recipes, path, key.clone())?;
            if recipe.ns_no != ns_no {
                continue;
            }
            while let Some(step) = recipe.next(&recipes, path)? {
                if let Step::Fact(epoch, id) = step {
                    if doomed(epoch, &id) && !kept_elsewhere(epoch, &id)? {
                        todo.push(key);
                        break;
                    }
                }
            }
        }
    }
    for key in &todo {
        materialize_in(store, tx, key)?;
    }
    Ok(todo.len() as u64)
}

/// Rewrites blob `key`, kept by reference, as chunks of its bytes (checked against its
/// CID) and drops its recipe.
fn materialize_in(store: &Store, tx: &WriteTransaction, key: &[u8]) -> Result<(), StoreError> {
    let path = store.path();
    let cid = ContentId::from_bytes(key)
        .map_err(|e| store.corrupt(format!("malformed blob key: {e}")))?;
    let mut index = tx.open_table(BLOB_INDEX).map_err(|e| store.err(e))?;
    let Some((len, _)) = index.get(key).map_err(|e| store.err(e))?.map(|g| g.value()) else {
        return Err(store.corrupt(format!("blob {cid} has a recipe but no index entry")));
    };
    let mut chunks = tx.open_table(BLOB_CHUNKS).map_err(|e| store.err(e))?;
    let mut recipes = tx.open_table(BLOB_REFS).map_err(|e| store.err(e))?;
    {
        let facts = tx.open_table(FACTS).map_err(|e| store.err(e))?;
        let maint = tx.open_table(MAINT).map_err(|e| store.err(e))?;
        let authors = tx.open_table(AUTHOR_BY_NO).map_err(|e| store.err(e))?;
        let tables = FactTables {
            facts: &facts,
            maint: &maint,
            authors: &authors,
        };
        let mut cursor = RefCursor::open(&recipes, path, key.to_vec(), |from| {
            facts.range::<&FactKey>(from..).map_err(db(path))
        })?;
        let mut sink = ChunkSink::new(key.to_vec());
        let mut hasher = BufferedHasher::new();
        let mut written = 0u64;
        while let Some(piece) = cursor.next_piece(&recipes, &tables, path)? {
            hasher.update(&piece);
            written += piece.len() as u64;
            sink.write(&mut chunks, path, &piece)?;
        }
        sink.flush(&mut chunks, path)?;
        if written != len || !cid_matches(&cid, &hasher) {
            return Err(StoreError::BlobCorrupt {
                path: path.to_owned(),
                cid,
            });
        }
    }
    recipes
        .retain_in::<ChunkKey, _>((key, 0)..=(key, u32::MAX), |_, _| false)
        .map_err(|e| store.err(e))?;
    index
        .insert(key, (len, BLOB_CHUNK_BYTES as u32))
        .map_err(|e| store.err(e))?;
    Ok(())
}

/// A blob made of stored facts between a head and a tail, hashed by the store
/// ([`Store::plan_fact_blob`]) and not stored yet ([`Store::put_fact_blob`]). Only the store
/// makes one, so its CID is the hash of the facts the store holds under its keys.
#[derive(Debug)]
pub struct FactBlob {
    cid: ContentId,
    len: u64,
    ns: JournalNamespace,
    head: Vec<u8>,
    facts: Vec<(Epoch, FactId)>,
    tail: Vec<u8>,
}

impl FactBlob {
    /// The blob's CID.
    pub fn cid(&self) -> &ContentId {
        &self.cid
    }

    /// The blob's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Store {
    /// Hashes the blob `head`, then each of `facts` of `ns` as the DAG-CBOR byte string of
    /// its canonical bytes, then `tail` (the layout of a snapshot blob), reading the facts
    /// in one read transaction, without holding the bytes. Fails with
    /// [`StoreError::BlobMismatch`] if one of the facts is not stored. Store it with
    /// [`Store::put_fact_blob`]: kept by reference from the start, it never holds the facts
    /// a second time.
    pub fn plan_fact_blob(
        &self,
        codec: u64,
        ns: JournalNamespace,
        head: Vec<u8>,
        facts: Vec<(Epoch, FactId)>,
        tail: Vec<u8>,
    ) -> Result<FactBlob, StoreError> {
        let path = self.path();
        let rtx = self.read_txn()?;
        let namespaces = self.open_ro(&rtx, NAMESPACES)?;
        let no = self.ns_record(&namespaces, &ns)?.map(|r| r.no);
        let facts_t = self.open_ro(&rtx, FACTS)?;
        let maint = self.open_ro(&rtx, MAINT)?;
        let authors = self.open_ro(&rtx, AUTHOR_BY_NO)?;
        let tables = FactTables {
            facts: &facts_t,
            maint: &maint,
            authors: &authors,
        };
        let mismatch = |detail: String| StoreError::BlobMismatch {
            path: path.to_owned(),
            cid: Box::new(ContentId::of(codec, &head)),
            detail,
        };
        if !ascending(&facts) {
            return Err(mismatch("its facts are not in ascending order".into()));
        }
        let mut hasher = BufferedHasher::new();
        hasher.update(&head);
        let mut len = head.len() as u64;
        let start = match (no, facts.first()) {
            (Some(no), Some(&(epoch, id))) => codec::fact_key(no, epoch, &id),
            _ => [0xff; codec::KEY_LEN],
        };
        let mut lookup = Lookup::new(facts_t.range::<&FactKey>(&start..).map_err(db(path))?);
        for &(epoch, id) in &facts {
            let missing = || {
                mismatch(format!(
                    "fact {id} at epoch {} of {ns} is not stored",
                    epoch.0
                ))
            };
            let no = no.ok_or_else(missing)?;
            let entry = lookup
                .entry(&tables, path, (ns, no), (epoch, id))?
                .ok_or_else(missing)?;
            hasher.update(&entry);
            len += entry.len() as u64;
        }
        hasher.update(&tail);
        len += tail.len() as u64;
        let cid = ContentId::from_blake3(codec, &Hash32::from(hasher.finalize()));
        Ok(FactBlob {
            cid,
            len,
            ns,
            head,
            facts,
            tail,
        })
    }

    /// Stores `blob` kept by reference (see the module docs), in one transaction, unless a
    /// blob of its CID is stored already. Fails with [`StoreError::BlobMismatch`], storing
    /// nothing, if one of its facts is no longer stored. A fact's key names its bytes (its
    /// id is their hash, checked on every read), so the facts found are the ones hashed.
    pub fn put_fact_blob(&self, blob: &FactBlob) -> Result<(), StoreError> {
        let path = self.path();
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let key = blob.cid.to_bytes();
        {
            let mut index = tx.open_table(BLOB_INDEX).map_err(|e| self.err(e))?;
            if index
                .get(key.as_slice())
                .map_err(|e| self.err(e))?
                .is_some()
            {
                return Ok(());
            }
            let gone = |id: &FactId| StoreError::BlobMismatch {
                path: path.to_owned(),
                cid: Box::new(blob.cid),
                detail: format!("fact {id} is no longer stored"),
            };
            let namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            let Some(rec) = self.ns_record(&namespaces, &blob.ns)? else {
                return match blob.facts.first() {
                    Some((_, id)) => Err(gone(id)),
                    None => Ok(()),
                };
            };
            let mut recipes = tx.open_table(BLOB_REFS).map_err(|e| self.err(e))?;
            let facts = tx.open_table(FACTS).map_err(|e| self.err(e))?;
            let maint = tx.open_table(MAINT).map_err(|e| self.err(e))?;
            let mut recipe = RecipeWriter::new(&mut recipes, path, key.clone(), rec.no, &blob.ns)?;
            recipe.literal(&mut recipes, path, &blob.head)?;
            let start = match blob.facts.first() {
                Some(&(epoch, id)) => codec::fact_key(rec.no, epoch, &id),
                None => [0xff; codec::KEY_LEN],
            };
            let mut held =
                Ascending::new(facts.range::<&FactKey>(&start..).map_err(|e| self.err(e))?);
            for &(epoch, id) in &blob.facts {
                let k = codec::fact_key(rec.no, epoch, &id);
                let stored = held.get(path, &k)?.is_some()
                    || maint.get(&k).map_err(|e| self.err(e))?.is_some();
                if !stored {
                    return Err(gone(&id));
                }
                recipe.fact(&mut recipes, path, epoch, id)?;
            }
            recipe.literal(&mut recipes, path, &blob.tail)?;
            recipe.finish(&mut recipes, path)?;
            index
                .insert(key.as_slice(), (blob.len, BY_REFERENCE))
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Keeps blob `cid` as references to the facts of `ns` it carries instead of as bytes
    /// (see the module docs), when every one of them is stored: the blob's bytes are the
    /// first `facts_at` bytes, then `facts` as DAG-CBOR byte strings of their canonical
    /// bytes, in that order, then the rest (a snapshot blob: its head, its fact list, its
    /// state digest). Checked byte for byte against the stored blob before anything is
    /// replaced, in one transaction. Returns whether the blob is now kept by reference:
    /// `false`, with nothing changed, if it is not stored, a fact is not stored or the
    /// layout is not the blob's.
    ///
    /// Reading it afterwards costs a lookup per fact, and deleting one of the facts
    /// (pruning, retraction) turns it back into bytes first, so no caller sees a difference.
    pub fn keep_blob_as_facts(
        &self,
        cid: &ContentId,
        ns: JournalNamespace,
        facts_at: u64,
        facts: impl IntoIterator<Item = (Epoch, FactId)>,
    ) -> Result<bool, StoreError> {
        let path = self.path();
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let key = cid.to_bytes();
        {
            let mut index = tx.open_table(BLOB_INDEX).map_err(|e| self.err(e))?;
            let Some((len, chunk)) = index
                .get(key.as_slice())
                .map_err(|e| self.err(e))?
                .map(|g| g.value())
            else {
                return Ok(false);
            };
            if chunk == BY_REFERENCE {
                return Ok(true);
            }
            let namespaces = tx.open_table(NAMESPACES).map_err(|e| self.err(e))?;
            let Some(rec) = self.ns_record(&namespaces, &ns)? else {
                return Ok(false);
            };
            // Held in memory while checked; a blob with more bytes around its facts (a
            // format 2 snapshot blob, whose head holds its item list) stays as bytes.
            if facts_at > LITERAL_LIMIT.min(len) {
                return Ok(false);
            }
            let mut chunks = tx.open_table(BLOB_CHUNKS).map_err(|e| self.err(e))?;
            let mut recipes = tx.open_table(BLOB_REFS).map_err(|e| self.err(e))?;
            {
                let facts_t = tx.open_table(FACTS).map_err(|e| self.err(e))?;
                let maint = tx.open_table(MAINT).map_err(|e| self.err(e))?;
                let authors = tx.open_table(AUTHOR_BY_NO).map_err(|e| self.err(e))?;
                let tables = FactTables {
                    facts: &facts_t,
                    maint: &maint,
                    authors: &authors,
                };
                // The stored bytes are read alongside the rebuilt ones and must equal them;
                // the recipe is written as they go, and dropped with the transaction if not.
                let mut stored = ChunkStream::new(key.clone());
                let mut recipe = RecipeWriter::new(&mut recipes, path, key.clone(), rec.no, &ns)?;
                let mut hasher = BufferedHasher::new();
                let mut head = vec![0u8; facts_at as usize];
                stored.read_all(&chunks, path, &mut head)?;
                hasher.update(&head);
                recipe.literal(&mut recipes, path, &head)?;
                let mut lookup = Lookup::new(
                    facts_t
                        .range::<&FactKey>(&codec::epoch_start(rec.no, Epoch::ZERO)..)
                        .map_err(db(path))?,
                );
                let mut at = facts_at;
                let mut was = Vec::new();
                for (epoch, id) in facts {
                    let Some(entry) = lookup.entry(&tables, path, (ns, rec.no), (epoch, id))?
                    else {
                        return Ok(false);
                    };
                    at += entry.len() as u64;
                    was.resize(entry.len(), 0);
                    if at > len || !stored.read(&chunks, path, &mut was)? || was != entry {
                        return Ok(false);
                    }
                    hasher.update(&entry);
                    recipe.fact(&mut recipes, path, epoch, id)?;
                }
                if len - at > LITERAL_LIMIT {
                    return Ok(false);
                }
                let mut tail = vec![0u8; (len - at) as usize];
                stored.read_all(&chunks, path, &mut tail)?;
                hasher.update(&tail);
                recipe.literal(&mut recipes, path, &tail)?;
                recipe.finish(&mut recipes, path)?;
                if !cid_matches(cid, &hasher) {
                    return Err(StoreError::BlobCorrupt {
                        path: path.to_owned(),
                        cid: *cid,
                    });
                }
            }
            chunks
                .retain_in::<ChunkKey, _>(
                    (key.as_slice(), 0)..=(key.as_slice(), u32::MAX),
                    |_, _| false,
                )
                .map_err(|e| self.err(e))?;
            index
                .insert(key.as_slice(), (len, BY_REFERENCE))
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Whether blob `cid` is kept as references to the facts it carries
    /// ([`Store::keep_blob_as_facts`]).
    pub fn blob_kept_as_facts(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let rtx = self.read_txn()?;
        let index = self.open_ro(&rtx, BLOB_INDEX)?;
        let chunk = index
            .get(cid.to_bytes().as_slice())
            .map_err(|e| self.err(e))?
            .map(|g| g.value().1);
        Ok(chunk == Some(BY_REFERENCE))
    }
}
