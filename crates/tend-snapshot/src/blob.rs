//! The snapshot blob: what a restore or a hydrating device needs, in canonical, versioned
//! DAG-CBOR, addressed by `ContentId::of(CODEC_DAG_CBOR, bytes)`.
//!
//! Wire form: `[version, namespace, epoch, base, items, facts, state_digest]` where
//! - `base` is the verified snapshot the digest chains on (the latest one below `epoch`, as
//!   the blob's facts reduce), or null for the first snapshot;
//! - `items` is, up to version 2, one byte string of 40-byte records `epoch (u64
//!   big-endian) || fact id`, strictly ascending: the prefix `{ f : base.epoch <= f.epoch <
//!   epoch }`, so a device can recompute the signed digest and tell whether a late fact is
//!   covered. Facts below the base were covered by the earlier snapshot and may be pruned
//!   everywhere. One byte string instead of a million small arrays keeps encoding and
//!   decoding linear and cheap. From version 3 on the list is history a device rarely
//!   needs (40 bytes per fact written since the previous snapshot, beside a live state
//!   that may be a hundredth of it), so it lives in an *item blob* of its own
//!   (`[1, namespace, epoch, base, items]`, [`ItemBlob`]) and `items` is an [`ItemRef`]
//!   `[cid, count, last item, prefix digest]`: the snapshot blob's CID is what the members
//!   sign, so the item blob's CID is certified with it, and its items must also hash to the
//!   signed prefix digest.
//! - `facts` holds the canonical bytes, in `(epoch, id)` order, of the prefix's maintenance
//!   and authority facts (all that reduction needs) and, from version 2 on, of its live
//!   application facts (`tend_core::app`: current values and their conflicts, untrimmed log
//!   entries, valid cache entries), the signed originals. Live facts below the base are
//!   carried again: they were live in the earlier snapshot and still are, so a device
//!   hydrated from this blob alone reads every live value. The CID names these bytes and the
//!   threshold signature names the CID, so the members certify the application state.
//! - `state_digest` is [`MaintenanceState::state_digest`] of the prefix.
//!
//! The blob is a pure function of the prefix's fact set, so every device that agrees on
//! the prefix digest builds the same bytes and the same CID.

use std::collections::{BTreeSet, HashSet};
use std::io::{self, Read};

use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::journal::DigestBuilder;
use tend_core::maintenance::CertifiedBlob;
use tend_core::{
    reduce, AppState, AuthorityId, ContentId, Epoch, FactId, Hash32, Journal, JournalNamespace,
    MaintenanceState, Payload, SnapshotBase, VerifiedFact, MAX_FACT_BYTES,
};

/// The blob format this release writes (it also reads version 1, which carried no
/// application facts, and version 2, which carried its item list inline).
pub const SNAPSHOT_BLOB_VERSION: u64 = 3;

/// The format of an item blob ([`ItemBlob`]).
pub const ITEM_BLOB_VERSION: u64 = 1;

fn readable(version: u64) -> bool {
    (1..=SNAPSHOT_BLOB_VERSION).contains(&version)
}

/// Whether a blob of `version` names an item blob instead of listing its items.
fn has_item_blob(version: u64) -> bool {
    version >= 3
}
const ITEM_LEN: usize = 40;

/// Why bytes are not a valid snapshot blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("snapshot blob format version {0} is not supported (this release reads 1 to 3)")]
    UnsupportedVersion(u64),
    #[error("malformed snapshot blob: {0}")]
    Malformed(String),
    #[error("snapshot blob items are not strictly ascending or not below the epoch")]
    Unsorted,
    #[error("snapshot blob fact {0}: {1}")]
    BadFact(usize, String),
    #[error("the state digest in the blob does not match the state its facts reduce to")]
    StateDigest,
    #[error("the blob does not hash to the CID its verified snapshot names")]
    NotCertified,
    /// The source the blob was streamed from failed (not a fault of the blob's bytes).
    #[error("reading the snapshot blob failed: {0}")]
    Read(String),
}

/// A decoded snapshot blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBlob {
    /// The format version (what [`SnapshotBlob::encode`] writes back).
    pub version: u64,
    pub namespace: JournalNamespace,
    /// The snapshot epoch E: the blob covers `{ f : f.epoch < E }`.
    pub epoch: Epoch,
    /// The earlier snapshot this one chains on (derived from `facts`, checked on decode).
    pub base: Option<SnapshotBase>,
    /// Every `(epoch, id)` of the prefix from the base's epoch on, strictly ascending. Up
    /// to version 2 the blob carries them; from version 3 on they are the item blob's, and
    /// empty in a decoded blob (see [`SnapshotBlob::item_ref`]).
    pub items: Vec<(Epoch, FactId)>,
    /// From version 3 on: the item blob this blob names.
    pub item_ref: Option<ItemRef>,
    /// The prefix's maintenance and authority facts and its live application facts,
    /// ascending.
    pub facts: Vec<VerifiedFact>,
    /// [`MaintenanceState::state_digest`] of [`SnapshotBlob::reduced_state`].
    pub state_digest: Hash32,
}

/// What a snapshot blob of version 3 says of its item blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemRef {
    /// The item blob's CID (DAG-CBOR).
    pub cid: ContentId,
    /// How many items it lists.
    pub count: u64,
    /// Its highest item (its epoch counts towards the reduced state's current epoch).
    pub last: Option<(Epoch, FactId)>,
    /// The prefix digest its items hash to (what the snapshot's `digest` is).
    pub digest: Hash32,
}

type ItemRefWire = (ContentId, u64, Option<(Epoch, FactId)>, Hash32);

impl ItemRef {
    fn wire(&self) -> ItemRefWire {
        (self.cid, self.count, self.last, self.digest)
    }
    fn from_wire((cid, count, last, digest): ItemRefWire) -> Self {
        Self {
            cid,
            count,
            last,
            digest,
        }
    }
}

/// The item list of a version 3 snapshot: every `(epoch, id)` of the prefix from the base
/// on. Wire form `[1, namespace, epoch, base, items]`, the items packed as in version 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemBlob {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub base: Option<SnapshotBase>,
    pub items: Vec<(Epoch, FactId)>,
}

impl ItemBlob {
    /// Canonical DAG-CBOR bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.items.len() * ITEM_LEN + 128);
        write_item_blob::<io::Error>(
            &mut out,
            self.namespace,
            self.epoch,
            self.base,
            self.items.len() as u64,
            self.items.iter().map(|i| Ok(*i)),
        )
        .expect("writing to a vector does not fail");
        out
    }

    /// The reference a snapshot blob keeps of these items.
    pub fn item_ref(&self) -> ItemRef {
        let mut d = DigestBuilder::chained(self.namespace, self.epoch, self.base);
        for (e, id) in &self.items {
            d.push(*e, *id);
        }
        ItemRef {
            cid: SnapshotBlob::cid_of(&self.encode()),
            count: self.items.len() as u64,
            last: self.items.last().copied(),
            digest: d.finish(),
        }
    }
}

/// Whether a fact's payload can change the maintenance state.
pub fn is_state_fact(f: &VerifiedFact) -> bool {
    matches!(f.payload(), Payload::Maintenance(_) | Payload::Authority(_))
}

/// The live application facts of a prefix (`AppState::live_facts` under the prefix's own
/// cache floors): what a snapshot carries and GC keeps below its epoch.
pub fn live_facts<'a>(
    namespace: JournalNamespace,
    prefix: impl IntoIterator<Item = &'a VerifiedFact> + Clone,
) -> BTreeSet<(Epoch, FactId)> {
    let floors = reduce(
        namespace,
        prefix.clone().into_iter().filter(|f| is_state_fact(f)),
    )
    .cache_floors;
    AppState::of(prefix).live_facts(&floors)
}

/// The facts a snapshot blob of `prefix` carries: its state facts and its live application
/// facts, ascending if `prefix` is.
pub fn blob_facts(namespace: JournalNamespace, prefix: Vec<&VerifiedFact>) -> Vec<VerifiedFact> {
    let live = live_facts(namespace, prefix.iter().copied());
    prefix
        .into_iter()
        .filter(|f| is_state_fact(f) || live.contains(&f.order_key()))
        .cloned()
        .collect()
}

impl SnapshotBlob {
    /// The blob of `journal`'s prefix below `epoch`.
    pub fn from_journal(journal: &Journal, epoch: Epoch) -> Self {
        let prefix: Vec<&VerifiedFact> = journal.iter().take_while(|f| f.epoch() < epoch).collect();
        let items = prefix.iter().map(|f| f.order_key()).collect();
        let facts = blob_facts(journal.namespace(), prefix);
        Self::from_parts(journal.namespace(), epoch, items, facts)
    }

    /// A blob from its parts: `items` strictly ascending and below `epoch` (items below the
    /// base snapshot, if given, are dropped), `facts` every state fact and every live
    /// application fact below `epoch` (see the module documentation), ascending. The base
    /// and the state digest are derived here.
    pub fn from_parts(
        namespace: JournalNamespace,
        epoch: Epoch,
        mut items: Vec<(Epoch, FactId)>,
        facts: Vec<VerifiedFact>,
    ) -> Self {
        let base = reduce(namespace, &facts).snapshot_base(epoch);
        if let Some(b) = base {
            items.retain(|(e, _)| *e >= b.epoch);
        }
        let item_ref = ItemBlob {
            namespace,
            epoch,
            base,
            items,
        };
        let mut blob = Self {
            version: SNAPSHOT_BLOB_VERSION,
            namespace,
            epoch,
            base,
            item_ref: Some(item_ref.item_ref()),
            items: item_ref.items,
            facts,
            state_digest: Hash32([0; 32]),
        };
        blob.state_digest = blob.reduced_state().state_digest();
        blob
    }

    /// The item blob of a version 3 blob built here ([`SnapshotBlob::from_parts`]), which
    /// still holds its items; `None` for older versions and decoded blobs.
    pub fn item_blob(&self) -> Option<ItemBlob> {
        let r = self.item_ref.filter(|_| has_item_blob(self.version))?;
        (r.count == self.items.len() as u64).then(|| ItemBlob {
            namespace: self.namespace,
            epoch: self.epoch,
            base: self.base,
            items: self.items.clone(),
        })
    }

    /// The highest item of the prefix from the base on.
    fn last_item(&self) -> Option<(Epoch, FactId)> {
        match self.item_ref.filter(|_| has_item_blob(self.version)) {
            Some(r) => r.last,
            None => self.items.last().copied(),
        }
    }

    /// The maintenance state of the prefix.
    pub fn reduced_state(&self) -> MaintenanceState {
        let mut state = reduce(self.namespace, &self.facts);
        // Application facts are not in the blob, but their epochs count towards the
        // epoch a device stamps new facts with.
        if let Some((e, _)) = self.last_item() {
            state.observe_epoch(e);
        }
        state
    }

    /// The digest of the prefix (what `SnapshotV1::digest` certifies); from version 3 on,
    /// what the blob says its item blob hashes to.
    pub fn prefix_digest(&self) -> Hash32 {
        if let Some(r) = self.item_ref.filter(|_| has_item_blob(self.version)) {
            return r.digest;
        }
        let mut d = DigestBuilder::chained(self.namespace, self.epoch, self.base);
        for (e, id) in &self.items {
            d.push(*e, *id);
        }
        d.finish()
    }

    /// Canonical DAG-CBOR bytes (of the blob's own version: a version 3 blob without an
    /// item reference is encoded as version 2).
    pub fn encode(&self) -> Vec<u8> {
        let facts: Vec<&serde_bytes::Bytes> = self
            .facts
            .iter()
            .map(|f| serde_bytes::Bytes::new(f.bytes()))
            .collect();
        if let Some(r) = self.item_ref.filter(|_| has_item_blob(self.version)) {
            return to_canonical(&(
                self.version,
                &self.namespace,
                self.epoch,
                self.base,
                r.wire(),
                facts,
                self.state_digest,
            ));
        }
        let mut packed = Vec::with_capacity(self.items.len() * ITEM_LEN);
        for (e, id) in &self.items {
            packed.extend_from_slice(&e.0.to_be_bytes());
            packed.extend_from_slice(id.as_bytes());
        }
        to_canonical(&(
            self.version,
            &self.namespace,
            self.epoch,
            self.base,
            serde_bytes::Bytes::new(&packed),
            facts,
            self.state_digest,
        ))
    }

    /// The head of this blob's encoding, for [`write_blob`] (a version 3 blob built here).
    pub fn head(&self) -> Option<BlobHead> {
        Some(BlobHead {
            namespace: self.namespace,
            epoch: self.epoch,
            base: self.base,
            item_ref: self.item_ref?,
            facts: self.facts.len() as u64,
            state_digest: self.state_digest,
        })
    }

    /// The CID of encoded blob bytes.
    pub fn cid_of(bytes: &[u8]) -> ContentId {
        ContentId::of(CODEC_DAG_CBOR, bytes)
    }

    /// Decodes and checks a blob: version, canonical encoding, ascending items below the
    /// epoch, every fact verifying, in the namespace and listed among the items, and the
    /// state digest matching what the facts reduce to.
    pub fn decode(bytes: &[u8]) -> Result<Self, BlobError> {
        type Wire = (
            u64,
            JournalNamespace,
            Epoch,
            Option<SnapshotBase>,
            ByteBuf,
            Vec<ByteBuf>,
            Hash32,
        );
        type WireV3 = (
            u64,
            JournalNamespace,
            Epoch,
            Option<SnapshotBase>,
            ItemRefWire,
            Vec<ByteBuf>,
            Hash32,
        );
        // Peek at the version first so a newer format gets a clear error.
        let peeked = peek_version(bytes);
        if let Some(v) = peeked.filter(|v| !readable(*v)) {
            return Err(BlobError::UnsupportedVersion(v));
        }
        let malformed = |e: tend_core::DecodeError| BlobError::Malformed(e.to_string());
        let (version, namespace, epoch, base, packed, item_ref, raw_facts, state_digest) =
            if peeked.is_some_and(has_item_blob) {
                let (version, namespace, epoch, base, r, raw_facts, state_digest): WireV3 =
                    from_canonical(bytes).map_err(malformed)?;
                let r = ItemRef::from_wire(r);
                let floor = base.map_or(Epoch::ZERO, |b| b.epoch);
                if r.last.is_some_and(|(e, _)| e >= epoch || e < floor) {
                    return Err(BlobError::Unsorted);
                }
                let none = ByteBuf::new();
                (
                    version,
                    namespace,
                    epoch,
                    base,
                    none,
                    Some(r),
                    raw_facts,
                    state_digest,
                )
            } else {
                let (version, namespace, epoch, base, packed, raw_facts, state_digest): Wire =
                    from_canonical(bytes).map_err(malformed)?;
                (
                    version,
                    namespace,
                    epoch,
                    base,
                    packed,
                    None,
                    raw_facts,
                    state_digest,
                )
            };
        if packed.len() % ITEM_LEN != 0 {
            return Err(BlobError::Malformed(
                "item list length is not a multiple of 40".into(),
            ));
        }
        let mut items = Vec::with_capacity(packed.len() / ITEM_LEN);
        for rec in packed.chunks_exact(ITEM_LEN) {
            let (e, id) = rec.split_at(8);
            let e = Epoch(u64::from_be_bytes(
                e.try_into().map_err(|_| BlobError::Unsorted)?,
            ));
            let id = FactId(id.try_into().map_err(|_| BlobError::Unsorted)?);
            let below_base = base.is_some_and(|b| e < b.epoch);
            if e >= epoch || below_base || items.last().is_some_and(|last| *last >= (e, id)) {
                return Err(BlobError::Unsorted);
            }
            items.push((e, id));
        }
        let mut facts = Vec::with_capacity(raw_facts.len());
        for (i, raw) in raw_facts.iter().enumerate() {
            let f = VerifiedFact::decode(raw).map_err(|e| BlobError::BadFact(i, e.to_string()))?;
            if f.namespace() != namespace {
                return Err(BlobError::BadFact(i, "fact of another namespace".into()));
            }
            // Facts below the base were pruned from the item list, not from the state; a
            // version 3 blob's items are in its item blob.
            let below_base = base.is_some_and(|b| f.epoch() < b.epoch);
            let listed = item_ref.is_some() || items.binary_search(&f.order_key()).is_ok();
            if f.epoch() >= epoch || (!below_base && !listed) {
                return Err(BlobError::BadFact(i, "fact is not in the prefix".into()));
            }
            if facts
                .last()
                .is_some_and(|l: &VerifiedFact| l.order_key() >= f.order_key())
            {
                return Err(BlobError::BadFact(i, "facts are not ascending".into()));
            }
            facts.push(f);
        }
        let blob = Self {
            version,
            namespace,
            epoch,
            base,
            items,
            item_ref,
            facts,
            state_digest,
        };
        let state = blob.reduced_state();
        if state.state_digest() != state_digest {
            return Err(BlobError::StateDigest);
        }
        if state.snapshot_base(epoch) != base {
            return Err(BlobError::Malformed(
                "the base snapshot is not the latest one its facts verify".into(),
            ));
        }
        Ok(blob)
    }

    /// The authority the blob belongs to, if it is an authority journal.
    pub fn authority(&self) -> Option<AuthorityId> {
        match self.namespace {
            JournalNamespace::Authority(a) => Some(a),
            JournalNamespace::Context(_) => None,
        }
    }
}

/// What precedes and sizes a blob's facts in its encoding (see [`write_blob`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHead {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub base: Option<SnapshotBase>,
    /// The item blob ([`write_item_blob`] returns it).
    pub item_ref: ItemRef,
    /// Number of facts that follow.
    pub facts: u64,
    pub state_digest: Hash32,
}

fn wrong_count<E: From<io::Error>>(what: &str) -> E {
    E::from(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the blob's {what} are not as many as its head says"),
    ))
}

/// Writes the item blob of a snapshot as the items stream by (ascending, `count` of them),
/// byte for byte what [`ItemBlob::encode`] writes, holding none of it, and returns the
/// reference the snapshot blob keeps of it ([`ItemRef`], its CID hashed as it went).
/// Fails with `InvalidData` if the items are fewer or more than `count`.
pub fn write_item_blob<E: From<io::Error>>(
    w: &mut impl io::Write,
    namespace: JournalNamespace,
    epoch: Epoch,
    base: Option<SnapshotBase>,
    count: u64,
    items: impl IntoIterator<Item = Result<(Epoch, FactId), E>>,
) -> Result<ItemRef, E> {
    use io::Write as _;
    let mut w = Hashing {
        w,
        hasher: blake3::Hasher::new(),
    };
    let item_bytes = count
        .checked_mul(ITEM_LEN as u64)
        .ok_or_else(|| wrong_count::<E>("items"))?;
    write_cbor_head(&mut w, MAJOR_ARRAY, 5)?;
    w.write_all(&to_canonical(&ITEM_BLOB_VERSION))?;
    w.write_all(&to_canonical(&namespace))?;
    w.write_all(&to_canonical(&epoch))?;
    w.write_all(&to_canonical(&base))?;
    write_cbor_head(&mut w, MAJOR_BYTES, item_bytes)?;
    let mut digest = DigestBuilder::chained(namespace, epoch, base);
    let mut n = 0u64;
    let mut last = None;
    let mut record = [0u8; ITEM_LEN];
    for item in items {
        let (e, id) = item?;
        record[..8].copy_from_slice(&e.0.to_be_bytes());
        record[8..].copy_from_slice(id.as_bytes());
        w.write_all(&record)?;
        digest.push(e, id);
        last = Some((e, id));
        n += 1;
    }
    if n != count {
        return Err(wrong_count("items"));
    }
    Ok(ItemRef {
        cid: ContentId::from_blake3(CODEC_DAG_CBOR, &Hash32(*w.hasher.finalize().as_bytes())),
        count,
        last,
        digest: digest.finish(),
    })
}

/// A writer that hashes what goes through it.
struct Hashing<'a, W> {
    w: &'a mut W,
    hasher: blake3::Hasher,
}

impl<W: io::Write> io::Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Writes a blob of the current format as its facts stream by, byte for byte what
/// [`SnapshotBlob::encode`] writes for the same blob, holding none of it: the caller
/// hands the facts' canonical bytes in ascending order (a store reads them from its index
/// without decoding a fact), so a device builds the blob of a million-fact prefix with a
/// bounded buffer and hashes or stores it as it goes. The items go to the item blob first
/// ([`write_item_blob`]). Fails with `InvalidData` if the facts are fewer or more than
/// `head` says.
///
/// ```
/// # use tend_snapshot::blob::{write_blob, SnapshotBlob};
/// # use tend_core::{Epoch, JournalNamespace, ContextId, FactId};
/// let blob = SnapshotBlob::from_parts(
///     JournalNamespace::Context(ContextId([1; 32])), Epoch(2), vec![(Epoch(1), FactId([7; 32]))], vec![]);
/// let mut out = Vec::new();
/// write_blob(&mut out, &blob.head().unwrap(), std::iter::empty::<std::io::Result<&[u8]>>()).unwrap();
/// assert_eq!(out, blob.encode());
/// ```
pub fn write_blob<E: From<io::Error>, B: AsRef<[u8]>>(
    w: &mut impl io::Write,
    head: &BlobHead,
    facts: impl IntoIterator<Item = Result<B, E>>,
) -> Result<(), E> {
    w.write_all(&head.leading_bytes())?;
    let mut n = 0u64;
    for fact in facts {
        let fact = fact?;
        let bytes = fact.as_ref();
        write_cbor_head(w, MAJOR_BYTES, bytes.len() as u64)?;
        w.write_all(bytes)?;
        n += 1;
    }
    if n != head.facts {
        return Err(wrong_count::<E>("facts"));
    }
    w.write_all(&head.trailing_bytes())?;
    Ok(())
}

impl BlobHead {
    /// The bytes of a blob with this head before its first fact ([`write_blob`]).
    pub fn leading_bytes(&self) -> Vec<u8> {
        let mut w = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = write_cbor_head(&mut w, MAJOR_ARRAY, 7);
        w.extend_from_slice(&to_canonical(&SNAPSHOT_BLOB_VERSION));
        w.extend_from_slice(&to_canonical(&self.namespace));
        w.extend_from_slice(&to_canonical(&self.epoch));
        w.extend_from_slice(&to_canonical(&self.base));
        w.extend_from_slice(&to_canonical(&self.item_ref.wire()));
        let _ = write_cbor_head(&mut w, MAJOR_ARRAY, self.facts);
        w
    }

    /// The bytes of a blob with this head after its last fact: the state digest. Between
    /// the two, each fact is the DAG-CBOR byte string of its canonical bytes.
    pub fn trailing_bytes(&self) -> Vec<u8> {
        to_canonical(&self.state_digest)
    }
}

/// A CBOR head (major type and argument) in its shortest form, as canonical DAG-CBOR wants.
fn write_cbor_head(w: &mut impl io::Write, major: u8, n: u64) -> io::Result<()> {
    let m = major << 5;
    match n {
        0..=23 => w.write_all(&[m | n as u8]),
        24..=0xff => w.write_all(&[m | 24, n as u8]),
        0x100..=0xffff => {
            w.write_all(&[m | 25])?;
            w.write_all(&(n as u16).to_be_bytes())
        }
        0x1_0000..=0xffff_ffff => {
            w.write_all(&[m | 26])?;
            w.write_all(&(n as u32).to_be_bytes())
        }
        _ => {
            w.write_all(&[m | 27])?;
            w.write_all(&n.to_be_bytes())
        }
    }
}

/// Reads the leading version number of a blob, whatever follows.
fn peek_version(bytes: &[u8]) -> Option<u64> {
    use serde::de::{self, Deserialize, Deserializer};
    struct Peek(u64);
    impl<'de> Deserialize<'de> for Peek {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> de::Visitor<'de> for V {
                type Value = Peek;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an array starting with a version")
                }
                fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Peek, A::Error> {
                    let v: u64 = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                    while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                    Ok(Peek(v))
                }
            }
            d.deserialize_seq(V)
        }
    }
    serde_ipld_dagcbor::from_slice::<Peek>(bytes)
        .ok()
        .map(|p| p.0)
}

/// Upper bound of one small CBOR item of the blob (namespace, epoch, base, digest).
const MAX_SMALL_ITEM_BYTES: usize = 4 << 10;
/// Upper bound of the canonical bytes of all facts a blob may carry: the maintenance facts
/// and the live application facts (a million live records of ~200 bytes is 200 MiB). The
/// cap keeps a hostile blob from making a reader hold gigabytes.
pub const MAX_BLOB_FACT_BYTES: u64 = 1 << 30;
/// Item records read per `read` call: a multiple of 40 bytes near 64 KiB.
const ITEM_BUF: usize = ITEM_LEN * 1638;

/// What a one-pass read of a blob ([`read_blob`]) found: everything but the item list,
/// which was checked (and hashed into the prefix digest) as it went by and is not kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobSummary {
    /// The format version.
    pub version: u64,
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub base: Option<SnapshotBase>,
    /// Number of `(epoch, id)` items.
    pub items: u64,
    /// The highest item.
    pub last_item: Option<(Epoch, FactId)>,
    /// From version 3 on: the item blob the blob names (`items`, `last_item` and
    /// `prefix_digest` are then what the blob says of it).
    pub item_ref: Option<ItemRef>,
    /// Number of facts in the blob (the state facts and the live application facts).
    pub fact_count: u64,
    /// The byte offset of the first fact: the facts follow as DAG-CBOR byte strings of
    /// their canonical bytes, ascending, then the state digest.
    pub facts_at: u64,
    /// The highest epoch of an item or a fact (the facts a streamed read handed out
    /// included), which the reduced state has observed.
    pub last_epoch: Option<Epoch>,
    /// The prefix's maintenance and authority facts and live application facts, ascending.
    pub facts: Vec<VerifiedFact>,
    pub state_digest: Hash32,
    /// [`SnapshotBlob::prefix_digest`] of the items.
    pub prefix_digest: Hash32,
    /// [`SnapshotBlob::cid_of`] the bytes read.
    pub cid: ContentId,
    /// Bytes read.
    pub bytes: u64,
}

impl BlobSummary {
    /// The maintenance state of the prefix (as [`SnapshotBlob::reduced_state`]).
    pub fn reduced_state(&self) -> MaintenanceState {
        let mut state = reduce(self.namespace, &self.facts);
        if let Some(e) = self.last_epoch {
            state.observe_epoch(e);
        }
        state
    }
}

/// Reads and checks a canonical blob from `r` in one pass, holding a 64 KiB buffer and the
/// blob's facts, never the item list: the checks of [`SnapshotBlob::decode`], with the
/// prefix digest and the CID computed as the bytes go by. Reads `r` to its end (trailing
/// bytes are an error).
///
/// The facts come after the items in the blob, so checking that each fact is among the
/// items needs the facts ahead: pass them as `facts_ahead` (e.g. from an earlier pass or
/// a copy carried before the blob) and the check is a merge of two ascending lists, and
/// the blob's facts must then equal them byte for byte. With `None` the facts are
/// collected and that one check is skipped: the caller must not trust the result beyond
/// a structural check until it has read the blob again with them.
pub fn read_blob(
    r: impl Read,
    facts_ahead: Option<&[VerifiedFact]>,
) -> Result<BlobSummary, BlobError> {
    read_blob_inner(r, facts_ahead, None, None, 0, None)
}

/// [`read_blob`] of a blob whose completion verified ([`CertifiedBlob`]): the facts are
/// decoded without checking each author's signature (the members' threshold signature
/// vouches for them), and the result is an error unless the bytes hash to the certified
/// CID, so no fact decoded that way escapes from bytes that are not the certified blob.
/// Several times faster than one Ed25519 verification per fact.
pub fn read_certified_blob(r: impl Read, blob: &CertifiedBlob) -> Result<BlobSummary, BlobError> {
    read_blob_inner(r, None, Some(blob), None, 0, None)
}

/// How far the facts of a streamed blob ([`stream_blob_facts`]) are trusted.
#[derive(Clone, Copy, Debug)]
pub enum BlobTrust<'a> {
    /// The completion's threshold signature verified: facts are decoded without checking
    /// each author's signature.
    Certified(&'a CertifiedBlob),
    /// No group key is known yet (a joining device): every fact's own signature is checked.
    EachSignature,
}

/// Reads a blob in one pass and hands its facts, ascending, to `sink` in batches of at
/// most `batch` (the last one shorter), so a hydrating device holds one batch, never the
/// blob's live state: peak memory stays flat however many live records a snapshot carries.
/// The returned summary's `facts` are the state facts only ([`is_state_fact`]); the
/// application facts went to the sink alone.
///
/// The bytes must already be known to be the blob the snapshot names, for example read
/// back from a store that checked their CID when it stored them: facts reach `sink` before
/// the end of the blob, where the CID and the state digest are checked. With
/// [`BlobTrust::Certified`] the result is still an error if the bytes do not hash to the
/// certified CID, but what the sink took before is the caller's to undo.
///
/// ```
/// # use tend_snapshot::blob::{stream_blob_facts, BlobTrust, SnapshotBlob};
/// # use tend_core::{Epoch, JournalNamespace, ContextId};
/// let blob = SnapshotBlob::from_parts(JournalNamespace::Context(ContextId([1; 32])), Epoch(1), vec![], vec![]);
/// let mut seen = 0;
/// let summary = stream_blob_facts(&blob.encode()[..], BlobTrust::EachSignature, 10_000, |batch| {
///     seen += batch.len();
///     Ok::<(), tend_snapshot::BlobError>(())
/// })
/// .unwrap();
/// assert_eq!((seen, summary.items), (0, 0));
/// ```
pub fn stream_blob_facts<E: From<BlobError>>(
    r: impl Read,
    trust: BlobTrust<'_>,
    batch: usize,
    mut sink: impl FnMut(Vec<VerifiedFact>) -> Result<(), E>,
) -> Result<BlobSummary, E> {
    let certified = match trust {
        BlobTrust::Certified(c) => Some(c),
        BlobTrust::EachSignature => None,
    };
    // The sink's own error stops the read and is handed back as it was.
    let mut stopped: Option<E> = None;
    let mut inner_sink = |facts: Vec<VerifiedFact>| {
        sink(facts).map_err(|e| {
            stopped = Some(e);
            BlobError::Read("stopped by the fact sink".into())
        })
    };
    let read = read_blob_inner(
        r,
        None,
        certified,
        Some(&mut inner_sink),
        batch.max(1),
        None,
    );
    match (read, stopped) {
        (_, Some(e)) => Err(e),
        (read, None) => read.map_err(E::from),
    }
}

/// What settling a snapshot needs of its blob ([`read_blob_keys`]): the keys, never the
/// facts, so a blob of a million live records costs about 40 bytes a record to settle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobKeys {
    /// The format version.
    pub version: u64,
    /// The earlier snapshot this one chains on.
    pub base: Option<SnapshotBase>,
    /// Every `(epoch, id)` of the prefix from the base's epoch on, ascending.
    pub items: Vec<(Epoch, FactId)>,
    /// The `(epoch, id)` of the blob's facts (the state facts and the live application
    /// facts of the whole prefix), ascending.
    pub facts: Vec<(Epoch, FactId)>,
    /// The ids of its maintenance and authority facts.
    pub state_facts: HashSet<FactId>,
    /// Where its facts start ([`BlobSummary::facts_at`]).
    pub facts_at: u64,
    /// From version 3 on: the item blob holding `items` (empty here then), read with
    /// [`read_item_blob`] only by a device that needs them.
    pub item_ref: Option<ItemRef>,
    /// The epoch of the snapshot.
    pub epoch: Epoch,
    pub namespace: Option<JournalNamespace>,
}

/// Reads a certified blob in one pass and keeps only its keys ([`BlobKeys`]), with every
/// check of [`read_certified_blob`].
pub fn read_blob_keys(r: impl Read, blob: &CertifiedBlob) -> Result<BlobKeys, BlobError> {
    let mut keys = BlobKeys::default();
    let mut sink = |batch: Vec<VerifiedFact>| -> Result<(), BlobError> {
        keys.facts.extend(batch.iter().map(|f| f.order_key()));
        Ok(())
    };
    let mut items = Vec::new();
    let summary = read_blob_inner(
        r,
        None,
        Some(blob),
        Some(&mut sink),
        10_000,
        Some(&mut items),
    )?;
    keys.version = summary.version;
    keys.facts_at = summary.facts_at;
    keys.base = summary.base;
    keys.items = items;
    keys.item_ref = summary.item_ref;
    keys.epoch = summary.epoch;
    keys.namespace = Some(summary.namespace);
    keys.state_facts = summary.facts.iter().map(|f| f.id()).collect();
    Ok(keys)
}

/// Reads an item blob ([`ItemBlob`]) in one pass and returns its items, with every check:
/// its format, that it belongs to the snapshot at `epoch` of `namespace` chained on `base`,
/// items strictly ascending from the base to the epoch, and its count, last item, prefix
/// digest and CID exactly as `expected` (the certified snapshot blob's reference) says.
pub fn read_item_blob(
    r: impl Read,
    namespace: JournalNamespace,
    epoch: Epoch,
    base: Option<SnapshotBase>,
    expected: &ItemRef,
) -> Result<Vec<(Epoch, FactId)>, BlobError> {
    let mut src = Source {
        r,
        hasher: blake3::Hasher::new(),
        n: 0,
    };
    let (major, fields) = src.head()?;
    if major != MAJOR_ARRAY || fields != 5 {
        return Err(malformed("not an item blob"));
    }
    let (major, version) = src.head()?;
    if major != MAJOR_UINT {
        return Err(malformed(
            "the item blob's version is not an unsigned integer",
        ));
    }
    if version != ITEM_BLOB_VERSION {
        return Err(BlobError::Malformed(format!(
            "item blob format version {version} is not supported (this release reads {ITEM_BLOB_VERSION})"
        )));
    }
    let ns: JournalNamespace = src.small_item("namespace")?;
    let e: Epoch = src.small_item("epoch")?;
    let b: Option<SnapshotBase> = src.small_item("base")?;
    if (ns, e, b) != (namespace, epoch, base) {
        return Err(malformed("the item blob belongs to another snapshot"));
    }
    // The count is checked below; it only sizes the first allocation, within reason.
    let mut items = Vec::with_capacity(usize::try_from(expected.count.min(1 << 20)).unwrap_or(0));
    let read = read_inline_items(&mut src, namespace, epoch, base, None, Some(&mut items))?;
    let (last, count, digest) = (read.last, read.count, read.digest);
    if !src.at_end()? {
        return Err(malformed("bytes follow the item blob"));
    }
    let cid = ContentId::from_blake3(CODEC_DAG_CBOR, &Hash32(*src.hasher.finalize().as_bytes()));
    if cid != expected.cid {
        return Err(BlobError::NotCertified);
    }
    if (count, last, digest) != (expected.count, expected.last, expected.digest) {
        return Err(malformed(
            "the item blob does not match what its snapshot blob says of it",
        ));
    }
    Ok(items)
}

/// The item blob a stored snapshot blob names (`None` before version 3), read from the
/// head of its bytes alone. The bytes must already be known to be the blob (a store checked
/// their CID when it stored them): nothing after the reference is read or checked.
pub fn read_item_ref(r: impl Read) -> Result<Option<ItemRef>, BlobError> {
    let mut src = Source {
        r,
        hasher: blake3::Hasher::new(),
        n: 0,
    };
    let (major, fields) = src.head()?;
    let (vmajor, version) = src.head()?;
    if major != MAJOR_ARRAY || fields != 7 || vmajor != MAJOR_UINT {
        return Err(malformed("not a snapshot blob"));
    }
    if !readable(version) {
        return Err(BlobError::UnsupportedVersion(version));
    }
    if !has_item_blob(version) {
        return Ok(None);
    }
    let _: JournalNamespace = src.small_item("namespace")?;
    let _: Epoch = src.small_item("epoch")?;
    let _: Option<SnapshotBase> = src.small_item("base")?;
    Ok(Some(ItemRef::from_wire(src.small_item("item blob")?)))
}

impl BlobKeys {
    /// The items of a version 3 blob, read from its item blob ([`read_item_blob`]).
    pub fn read_items(&self, r: impl Read) -> Result<Vec<(Epoch, FactId)>, BlobError> {
        let (Some(expected), Some(ns)) = (self.item_ref.as_ref(), self.namespace) else {
            return Ok(self.items.clone());
        };
        read_item_blob(r, ns, self.epoch, self.base, expected)
    }
}

/// Where a one-pass read hands the blob's facts in batches.
type FactSink<'a> = &'a mut dyn FnMut(Vec<VerifiedFact>) -> Result<(), BlobError>;

fn read_blob_inner(
    r: impl Read,
    facts_ahead: Option<&[VerifiedFact]>,
    certified: Option<&CertifiedBlob>,
    mut sink: Option<FactSink<'_>>,
    batch_len: usize,
    items_out: Option<&mut Vec<(Epoch, FactId)>>,
) -> Result<BlobSummary, BlobError> {
    let mut src = Source {
        r,
        hasher: blake3::Hasher::new(),
        n: 0,
    };
    let (major, fields) = src.head()?;
    if major != MAJOR_ARRAY {
        return Err(malformed("not an array"));
    }
    let (major, version) = src.head()?;
    if major != MAJOR_UINT {
        return Err(malformed("the version is not an unsigned integer"));
    }
    // The version before the shape, so a newer format gets a clear error.
    if !readable(version) {
        return Err(BlobError::UnsupportedVersion(version));
    }
    if fields != 7 {
        return Err(malformed("not an array of 7 fields"));
    }
    let namespace: JournalNamespace = src.small_item("namespace")?;
    let epoch: Epoch = src.small_item("epoch")?;
    let base: Option<SnapshotBase> = src.small_item("base")?;

    let floor = base.map_or(Epoch::ZERO, |b| b.epoch);
    let (last, items, prefix_digest, item_ref) = if has_item_blob(version) {
        // The items are in the item blob; what the blob says of them is all there is here.
        let r = ItemRef::from_wire(src.small_item("item blob")?);
        if r.last.is_some_and(|(e, _)| e >= epoch || e < floor) {
            return Err(BlobError::Unsorted);
        }
        (r.last, r.count, r.digest, Some(r))
    } else {
        let read = read_inline_items(&mut src, namespace, epoch, base, facts_ahead, items_out)?;
        (read.last, read.count, read.digest, None)
    };

    let (major, count) = src.head()?;
    if major != MAJOR_ARRAY {
        return Err(malformed("the fact list is not an array"));
    }
    let facts_at = src.n;
    if let Some(ahead) = facts_ahead {
        if count != ahead.len() as u64 {
            return Err(malformed("its facts differ from the facts given ahead"));
        }
    }
    // Collected whole, or (streaming) only the state facts, the rest going out in batches.
    let mut facts: Vec<VerifiedFact> = Vec::new();
    let mut batch: Vec<VerifiedFact> = Vec::new();
    let mut last_fact: Option<(Epoch, FactId)> = None;
    let mut fact_bytes = 0u64;
    for i in 0..count {
        let i = usize::try_from(i).unwrap_or(usize::MAX);
        let (major, len) = src.head()?;
        if major != MAJOR_BYTES {
            return Err(BlobError::BadFact(i, "not a byte string".into()));
        }
        fact_bytes = fact_bytes.saturating_add(len);
        if len > MAX_FACT_BYTES as u64 || fact_bytes > MAX_BLOB_FACT_BYTES {
            return Err(BlobError::BadFact(i, format!("{len} bytes is too large")));
        }
        let mut raw = vec![0u8; len as usize];
        src.exact(&mut raw)?;
        let f = match certified {
            Some(c) => VerifiedFact::decode_certified(&raw, c),
            None => VerifiedFact::decode(&raw),
        }
        .map_err(|e| BlobError::BadFact(i, e.to_string()))?;
        if f.namespace() != namespace {
            return Err(BlobError::BadFact(i, "fact of another namespace".into()));
        }
        if f.epoch() >= epoch {
            return Err(BlobError::BadFact(i, "fact is not in the prefix".into()));
        }
        if last_fact.is_some_and(|l| l >= f.order_key()) {
            return Err(BlobError::BadFact(i, "facts are not ascending".into()));
        }
        last_fact = Some(f.order_key());
        if let Some(ahead) = facts_ahead {
            if ahead.get(i).map(|a| a.bytes()) != Some(f.bytes()) {
                return Err(BlobError::BadFact(
                    i,
                    "fact differs from the facts given ahead".into(),
                ));
            }
        }
        match sink.as_mut() {
            None => facts.push(f),
            Some(sink) => {
                if is_state_fact(&f) {
                    facts.push(f.clone());
                }
                batch.push(f);
                if batch.len() >= batch_len {
                    sink(std::mem::take(&mut batch))?;
                }
            }
        }
    }
    if let Some(sink) = sink.as_mut() {
        if !batch.is_empty() {
            sink(batch)?;
        }
    }
    let state_digest: Hash32 = src.small_item("state digest")?;
    if !src.at_end()? {
        return Err(malformed("bytes follow the blob"));
    }
    let summary = BlobSummary {
        version,
        namespace,
        epoch,
        base,
        items,
        last_item: last,
        item_ref,
        fact_count: count,
        facts_at,
        last_epoch: last.map(|(e, _)| e).max(last_fact.map(|(e, _)| e)),
        facts,
        state_digest,
        prefix_digest,
        cid: ContentId::from_blake3(CODEC_DAG_CBOR, &Hash32(*src.hasher.finalize().as_bytes())),
        bytes: src.n,
    };
    if certified.is_some_and(|c| c.cid() != summary.cid) {
        return Err(BlobError::NotCertified);
    }
    let state = summary.reduced_state();
    if state.state_digest() != state_digest {
        return Err(BlobError::StateDigest);
    }
    if state.snapshot_base(epoch) != base {
        return Err(malformed(
            "the base snapshot is not the latest one its facts verify",
        ));
    }
    Ok(summary)
}

/// Reads a version 1 or 2 blob's inline item list: checked, hashed into the prefix digest
/// and merged against the facts given ahead, 64 KiB at a time. Returns the last item, the
/// count and the prefix digest.
fn read_inline_items<R: Read>(
    src: &mut Source<R>,
    namespace: JournalNamespace,
    epoch: Epoch,
    base: Option<SnapshotBase>,
    facts_ahead: Option<&[VerifiedFact]>,
    mut items_out: Option<&mut Vec<(Epoch, FactId)>>,
) -> Result<InlineItems, BlobError> {
    let (major, len) = src.head()?;
    if major != MAJOR_BYTES {
        return Err(malformed("the item list is not a byte string"));
    }
    if len % ITEM_LEN as u64 != 0 {
        return Err(malformed("item list length is not a multiple of 40"));
    }
    let floor = base.map_or(Epoch::ZERO, |b| b.epoch);
    // Facts below the base were pruned from the item list, not from the state.
    let mut ahead = facts_ahead
        .unwrap_or(&[])
        .iter()
        .enumerate()
        .filter(|(_, f)| f.epoch() >= floor)
        .peekable();
    let mut digest = DigestBuilder::chained(namespace, epoch, base);
    let mut last: Option<(Epoch, FactId)> = None;
    let mut items = 0u64;
    let mut left = len;
    let mut buf = vec![0u8; ITEM_BUF.min(usize::try_from(len).unwrap_or(ITEM_BUF))];
    while left > 0 {
        let take = usize::try_from(left).map_or(ITEM_BUF, |l| l.min(ITEM_BUF));
        let chunk = &mut buf[..take];
        src.exact(chunk)?;
        left -= take as u64;
        for rec in chunk.chunks_exact(ITEM_LEN) {
            let (e, id) = rec.split_at(8);
            let e = Epoch(u64::from_be_bytes(
                e.try_into().map_err(|_| BlobError::Unsorted)?,
            ));
            let id = FactId(id.try_into().map_err(|_| BlobError::Unsorted)?);
            if e >= epoch || e < floor || last.is_some_and(|l| l >= (e, id)) {
                return Err(BlobError::Unsorted);
            }
            while let Some((i, f)) = ahead.peek() {
                match f.order_key().cmp(&(e, id)) {
                    std::cmp::Ordering::Less => {
                        return Err(BlobError::BadFact(*i, "fact is not in the prefix".into()))
                    }
                    std::cmp::Ordering::Equal => {
                        ahead.next();
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            digest.push(e, id);
            last = Some((e, id));
            items += 1;
            if let Some(out) = items_out.as_mut() {
                out.push((e, id));
            }
        }
    }
    drop(buf);
    if let Some((i, _)) = ahead.next() {
        return Err(BlobError::BadFact(i, "fact is not in the prefix".into()));
    }

    Ok(InlineItems {
        last,
        count: items,
        digest: digest.finish(),
    })
}

/// What [`read_inline_items`] found: the last item, how many, and their prefix digest.
struct InlineItems {
    last: Option<(Epoch, FactId)>,
    count: u64,
    digest: Hash32,
}

const MAJOR_UINT: u8 = 0;
const MAJOR_BYTES: u8 = 2;
const MAJOR_ARRAY: u8 = 4;

fn malformed(what: &str) -> BlobError {
    BlobError::Malformed(what.into())
}

/// The blob's bytes as they are read: hashed for the CID, counted, and parsed as CBOR
/// heads and small items, each with a bounded buffer.
struct Source<R> {
    r: R,
    hasher: blake3::Hasher,
    n: u64,
}

impl<R: Read> Source<R> {
    /// Fills `buf`; the source ending first is a malformed (cut) blob, a failing source is
    /// [`BlobError::Read`].
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BlobError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => return Err(malformed("the blob ends early")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlobError::Read(e.to_string().replace('\n', " "))),
            }
        }
        self.hasher.update(buf);
        self.n += buf.len() as u64;
        Ok(())
    }

    fn at_end(&mut self) -> Result<bool, BlobError> {
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(true),
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlobError::Read(e.to_string().replace('\n', " "))),
            }
        }
    }

    /// One CBOR head: major type and argument. Only the definite, minimally encoded forms
    /// DAG-CBOR allows are accepted.
    fn head(&mut self) -> Result<(u8, u64), BlobError> {
        let mut raw = Vec::with_capacity(9);
        self.head_into(&mut raw)
    }

    fn head_into(&mut self, raw: &mut Vec<u8>) -> Result<(u8, u64), BlobError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        raw.push(b[0]);
        let (major, info) = (b[0] >> 5, b[0] & 0x1f);
        let extra = match info {
            0..=23 => 0,
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(malformed("an indefinite or reserved CBOR length")),
        };
        if extra == 0 {
            return Ok((major, u64::from(info)));
        }
        let mut arg = [0u8; 8];
        self.exact(&mut arg[8 - extra..])?;
        raw.extend_from_slice(&arg[8 - extra..]);
        let value = u64::from_be_bytes(arg);
        // Major type 7 with a length byte is a float or simple value, not a length.
        let minimal = match extra {
            1 => value >= 24,
            2 => value > 0xff,
            4 => value > 0xffff,
            _ => value > 0xffff_ffff,
        };
        if major != 7 && !minimal {
            return Err(malformed("a non-minimal CBOR length"));
        }
        Ok((major, value))
    }

    /// Reads one whole CBOR item of at most [`MAX_SMALL_ITEM_BYTES`] and decodes it
    /// canonically.
    fn small_item<T: serde::Serialize + serde::de::DeserializeOwned>(
        &mut self,
        what: &str,
    ) -> Result<T, BlobError> {
        let mut raw = Vec::new();
        self.raw_item(&mut raw, 0)?;
        from_canonical(&raw).map_err(|e| BlobError::Malformed(format!("{what}: {e}")))
    }

    fn raw_item(&mut self, raw: &mut Vec<u8>, depth: u32) -> Result<(), BlobError> {
        if depth > 16 {
            return Err(malformed("CBOR nested too deeply"));
        }
        let (major, arg) = self.head_into(raw)?;
        let too_large = || malformed("a field is larger than it may be");
        match major {
            2 | 3 => {
                let len = usize::try_from(arg).map_err(|_| too_large())?;
                if len > MAX_SMALL_ITEM_BYTES.saturating_sub(raw.len()) {
                    return Err(too_large());
                }
                let start = raw.len();
                raw.resize(start + len, 0);
                self.exact(&mut raw[start..])?;
            }
            4 | 5 => {
                let n = if major == 5 {
                    arg.saturating_mul(2)
                } else {
                    arg
                };
                for _ in 0..n {
                    self.raw_item(raw, depth + 1)?;
                    if raw.len() > MAX_SMALL_ITEM_BYTES {
                        return Err(too_large());
                    }
                }
            }
            6 => self.raw_item(raw, depth + 1)?,
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob holding a live application fact, and its completion signed by `key` as the
    /// group key.
    fn certified_fixture(
        key: &ed25519_dalek::SigningKey,
    ) -> (
        Vec<u8>,
        tend_core::maintenance::SnapshotCompleted,
        tend_core::GroupKey,
    ) {
        use ed25519_dalek::Signer;
        let ns = JournalNamespace::Authority(AuthorityId([1; 32]));
        let fact = tend_core::UnsignedFact {
            namespace: ns,
            epoch: Epoch(1),
            payload: tend_core::Payload::Application {
                kind: "log".into(),
                data: b"entry".to_vec(),
            },
        }
        .sign(key);
        let blob = SnapshotBlob::from_parts(ns, Epoch(2), vec![fact.order_key()], vec![fact]);
        let bytes = blob.encode();
        let snapshot = tend_core::maintenance::SnapshotV1 {
            epoch: Epoch(2),
            digest: blob.prefix_digest(),
            blob_cid: SnapshotBlob::cid_of(&bytes),
        };
        let proposal_id = Hash32([3; 32]);
        let sig = key.sign(&snapshot.signing_message(&ns, &proposal_id));
        let completed = tend_core::maintenance::SnapshotCompleted {
            proposal_id,
            snapshot,
            threshold_signature: sig.to_bytes(),
        };
        (
            bytes,
            completed,
            tend_core::GroupKey(key.verifying_key().to_bytes()),
        )
    }

    #[test]
    fn a_streamed_blob_is_byte_for_byte_the_encoded_one_and_streams_back() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let ns = JournalNamespace::Authority(AuthorityId([1; 32]));
        // Sizes on either side of each CBOR length boundary (23/24, 255/256 items and bytes).
        for n in [0usize, 1, 5, 23, 24, 300] {
            let facts: Vec<VerifiedFact> = (0..n)
                .map(|i| {
                    tend_core::UnsignedFact {
                        namespace: ns,
                        epoch: Epoch(1 + (i % 3) as u64),
                        payload: tend_core::Payload::Application {
                            kind: "log".into(),
                            data: vec![7; i * 3],
                        },
                    }
                    .sign(&key)
                })
                .collect();
            let mut sorted = facts.clone();
            sorted.sort_by_key(|f| f.order_key());
            let items = sorted.iter().map(|f| f.order_key()).collect();
            let blob = SnapshotBlob::from_parts(ns, Epoch(9), items, sorted);
            // The item blob streams to the bytes `ItemBlob::encode` writes, and its
            // reference is the one the blob keeps.
            let mut item_bytes = Vec::new();
            let item_ref = write_item_blob(
                &mut item_bytes,
                ns,
                Epoch(9),
                blob.base,
                blob.items.len() as u64,
                blob.items.iter().map(|i| Ok::<_, io::Error>(*i)),
            )
            .unwrap();
            assert_eq!(Some(item_ref), blob.item_ref);
            assert_eq!(item_bytes, blob.item_blob().unwrap().encode());
            assert_eq!(
                read_item_blob(&item_bytes[..], ns, Epoch(9), blob.base, &item_ref).unwrap(),
                blob.items
            );
            let mut out = Vec::new();
            write_blob(
                &mut out,
                &blob.head().unwrap(),
                blob.facts.iter().map(|f| Ok::<_, io::Error>(f.bytes())),
            )
            .unwrap();
            assert_eq!(out, blob.encode(), "{n} facts");
            let mut streamed = Vec::new();
            let summary = stream_blob_facts(&out[..], BlobTrust::EachSignature, 7, |batch| {
                assert!(!batch.is_empty() && batch.len() <= 7);
                streamed.extend(batch);
                Ok::<(), BlobError>(())
            })
            .unwrap();
            assert_eq!(streamed, blob.facts);
            assert_eq!(summary.fact_count, n as u64);
            assert_eq!(summary.reduced_state(), blob.reduced_state());
            assert_eq!(summary.prefix_digest, blob.prefix_digest());
            // A head that promises more than is handed is refused.
            let mut head = blob.head().unwrap();
            head.facts += 1;
            let short = write_blob(
                &mut Vec::new(),
                &head,
                blob.facts.iter().map(|f| Ok::<_, io::Error>(f.bytes())),
            );
            assert_eq!(short.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn a_certified_read_trusts_the_threshold_signature_and_nothing_else() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let (bytes, completed, group_key) = certified_fixture(&key);
        let ns = JournalNamespace::Authority(AuthorityId([1; 32]));
        // A completion under another key certifies nothing.
        let stranger = tend_core::GroupKey([9; 32]);
        assert!(completed.certify(&ns, &stranger).is_none());
        let certified = completed.certify(&ns, &group_key).expect("verifies");
        let read = read_certified_blob(&bytes[..], &certified).unwrap();
        assert_eq!(read.facts, read_blob(&bytes[..], None).unwrap().facts);
        // Other bytes (here: the same blob with one fact byte changed, so its signature no
        // longer verifies) are refused as not the certified blob, never handed out.
        let mut other = bytes.clone();
        let at = other.len() - 40;
        other[at] ^= 1;
        assert!(read_blob(&other[..], None).is_err());
        assert!(matches!(
            read_certified_blob(&other[..], &certified),
            Err(BlobError::NotCertified | BlobError::BadFact(..) | BlobError::Malformed(_))
        ));
    }

    fn blob(n: u8) -> SnapshotBlob {
        let items = (0..n)
            .map(|i| (Epoch(u64::from(i / 3)), FactId([i; 32])))
            .collect();
        SnapshotBlob::from_parts(
            JournalNamespace::Authority(AuthorityId([1; 32])),
            Epoch(100),
            items,
            Vec::new(),
        )
    }

    #[test]
    fn the_one_pass_reader_agrees_with_decode() {
        let b = blob(200);
        let bytes = b.encode();
        let s = read_blob(&bytes[..], Some(&[])).unwrap();
        assert_eq!(s.cid, SnapshotBlob::cid_of(&bytes));
        assert_eq!(s.prefix_digest, b.prefix_digest());
        assert_eq!(s.items, 200);
        assert_eq!(s.last_item, b.items.last().copied());
        assert_eq!(s.state_digest, b.state_digest);
        assert_eq!(s.bytes, bytes.len() as u64);
        assert_eq!(
            s.reduced_state().state_digest(),
            b.reduced_state().state_digest()
        );
        // An empty prefix too.
        let e = blob(0).encode();
        assert_eq!(read_blob(&e[..], None).unwrap().items, 0);
    }

    #[test]
    fn the_one_pass_reader_refuses_damage_without_panicking() {
        for version in [2, 3] {
            let mut b = blob(50);
            b.version = version;
            refuses_damage(&b.encode());
        }
        // Items out of order (a version 2 blob lists them itself).
        let mut b = blob(50);
        b.version = 2;
        b.items.swap(3, 4);
        assert_eq!(read_blob(&b.encode()[..], None), Err(BlobError::Unsorted));
        let bytes = blob(50).encode();
        // A newer version is named as such.
        let mut v4 = bytes.clone();
        v4[1] = 4;
        assert_eq!(
            read_blob(&v4[..], None),
            Err(BlobError::UnsupportedVersion(4))
        );
        // Formats 1 and 2 still read.
        for version in [1, 2] {
            let mut old = blob(50);
            old.version = version;
            let read = read_blob(&old.encode()[..], None).unwrap();
            assert_eq!(read.item_ref, None);
            assert_eq!(read.prefix_digest, blob(50).prefix_digest());
            let decoded = SnapshotBlob::decode(&old.encode()).unwrap();
            assert_eq!(decoded.items, old.items);
            assert_eq!(decoded.prefix_digest(), old.prefix_digest());
        }
    }

    #[test]
    fn an_item_blob_reads_only_as_the_one_its_snapshot_blob_names() {
        let b = blob(120);
        let r = b.item_ref.unwrap();
        let items = b.item_blob().unwrap().encode();
        let ns = b.namespace;
        assert_eq!(
            read_item_blob(&items[..], ns, b.epoch, b.base, &r).unwrap(),
            b.items
        );
        // Every cut and every flipped byte is refused, never a panic.
        for cut in 0..items.len() {
            assert!(read_item_blob(&items[..cut], ns, b.epoch, b.base, &r).is_err());
        }
        for pos in 0..items.len() {
            let mut bad = items.clone();
            bad[pos] ^= 0x01;
            assert!(
                read_item_blob(&bad[..], ns, b.epoch, b.base, &r).is_err(),
                "at {pos}"
            );
        }
        // The items of another snapshot are refused, even if they are a valid item blob.
        let other = blob(119).item_blob().unwrap().encode();
        assert!(read_item_blob(&other[..], ns, b.epoch, b.base, &r).is_err());
        assert!(read_item_blob(&items[..], ns, Epoch(101), b.base, &r).is_err());
        // A snapshot blob of version 3 no longer holds the list: it is far smaller.
        let mut v2 = b.clone();
        v2.version = 2;
        assert!(b.encode().len() + 120 * 40 <= v2.encode().len() + 200);
    }

    fn refuses_damage(bytes: &[u8]) {
        let bytes = bytes.to_vec();
        for cut in 0..bytes.len() {
            assert!(read_blob(&bytes[..cut], None).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read_blob(&longer[..], None).is_err());
        for pos in 0..bytes.len() {
            let mut b = bytes.clone();
            b[pos] ^= 0x01;
            // A flipped item byte may still read (it is the CID that catches it); the
            // reader must agree with `decode` on everything else.
            let streamed = read_blob(&b[..], None);
            assert_eq!(
                streamed.is_ok(),
                SnapshotBlob::decode(&b).is_ok(),
                "at {pos}"
            );
            if let Ok(s) = streamed {
                assert_ne!(s.cid, SnapshotBlob::cid_of(&bytes));
            }
        }
    }
}
