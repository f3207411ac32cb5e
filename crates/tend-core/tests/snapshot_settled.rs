//! `SnapshotSettled` (tag 34): members say they settled a snapshot, and an item blob becomes
//! reclaimable once every current member has settled its snapshot or a later one
//! (docs/ARCHITECTURE.md section 4a). The same in any order; an older release keeps the
//! fact as unknown with the same id.

use ed25519_dalek::SigningKey;
use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey};
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::maintenance::{MaintenanceFact, SnapshotSettled};
use tend_core::{
    reduce, ContentId, DeviceId, Epoch, JournalNamespace, Payload, UnsignedFact, VerifiedFact,
};

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn device(i: u8) -> DeviceId {
    DeviceId(key(i).verifying_key().to_bytes())
}

/// An authority of devices 0..3, and its genesis.
fn authority() -> (JournalNamespace, VerifiedFact) {
    let mut members: Vec<DeviceId> = (0..3).map(device).collect();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: [9; 32],
        members,
        threshold: 2,
        group_key: GroupKey(SigningKey::from_bytes(&[77; 32]).verifying_key().to_bytes()),
        admin: device(0),
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let fact = UnsignedFact {
        namespace: ns,
        epoch: Epoch(0),
        payload: Payload::Authority(AuthorityFact::Genesis(genesis)),
    }
    .sign(&key(0));
    (ns, fact)
}

fn settled(
    ns: JournalNamespace,
    author: u8,
    at: u64,
    snapshot: u64,
    items: Option<ContentId>,
) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(at),
        payload: Payload::Maintenance(MaintenanceFact::SnapshotSettled(SnapshotSettled {
            snapshot_epoch: Epoch(snapshot),
            item_blob: items,
        })),
    }
    .sign(&key(author))
}

#[test]
fn an_item_blob_is_reclaimable_once_every_member_settled_its_snapshot_or_a_later_one() {
    let (ns, genesis) = authority();
    let first = ContentId::of(CODEC_DAG_CBOR, b"items of the snapshot at 5");
    let second = ContentId::of(CODEC_DAG_CBOR, b"items of the snapshot at 9");
    let facts = [
        genesis,
        settled(ns, 0, 5, 5, Some(first)),
        settled(ns, 1, 6, 5, Some(first)),
        // Device 2 skipped the snapshot at 5 and settled the one at 9: it needs neither.
        settled(ns, 2, 9, 9, None),
        settled(ns, 0, 9, 9, Some(second)),
    ];
    let state = reduce(ns, &facts);
    assert!(state.settled_by_every_member(Epoch(5)));
    assert!(!state.settled_by_every_member(Epoch(9)));
    assert_eq!(state.reclaimable_item_blobs(), vec![first]);
    // Any order gives the same.
    let reversed: Vec<VerifiedFact> = facts.iter().rev().cloned().collect();
    assert_eq!(reduce(ns, &reversed).reclaimable_item_blobs(), vec![first]);
    // With device 1 at 9 too, both go.
    let mut all = facts.to_vec();
    all.push(settled(ns, 1, 10, 9, Some(second)));
    let mut both = reduce(ns, &all).reclaimable_item_blobs();
    both.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(both, want);
    // A claim above its own epoch is ignored: nobody settles a snapshot it has not seen.
    let (ns, genesis) = authority();
    let early = [
        genesis,
        settled(ns, 0, 3, 5, Some(first)),
        settled(ns, 1, 5, 5, Some(first)),
        settled(ns, 2, 5, 5, Some(first)),
    ];
    let state = reduce(ns, &early);
    assert!(!state.settled_by_every_member(Epoch(5)));
    assert!(state.reclaimable_item_blobs().is_empty());
}

#[test]
fn a_settled_fact_reads_back_and_an_older_release_keeps_it_as_unknown_with_the_same_id() {
    let (ns, _) = authority();
    let f = settled(ns, 1, 6, 5, Some(ContentId::of(CODEC_DAG_CBOR, b"items")));
    let back = VerifiedFact::decode(f.bytes()).unwrap();
    assert_eq!(back, f);
    let (tag, body) = f.payload().to_tag_body();
    assert_eq!(tag, 34);
    let unknown = Payload::Unknown { tag, raw: body };
    assert_eq!(unknown.to_tag_body(), f.payload().to_tag_body());
    assert!(!f.payload().is_reissuable(), "it belongs to its moment");
    // Without members (a context journal) nothing is ever reclaimable.
    let ctx = JournalNamespace::Context(tend_core::ContextId([3; 32]));
    let state = reduce(ctx, &[settled(ctx, 1, 6, 5, None)]);
    assert!(!state.settled_by_every_member(Epoch(5)));
}
