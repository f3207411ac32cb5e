//! Verify and restore: decrypt, unpack and check an archive as it streams by, hydrating
//! the snapshot and replaying the tail into a fresh store inside a temporary directory
//! that becomes the new home only when every check has passed.
//!
//! Verification order: the age layer (key, header MAC, every payload chunk); the header
//! (format and version, before anything else is read); the prefix facts (the blob's own
//! maintenance facts, carried ahead of it), the anchor facts and the blob (the group key
//! comes from the prefix's membership chain, which starts at a genesis that certifies the
//! namespace, followed through the anchor; then the threshold signature, and in one pass
//! over the blob its structure, the prefix facts against its facts and items, the prefix
//! digest, the state digest and the CID, via `tend_snapshot::hydrate::hydrate_stream`);
//! every tail fact (signature, namespace, order, admission against the hydrated state);
//! the manifest (every member's size and BLAKE3, counts, ranges, the tail digest); the end
//! of the stream (so a truncated file fails); and last the restored store itself (its
//! maintenance state and journal digest must equal what the replay computed and the
//! manifest states).
//!
//! Memory: the blob's item list (40 bytes per covered fact) streams by and is never held;
//! tail facts are verified and written in batches of at most [`BATCH_FACTS`] facts or
//! [`BATCH_BYTES`] bytes. The blob streams into the store chunk by chunk. What grows with
//! the archive is the blob's facts, the anchor and the manifest (one line per 4 MiB chunk).

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Serialize;
use tend_core::journal::DigestBuilder;
use tend_core::maintenance::MaintenanceFact;
use tend_core::{
    fact::read_stored_payload, reduce, AuthorityId, ContextId, DecodeError, Epoch, FactId,
    JournalNamespace, MaintenanceState, Payload, VerifiedFact, MAX_FACT_BYTES,
};
use tend_snapshot::blob::{
    is_state_fact, read_blob, stream_blob_facts, BlobError, BlobTrust, SnapshotBlob,
};
use tend_snapshot::hydrate::hydrate_stream;
use tend_snapshot::HydrateError;
use tend_store::{BlobWriter, Store};

use crate::error::BackupError;
use crate::export::{sibling, sibling_prefix, HashingReader, Progress};
use crate::format::{
    member, Header, Manifest, MemberHash, ARCHIVE_FORMAT_NAME, ARCHIVE_FORMAT_VERSION, FRAME_LEN,
    MAX_ANCHOR_BYTES, MAX_BLOB_BYTES, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, MAX_PREFIX_BYTES,
    MAX_V1_BLOB_BYTES, PREFIX_SINCE_VERSION, STATE_PREFIX_SINCE_VERSION,
};
use crate::keys::Decryption;

/// Facts handed to the store per transaction during a restore.
const BATCH_FACTS: usize = 10_000;
/// Bytes of facts handed to the store per transaction, whichever limit comes first.
const BATCH_BYTES: usize = 8 << 20;

/// Where a restore writes: something holding a fresh, empty store.
pub trait RestoreTarget {
    /// The store facts and the blob are written to.
    fn store(&self) -> &Store;
}

impl RestoreTarget for Store {
    fn store(&self) -> &Store {
        self
    }
}

/// What a verify or restore found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    pub namespace: String,
    /// The snapshot epoch E, if the archive holds a snapshot.
    pub snapshot_epoch: Option<u64>,
    /// Maintenance and authority facts hydrated from the blob.
    pub maintenance_facts: u64,
    /// Facts replayed from the tail.
    pub tail_facts: u64,
    /// `MaintenanceState::state_digest` after the replay.
    pub state_digest: String,
    /// The journal digest over the tail (what the restored journal index hashes to).
    pub journal_digest: String,
    /// Bytes of the encrypted archive read.
    pub archive_bytes: u64,
}

/// Decrypts and checks an archive completely without writing anything.
pub fn verify(
    input: impl Read,
    decryption: &Decryption,
    progress: Option<&dyn Fn(Progress)>,
    total_bytes: u64,
) -> Result<RestoreReport, BackupError> {
    let make = None::<fn(JournalNamespace) -> Result<Store, BackupError>>;
    read_archive(input, decryption, make, progress, total_bytes).map(|(_, r)| r)
}

/// [`verify`] of the archive at `path`.
pub fn verify_file(
    path: &Path,
    decryption: &Decryption,
    progress: Option<&dyn Fn(Progress)>,
) -> Result<RestoreReport, BackupError> {
    let (file, len) = open_archive(path)?;
    verify(file, decryption, progress, len)
}

/// Restores an archive into the target `make_target` creates once the journal is known
/// (from the archive's header). On error the target may hold part of the journal: callers
/// must discard it ([`restore_home`] does).
pub fn restore<T: RestoreTarget>(
    input: impl Read,
    decryption: &Decryption,
    make_target: impl FnOnce(JournalNamespace) -> Result<T, BackupError>,
    progress: Option<&dyn Fn(Progress)>,
    total_bytes: u64,
) -> Result<(T, RestoreReport), BackupError> {
    let (target, report) =
        read_archive(input, decryption, Some(make_target), progress, total_bytes)?;
    let target = target.ok_or_else(|| BackupError::Target("no target was created".into()))?;
    Ok((target, report))
}

/// Restores the archive at `archive` into the new home directory `new_home`, atomically.
///
/// `new_home` must not exist (or be an empty directory). Everything is written into a
/// temporary directory next to it, which `init` turns into a home for the archive's
/// journal (a new device key and an empty store); it is renamed to `new_home` only after
/// every check has passed and the target was dropped, and removed on any failure, so a
/// failed restore leaves nothing behind. A restore that was killed cannot remove its
/// directory: this one first removes those of earlier restores into `new_home` whose
/// process is gone ([`remove_stale_restores`]).
pub fn restore_home<T: RestoreTarget>(
    archive: &Path,
    decryption: &Decryption,
    new_home: &Path,
    init: impl FnOnce(&Path, JournalNamespace) -> Result<T, BackupError>,
    progress: Option<&dyn Fn(Progress)>,
) -> Result<RestoreReport, BackupError> {
    remove_stale_restores(new_home);
    check_new_home(new_home)?;
    let (file, len) = open_archive(archive)?;
    let tmp = sibling(new_home, "restore");
    std::fs::create_dir(&tmp).map_err(|e| BackupError::io(&tmp, e))?;
    let result = (|| {
        let (target, report) = restore(file, decryption, |ns| init(&tmp, ns), progress, len)?;
        // Close the store before the directory moves.
        drop(target);
        check_new_home(new_home)?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, new_home).map_err(|e| BackupError::io(new_home, e))?;
        if let Some(parent) = new_home.parent() {
            let _ = sync_dir(parent);
        }
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes what restores into `home` left behind when they were killed: the directories
/// `.NAME.restore-PID-N` beside `home` (NAME is `home`'s file name; each holds a fresh
/// device key and part of a store) whose process PID no longer exists. Returns the
/// directories removed.
///
/// Nothing else is touched: not a name that does not match the pattern exactly, not a
/// file or a symbolic link, not the directory of a live process (a restore still running,
/// or one whose PID was reused, which is left for a later call), and nothing at all where
/// it cannot tell whether a process exists (no `/proc`, so not Linux). A process in
/// another PID namespace writing beside `home` would look gone. Best effort: what cannot
/// be read or removed is skipped.
pub fn remove_stale_restores(home: &Path) -> Vec<PathBuf> {
    let prefix = sibling_prefix(home, "restore");
    // The directory `sibling` puts them in.
    let dir = match home.with_file_name(&prefix).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(restore_pid)
        else {
            continue;
        };
        // `DirEntry::file_type` does not follow a symbolic link.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || !process_is_gone(pid) {
            continue;
        }
        let path = entry.path();
        if std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The PID in the `PID-N` that ends a restore directory's name (both decimal numbers).
fn restore_pid(rest: &str) -> Option<u32> {
    let (pid, n) = rest.split_once('-')?;
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !number(pid) || !number(n) {
        return None;
    }
    n.parse::<u64>().ok()?;
    pid.parse().ok().filter(|&pid| pid != 0)
}

/// Whether no process `pid` exists, as far as this can tell: only where `/proc` lists
/// processes; elsewhere, and for this process, never.
fn process_is_gone(pid: u32) -> bool {
    pid != std::process::id()
        && Path::new("/proc/self").exists()
        && !Path::new("/proc").join(pid.to_string()).exists()
}

fn check_new_home(home: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(home) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(BackupError::HomeNotEmpty(home.to_owned())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(BackupError::HomeNotEmpty(home.to_owned()))
        }
        Err(e) => Err(BackupError::io(home, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::io(dir, e))
}

fn open_archive(path: &Path) -> Result<(BufReader<File>, u64), BackupError> {
    let file = File::open(path).map_err(|e| BackupError::io(path, e))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((BufReader::with_capacity(1 << 16, file), len))
}

/// The whole pipeline; `make_target` is `None` for a verify.
fn read_archive<T: RestoreTarget>(
    input: impl Read,
    decryption: &Decryption,
    make_target: Option<impl FnOnce(JournalNamespace) -> Result<T, BackupError>>,
    progress: Option<&dyn Fn(Progress)>,
    total_bytes: u64,
) -> Result<(Option<T>, RestoreReport), BackupError> {
    let read_bytes = Rc::new(Cell::new(0u64));
    let counted = CountingReader {
        inner: input,
        n: read_bytes.clone(),
        next_report: 0,
        progress,
        total: total_bytes,
    };
    let plain = decryption.open(counted)?;
    read_plain(plain, make_target, &read_bytes)
}

/// Checks a decrypted archive (the zstd-compressed tar inside the age layer) completely
/// without writing anything, as [`verify`] does after decryption; `archive_bytes` in the
/// report counts the decrypted bytes. This is the pure entry point the `backup_reader`
/// fuzz target drives: any input gives a report or a typed error, never a panic, and
/// nothing a hostile length claims is allocated ahead of the bytes that back it.
pub fn verify_plain(plain: impl Read) -> Result<RestoreReport, BackupError> {
    let read_bytes = Rc::new(Cell::new(0u64));
    let counted = CountingReader {
        inner: plain,
        n: read_bytes.clone(),
        next_report: 0,
        progress: None,
        total: 0,
    };
    let make = None::<fn(JournalNamespace) -> Result<Store, BackupError>>;
    read_plain(counted, make, &read_bytes).map(|(_, r)| r)
}

/// Window of a zstd frame a reader accepts: export writes level 3 (a 2 MiB window at
/// most); 2^24 leaves room for an archive recompressed with `zstd -19`, and keeps a hostile
/// frame header from making the decoder reserve up to 2^27 bytes (zstd's default limit).
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Everything under the age layer; `read_bytes` counts the bytes read from the source.
fn read_plain<T: RestoreTarget>(
    plain: impl Read,
    make_target: Option<impl FnOnce(JournalNamespace) -> Result<T, BackupError>>,
    read_bytes: &Rc<Cell<u64>>,
) -> Result<(Option<T>, RestoreReport), BackupError> {
    let mut zstd = zstd::stream::read::Decoder::new(plain).map_err(damaged)?;
    zstd.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(damaged)?;
    let mut archive = tar::Archive::new(zstd);
    let mut entries = archive.entries().map_err(damaged)?;
    let mut read = ReadMembers::default();

    // The header comes first, so a newer format is refused before anything else is read.
    let mut entry = next_entry(&mut entries)?
        .ok_or_else(|| BackupError::NotABackup("the archive is empty".into()))?;
    let name = entry_name(&entry)?;
    if name != member::HEADER {
        return Err(BackupError::NotABackup(format!(
            "the first member is {name:?}, not {}",
            member::HEADER
        )));
    }
    let bytes = read.whole(&mut entry, &name, MAX_HEADER_BYTES)?;
    drop(entry);
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::NotABackup(format!("the header does not parse: {e}")))?;
    if header.format != ARCHIVE_FORMAT_NAME {
        return Err(BackupError::NotABackup(format!(
            "the header names format {:?}",
            header.format
        )));
    }
    if header.version > ARCHIVE_FORMAT_VERSION {
        return Err(BackupError::NewerFormat {
            found: header.version,
            supported: ARCHIVE_FORMAT_VERSION,
        });
    }
    if header.version < 1 {
        return Err(BackupError::NotABackup(format!(
            "format version {} does not exist",
            header.version
        )));
    }
    let ns = parse_namespace(&header.namespace)?;
    let target = make_target.map(|make| make(ns)).transpose()?;
    let store = target.as_ref().map(|t| t.store());

    // Version 2 carries the blob's facts ahead of it; version 1 did not.
    let has_prefix = header.has_snapshot && header.version >= PREFIX_SINCE_VERSION;
    let mut prefix: Option<PrefixFacts> = None;
    let mut anchor: Option<Vec<VerifiedFact>> = None;
    let mut replay: Option<Replay> = if header.has_snapshot {
        None
    } else {
        Some(Replay::new(ns, MaintenanceState::new(ns), Epoch::ZERO))
    };
    let mut manifest: Option<Manifest> = None;
    while let Some(mut entry) = next_entry(&mut entries)? {
        let name = entry_name(&entry)?;
        if manifest.is_some() {
            return Err(BackupError::NotABackup(format!(
                "member {name:?} follows the manifest"
            )));
        }
        let before_blob = replay.is_none() && anchor.is_none();
        if name == member::PREFIX && has_prefix && prefix.is_none() && before_blob {
            let state_only = header.version >= STATE_PREFIX_SINCE_VERSION;
            prefix = Some(read.state_facts(&mut entry, &name, ns, MAX_PREFIX_BYTES, state_only)?);
        } else if name == member::ANCHOR
            && header.has_snapshot
            && before_blob
            && prefix.is_some() == has_prefix
        {
            anchor = Some(read.facts(&mut entry, &name, ns, MAX_ANCHOR_BYTES)?);
        } else if name == member::BLOB && anchor.is_some() && replay.is_none() {
            let facts = anchor.take().unwrap_or_default();
            let size = entry.size();
            let mut hashing = HashingReader::new(&mut entry);
            let r = hydrate_snapshot(ns, &mut hashing, size, prefix.take(), facts, store)?;
            read.push(&name, hashing.finish().map_err(damaged)?);
            replay = Some(r);
        } else if replay
            .as_ref()
            .is_some_and(|r| name == member::tail(r.chunks))
        {
            if let Some(r) = replay.as_mut() {
                let mut hashing = HashingReader::new(&mut entry);
                r.read_chunk(&mut hashing, &name, store)?;
                read.push(&name, hashing.finish().map_err(damaged)?);
                r.chunks += 1;
            }
        } else if name == member::MANIFEST && replay.is_some() {
            let bytes = read.whole(&mut entry, &name, MAX_MANIFEST_BYTES)?;
            // The manifest lists the members before it, not itself.
            read.members.pop();
            manifest = Some(serde_json::from_slice(&bytes).map_err(|e| {
                BackupError::NotABackup(format!("the manifest does not parse: {e}"))
            })?);
        } else {
            return Err(BackupError::NotABackup(format!(
                "unexpected member {name:?} at this point of the archive"
            )));
        }
    }
    let manifest = manifest.ok_or_else(|| {
        BackupError::Damaged("the archive ends before its manifest (truncated?)".into())
    })?;
    let mut replay = replay.ok_or_else(|| BackupError::NotABackup("no snapshot blob".into()))?;

    // Read to the very end: age checks its last chunk only when it is reached, so this is
    // what catches a file cut after the tar's end.
    let mut rest = archive.into_inner();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = rest.read(&mut buf).map_err(damaged)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(BackupError::NotABackup(
                "data follows the end of the tar archive".into(),
            ));
        }
    }
    let archive_bytes = read_bytes.get();

    check_manifest(&manifest, &header, &read.members, &replay)?;
    replay.finish_checks()?;
    let state_digest = replay.state().state_digest();
    let journal_digest = replay.digest.finish();
    if let Some(store) = store {
        replay.flush(store)?;
        let restored = store.maintenance_state(ns)?;
        if restored.state_digest() != state_digest {
            return Err(BackupError::RestoreMismatch(
                "the store's maintenance state differs from the replayed state".into(),
            ));
        }
        if restored.gc_floor().is_some() {
            // The blob's maintenance facts went into the journal index on the way in; a
            // pruned device keeps them only in the maintenance table, as the source did.
            store.prune(ns)?;
        }
        // Below the snapshot the index holds the live application facts the blob carried
        // (checked by its CID); from the snapshot on, exactly the tail.
        let mut tail = tend_core::journal::DigestBuilder::whole(ns);
        for item in store.items(ns, replay.from..)? {
            let (epoch, id) = item?;
            tail.push(epoch, id);
        }
        if tail.finish() != journal_digest {
            return Err(BackupError::RestoreMismatch(
                "the restored journal index does not hash to the tail digest".into(),
            ));
        }
    }
    let report = RestoreReport {
        namespace: ns.to_string(),
        snapshot_epoch: replay.snapshot.as_ref().map(|s| s.epoch.0),
        maintenance_facts: replay.snapshot.as_ref().map_or(0, |s| s.maintenance_facts),
        tail_facts: replay.facts,
        state_digest: state_digest.to_string(),
        journal_digest: journal_digest.to_string(),
        archive_bytes,
    };
    Ok((target, report))
}

/// Members read so far, with their sizes and hashes.
#[derive(Default)]
struct ReadMembers {
    members: Vec<MemberHash>,
}

impl ReadMembers {
    /// Reads a whole member (at most `max` bytes) and records its hash.
    fn whole(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        max: u64,
    ) -> Result<Vec<u8>, BackupError> {
        let mut bytes = Vec::new();
        entry
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(damaged)?;
        if bytes.len() as u64 > max {
            return Err(BackupError::NotABackup(format!(
                "member {name} is larger than {max} bytes"
            )));
        }
        self.push(
            name,
            MemberHash {
                name: name.into(),
                size: bytes.len() as u64,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
            },
        );
        Ok(bytes)
    }

    /// Reads a member of framed facts (at most `max` bytes) as it streams by, verifying
    /// each, and records its hash.
    fn facts(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        ns: JournalNamespace,
        max: u64,
    ) -> Result<Vec<VerifiedFact>, BackupError> {
        let mut hashing = HashingReader::new(entry.take(max + 1));
        let mut out = Vec::new();
        while let Some(fact) = read_frame(&mut hashing, name, out.len() as u64)? {
            if fact.namespace() != ns {
                return Err(BackupError::WrongNamespace {
                    expected: ns,
                    found: fact.namespace(),
                });
            }
            out.push(fact);
        }
        if hashing.n > max {
            return Err(BackupError::NotABackup(format!(
                "member {name} is larger than {max} bytes"
            )));
        }
        self.push(name, hashing.finish().map_err(damaged)?);
        Ok(out)
    }

    /// The state facts ([`is_state_fact`]) of a member of framed facts, each checked. A
    /// version 2 prefix also holds the blob's application facts, skipped unchecked here: a
    /// restore takes them from the certified blob itself, so it neither holds nor
    /// verifies a million of them. A version 3 prefix (`state_only`) holds state facts
    /// only, and anything else in it is refused.
    fn state_facts(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        ns: JournalNamespace,
        max: u64,
        state_only: bool,
    ) -> Result<PrefixFacts, BackupError> {
        let mut hashing = HashingReader::new(entry.take(max + 1));
        let mut out = Vec::new();
        let mut all = FactListHash::default();
        let mut index = 0u64;
        while let Some(bytes) = read_raw_frame(&mut hashing, name, index)? {
            all.push(&bytes);
            let bad = |source| BackupError::BadFact {
                member: name.into(),
                index,
                source,
            };
            let (_, payload) = read_stored_payload(&bytes).map_err(bad)?;
            if matches!(payload, Payload::Maintenance(_) | Payload::Authority(_)) {
                let fact = VerifiedFact::decode(&bytes).map_err(bad)?;
                if fact.namespace() != ns {
                    return Err(BackupError::WrongNamespace {
                        expected: ns,
                        found: fact.namespace(),
                    });
                }
                out.push(fact);
            } else if state_only {
                return Err(BackupError::NotABackup(format!(
                    "fact {index} of {name} is not a maintenance or authority fact"
                )));
            }
            index += 1;
        }
        if hashing.n > max {
            return Err(BackupError::NotABackup(format!(
                "member {name} is larger than {max} bytes"
            )));
        }
        self.push(name, hashing.finish().map_err(damaged)?);
        Ok(PrefixFacts {
            state: out,
            all,
            state_only,
        })
    }

    fn push(&mut self, name: &str, mut hash: MemberHash) {
        hash.name = name.into();
        self.members.push(hash);
    }
}

type Entries<'a, R> = tar::Entries<'a, R>;

fn next_entry<'a, R: Read>(
    entries: &mut Entries<'a, R>,
) -> Result<Option<tar::Entry<'a, R>>, BackupError> {
    match entries.next() {
        None => Ok(None),
        Some(Ok(e)) => {
            if !e.header().entry_type().is_file() {
                return Err(BackupError::NotABackup(
                    "the archive holds something other than regular files".into(),
                ));
            }
            Ok(Some(e))
        }
        Some(Err(e)) => Err(damaged(e)),
    }
}

fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, BackupError> {
    String::from_utf8(entry.path_bytes().into_owned())
        .map_err(|_| BackupError::NotABackup("a member name is not UTF-8".into()))
}

/// Reads one framed fact and verifies it; `None` at a clean end of the member.
fn read_frame(
    r: &mut impl Read,
    name: &str,
    index: u64,
) -> Result<Option<VerifiedFact>, BackupError> {
    let Some(bytes) = read_raw_frame(r, name, index)? else {
        return Ok(None);
    };
    VerifiedFact::decode(&bytes)
        .map(Some)
        .map_err(|source| BackupError::BadFact {
            member: name.into(),
            index,
            source,
        })
}

/// Reads one framed fact's bytes; `None` at a clean end of the member.
fn read_raw_frame(
    r: &mut impl Read,
    name: &str,
    index: u64,
) -> Result<Option<Vec<u8>>, BackupError> {
    let mut len = [0u8; FRAME_LEN];
    let mut got = 0;
    while got < FRAME_LEN {
        let n = r.read(&mut len[got..]).map_err(damaged)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(BackupError::NotABackup(format!(
                "{name} ends inside a fact's length"
            )));
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FACT_BYTES {
        return Err(BackupError::NotABackup(format!(
            "fact {index} of {name} claims {len} bytes, more than a fact may have"
        )));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            BackupError::NotABackup(format!("{name} ends inside fact {index}"))
        }
        _ => damaged(e),
    })?;
    Ok(Some(bytes))
}

/// Verifies a batch of facts on every core (signature checks dominate a restore), in
/// order; the error names the first fact that fails.
fn decode_parallel(raw: &[Vec<u8>]) -> Result<Vec<VerifiedFact>, (usize, DecodeError)> {
    VerifiedFact::decode_batch(raw)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| (i, e)))
        .collect()
}

/// Stores checked tail facts in one transaction; a refusal means the archive and the
/// replayed state disagree.
fn store_batch(store: &Store, batch: &[VerifiedFact]) -> Result<(), BackupError> {
    if batch.is_empty() {
        return Ok(());
    }
    let report = store.insert_batch(batch)?;
    match report.rejected.first() {
        Some(r) => Err(BackupError::RestoreMismatch(format!(
            "the store refused fact {}: {}",
            r.id, r.error
        ))),
        None => Ok(()),
    }
}

fn join_storing(
    handle: std::thread::ScopedJoinHandle<'_, Result<(), BackupError>>,
) -> Result<(), BackupError> {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Verifies the snapshot and hydrates from it: the group key comes from the membership
/// chain of the blob's own facts (`prefix`, carried ahead of the blob), followed through
/// the anchor's state facts up to the completion; nothing in the archive's header or
/// manifest is trusted for it. The blob (of `size` bytes, as its tar header says) is then
/// read in one pass from `blob`; in a restore it streams straight into the store's value
/// for it, committed once every check of the blob passed, and its facts follow in batches.
/// `prefix` (the state facts of the prefix member) is `None` for a version 1 archive: the
/// blob is then read whole, and a first pass over it yields its facts. The blob's
/// application facts are never held: once the blob is committed under its certified CID,
/// they stream from the store into the journal in batches.
fn hydrate_snapshot(
    ns: JournalNamespace,
    blob: &mut impl Read,
    size: u64,
    prefix: Option<PrefixFacts>,
    mut anchor: Vec<VerifiedFact>,
    store: Option<&Store>,
) -> Result<Replay, BackupError> {
    let completion_fact = anchor
        .pop()
        .ok_or_else(|| BackupError::NotABackup("the anchor holds no completion".into()))?;
    let completed = match completion_fact.payload() {
        Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) => c.clone(),
        _ => {
            return Err(BackupError::NotABackup(
                "the anchor's last fact is not a SnapshotCompleted".into(),
            ))
        }
    };
    let e = completed.snapshot.epoch;
    let mut v1_blob = None;
    let prefix = match prefix {
        Some(p) => p,
        None => {
            let mut bytes = Vec::new();
            blob.take(MAX_V1_BLOB_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(damaged)?;
            if bytes.len() as u64 > MAX_V1_BLOB_BYTES {
                return Err(BackupError::NotABackup(format!(
                    "member {} is larger than {MAX_V1_BLOB_BYTES} bytes",
                    member::BLOB
                )));
            }
            if SnapshotBlob::cid_of(&bytes) != completed.snapshot.blob_cid {
                return Err(HydrateError::CidMismatch.into());
            }
            let facts = read_blob(bytes.as_slice(), None)
                .map_err(snapshot_err)?
                .facts;
            v1_blob = Some(bytes);
            let mut all = FactListHash::default();
            facts.iter().for_each(|f| all.push(f.bytes()));
            let state = facts.into_iter().filter(is_state_fact).collect();
            PrefixFacts {
                state,
                all,
                state_only: false,
            }
        }
    };
    // The chain: the prefix's state (its genesis must certify `ns`, or the reducer keeps
    // no membership at all), then the state facts between E and the completion. That the
    // prefix is the blob's own state facts is checked once the blob is read.
    let mut state = reduce(ns, &prefix.state);
    let mut last: Option<(Epoch, FactId)> = None;
    for (i, f) in anchor
        .iter()
        .chain(std::iter::once(&completion_fact))
        .enumerate()
    {
        if f.epoch() < e || last.is_some_and(|l| l >= f.order_key()) {
            return Err(BackupError::NotABackup(
                "the anchor's facts are out of order or below the snapshot epoch".into(),
            ));
        }
        last = Some(f.order_key());
        state
            .check_admission(f)
            .map_err(|source| BackupError::Inadmissible {
                member: member::ANCHOR.into(),
                index: i as u64,
                source,
            })?;
        if f.id() != completion_fact.id() {
            state.apply(f);
        }
    }
    let group_key = state
        .membership_at(completion_fact.epoch())
        .map(|m| m.group_key)
        .ok_or(BackupError::NoGroupKey(completion_fact.epoch()))?;
    drop(state);
    // The signature first: a forged completion must not make a restore reserve the space
    // its blob claims.
    let msg = completed
        .snapshot
        .signing_message(&ns, &completed.proposal_id);
    if !group_key.verify(&msg, &completed.threshold_signature) {
        return Err(HydrateError::BadSignature.into());
    }
    let size = match &v1_blob {
        Some(bytes) => bytes.len() as u64,
        None => size,
    };
    let source: &mut dyn Read = match &v1_blob {
        Some(bytes) => &mut bytes.as_slice(),
        None => blob,
    };
    let check = |copy: Option<&mut BlobWriter<'_>>| {
        let mut tee = Tee {
            inner: source,
            copy,
            at: 0,
            size,
        };
        let mut blob_facts = FactListHash::default();
        let r = hydrate_stream(&mut tee, &completed, ns, &group_key, |batch| {
            batch
                .iter()
                .filter(|f| !prefix.state_only || is_state_fact(f))
                .for_each(|f| blob_facts.push(f.bytes()));
            Ok(())
        })
        .map_err(snapshot_err)?;
        // The group key came from the prefix's state facts: the prefix must be the
        // certified blob's own facts (its state facts, from version 3), byte for byte.
        if blob_facts != prefix.all {
            return Err(BackupError::NotABackup(format!(
                "member {} is not the snapshot blob's facts",
                member::PREFIX
            )));
        }
        if tee.copy.is_some() && tee.at != size {
            return Err(BackupError::NotABackup(format!(
                "member {} is shorter than its header says",
                member::BLOB
            )));
        }
        Ok(r)
    };
    let (summary, state) = match store {
        None => check(None)?,
        Some(store) => {
            if size > MAX_BLOB_BYTES {
                return Err(BackupError::NotABackup(format!(
                    "member {} is larger than {MAX_BLOB_BYTES} bytes",
                    member::BLOB
                )));
            }
            // The blob streams into the store chunk by chunk as it is checked, never held
            // whole, and is committed only if every check passed.
            let mut out = None;
            store.put_blob_with(&completed.snapshot.blob_cid, size as usize, |writer| {
                out = Some(check(Some(writer))?);
                Ok::<(), BackupError>(())
            })??;
            out.ok_or_else(|| BackupError::Target("the blob was not read".into()))?
        }
    };
    drop(v1_blob);
    let maintenance_facts = summary.fact_count;
    if let Some(store) = store {
        let certified = completed
            .certify(&ns, &group_key)
            .ok_or(HydrateError::BadSignature)?;
        let reader = store
            .blob_reader(&completed.snapshot.blob_cid)?
            .ok_or_else(|| BackupError::Target("the stored blob is gone".into()))?;
        stream_blob_facts(
            reader,
            BlobTrust::Certified(&certified),
            BATCH_FACTS,
            |batch| {
                let report = store.insert_batch(&batch)?;
                match report.rejected.first() {
                    Some(r) => Err(BackupError::RestoreMismatch(format!(
                        "the store refused snapshot fact {}: {}",
                        r.id, r.error
                    ))),
                    None => Ok(()),
                }
            },
        )?;
    }
    let mut replay = Replay::new(ns, state, e);
    replay.expected_anchor = anchor.iter().map(|f| f.id()).collect();
    replay.expected_anchor.insert(completion_fact.id());
    replay.snapshot = Some(SnapshotInfo {
        epoch: e,
        completion: completion_fact,
        maintenance_facts,
        covered_facts: summary.items,
    });
    Ok(replay)
}

/// A failure of the blob's source is damage under it (age, zstd, tar), not a bad snapshot.
/// What a restore keeps of the facts carried ahead of the blob: the state facts (the
/// root of the group key) and a hash of them all, to compare with the blob's (all of its
/// facts, or only its state facts when `state_only`: archive version 3).
struct PrefixFacts {
    state: Vec<VerifiedFact>,
    all: FactListHash,
    state_only: bool,
}

/// A running hash of a list of facts' canonical bytes, each length-prefixed, with its count.
#[derive(Default)]
struct FactListHash {
    count: u64,
    hash: blake3::Hasher,
}

impl FactListHash {
    fn push(&mut self, bytes: &[u8]) {
        self.count += 1;
        self.hash.update(&(bytes.len() as u64).to_be_bytes());
        self.hash.update(bytes);
    }
}

impl PartialEq for FactListHash {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.hash.finalize() == other.hash.finalize()
    }
}

impl From<BlobError> for BackupError {
    fn from(e: BlobError) -> Self {
        snapshot_err(e)
    }
}

fn snapshot_err(e: impl Into<HydrateError>) -> BackupError {
    match e.into() {
        HydrateError::Blob(BlobError::Read(detail)) => BackupError::Damaged(detail),
        e => BackupError::Snapshot(e),
    }
}

/// Passes bytes through, copying them into `copy` (the store's writer for the blob) when
/// given.
struct Tee<'c, 's, R> {
    inner: R,
    copy: Option<&'c mut BlobWriter<'s>>,
    at: u64,
    /// The member's size from its tar header.
    size: u64,
}

impl<R: Read> Read for Tee<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = self.copy.as_mut() {
            if self.at + n as u64 > self.size {
                return Err(io::Error::other(
                    "the blob is longer than its tar header says",
                ));
            }
            // A store failure surfaces here as an I/O error; the writer keeps the store's
            // own error, which `put_blob_with` returns in its place.
            copy.write_all(&buf[..n])?;
            self.at += n as u64;
        }
        Ok(n)
    }
}

struct SnapshotInfo {
    epoch: Epoch,
    completion: VerifiedFact,
    maintenance_facts: u64,
    covered_facts: u64,
}

/// The tail replay: checks each fact as it streams by and folds it into the state.
struct Replay {
    ns: JournalNamespace,
    /// The hydrated state (or an empty one without a snapshot), then every tail fact.
    state: Box<MaintenanceState>,
    from: Epoch,
    last: Option<(Epoch, FactId)>,
    digest: DigestBuilder,
    facts: u64,
    chunks: u64,
    min_epoch: Option<u64>,
    max_epoch: Option<u64>,
    /// Anchor facts not yet seen in the tail (the tail must hold them: they are >= E).
    expected_anchor: HashSet<FactId>,
    snapshot: Option<SnapshotInfo>,
    batch: Vec<VerifiedFact>,
    batch_bytes: usize,
}

impl Replay {
    fn new(ns: JournalNamespace, state: MaintenanceState, from: Epoch) -> Self {
        Self {
            ns,
            state: Box::new(state),
            from,
            last: None,
            digest: DigestBuilder::whole(ns),
            facts: 0,
            chunks: 0,
            min_epoch: None,
            max_epoch: None,
            expected_anchor: HashSet::new(),
            snapshot: None,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }

    fn state(&self) -> &MaintenanceState {
        &self.state
    }

    /// Streams the framed facts of one tail chunk. In a restore, each full batch is
    /// stored on a thread of its own while the next one is read and verified: the store
    /// writes on one core, verification on all of them.
    fn read_chunk(
        &mut self,
        r: &mut impl Read,
        name: &str,
        store: Option<&Store>,
    ) -> Result<(), BackupError> {
        std::thread::scope(|scope| {
            let mut storing: Option<std::thread::ScopedJoinHandle<'_, _>> = None;
            // Bounded batches: at most BATCH_FACTS facts or BATCH_BYTES bytes are read at
            // once, and one batch more is being stored, whatever the member's size.
            let mut index = 0u64;
            loop {
                let mut raw = Vec::new();
                let mut bytes = 0;
                while raw.len() < BATCH_FACTS && bytes < BATCH_BYTES {
                    match read_raw_frame(r, name, index + raw.len() as u64)? {
                        Some(b) => {
                            bytes += b.len();
                            raw.push(b);
                        }
                        None => break,
                    }
                }
                if raw.is_empty() {
                    break;
                }
                let n = raw.len() as u64;
                let facts = decode_parallel(&raw).map_err(|(i, source)| BackupError::BadFact {
                    member: name.into(),
                    index: index + i as u64,
                    source,
                })?;
                drop(raw);
                for (i, fact) in facts.into_iter().enumerate() {
                    self.push(fact, name, index + i as u64, store.is_some())?;
                }
                index += n;
                if let Some(store) = store {
                    if self.batch.len() >= BATCH_FACTS || self.batch_bytes >= BATCH_BYTES {
                        let batch = std::mem::take(&mut self.batch);
                        self.batch_bytes = 0;
                        if let Some(previous) = storing.take() {
                            join_storing(previous)?;
                        }
                        storing = Some(scope.spawn(move || store_batch(store, &batch)));
                    }
                }
            }
            match storing {
                Some(last) => join_storing(last),
                None => Ok(()),
            }
        })
    }

    /// Checks a tail fact and folds it in; keeps it for the store when `keep`.
    fn push(
        &mut self,
        f: VerifiedFact,
        name: &str,
        index: u64,
        keep: bool,
    ) -> Result<(), BackupError> {
        if f.namespace() != self.ns {
            return Err(BackupError::WrongNamespace {
                expected: self.ns,
                found: f.namespace(),
            });
        }
        if self.last.is_some_and(|l| l >= f.order_key()) {
            return Err(BackupError::NotABackup(format!(
                "fact {index} of {name} is out of (epoch, id) order"
            )));
        }
        if f.epoch() < self.from {
            return Err(BackupError::NotABackup(format!(
                "fact {index} of {name} is below the snapshot epoch {}",
                self.from
            )));
        }
        self.state()
            .check_admission(&f)
            .map_err(|source| BackupError::Inadmissible {
                member: name.into(),
                index,
                source,
            })?;
        // Every tail fact is at or above the snapshot epoch (checked above), so none is
        // covered by the snapshot or late: it applies to the state as it is.
        self.state.apply(&f);
        self.last = Some(f.order_key());
        self.digest.push(f.epoch(), f.id());
        self.facts += 1;
        self.min_epoch.get_or_insert(f.epoch().0);
        self.max_epoch = Some(f.epoch().0);
        self.expected_anchor.remove(&f.id());
        if keep {
            self.batch_bytes += f.bytes().len();
            self.batch.push(f);
        }
        Ok(())
    }

    fn flush(&mut self, store: &Store) -> Result<(), BackupError> {
        store_batch(store, &self.batch)?;
        self.batch.clear();
        self.batch_bytes = 0;
        Ok(())
    }

    /// Checks that need the whole tail.
    fn finish_checks(&self) -> Result<(), BackupError> {
        if !self.expected_anchor.is_empty() {
            return Err(BackupError::ManifestMismatch(
                "the tail lacks facts the anchor holds".into(),
            ));
        }
        if let Some(s) = &self.snapshot {
            // The reducer verified the completion's threshold signature against the key of
            // the chain at its epoch; if it does not count it, the archive lied.
            let latest = self.state().latest_snapshot.as_ref().map(|l| l.fact_id);
            if latest != Some(s.completion.id()) {
                return Err(BackupError::RestoreMismatch(
                    "the replayed journal does not take the archive's snapshot as its latest"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

fn check_manifest(
    m: &Manifest,
    header: &Header,
    members: &[MemberHash],
    replay: &Replay,
) -> Result<(), BackupError> {
    let bad = |what: &str| Err(BackupError::ManifestMismatch(what.into()));
    if m.format != ARCHIVE_FORMAT_NAME || m.version != header.version {
        return bad("its format or version differs from the header's");
    }
    if m.namespace != header.namespace {
        return bad("its journal differs from the header's");
    }
    if m.members.len() != members.len() {
        return bad("it lists a different number of members than the archive holds");
    }
    for (want, got) in m.members.iter().zip(members) {
        if want.name != got.name {
            return Err(BackupError::ManifestMismatch(format!(
                "member {} is listed as {}",
                got.name, want.name
            )));
        }
        if want.size != got.size || want.blake3 != got.blake3 {
            return Err(BackupError::ManifestMismatch(format!(
                "member {} does not have the size and BLAKE3 hash the manifest lists",
                got.name
            )));
        }
    }
    match (&m.snapshot, &replay.snapshot) {
        (None, None) => {}
        (Some(ms), Some(s)) => {
            let completed = match s.completion.payload() {
                Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) => c,
                _ => return bad("the completion is not a SnapshotCompleted"),
            };
            if ms.epoch != s.epoch.0
                || ms.blob_cid != completed.snapshot.blob_cid.to_string()
                || ms.digest != completed.snapshot.digest.to_string()
                || ms.completion_id != s.completion.id().to_string()
                || ms.completion_epoch != s.completion.epoch().0
                || ms.maintenance_facts != s.maintenance_facts
            {
                return bad("its snapshot section differs from the verified snapshot");
            }
            if ms.covered_facts != s.covered_facts {
                return bad("its covered fact count differs from the blob's");
            }
        }
        _ => return bad("it disagrees with the header on whether a snapshot is present"),
    }
    let t = &m.tail;
    if t.from_epoch != replay.from.0
        || t.facts != replay.facts
        || t.chunks != replay.chunks
        || t.min_epoch != replay.min_epoch
        || t.max_epoch != replay.max_epoch
    {
        return bad("its tail counts or epochs differ from the tail read");
    }
    if t.digest != replay.digest.finish().to_string() {
        return bad("its tail digest differs from the tail read");
    }
    Ok(())
}

/// Parses `authority:<hex>` or `context:<hex>` (the `Display` form of a namespace).
pub fn parse_namespace(s: &str) -> Result<JournalNamespace, BackupError> {
    let bad = || BackupError::NotABackup(format!("invalid journal name {s:?}"));
    let (kind, id) = s.split_once(':').ok_or_else(bad)?;
    match kind {
        "authority" => id
            .parse::<AuthorityId>()
            .map(JournalNamespace::Authority)
            .map_err(|_| bad()),
        "context" => id
            .parse::<ContextId>()
            .map(JournalNamespace::Context)
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn damaged(e: io::Error) -> BackupError {
    // age reports a payload chunk that fails authentication as InvalidData and a cut
    // file as UnexpectedEof; zstd and tar errors are io::Errors too.
    BackupError::Damaged(e.to_string().replace('\n', " "))
}

/// Counts archive bytes read and reports progress.
struct CountingReader<'p, R> {
    inner: R,
    n: Rc<Cell<u64>>,
    next_report: u64,
    progress: Option<&'p dyn Fn(Progress)>,
    total: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let done = self.n.get() + n as u64;
        self.n.set(done);
        if let Some(p) = self.progress {
            if done >= self.next_report || n == 0 {
                self.next_report = done + (1 << 20);
                p(Progress {
                    done,
                    total: self.total,
                });
            }
        }
        Ok(n)
    }
}
