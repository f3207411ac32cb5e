//! The `Store` handle: creating and opening store files safely, tables, and shared helpers.
//!
//! Opening never modifies a file that is not a healthy tend store of a format this release
//! reads. Before redb touches the real file, [`Store::open`] checks the redb header magic
//! itself, then opens the file read-only through a copy-on-write backend
//! (the private `overlay` module): redb's own integrity check (every page checksum) and any crash repair
//! run there, writing to memory only, and the store's `meta` table (magic marker and format
//! version) is read. Only a file that passes all of this is opened for writing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use redb::{
    Builder, Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError,
};
use tend_core::{DeviceId, JournalNamespace, MaintenanceState};

use crate::codec::FactKey;
use crate::error::StoreError;
use crate::overlay::OverlayBackend;

/// The store format this release writes and reads. Format 4 may keep a blob as references
/// to the facts it carries (`blob_fact_refs`, see the `blob_refs` module), which a release
/// of format 3 would read as a damaged blob. Format 3 adds the changes feed
/// (`changes`, see the `changes` module); format 2 keeps blobs in chunks (`blob_index` and
/// `blob_chunks`, see the `blobs` module); format 1 kept each blob as one value in `blobs`.
/// Older formats are migrated when opened, one step per transaction. A release that knows
/// only format 2 refuses a format 3 store (newer format) instead of admitting facts the
/// feed would miss.
pub const STORE_FORMAT_VERSION: u32 = 4;
/// The oldest format [`Store::open`] migrates; older ones are refused.
const OLDEST_MIGRATED_FORMAT: u32 = 1;
/// The marker stored under `magic` in the `meta` table.
pub const STORE_MAGIC: &[u8] = b"tend-store";

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
pub(crate) const NAMESPACES: TableDefinition<&[u8; 33], &[u8; NS_RECORD_LEN]> =
    TableDefinition::new("namespaces");
pub(crate) const NS_BY_NO: TableDefinition<u32, &[u8; 33]> =
    TableDefinition::new("namespace_numbers");
pub(crate) const AUTHORS: TableDefinition<&[u8; 32], u32> = TableDefinition::new("authors");
pub(crate) const AUTHOR_BY_NO: TableDefinition<u32, &[u8; 32]> =
    TableDefinition::new("author_numbers");
pub(crate) const FACTS: TableDefinition<&FactKey, &[u8]> = TableDefinition::new("facts");
pub(crate) const MAINT: TableDefinition<&FactKey, &[u8]> =
    TableDefinition::new("maintenance_facts");
/// Format 1's blob table (CID bytes -> the whole blob), read only by the migration.
pub(crate) const BLOBS_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// CID bytes -> (length, chunk size).
pub(crate) const BLOB_INDEX: TableDefinition<&[u8], (u64, u32)> =
    TableDefinition::new("blob_index");
/// (CID bytes, chunk number) -> chunk bytes.
pub(crate) const BLOB_CHUNKS: TableDefinition<(&[u8], u32), &[u8]> =
    TableDefinition::new("blob_chunks");

pub(crate) const NS_RECORD_LEN: usize = 20;

/// What the store keeps per namespace besides its facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NsRecord {
    /// The local number used in fact keys.
    pub no: u32,
    /// Facts currently in the facts table.
    pub count: u64,
    /// The highest epoch of any fact ever admitted (kept across pruning, so the reduced state
    /// does not change when facts go).
    pub max_epoch: u64,
}

impl NsRecord {
    pub(crate) fn to_bytes(self) -> [u8; NS_RECORD_LEN] {
        let mut b = [0u8; NS_RECORD_LEN];
        b[..4].copy_from_slice(&self.no.to_be_bytes());
        b[4..12].copy_from_slice(&self.count.to_be_bytes());
        b[12..].copy_from_slice(&self.max_epoch.to_be_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8; NS_RECORD_LEN]) -> Self {
        let mut no = [0u8; 4];
        no.copy_from_slice(&b[..4]);
        let mut count = [0u8; 8];
        count.copy_from_slice(&b[4..12]);
        let mut max = [0u8; 8];
        max.copy_from_slice(&b[12..]);
        Self {
            no: u32::from_be_bytes(no),
            count: u64::from_be_bytes(count),
            max_epoch: u64::from_be_bytes(max),
        }
    }
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Verify every page checksum before opening for writing (reads the whole file once).
    /// Without it, only the header, the crash-recovery state and the `meta` table are checked,
    /// and damage deeper in the file surfaces later as [`StoreError::Corrupt`] on read.
    /// Default: `true`.
    pub verify_integrity: bool,
    /// redb's page cache size in bytes; `None` keeps redb's default (1 GiB, an upper bound).
    pub cache_size: Option<usize>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            verify_integrity: true,
            cache_size: None,
        }
    }
}

/// Writer-side caches; only changed after a commit succeeds.
#[derive(Default)]
pub(crate) struct WriterCache {
    /// Author dictionary: device -> number used in stored values.
    pub authors: HashMap<DeviceId, u32>,
}

/// A tend store: one redb file holding the journals of any number of namespaces, their blobs,
/// and local settings. All methods take `&self` except [`Store::compact`]; writes are
/// serialised internally, reads run concurrently with them.
pub struct Store {
    pub(crate) path: PathBuf,
    /// Transactions begin under the read lock; `compact` takes the write lock, so none
    /// begins while it runs.
    pub(crate) db: RwLock<Database>,
    pub(crate) writer: Mutex<WriterCache>,
    /// Reduced maintenance state per namespace, as of the latest commit.
    pub(crate) states: Mutex<HashMap<JournalNamespace, MaintenanceState>>,
    /// Application state per namespace, as of the latest commit (folded on first use).
    pub(crate) app_states: Mutex<HashMap<JournalNamespace, std::sync::Arc<tend_core::AppState>>>,
    /// Told the last sequence number after each commit that appended changes.
    pub(crate) change_listeners: Mutex<Vec<crate::changes::ChangeListener>>,
    /// Prefix digests computed since the last commit that changed the facts they cover.
    pub(crate) digests: Mutex<crate::digests::DigestMemo>,
    pub(crate) removals: Mutex<crate::changes::Removals>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Creates a new, empty store at `path`. Fails if anything exists there.
    pub fn create(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::create_with(path, &StoreOptions::default())
    }

    /// [`Store::create`] with options.
    pub fn create_with(path: impl AsRef<Path>, opts: &StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_owned();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => StoreError::AlreadyExists { path: path.clone() },
                _ => StoreError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
        // The file is ours from here on: remove it again if initialisation fails.
        match Self::init_new(&path, file, opts) {
            Ok(store) => Ok(store),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn init_new(path: &Path, file: File, opts: &StoreOptions) -> Result<Store, StoreError> {
        let backend =
            redb::backends::FileBackend::new(file).map_err(|e| StoreError::db(path, e))?;
        let db = builder(opts)
            .create_with_backend(backend)
            .map_err(|e| StoreError::db(path, e))?;
        let tx = db.begin_write().map_err(|e| StoreError::db(path, e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| StoreError::db(path, e))?;
            meta.insert("magic", STORE_MAGIC)
                .map_err(|e| StoreError::db(path, e))?;
            meta.insert(
                "format_version",
                STORE_FORMAT_VERSION.to_be_bytes().as_slice(),
            )
            .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(SETTINGS)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(NAMESPACES)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(NS_BY_NO)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(AUTHORS)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(AUTHOR_BY_NO)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(FACTS).map_err(|e| StoreError::db(path, e))?;
            tx.open_table(MAINT).map_err(|e| StoreError::db(path, e))?;
            tx.open_table(BLOB_INDEX)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(BLOB_CHUNKS)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(crate::blob_refs::BLOB_REFS)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(crate::app::APP_LOG)
                .map_err(|e| StoreError::db(path, e))?;
            tx.open_table(crate::changes::CHANGES)
                .map_err(|e| StoreError::db(path, e))?;
        }
        tx.commit().map_err(|e| StoreError::db(path, e))?;
        Ok(Store {
            path: path.to_owned(),
            db: RwLock::new(db),
            writer: Mutex::new(WriterCache::default()),
            states: Mutex::new(HashMap::new()),
            app_states: Mutex::new(HashMap::new()),
            change_listeners: Mutex::new(Vec::new()),
            digests: Mutex::default(),
            removals: Mutex::default(),
        })
    }

    /// Opens an existing store, verifying it first (see [`StoreOptions`]).
    ///
    /// A file that is not a tend store, is truncated or corrupt, or was written by a newer
    /// release gives an error and is left byte for byte as it was.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(path, &StoreOptions::default())
    }

    /// [`Store::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, opts: &StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_owned();
        let version = match inspect(&path, opts.verify_integrity) {
            Ok(v) => v,
            // A file another process is writing may look inconsistent; say so instead.
            Err(e) if matches!(e, StoreError::Corrupt { .. }) && is_locked(&path) => {
                return Err(StoreError::Locked { path });
            }
            Err(e) => return Err(e),
        };
        let db = builder(opts)
            .open(&path)
            .map_err(|e| StoreError::db(&path, e))?;
        let store = Store {
            path,
            db: RwLock::new(db),
            writer: Mutex::new(WriterCache::default()),
            states: Mutex::new(HashMap::new()),
            app_states: Mutex::new(HashMap::new()),
            change_listeners: Mutex::new(Vec::new()),
            digests: Mutex::default(),
            removals: Mutex::default(),
        };
        if version < 2 {
            store.migrate_v1()?;
        }
        if version < 3 {
            store.migrate_v2()?;
        }
        if version < 4 {
            store.migrate_v3()?;
        }
        store.load_writer_cache()?;
        Ok(store)
    }

    /// Format 1 -> 2: moves every blob from its single value into chunks, deletes the old
    /// table and records format 2, all in one transaction (a crash leaves a format 1
    /// store, migrated again on the next open). Each old blob is read once, as format 1 read
    /// it (one page); a damaged one is copied as it is, so the store still opens and the
    /// damage is reported when the blob is read, as before.
    fn migrate_v1(&self) -> Result<(), StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        {
            let old = tx.open_table(BLOBS_V1).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(BLOB_INDEX).map_err(|e| self.err(e))?;
            let mut chunks = tx.open_table(BLOB_CHUNKS).map_err(|e| self.err(e))?;
            for item in old.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                crate::blobs::insert_blob_in(self, &mut index, &mut chunks, k.value(), v.value())?;
            }
        }
        tx.delete_table(BLOBS_V1).map_err(|e| self.err(e))?;
        tx.open_table(META)
            .map_err(|e| self.err(e))?
            .insert("format_version", 2u32.to_be_bytes().as_slice())
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Format 3 -> 4: adds the (empty) table of blob recipes and records format 4, in one
    /// transaction. Every stored blob stays as it is, in chunks.
    fn migrate_v3(&self) -> Result<(), StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        tx.open_table(crate::blob_refs::BLOB_REFS)
            .map_err(|e| self.err(e))?;
        tx.open_table(META)
            .map_err(|e| self.err(e))?
            .insert("format_version", 4u32.to_be_bytes().as_slice())
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn load_writer_cache(&self) -> Result<(), StoreError> {
        let rtx = self.read_txn()?;
        let authors = self.open_ro(&rtx, AUTHORS)?;
        let mut cache = self.lock_writer();
        for item in authors.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            cache.authors.insert(DeviceId(*k.value()), v.value());
        }
        Ok(())
    }

    /// The path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the store file on disk, in bytes.
    pub fn file_size(&self) -> Result<u64, StoreError> {
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| StoreError::Io {
                path: self.path.clone(),
                source: e,
            })
    }

    pub(crate) fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::db(&self.path, e)
    }

    pub(crate) fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::corrupt(&self.path, detail)
    }

    /// The database, for beginning a transaction (never held longer than that).
    pub(crate) fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn read_txn(&self) -> Result<ReadTransaction, StoreError> {
        self.db().begin_read().map_err(|e| self.err(e))
    }

    pub(crate) fn open_ro<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        rtx: &ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<ReadOnlyTable<K, V>, StoreError> {
        rtx.open_table(def).map_err(|e| table_err(&self.path, e))
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, WriterCache> {
        // The cache is only changed after a commit, so a panic elsewhere leaves it valid.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_app_states(
        &self,
    ) -> MutexGuard<'_, HashMap<JournalNamespace, std::sync::Arc<tend_core::AppState>>> {
        self.app_states.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_removals(&self) -> MutexGuard<'_, crate::changes::Removals> {
        self.removals.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_digests(&self) -> MutexGuard<'_, crate::digests::DigestMemo> {
        self.digests.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_states(
        &self,
    ) -> MutexGuard<'_, HashMap<JournalNamespace, MaintenanceState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of a namespace, if the store has seen it.
    pub(crate) fn ns_record(
        &self,
        table: &impl ReadableTable<&'static [u8; 33], &'static [u8; NS_RECORD_LEN]>,
        ns: &JournalNamespace,
    ) -> Result<Option<NsRecord>, StoreError> {
        Ok(table
            .get(&ns.to_bytes())
            .map_err(|e| self.err(e))?
            .map(|g| NsRecord::from_bytes(g.value())))
    }
}

pub(crate) fn table_err(path: &Path, e: TableError) -> StoreError {
    match e {
        TableError::TableDoesNotExist(name) => {
            StoreError::corrupt(path, format!("table {name} is missing"))
        }
        e => StoreError::db(path, e),
    }
}

fn builder(opts: &StoreOptions) -> Builder {
    let mut b = Builder::new();
    if let Some(size) = opts.cache_size {
        b.set_cache_size(size);
    }
    b
}

/// Whether another handle holds the store's lock (probed read-only, never writes).
fn is_locked(path: &Path) -> bool {
    matches!(
        Builder::new().open_read_only(path),
        Err(redb::DatabaseError::DatabaseAlreadyOpen)
    )
}

/// Checks, without modifying the file, that `path` is a healthy tend store this release reads
/// (or migrates); returns its format version.
fn inspect(path: &Path, verify_integrity: bool) -> Result<u32, StoreError> {
    let not_a_store = |reason: &str| StoreError::NotAStore {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => StoreError::NotFound {
            path: path.to_owned(),
        },
        _ => StoreError::Io {
            path: path.to_owned(),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return Err(not_a_store("it is a directory"));
    }
    let io = |e| StoreError::Io {
        path: path.to_owned(),
        source: e,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    (&mut file)
        .take(REDB_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(io)?;
    if head.is_empty() {
        return Err(not_a_store("the file is empty"));
    }
    if head != REDB_MAGIC {
        return Err(not_a_store("it does not start with a redb database header"));
    }
    let backend = OverlayBackend::new(file).map_err(io)?;
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // redb promises an error rather than a panic for damaged files when verifying; a panic
    // would still be a bug in redb, and is turned into an error here as a last line of defence.
    let opened = catch_unwind(AssertUnwindSafe(|| {
        let mut b = Builder::new();
        b.set_check_integrity_on_open(verify_integrity)
            .set_cache_size(16 << 20);
        b.create_with_backend(backend)
    }))
    .map_err(|_| corrupt("the database engine failed while reading it".into()))?;
    let db = opened.map_err(|e| match e {
        redb::DatabaseError::UpgradeRequired(v) => {
            not_a_store(&format!("a redb database in the old file format {v}"))
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == ErrorKind::UnexpectedEof =>
        {
            corrupt("the file is shorter than its header says: truncated".into())
        }
        e => corrupt(e.to_string()),
    })?;
    let checked = catch_unwind(AssertUnwindSafe(|| check_meta(path, &db)))
        .map_err(|_| corrupt("the database engine failed while reading it".into()))?;
    drop(db);
    checked
}

fn check_meta(path: &Path, db: &Database) -> Result<u32, StoreError> {
    let not_a_store = |reason: &str| StoreError::NotAStore {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let rtx = db.begin_read().map_err(|e| StoreError::db(path, e))?;
    let meta = match rtx.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(not_a_store("a redb database without tend metadata"))
        }
        Err(TableError::TableTypeMismatch { .. }) => {
            return Err(not_a_store("a redb database with a foreign `meta` table"))
        }
        Err(e) => return Err(StoreError::db(path, e)),
    };
    let magic = meta.get("magic").map_err(|e| StoreError::db(path, e))?;
    if magic.as_ref().map(|g| g.value()) != Some(STORE_MAGIC) {
        return Err(not_a_store("a redb database without the tend marker"));
    }
    let version = meta
        .get("format_version")
        .map_err(|e| StoreError::db(path, e))?
        .and_then(|g| <[u8; 4]>::try_from(g.value()).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::corrupt(path, "the format version is missing"))?;
    if version > STORE_FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_owned(),
            found: version,
            supported: STORE_FORMAT_VERSION,
        });
    }
    if version < OLDEST_MIGRATED_FORMAT {
        return Err(StoreError::UnsupportedFormat {
            path: path.to_owned(),
            found: version,
            supported: STORE_FORMAT_VERSION,
        });
    }
    Ok(version)
}

/// Space used by one table of the store (from redb's table statistics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableUsage {
    pub table: &'static str,
    pub entries: u64,
    /// Bytes of keys and values.
    pub stored_bytes: u64,
    /// Bytes of page headers, offsets and branch pages.
    pub metadata_bytes: u64,
    /// Bytes of pages left unused by the B-tree's fill factor.
    pub fragmented_bytes: u64,
    pub leaf_pages: u64,
    pub branch_pages: u64,
}

impl Store {
    /// Space used by each table, for diagnostics and the size breakdown in BENCHMARKS.md.
    pub fn table_usage(&self) -> Result<Vec<TableUsage>, StoreError> {
        use redb::ReadableTableMetadata;
        let rtx = self.read_txn()?;
        let mut out = Vec::new();
        macro_rules! usage {
            ($def:expr, $name:expr) => {{
                let t = self.open_ro(&rtx, $def)?;
                let s = t.stats().map_err(|e| self.err(e))?;
                out.push(TableUsage {
                    table: $name,
                    entries: t.len().map_err(|e| self.err(e))?,
                    stored_bytes: s.stored_bytes(),
                    metadata_bytes: s.metadata_bytes(),
                    fragmented_bytes: s.fragmented_bytes(),
                    leaf_pages: s.leaf_pages(),
                    branch_pages: s.branch_pages(),
                });
            }};
        }
        usage!(FACTS, "facts");
        usage!(MAINT, "maintenance_facts");
        usage!(BLOB_INDEX, "blob_index");
        usage!(BLOB_CHUNKS, "blob_chunks");
        usage!(crate::blob_refs::BLOB_REFS, "blob_fact_refs");
        usage!(NAMESPACES, "namespaces");
        usage!(AUTHORS, "authors");
        usage!(AUTHOR_BY_NO, "author_numbers");
        usage!(SETTINGS, "settings");
        usage!(crate::changes::CHANGES, "changes");
        Ok(out)
    }
}
