//! The journal: a grow-only set of verified facts of one namespace, merged by set union.
//!
//! `Journal` with `merge` is a join-semilattice: merge is commutative, associative and
//! idempotent (property-tested in `tests/laws.rs`). Admission rules that depend on the
//! authority's state (membership, `Late`) live in [`crate::reduce`]; this type only knows
//! sets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::JournalError;
use crate::fact::VerifiedFact;
use crate::ids::{Epoch, FactId, Hash32, JournalNamespace};

/// A grow-only set of verified facts of one namespace, ordered by `(epoch, id)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    namespace: JournalNamespace,
    facts: BTreeMap<(Epoch, FactId), VerifiedFact>,
}

impl Journal {
    /// An empty journal.
    pub fn new(namespace: JournalNamespace) -> Self {
        Self {
            namespace,
            facts: BTreeMap::new(),
        }
    }

    pub fn namespace(&self) -> JournalNamespace {
        self.namespace
    }

    /// Adds one fact; returns whether it was new.
    pub fn insert(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        if fact.namespace() != self.namespace {
            return Err(JournalError::NamespaceMismatch {
                ours: self.namespace,
                theirs: fact.namespace(),
            });
        }
        Ok(self.facts.insert(fact.order_key(), fact).is_none())
    }

    /// Set union with `other`; returns how many facts were new. Journals of different
    /// namespaces never merge.
    pub fn merge(&mut self, other: &Journal) -> Result<usize, JournalError> {
        if other.namespace != self.namespace {
            return Err(JournalError::NamespaceMismatch {
                ours: self.namespace,
                theirs: other.namespace,
            });
        }
        let before = self.facts.len();
        for (k, f) in &other.facts {
            self.facts.entry(*k).or_insert_with(|| f.clone());
        }
        Ok(self.facts.len() - before)
    }

    pub fn len(&self) -> usize {
        self.facts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.facts.is_empty()
    }

    pub fn contains(&self, epoch: Epoch, id: &FactId) -> bool {
        self.facts.contains_key(&(epoch, *id))
    }

    /// Facts in `(epoch, id)` order.
    pub fn iter(&self) -> impl Iterator<Item = &VerifiedFact> {
        self.facts.values()
    }

    /// The digest of the prefix `{ f : f.epoch < upto }` (DESIGN rule 3) when no snapshot
    /// precedes it.
    pub fn prefix_digest(&self, upto: Epoch) -> Hash32 {
        prefix_digest(self.namespace, upto, self.facts.keys().copied())
    }

    /// The digest of the prefix below `upto`, chained on `base`, the latest verified
    /// snapshot below `upto` ([`crate::MaintenanceState::snapshot_base`]).
    pub fn chained_prefix_digest(&self, upto: Epoch, base: Option<SnapshotBase>) -> Hash32 {
        let mut d = DigestBuilder::chained(self.namespace, upto, base);
        for (e, id) in self.facts.keys() {
            d.push(*e, *id);
        }
        d.finish()
    }

    /// The digest of the whole journal: equal digests mean equal fact sets.
    pub fn digest(&self) -> Hash32 {
        journal_digest(self.namespace, self.facts.keys().copied())
    }
}

/// The verified snapshot a later prefix digest chains on. Facts below it are summarised by
/// its digest, so a device that pruned them computes the same digest as an archive device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SnapshotBase {
    pub epoch: Epoch,
    pub digest: Hash32,
}

/// Streaming digest of `(epoch, id)` items given in ascending order. Used for snapshot
/// prefixes and whole-journal digests alike, so the store can compute either with one scan.
pub struct DigestBuilder {
    hasher: crate::hashing::BufferedHasher,
    upto: Option<Epoch>,
    /// Items below this epoch are summarised by the base snapshot and skipped.
    floor: Epoch,
    last: Option<(Epoch, FactId)>,
}

impl DigestBuilder {
    /// Items with `epoch >= upto` are ignored.
    pub fn prefix(namespace: JournalNamespace, upto: Epoch) -> Self {
        Self::chained(namespace, upto, None)
    }

    /// A prefix digest chained on the previous verified snapshot: items below
    /// `base.epoch` are ignored and the base's epoch and digest are hashed instead.
    pub fn chained(namespace: JournalNamespace, upto: Epoch, base: Option<SnapshotBase>) -> Self {
        let mut hasher = crate::hashing::BufferedHasher::new();
        hasher.update(match base {
            None => b"tend-prefix-digest-v1".as_slice(),
            Some(_) => b"tend-chained-prefix-digest-v1".as_slice(),
        });
        hasher.update(&namespace.to_bytes());
        hasher.update(&upto.0.to_be_bytes());
        if let Some(b) = &base {
            hasher.update(&b.epoch.0.to_be_bytes());
            hasher.update(&b.digest.0);
        }
        Self {
            hasher,
            upto: Some(upto),
            floor: base.map_or(Epoch::ZERO, |b| b.epoch),
            last: None,
        }
    }

    /// A digest over every item, whatever its epoch.
    pub fn whole(namespace: JournalNamespace) -> Self {
        let mut hasher = crate::hashing::BufferedHasher::new();
        hasher.update(b"tend-journal-digest-v1");
        hasher.update(&namespace.to_bytes());
        Self {
            hasher,
            upto: None,
            floor: Epoch::ZERO,
            last: None,
        }
    }

    /// Adds the next item; items must come in strictly ascending `(epoch, id)` order.
    pub fn push(&mut self, epoch: Epoch, id: FactId) {
        debug_assert!(
            self.last.is_none_or(|l| l < (epoch, id)),
            "items out of order"
        );
        if self.upto.is_some_and(|u| epoch >= u) || epoch < self.floor {
            return;
        }
        self.last = Some((epoch, id));
        self.hasher.update(&epoch.0.to_be_bytes());
        self.hasher.update(&id.0);
    }

    pub fn finish(&self) -> Hash32 {
        Hash32(*self.hasher.finalize().as_bytes())
    }
}

/// The digest of the prefix `{ f : f.epoch < upto }` over items in ascending order.
pub fn prefix_digest(
    namespace: JournalNamespace,
    upto: Epoch,
    items: impl IntoIterator<Item = (Epoch, FactId)>,
) -> Hash32 {
    let mut d = DigestBuilder::prefix(namespace, upto);
    for (e, id) in items.into_iter().take_while(|(e, _)| *e < upto) {
        d.push(e, id);
    }
    d.finish()
}

/// The digest of a whole journal over items in ascending order.
pub fn journal_digest(
    namespace: JournalNamespace,
    items: impl IntoIterator<Item = (Epoch, FactId)>,
) -> Hash32 {
    let mut d = DigestBuilder::whole(namespace);
    for (e, id) in items {
        d.push(e, id);
    }
    d.finish()
}
