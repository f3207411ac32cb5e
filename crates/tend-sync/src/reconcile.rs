//! The negentropy v1 reconciliation driver: one side of a set reconciliation over
//! [`OrderedItems`](crate::items::OrderedItems), with a frame size limit.
//!
//! Messages are the raw negentropy protocol version 1 bytes (first byte 0x61), byte for byte
//! what the reference implementations exchange, so they can be carried inside our own sync
//! messages or spoken directly (see the `tend-negentropy` binary).

use negentropy::{Id, Negentropy};
use tend_core::FactId;

use crate::items::{ItemStorage, SharedItems};

/// The negentropy protocol version byte this crate speaks (version 1).
pub const NEGENTROPY_V1: u8 = 0x61;

/// The smallest non-zero frame size limit negentropy accepts.
pub const MIN_FRAME_SIZE_LIMIT: u64 = 4096;

/// Why a reconciliation step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    /// The frame size limit is neither 0 (none) nor at least [`MIN_FRAME_SIZE_LIMIT`].
    #[error("frame size limit {0} is too small: use 0 (no limit) or at least 4096")]
    FrameSizeLimit(u64),
    /// The peer's message could not be processed (malformed, unknown mode, bad version).
    #[error("invalid negentropy message: {0}")]
    Protocol(String),
    /// The method does not fit this side's role.
    #[error("wrong role for this call: {0}")]
    Role(&'static str),
}

impl From<negentropy::Error> for ReconcileError {
    fn from(e: negentropy::Error) -> Self {
        match e {
            negentropy::Error::FrameSizeLimitTooSmall => ReconcileError::FrameSizeLimit(0),
            other => ReconcileError::Protocol(other.to_string()),
        }
    }
}

/// The result of one initiator step: what the peer lacks, what we lack, and the next
/// message (none when reconciliation is complete).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitiatorStep {
    /// Ids we have and the peer does not.
    pub have: Vec<FactId>,
    /// Ids the peer has and we do not.
    pub need: Vec<FactId>,
    /// The next message to send, or `None` when reconciliation has finished.
    pub next: Option<Vec<u8>>,
}

/// One side of a negentropy reconciliation over a snapshot of items.
pub struct Reconciler {
    neg: Negentropy<'static, ItemStorage>,
    frame_size_limit: u64,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("initiator", &self.neg.is_initiator())
            .field("frame_size_limit", &self.frame_size_limit)
            .finish()
    }
}

impl Reconciler {
    /// A reconciler over `items`; `frame_size_limit` is 0 (none) or at least 4096 bytes.
    pub fn new(items: SharedItems, frame_size_limit: u64) -> Result<Self, ReconcileError> {
        if frame_size_limit != 0 && frame_size_limit < MIN_FRAME_SIZE_LIMIT {
            return Err(ReconcileError::FrameSizeLimit(frame_size_limit));
        }
        let neg = Negentropy::owned(ItemStorage::new(items), frame_size_limit)
            .map_err(|_| ReconcileError::FrameSizeLimit(frame_size_limit))?;
        Ok(Self {
            neg,
            frame_size_limit,
        })
    }

    /// The frame size limit in force (0 = none).
    pub fn frame_size_limit(&self) -> u64 {
        self.frame_size_limit
    }

    /// Whether this side initiated.
    pub fn is_initiator(&self) -> bool {
        self.neg.is_initiator()
    }

    /// Builds the first message and makes this side the initiator.
    pub fn initiate(&mut self) -> Result<Vec<u8>, ReconcileError> {
        self.neg
            .initiate()
            .map_err(|_| ReconcileError::Role("initiate called twice"))
    }

    /// Responder: answers one message of the initiator. A message of another protocol
    /// version in 0x60..=0x6f gets the downgrade answer, our version byte alone.
    pub fn respond(&mut self, msg: &[u8]) -> Result<Vec<u8>, ReconcileError> {
        if self.neg.is_initiator() {
            return Err(ReconcileError::Role("the initiator cannot respond"));
        }
        check_v1(msg)?;
        Ok(self.neg.reconcile(msg)?)
    }

    /// Initiator: processes one answer of the responder.
    pub fn step(&mut self, msg: &[u8]) -> Result<InitiatorStep, ReconcileError> {
        if !self.neg.is_initiator() {
            return Err(ReconcileError::Role("the responder has no have/need ids"));
        }
        check_v1(msg)?;
        let (mut have, mut need): (Vec<Id>, Vec<Id>) = (Vec::new(), Vec::new());
        let next = self.neg.reconcile_with_ids(msg, &mut have, &mut need)?;
        let conv = |v: Vec<Id>| v.into_iter().map(|id| FactId(id.to_bytes())).collect();
        Ok(InitiatorStep {
            have: conv(have),
            need: conv(need),
            next,
        })
    }
}

/// Refuses a v1 message that does not parse to its end (other versions are left to the
/// downgrade rules).
fn check_v1(msg: &[u8]) -> Result<(), ReconcileError> {
    if msg.first() == Some(&NEGENTROPY_V1) && !is_well_formed_v1(msg) {
        return Err(ReconcileError::Protocol(
            "the message ends inside a range or is malformed".into(),
        ));
    }
    Ok(())
}

/// The ids listed in the `IdList` ranges of a negentropy v1 message, in message order, or
/// `None` if the message does not parse. A responder's answer lists the ids of small
/// differing ranges; wants can then name entries of it by position instead of by id.
pub fn id_list_entries(msg: &[u8]) -> Option<Vec<FactId>> {
    let mut ids = Vec::new();
    walk_v1(msg, &mut |id| ids.push(id))?;
    Some(ids)
}

/// Whether a negentropy v1 message parses to its end: every number complete, bounds of at
/// most 32 id bytes, known modes, whole fingerprints and id lists. The reference
/// implementations refuse a message that ends inside a number; negentropy 0.5.3 reads the
/// missing number as 0 (a skip) and answers it, so we check first.
fn is_well_formed_v1(msg: &[u8]) -> bool {
    walk_v1(msg, &mut |_| {}).is_some()
}

/// Parses a v1 message range by range, calling `on_id` for every id of an `IdList`.
fn walk_v1(msg: &[u8], on_id: &mut dyn FnMut(FactId)) -> Option<()> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v: u64 = 0;
        loop {
            let (&x, rest) = b.split_first()?;
            *b = rest;
            v = v.checked_mul(128)? | u64::from(x & 0x7f);
            if x & 0x80 == 0 {
                return Some(v);
            }
        }
    }
    fn skip<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    let (&version, mut b) = msg.split_first()?;
    if version != NEGENTROPY_V1 {
        return None;
    }
    while !b.is_empty() {
        varint(&mut b)?; // bound timestamp
        let len = usize::try_from(varint(&mut b)?).ok()?;
        if len > 32 {
            return None;
        }
        skip(&mut b, len)?;
        match varint(&mut b)? {
            0 => {}
            1 => {
                skip(&mut b, 16)?;
            }
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                if n > b.len() / 32 {
                    return None;
                }
                for _ in 0..n {
                    let id: [u8; 32] = skip(&mut b, 32)?.try_into().ok()?;
                    on_id(FactId(id));
                }
            }
            _ => return None,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::{MemItems, SyncItem};
    use std::collections::HashSet;
    use std::sync::Arc;
    use tend_core::{ContextId, Epoch, JournalNamespace};

    fn items(range: impl Iterator<Item = u64>) -> SharedItems {
        let ns = JournalNamespace::Context(ContextId([0; 32]));
        Arc::new(MemItems::new(
            ns,
            range.map(|i| SyncItem {
                epoch: Epoch(i / 7),
                id: FactId(*blake3_like(i)),
            }),
        ))
    }

    // A cheap deterministic 32-byte id per integer, without pulling a hash crate in here.
    fn blake3_like(i: u64) -> Box<[u8; 32]> {
        let mut out = [0u8; 32];
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
        for chunk in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        Box::new(out)
    }

    fn run(a: SharedItems, b: SharedItems, limit: u64) -> (usize, usize, usize) {
        let mut ini = Reconciler::new(a, limit).unwrap();
        let mut res = Reconciler::new(b, limit).unwrap();
        let mut msg = ini.initiate().unwrap();
        // Under a frame limit an id can be reported in more than one round: count each once.
        let (mut have, mut need) = (HashSet::new(), HashSet::new());
        let mut rounds = 0;
        loop {
            if limit > 0 {
                assert!(msg.len() as u64 <= limit);
            }
            let answer = res.respond(&msg).unwrap();
            if limit > 0 {
                assert!(answer.len() as u64 <= limit);
            }
            rounds += 1;
            let step = ini.step(&answer).unwrap();
            have.extend(step.have);
            need.extend(step.need);
            match step.next {
                Some(m) => msg = m,
                None => break,
            }
        }
        (have.len(), need.len(), rounds)
    }

    #[test]
    fn id_list_entries_lists_what_the_initiator_learns() {
        let mut ini = Reconciler::new(items(0..200), 0).unwrap();
        let mut res = Reconciler::new(items(100..260), 0).unwrap();
        let mut msg = ini.initiate().unwrap();
        let mut needs = 0;
        loop {
            let answer = res.respond(&msg).unwrap();
            let listed: HashSet<FactId> = id_list_entries(&answer).unwrap().into_iter().collect();
            let step = ini.step(&answer).unwrap();
            // Every need comes from an id list of the answer that revealed it.
            assert!(step.need.iter().all(|id| listed.contains(id)));
            needs += step.need.len();
            match step.next {
                Some(m) => msg = m,
                None => break,
            }
        }
        assert_eq!(needs, 60);
        assert_eq!(id_list_entries(&[0x61]), Some(vec![]));
        assert_eq!(id_list_entries(&[0x61, 0, 0, 2, 5]), None);
        assert_eq!(id_list_entries(&[]), None);
    }

    #[test]
    fn finds_both_directions() {
        let (h, n, _) = run(items(0..1000), items(500..1600), 0);
        assert_eq!((h, n), (500, 600));
    }

    #[test]
    fn frame_limit_is_respected_and_still_converges() {
        let (h, n, rounds) = run(items(0..20_000), items(10_000..30_000), 4096);
        assert_eq!((h, n), (10_000, 10_000));
        assert!(rounds > 2);
    }

    #[test]
    fn rejects_small_limits_and_garbage() {
        assert!(matches!(
            Reconciler::new(items(0..1), 100),
            Err(ReconcileError::FrameSizeLimit(100))
        ));
        let mut r = Reconciler::new(items(0..10), 0).unwrap();
        assert!(r.respond(&[0x61, 0x00, 0x00, 0x07]).is_err());
        assert!(r.respond(&[0x61, 0x00, 0x00, 0x01, 0xaa]).is_err());
        assert!(r.respond(&[0x01]).is_err());
        // A message that ends inside a number is refused, as the reference does (the
        // crate alone would read the missing number as a skip and answer).
        for truncated in [
            &[0x61, 0x80][..],
            &[0x61, 0x00, 0x00],
            &[0x61, 0x00, 0x00, 0x02, 0x00, 0xff],
        ] {
            assert!(r.respond(truncated).is_err(), "{truncated:02x?}");
        }
        // Downgrade answer to an unknown version of the v1 family.
        assert_eq!(r.respond(&[0x62, 0x00]).unwrap(), vec![NEGENTROPY_V1]);
    }
}
