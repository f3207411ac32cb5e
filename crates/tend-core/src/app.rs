//! Application state: collections, logs, large values and the replicated cache, as a pure,
//! order-independent fold of the journal's data facts (DESIGN section 8).
//!
//! # The merge rule
//!
//! A key (of a collection, or of the cache) is a multi-value register in the manner of
//! automerge and the MV-register of the CRDT papers: every `Put` and `Delete` names the
//! facts it supersedes, which are the heads of that key its author saw when it wrote. The
//! heads of a key are the writes that no other write of the key supersedes. So:
//! - a device reads its own latest write (the new write supersedes every head it had, even
//!   within one epoch);
//! - writes made without seeing each other are both heads, and every replica agrees on
//!   them, whatever the order of arrival: a write that arrives after one that supersedes it
//!   is never a head, and a write's own supersedes list applies whether or not it is a head;
//! - of the heads, puts win over deletes (add-wins, as in an OR-map), and of several puts
//!   the one with the greatest `(epoch, fact id)` is the value everyone reads; the others are
//!   reported as conflicts. No clock decides anything.
//!
//! A log is the set of its entries (`Append { log, seq, data }`, and the older
//! `Payload::Application { kind, .. }` as an entry of log `kind` with `seq` 0), ordered by
//! `(epoch, seq, fact id)`; that triple, printed as [`LogCursor`], is an entry's stable
//! cursor. `seq` is a Lamport clock of the log, so appends keep their causal order. `Trim { log, before }` drops every entry
//! below the cursor; the highest trim wins.
//!
//! # What stays live
//!
//! [`AppState::live_facts`] lists the facts the state needs: the put heads of every
//! collection key, the put heads of cache keys that their floor has not invalidated, the
//! untrimmed log entries, and every data fact of a kind this release does not know. Facts
//! outside it (superseded or deleted values, trimmed entries, stale cache entries, deletes
//! and trims themselves) change no visible value once the facts they name are gone, so a
//! snapshot need not carry them and GC may drop them. Dropping facts that are not live
//! never changes which facts are live, so the live set of pruned and archive replicas
//! agree, and a snapshot built on either carries the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashSet};

pub use crate::data::*;
use crate::fact::{Payload, VerifiedFact};
use crate::ids::{DeviceId, Epoch, FactId, Hash32};

impl LogCursor {
    /// The cursor of a log entry (`None` for a fact that is not one).
    pub fn of(f: &VerifiedFact) -> Option<Self> {
        Self::of_parts(f.order_key(), f.payload())
    }

    /// The lowest cursor of epoch `epoch`: every entry of an earlier epoch sorts below it.
    pub fn first_at(epoch: Epoch) -> Self {
        Self {
            epoch,
            seq: 0,
            id: FactId([0; 32]),
        }
    }

    fn of_parts((epoch, id): (Epoch, FactId), payload: &Payload) -> Option<Self> {
        let seq = match payload {
            Payload::Application { .. } => 0,
            Payload::Data(DataOp::Append(a)) => a.seq,
            _ => return None,
        };
        Some(Self { epoch, seq, id })
    }
}

/// Which map a register lives in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Space {
    Collection,
    Cache,
}

/// One head of a register.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Head {
    pub author: DeviceId,
    /// A delete head (a put head otherwise).
    pub deleted: bool,
}

/// The writes of one key.
#[derive(Clone, Default, Debug)]
struct Register {
    /// Writes no other write of the key supersedes, by `(epoch, id)`.
    heads: BTreeMap<(Epoch, FactId), Head>,
    /// Every fact id some write of the key supersedes.
    superseded: HashSet<FactId>,
}

impl Register {
    fn apply(&mut self, at: (Epoch, FactId), head: Head, supersedes: &[FactId]) {
        for s in supersedes {
            self.superseded.insert(*s);
        }
        self.heads
            .retain(|(_, id), _| !self.superseded.contains(id));
        if !self.superseded.contains(&at.1) {
            self.heads.insert(at, head);
        }
    }

    /// Put heads, greatest `(epoch, id)` first: the winner, then the conflicts.
    fn put_heads(&self) -> impl Iterator<Item = (&(Epoch, FactId), &Head)> {
        self.heads.iter().rev().filter(|(_, h)| !h.deleted)
    }
}

/// What a key reads as.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The winning put: `(epoch, fact id)` and its author.
    pub winner: (Epoch, FactId),
    pub author: DeviceId,
    /// The other put heads (concurrent writes that lost), greatest first.
    pub conflicts: Vec<(Epoch, FactId)>,
}

impl Entry {
    /// Every head of the key (what a new write supersedes).
    pub fn heads(&self) -> Vec<FactId> {
        std::iter::once(self.winner.1)
            .chain(self.conflicts.iter().map(|c| c.1))
            .collect()
    }
}

#[derive(Clone, Default, Debug)]
struct Log {
    trimmed_before: Option<LogCursor>,
    /// The highest `seq` of any entry or trim seen (the Lamport clock of the log).
    max_seq: u64,
    /// Untrimmed entries, wherever they are kept.
    len: u64,
}

/// Where a state keeps its untrimmed log entries: in memory ([`MemLogIndex`], what
/// [`AppState::apply`] uses), or in a store's tables, so that a state of a million entries
/// does not hold them in memory. The state decides what is added and dropped; the index
/// only keeps it.
pub trait LogIndex {
    type Error;
    /// Adds `entry` to `log`; whether it was new.
    fn add(&mut self, log: &str, entry: LogCursor) -> Result<bool, Self::Error>;
    /// Drops every entry of `log` below `before`; how many went.
    fn drop_below(&mut self, log: &str, before: LogCursor) -> Result<u64, Self::Error>;
}

/// Log entries in memory, by log.
#[derive(Clone, Default, Debug)]
pub struct MemLogIndex(BTreeMap<String, BTreeSet<LogCursor>>);

impl LogIndex for MemLogIndex {
    type Error = std::convert::Infallible;

    fn add(&mut self, log: &str, entry: LogCursor) -> Result<bool, Self::Error> {
        Ok(self.0.entry(log.to_owned()).or_default().insert(entry))
    }

    fn drop_below(&mut self, log: &str, before: LogCursor) -> Result<u64, Self::Error> {
        let Some(entries) = self.0.get_mut(log) else {
            return Ok(0);
        };
        let kept = entries.split_off(&before);
        let dropped = entries.len() as u64;
        *entries = kept;
        Ok(dropped)
    }
}

/// The application state of a journal: an index of fact ids (values are read from the facts
/// they name). See the module documentation for the rules.
#[derive(Clone, Default, Debug)]
pub struct AppState {
    registers: BTreeMap<(Space, String, String), Register>,
    logs: BTreeMap<String, Log>,
    /// The entries of the logs, unless they are kept elsewhere ([`AppState::indexed`]).
    entries: MemLogIndex,
    /// The entries are kept in a [`LogIndex`] outside the state: the methods that list
    /// them ([`AppState::log_entries`], [`AppState::live_facts`], ...) must not be used.
    indexed: bool,
    /// Data facts of kinds this release does not know: always live.
    unknown: BTreeSet<(Epoch, FactId)>,
}

/// Whether a payload is application data (the only facts [`AppState`] folds).
pub fn is_data(p: &Payload) -> bool {
    matches!(
        p,
        Payload::Application { .. } | Payload::Data(_) | Payload::Unknown { .. }
    )
}

impl AppState {
    /// The state of `facts`, in any order, with duplicates.
    pub fn of<'a>(facts: impl IntoIterator<Item = &'a VerifiedFact>) -> Self {
        let mut s = Self::default();
        for f in facts {
            s.apply(f);
        }
        s
    }

    /// Folds one fact (facts of other kinds are ignored). Commutative and idempotent.
    pub fn apply(&mut self, f: &VerifiedFact) {
        self.apply_parts(f.order_key(), f.author(), f.payload());
    }

    /// An empty state whose log entries are kept in a [`LogIndex`] outside it: fold it with
    /// [`AppState::apply_indexed`], and read entries from the index.
    pub fn indexed() -> Self {
        Self {
            indexed: true,
            ..Self::default()
        }
    }

    /// [`AppState::apply`] from a fact's parts (for a store that verified the fact before it
    /// stored it and reads back only its payload).
    pub fn apply_parts(&mut self, at: (Epoch, FactId), author: DeviceId, payload: &Payload) {
        debug_assert!(!self.indexed, "an indexed state folds with apply_indexed");
        let mut entries = std::mem::take(&mut self.entries);
        let Ok(()) = self.apply_indexed(at, author, payload, &mut entries);
        self.entries = entries;
    }

    /// [`AppState::apply_parts`], keeping log entries in `index`.
    pub fn apply_indexed<I: LogIndex>(
        &mut self,
        at: (Epoch, FactId),
        author: DeviceId,
        payload: &Payload,
        index: &mut I,
    ) -> Result<(), I::Error> {
        let mut reg = |space, coll: &str, key: &str, deleted, sup: &[FactId]| {
            self.registers
                .entry((space, coll.to_owned(), key.to_owned()))
                .or_default()
                .apply(at, Head { author, deleted }, sup);
        };
        match payload {
            Payload::Data(DataOp::Put(p)) => reg(
                Space::Collection,
                &p.collection,
                &p.key,
                false,
                &p.supersedes,
            ),
            Payload::Data(DataOp::Delete(d)) => reg(
                Space::Collection,
                &d.collection,
                &d.key,
                true,
                &d.supersedes,
            ),
            Payload::Data(DataOp::CachePut(c)) => {
                reg(Space::Cache, "", &c.key, false, &c.supersedes)
            }
            Payload::Data(DataOp::Trim(t)) => {
                let log = self.logs.entry(t.log.clone()).or_default();
                log.max_seq = log.max_seq.max(t.before.seq);
                if log.trimmed_before.is_none_or(|b| b < t.before) {
                    log.trimmed_before = Some(t.before);
                    log.len = log.len.saturating_sub(index.drop_below(&t.log, t.before)?);
                }
            }
            Payload::Application { kind: name, .. }
            | Payload::Data(DataOp::Append(Append { log: name, .. })) => {
                let log = self.logs.entry(name.clone()).or_default();
                let Some(cursor) = LogCursor::of_parts(at, payload) else {
                    return Ok(());
                };
                log.max_seq = log.max_seq.max(cursor.seq);
                if log.trimmed_before.is_none_or(|b| cursor >= b) && index.add(name, cursor)? {
                    log.len += 1;
                }
            }
            Payload::Unknown { .. } => {
                self.unknown.insert(at);
            }
            Payload::Maintenance(_) | Payload::Authority(_) => {}
        }
        Ok(())
    }

    /// Sets the entry counts of an indexed state from its index (after folding it against
    /// an index that already held the entries, which then reported none as new).
    pub fn set_log_len(&mut self, log: &str, len: u64) {
        self.logs.entry(log.to_owned()).or_default().len = len;
    }

    /// What `collection`/`key` reads as, or `None` when absent or deleted.
    pub fn get(&self, collection: &str, key: &str) -> Option<Entry> {
        self.entry(Space::Collection, collection, key)
    }

    /// The cache entry of `key`, valid or not (see [`AppState::cache_valid`]).
    pub fn cache_get(&self, key: &str) -> Option<Entry> {
        self.entry(Space::Cache, "", key)
    }

    fn entry(&self, space: Space, coll: &str, key: &str) -> Option<Entry> {
        let reg = self
            .registers
            .get(&(space, coll.to_owned(), key.to_owned()))?;
        let mut puts = reg.put_heads();
        let (winner, head) = puts.next()?;
        Some(Entry {
            winner: *winner,
            author: head.author,
            conflicts: puts.map(|(k, _)| *k).collect(),
        })
    }

    /// Every head of a key, deletes included: what a new write of it must supersede.
    pub fn heads(&self, space: Space, collection: &str, key: &str) -> Vec<FactId> {
        self.head_keys(space, collection, key)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// [`AppState::heads`] with their epochs, ascending.
    pub fn head_keys(&self, space: Space, collection: &str, key: &str) -> Vec<(Epoch, FactId)> {
        self.registers
            .get(&(space, collection.to_owned(), key.to_owned()))
            .map(|r| r.heads.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The live keys of a collection in key order, from `after` (exclusive), with `prefix`.
    pub fn scan<'a>(
        &'a self,
        collection: &'a str,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a str, Entry)> + 'a {
        let start = (Space::Collection, collection.to_owned(), String::new());
        self.registers
            .range(start..)
            .take_while(move |((s, c, _), _)| *s == Space::Collection && c == collection)
            .filter(move |((_, _, k), _)| k.starts_with(prefix))
            .filter(move |((_, _, k), _)| after.is_none_or(|a| k.as_str() > a))
            .filter_map(move |((_, c, k), _)| {
                self.entry(Space::Collection, c, k).map(|e| (k.as_str(), e))
            })
    }

    /// The collections with at least one live key.
    pub fn collections(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for ((s, c, _), r) in &self.registers {
            if *s == Space::Collection
                && r.put_heads().next().is_some()
                && out.last() != Some(&c.as_str())
            {
                out.push(c);
            }
        }
        out
    }

    /// Live keys in all collections.
    pub fn live_keys(&self) -> usize {
        self.registers
            .iter()
            .filter(|((s, _, _), r)| *s == Space::Collection && r.put_heads().next().is_some())
            .count()
    }

    /// The untrimmed entries of `log` after `after` (exclusive), ascending. Not for an
    /// [`AppState::indexed`] state (its index lists them).
    pub fn log_entries<'a>(
        &'a self,
        log: &str,
        after: Option<LogCursor>,
    ) -> impl Iterator<Item = LogCursor> + 'a {
        debug_assert!(!self.indexed, "an indexed state's entries are in its index");
        let entries = self.entries.0.get(log);
        entries.into_iter().flat_map(move |e| match after {
            Some(a) => e
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .copied()
                .collect::<Vec<_>>(),
            None => e.iter().copied().collect(),
        })
    }

    /// The `seq` a new entry of `log` takes: one more than any this state has seen.
    pub fn next_seq(&self, log: &str) -> u64 {
        self.logs.get(log).map_or(0, |l| l.max_seq) + 1
    }

    /// The logs and their untrimmed entry counts.
    pub fn logs(&self) -> impl Iterator<Item = (&str, usize)> {
        self.logs.iter().map(|(n, l)| (n.as_str(), l.len as usize))
    }

    /// Whether any log has been trimmed.
    pub fn logs_trimmed(&self) -> bool {
        self.logs.values().any(|l| l.trimmed_before.is_some())
    }

    /// Untrimmed log entries in all logs.
    pub fn log_len(&self) -> usize {
        self.logs.values().map(|l| l.len as usize).sum()
    }

    /// Whether the cache entry written at `computed_at` under `key` is valid under `floors`
    /// (DESIGN rule 6: its epoch must exceed the key's floor).
    pub fn cache_valid(floors: &BTreeMap<String, Epoch>, key: &str, computed_at: Epoch) -> bool {
        floors.get(key).is_none_or(|floor| computed_at > *floor)
    }

    /// The facts the state needs, ascending (see the module documentation). `floors` are
    /// the cache floors of the same journal (`MaintenanceState::cache_floors`).
    /// Not for an [`AppState::indexed`] state: there, [`AppState::live_beside_entries`]
    /// plus the index's entries.
    pub fn live_facts(&self, floors: &BTreeMap<String, Epoch>) -> BTreeSet<(Epoch, FactId)> {
        debug_assert!(!self.indexed, "an indexed state's entries are in its index");
        let mut live = self.live_beside_entries(floors);
        for entries in self.entries.0.values() {
            live.extend(entries.iter().map(|c| (c.epoch, c.id)));
        }
        live
    }

    /// The live facts that are not log entries: the put heads the state needs and the
    /// facts of unknown kinds.
    pub fn live_beside_entries(
        &self,
        floors: &BTreeMap<String, Epoch>,
    ) -> BTreeSet<(Epoch, FactId)> {
        let mut live = self.unknown.clone();
        live.extend(self.live_heads(floors));
        live
    }

    /// The put heads the state needs: every collection key's, and those of cache keys
    /// that their floor has not invalidated.
    fn live_heads<'a>(
        &'a self,
        floors: &'a BTreeMap<String, Epoch>,
    ) -> impl Iterator<Item = (Epoch, FactId)> + 'a {
        self.registers
            .iter()
            .flat_map(move |((space, _, key), reg)| {
                reg.put_heads().map(|(at, _)| *at).filter(move |at| {
                    *space == Space::Collection || Self::cache_valid(floors, key, at.0)
                })
            })
    }

    /// How many of the facts [`AppState::live_facts`] lists are below `below`, counted
    /// without listing them (each live fact is one key's head, one log's entry or one
    /// unknown fact, so the parts add up).
    /// Not for an [`AppState::indexed`] state: there,
    /// [`AppState::live_len_below_beside_entries`] plus the index's entries below.
    pub fn live_len_below(&self, floors: &BTreeMap<String, Epoch>, below: Epoch) -> usize {
        debug_assert!(!self.indexed, "an indexed state's entries are in its index");
        let first_at_below = LogCursor::first_at(below);
        let entries: usize = self
            .entries
            .0
            .values()
            .map(|e| e.range(..first_at_below).count())
            .sum();
        self.live_len_below_beside_entries(floors, below) + entries
    }

    /// [`AppState::live_len_below`] without the log entries.
    pub fn live_len_below_beside_entries(
        &self,
        floors: &BTreeMap<String, Epoch>,
        below: Epoch,
    ) -> usize {
        let heads = self.live_heads(floors).filter(|at| at.0 < below).count();
        self.unknown.range(..(below, FactId([0; 32]))).count() + heads
    }

    /// The put heads of every collection key: the facts whose values can be read (and so
    /// whose blobs must stay), ascending.
    pub fn value_heads(&self) -> BTreeSet<(Epoch, FactId)> {
        self.registers
            .iter()
            .filter(|((space, _, _), _)| *space == Space::Collection)
            .flat_map(|(_, reg)| reg.put_heads().map(|(at, _)| *at))
            .collect()
    }

    /// A digest of the visible state: every live fact (by id, which hashes its content) in
    /// order. Two replicas with the same digest read the same values, conflicts and logs.
    pub fn digest(&self, floors: &BTreeMap<String, Epoch>) -> Hash32 {
        digest_of_live(&self.live_facts(floors))
    }
}

/// [`AppState::digest`] of a live set (for an indexed state, its own live facts and its
/// index's entries).
pub fn digest_of_live(live: &BTreeSet<(Epoch, FactId)>) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(b"tend-app-state-v1");
    for (e, id) in live {
        h.update(&e.0.to_be_bytes());
        h.update(&id.0);
    }
    Hash32(*h.finalize().as_bytes())
}
