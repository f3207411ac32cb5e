//! The vault facts' reduction: admin-only, bound to the identity epoch governing the fact,
//! first key per epoch wins, the latest grant or revocation wins, and every kind survives its
//! wire encoding.

use ed25519_dalek::SigningKey;
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::{StorageGrant, VaultCopy, VaultEpochKey, VaultRekey};
use tend_core::{
    reduce, AuthorityFact, AuthorityGenesis, ContentId, DeviceId, Epoch, GroupKey,
    JournalNamespace, MembershipChange, Payload, UnsignedFact, VerifiedFact,
};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn id(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

fn fact(ns: JournalNamespace, epoch: u64, author: &SigningKey, payload: Payload) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload,
    }
    .sign(author)
}

fn epoch_key(identity_epoch: u64, byte: u8) -> Payload {
    Payload::Maintenance(MaintenanceFact::VaultEpochKey(VaultEpochKey {
        identity_epoch,
        public_key: [byte; 32],
        sealed_ring: ByteBuf::from(vec![byte; 10]),
        sealed_history: ByteBuf::from(vec![byte; 12]),
    }))
}

#[test]
fn vault_facts_fold_by_the_admin_and_the_governing_epoch() {
    let (admin, member) = (key(1), key(2));
    let mut members = vec![id(&admin), id(&member)];
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [3; 32],
        members: members.clone(),
        threshold: 1,
        group_key: GroupKey(admin.verifying_key().to_bytes()),
        admin: id(&admin),
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let change = MembershipChange {
        identity_epoch: 1,
        members,
        threshold: 1,
        group_key: GroupKey(admin.verifying_key().to_bytes()),
    };
    let rekey = |from, to, n: usize| {
        Payload::Maintenance(MaintenanceFact::VaultRekey(VaultRekey {
            from_epoch: from,
            to_epoch: to,
            threshold: 1,
            kfrags: vec![ByteBuf::from(vec![7; 192]); n],
        }))
    };
    let grant = |granted| {
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: id(&key(9)),
            granted,
        }))
    };
    let copy = Payload::Maintenance(MaintenanceFact::VaultCopy(VaultCopy {
        blob: ContentId::of_raw(b"plain"),
        encrypted: ContentId::of_raw(b"cipher"),
    }));
    let facts = vec![
        fact(
            ns,
            0,
            &admin,
            Payload::Authority(AuthorityFact::Genesis(genesis)),
        ),
        fact(ns, 1, &member, epoch_key(0, 1)), // not the admin: ignored
        fact(ns, 1, &admin, epoch_key(1, 2)),  // names an epoch not yet governing: ignored
        fact(ns, 2, &admin, epoch_key(0, 3)),  // counts
        fact(ns, 3, &admin, epoch_key(0, 4)),  // a second key for epoch 0: ignored
        fact(ns, 3, &admin, grant(true)),
        fact(ns, 4, &member, copy.clone()), // any member
        fact(
            ns,
            5,
            &admin,
            Payload::Authority(AuthorityFact::MembershipChanged(change)),
        ),
        fact(ns, 6, &admin, epoch_key(1, 5)),
        fact(ns, 6, &admin, rekey(0, 2, 1)), // to an epoch that is not the governing one
        fact(ns, 6, &admin, rekey(0, 1, 0)), // fewer fragments than the threshold
        fact(ns, 7, &admin, rekey(0, 1, 1)),
        fact(ns, 8, &admin, grant(false)),
    ];
    for f in &facts {
        let back = VerifiedFact::decode(f.bytes()).unwrap();
        assert_eq!(back.payload(), f.payload());
    }
    let state = reduce(ns, &facts);
    let vault = &state.vault;
    assert_eq!(vault.epoch_keys.len(), 2);
    assert_eq!(vault.epoch_keys[&0].public_key, [3; 32]);
    assert_eq!(vault.epoch_keys[&1].public_key, [5; 32]);
    assert_eq!(
        vault.rekeys.keys().copied().collect::<Vec<_>>(),
        vec![(0, 1)]
    );
    assert!(
        !vault.is_storage_peer(&id(&key(9))),
        "the later revocation wins"
    );
    assert_eq!(vault.copies.len(), 1);
    assert_eq!(state.ignored.len(), 5);
    // The order facts arrive in does not matter, and vault facts change the state digest.
    let reversed: Vec<_> = facts.iter().rev().cloned().collect();
    assert_eq!(reduce(ns, &reversed).state_digest(), state.state_digest());
    assert_ne!(
        reduce(ns, &facts[..12]).state_digest(),
        state.state_digest()
    );
}
