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

/// How many recent commits are remembered, to tell whether one that landed while a
/// digest was computed touched what it covers.
const RECENT: usize = 64;

#[derive(Default)]
pub(crate) struct DigestMemo {
    /// Bumped by every commit that adds or removes facts.
    generation: u64,
    /// What the latest commits touched, oldest first: a digest computed across one that
    /// touched its span may have read either side of it.
    recent: std::collections::VecDeque<Span>,
    entries: Vec<Entry>,
}

/// Facts of a namespace at epochs `lowest..=highest`.
#[derive(Clone, Copy)]
struct Span {
    ns: JournalNamespace,
    lowest: Epoch,
    highest: Epoch,
}

struct Entry {
    ns: JournalNamespace,
    upto: Epoch,
    base: Option<SnapshotBase>,
    digest: Hash32,
}

impl Entry {
    /// Whether the digest covers a fact in `span`: from its base (or the start) below `upto`.
    fn covers(&self, span: &Span) -> bool {
        let from = self.base.map_or(Epoch::ZERO, |b| b.epoch);
        span.ns == self.ns && span.lowest < self.upto && span.highest >= from
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
    /// commit since then changed facts it covers (or is too old to tell).
    pub(crate) fn keep(
        &mut self,
        generation: u64,
        ns: JournalNamespace,
        upto: Epoch,
        base: Option<SnapshotBase>,
        digest: Hash32,
    ) {
        let entry = Entry {
            ns,
            upto,
            base,
            digest,
        };
        let since = self.generation - generation;
        let recent = self.recent.iter().rev().take(since as usize);
        if since as usize > self.recent.len() || recent.clone().any(|s| entry.covers(s)) {
            return;
        }
        self.entries
            .retain(|e| !(e.ns == ns && e.upto == upto && e.base == base));
        if self.entries.len() == KEPT {
            self.entries.remove(0);
        }
        self.entries.push(entry);
    }

    /// Called after a commit that added or removed facts of `ns` at epochs in
    /// `lowest..=highest`: forgets every digest covering one of them.
    pub(crate) fn touched(&mut self, ns: JournalNamespace, lowest: Epoch, highest: Epoch) {
        let span = Span {
            ns,
            lowest,
            highest,
        };
        self.generation += 1;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(span);
        self.entries.retain(|e| !e.covers(&span));
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
    fn a_digest_computed_across_a_commit_it_covers_is_not_kept() {
        let mut memo = DigestMemo::default();
        let g = memo.get(NS, Epoch(5), None).unwrap_err();
        memo.touched(NS, Epoch(4), Epoch(7));
        memo.keep(g, NS, Epoch(5), None, Hash32([7; 32]));
        assert!(memo.get(NS, Epoch(5), None).is_err());
        // Commits above its end (a ceremony's own facts) do not stop it.
        let g = memo.get(NS, Epoch(5), None).unwrap_err();
        memo.touched(NS, Epoch(5), Epoch(7));
        memo.keep(g, NS, Epoch(5), None, Hash32([7; 32]));
        assert_eq!(memo.get(NS, Epoch(5), None), Ok(Hash32([7; 32])));
        // Too many commits since to tell: not kept.
        let g = memo.get(NS, Epoch(6), None).unwrap_err();
        for _ in 0..=RECENT {
            memo.touched(NS, Epoch(9), Epoch(9));
        }
        memo.keep(g, NS, Epoch(6), None, Hash32([8; 32]));
        assert!(memo.get(NS, Epoch(6), None).is_err());
    }
}
