//! Prefix digests already computed, kept until a commit adds or removes a fact they cover.
//!
//! A snapshot at E makes every device digest the prefix below E several times within
//! seconds: the proposer and each signer for the ceremony, then each device again when
//! the completion arrives (is the prefix already held?) and when it settles. At a million
//! facts each is a 0.4 s scan of the index, while nothing below E changes in between:
//! facts written meanwhile are at E or above.

use tend_core::journal::SnapshotBase;
use tend_core::{Epoch, Hash32, JournalNamespace};

/// How many digests are kept; a ceremony needs one or two.
const KEPT: usize = 8;

#[derive(Default)]
pub(crate) struct DigestMemo {
    /// Bumped by every commit that adds or removes facts: a digest computed across a
    /// bump may have read either side of it, so it is not kept.
    generation: u64,
    entries: Vec<Entry>,
}

struct Entry {
    ns: JournalNamespace,
    upto: Epoch,
    base: Option<SnapshotBase>,
    digest: Hash32,
}

impl Entry {
    /// The epochs whose facts the digest covers: from its base (or the start) below `upto`.
    fn covers(&self, lowest: Epoch, highest: Epoch) -> bool {
        let from = self.base.map_or(Epoch::ZERO, |b| b.epoch);
        lowest < self.upto && highest >= from
    }
}

impl DigestMemo {
    /// The digest of the prefix below `upto` chained on `base`, if kept; else the
    /// generation to pass to [`DigestMemo::keep`] once it is computed, read before the
    /// read transaction that computes it begins.
    pub(crate) fn get(
        &self,
        ns: JournalNamespace,
        upto: Epoch,
        base: Option<SnapshotBase>,
    ) -> Result<Hash32, u64> {
        self.entries
            .iter()
            .find(|e| e.ns == ns && e.upto == upto && e.base == base)
            .map(|e| e.digest)
            .ok_or(self.generation)
    }

    /// Keeps a digest computed from a read transaction begun at `generation`, unless a
    /// commit has changed facts since.
    pub(crate) fn keep(
        &mut self,
        generation: u64,
        ns: JournalNamespace,
        upto: Epoch,
        base: Option<SnapshotBase>,
        digest: Hash32,
    ) {
        if generation != self.generation {
            return;
        }
        self.entries
            .retain(|e| !(e.ns == ns && e.upto == upto && e.base == base));
        if self.entries.len() == KEPT {
            self.entries.remove(0);
        }
        self.entries.push(Entry {
            ns,
            upto,
            base,
            digest,
        });
    }

    /// Called after a commit that added or removed facts of `ns` at epochs in
    /// `lowest..=highest`: forgets every digest covering one of them.
    pub(crate) fn touched(&mut self, ns: JournalNamespace, lowest: Epoch, highest: Epoch) {
        self.generation += 1;
        self.entries
            .retain(|e| e.ns != ns || !e.covers(lowest, highest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_core::AuthorityId;

    const NS: JournalNamespace = JournalNamespace::Authority(AuthorityId([1; 32]));

    #[test]
    fn a_digest_goes_when_a_fact_it_covers_changes_and_stays_otherwise() {
        let mut memo = DigestMemo::default();
        let g = memo.get(NS, Epoch(5), None).unwrap_err();
        memo.keep(g, NS, Epoch(5), None, Hash32([7; 32]));
        assert_eq!(memo.get(NS, Epoch(5), None), Ok(Hash32([7; 32])));
        // A fact at the digest's end or above is not in it.
        memo.touched(NS, Epoch(5), Epoch(9));
        assert_eq!(memo.get(NS, Epoch(5), None), Ok(Hash32([7; 32])));
        memo.touched(NS, Epoch(4), Epoch(4));
        assert!(memo.get(NS, Epoch(5), None).is_err());
    }

    #[test]
    fn a_digest_chained_on_a_snapshot_ignores_facts_below_it() {
        let mut memo = DigestMemo::default();
        let base = Some(SnapshotBase {
            epoch: Epoch(3),
            digest: Hash32([1; 32]),
        });
        let g = memo.get(NS, Epoch(6), base).unwrap_err();
        memo.keep(g, NS, Epoch(6), base, Hash32([2; 32]));
        memo.touched(NS, Epoch::ZERO, Epoch(2));
        assert_eq!(memo.get(NS, Epoch(6), base), Ok(Hash32([2; 32])));
        // Another base is another digest.
        assert!(memo.get(NS, Epoch(6), None).is_err());
    }

    #[test]
    fn a_digest_computed_across_a_commit_is_not_kept() {
        let mut memo = DigestMemo::default();
        let g = memo.get(NS, Epoch(5), None).unwrap_err();
        memo.touched(NS, Epoch(7), Epoch(7));
        memo.keep(g, NS, Epoch(5), None, Hash32([7; 32]));
        assert!(memo.get(NS, Epoch(5), None).is_err());
    }
}
