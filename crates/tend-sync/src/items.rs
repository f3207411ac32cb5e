//! Ordered `(epoch, fact id)` items of a namespace and the negentropy storage over them.
//!
//! Negentropy addresses items by their rank in `(timestamp, id)` order. [`OrderedItems`] is
//! the small trait a store implements to expose that order (the in-memory [`MemItems`] here,
//! the redb index later); [`ItemStorage`] adapts any of them to negentropy's
//! `NegentropyStorageBase`. A session reconciles against one immutable view, so the source
//! must not change under it: implementations hand out snapshots.

use std::collections::BTreeSet;
use std::sync::Arc;

use negentropy::{Bound, Id, Item, NegentropyStorageBase};
use tend_core::{Epoch, FactId, Journal, JournalNamespace};

/// One reconciliation item: a fact's epoch (negentropy's timestamp) and its id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SyncItem {
    pub epoch: Epoch,
    pub id: FactId,
}

impl SyncItem {
    /// The negentropy item with the epoch as its timestamp.
    pub fn to_negentropy(self) -> Item {
        Item::with_timestamp_and_id(self.epoch.0, Id::from_byte_array(self.id.0))
    }
}

/// An immutable, strictly ascending sequence of the `(epoch, id)` items of one namespace,
/// addressable by rank.
pub trait OrderedItems {
    /// The namespace the items belong to.
    fn namespace(&self) -> JournalNamespace;

    /// How many items there are.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item at rank `index`, if any.
    fn get(&self, index: usize) -> Option<SyncItem>;

    /// All items as one ascending slice, when the source holds them so. Reconciliation
    /// scans whole ranges to fingerprint them; a slice lets it skip a call per item.
    fn contiguous(&self) -> Option<&[SyncItem]> {
        None
    }

    /// Calls `f(index, item)` for ranks `begin..end` in order until it returns `false`.
    /// Ranks past the end are ignored.
    fn scan(&self, begin: usize, end: usize, f: &mut dyn FnMut(usize, SyncItem) -> bool) {
        for i in begin..end {
            match self.get(i) {
                Some(item) if f(i, item) => {}
                _ => break,
            }
        }
    }

    /// The first rank in `first..last` whose item is not below `key` (`last` if none).
    fn lower_bound(&self, first: usize, last: usize, key: &SyncItem) -> usize {
        let (mut lo, mut hi) = (first, last.min(self.len()));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid) {
                Some(item) if item < *key => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo
    }
}

/// An in-memory [`OrderedItems`]: a sorted, deduplicated vector.
#[derive(Clone, Debug)]
pub struct MemItems {
    namespace: JournalNamespace,
    items: Vec<SyncItem>,
}

impl MemItems {
    /// Sorts and deduplicates `items`.
    pub fn new(namespace: JournalNamespace, items: impl IntoIterator<Item = SyncItem>) -> Self {
        let mut items: Vec<SyncItem> = items.into_iter().collect();
        items.sort_unstable();
        items.dedup();
        Self { namespace, items }
    }

    /// Takes a vector that is normally already strictly ascending (checked in one pass;
    /// sorted and deduplicated if it is not).
    pub fn from_sorted(namespace: JournalNamespace, mut items: Vec<SyncItem>) -> Self {
        if !items.windows(2).all(|w| w[0] < w[1]) {
            items.sort_unstable();
            items.dedup();
        }
        Self { namespace, items }
    }

    /// The items of a journal (already in order).
    pub fn from_journal(journal: &Journal) -> Self {
        Self {
            namespace: journal.namespace(),
            items: journal
                .iter()
                .map(|f| SyncItem {
                    epoch: f.epoch(),
                    id: f.id(),
                })
                .collect(),
        }
    }

    /// The items of an ordered set.
    pub fn from_set(namespace: JournalNamespace, set: &BTreeSet<SyncItem>) -> Self {
        Self {
            namespace,
            items: set.iter().copied().collect(),
        }
    }

    /// The items, ascending.
    pub fn as_slice(&self) -> &[SyncItem] {
        &self.items
    }

    /// The epoch of the item with this id, if it is one of these items: one binary search
    /// per epoch present, so a holder needs no map from id to epoch beside its items.
    ///
    /// ```
    /// # use tend_core::{AuthorityId, Epoch, FactId, JournalNamespace};
    /// # use tend_sync::{MemItems, SyncItem};
    /// let id = FactId([7; 32]);
    /// let items = MemItems::new(
    ///     JournalNamespace::Authority(AuthorityId([1; 32])),
    ///     [SyncItem { epoch: Epoch(3), id }, SyncItem { epoch: Epoch(1), id: FactId([9; 32]) }],
    /// );
    /// assert_eq!(items.epoch_of(&id), Some(Epoch(3)));
    /// assert_eq!(items.epoch_of(&FactId([8; 32])), None);
    /// ```
    pub fn epoch_of(&self, id: &FactId) -> Option<Epoch> {
        let mut rest = self.items.as_slice();
        while let Some(first) = rest.first() {
            let epoch = first.epoch;
            let run = rest.partition_point(|i| i.epoch == epoch);
            if rest[..run].binary_search_by(|i| i.id.cmp(id)).is_ok() {
                return Some(epoch);
            }
            rest = &rest[run..];
        }
        None
    }
}

impl OrderedItems for MemItems {
    fn namespace(&self) -> JournalNamespace {
        self.namespace
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn get(&self, index: usize) -> Option<SyncItem> {
        self.items.get(index).copied()
    }

    fn contiguous(&self) -> Option<&[SyncItem]> {
        Some(&self.items)
    }

    fn scan(&self, begin: usize, end: usize, f: &mut dyn FnMut(usize, SyncItem) -> bool) {
        let end = end.min(self.items.len());
        for (i, item) in self
            .items
            .get(begin..end)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if !f(begin + i, *item) {
                break;
            }
        }
    }

    fn lower_bound(&self, first: usize, last: usize, key: &SyncItem) -> usize {
        let last = last.min(self.items.len());
        let first = first.min(last);
        first + self.items[first..last].partition_point(|i| i < key)
    }
}

/// A shared, immutable item source, as sessions hold it.
pub type SharedItems = Arc<dyn OrderedItems + Send + Sync>;

/// Negentropy storage over any [`OrderedItems`].
pub struct ItemStorage {
    items: SharedItems,
}

impl ItemStorage {
    /// Wraps a snapshot of items.
    pub fn new(items: SharedItems) -> Self {
        Self { items }
    }
}

impl std::fmt::Debug for ItemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ItemStorage({} items)", self.items.len())
    }
}

impl NegentropyStorageBase for ItemStorage {
    fn size(&self) -> Result<usize, negentropy::Error> {
        Ok(self.items.len())
    }

    fn get_item(&self, i: usize) -> Result<Option<Item>, negentropy::Error> {
        Ok(self.items.get(i).map(SyncItem::to_negentropy))
    }

    fn iterate(
        &self,
        begin: usize,
        end: usize,
        cb: &mut dyn FnMut(Item, usize) -> Result<bool, negentropy::Error>,
    ) -> Result<(), negentropy::Error> {
        if begin > end || end > self.items.len() {
            return Err(negentropy::Error::BadRange);
        }
        if let Some(all) = self.items.contiguous() {
            let range = all.get(begin..end).ok_or(negentropy::Error::BadRange)?;
            for (k, item) in range.iter().enumerate() {
                if !cb(item.to_negentropy(), begin + k)? {
                    break;
                }
            }
            return Ok(());
        }
        let mut result = Ok(());
        self.items.scan(
            begin,
            end,
            &mut |i, item| match cb(item.to_negentropy(), i) {
                Ok(go_on) => go_on,
                Err(e) => {
                    result = Err(e);
                    false
                }
            },
        );
        result
    }

    fn find_lower_bound(&self, first: usize, last: usize, value: &Bound) -> usize {
        // A bound compares as its (timestamp, zero-padded id prefix) item.
        let key = SyncItem {
            epoch: Epoch(value.item.timestamp),
            id: FactId(value.item.id.to_bytes()),
        };
        self.items.lower_bound(first, last, &key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_core::ContextId;

    fn ns() -> JournalNamespace {
        JournalNamespace::Context(ContextId([1; 32]))
    }

    #[test]
    fn mem_items_sort_dedup_and_search() {
        let it = |e, b| SyncItem {
            epoch: Epoch(e),
            id: FactId([b; 32]),
        };
        let m = MemItems::new(ns(), [it(2, 1), it(1, 9), it(2, 1), it(1, 3)]);
        assert_eq!(m.as_slice(), &[it(1, 3), it(1, 9), it(2, 1)]);
        assert_eq!(m.lower_bound(0, 3, &it(1, 4)), 1);
        assert_eq!(m.lower_bound(0, 3, &it(3, 0)), 3);
        // The trait's default binary search agrees with the specialised one.
        struct Plain(MemItems);
        impl OrderedItems for Plain {
            fn namespace(&self) -> JournalNamespace {
                self.0.namespace()
            }
            fn len(&self) -> usize {
                self.0.len()
            }
            fn get(&self, i: usize) -> Option<SyncItem> {
                self.0.get(i)
            }
        }
        let p = Plain(m.clone());
        for k in [it(0, 0), it(1, 3), it(1, 5), it(2, 1), it(9, 9)] {
            assert_eq!(p.lower_bound(0, 3, &k), m.lower_bound(0, 3, &k));
        }
        let mut seen = vec![];
        p.scan(1, 10, &mut |i, _| {
            seen.push(i);
            true
        });
        assert_eq!(seen, vec![1, 2]);
    }
}
