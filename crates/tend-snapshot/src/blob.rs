//! The snapshot blob: what a restore or a hydrating device needs, in canonical, versioned
//! DAG-CBOR, addressed by `ContentId::of(CODEC_DAG_CBOR, bytes)`.
//!
//! Wire form: `[version, namespace, epoch, base, items, facts, state_digest]` where
//! - `base` is the verified snapshot the digest chains on (the latest one below `epoch`, as
//!   the blob's facts reduce), or null for the first snapshot;
//! - `items` is one byte string of 40-byte records `epoch (u64 big-endian) || fact id`,
//!   strictly ascending: the prefix `{ f : base.epoch <= f.epoch < epoch }`, so a device can
//!   recompute the signed digest and tell whether a late fact is covered. Facts below the
//!   base were covered by the earlier snapshot and may be pruned everywhere. One byte string
//!   instead of a million small arrays keeps encoding and decoding linear and cheap.
//! - `facts` holds the canonical bytes of the prefix's maintenance and authority facts, in
//!   `(epoch, id)` order: all that reduction needs (application facts do not change the
//!   maintenance state).
//! - `state_digest` is [`MaintenanceState::state_digest`] of the prefix.
//!
//! The blob is a pure function of the prefix's fact set, so every device that agrees on
//! the prefix digest builds the same bytes and the same CID.

use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::journal::DigestBuilder;
use tend_core::{
    reduce, AuthorityId, ContentId, Epoch, FactId, Hash32, Journal, JournalNamespace,
    MaintenanceState, Payload, SnapshotBase, VerifiedFact,
};

/// The blob format this release writes and reads.
pub const SNAPSHOT_BLOB_VERSION: u64 = 1;
const ITEM_LEN: usize = 40;

/// Why bytes are not a valid snapshot blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("snapshot blob format version {0} is not supported (this release reads 1)")]
    UnsupportedVersion(u64),
    #[error("malformed snapshot blob: {0}")]
    Malformed(String),
    #[error("snapshot blob items are not strictly ascending or not below the epoch")]
    Unsorted,
    #[error("snapshot blob fact {0}: {1}")]
    BadFact(usize, String),
    #[error("the state digest in the blob does not match the state its facts reduce to")]
    StateDigest,
}

/// A decoded snapshot blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBlob {
    pub namespace: JournalNamespace,
    /// The snapshot epoch E: the blob covers `{ f : f.epoch < E }`.
    pub epoch: Epoch,
    /// The earlier snapshot this one chains on (derived from `facts`, checked on decode).
    pub base: Option<SnapshotBase>,
    /// Every `(epoch, id)` of the prefix from the base's epoch on, strictly ascending.
    pub items: Vec<(Epoch, FactId)>,
    /// The prefix's maintenance and authority facts, ascending.
    pub facts: Vec<VerifiedFact>,
    /// [`MaintenanceState::state_digest`] of [`SnapshotBlob::reduced_state`].
    pub state_digest: Hash32,
}

/// Whether a fact's payload can change the maintenance state.
pub fn is_state_fact(f: &VerifiedFact) -> bool {
    matches!(f.payload(), Payload::Maintenance(_) | Payload::Authority(_))
}

impl SnapshotBlob {
    /// The blob of `journal`'s prefix below `epoch`.
    pub fn from_journal(journal: &Journal, epoch: Epoch) -> Self {
        let prefix = journal.iter().take_while(|f| f.epoch() < epoch);
        let mut items = Vec::new();
        let mut facts = Vec::new();
        for f in prefix {
            items.push(f.order_key());
            if is_state_fact(f) {
                facts.push(f.clone());
            }
        }
        Self::from_parts(journal.namespace(), epoch, items, facts)
    }

    /// A blob from its parts: `items` strictly ascending and below `epoch` (items below the
    /// base snapshot, if given, are dropped), `facts` every state fact below `epoch`,
    /// ascending. The base and the state digest are derived here.
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
        let mut blob = Self {
            namespace,
            epoch,
            base,
            items,
            facts,
            state_digest: Hash32([0; 32]),
        };
        blob.state_digest = blob.reduced_state().state_digest();
        blob
    }

    /// The maintenance state of the prefix.
    pub fn reduced_state(&self) -> MaintenanceState {
        let mut state = reduce(self.namespace, &self.facts);
        // Application facts are not in the blob, but their epochs count towards the
        // epoch a device stamps new facts with.
        if let Some((e, _)) = self.items.last() {
            state.observe_epoch(*e);
        }
        state
    }

    /// The digest of the prefix (what `SnapshotV1::digest` certifies).
    pub fn prefix_digest(&self) -> Hash32 {
        let mut d = DigestBuilder::chained(self.namespace, self.epoch, self.base);
        for (e, id) in &self.items {
            d.push(*e, *id);
        }
        d.finish()
    }

    /// Canonical DAG-CBOR bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut packed = Vec::with_capacity(self.items.len() * ITEM_LEN);
        for (e, id) in &self.items {
            packed.extend_from_slice(&e.0.to_be_bytes());
            packed.extend_from_slice(id.as_bytes());
        }
        let facts: Vec<&serde_bytes::Bytes> = self
            .facts
            .iter()
            .map(|f| serde_bytes::Bytes::new(f.bytes()))
            .collect();
        to_canonical(&(
            SNAPSHOT_BLOB_VERSION,
            &self.namespace,
            self.epoch,
            self.base,
            serde_bytes::Bytes::new(&packed),
            facts,
            self.state_digest,
        ))
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
        // Peek at the version first so a newer format gets a clear error.
        if let Some(v) = peek_version(bytes).filter(|v| *v != SNAPSHOT_BLOB_VERSION) {
            return Err(BlobError::UnsupportedVersion(v));
        }
        let (_, namespace, epoch, base, packed, raw_facts, state_digest): Wire =
            from_canonical(bytes).map_err(|e| BlobError::Malformed(e.to_string()))?;
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
            // Facts below the base were pruned from the item list, not from the state.
            let below_base = base.is_some_and(|b| f.epoch() < b.epoch);
            if f.epoch() >= epoch || (!below_base && items.binary_search(&f.order_key()).is_err()) {
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
            namespace,
            epoch,
            base,
            items,
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
