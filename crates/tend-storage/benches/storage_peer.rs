//! The storage peer's re-encryption at an epoch advance, end to end on its redb file: a push
//! of the advance's facts makes the peer verify the fragments, read every stored sealed key
//! of the older epoch, re-encrypt each and write the capsule fragments in one transaction.
//! Then a late member's read of one re-encrypted blob. Prints medians; `TEND_BENCH_KEYS`
//! (default 100000) sets the number of stored blobs, `TEND_BENCH_ROUNDS` (default 3) the runs.

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::StorageGrant;
use tend_core::{
    reduce, AuthorityFact, AuthorityGenesis, ContentId, DeviceId, Epoch, GroupKey,
    JournalNamespace, MaintenanceState, MembershipChange, Payload, UnsignedFact, VerifiedFact,
};
use tend_storage::member::{current_ring, epoch_key_facts, open_fetched};
use tend_storage::{is_for_storage_peer, Request, Response, StoragePeer};
use tend_vault::{encrypt_blob, EpochPublicKey, SealedContentKey};

fn id(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

struct Journal {
    ns: JournalNamespace,
    facts: Vec<VerifiedFact>,
    epoch: u64,
}

impl Journal {
    fn write(&mut self, author: &SigningKey, payload: Payload) {
        let f = UnsignedFact {
            namespace: self.ns,
            epoch: Epoch(self.epoch),
            payload,
        }
        .sign(author);
        self.epoch += 1;
        self.facts.push(f);
    }

    fn state(&self) -> MaintenanceState {
        reduce(self.ns, &self.facts)
    }

    fn for_peer(&self) -> Vec<ByteBuf> {
        self.facts
            .iter()
            .filter(|f| is_for_storage_peer(f.payload()))
            .map(|f| ByteBuf::from(f.bytes().to_vec()))
            .collect()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let keys: usize = std::env::var("TEND_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rounds: usize = std::env::var("TEND_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rekey_times = Vec::new();
    let mut read_times = Vec::new();
    for round in 0..rounds {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let [admin, member, late, storage] =
            std::array::from_fn(|_| SigningKey::generate(&mut OsRng));
        let mut members = vec![id(&admin), id(&member)];
        members.sort();
        let genesis = AuthorityGenesis {
            nonce: [round as u8; 32],
            members,
            threshold: 1,
            group_key: GroupKey(admin.verifying_key().to_bytes()),
            admin: id(&admin),
        };
        let authority = genesis.authority_id();
        let mut j = Journal {
            ns: JournalNamespace::Authority(authority),
            facts: Vec::new(),
            epoch: 0,
        };
        j.write(&admin, Payload::Authority(AuthorityFact::Genesis(genesis)));
        for p in epoch_key_facts(&mut OsRng, &j.state(), &admin).expect("key epoch 0") {
            j.write(&admin, p);
        }
        j.write(
            &admin,
            Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
                peer: id(&storage),
                granted: true,
            })),
        );
        let mut peer = StoragePeer::open(&dir.path().join("vault.redb"), authority, id(&storage))
            .expect("open");
        let pushed = peer
            .handle(
                &mut OsRng,
                &id(&admin),
                Request::PushFacts {
                    facts: j.for_peer(),
                },
            )
            .expect("push");
        assert!(matches!(pushed, Response::FactsAdmitted { .. }));

        // `keys` small blobs sealed to epoch 0, imported in batches (not timed).
        let epoch0 = EpochPublicKey::from_bytes(&j.state().vault.epoch_keys[&0].public_key)
            .expect("epoch key");
        let start = Instant::now();
        let mut first = None;
        for chunk in (0..keys).collect::<Vec<_>>().chunks(10_000) {
            let batch: Vec<(ContentId, SealedContentKey, Vec<u8>)> = chunk
                .iter()
                .map(|i| {
                    let (blob, key) = encrypt_blob(&mut OsRng, &i.to_be_bytes().repeat(8));
                    let sealed = SealedContentKey::seal(&mut OsRng, &key, 0, &epoch0);
                    let bytes = blob.to_bytes();
                    (ContentId::of_raw(&bytes), sealed, bytes)
                })
                .collect();
            first.get_or_insert(batch[0].0);
            peer.store().put_many(&batch).expect("import");
        }
        eprintln!(
            "round {round}: {keys} sealed keys stored in {:.1?}",
            start.elapsed()
        );

        // The advance: the late member joins; the admin keys epoch 1 with fragments 0 -> 1.
        let mut members = vec![id(&admin), id(&member), id(&late)];
        members.sort();
        j.write(
            &admin,
            Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
                identity_epoch: 1,
                members,
                threshold: 1,
                group_key: GroupKey(admin.verifying_key().to_bytes()),
            })),
        );
        for p in epoch_key_facts(&mut OsRng, &j.state(), &admin).expect("key epoch 1") {
            j.write(&admin, p);
        }
        let start = Instant::now();
        let pushed = peer
            .handle(
                &mut OsRng,
                &id(&admin),
                Request::PushFacts {
                    facts: j.for_peer(),
                },
            )
            .expect("push the advance");
        let took = start.elapsed();
        assert!(matches!(pushed, Response::FactsAdmitted { .. }));
        assert_eq!(peer.store().applied_rekeys().expect("applied").len(), 1);
        eprintln!(
            "round {round}: re-encrypted {keys} keys in {took:.2?} ({:.0} keys/s)",
            keys as f64 / took.as_secs_f64()
        );
        rekey_times.push(took);

        // The late member reads the first blob: fetch (from redb) and open via fragments.
        let cid = first.expect("a blob");
        let state = j.state();
        let ring = current_ring(&state, &late).expect("ring");
        let start = Instant::now();
        for _ in 0..100 {
            let Response::Blob {
                blob,
                sealed_key,
                to_epoch,
                cfrags,
            } = peer
                .handle(&mut OsRng, &id(&late), Request::Get { cid })
                .expect("get")
            else {
                panic!("the late member reads");
            };
            open_fetched(&state, &ring, &cid, &blob, &sealed_key, to_epoch, &cfrags).expect("open");
        }
        read_times.push(start.elapsed() / 100);
    }
    println!(
        "storage_peer/reencrypt_{keys}_stored_keys: median {:.2?} ({:.0} keys/s) over {rounds} runs",
        median(rekey_times.clone()),
        keys as f64 / median(rekey_times).as_secs_f64()
    );
    println!(
        "storage_peer/late_member_get_and_open: median {:.0?} per read",
        median(read_times)
    );
}
