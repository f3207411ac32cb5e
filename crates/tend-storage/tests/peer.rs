//! The storage peer's rules over a real redb file, driven with real signed facts: admission
//! of pushed facts, refusal of non-members, re-encryption across two advances, and a
//! removed device left out.

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::StorageGrant;
use tend_core::{
    reduce, AuthorityFact, AuthorityGenesis, DeviceId, Epoch, GroupKey, JournalNamespace,
    MaintenanceState, MembershipChange, Payload, UnsignedFact, VerifiedFact,
};
use tend_storage::member::{current_ring, epoch_key_facts, open_fetched, seal_for_storage};
use tend_storage::{is_for_storage_peer, Request, Response, StoragePeer};

fn id(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

struct Journal {
    ns: JournalNamespace,
    facts: Vec<VerifiedFact>,
    epoch: u64,
}

impl Journal {
    fn new(admin: &SigningKey, members: &[&SigningKey]) -> Self {
        let mut ids: Vec<_> = members.iter().map(|k| id(k)).collect();
        ids.sort();
        let genesis = AuthorityGenesis {
            nonce: [7; 32],
            members: ids,
            threshold: 1,
            group_key: GroupKey(admin.verifying_key().to_bytes()),
            admin: id(admin),
        };
        let ns = JournalNamespace::Authority(genesis.authority_id());
        let mut j = Self {
            ns,
            facts: Vec::new(),
            epoch: 0,
        };
        j.write(admin, Payload::Authority(AuthorityFact::Genesis(genesis)));
        j
    }

    fn write(&mut self, author: &SigningKey, payload: Payload) -> VerifiedFact {
        let f = UnsignedFact {
            namespace: self.ns,
            epoch: Epoch(self.epoch),
            payload,
        }
        .sign(author);
        self.epoch += 1;
        self.facts.push(f.clone());
        f
    }

    fn state(&self) -> MaintenanceState {
        reduce(self.ns, &self.facts)
    }

    fn change(&mut self, admin: &SigningKey, members: &[&SigningKey]) {
        let mut ids: Vec<_> = members.iter().map(|k| id(k)).collect();
        ids.sort();
        let change = MembershipChange {
            identity_epoch: self.state().identity_epoch() + 1,
            members: ids,
            threshold: 1,
            group_key: GroupKey(admin.verifying_key().to_bytes()),
        };
        self.write(
            admin,
            Payload::Authority(AuthorityFact::MembershipChanged(change)),
        );
    }

    fn key_epoch(&mut self, admin: &SigningKey) {
        for p in epoch_key_facts(&mut OsRng, &self.state(), admin).unwrap() {
            self.write(admin, p);
        }
    }

    fn for_peer(&self) -> Vec<ByteBuf> {
        self.facts
            .iter()
            .filter(|f| is_for_storage_peer(f.payload()))
            .map(|f| ByteBuf::from(f.bytes().to_vec()))
            .collect()
    }
}

fn push(peer: &mut StoragePeer, from: &SigningKey, j: &Journal) -> Response {
    peer.handle(
        &mut OsRng,
        &id(from),
        Request::PushFacts {
            facts: j.for_peer(),
        },
    )
    .unwrap()
}

fn put(
    peer: &mut StoragePeer,
    from: &SigningKey,
    j: &Journal,
    plain: &[u8],
) -> tend_core::ContentId {
    let (request, cid) = seal_for_storage(&mut OsRng, &j.state(), plain).unwrap();
    let answer = peer.handle(&mut OsRng, &id(from), request).unwrap();
    assert_eq!(answer, Response::Stored { cid });
    cid
}

fn read(
    peer: &mut StoragePeer,
    reader: &SigningKey,
    j: &Journal,
    cid: &tend_core::ContentId,
) -> Result<Vec<u8>, String> {
    let state = j.state();
    let ring = current_ring(&state, reader).map_err(|e| e.to_string())?;
    match peer
        .handle(&mut OsRng, &id(reader), Request::Get { cid: *cid })
        .unwrap()
    {
        Response::Blob {
            blob,
            sealed_key,
            to_epoch,
            cfrags,
        } => open_fetched(&state, &ring, cid, &blob, &sealed_key, to_epoch, &cfrags)
            .map_err(|e| e.to_string()),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn a_member_added_two_epochs_later_reads_history_through_re_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let [admin, b, c, d, storage, outsider] =
        std::array::from_fn(|_| SigningKey::generate(&mut OsRng));
    let mut j = Journal::new(&admin, &[&admin, &b]);
    j.key_epoch(&admin);
    let authority = match j.ns {
        JournalNamespace::Authority(a) => a,
        _ => unreachable!(),
    };
    let mut peer =
        StoragePeer::open(&dir.path().join("vault.redb"), authority, id(&storage)).unwrap();

    // Before the grant, facts are taken but no blob.
    assert!(matches!(
        push(&mut peer, &b, &j),
        Response::FactsAdmitted { .. }
    ));
    let (request, _) = seal_for_storage(&mut OsRng, &j.state(), b"early").unwrap();
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&b), request).unwrap(),
        Response::Refused { .. }
    ));
    j.write(
        &admin,
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: id(&storage),
            granted: true,
        })),
    );
    // An outsider can neither push (it is no member) nor read.
    assert!(matches!(
        push(&mut peer, &outsider, &j),
        Response::Refused { .. }
    ));
    assert_eq!(
        push(&mut peer, &admin, &j),
        Response::FactsAdmitted { new: 1 }
    );

    let plain0 = b"epoch zero: MARKER-0".repeat(1000);
    let cid0 = put(&mut peer, &b, &j, &plain0);
    assert_eq!(read(&mut peer, &admin, &j, &cid0).unwrap(), plain0);
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&outsider), Request::Get { cid: cid0 })
            .unwrap(),
        Response::Refused { .. }
    ));

    // Epoch 1: b removed, c added. Epoch 2: d added.
    j.change(&admin, &[&admin, &c]);
    j.key_epoch(&admin);
    j.change(&admin, &[&admin, &c, &d]);
    j.key_epoch(&admin);
    assert!(matches!(
        push(&mut peer, &c, &j),
        Response::FactsAdmitted { .. }
    ));
    assert_eq!(peer.store().applied_rekeys().unwrap().len(), 2);

    // d never held the secret of epoch 0 and reads the blob through the proxy's fragments.
    let ring = current_ring(&j.state(), &d).unwrap();
    assert!(ring.secret(0).is_none());
    assert_eq!(read(&mut peer, &d, &j, &cid0).unwrap(), plain0);

    // A blob written after b's removal: b is refused by the peer, and even with the bytes
    // its ring (epoch 0) does not open the key.
    let plain2 = b"epoch two: MARKER-2".repeat(10);
    let cid2 = put(&mut peer, &c, &j, &plain2);
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&b), Request::Get { cid: cid2 })
            .unwrap(),
        Response::Refused { .. }
    ));
    assert!(current_ring(&j.state(), &b).is_err());
    let Response::Blob {
        blob, sealed_key, ..
    } = peer
        .handle(&mut OsRng, &id(&d), Request::Get { cid: cid2 })
        .unwrap()
    else {
        panic!("d reads the blob");
    };
    let b_ring = tend_storage::member::open_ring(&j.state(), &b).unwrap();
    assert_eq!(b_ring.current_epoch(), 0);
    assert!(open_fetched(
        &j.state(),
        &b_ring,
        &cid2,
        &blob,
        &sealed_key,
        2,
        &Vec::<Vec<u8>>::new()
    )
    .is_err());

    // Reopened, the peer keeps its state; its file holds no plaintext.
    drop(peer);
    let mut peer =
        StoragePeer::open(&dir.path().join("vault.redb"), authority, id(&storage)).unwrap();
    assert_eq!(read(&mut peer, &d, &j, &cid0).unwrap(), plain0);
    let disk = std::fs::read(dir.path().join("vault.redb")).unwrap();
    for marker in [b"MARKER-0".as_slice(), b"MARKER-2"] {
        assert!(!disk.windows(marker.len()).any(|w| w == marker));
    }
}

#[test]
fn only_values_whose_ciphertext_fits_a_request_are_uploaded() {
    use tend_storage::member::fits_one_request;
    use tend_storage::protocol::MAX_VAULT_BLOB_BYTES;
    assert!(fits_one_request(16 << 20));
    // The plaintext limit sits below the frame limit by the header and one tag per chunk.
    let max = MAX_VAULT_BLOB_BYTES as u64;
    assert!(!fits_one_request(max));
    assert!(fits_one_request(max - 47 - 16 * (max / 65536 + 1)));
    assert!(!fits_one_request(u64::MAX));
}

#[test]
fn bad_pushes_and_blobs_are_refused_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let [admin, storage] = std::array::from_fn(|_| SigningKey::generate(&mut OsRng));
    let mut j = Journal::new(&admin, &[&admin]);
    j.key_epoch(&admin);
    j.write(
        &admin,
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: id(&storage),
            granted: true,
        })),
    );
    let authority = match j.ns {
        JournalNamespace::Authority(a) => a,
        _ => unreachable!(),
    };
    let mut peer =
        StoragePeer::open(&dir.path().join("vault.redb"), authority, id(&storage)).unwrap();
    // An application fact (data in clear) is never taken.
    let app = j.write(
        &admin,
        Payload::Application {
            kind: "note".into(),
            data: b"secret".to_vec(),
        },
    );
    let mut facts = j.for_peer();
    facts.push(ByteBuf::from(app.bytes().to_vec()));
    let answer = peer
        .handle(&mut OsRng, &id(&admin), Request::PushFacts { facts })
        .unwrap();
    assert!(matches!(answer, Response::Refused { .. }), "{answer:?}");
    assert!(peer.store().facts().unwrap().is_empty());
    // A tampered fact.
    let mut facts = j.for_peer();
    let last = facts.last_mut().unwrap();
    let n = last.len();
    last[n - 1] ^= 1;
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&admin), Request::PushFacts { facts })
            .unwrap(),
        Response::Refused { .. }
    ));
    assert!(matches!(
        push(&mut peer, &admin, &j),
        Response::FactsAdmitted { new: 3 }
    ));
    // A truncated blob and a garbage sealed key.
    let (Request::Put { sealed_key, blob }, _) =
        seal_for_storage(&mut OsRng, &j.state(), b"x").unwrap()
    else {
        unreachable!()
    };
    let short = ByteBuf::from(blob[..blob.len() - 10].to_vec());
    for request in [
        Request::Put {
            sealed_key: sealed_key.clone(),
            blob: short,
        },
        Request::Put {
            sealed_key: ByteBuf::from(vec![0; 152]),
            blob: blob.clone(),
        },
    ] {
        assert!(matches!(
            peer.handle(&mut OsRng, &id(&admin), request).unwrap(),
            Response::Refused { .. }
        ));
    }
    assert_eq!(peer.store().blob_count().unwrap(), 0);

    // Granted, a blob goes in; once the admin's revocation is pushed, nothing goes in or out.
    let (request, cid) = seal_for_storage(&mut OsRng, &j.state(), b"kept").unwrap();
    assert_eq!(
        peer.handle(&mut OsRng, &id(&admin), request).unwrap(),
        Response::Stored { cid }
    );
    j.write(
        &admin,
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: id(&storage),
            granted: false,
        })),
    );
    assert!(matches!(
        push(&mut peer, &admin, &j),
        Response::FactsAdmitted { new: 1 }
    ));
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&admin), Request::Get { cid })
            .unwrap(),
        Response::Refused { .. }
    ));
}

#[test]
fn a_member_deletes_reclaimed_copies_and_an_outsider_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let [admin, storage, outsider] = std::array::from_fn(|_| SigningKey::generate(&mut OsRng));
    let mut j = Journal::new(&admin, &[&admin]);
    j.key_epoch(&admin);
    j.write(
        &admin,
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: id(&storage),
            granted: true,
        })),
    );
    let JournalNamespace::Authority(authority) = j.ns else {
        unreachable!()
    };
    let mut peer =
        StoragePeer::open(&dir.path().join("vault.redb"), authority, id(&storage)).unwrap();
    push(&mut peer, &admin, &j);
    let kept = put(&mut peer, &admin, &j, b"kept");
    let reclaimed = put(&mut peer, &admin, &j, b"reclaimed");
    let drop = |cids| Request::Drop { cids };
    assert!(matches!(
        peer.handle(&mut OsRng, &id(&outsider), drop(vec![reclaimed]))
            .unwrap(),
        Response::Refused { .. }
    ));
    assert_eq!(peer.store().blob_count().unwrap(), 2);
    assert_eq!(
        peer.handle(&mut OsRng, &id(&admin), drop(vec![reclaimed, reclaimed]))
            .unwrap(),
        Response::Dropped { removed: 1 }
    );
    assert_eq!(
        peer.handle(&mut OsRng, &id(&admin), Request::Get { cid: reclaimed })
            .unwrap(),
        Response::Missing { cid: reclaimed }
    );
    assert_eq!(read(&mut peer, &admin, &j, &kept).unwrap(), b"kept");
    assert_eq!(peer.store().blob_count().unwrap(), 1);
}
