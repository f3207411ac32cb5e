//! The archive layout: member names, the leading header, the trailing manifest, and the
//! framing of facts inside tail chunks.
//!
//! Inside the age encryption is one zstd frame holding a tar (ustar) archive:
//!
//! ```text
//! tend-backup/HEADER.json              format, version, journal, whether a snapshot follows
//! tend-backup/snapshot/prefix.facts    framed facts: the blob's own maintenance and authority
//!                                      facts, ahead of it (from version 2; only with a
//!                                      snapshot)
//! tend-backup/snapshot/anchor.facts    framed facts: the state facts in [E, completion),
//!                                      then the SnapshotCompleted fact (only with a snapshot)
//! tend-backup/snapshot/blob.dagcbor    the snapshot blob, exactly as stored (only with one)
//! tend-backup/tail/00000000.facts      framed facts at and above E in (epoch, id) order,
//! tend-backup/tail/00000001.facts      in chunks of at most TAIL_CHUNK_BYTES
//! ...
//! tend-backup/MANIFEST.json            counts, ranges, digests and the BLAKE3 of every
//!                                      member above (last, so export streams)
//! ```
//!
//! A framed fact is a 4-byte big-endian length followed by the fact's canonical bytes.
//!
//! Version 2 added `prefix.facts`: the blob lists its facts after its (large) item list,
//! and a reader that knows them ahead checks the blob in one pass without holding the
//! items (`tend_snapshot::blob::read_blob`). Version 2 writers put every fact of the blob
//! there, its live application facts too once blobs carried them (a second copy of most of
//! the blob); version 3 puts only its state facts, which are what a reader needs ahead
//! (the membership chain that gives the group key), and a reader checks them against the
//! blob's state facts. Versions 1 and 2 are still read, version 1 holding its blob in
//! memory.

use serde::{Deserialize, Serialize};

/// The archive format this release writes and reads.
pub const ARCHIVE_FORMAT_VERSION: u64 = 3;
/// The first version with `snapshot/prefix.facts`.
pub(crate) const PREFIX_SINCE_VERSION: u64 = 2;
/// The first version whose `snapshot/prefix.facts` holds only the blob's state facts.
pub(crate) const STATE_PREFIX_SINCE_VERSION: u64 = 3;
/// The `format` field of the header and manifest.
pub const ARCHIVE_FORMAT_NAME: &str = "tend-backup";
/// Upper bound of a tail chunk's size: export never holds more of the tail in memory.
pub const TAIL_CHUNK_BYTES: usize = 4 << 20;
/// The smallest chunk size export accepts (one maximal fact with its frame must fit).
pub const MIN_CHUNK_BYTES: usize = tend_core::MAX_FACT_BYTES + FRAME_LEN;
/// Bytes of a fact's length prefix.
pub const FRAME_LEN: usize = 4;

/// Member names, all under one directory so `tar -x` makes one folder.
pub mod member {
    /// The leading header.
    pub const HEADER: &str = "tend-backup/HEADER.json";
    /// The blob's maintenance and authority facts, ahead of the blob (from version 2).
    pub const PREFIX: &str = "tend-backup/snapshot/prefix.facts";
    /// The state facts from E up to the completion, and the completion.
    pub const ANCHOR: &str = "tend-backup/snapshot/anchor.facts";
    /// The snapshot blob.
    pub const BLOB: &str = "tend-backup/snapshot/blob.dagcbor";
    /// The prefix of tail chunk names.
    pub const TAIL_PREFIX: &str = "tend-backup/tail/";
    /// The trailing manifest.
    pub const MANIFEST: &str = "tend-backup/MANIFEST.json";

    /// The name of tail chunk `n`.
    pub fn tail(n: u64) -> String {
        format!("{TAIL_PREFIX}{n:08}.facts")
    }
}

/// Caps on member sizes a reader accepts, so a hostile archive cannot make it allocate
/// without bound (the header and manifest are held whole, the facts of the prefix and the
/// anchor are held decoded; the blob and the tail stream by).
pub(crate) const MAX_HEADER_BYTES: u64 = 64 << 10;
pub(crate) const MAX_ANCHOR_BYTES: u64 = 16 << 20;
/// The blob's facts, framed: what `read_blob` accepts, plus the frames.
pub(crate) const MAX_PREFIX_BYTES: u64 = tend_snapshot::blob::MAX_BLOB_FACT_BYTES + (4 << 20);
/// A version 1 archive's blob is read whole.
pub(crate) const MAX_V1_BLOB_BYTES: u64 = 4 << 30;
/// The largest blob a restore reserves room for in the store (redb's value limit is
/// below 4 GiB; a snapshot of 10^8 facts is 4 GB).
pub(crate) const MAX_BLOB_BYTES: u64 = 3 << 30;
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The first member: enough to refuse a newer format before reading anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`ARCHIVE_FORMAT_NAME`].
    pub format: String,
    /// [`ARCHIVE_FORMAT_VERSION`] of the writer.
    pub version: u64,
    /// The journal, as `authority:<hex>` or `context:<hex>`.
    pub namespace: String,
    /// Whether a snapshot (anchor and blob) follows; without one the tail is the whole
    /// journal.
    pub has_snapshot: bool,
    /// The release that wrote the archive (informative).
    pub written_by: String,
}

/// What the manifest says about the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSnapshot {
    /// The snapshot epoch E: the blob covers facts below it, the tail starts at it.
    pub epoch: u64,
    /// CID of the blob.
    pub blob_cid: String,
    /// The prefix digest the authority signed.
    pub digest: String,
    /// The id and epoch of the `SnapshotCompleted` fact.
    pub completion_id: String,
    pub completion_epoch: u64,
    /// Items of the prefix the blob covers, and the maintenance facts it carries.
    pub covered_facts: u64,
    pub maintenance_facts: u64,
}

/// What the manifest says about the tail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTail {
    /// The lowest epoch the tail may hold (E, or 0 without a snapshot).
    pub from_epoch: u64,
    /// Lowest and highest epoch of the facts in it.
    pub min_epoch: Option<u64>,
    pub max_epoch: Option<u64>,
    pub facts: u64,
    pub chunks: u64,
    /// The whole-journal digest (`tend-journal-digest-v1`) over the tail's items: what
    /// the restored journal index must hash to.
    pub digest: String,
}

/// One member's size and BLAKE3 hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHash {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// The last member: everything a reader checks what it read against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u64,
    pub namespace: String,
    /// The authority id (hex) for an authority journal.
    pub authority: Option<String>,
    /// `None` when the journal had no completed snapshot: the tail is then the whole journal.
    pub snapshot: Option<ManifestSnapshot>,
    pub tail: ManifestTail,
    /// Every member before the manifest, in archive order.
    pub members: Vec<MemberHash>,
    /// Seconds since the Unix epoch when the export ran, if the caller gave a clock.
    pub created_at: Option<u64>,
}

/// Appends one framed fact to `buf`.
pub(crate) fn frame(buf: &mut Vec<u8>, fact: &[u8]) {
    // Facts are at most MAX_FACT_BYTES (64 KiB), so the length always fits in u32.
    let len = u32::try_from(fact.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(fact);
}
