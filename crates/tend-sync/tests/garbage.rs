//! Random and mutated bytes never panic the reconciler or a session: they give typed errors.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tend_core::{ContextId, Epoch, FactId, JournalNamespace};
use tend_sync::{MemItems, Reconciler, SharedItems, SyncItem, SyncMessage};

fn items(rng: &mut StdRng, n: usize) -> SharedItems {
    let ns = JournalNamespace::Context(ContextId([0; 32]));
    Arc::new(MemItems::new(
        ns,
        (0..n).map(|i| SyncItem {
            epoch: Epoch(i as u64 / 10),
            id: FactId(rng.gen()),
        }),
    ))
}

#[test]
fn random_and_mutated_negentropy_messages_never_panic() {
    let mut rng = StdRng::seed_from_u64(99);
    let set = items(&mut rng, 500);
    // Valid messages to mutate: an initiator's first query and a responder's answer.
    let mut ini = Reconciler::new(items(&mut rng, 300), 0).unwrap();
    let query = ini.initiate().unwrap();
    let answer = Reconciler::new(set.clone(), 0)
        .unwrap()
        .respond(&query)
        .unwrap();
    for round in 0..8_000 {
        let mut msg = match round % 3 {
            0 => {
                let len = rng.gen_range(0..120);
                let mut m: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if !m.is_empty() && rng.gen_bool(0.8) {
                    m[0] = 0x61;
                }
                m
            }
            1 => query.clone(),
            _ => answer.clone(),
        };
        if round % 3 != 0 && !msg.is_empty() {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..msg.len());
                msg[i] = rng.gen();
            }
            if rng.gen_bool(0.3) {
                msg.truncate(rng.gen_range(0..msg.len()));
            }
        }
        let mut responder = Reconciler::new(set.clone(), 4096).unwrap();
        let _ = responder.respond(&msg);
        let mut initiator = Reconciler::new(set.clone(), 4096).unwrap();
        initiator.initiate().unwrap();
        let _ = initiator.step(&msg);
        let _ = SyncMessage::decode(&msg, 1 << 20);
    }
}
