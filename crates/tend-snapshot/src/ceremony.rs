//! The snapshot ceremony as a sans-IO state machine: one [`SnapshotEngine`] per device,
//! fed inputs with the current time, returning messages to peers and facts to write.
//!
//! Protocol (the proposer coordinates):
//! 1. The proposer picks a target epoch E, computes the prefix digest and the snapshot blob
//!    over its journal, writes a `SnapshotProposed` fact (stamped at an epoch >= E, so the
//!    proposal is never inside the prefix it describes) and broadcasts `SignRequest`.
//! 2. Each member recomputes digest and blob CID over its own journal. If both match and
//!    its `MaintenanceEpoch` equals the request's, it makes FROST nonces and answers
//!    `Commit`; otherwise it answers `Refuse` with a reason.
//! 3. With T commitments the coordinator sends those T signers a `SignPackage`; each
//!    answers with its `Share`.
//! 4. The coordinator aggregates, checks the signature against the group key and writes
//!    `SnapshotCompleted`, then broadcasts `Closed` so the others drop their state (and a
//!    member that lacks the completion fetches it from the coordinator at once).
//!
//! Every message carries the proposal id and the `MaintenanceEpoch`. When a device's
//! maintenance epoch changes (a membership change re-dealt the key, or another snapshot
//! completed) every session under the old epoch aborts; the proposer retries under the new
//! epoch (with the new key) as soon as it holds a key share for it. Sessions past their
//! deadline are dropped; an abandoned proposal is harmless, because nothing is pruned
//! before a verified `SnapshotCompleted` (DESIGN rule 4).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ed25519_dalek::{Signer as _, SigningKey};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::maintenance::{SnapshotCompleted, SnapshotProposed, SnapshotV1};
use tend_core::{
    ContentId, DeviceId, Epoch, GroupKey, Hash32, Journal, JournalNamespace, MaintenanceEpoch,
    MaintenanceFact, MaintenanceState, Payload, UnsignedFact,
};
use tend_crypto::{Commitment, KeyShare, PublicShares, SignatureShare, SigningNonces};

use crate::blob::SnapshotBlob;

/// What the engine needs to know about its device's journal. Implemented for
/// [`JournalView`] (an in-memory [`Journal`]); the store implements it over its index.
pub trait LocalJournal {
    /// The reduced maintenance state of the device's journal.
    fn state(&self) -> &MaintenanceState;
    /// The digest of the prefix `{ f : f.epoch < upto }`.
    fn prefix_digest(&self, upto: Epoch) -> Hash32;
    /// Builds the snapshot blob of the prefix below `upto`. A journal kept in memory
    /// returns the bytes for the caller to store ([`CeremonyAction::StoreBlob`]); a
    /// store-backed one may stream the blob into its store itself, when its CID is `keep`
    /// (a signer keeps the blob it signs, so it never fetches it) or `keep` is `None` (the
    /// proposer), and return no bytes, so a million-fact blob is never held in memory.
    fn snapshot_blob(&self, upto: Epoch, keep: Option<ContentId>) -> BuiltBlob;
}

/// A snapshot blob built by [`LocalJournal::snapshot_blob`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltBlob {
    pub cid: ContentId,
    /// The bytes, unless the journal stored the blob itself (or could not build it, in
    /// which case `cid` is that of no valid blob and every comparison fails).
    pub bytes: Option<Vec<u8>>,
    /// The item blob it names, with its bytes, when they are returned for the caller to
    /// store (kept with the snapshot blob, so a signer holds both).
    pub item_blob: Option<(ContentId, Vec<u8>)>,
}

impl BuiltBlob {
    /// A blob built in memory, with its item blob.
    pub fn of(blob: &SnapshotBlob) -> Self {
        let bytes = blob.encode();
        let item_blob = blob.item_blob().map(|i| {
            let b = i.encode();
            (SnapshotBlob::cid_of(&b), b)
        });
        Self {
            cid: SnapshotBlob::cid_of(&bytes),
            bytes: Some(bytes),
            item_blob,
        }
    }

    /// The actions that keep it: the item blob first, so a device that holds the snapshot
    /// blob holds its items too.
    fn store(self, out: &mut Out) {
        if let Some((cid, bytes)) = self.item_blob {
            out.out.push(CeremonyAction::StoreBlob { cid, bytes });
        }
        if let Some(bytes) = self.bytes {
            out.out.push(CeremonyAction::StoreBlob {
                cid: self.cid,
                bytes,
            });
        }
    }
}

/// A [`Journal`] with its reduced state.
pub struct JournalView<'a> {
    journal: &'a Journal,
    state: MaintenanceState,
}

impl<'a> JournalView<'a> {
    /// Reduces `journal` once.
    pub fn new(journal: &'a Journal) -> Self {
        let state = tend_core::reduce(journal.namespace(), journal.iter());
        Self { journal, state }
    }

    /// A view with an already reduced state of `journal` (callers that cache it).
    pub fn with_state(journal: &'a Journal, state: MaintenanceState) -> Self {
        Self { journal, state }
    }
}

impl LocalJournal for JournalView<'_> {
    fn state(&self) -> &MaintenanceState {
        &self.state
    }
    fn prefix_digest(&self, upto: Epoch) -> Hash32 {
        self.journal
            .chained_prefix_digest(upto, self.state.snapshot_base(upto))
    }
    fn snapshot_blob(&self, upto: Epoch, _keep: Option<ContentId>) -> BuiltBlob {
        BuiltBlob::of(&SnapshotBlob::from_journal(self.journal, upto))
    }
}

/// The epoch of the latest completion fact (0 without a snapshot). A target at or below it
/// is refused as stale: the completion would lie outside the new prefix, so the blob
/// (whose base is the latest snapshot among the prefix's facts) and the digest (whose
/// base is the latest snapshot of the whole state) would chain on different bases and the
/// signed blob would never hydrate (found by tend-sim, seeds 234 and 247).
fn completed_at(state: &MaintenanceState) -> Epoch {
    state
        .latest_snapshot
        .as_ref()
        .map_or(Epoch::ZERO, |s| s.completed_at)
}

/// The key a device signs snapshots with under one identity epoch.
// Keys are installed once per identity epoch, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum SignerKey {
    /// A FROST share from a DKG among the members.
    Frost(KeyShare),
    /// A one-device authority: the device key is the group key (threshold 1).
    Single {
        identity_epoch: u64,
        key: SigningKey,
    },
}

impl SignerKey {
    /// The identity epoch the key serves.
    pub fn identity_epoch(&self) -> u64 {
        match self {
            Self::Frost(s) => s.identity_epoch(),
            Self::Single { identity_epoch, .. } => *identity_epoch,
        }
    }

    /// The group key signatures verify against.
    pub fn group_key(&self) -> GroupKey {
        match self {
            Self::Frost(s) => s.group_key(),
            Self::Single { key, .. } => GroupKey(key.verifying_key().to_bytes()),
        }
    }
}

/// Why a device refuses to sign, or a coordinator gives up.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Refusal {
    /// Our prefix below the target epoch differs from the proposer's.
    DigestMismatch { ours: Hash32, proposed: Hash32 },
    /// Our snapshot blob differs from the proposed CID (same digest, different content).
    BlobMismatch,
    /// The request was made under another maintenance epoch.
    EpochMismatch {
        ours: MaintenanceEpoch,
        theirs: MaintenanceEpoch,
    },
    /// We hold no key share for the identity epoch, or it is not the authority's key.
    NoKey,
    /// The target epoch is not above our latest snapshot.
    Stale,
    /// The request is for another journal, or we are not a member.
    NotMember,
    /// The signing package is inconsistent with our commitment.
    BadPackage,
    /// We already signed another digest for this target epoch: a member signs at most
    /// one snapshot per epoch, so two snapshots can never complete at one epoch.
    AlreadySigned { digest: Hash32 },
}

/// Why a ceremony ended without a snapshot.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AbortReason {
    /// The maintenance epoch moved on (membership change, or another snapshot).
    EpochChanged {
        from: MaintenanceEpoch,
        to: MaintenanceEpoch,
    },
    /// Too many members refused to reach the threshold.
    NotEnoughSigners { refused: Vec<DeviceId> },
    /// Shares failed verification.
    InvalidShares(Vec<DeviceId>),
    /// The deadline passed.
    TimedOut,
    /// The coordinator closed the session.
    ClosedByCoordinator,
}

/// The body of a ceremony message.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum MessageBody {
    /// Coordinator to all: please sign this snapshot.
    SignRequest {
        namespace: JournalNamespace,
        proposal: SnapshotProposed,
        blob_cid: ContentId,
        /// Relative, so devices need no common clock.
        timeout_ms: u64,
    },
    /// Signer to coordinator: a FROST round-1 commitment.
    Commit { commitment: ByteBuf },
    /// Coordinator to the chosen signers: the commitments of every chosen signer.
    SignPackage {
        commitments: Vec<(DeviceId, ByteBuf)>,
    },
    /// Signer to coordinator: a FROST round-2 signature share.
    Share { share: ByteBuf },
    /// Signer to coordinator: will not sign.
    Refuse { reason: Refusal },
    /// Coordinator to all: the session is over (completed or aborted); drop its state.
    Closed { completed: bool },
}

/// A message of the ceremony. Every message names its proposal and maintenance epoch.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeremonyMessage {
    pub proposal_id: Hash32,
    pub epoch: MaintenanceEpoch,
    pub from: DeviceId,
    pub body: MessageBody,
}

impl CeremonyMessage {
    /// Canonical DAG-CBOR.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// Decodes wire bytes, rejecting non-canonical encodings.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, tend_core::DecodeError> {
        from_canonical(bytes)
    }
}

/// Where a message goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recipient {
    /// Every other member.
    All,
    Device(DeviceId),
}

/// An input to the engine.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CeremonyInput {
    /// Start a ceremony for target epoch E; it gives up after `timeout_ms`.
    Propose {
        target_epoch: Epoch,
        timeout_ms: u64,
    },
    /// A message from a peer (the transport authenticated `from`).
    Message { from: DeviceId, bytes: Vec<u8> },
    /// A key for an identity epoch (after a DKG); may trigger a pending retry.
    InstallKey(SignerKey),
    /// Time passed; expire sessions, notice epoch changes.
    Tick,
}

/// Something the engine reports.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum CeremonyEvent {
    Proposed {
        proposal_id: Hash32,
        target_epoch: Epoch,
        digest: Hash32,
    },
    /// A proposal could not start (e.g. no key for the current identity epoch).
    ProposalRejected {
        target_epoch: Epoch,
        reason: Refusal,
    },
    /// We refused to sign.
    Refused {
        proposal_id: Hash32,
        reason: Refusal,
    },
    /// A peer refused to sign our proposal.
    PeerRefused {
        proposal_id: Hash32,
        from: DeviceId,
        reason: Refusal,
    },
    /// We contributed a signature share.
    Signed {
        proposal_id: Hash32,
    },
    Completed(SnapshotCompleted),
    /// The coordinator of a proposal this device answered says it completed, and this
    /// journal does not hold the completion yet: the driver syncs with the coordinator,
    /// which wrote it before saying so, rather than wait for its next round (in a fleet
    /// larger than a round's fanout, a member may otherwise wait a whole sync interval).
    CompletionAnnounced {
        proposal_id: Hash32,
        coordinator: DeviceId,
    },
    Aborted {
        proposal_id: Hash32,
        reason: AbortReason,
    },
    /// An aborted proposal was retried under a new epoch.
    Retried {
        old: Hash32,
        new: Hash32,
        epoch: MaintenanceEpoch,
    },
    /// A message that could not be used (malformed, unexpected, from a non-member).
    Ignored {
        from: DeviceId,
        reason: String,
    },
}

/// An effect the caller carries out.
#[derive(Debug)]
pub enum CeremonyAction {
    Send {
        to: Recipient,
        message: CeremonyMessage,
    },
    /// Sign with the device key and append to the journal.
    WriteFact(UnsignedFact),
    /// Keep this blob (the snapshot blob a completed snapshot refers to, or its item blob).
    StoreBlob {
        cid: ContentId,
        bytes: Vec<u8>,
    },
    /// Keep this member's votes (target epoch -> the digest it signed), durably, before
    /// carrying out any action after this one, which include the share that carries the
    /// vote: a restart must not let it sign a second digest for an epoch. A driver that
    /// cannot save them drops the rest of the outputs; after a restart it hands the saved
    /// votes back with [`SnapshotEngine::restore_votes`].
    SaveVotes(BTreeMap<Epoch, Hash32>),
    Event(CeremonyEvent),
}

struct Coordinator {
    proposal: SnapshotProposed,
    snapshot: SnapshotV1,
    epoch: MaintenanceEpoch,
    deadline: u64,
    timeout_ms: u64,
    message: Vec<u8>,
    threshold: u16,
    members: BTreeSet<DeviceId>,
    public: PublicShares,
    commitments: BTreeMap<DeviceId, Commitment>,
    chosen: Option<BTreeMap<DeviceId, Commitment>>,
    shares: BTreeMap<DeviceId, SignatureShare>,
    refused: BTreeSet<DeviceId>,
}

struct SignerSession {
    coordinator: DeviceId,
    epoch: MaintenanceEpoch,
    message: Vec<u8>,
    commitment: Commitment,
    nonces: Option<SigningNonces>,
    deadline: u64,
}

struct PendingRetry {
    old: Hash32,
    target_epoch: Epoch,
    timeout_ms: u64,
    deadline: u64,
}

/// One device's side of every snapshot ceremony it takes part in.
pub struct SnapshotEngine {
    me: DeviceId,
    keys: BTreeMap<u64, SignerKey>,
    coordinating: BTreeMap<Hash32, Coordinator>,
    signing: BTreeMap<Hash32, SignerSession>,
    /// Proposals this member sent its share for: coordinator and deadline. The session
    /// ends with the share, but the coordinator's `Closed` still says where the completion
    /// is (`CompletionAnnounced`).
    signed: BTreeMap<Hash32, (DeviceId, u64)>,
    retries: Vec<PendingRetry>,
    /// The digest committed to for each target epoch (this member's vote).
    votes: BTreeMap<Epoch, Hash32>,
}

impl std::fmt::Debug for SnapshotEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotEngine")
            .field("me", &self.me)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field(
                "coordinating",
                &self.coordinating.keys().collect::<Vec<_>>(),
            )
            .field("signing", &self.signing.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Outputs in the making, plus messages this device sends to itself (the coordinator is
/// also a signer), handled within the same call.
struct Out {
    me: DeviceId,
    out: Vec<CeremonyAction>,
    inbox: VecDeque<CeremonyMessage>,
}

impl Out {
    fn send(&mut self, to: Recipient, message: CeremonyMessage) {
        match to {
            Recipient::Device(d) if d == self.me => self.inbox.push_back(message),
            Recipient::Device(_) => self.out.push(CeremonyAction::Send { to, message }),
            Recipient::All => {
                self.inbox.push_back(message.clone());
                self.out.push(CeremonyAction::Send { to, message });
            }
        }
    }
    fn event(&mut self, e: CeremonyEvent) {
        self.out.push(CeremonyAction::Event(e));
    }
}

impl SnapshotEngine {
    /// An engine for device `me` with no keys yet.
    pub fn new(me: DeviceId) -> Self {
        Self {
            me,
            keys: BTreeMap::new(),
            coordinating: BTreeMap::new(),
            signing: BTreeMap::new(),
            signed: BTreeMap::new(),
            retries: Vec::new(),
            votes: BTreeMap::new(),
        }
    }

    /// The device this engine speaks for.
    pub fn device_id(&self) -> DeviceId {
        self.me
    }

    /// Proposals this device coordinates right now.
    pub fn open_proposals(&self) -> Vec<Hash32> {
        self.coordinating.keys().copied().collect()
    }

    /// Whether any session (coordinating, signing or awaiting retry) is open.
    /// The digest this member committed to per target epoch (what
    /// [`CeremonyAction::SaveVotes`] asks the driver to keep).
    pub fn votes(&self) -> &BTreeMap<Epoch, Hash32> {
        &self.votes
    }

    /// Restores votes a [`CeremonyAction::SaveVotes`] kept (after a restart).
    pub fn restore_votes(&mut self, votes: impl IntoIterator<Item = (Epoch, Hash32)>) {
        self.votes.extend(votes);
    }

    pub fn is_idle(&self) -> bool {
        self.coordinating.is_empty() && self.signing.is_empty() && self.retries.is_empty()
    }

    /// Feeds one input. `now` is the caller's monotonic clock (the same time type as
    /// tend-sync's state machines take; timeouts travel in milliseconds on the wire);
    /// `local` is the device's journal as of now; `rng` supplies FROST nonces.
    pub fn handle(
        &mut self,
        now: std::time::Duration,
        local: &impl LocalJournal,
        input: CeremonyInput,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Vec<CeremonyAction> {
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        let mut out = Out {
            me: self.me,
            out: Vec::new(),
            inbox: VecDeque::new(),
        };
        if let CeremonyInput::InstallKey(key) = &input {
            self.keys.insert(key.identity_epoch(), key.clone());
        }
        // Epoch changes and deadlines first, so no message is handled under a stale epoch.
        self.check_sessions(now_ms, local, &mut out);
        self.run_retries(now_ms, local, &mut out, rng);
        match input {
            CeremonyInput::Propose {
                target_epoch,
                timeout_ms,
            } => {
                self.propose(now_ms, local, target_epoch, timeout_ms, &mut out, rng);
            }
            CeremonyInput::Message { from, bytes } => match CeremonyMessage::from_bytes(&bytes) {
                Ok(m) if m.from == from => out.inbox.push_back(m),
                Ok(_) => out.event(CeremonyEvent::Ignored {
                    from,
                    reason: "sender does not match the transport's peer".into(),
                }),
                Err(e) => out.event(CeremonyEvent::Ignored {
                    from,
                    reason: format!("malformed message: {e}"),
                }),
            },
            CeremonyInput::InstallKey(_) | CeremonyInput::Tick => {}
        }
        while let Some(m) = out.inbox.pop_front() {
            self.on_message(now_ms, local, m, &mut out, rng);
        }
        out.out
    }

    fn check_sessions(&mut self, now: u64, local: &impl LocalJournal, out: &mut Out) {
        let current = local.state().maintenance_epoch();
        let ids: Vec<Hash32> = self.coordinating.keys().copied().collect();
        for id in ids {
            let c = &self.coordinating[&id];
            let reason = if c.epoch != current {
                Some(AbortReason::EpochChanged {
                    from: c.epoch,
                    to: current,
                })
            } else if now >= c.deadline {
                Some(AbortReason::TimedOut)
            } else {
                None
            };
            if let Some(reason) = reason {
                let c = self.coordinating.remove(&id).expect("listed above");
                // Retry under the new epoch unless a snapshot at or above E now exists.
                if matches!(reason, AbortReason::EpochChanged { .. })
                    && c.proposal.target_epoch > current.snapshot_epoch
                {
                    self.retries.push(PendingRetry {
                        old: id,
                        target_epoch: c.proposal.target_epoch,
                        timeout_ms: c.timeout_ms,
                        deadline: now.saturating_add(c.timeout_ms),
                    });
                }
                self.close(id, c.epoch, false, out);
                out.event(CeremonyEvent::Aborted {
                    proposal_id: id,
                    reason,
                });
            }
        }
        let me = self.me;
        self.signing.retain(|id, s| {
            let reason = if s.epoch != current {
                Some(AbortReason::EpochChanged {
                    from: s.epoch,
                    to: current,
                })
            } else if now >= s.deadline {
                Some(AbortReason::TimedOut)
            } else {
                None
            };
            let keep = reason.is_none();
            // Our own proposals report once, from the coordinator side.
            if let Some(reason) = reason.filter(|_| s.coordinator != me) {
                out.event(CeremonyEvent::Aborted {
                    proposal_id: *id,
                    reason,
                });
            }
            keep
        });
        self.retries.retain(|r| now < r.deadline);
        self.signed.retain(|_, (_, deadline)| now < *deadline);
    }

    fn run_retries(
        &mut self,
        now: u64,
        local: &impl LocalJournal,
        out: &mut Out,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let identity = local.state().identity_epoch();
        if !self.keys.contains_key(&identity) || self.retries.is_empty() {
            return;
        }
        for r in std::mem::take(&mut self.retries) {
            // A fact below the target can arrive between the first proposal and its retry
            // (a member that missed the proposal writes at its own, lower, epoch). The
            // digest then differs, and every member that signed the first one, this device
            // included, refuses a second digest at that target. A later target covers all
            // the first one did.
            let target = match self.votes.get(&r.target_epoch) {
                Some(voted) if *voted != local.prefix_digest(r.target_epoch) => {
                    r.target_epoch.max(local.state().current_epoch().next())
                }
                _ => r.target_epoch,
            };
            if let Some(new) = self.propose(now, local, target, r.timeout_ms, out, rng) {
                out.event(CeremonyEvent::Retried {
                    old: r.old,
                    new,
                    epoch: local.state().maintenance_epoch(),
                });
            }
        }
    }

    fn close(
        &mut self,
        proposal_id: Hash32,
        epoch: MaintenanceEpoch,
        completed: bool,
        out: &mut Out,
    ) {
        // Our own signer side of the proposal ends with it.
        self.signing.remove(&proposal_id);
        out.out.push(CeremonyAction::Send {
            to: Recipient::All,
            message: CeremonyMessage {
                proposal_id,
                epoch,
                from: self.me,
                body: MessageBody::Closed { completed },
            },
        });
    }

    /// The key for the current identity epoch, if it is the authority's current group key.
    fn current_key(&self, state: &MaintenanceState) -> Result<&SignerKey, Refusal> {
        let membership = state.membership().ok_or(Refusal::NotMember)?;
        let key = self
            .keys
            .get(&membership.identity_epoch)
            .ok_or(Refusal::NoKey)?;
        if key.group_key() != membership.group_key {
            return Err(Refusal::NoKey);
        }
        if !membership.members.contains(&self.me) {
            return Err(Refusal::NotMember);
        }
        Ok(key)
    }

    fn propose(
        &mut self,
        now: u64,
        local: &impl LocalJournal,
        target_epoch: Epoch,
        timeout_ms: u64,
        out: &mut Out,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Option<Hash32> {
        let state = local.state();
        let epoch = state.maintenance_epoch();
        let reject = |out: &mut Out, reason| {
            out.event(CeremonyEvent::ProposalRejected {
                target_epoch,
                reason,
            });
            None
        };
        if target_epoch <= epoch.snapshot_epoch || target_epoch <= completed_at(state) {
            return reject(out, Refusal::Stale);
        }
        let key = match self.current_key(state) {
            Ok(k) => k.clone(),
            Err(r) => return reject(out, r),
        };
        let namespace = state.namespace;
        let digest = local.prefix_digest(target_epoch);
        let blob = local.snapshot_blob(target_epoch, None);
        let blob_cid = blob.cid;
        let proposal_id = {
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            let mut h = blake3::Hasher::new();
            h.update(b"tend-snapshot-proposal-v1");
            h.update(&to_canonical(&(
                &namespace,
                self.me,
                target_epoch,
                digest,
                epoch,
                now,
                serde_bytes::Bytes::new(&nonce),
            )));
            Hash32::from(h.finalize())
        };
        let proposal = SnapshotProposed {
            proposal_id,
            target_epoch,
            digest,
        };
        let snapshot = SnapshotV1 {
            epoch: target_epoch,
            digest,
            blob_cid,
        };
        let fact_epoch = state.current_epoch().max(target_epoch);
        blob.store(out);
        out.out.push(CeremonyAction::WriteFact(UnsignedFact {
            namespace,
            epoch: fact_epoch,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotProposed(proposal.clone())),
        }));
        out.event(CeremonyEvent::Proposed {
            proposal_id,
            target_epoch,
            digest,
        });
        let message = snapshot.signing_message(&namespace, &proposal_id);
        let share = match key {
            SignerKey::Single { key, .. } => {
                // A one-device authority: the device key is the group key.
                let completed = SnapshotCompleted {
                    proposal_id,
                    snapshot,
                    threshold_signature: key.sign(&message).to_bytes(),
                };
                self.finish(fact_epoch, state, completed, out);
                return Some(proposal_id);
            }
            SignerKey::Frost(share) => share,
        };
        let members = state
            .membership()
            .map(|m| m.members.clone())
            .unwrap_or_default();
        self.coordinating.insert(
            proposal_id,
            Coordinator {
                proposal: proposal.clone(),
                snapshot,
                epoch,
                deadline: now.saturating_add(timeout_ms),
                timeout_ms,
                message,
                threshold: share.threshold(),
                members,
                public: share.public_shares(),
                commitments: BTreeMap::new(),
                chosen: None,
                shares: BTreeMap::new(),
                refused: BTreeSet::new(),
            },
        );
        out.send(
            Recipient::All,
            CeremonyMessage {
                proposal_id,
                epoch,
                from: self.me,
                body: MessageBody::SignRequest {
                    namespace,
                    proposal,
                    blob_cid,
                    timeout_ms,
                },
            },
        );
        Some(proposal_id)
    }

    /// Writes the completion and, when it supersedes an earlier snapshot, a tombstone for
    /// that snapshot's blob: GC reclaims it once a later snapshot covers the tombstone, so at
    /// most the latest two snapshot blobs are kept.
    fn finish(
        &mut self,
        fact_epoch: Epoch,
        state: &MaintenanceState,
        completed: SnapshotCompleted,
        out: &mut Out,
    ) {
        let namespace = state.namespace;
        out.out.push(CeremonyAction::WriteFact(UnsignedFact {
            namespace,
            epoch: fact_epoch,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(completed.clone())),
        }));
        let superseded = state
            .latest_snapshot
            .as_ref()
            .map(|l| l.snapshot.blob_cid)
            .filter(|cid| *cid != completed.snapshot.blob_cid);
        if let Some(cid) = superseded {
            out.out.push(CeremonyAction::WriteFact(UnsignedFact {
                namespace,
                epoch: fact_epoch,
                payload: Payload::Maintenance(MaintenanceFact::BlobTombstone(
                    tend_core::maintenance::BlobTombstone { cid },
                )),
            }));
        }
        out.event(CeremonyEvent::Completed(completed));
    }

    fn on_message(
        &mut self,
        now: u64,
        local: &impl LocalJournal,
        m: CeremonyMessage,
        out: &mut Out,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let state = local.state();
        let from = m.from;
        let ignore = |out: &mut Out, reason: &str| {
            out.event(CeremonyEvent::Ignored {
                from,
                reason: reason.to_string(),
            })
        };
        let is_member = state
            .membership()
            .is_some_and(|ms| ms.members.contains(&from));
        if !is_member {
            return ignore(out, "sender is not a member");
        }
        match m.body {
            MessageBody::SignRequest {
                namespace,
                proposal,
                blob_cid,
                timeout_ms,
            } => {
                if self.signing.contains_key(&m.proposal_id) {
                    return; // duplicate
                }
                let reply = |reason: Refusal, out: &mut Out| {
                    out.event(CeremonyEvent::Refused {
                        proposal_id: m.proposal_id,
                        reason: reason.clone(),
                    });
                    out.send(
                        Recipient::Device(from),
                        CeremonyMessage {
                            proposal_id: m.proposal_id,
                            epoch: state.maintenance_epoch(),
                            from: self.me,
                            body: MessageBody::Refuse { reason },
                        },
                    );
                };
                let ours = state.maintenance_epoch();
                if namespace != state.namespace || proposal.proposal_id != m.proposal_id {
                    return reply(Refusal::NotMember, out);
                }
                if m.epoch != ours {
                    return reply(
                        Refusal::EpochMismatch {
                            ours,
                            theirs: m.epoch,
                        },
                        out,
                    );
                }
                if proposal.target_epoch <= ours.snapshot_epoch
                    || proposal.target_epoch <= completed_at(state)
                {
                    return reply(Refusal::Stale, out);
                }
                let share = match self.current_key(state) {
                    Ok(SignerKey::Frost(s)) => s.clone(),
                    Ok(SignerKey::Single { .. }) => return reply(Refusal::NoKey, out),
                    Err(r) => return reply(r, out),
                };
                let digest = local.prefix_digest(proposal.target_epoch);
                if digest != proposal.digest {
                    return reply(
                        Refusal::DigestMismatch {
                            ours: digest,
                            proposed: proposal.digest,
                        },
                        out,
                    );
                }
                // The signature also certifies the blob: rebuild it from our own journal
                // rather than trusting the proposer's CID.
                let blob = local.snapshot_blob(proposal.target_epoch, Some(blob_cid));
                if blob.cid != blob_cid {
                    return reply(Refusal::BlobMismatch, out);
                }

                // One vote per target epoch. Without it a member that learns a fact
                // between two concurrent proposals for the same epoch signs both, two
                // snapshots complete at one epoch, and devices that pruned for the one
                // the reducer does not pick lose facts (found by tend-sim, seed 1447).
                let target = proposal.target_epoch;
                if let Some(voted) = self.votes.get(&target).filter(|v| **v != digest) {
                    return reply(Refusal::AlreadySigned { digest: *voted }, out);
                }
                self.votes.retain(|e, _| *e > ours.snapshot_epoch);
                self.votes.insert(target, digest);
                out.out.push(CeremonyAction::SaveVotes(self.votes.clone()));
                // Kept, so once the snapshot completes this member holds its blob.
                blob.store(out);
                let snapshot = SnapshotV1 {
                    epoch: proposal.target_epoch,
                    digest,
                    blob_cid,
                };
                let (nonces, commitment) = tend_crypto::commit(&share, rng);
                self.signing.insert(
                    m.proposal_id,
                    SignerSession {
                        coordinator: from,
                        epoch: ours,
                        message: snapshot.signing_message(&namespace, &m.proposal_id),
                        commitment,
                        nonces: Some(nonces),
                        deadline: now.saturating_add(timeout_ms),
                    },
                );
                out.send(
                    Recipient::Device(from),
                    CeremonyMessage {
                        proposal_id: m.proposal_id,
                        epoch: ours,
                        from: self.me,
                        body: MessageBody::Commit {
                            commitment: ByteBuf::from(commitment.to_bytes()),
                        },
                    },
                );
            }
            MessageBody::Commit { commitment } => {
                let Some(c) = self.coordinating.get_mut(&m.proposal_id) else {
                    return ignore(out, "commitment for no open proposal");
                };
                if m.epoch != c.epoch {
                    return ignore(out, "commitment under another maintenance epoch");
                }
                if c.chosen.is_some() || c.commitments.contains_key(&from) {
                    return; // late or duplicate: the signer set is fixed
                }
                let Ok(commitment) = Commitment::from_bytes(&commitment) else {
                    return ignore(out, "malformed commitment");
                };
                c.commitments.insert(from, commitment);
                if c.commitments.len() >= usize::from(c.threshold) {
                    let chosen = c.commitments.clone();
                    let package: Vec<(DeviceId, ByteBuf)> = chosen
                        .iter()
                        .map(|(d, c)| (*d, ByteBuf::from(c.to_bytes())))
                        .collect();
                    c.chosen = Some(chosen.clone());
                    let epoch = c.epoch;
                    for d in chosen.keys() {
                        out.send(
                            Recipient::Device(*d),
                            CeremonyMessage {
                                proposal_id: m.proposal_id,
                                epoch,
                                from: self.me,
                                body: MessageBody::SignPackage {
                                    commitments: package.clone(),
                                },
                            },
                        );
                    }
                }
            }
            MessageBody::SignPackage { commitments } => {
                let Some(s) = self.signing.get_mut(&m.proposal_id) else {
                    return ignore(out, "signing package for no open session");
                };
                if s.coordinator != from || s.epoch != m.epoch {
                    return ignore(out, "signing package from another coordinator or epoch");
                }
                let Some(nonces) = s.nonces.take() else {
                    return; // already signed: nonces are used once
                };
                let parsed: Result<BTreeMap<DeviceId, Commitment>, _> = commitments
                    .iter()
                    .map(|(d, b)| Commitment::from_bytes(b).map(|c| (*d, c)))
                    .collect();
                let share_key = match self.keys.get(&s.epoch.identity_epoch) {
                    Some(SignerKey::Frost(k)) => k,
                    _ => return ignore(out, "no key share"),
                };
                let result = parsed.map_err(|_| Refusal::BadPackage).and_then(|map| {
                    if map.get(&self.me) != Some(&s.commitment) {
                        return Err(Refusal::BadPackage);
                    }
                    tend_crypto::sign_share(share_key, nonces, &map, &s.message)
                        .map_err(|_| Refusal::BadPackage)
                });
                let (proposal_id, epoch, deadline) = (m.proposal_id, s.epoch, s.deadline);
                self.signing.remove(&proposal_id);
                let body = match result {
                    Ok(share) => {
                        self.signed.insert(proposal_id, (from, deadline));
                        out.event(CeremonyEvent::Signed { proposal_id });
                        MessageBody::Share {
                            share: ByteBuf::from(share.to_bytes()),
                        }
                    }
                    Err(reason) => {
                        out.event(CeremonyEvent::Refused {
                            proposal_id,
                            reason: reason.clone(),
                        });
                        MessageBody::Refuse { reason }
                    }
                };
                out.send(
                    Recipient::Device(from),
                    CeremonyMessage {
                        proposal_id,
                        epoch,
                        from: self.me,
                        body,
                    },
                );
            }
            MessageBody::Share { share } => {
                let Some(c) = self.coordinating.get_mut(&m.proposal_id) else {
                    return ignore(out, "share for no open proposal");
                };
                let Some(chosen) = &c.chosen else {
                    return ignore(out, "share before the signing package");
                };
                if m.epoch != c.epoch || !chosen.contains_key(&from) {
                    return ignore(out, "share from a device that was not asked to sign");
                }
                let Ok(share) = SignatureShare::from_bytes(&share) else {
                    return ignore(out, "malformed signature share");
                };
                c.shares.insert(from, share);
                if c.shares.len() < chosen.len() {
                    return;
                }
                let result = tend_crypto::aggregate(&c.public, chosen, &c.shares, &c.message);
                let c = self
                    .coordinating
                    .remove(&m.proposal_id)
                    .expect("looked up above");
                match result {
                    Ok(signature) => {
                        let completed = SnapshotCompleted {
                            proposal_id: m.proposal_id,
                            snapshot: c.snapshot.clone(),
                            threshold_signature: signature,
                        };
                        let fact_epoch = state.current_epoch().max(c.proposal.target_epoch);
                        // Written before `Closed` leaves: a member told of the completion
                        // asks this device for it at once (`CompletionAnnounced`).
                        self.finish(fact_epoch, state, completed, out);
                        self.close(m.proposal_id, c.epoch, true, out);
                    }
                    Err(e) => {
                        let culprits = match e {
                            tend_crypto::SignError::InvalidShares(d) => d,
                            _ => Vec::new(),
                        };
                        self.close(m.proposal_id, c.epoch, false, out);
                        out.event(CeremonyEvent::Aborted {
                            proposal_id: m.proposal_id,
                            reason: AbortReason::InvalidShares(culprits),
                        });
                    }
                }
            }
            MessageBody::Refuse { reason } => {
                let Some(c) = self.coordinating.get_mut(&m.proposal_id) else {
                    return;
                };
                out.out
                    .push(CeremonyAction::Event(CeremonyEvent::PeerRefused {
                        proposal_id: m.proposal_id,
                        from,
                        reason,
                    }));
                c.refused.insert(from);
                let in_chosen = c.chosen.as_ref().is_some_and(|ch| ch.contains_key(&from));
                let possible = c.members.len().saturating_sub(c.refused.len());
                if in_chosen || possible < usize::from(c.threshold) {
                    let c = self
                        .coordinating
                        .remove(&m.proposal_id)
                        .expect("looked up above");
                    self.close(m.proposal_id, c.epoch, false, out);
                    out.event(CeremonyEvent::Aborted {
                        proposal_id: m.proposal_id,
                        reason: AbortReason::NotEnoughSigners {
                            refused: c.refused.into_iter().collect(),
                        },
                    });
                }
            }
            MessageBody::Closed { completed } => {
                let mine = self
                    .signing
                    .get(&m.proposal_id)
                    .is_some_and(|s| s.coordinator == from);
                if mine {
                    self.signing.remove(&m.proposal_id);
                    if !completed && from != self.me {
                        out.event(CeremonyEvent::Aborted {
                            proposal_id: m.proposal_id,
                            reason: AbortReason::ClosedByCoordinator,
                        });
                    }
                }
                let signed = self
                    .signed
                    .get(&m.proposal_id)
                    .is_some_and(|(coordinator, _)| *coordinator == from);
                if signed {
                    self.signed.remove(&m.proposal_id);
                }
                if mine || signed {
                    let held = state
                        .latest_snapshot
                        .as_ref()
                        .is_some_and(|l| l.proposal_id == m.proposal_id);
                    if completed && from != self.me && !held {
                        out.event(CeremonyEvent::CompletionAnnounced {
                            proposal_id: m.proposal_id,
                            coordinator: from,
                        });
                    }
                }
            }
        }
    }
}
