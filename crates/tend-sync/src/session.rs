//! One sync session with one peer, initiator or responder, as a sans-IO state machine.
//!
//! Flow (messages travel on one ordered, reliable stream):
//!
//! ```text
//! initiator                                   responder
//! Hello{ns, version, epoch, fence, neg0} --->
//!                                        <--- Accept{epoch, fence, neg1} | Refuse{reason}
//! Reconcile(neg2), Want(ids), Facts(..)  --->                 (repeat until negentropy ends)
//!                                        <--- Reconcile(neg3), Facts(wanted)
//! Done                                   --->
//!                                        <--- Facts(rest of wanted), Done
//! ```
//!
//! When the first answer is our version byte alone (every range matched), both sides end
//! right there: one round trip, no `Done`.
//!
//! Only the initiator learns the difference from negentropy, so it pushes the facts the peer
//! lacks and asks for the ones it lacks with `Want`. Every incoming fact is decoded and
//! verified ([`VerifiedFact::decode`]) and admitted through the caller's [`FactHost`];
//! invalid facts are counted by reason and, past [`SessionConfig::max_invalid_facts`],
//! fail the session as misbehaviour, after the valid facts of the same batch were kept.
//! Time comes in as `now`; effects go out as [`Action`]s.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tend_core::{
    DeviceId, FactId, JournalError, JournalNamespace, MaintenanceEpoch, ProtocolVersion,
    VerifiedFact,
};

use crate::items::SharedItems;
use crate::message::{
    AbortReason, Accept, FenceStatus, Hello, MessageError, RefuseReason, SyncMessage,
    DEFAULT_MAX_MESSAGE_BYTES,
};
use crate::rate::{Admit, RateLimits};
use crate::reconcile::{id_list_entries, ReconcileError, Reconciler, NEGENTROPY_V1};

/// What a session needs from the device's store: fact bytes to send, admission of facts
/// received, and who may sync at all. The node implements it over tend-store and passes
/// `MaintenanceState::check_admission` as the admission rule.
///
/// Every method is required: in particular there is no default for
/// [`FactHost::is_authorized`], so a host cannot let any key in by leaving it out.
///
/// ```compile_fail,E0046
/// use tend_core::{FactId, JournalError, JournalNamespace, VerifiedFact};
/// use tend_sync::FactHost;
///
/// struct Host;
///
/// // Does not compile: `is_authorized` is missing.
/// impl FactHost for Host {
///     fn load_fact(&self, _: JournalNamespace, _: &FactId) -> Option<Vec<u8>> {
///         None
///     }
///     fn admit(&mut self, _: VerifiedFact) -> Result<bool, JournalError> {
///         Ok(false)
///     }
/// }
/// ```
pub trait FactHost {
    /// The canonical bytes of a fact of `namespace`, if it is still stored.
    fn load_fact(&self, namespace: JournalNamespace, id: &FactId) -> Option<Vec<u8>>;

    /// Checks admission of a verified fact and stores it. `Ok(true)` if it was new,
    /// `Ok(false)` if it was already there.
    fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError>;

    /// Whether the fact `id` of `namespace` is already held (stored, or admitted in the
    /// batch being written): a received copy is then counted as a duplicate without
    /// checking its signature again (its bytes are the ones checked before, as the id is
    /// their hash). By default, whether [`FactHost::load_fact`] finds it.
    fn holds(&self, namespace: JournalNamespace, id: &FactId) -> bool {
        self.load_fact(namespace, id).is_some()
    }

    /// Whether `peer` may open a session on `namespace` (a member of the authority). A
    /// responder refuses a Hello from a peer this is false for with
    /// `RefuseReason::NotAuthorized`, before it reconciles or admits anything.
    fn is_authorized(&self, namespace: JournalNamespace, peer: &DeviceId) -> bool;

    /// Whether the initiator should ask its peer for fact `id`. The
    /// [`SessionManager`](crate::SessionManager) answers `false` when another session of
    /// the same group (a sync round) already asked for it, so the sessions of a round with
    /// several peers bring each missing fact once. By default, always.
    fn claim_want(&mut self, _id: &FactId) -> bool {
        true
    }
}

/// Tunables of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Negentropy frame size limit: 0 (none) or at least 4096 bytes.
    pub frame_size_limit: u64,
    /// Largest encoded message accepted or sent.
    pub max_message_bytes: usize,
    /// Most facts in one `Facts` message.
    pub max_batch_facts: usize,
    /// Most fact bytes in one `Facts` message (a single larger fact still goes alone).
    pub max_batch_bytes: usize,
    /// Most ids in one `Want` message.
    pub max_want_ids: usize,
    /// A session with no incoming message for this long fails with a timeout.
    pub idle_timeout: Duration,
    /// Undecodable facts tolerated before the peer is judged to misbehave.
    pub max_invalid_facts: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            frame_size_limit: 256 * 1024,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_facts: 2048,
            max_batch_bytes: 512 * 1024,
            max_want_ids: 4096,
            idle_timeout: Duration::from_secs(30),
            max_invalid_facts: 0,
        }
    }
}

/// What this device says about itself at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalView {
    pub device: DeviceId,
    pub namespace: JournalNamespace,
    pub protocol: ProtocolVersion,
    pub epoch: MaintenanceEpoch,
    pub fence: FenceStatus,
}

/// Which side of the session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// Counters of one session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub messages_sent: u64,
    pub messages_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Negentropy messages sent (each round trip is one query and one answer).
    pub reconcile_rounds: u64,
    pub facts_sent: u64,
    pub facts_received: u64,
    pub facts_accepted: u64,
    pub facts_duplicate: u64,
    /// Rejected facts by reason label ([`tend_core::DecodeError::reason`],
    /// [`tend_core::JournalError::reason`]).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Ids we asked for.
    pub wanted: u64,
    /// Ids we lacked but did not ask for, because another session of the same group
    /// already had ([`FactHost::claim_want`]).
    pub wants_left: u64,
    /// Time from start to end.
    pub duration: Duration,
}

impl SessionStats {
    /// All rejected facts.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Why a session failed; the node disconnects and demotes the peer on misbehaviour.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailReason {
    /// The peer sent bytes that are not a sync message.
    #[error("peer sent an invalid message: {0}")]
    Garbage(MessageError),
    /// The peer sent an invalid negentropy message.
    #[error("peer sent an invalid reconciliation message: {0}")]
    Reconcile(ReconcileError),
    /// The peer sent invalid facts (reason label of the first one).
    #[error("peer sent {count} invalid facts (first: {first})")]
    InvalidFacts { count: u64, first: &'static str },
    /// A message that does not fit the session's state.
    #[error("protocol violation: unexpected {0}")]
    Unexpected(&'static str),
    /// The handshake names another namespace or device than expected.
    #[error("handshake mismatch: {0}")]
    Handshake(&'static str),
    /// No message for longer than the idle timeout.
    #[error("session timed out")]
    Timeout,
    /// We could not build a message (local configuration problem).
    #[error("local error: {0}")]
    Local(String),
}

impl FailReason {
    /// Whether the failure is the peer's fault (disconnect and demote it).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(
            self,
            FailReason::Garbage(_)
                | FailReason::Reconcile(_)
                | FailReason::InvalidFacts { .. }
                | FailReason::Unexpected(_)
                | FailReason::Handshake(_)
        )
    }
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionResult {
    /// Both sides exchanged everything.
    Completed,
    /// The handshake was refused; `by_peer` tells which side refused.
    Refused { by_peer: bool, reason: RefuseReason },
    /// Aborted; retry when the reason is [`AbortReason::EpochAdvanced`].
    Aborted { by_peer: bool, reason: AbortReason },
    /// Failed.
    Failed(FailReason),
}

impl SessionResult {
    /// Whether the caller should open a new session right away (DESIGN rule 9).
    pub fn should_retry(&self) -> bool {
        matches!(
            self,
            SessionResult::Aborted {
                reason: AbortReason::EpochAdvanced { .. },
                ..
            }
        )
    }

    /// Whether this counts as a successful sync for peer scoring.
    pub fn is_success(&self) -> bool {
        matches!(self, SessionResult::Completed)
    }
}

/// The final result with the session's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: SessionResult,
    pub stats: SessionStats,
}

/// An effect for the caller to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to the peer on the session's stream.
    Send(Vec<u8>),
    /// Call [`Session::poll`] again at this time (rate limit or timeout).
    WakeAt(Duration),
    /// The session ended; close the stream.
    Finished(Outcome),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Initiator: Hello sent, waiting for Accept/Refuse.
    AwaitAccept,
    /// Exchanging.
    Running,
    Finished,
}

/// One sync session.
pub struct Session {
    role: Role,
    peer: DeviceId,
    /// The version the peer announced in its `Hello` or `Accept`.
    peer_protocol: Option<ProtocolVersion>,
    local: LocalView,
    config: SessionConfig,
    phase: Phase,
    recon: Reconciler,
    /// Facts to send, in order.
    outbox: VecDeque<FactId>,
    /// Every id ever queued for sending, so have lists and wants are deduplicated.
    queued: HashSet<FactId>,
    /// Every id asked for.
    wanted: HashSet<FactId>,
    /// Negentropy answers sent (responder) or received (initiator) so far.
    answers: u64,
    /// Responder: the ids listed in its latest answer, which `WantIndexed` refers to.
    last_listed: Vec<FactId>,
    /// The item snapshot, kept to find which of our items lie below the peer's floor.
    items: SharedItems,
    /// Our items below the peer's GC floor (its latest verified snapshot, learnt from its
    /// `Hello` or `Accept`): never sent, the peer's snapshot covers them (or it would
    /// answer `Late`).
    below_peer_floor: HashSet<FactId>,
    /// A batch loaded but held back by the rate limit.
    staged: Option<Vec<Vec<u8>>>,
    recon_done: bool,
    done_sent: bool,
    peer_done: bool,
    invalid: u64,
    first_invalid: Option<&'static str>,
    started: Duration,
    last_heard: Duration,
    retry_at: Option<Duration>,
    timer_armed: Option<Duration>,
    stats: SessionStats,
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .field("phase", &self.phase)
            .field("outbox", &self.outbox.len())
            .finish()
    }
}

/// Why a session could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error("the item snapshot is of namespace {items}, the session of {session}")]
    NamespaceMismatch {
        items: JournalNamespace,
        session: JournalNamespace,
    },
    #[error("message size limit {max} is too small for frames of {frame} bytes and batches of {batch} bytes")]
    MessageLimit {
        max: usize,
        frame: u64,
        batch: usize,
    },
}

/// Whether the first answer says the sets are equal: just our version byte, to a v1 query
/// (an answer of the version byte alone to another version is the downgrade answer).
fn in_sync_at_once(query: &[u8], answer: &[u8]) -> bool {
    query.first() == Some(&NEGENTROPY_V1) && answer == [NEGENTROPY_V1]
}

/// Bytes of envelope around a negentropy frame or a fact batch, generously.
const ENVELOPE: usize = 256;

fn check_config(c: &SessionConfig) -> Result<(), SessionError> {
    let frame = if c.frame_size_limit == 0 {
        // Without a frame limit, negentropy messages are bounded only by the item count;
        // we still require room for a whole fact.
        0
    } else {
        c.frame_size_limit
    };
    let batch = c.max_batch_bytes.max(tend_core::MAX_FACT_BYTES);
    let need = (frame as usize).max(batch) + ENVELOPE + 16 * c.max_batch_facts;
    if c.max_message_bytes < need || c.max_message_bytes < 33 * c.max_want_ids + ENVELOPE {
        return Err(SessionError::MessageLimit {
            max: c.max_message_bytes,
            frame: c.frame_size_limit,
            batch: c.max_batch_bytes,
        });
    }
    Ok(())
}

impl Session {
    fn new(
        role: Role,
        now: Duration,
        peer: DeviceId,
        local: LocalView,
        items: SharedItems,
        config: SessionConfig,
    ) -> Result<Self, SessionError> {
        check_config(&config)?;
        if items.namespace() != local.namespace {
            return Err(SessionError::NamespaceMismatch {
                items: items.namespace(),
                session: local.namespace,
            });
        }
        let recon = Reconciler::new(items.clone(), config.frame_size_limit)?;
        let first_deadline = now + config.idle_timeout;
        Ok(Self {
            role,
            peer,
            peer_protocol: None,
            local,
            config,
            phase: Phase::Running,
            recon,
            outbox: VecDeque::new(),
            queued: HashSet::new(),
            wanted: HashSet::new(),
            answers: 0,
            last_listed: Vec::new(),
            items,
            below_peer_floor: HashSet::new(),
            staged: None,
            recon_done: false,
            done_sent: false,
            peer_done: false,
            invalid: 0,
            first_invalid: None,
            started: now,
            last_heard: now,
            retry_at: None,
            timer_armed: Some(first_deadline),
            stats: SessionStats::default(),
            outcome: None,
        })
    }

    /// Starts a session as initiator: returns it with the `Hello` to send. A device that
    /// does not satisfy an activated fence does not start sessions: the session finishes
    /// at once as refused by us, with the reason to show (DESIGN rule 7).
    pub fn initiate(
        now: Duration,
        peer: DeviceId,
        local: LocalView,
        items: SharedItems,
        config: SessionConfig,
    ) -> Result<(Self, Vec<Action>), SessionError> {
        let mut s = Self::new(Role::Initiator, now, peer, local, items, config)?;
        let mut out = Vec::new();
        if let FenceStatus::NotSatisfied {
            fence,
            required,
            local_epoch,
        } = local.fence
        {
            let reason = RefuseReason::FenceNotSatisfied {
                fence,
                required,
                local_epoch,
            };
            s.finish(
                now,
                SessionResult::Refused {
                    by_peer: false,
                    reason,
                },
                &mut out,
            );
            return Ok((s, out));
        }
        let first = s.recon.initiate()?;
        s.stats.reconcile_rounds += 1;
        s.phase = Phase::AwaitAccept;
        let hello = SyncMessage::Hello(Hello {
            protocol: local.protocol,
            namespace: local.namespace,
            device: local.device,
            epoch: local.epoch,
            fence: local.fence,
            reconcile: first,
        });
        s.send(&hello, &mut out);
        out.push(Action::WakeAt(now + s.config.idle_timeout));
        Ok((s, out))
    }

    /// Answers an incoming `Hello` as responder: accepts (and answers the first
    /// negentropy message) or refuses with a reason the initiator can show. `peer` is the
    /// transport-authenticated device id of the initiator.
    pub fn accept(
        now: Duration,
        peer: DeviceId,
        hello: &[u8],
        local: LocalView,
        items: SharedItems,
        config: SessionConfig,
        host: &mut dyn FactHost,
    ) -> Result<(Self, Vec<Action>), SessionError> {
        let mut s = Self::new(Role::Responder, now, peer, local, items, config)?;
        let mut out = Vec::new();
        s.note_received(hello.len());
        let msg = match SyncMessage::decode(hello, s.config.max_message_bytes) {
            Ok(SyncMessage::Hello(h)) => h,
            Ok(other) => {
                s.fail(now, FailReason::Unexpected(other.kind()), &mut out);
                return Ok((s, out));
            }
            Err(e) => {
                s.fail(now, FailReason::Garbage(e), &mut out);
                return Ok((s, out));
            }
        };
        if msg.device != peer {
            s.fail(now, FailReason::Handshake("device id"), &mut out);
            return Ok((s, out));
        }
        s.learn_peer_floor(msg.epoch.snapshot_epoch);
        s.peer_protocol = Some(msg.protocol);
        let refusal = if msg.namespace != local.namespace {
            Some(RefuseReason::UnknownNamespace(msg.namespace))
        } else if !host.is_authorized(local.namespace, &peer) {
            Some(RefuseReason::NotAuthorized)
        } else if msg.protocol.major != local.protocol.major {
            Some(RefuseReason::IncompatibleProtocol {
                theirs: msg.protocol,
                ours: local.protocol,
            })
        } else if let FenceStatus::NotSatisfied {
            fence,
            required,
            local_epoch,
        } = local.fence
        {
            Some(RefuseReason::FenceNotSatisfied {
                fence,
                required,
                local_epoch,
            })
        } else if let FenceStatus::NotSatisfied {
            fence,
            required,
            local_epoch,
        } = msg.fence
        {
            Some(RefuseReason::PeerFenceNotSatisfied {
                fence,
                required,
                local_epoch,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            s.send(&SyncMessage::Refuse(reason.clone()), &mut out);
            s.finish(
                now,
                SessionResult::Refused {
                    by_peer: false,
                    reason,
                },
                &mut out,
            );
            return Ok((s, out));
        }
        match s.recon.respond(&msg.reconcile) {
            Ok(answer) => {
                s.stats.reconcile_rounds += 1;
                s.remember_answer(&answer);
                let at_once = in_sync_at_once(&msg.reconcile, &answer);
                let accept = SyncMessage::Accept(Accept {
                    protocol: local.protocol,
                    device: local.device,
                    epoch: local.epoch,
                    fence: local.fence,
                    reconcile: answer,
                });
                s.send(&accept, &mut out);
                if at_once {
                    // Every range matched: nothing to exchange, no Done round needed.
                    s.finish(now, SessionResult::Completed, &mut out);
                } else {
                    out.push(Action::WakeAt(now + s.config.idle_timeout));
                }
            }
            Err(e) => s.fail(now, FailReason::Reconcile(e), &mut out),
        }
        Ok((s, out))
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer.
    pub fn peer(&self) -> DeviceId {
        self.peer
    }

    /// The version the peer announced at the handshake (`None` until its `Hello` or
    /// `Accept` arrived).
    pub fn peer_protocol(&self) -> Option<ProtocolVersion> {
        self.peer_protocol
    }

    /// The namespace being synchronised.
    pub fn namespace(&self) -> JournalNamespace {
        self.local.namespace
    }

    /// The maintenance epoch the session runs under.
    pub fn epoch(&self) -> MaintenanceEpoch {
        self.local.epoch
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The counters so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Handles one message from the peer.
    pub fn handle(
        &mut self,
        now: Duration,
        bytes: &[u8],
        host: &mut dyn FactHost,
        limits: Option<&mut RateLimits>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_finished() {
            return out;
        }
        self.last_heard = now;
        self.note_received(bytes.len());
        let msg = match SyncMessage::decode(bytes, self.config.max_message_bytes) {
            Ok(m) => m,
            Err(e) => {
                self.fail(now, FailReason::Garbage(e), &mut out);
                return out;
            }
        };
        match (self.phase, self.role, msg) {
            (_, _, SyncMessage::Abort(reason)) => {
                let result = SessionResult::Aborted {
                    by_peer: true,
                    reason,
                };
                self.finish(now, result, &mut out);
                return out;
            }
            (Phase::AwaitAccept, Role::Initiator, SyncMessage::Refuse(reason)) => {
                let result = SessionResult::Refused {
                    by_peer: true,
                    reason,
                };
                self.finish(now, result, &mut out);
                return out;
            }
            (Phase::AwaitAccept, Role::Initiator, SyncMessage::Accept(a)) => {
                if a.device != self.peer {
                    self.fail(now, FailReason::Handshake("device id"), &mut out);
                    return out;
                }
                self.phase = Phase::Running;
                self.peer_protocol = Some(a.protocol);
                self.learn_peer_floor(a.epoch.snapshot_epoch);
                self.on_answer(now, &a.reconcile, host, &mut out);
                if !self.is_finished() && a.reconcile == [NEGENTROPY_V1] {
                    // The responder found every range equal and has closed its side.
                    self.finish(now, SessionResult::Completed, &mut out);
                    return out;
                }
            }
            (Phase::Running, Role::Initiator, SyncMessage::Reconcile(m)) if !self.recon_done => {
                self.on_answer(now, &m, host, &mut out);
            }
            (Phase::Running, Role::Responder, SyncMessage::Reconcile(m)) if !self.peer_done => {
                match self.recon.respond(&m) {
                    Ok(answer) => {
                        self.stats.reconcile_rounds += 1;
                        self.remember_answer(&answer);
                        self.send(&SyncMessage::Reconcile(answer), &mut out);
                    }
                    Err(e) => self.fail(now, FailReason::Reconcile(e), &mut out),
                }
            }
            (Phase::Running, Role::Responder, SyncMessage::Want(ids))
                if !self.peer_done && ids.len() <= self.config.max_want_ids =>
            {
                for id in ids {
                    self.enqueue(id);
                }
            }
            (Phase::Running, Role::Responder, SyncMessage::WantIndexed { answer, bits })
                if !self.peer_done =>
            {
                if let Err(what) = self.on_want_indexed(answer, &bits) {
                    self.fail(now, FailReason::Unexpected(what), &mut out);
                    return out;
                }
            }
            (Phase::Running, _, SyncMessage::Facts(facts)) if !self.peer_done => {
                self.on_facts(now, facts, host, &mut out);
            }
            (Phase::Running, Role::Responder, SyncMessage::Done) if !self.peer_done => {
                self.peer_done = true;
            }
            (Phase::Running, Role::Initiator, SyncMessage::Done)
                if self.done_sent && !self.peer_done =>
            {
                self.peer_done = true;
            }
            (_, _, other) => {
                self.fail(now, FailReason::Unexpected(other.kind()), &mut out);
                return out;
            }
        }
        if !self.is_finished() {
            self.pump(now, host, limits, &mut out);
        }
        out
    }

    /// Timers: the idle timeout and sends held back by the rate limit.
    pub fn poll(
        &mut self,
        now: Duration,
        host: &mut dyn FactHost,
        limits: Option<&mut RateLimits>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_finished() {
            return out;
        }
        let deadline = self.last_heard + self.config.idle_timeout;
        if now >= deadline {
            self.send(&SyncMessage::Abort(AbortReason::Closed), &mut out);
            self.fail(now, FailReason::Timeout, &mut out);
            return out;
        }
        // Re-arm the idle timer once per deadline, so a silent peer is noticed.
        if self.timer_armed != Some(deadline) {
            self.timer_armed = Some(deadline);
            out.push(Action::WakeAt(deadline));
        }
        self.pump(now, host, limits, &mut out);
        out
    }

    /// The local identity epoch advanced: abort so the caller retries under the new epoch
    /// (DESIGN rule 9). An epoch that is not newer changes nothing.
    pub fn identity_epoch_advanced(&mut self, now: Duration, identity_epoch: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let from = self.local.epoch.identity_epoch;
        if self.is_finished() || identity_epoch <= from {
            return out;
        }
        let reason = AbortReason::EpochAdvanced {
            from,
            to: identity_epoch,
        };
        self.send(&SyncMessage::Abort(reason), &mut out);
        self.finish(
            now,
            SessionResult::Aborted {
                by_peer: false,
                reason,
            },
            &mut out,
        );
        out
    }

    /// Ends the session from our side for `reason`, telling the peer why (an activated
    /// fence became unsatisfied mid-session, say). Does nothing once the session ended.
    pub fn abort(&mut self, now: Duration, reason: AbortReason) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.is_finished() {
            self.send(&SyncMessage::Abort(reason), &mut out);
            let result = SessionResult::Aborted {
                by_peer: false,
                reason,
            };
            self.finish(now, result, &mut out);
        }
        out
    }

    /// Closes the session from our side (shutdown, peer removed).
    pub fn close(&mut self, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.is_finished() {
            self.send(&SyncMessage::Abort(AbortReason::Closed), &mut out);
            let result = SessionResult::Aborted {
                by_peer: false,
                reason: AbortReason::Closed,
            };
            self.finish(now, result, &mut out);
        }
        out
    }

    /// Initiator: one negentropy answer of the responder.
    fn on_answer(
        &mut self,
        now: Duration,
        msg: &[u8],
        host: &mut dyn FactHost,
        out: &mut Vec<Action>,
    ) {
        let step = match self.recon.step(msg) {
            Ok(s) => s,
            Err(e) => return self.fail(now, FailReason::Reconcile(e), out),
        };
        let answer_no = self.answers;
        self.answers += 1;
        for id in step.have {
            self.enqueue(id);
        }
        let fresh: Vec<FactId> = step
            .need
            .into_iter()
            .filter(|id| self.wanted.insert(*id))
            .filter(|id| {
                // Another session is bringing it: counted as left to that one.
                let claimed = host.claim_want(id);
                if !claimed {
                    self.stats.wants_left += 1;
                }
                claimed
            })
            .collect();
        // Ask for what we lack before the next query, so the peer's facts flow while
        // reconciliation goes on.
        self.send_wants(answer_no, msg, fresh, out);
        match step.next {
            Some(next) => {
                self.stats.reconcile_rounds += 1;
                self.send(&SyncMessage::Reconcile(next), out);
            }
            None => self.recon_done = true,
        }
    }

    /// Notes the peer's GC floor: items below it are never sent (items are sorted by
    /// epoch, so only the prefix below the floor is scanned).
    fn learn_peer_floor(&mut self, floor: tend_core::Epoch) {
        let mut below = HashSet::new();
        self.items.scan(0, self.items.len(), &mut |_, item| {
            if item.epoch < floor {
                below.insert(item.id);
                true
            } else {
                false
            }
        });
        self.below_peer_floor = below;
    }

    fn enqueue(&mut self, id: FactId) {
        if self.below_peer_floor.contains(&id) {
            return;
        }
        if self.queued.insert(id) {
            self.outbox.push_back(id);
        }
    }

    /// Asks for `fresh` ids learnt from answer number `answer_no`: by position in the
    /// answer's id lists (a bit each), and by id for any that are not listed there.
    fn send_wants(
        &mut self,
        answer_no: u64,
        answer: &[u8],
        fresh: Vec<FactId>,
        out: &mut Vec<Action>,
    ) {
        if fresh.is_empty() {
            return;
        }
        self.stats.wanted += fresh.len() as u64;
        let listed = id_list_entries(answer).unwrap_or_default();
        let position: HashMap<FactId, usize> =
            listed.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut bits = vec![0u8; listed.len().div_ceil(8)];
        let mut any = false;
        let mut by_id = Vec::new();
        for id in fresh {
            match position.get(&id) {
                Some(&i) => {
                    bits[i / 8] |= 1 << (i % 8);
                    any = true;
                }
                None => by_id.push(id),
            }
        }
        if any {
            // Trailing zero bytes carry nothing.
            while bits.last() == Some(&0) {
                bits.pop();
            }
            self.send(
                &SyncMessage::WantIndexed {
                    answer: answer_no,
                    bits,
                },
                out,
            );
        }
        for chunk in by_id.chunks(self.config.max_want_ids.max(1)) {
            self.send(&SyncMessage::Want(chunk.to_vec()), out);
        }
    }

    /// Responder: keeps the ids listed in the answer about to be sent.
    fn remember_answer(&mut self, answer: &[u8]) {
        self.last_listed = id_list_entries(answer).unwrap_or_default();
        self.answers += 1;
    }

    /// Responder: queues the facts a `WantIndexed` names.
    fn on_want_indexed(&mut self, answer: u64, bits: &[u8]) -> Result<(), &'static str> {
        if self.answers.checked_sub(1) != Some(answer) {
            return Err("want-indexed for another answer");
        }
        if bits.len() > self.last_listed.len().div_ceil(8) {
            return Err("want-indexed longer than the answer");
        }
        for (byte_no, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let id = *self
                        .last_listed
                        .get(byte_no * 8 + bit)
                        .ok_or("want-indexed past the answer")?;
                    self.enqueue(id);
                }
            }
        }
        Ok(())
    }

    fn on_facts(
        &mut self,
        now: Duration,
        facts: Vec<Vec<u8>>,
        host: &mut dyn FactHost,
        out: &mut Vec<Action>,
    ) {
        let reject = |stats: &mut SessionStats, reason: &'static str| {
            *stats.rejected.entry(reason).or_insert(0) += 1;
        };
        // Facts already held (a concurrent session with the same peer brought them, say)
        // are duplicates: their bytes hash to an id whose bytes were checked before.
        let ns = self.local.namespace;
        let before = facts.len();
        let facts: Vec<Vec<u8>> = facts
            .into_iter()
            .filter(|bytes| !host.holds(ns, &FactId::of(bytes)))
            .collect();
        let held = (before - facts.len()) as u64;
        self.stats.facts_received += held;
        self.stats.facts_duplicate += held;
        // The rest at once: its signatures are checked on every core, with the same
        // results in the same order as one `decode` each (the simulator replays seeds).
        let decoded = VerifiedFact::decode_batch(&facts);
        drop(facts);
        for decoded in decoded {
            self.stats.facts_received += 1;
            let fact = match decoded {
                Ok(f) => f,
                Err(e) => {
                    reject(&mut self.stats, e.reason());
                    self.invalid += 1;
                    self.first_invalid.get_or_insert(e.reason());
                    continue;
                }
            };
            if fact.namespace() != self.local.namespace {
                // A verified fact of another journal has no business in this session.
                reject(&mut self.stats, "namespace");
                self.invalid += 1;
                self.first_invalid.get_or_insert("namespace");
                continue;
            }
            match host.admit(fact) {
                Ok(true) => self.stats.facts_accepted += 1,
                Ok(false) => self.stats.facts_duplicate += 1,
                // Admission depends on what each side knows (membership, snapshots), so
                // a refused fact is counted but is not the peer's fault.
                Err(e) => reject(&mut self.stats, e.reason()),
            }
        }
        if self.invalid > self.config.max_invalid_facts {
            let reason = FailReason::InvalidFacts {
                count: self.invalid,
                first: self.first_invalid.unwrap_or("invalid"),
            };
            self.send(&SyncMessage::Abort(AbortReason::Closed), out);
            self.fail(now, reason, out);
        }
    }

    /// Sends queued facts within the batch and rate limits, then `Done` when due.
    fn pump(
        &mut self,
        now: Duration,
        host: &mut dyn FactHost,
        mut limits: Option<&mut RateLimits>,
        out: &mut Vec<Action>,
    ) {
        let (mut max_facts, mut max_bytes) = (
            self.config.max_batch_facts.max(1),
            self.config.max_batch_bytes,
        );
        if let Some(l) = limits.as_deref() {
            let (f, b) = l.max_batch();
            max_facts = max_facts.min(f.map_or(usize::MAX, |f| f as usize)).max(1);
            max_bytes = max_bytes.min(b.map_or(usize::MAX, |b| b as usize));
        }
        loop {
            if self.staged.is_none() {
                let mut batch = Vec::new();
                let mut size = 0usize;
                while let Some(id) = self.outbox.front() {
                    if batch.len() >= max_facts {
                        break;
                    }
                    let Some(bytes) = host.load_fact(self.local.namespace, id) else {
                        // Pruned since the snapshot was taken: nothing to send.
                        self.outbox.pop_front();
                        continue;
                    };
                    if !batch.is_empty() && size + bytes.len() > max_bytes {
                        break;
                    }
                    size += bytes.len();
                    batch.push(bytes);
                    self.outbox.pop_front();
                }
                if batch.is_empty() {
                    break;
                }
                self.staged = Some(batch);
            }
            let Some(batch) = self.staged.as_ref() else {
                break;
            };
            if let Some(l) = limits.as_deref_mut() {
                let bytes: usize = batch.iter().map(Vec::len).sum();
                let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
                let b = u32::try_from(bytes).unwrap_or(u32::MAX);
                if let Admit::RetryAt(t) = l.admit(self.peer, n, b, now) {
                    if self.retry_at != Some(t) {
                        self.retry_at = Some(t);
                        out.push(Action::WakeAt(t));
                    }
                    return;
                }
            }
            let batch = self.staged.take().unwrap_or_default();
            self.stats.facts_sent += batch.len() as u64;
            self.send(&SyncMessage::Facts(batch), out);
        }
        self.retry_at = None;
        match self.role {
            Role::Initiator => {
                if self.recon_done && !self.done_sent {
                    self.done_sent = true;
                    self.send(&SyncMessage::Done, out);
                }
                if self.done_sent && self.peer_done {
                    self.finish(now, SessionResult::Completed, out);
                }
            }
            Role::Responder => {
                if self.peer_done {
                    self.done_sent = true;
                    self.send(&SyncMessage::Done, out);
                    self.finish(now, SessionResult::Completed, out);
                }
            }
        }
    }

    fn note_received(&mut self, len: usize) {
        self.stats.messages_received += 1;
        self.stats.bytes_received += len as u64;
    }

    fn send(&mut self, msg: &SyncMessage, out: &mut Vec<Action>) {
        let bytes = msg.encode();
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        out.push(Action::Send(bytes));
    }

    fn fail(&mut self, now: Duration, reason: FailReason, out: &mut Vec<Action>) {
        self.finish(now, SessionResult::Failed(reason), out);
    }

    fn finish(&mut self, now: Duration, result: SessionResult, out: &mut Vec<Action>) {
        if self.phase == Phase::Finished {
            return;
        }
        self.phase = Phase::Finished;
        // Release what the session held as soon as it ends.
        self.outbox = VecDeque::new();
        self.queued = HashSet::new();
        self.wanted = HashSet::new();
        self.last_listed = Vec::new();
        self.staged = None;
        self.stats.duration = now.saturating_sub(self.started);
        let outcome = Outcome {
            result,
            stats: self.stats.clone(),
        };
        self.outcome = Some(outcome.clone());
        out.push(Action::Finished(outcome));
    }
}
