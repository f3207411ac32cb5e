//! Test helpers: keys, authorities and signed facts.
#![allow(dead_code)]

use ed25519_dalek::{Signer, SigningKey};
use tend_core::maintenance::{BlobTombstone, CacheInvalidated, SnapshotCompleted, SnapshotV1};
use tend_core::{
    AuthorityFact, AuthorityGenesis, ContentId, ContextId, DeviceId, Epoch, GroupKey, Hash32,
    JournalNamespace, MaintenanceFact, MembershipChange, Payload, UnsignedFact, VerifiedFact,
};

pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn device(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

pub fn group_key(k: &SigningKey) -> GroupKey {
    GroupKey(k.verifying_key().to_bytes())
}

/// A one-device authority whose group key is the device key: its namespace and genesis fact.
pub fn authority(admin: &SigningKey) -> (JournalNamespace, VerifiedFact) {
    let g = AuthorityGenesis {
        nonce: [42; 32],
        members: vec![device(admin)],
        threshold: 1,
        group_key: group_key(admin),
        admin: device(admin),
    };
    let ns = JournalNamespace::Authority(g.authority_id());
    let f = UnsignedFact {
        namespace: ns,
        epoch: Epoch(0),
        payload: Payload::Authority(AuthorityFact::Genesis(g)),
    }
    .sign(admin);
    (ns, f)
}

/// The admin adds `members` (sorted by the helper) at `epoch`, with the admin's key as group key.
pub fn membership(
    ns: JournalNamespace,
    admin: &SigningKey,
    epoch: u64,
    identity_epoch: u64,
    members: &[&SigningKey],
) -> VerifiedFact {
    let mut m: Vec<DeviceId> = members.iter().map(|k| device(k)).collect();
    m.sort();
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
            identity_epoch,
            members: m,
            threshold: 1,
            group_key: group_key(admin),
        })),
    }
    .sign(admin)
}

pub fn context(n: u8) -> JournalNamespace {
    JournalNamespace::Context(ContextId([n; 32]))
}

pub fn app(ns: JournalNamespace, epoch: u64, k: &SigningKey, data: &[u8]) -> VerifiedFact {
    note(ns, epoch, data).sign(k)
}

fn note(ns: JournalNamespace, epoch: u64, data: &[u8]) -> UnsignedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Application {
            kind: "note".into(),
            data: data.to_vec(),
        },
    }
}

/// [`app`] in the timed fact format, written at `time_ms`.
pub fn app_timed(
    ns: JournalNamespace,
    epoch: u64,
    k: &SigningKey,
    data: &[u8],
    time_ms: u64,
) -> VerifiedFact {
    note(ns, epoch, data).sign_timed(k, time_ms)
}

/// `trim("note", before (before_epoch, 0))`: every entry of the `app` log below that epoch
/// goes (a trim written at `epoch`).
pub fn trim_notes(
    ns: JournalNamespace,
    epoch: u64,
    k: &SigningKey,
    before_epoch: u64,
) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Data(tend_core::DataOp::Trim(tend_core::app::Trim {
            log: "note".into(),
            before: tend_core::app::LogCursor::first_at(Epoch(before_epoch)),
        })),
    }
    .sign(k)
}

pub fn maint(ns: JournalNamespace, epoch: u64, k: &SigningKey, m: MaintenanceFact) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch),
        payload: Payload::Maintenance(m),
    }
    .sign(k)
}

pub fn cache_invalidated(
    ns: JournalNamespace,
    epoch: u64,
    k: &SigningKey,
    key: &str,
    floor: u64,
) -> VerifiedFact {
    maint(
        ns,
        epoch,
        k,
        MaintenanceFact::CacheInvalidated(CacheInvalidated {
            keys: vec![key.into()],
            epoch_floor: Epoch(floor),
        }),
    )
}

pub fn tombstone(ns: JournalNamespace, epoch: u64, k: &SigningKey, cid: ContentId) -> VerifiedFact {
    maint(
        ns,
        epoch,
        k,
        MaintenanceFact::BlobTombstone(BlobTombstone { cid }),
    )
}

/// A verified `SnapshotCompleted` at `epoch` for a one-device authority (group key = `k`).
pub fn snapshot_completed(
    ns: JournalNamespace,
    k: &SigningKey,
    fact_epoch: u64,
    target: u64,
    digest: Hash32,
) -> VerifiedFact {
    let proposal_id = Hash32::of(&target.to_be_bytes());
    let snapshot = SnapshotV1 {
        epoch: Epoch(target),
        digest,
        blob_cid: ContentId::of_raw(b"snapshot blob"),
    };
    let sig = k
        .sign(&snapshot.signing_message(&ns, &proposal_id))
        .to_bytes();
    maint(
        ns,
        fact_epoch,
        k,
        MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
            proposal_id,
            snapshot,
            threshold_signature: sig,
        }),
    )
}
