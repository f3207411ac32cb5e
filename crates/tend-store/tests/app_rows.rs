//! The store keeps the whole journal's log entries as rows, not in memory: whatever the
//! store goes through (batches in any order, trims, retractions, pruning, reopening), its
//! entries, counts and digest are those of the in-memory fold of the facts it holds.

mod common;

use common::*;
use proptest::prelude::*;
use tend_core::app::{Append, LogCursor, Trim};
use tend_core::{AppState, DataOp, Epoch, JournalNamespace, Payload, UnsignedFact, VerifiedFact};
use tend_store::Store;

#[derive(Clone, Debug)]
enum Op {
    /// Appends to log `log` at `epoch` with clock `seq`.
    Append {
        log: u8,
        epoch: u64,
        seq: u64,
    },
    /// Trims `log` below the first cursor of `epoch`.
    Trim {
        log: u8,
        at: u64,
        before: u64,
    },
    /// Stores the facts made so far and not yet stored, in one batch.
    Flush,
    /// Retracts the `n`th stored data fact.
    Retract(usize),
    /// A snapshot below `target` (bounded by what is stored) and a prune.
    Prune {
        target: u64,
    },
    /// A maintenance fact (a blob tombstone) at `epoch`, stored at once.
    Maintenance {
        epoch: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2u8, 1..6u64, 0..4u64).prop_map(|(log, epoch, seq)| Op::Append { log, epoch, seq }),
        2 => (0..2u8, 1..6u64, 1..7u64).prop_map(|(log, at, before)| Op::Trim { log, at, before }),
        4 => Just(Op::Flush),
        1 => (0..64usize).prop_map(Op::Retract),
        1 => (2..7u64).prop_map(|target| Op::Prune { target }),
        1 => (1..8u64).prop_map(|epoch| Op::Maintenance { epoch }),
        1 => Just(Op::Reopen),
    ]
}

fn data(ns: JournalNamespace, epoch: u64, op: DataOp, n: u32) -> VerifiedFact {
    let op = match op {
        // A distinct fact for each call, even with the same log, epoch and clock.
        DataOp::Append(mut a) => {
            a.data = n.to_be_bytes().to_vec().into();
            DataOp::Append(a)
        }
        other => other,
    };
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Data(op),
    }
    .sign(&key(1))
}

fn stored_facts(s: &Store, ns: JournalNamespace) -> Vec<VerifiedFact> {
    s.scan(ns, ..)
        .unwrap()
        .map(|f| f.unwrap().trusted().unwrap())
        .collect()
}

fn check(s: &Store, ns: JournalNamespace) -> Result<(), TestCaseError> {
    let facts = stored_facts(s, ns);
    let want = AppState::of(&facts);
    let floors = s.maintenance_state(ns).unwrap().cache_floors;
    for log in ["log0", "log1"] {
        let have = s.log_entries(ns, log, None, usize::MAX).unwrap();
        let expected: Vec<LogCursor> = want.log_entries(log, None).collect();
        prop_assert_eq!(&have, &expected, "entries of {}", log);
        // Paging from a cursor gives the rest.
        if let Some(first) = expected.first() {
            let rest = s.log_entries(ns, log, Some(*first), 2).unwrap();
            prop_assert_eq!(&rest[..], &expected[1..expected.len().min(3)]);
        }
    }
    prop_assert_eq!(s.app_state(ns).unwrap().log_len(), want.log_len());
    prop_assert_eq!(s.app_digest(ns, &floors).unwrap(), want.digest(&floors));
    // What a snapshot below each epoch carries: the live set of the fold of the facts
    // below it, whether or not facts (data or maintenance) lie at or above it.
    for below in 1..9 {
        let prefix: Vec<_> = facts
            .iter()
            .filter(|f| f.epoch() < Epoch(below))
            .cloned()
            .collect();
        let floors = s
            .prefix_maintenance_state(ns, Epoch(below))
            .unwrap()
            .cache_floors;
        prop_assert_eq!(
            s.live_below(ns, Epoch(below)).unwrap(),
            AppState::of(&prefix).live_facts(&floors),
            "live below {}",
            below
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn the_rows_are_the_entries_of_the_stored_facts(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = key(1);
        let (ns, genesis) = authority(&k);
        let mut s = Store::create(&path).unwrap();
        s.insert_batch(&[genesis]).unwrap();
        let mut pending = Vec::new();
        let mut n = 0u32;
        for op in ops {
            n += 1;
            match op {
                Op::Append { log, epoch, seq } => pending.push(data(
                    ns,
                    epoch,
                    DataOp::Append(Append {
                        log: format!("log{log}"),
                        seq,
                        data: Vec::new().into(),
                    }),
                    n,
                )),
                Op::Trim { log, at, before } => pending.push(data(
                    ns,
                    at,
                    DataOp::Trim(Trim {
                        log: format!("log{log}"),
                        before: LogCursor::first_at(Epoch(before)),
                    }),
                    n,
                )),
                Op::Flush => {
                    s.insert_batch(&std::mem::take(&mut pending)).unwrap();
                }
                Op::Retract(i) => {
                    let facts = stored_facts(&s, ns);
                    let data: Vec<_> = facts
                        .iter()
                        .filter(|f| tend_core::app::is_data(f.payload()))
                        .collect();
                    if !data.is_empty() {
                        let f = data[i % data.len()];
                        s.retract_data(ns, &[f.order_key()]).unwrap();
                    }
                }
                Op::Prune { target } => {
                    let state = s.maintenance_state(ns).unwrap();
                    let current = state.current_epoch().0;
                    let done = state.latest_snapshot.map_or(0, |l| l.snapshot.epoch.0);
                    let target = target.min(current + 1);
                    if target > done {
                        let digest = s.prefix_digest(ns, Epoch(target)).unwrap();
                        let at = current.max(target);
                        s.insert_batch(&[snapshot_completed(ns, &k, at, target, digest)])
                            .unwrap();
                        s.prune(ns).unwrap();
                    }
                }
                Op::Maintenance { epoch } => {
                    let cid = tend_core::ContentId::of_raw(&n.to_be_bytes());
                    s.insert_batch(&[tombstone(ns, epoch, &k, cid)]).unwrap();
                }
                Op::Reopen => {
                    drop(s);
                    s = Store::open(&path).unwrap();
                }
            }
            check(&s, ns)?;
        }
    }
}
