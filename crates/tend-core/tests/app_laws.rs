//! Property tests of the application state (DESIGN section 8): convergence whatever the
//! order of arrival and duplication, read-your-writes, deterministic conflicts, and that
//! dropping what is not live (GC, a snapshot that carries only live facts) changes nothing
//! visible.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use serde_bytes::ByteBuf;
use tend_core::app::{Append, CachePut, Delete, LogCursor, Put, Space, Trim, Value};
use tend_core::{AppState, ContextId, DataOp, Epoch, JournalNamespace, Payload, UnsignedFact};
use tend_core::{FactId, VerifiedFact};

const DEVICES: usize = 3;

fn ns() -> JournalNamespace {
    JournalNamespace::Context(ContextId([3; 32]))
}

#[derive(Clone, Debug)]
enum Step {
    Put {
        dev: usize,
        key: u8,
        val: u8,
    },
    Delete {
        dev: usize,
        key: u8,
    },
    /// `legacy`: the older form (tag 1, `seq` 0) a previous release writes.
    Append {
        dev: usize,
        log: u8,
        legacy: bool,
    },
    Trim {
        dev: usize,
        log: u8,
    },
    Cache {
        dev: usize,
        key: u8,
    },
    /// `to` learns everything `from` holds.
    Sync {
        from: usize,
        to: usize,
    },
    /// Every device's epoch moves on (a snapshot proposal, say).
    Bump,
}

fn step() -> impl Strategy<Value = Step> {
    let dev = 0..DEVICES;
    prop_oneof![
        4 => (dev.clone(), 0u8..4, any::<u8>()).prop_map(|(dev, key, val)| Step::Put { dev, key, val }),
        1 => (dev.clone(), 0u8..4).prop_map(|(dev, key)| Step::Delete { dev, key }),
        2 => (dev.clone(), 0u8..2, any::<bool>()).prop_map(|(dev, log, legacy)| Step::Append { dev, log, legacy }),
        1 => (dev.clone(), 0u8..2).prop_map(|(dev, log)| Step::Trim { dev, log }),
        1 => (dev.clone(), 0u8..2).prop_map(|(dev, key)| Step::Cache { dev, key }),
        3 => (dev.clone(), dev).prop_map(|(from, to)| Step::Sync { from, to }),
        1 => Just(Step::Bump),
    ]
}

struct Device {
    key: SigningKey,
    facts: BTreeMap<FactId, VerifiedFact>,
    state: AppState,
    epoch: u64,
}

impl Device {
    fn write(&mut self, payload: Payload) -> VerifiedFact {
        let f = UnsignedFact {
            namespace: ns(),
            epoch: Epoch(self.epoch),
            payload,
        }
        .sign(&self.key);
        self.learn(&f);
        f
    }

    fn learn(&mut self, f: &VerifiedFact) {
        self.epoch = self.epoch.max(f.epoch().0);
        if self.facts.insert(f.id(), f.clone()).is_none() {
            self.state.apply(f);
        }
    }
}

/// Plays the steps; checks read-your-writes on the way; returns every fact written.
fn play(steps: &[Step]) -> Vec<VerifiedFact> {
    let mut devs: Vec<Device> = (0..DEVICES)
        .map(|i| Device {
            key: SigningKey::from_bytes(&[i as u8 + 1; 32]),
            facts: BTreeMap::new(),
            state: AppState::default(),
            epoch: 1,
        })
        .collect();
    let mut all = Vec::new();
    for s in steps {
        match *s {
            Step::Put { dev, key, val } => {
                let d = &mut devs[dev];
                let k = format!("k{key}");
                let supersedes = d.state.heads(Space::Collection, "c", &k);
                let f = d.write(Payload::Data(DataOp::Put(Put {
                    collection: "c".into(),
                    key: k.clone(),
                    value: Value::Inline(ByteBuf::from(vec![val])),
                    supersedes,
                })));
                // Read-your-writes: the device's own latest write is what it reads.
                let e = d.state.get("c", &k).expect("just written");
                assert_eq!(e.winner, f.order_key());
                assert!(e.conflicts.is_empty());
                all.push(f);
            }
            Step::Delete { dev, key } => {
                let d = &mut devs[dev];
                let k = format!("k{key}");
                let supersedes = d.state.heads(Space::Collection, "c", &k);
                all.push(d.write(Payload::Data(DataOp::Delete(Delete {
                    collection: "c".into(),
                    key: k.clone(),
                    supersedes,
                }))));
                assert_eq!(d.state.get("c", &k), None, "a delete reads as absent");
            }
            Step::Append { dev, log, legacy } => {
                let n = all.len() as u8;
                let d = &mut devs[dev];
                let name = format!("log{log}");
                let payload = if legacy {
                    Payload::Application {
                        kind: name.clone(),
                        data: vec![n],
                    }
                } else {
                    Payload::Data(DataOp::Append(Append {
                        seq: d.state.next_seq(&name),
                        log: name.clone(),
                        data: ByteBuf::from(vec![n]),
                    }))
                };
                let f = d.write(payload);
                if !legacy {
                    // An ordered append sorts after everything its author had seen.
                    let last = d.state.log_entries(&name, None).last();
                    assert_eq!(last, LogCursor::of(&f));
                }
                all.push(f);
            }
            Step::Trim { dev, log } => {
                let d = &mut devs[dev];
                let name = format!("log{log}");
                if let Some(before) = d.state.log_entries(&name, None).last() {
                    all.push(d.write(Payload::Data(DataOp::Trim(Trim { log: name, before }))));
                }
            }
            Step::Cache { dev, key } => {
                let d = &mut devs[dev];
                let k = format!("ck{key}");
                let supersedes = d.state.heads(Space::Cache, "", &k);
                all.push(d.write(Payload::Data(DataOp::CachePut(CachePut {
                    key: k,
                    value: ByteBuf::from(vec![1]),
                    supersedes,
                }))));
            }
            Step::Sync { from, to } => {
                let facts: Vec<_> = devs[from].facts.values().cloned().collect();
                for f in &facts {
                    devs[to].learn(f);
                }
            }
            Step::Bump => {
                for d in &mut devs {
                    d.epoch += 1;
                }
            }
        }
    }
    all
}

/// Everything a reader can observe.
fn visible(s: &AppState) -> (Vec<(String, tend_core::app::Entry)>, Vec<Vec<LogCursor>>) {
    let keys = s
        .scan("c", "", None)
        .map(|(k, e)| (k.to_owned(), e))
        .collect();
    let logs = (0..2)
        .map(|l| s.log_entries(&format!("log{l}"), None).collect())
        .collect();
    (keys, logs)
}

fn no_floors() -> BTreeMap<String, Epoch> {
    BTreeMap::new()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any order, with duplicates, gives the same state (convergence and idempotence).
    #[test]
    fn order_and_duplicates_do_not_matter(
        steps in prop::collection::vec(step(), 1..60),
        seed in any::<u64>(),
    ) {
        let facts = play(&steps);
        let a = AppState::of(&facts);
        let mut shuffled = facts.clone();
        shuffled.extend(facts.iter().take(facts.len() / 2).cloned());
        // A deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let b = AppState::of(&shuffled);
        prop_assert_eq!(a.digest(&no_floors()), b.digest(&no_floors()));
        prop_assert_eq!(visible(&a), visible(&b));
    }

    /// Merging two replicas' fact sets is commutative and associative at the state level.
    #[test]
    fn merge_laws(steps in prop::collection::vec(step(), 1..60), cut1 in 0usize..60, cut2 in 0usize..60) {
        let facts = play(&steps);
        let (c1, c2) = (cut1.min(facts.len()), cut2.min(facts.len()));
        let (x, y, z) = (&facts[..c1], &facts[c1.min(c2)..c2.max(c1)], &facts[c2.min(facts.len())..]);
        let ab = AppState::of(x.iter().chain(y).chain(z));
        let ba = AppState::of(z.iter().chain(x).chain(y));
        prop_assert_eq!(ab.digest(&no_floors()), ba.digest(&no_floors()));
    }

    /// Keeping only the live facts (what a snapshot carries and GC keeps) reads the same.
    #[test]
    fn live_facts_alone_read_the_same(steps in prop::collection::vec(step(), 1..60), floor in 0u64..6) {
        let facts = play(&steps);
        let full = AppState::of(&facts);
        let floors: BTreeMap<String, Epoch> =
            [("ck0".to_owned(), Epoch(floor))].into_iter().collect();
        let live = full.live_facts(&floors);
        // GC counts the live set to skip listing it when nothing is to be pruned.
        for below in [Epoch(0), Epoch(floor), Epoch(3), Epoch(u64::MAX)] {
            let listed = live.iter().filter(|k| k.0 < below).count();
            prop_assert_eq!(full.live_len_below(&floors, below), listed);
        }
        let kept: Vec<_> = facts.iter().filter(|f| live.contains(&f.order_key())).cloned().collect();
        let pruned = AppState::of(&kept);
        prop_assert_eq!(visible(&full), visible(&pruned));
        prop_assert_eq!(full.digest(&floors), pruned.digest(&floors));
        // Dropping what is not live never changes what is live.
        prop_assert_eq!(pruned.live_facts(&floors), live);
    }

    /// GC below an epoch E keeps the facts live in the prefix below E and everything at or
    /// above it: the state is unchanged, and a second snapshot's live set is the same on a
    /// pruned and an archive replica.
    #[test]
    fn pruning_a_prefix_changes_nothing(steps in prop::collection::vec(step(), 1..80), e in 1u64..8, e2 in 1u64..8) {
        let facts = play(&steps);
        let (e, e2) = (Epoch(e.min(e2)), Epoch(e.max(e2)));
        let prefix_live = AppState::of(facts.iter().filter(|f| f.epoch() < e)).live_facts(&no_floors());
        let kept: Vec<_> = facts
            .iter()
            .filter(|f| f.epoch() >= e || prefix_live.contains(&f.order_key()))
            .cloned()
            .collect();
        let full = AppState::of(&facts);
        let pruned = AppState::of(&kept);
        prop_assert_eq!(visible(&full), visible(&pruned));
        let below = |fs: &[VerifiedFact]| -> BTreeSet<_> {
            AppState::of(fs.iter().filter(|f| f.epoch() < e2)).live_facts(&no_floors())
        };
        prop_assert_eq!(below(&facts), below(&kept));
    }
}

/// Two devices that write the same key without seeing each other: both are heads, the
/// greater `(epoch, id)` wins on every replica, the other is a conflict until a write that
/// saw both supersedes them.
#[test]
fn concurrent_puts_conflict_then_resolve() {
    let steps = [
        Step::Put {
            dev: 0,
            key: 0,
            val: 1,
        },
        Step::Put {
            dev: 1,
            key: 0,
            val: 2,
        },
        Step::Sync { from: 0, to: 2 },
        Step::Sync { from: 1, to: 2 },
    ];
    let facts = play(&steps);
    let s = AppState::of(&facts);
    let e = s.get("c", "k0").unwrap();
    let winner = facts.iter().map(|f| f.order_key()).max().unwrap();
    assert_eq!(e.winner, winner);
    assert_eq!(e.conflicts.len(), 1);
    let mut steps = steps.to_vec();
    steps.push(Step::Put {
        dev: 2,
        key: 0,
        val: 3,
    });
    let facts = play(&steps);
    let e = AppState::of(&facts).get("c", "k0").unwrap();
    assert!(
        e.conflicts.is_empty(),
        "a write that saw both resolves the conflict"
    );
    assert_eq!(e.winner, facts.last().unwrap().order_key());
}

/// A put concurrent with a delete survives (add-wins); a delete that saw the put removes it.
#[test]
fn concurrent_delete_loses_to_put() {
    let facts = play(&[
        Step::Put {
            dev: 0,
            key: 0,
            val: 1,
        },
        Step::Sync { from: 0, to: 1 },
        Step::Delete { dev: 1, key: 0 },
        Step::Put {
            dev: 0,
            key: 0,
            val: 2,
        },
        Step::Sync { from: 1, to: 0 },
    ]);
    let s = AppState::of(&facts);
    assert_eq!(s.get("c", "k0").unwrap().winner, facts[2].order_key());
}

/// Cache entries computed at or below their key's floor are stale and not live.
#[test]
fn invalidated_cache_entries_are_not_live() {
    let facts = play(&[
        Step::Cache { dev: 0, key: 0 },
        Step::Bump,
        Step::Cache { dev: 1, key: 1 },
    ]);
    let s = AppState::of(&facts);
    let floors: BTreeMap<String, Epoch> = [("ck0".to_owned(), Epoch(1))].into_iter().collect();
    let live = s.live_facts(&floors);
    assert!(!live.contains(&facts[0].order_key()));
    assert!(live.contains(&facts[1].order_key()));
    assert!(!AppState::cache_valid(&floors, "ck0", facts[0].epoch()));
    assert!(AppState::cache_valid(&floors, "ck1", facts[1].epoch()));
}

/// Trimmed entries are gone whatever arrives first, the trim or the entry.
#[test]
fn trim_is_order_independent() {
    let facts = play(&[
        Step::Append {
            dev: 0,
            log: 0,
            legacy: false,
        },
        Step::Append {
            dev: 0,
            log: 0,
            legacy: false,
        },
        Step::Trim { dev: 0, log: 0 },
        Step::Append {
            dev: 0,
            log: 0,
            legacy: false,
        },
    ]);
    let fwd = AppState::of(&facts);
    let rev = AppState::of(facts.iter().rev());
    assert_eq!(visible(&fwd), visible(&rev));
    let entries: Vec<_> = fwd.log_entries("log0", None).collect();
    assert_eq!(
        entries.len(),
        2,
        "the trim keeps its own cursor's entry and later ones"
    );
}

#[test]
fn data_payloads_round_trip_and_old_releases_keep_them_as_unknown() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let put = UnsignedFact {
        namespace: ns(),
        epoch: Epoch(1),
        payload: Payload::Data(DataOp::Put(Put {
            collection: "notes".into(),
            key: "a".into(),
            value: Value::Inline(ByteBuf::from(vec![0xff, 0])),
            supersedes: vec![FactId([1; 32])],
        })),
    }
    .sign(&key);
    let back = VerifiedFact::decode(put.bytes()).unwrap();
    assert_eq!(back, put);
    // A release that knows no data tag reads the same bytes as an unknown fact: re-encoding
    // the unknown form gives the identical bytes, hence the identical id.
    let (tag, body) = put.payload().to_tag_body();
    assert_eq!(tag, 2);
    let unknown = Payload::Unknown { tag, raw: body };
    assert_eq!(unknown.to_tag_body(), put.payload().to_tag_body());
}

/// Within one epoch (the common case: epochs move only at snapshots), a log reads in the
/// order its entries were appended, whatever their fact ids.
#[test]
fn a_log_keeps_append_order_within_an_epoch() {
    let steps: Vec<Step> = (0..20)
        .map(|i| Step::Append {
            dev: i % 2,
            log: 0,
            legacy: false,
        })
        .flat_map(|s| {
            [
                s,
                Step::Sync { from: 0, to: 1 },
                Step::Sync { from: 1, to: 0 },
            ]
        })
        .collect();
    let facts = play(&steps);
    let read: Vec<_> = AppState::of(facts.iter().rev())
        .log_entries("log0", None)
        .collect();
    let written: Vec<_> = facts.iter().filter_map(LogCursor::of).collect();
    assert_eq!(read, written);
}
