//! The device model's journal rules, deterministically.

use ed25519_dalek::SigningKey;
use tend_core::{
    AuthorityFact, AuthorityGenesis, DeviceId, Epoch, GroupKey, JournalNamespace, MembershipChange,
    Payload, UnsignedFact, VerifiedFact,
};
use tend_sim::device::Core;

fn id(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

fn fact(k: &SigningKey, ns: JournalNamespace, epoch: u64, payload: Payload) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload,
    }
    .sign(k)
}

/// Regression (simulator seed 33 before the RNG stream changed): device A admits a fact
/// of X at epoch 2, then learns that the admin removed X at epoch 1; device B learns the
/// removal first and refuses the fact. Admission is only checked on arrival, so without
/// revalidation A kept the fact forever and the two replicas never agreed.
#[test]
fn a_late_membership_change_drops_facts_it_makes_inadmissible() {
    let keys: Vec<SigningKey> = (1..=4u8)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect();
    let (admin, x) = (&keys[0], &keys[1]);
    let mut members: Vec<DeviceId> = keys.iter().map(id).collect();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [9; 32],
        members: members.clone(),
        threshold: 1,
        group_key: GroupKey(id(admin).0),
        admin: id(admin),
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let genesis = fact(
        admin,
        ns,
        0,
        Payload::Authority(AuthorityFact::Genesis(genesis)),
    );
    let remaining: Vec<DeviceId> = members.iter().copied().filter(|m| *m != id(x)).collect();
    let change = fact(
        admin,
        ns,
        1,
        Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
            identity_epoch: 1,
            members: remaining,
            threshold: 1,
            group_key: GroupKey(id(admin).0),
        })),
    );
    let late = fact(
        x,
        ns,
        2,
        Payload::Application {
            kind: "note".into(),
            data: b"written before X learned of its removal".to_vec(),
        },
    );

    for revalidate in [true, false] {
        let mut a = Core::new(keys[2].clone(), &genesis, false);
        let mut b = Core::new(keys[3].clone(), &genesis, false);
        a.revalidate_on_change = revalidate;
        b.revalidate_on_change = revalidate;
        assert_eq!(a.admit(late.clone()), Ok(true));
        assert_eq!(a.admit(change.clone()), Ok(true));
        assert_eq!(b.admit(change.clone()), Ok(true));
        assert!(
            b.admit(late.clone()).is_err(),
            "X is no longer a member at epoch 2"
        );
        let agree = a.tail_digest(Epoch::ZERO) == b.tail_digest(Epoch::ZERO)
            && a.state.state_digest() == b.state.state_digest();
        assert_eq!(agree, revalidate, "revalidate = {revalidate}");
        assert_eq!(a.holds(&late.order_key()), !revalidate);
    }
}
