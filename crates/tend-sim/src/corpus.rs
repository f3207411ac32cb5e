//! Fuzz targets as plain functions, and the generator of their seed corpora.
//!
//! `fuzz/fuzz_targets/*.rs` call the `check_*` functions below under libFuzzer (nightly);
//! `tests/fuzz_corpus.rs` feeds every file of `fuzz/corpus/<target>/` to the same
//! functions on stable, so CI runs the corpora without nightly. Each check decodes the
//! input and, if it decodes, re-encodes it and requires the very same bytes (every format
//! here is canonical, so a decodable input has exactly one encoding).

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;
use tend_core::maintenance::*;
use tend_core::{
    AuthorityFact, AuthorityGenesis, ContentId, DeviceId, Epoch, FactFormat, FactId, GroupKey,
    Hash32, Journal, JournalNamespace, MaintenanceEpoch, MaintenanceFact, MembershipChange,
    Payload, ProtocolVersion, UnsignedFact, VerifiedFact,
};
use tend_snapshot::{CeremonyMessage, MessageBody, Refusal, SnapshotBlob};
use tend_sync::message::DEFAULT_MAX_MESSAGE_BYTES;
use tend_sync::{Accept, FenceStatus, Hello, RefuseReason, SyncMessage};

/// The fuzz targets, by directory name under `fuzz/corpus/`.
pub const TARGETS: [&str; 4] = [
    "fact_decode",
    "sync_message",
    "snapshot_blob",
    "ceremony_message",
];

/// Whether an input decoded (and then round-tripped) or was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Decoded, and re-encoding gave the same bytes.
    Valid,
    /// Rejected with a typed error.
    Rejected,
}

/// Runs one target on one input. Panics only on a real bug: a decoder panic, or a valid
/// input that does not re-encode to itself.
pub fn check(target: &str, data: &[u8]) -> Verdict {
    match target {
        "fact_decode" => check_fact(data),
        "sync_message" => check_sync_message(data),
        "snapshot_blob" => check_snapshot_blob(data),
        "ceremony_message" => check_ceremony_message(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// `VerifiedFact::decode`.
pub fn check_fact(data: &[u8]) -> Verdict {
    match VerifiedFact::decode(data) {
        Ok(f) => {
            assert_eq!(f.bytes(), data, "a decoded fact keeps its bytes");
            let again = VerifiedFact::decode(f.bytes()).expect("a valid fact decodes again");
            assert_eq!(again.id(), f.id());
            Verdict::Valid
        }
        Err(_) => Verdict::Rejected,
    }
}

/// `SyncMessage::decode` with the default size limit.
pub fn check_sync_message(data: &[u8]) -> Verdict {
    match SyncMessage::decode(data, DEFAULT_MAX_MESSAGE_BYTES) {
        Ok(m) => {
            assert_eq!(m.encode(), data, "a sync message re-encodes to its bytes");
            Verdict::Valid
        }
        Err(_) => Verdict::Rejected,
    }
}

/// `SnapshotBlob::decode`.
pub fn check_snapshot_blob(data: &[u8]) -> Verdict {
    match SnapshotBlob::decode(data) {
        Ok(b) => {
            assert_eq!(b.encode(), data, "a snapshot blob re-encodes to its bytes");
            Verdict::Valid
        }
        Err(_) => Verdict::Rejected,
    }
}

/// `CeremonyMessage::from_bytes`.
pub fn check_ceremony_message(data: &[u8]) -> Verdict {
    match CeremonyMessage::from_bytes(data) {
        Ok(m) => {
            assert_eq!(
                m.to_bytes(),
                data,
                "a ceremony message re-encodes to its bytes"
            );
            Verdict::Valid
        }
        Err(_) => Verdict::Rejected,
    }
}

/// One corpus file: its target, file name and bytes, and whether it must decode.
#[derive(Clone, Debug)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
    pub valid: bool,
}

fn facts(rng: &mut StdRng) -> (JournalNamespace, Vec<VerifiedFact>) {
    let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(rng)).collect();
    let ids: Vec<DeviceId> = keys
        .iter()
        .map(|k| DeviceId(k.verifying_key().to_bytes()))
        .collect();
    let mut members = ids.clone();
    members.sort();
    let genesis = AuthorityGenesis {
        nonce: rng.gen(),
        members: members.clone(),
        threshold: 2,
        group_key: GroupKey(rng.gen()),
        admin: ids[0],
    };
    let ns = JournalNamespace::Authority(genesis.authority_id());
    let h = |rng: &mut StdRng| Hash32(rng.gen());
    let cid = ContentId::of_raw(b"blob");
    let v = ProtocolVersion {
        major: 1,
        minor: 2,
        patch: 3,
    };
    let payloads = vec![
        Payload::Authority(AuthorityFact::Genesis(genesis)),
        Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
            identity_epoch: 1,
            members,
            threshold: 2,
            group_key: GroupKey(rng.gen()),
        })),
        Payload::Application {
            kind: "note".into(),
            data: b"hello".to_vec(),
        },
        Payload::Application {
            kind: String::new(),
            data: Vec::new(),
        },
        Payload::Unknown {
            tag: 99,
            raw: vec![0x82, 0x01, 0x02],
        },
        Payload::Maintenance(MaintenanceFact::SnapshotProposed(SnapshotProposed {
            proposal_id: h(rng),
            target_epoch: Epoch(4),
            digest: h(rng),
        })),
        Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
            proposal_id: h(rng),
            snapshot: SnapshotV1 {
                epoch: Epoch(4),
                digest: h(rng),
                blob_cid: cid,
            },
            threshold_signature: [7; 64],
        })),
        Payload::Maintenance(MaintenanceFact::CacheInvalidated(CacheInvalidated {
            keys: vec!["a".into(), "b/c".into()],
            epoch_floor: Epoch(3),
        })),
        Payload::Maintenance(MaintenanceFact::UpgradePublished(UpgradeMetadata {
            package_id: h(rng),
            version: v,
            artifact_hash: h(rng),
            artifact_size: 1 << 20,
            fence: Some(Epoch(9)),
            cohort_percent: 50,
        })),
        Payload::Maintenance(MaintenanceFact::DeviceMetadata(DeviceMetadata {
            running_version: v,
            supported_versions: vec![v],
            upgrade_policy: UpgradePolicy::Pinned(v),
        })),
        Payload::Maintenance(MaintenanceFact::UpgradeReady(UpgradeReady {
            package_id: h(rng),
            version: v,
        })),
        Payload::Maintenance(MaintenanceFact::UpgradeActivated(UpgradeActivated {
            package_id: h(rng),
            to_version: v,
            activation_fence: None,
        })),
        Payload::Maintenance(MaintenanceFact::AdminReplacement(AdminReplacement {
            old_admin: ids[0],
            new_admin: ids[1],
            activation_epoch: Epoch(5),
        })),
        Payload::Maintenance(MaintenanceFact::BlobTombstone(BlobTombstone { cid })),
    ];
    let facts = payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| {
            let f = UnsignedFact {
                namespace: ns,
                epoch: Epoch(i as u64),
                payload,
            };
            // Every fact format, in turn.
            let key = &keys[i % keys.len()];
            let time_ms = 1_765_000_000_000 + i as u64;
            match i % 3 {
                0 => f.sign(key),
                1 => f.sign_timed(key, time_ms),
                _ => f.sign_with(key, FactFormat::TimedZip215 { time_ms }),
            }
        })
        .collect();
    (ns, facts)
}

fn sync_messages(
    rng: &mut StdRng,
    ns: JournalNamespace,
    facts: &[VerifiedFact],
) -> Vec<SyncMessage> {
    let device = DeviceId(rng.gen());
    let epoch = MaintenanceEpoch {
        identity_epoch: 2,
        snapshot_epoch: Epoch(7),
    };
    let v = ProtocolVersion::CURRENT;
    let fence = FenceStatus::NotSatisfied {
        fence: Epoch(9),
        required: ProtocolVersion {
            major: 1,
            minor: 1,
            patch: 0,
        },
        local_epoch: Epoch(3),
    };
    vec![
        SyncMessage::Hello(Hello {
            protocol: v,
            namespace: ns,
            device,
            epoch,
            fence: FenceStatus::Satisfied,
            reconcile: vec![0x61, 0x00, 0x02],
        }),
        SyncMessage::Accept(Accept {
            protocol: v,
            device,
            epoch,
            fence,
            reconcile: vec![0x61],
        }),
        SyncMessage::Refuse(RefuseReason::NotAuthorized),
        SyncMessage::Refuse(RefuseReason::UnknownNamespace(ns)),
        SyncMessage::Refuse(RefuseReason::IncompatibleProtocol { theirs: v, ours: v }),
        SyncMessage::Refuse(RefuseReason::FenceNotSatisfied {
            fence: Epoch(9),
            required: v,
            local_epoch: Epoch(2),
        }),
        SyncMessage::Refuse(RefuseReason::Busy),
        SyncMessage::Reconcile(vec![0x61, 0x01, 0x02, 0x03]),
        SyncMessage::Want(vec![FactId(rng.gen()), FactId(rng.gen())]),
        SyncMessage::Facts(facts.iter().take(4).map(|f| f.bytes().to_vec()).collect()),
        SyncMessage::Facts(Vec::new()),
        SyncMessage::Done,
        SyncMessage::Abort(tend_sync::AbortReason::EpochAdvanced { from: 1, to: 2 }),
        SyncMessage::Abort(tend_sync::AbortReason::Closed),
    ]
}

fn blobs(ns: JournalNamespace, facts: &[VerifiedFact]) -> Vec<Vec<u8>> {
    let mut journal = Journal::new(ns);
    for f in facts {
        journal.insert(f.clone()).expect("same namespace");
    }
    let mut out = vec![SnapshotBlob::from_parts(ns, Epoch(0), Vec::new(), Vec::new()).encode()];
    for e in [1, 3, 6, 20] {
        out.push(SnapshotBlob::from_journal(&journal, Epoch(e)).encode());
    }
    out
}

fn ceremony_messages(rng: &mut StdRng, ns: JournalNamespace) -> Vec<CeremonyMessage> {
    let epoch = MaintenanceEpoch {
        identity_epoch: 1,
        snapshot_epoch: Epoch(3),
    };
    let from = DeviceId(rng.gen());
    let proposal_id = Hash32(rng.gen());
    let bodies = vec![
        MessageBody::SignRequest {
            namespace: ns,
            proposal: SnapshotProposed {
                proposal_id,
                target_epoch: Epoch(5),
                digest: Hash32(rng.gen()),
            },
            blob_cid: ContentId::of_raw(b"blob"),
            timeout_ms: 30_000,
        },
        MessageBody::Commit {
            commitment: ByteBuf::from(vec![1u8; 69]),
        },
        MessageBody::SignPackage {
            commitments: vec![(from, ByteBuf::from(vec![2u8; 69]))],
        },
        MessageBody::Share {
            share: ByteBuf::from(vec![3u8; 32]),
        },
        MessageBody::Refuse {
            reason: Refusal::DigestMismatch {
                ours: Hash32(rng.gen()),
                proposed: Hash32(rng.gen()),
            },
        },
        MessageBody::Refuse {
            reason: Refusal::EpochMismatch {
                ours: epoch,
                theirs: MaintenanceEpoch::default(),
            },
        },
        MessageBody::Refuse {
            reason: Refusal::Stale,
        },
        MessageBody::Closed { completed: true },
    ];
    bodies
        .into_iter()
        .map(|body| CeremonyMessage {
            proposal_id,
            epoch,
            from,
            body,
        })
        .collect()
}

/// Invalid neighbours of a valid input: truncations and single bit flips.
fn mutants(rng: &mut StdRng, bytes: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.is_empty() {
        return out;
    }
    for i in 0..n {
        let mut m = bytes.to_vec();
        if i % 2 == 0 {
            m.truncate(rng.gen_range(0..bytes.len()));
        } else {
            let pos = rng.gen_range(0..m.len());
            m[pos] ^= 1 << rng.gen_range(0..8);
        }
        out.push(m);
    }
    out
}

/// The seed corpus of every target: valid encodings, then truncations and bit flips of
/// them (which may or may not decode; the check decides).
pub fn generate() -> Vec<Seed> {
    let mut rng = StdRng::seed_from_u64(0x7e4d);
    let (ns, facts) = facts(&mut rng);
    let mut valid: Vec<(&'static str, Vec<u8>)> = Vec::new();
    valid.extend(facts.iter().map(|f| ("fact_decode", f.bytes().to_vec())));
    valid.extend(
        sync_messages(&mut rng, ns, &facts)
            .iter()
            .map(|m| ("sync_message", m.encode())),
    );
    valid.extend(blobs(ns, &facts).into_iter().map(|b| ("snapshot_blob", b)));
    valid.extend(
        ceremony_messages(&mut rng, ns)
            .iter()
            .map(|m| ("ceremony_message", m.to_bytes())),
    );
    let mut out = Vec::new();
    for (i, (target, bytes)) in valid.into_iter().enumerate() {
        // Fewer valid blobs and ceremony messages: more mutants each, a few dozen per target.
        let n = match target {
            "snapshot_blob" => 6,
            "ceremony_message" => 4,
            _ => 3,
        };
        for (j, m) in mutants(&mut rng, &bytes, n).into_iter().enumerate() {
            out.push(Seed {
                target,
                name: format!("mutant-{i:03}-{j}"),
                bytes: m,
                valid: false,
            });
        }
        out.push(Seed {
            target,
            name: format!("valid-{i:03}"),
            bytes,
            valid: true,
        });
    }
    out
}

/// Writes the corpus under `dir/<target>/`.
pub fn write(dir: &std::path::Path) -> std::io::Result<usize> {
    let seeds = generate();
    for s in &seeds {
        let d = dir.join(s.target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(&s.name), &s.bytes)?;
    }
    Ok(seeds.len())
}
