//! Snapshot ceremonies over the network: the `tend/maint/1` protocol, the node's
//! [`SnapshotEngine`] driver (messages, timer, keys, effects) and automatic snapshot triggers.
//!
//! Protocol `tend/maint/1` (one ALPN on the device's iroh endpoint, beside `tend/sync/1`):
//! every message travels on its own bidirectional QUIC stream as one frame (u32 big-endian
//! length, then the canonical DAG-CBOR of a [`MaintMessage`], at most [`MAX_MAINT_FRAME`]
//! bytes, refused before it is buffered); the receiver answers with one frame holding a
//! [`MaintReply`] and finishes the stream. The sender of a message is the connection's
//! authenticated endpoint id, never a field of the message. A connection is admitted only
//! from a current member, from a configured peer (the `peers` setting, `--peer`) or from a
//! device named in a key generation this device accepted; anything else is closed at the
//! handshake with `NOT_MEMBER` and counted. Ceremony messages are accepted from current
//! members only; key generation messages follow the rule in [`crate::dkg`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iroh::endpoint::{Connection, RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{DeviceId, Epoch, GroupKey, Hash32, JournalNamespace, MaintenanceState};
use tend_crypto::dkg::DkgSession;
use tend_crypto::KeyShare;
use tend_snapshot::{
    AbortReason, CeremonyEvent, CeremonyInput, CeremonyOutput, LocalJournal, Recipient, SignerKey,
    SnapshotEngine,
};
use tend_store::{Store, StoreError};
use tokio::sync::oneshot;

use crate::endpoint::{self, close_code, FrameError};
use crate::fleet::StoreJournal;
use crate::node::Node;

/// Setting holding the engine's snapshot votes (target epoch -> proposal signed).
const VOTES: &str = "snapshot_votes";

pub use crate::endpoint::MAINT_ALPN;
/// Largest message frame accepted (a join message carries the authority's facts).
pub const MAX_MAINT_FRAME: usize = 4 << 20;
/// Largest reply frame accepted.
const MAX_REPLY_FRAME: usize = 64 * 1024;
/// How long a sender waits for a reply, and a receiver for a message.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the engine is ticked (deadlines, epoch changes, retries).
const TICK: Duration = Duration::from_millis(200);
/// A ceremony's default deadline.
pub const DEFAULT_CEREMONY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often automatic snapshot triggers are evaluated.
const TRIGGER_EVERY: Duration = Duration::from_secs(10);

/// A message of `tend/maint/1`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MaintMessage {
    /// A snapshot ceremony message (the bytes of a `CeremonyMessage`).
    Ceremony(ByteBuf),
    /// Admin to a member: take part in this key generation; where the members listen; and
    /// the admin's maintenance epoch (identity and snapshot epoch), which a member of the
    /// admin's journal must be at too (ARCHITECTURE section 10).
    DkgInvite {
        session: DkgSession,
        addrs: Vec<(DeviceId, String)>,
        maintenance_epoch: tend_core::MaintenanceEpoch,
    },
    /// Admin to a member: every member accepted, start round 1.
    DkgStart { session: Hash32 },
    /// A DKG round message (the bytes of a `DkgMessage`).
    Dkg(ByteBuf),
    /// Member to admin: my share is saved; this is the group key I derived; and my
    /// maintenance epoch.
    DkgFinished {
        session: Hash32,
        group_key: GroupKey,
        /// The member's maintenance epoch in the admin's journal when it finished, if it
        /// is a member of that journal already (a re-deal).
        maintenance_epoch: Option<tend_core::MaintenanceEpoch>,
    },
    /// Admin to a member: the authority's facts, ending with the membership change.
    DkgJoin {
        session: Hash32,
        facts: Vec<ByteBuf>,
    },
    /// Admin to a member: the key generation failed; forget it.
    DkgAbort { session: Hash32 },
}

impl MaintMessage {
    /// Canonical DAG-CBOR.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// Decodes wire bytes, rejecting non-canonical encodings.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, tend_core::DecodeError> {
        from_canonical(bytes)
    }
}

/// The receiver's answer to one [`MaintMessage`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MaintReply {
    /// Taken.
    Accepted,
    /// Not taken, and why.
    Refused { reason: String },
}

impl MaintReply {
    pub(crate) fn refused(reason: impl Into<String>) -> Self {
        Self::Refused {
            reason: reason.into(),
        }
    }
}

/// Why sending a maintenance message failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no known address for device {0}")]
    NoAddress(DeviceId),
    #[error("device {0} is blocked")]
    Blocked(DeviceId),
    #[error("cannot reach {device}: {detail}")]
    Unreachable { device: DeviceId, detail: String },
    #[error("{device} answered with something unreadable: {detail}")]
    BadReply { device: DeviceId, detail: String },
}

/// Why a snapshot ceremony of this node failed.
#[derive(Debug, thiserror::Error)]
pub enum CeremonyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the snapshot proposal was rejected: {0}")]
    Rejected(String),
    #[error("the snapshot ceremony timed out after {secs} s{detail}")]
    TimedOut { secs: u64, detail: String },
    #[error("the snapshot ceremony was aborted: {0}")]
    Aborted(String),
    #[error("the node stopped before the ceremony ended")]
    Stopped,
}

/// Counters of the maintenance protocol, for tests and `tend status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MaintStats {
    /// Connections closed at the handshake (not a member, not a configured peer).
    pub refused_connections: u64,
    /// Messages answered `Refused` (non-member, unauthorised key generation, malformed).
    pub refused_messages: u64,
    /// Ceremony messages handed to the engine.
    pub ceremony_messages: u64,
    /// Key generation messages taken.
    pub dkg_messages: u64,
    /// Ceremony messages the engine ignored (unexpected, malformed, non-member).
    pub ignored: u64,
    /// Ceremonies this node coordinated to completion.
    pub completed: u64,
}

#[derive(Default)]
struct Counters {
    refused_connections: AtomicU64,
    refused_messages: AtomicU64,
    ceremony_messages: AtomicU64,
    dkg_messages: AtomicU64,
    ignored: AtomicU64,
    completed: AtomicU64,
}

/// Decides whether this device should propose a snapshot now: given the store, the
/// journal and the wall clock (seconds since the Unix epoch), the target epoch or `None`.
/// `tend run` wires `tend_backup::triggers`; the node only calls it (on the admin).
#[derive(Clone)]
pub struct SnapshotTrigger(
    #[allow(clippy::type_complexity)]
    pub  Arc<dyn Fn(&Store, JournalNamespace, u64) -> Option<Epoch> + Send + Sync>,
);

impl std::fmt::Debug for SnapshotTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotTrigger")
    }
}

struct Waiter {
    tx: oneshot::Sender<Result<SnapshotCompleted, CeremonyError>>,
    refusals: Vec<String>,
}

/// The maintenance state a node holds: its ceremony engine, waiting proposers, cached
/// connections, the key generation it takes part in, and counters.
pub struct Maint {
    engine: Mutex<SnapshotEngine>,
    /// How many votes are saved in the store; `None` until they were loaded.
    persisted_votes: Mutex<Option<usize>>,
    /// The (identity epoch, group key) whose key the engine holds.
    installed: Mutex<Option<(u64, GroupKey)>>,
    waiters: Mutex<HashMap<Hash32, Waiter>>,
    conns: Mutex<HashMap<DeviceId, Connection>>,
    pub(crate) dkg: Mutex<Option<crate::dkg::DkgRun>>,
    counters: Counters,
    trigger: Mutex<Option<SnapshotTrigger>>,
    last_trigger: Mutex<Option<Instant>>,
    start: Instant,
}

impl std::fmt::Debug for Maint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maint").finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering from poisoning (every critical section leaves the data
/// consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f`, which reads or writes the store, telling a multi-threaded runtime that this
/// worker blocks.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Maint {
    /// The state of a node for device `me`.
    pub(crate) fn new(me: DeviceId) -> Self {
        Self {
            engine: Mutex::new(SnapshotEngine::new(me)),
            persisted_votes: Mutex::new(None),
            installed: Mutex::new(None),
            waiters: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            dkg: Mutex::new(None),
            counters: Counters::default(),
            trigger: Mutex::new(None),
            last_trigger: Mutex::new(None),
            start: Instant::now(),
        }
    }

    fn stats(&self) -> MaintStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MaintStats {
            refused_connections: g(&c.refused_connections),
            refused_messages: g(&c.refused_messages),
            ceremony_messages: g(&c.ceremony_messages),
            dkg_messages: g(&c.dkg_messages),
            ignored: g(&c.ignored),
            completed: g(&c.completed),
        }
    }

    pub(crate) fn count_dkg_message(&self) {
        self.counters.dkg_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// The key for the current identity epoch, if the engine does not hold it yet: the
    /// device key for a one-device authority, else the FROST share saved in the home.
    fn key_to_install(&self, node: &Node, state: &MaintenanceState) -> Option<SignerKey> {
        let m = state.membership()?;
        let me = node.device_id();
        if !m.members.contains(&me) {
            return None;
        }
        let wanted = (m.identity_epoch, m.group_key);
        if *lock(&self.installed) == Some(wanted) {
            return None;
        }
        let key = if m.members.len() == 1 {
            SignerKey::Single {
                identity_epoch: m.identity_epoch,
                key: node.device().key().signing_key().clone(),
            }
        } else {
            match KeyShare::load(node.device().home(), m.identity_epoch) {
                Ok(s) if s.group_key() == m.group_key => SignerKey::Frost(s),
                // Not (yet) ours: the key generation may still be saving it; try again on
                // the next tick.
                Ok(_) | Err(_) => return None,
            }
        };
        *lock(&self.installed) = Some(wanted);
        Some(key)
    }

    /// Feeds one input to the engine over the device's current journal.
    fn step(&self, node: &Node, input: CeremonyInput) -> Result<Vec<CeremonyOutput>, StoreError> {
        let device = node.device();
        let view = StoreJournal::new(device.store(), device.namespace())?;
        let now = self.start.elapsed().as_millis() as u64;
        let mut rng = rand::rngs::OsRng;
        let mut out = Vec::new();
        let mut engine = lock(&self.engine);
        let mut persisted = lock(&self.persisted_votes);
        if persisted.is_none() {
            // A member signs at most one digest per target epoch, across restarts too:
            // otherwise two snapshots could complete at one epoch (found by tend-sim).
            let votes: Vec<(Epoch, Hash32)> =
                device.store().get_setting(VOTES)?.unwrap_or_default();
            engine.restore_votes(votes);
            *persisted = Some(engine.votes().len());
        }
        if let Some(key) = self.key_to_install(node, view.state()) {
            out.extend(engine.handle(now, &view, CeremonyInput::InstallKey(key), &mut rng));
        }
        out.extend(engine.handle(now, &view, input, &mut rng));
        if *persisted != Some(engine.votes().len()) {
            // Persisted before any reply carrying the vote leaves this device.
            let votes: Vec<(Epoch, Hash32)> =
                engine.votes().iter().map(|(e, h)| (*e, *h)).collect();
            device.store().put_setting(VOTES, &votes)?;
            *persisted = Some(votes.len());
        }
        Ok(out)
    }

    /// Carries out the engine's effects: messages go out on their own tasks, facts are
    /// signed and stored (then synced, so proposals and completions reach everyone), blobs
    /// are stored, events settle waiting proposers.
    fn carry_out(&self, node: &Node, outputs: Vec<CeremonyOutput>) {
        let mut wrote = false;
        for o in outputs {
            match o {
                CeremonyOutput::Send { to, message } => {
                    let targets = match to {
                        Recipient::Device(d) => vec![d],
                        Recipient::All => current_members(node)
                            .into_iter()
                            .filter(|d| *d != node.device_id())
                            .collect(),
                    };
                    let msg = MaintMessage::Ceremony(ByteBuf::from(message.to_bytes()));
                    for d in targets {
                        let node = node.clone();
                        let msg = msg.clone();
                        tokio::spawn(async move {
                            match send(&node, d, &msg).await {
                                Ok(MaintReply::Accepted) => {}
                                Ok(MaintReply::Refused { reason }) => {
                                    tracing::debug!("{d} refused a ceremony message: {reason}")
                                }
                                Err(e) => tracing::debug!("ceremony message not delivered: {e}"),
                            }
                        });
                    }
                }
                CeremonyOutput::WriteFact(f) => match blocking(|| node.device().write(f)) {
                    Ok(_) => wrote = true,
                    Err(e) => tracing::warn!("cannot write a ceremony fact: {e}"),
                },
                CeremonyOutput::StoreBlob { cid, bytes } => {
                    if let Err(e) = blocking(|| node.device().store().put_blob(cid.codec(), &bytes))
                    {
                        tracing::warn!("cannot store snapshot blob {cid}: {e}");
                    }
                }
                CeremonyOutput::Event(e) => {
                    count_outcome(node, &e);
                    self.on_event(e)
                }
            }
        }
        if wrote {
            node.after_local_write();
            let node = node.clone();
            tokio::spawn(async move {
                node.sync_now().await;
            });
        }
    }

    fn on_event(&self, e: CeremonyEvent) {
        let mut waiters = lock(&self.waiters);
        match e {
            CeremonyEvent::Completed(c) => {
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                tracing::info!("snapshot at epoch {} completed", c.snapshot.epoch);
                if let Some(w) = waiters.remove(&c.proposal_id) {
                    let _ = w.tx.send(Ok(c));
                }
            }
            CeremonyEvent::PeerRefused {
                proposal_id,
                from,
                reason,
            } => {
                if let Some(w) = waiters.get_mut(&proposal_id) {
                    w.refusals.push(format!("{from} refused: {reason:?}"));
                }
            }
            CeremonyEvent::Aborted {
                proposal_id,
                reason,
            } => {
                // An epoch change is retried under the new epoch ([`CeremonyEvent::Retried`]
                // moves the waiter); other aborts end the wait.
                if matches!(reason, AbortReason::EpochChanged { .. }) {
                    return;
                }
                if let Some(w) = waiters.remove(&proposal_id) {
                    let detail = refusal_detail(&w.refusals);
                    let err = match reason {
                        AbortReason::TimedOut => CeremonyError::TimedOut { secs: 0, detail },
                        other => CeremonyError::Aborted(format!("{other:?}{detail}")),
                    };
                    let _ = w.tx.send(Err(err));
                }
            }
            CeremonyEvent::Retried { old, new, epoch } => {
                tracing::info!(
                    "snapshot proposal retried under identity epoch {}",
                    epoch.identity_epoch
                );
                if let Some(w) = waiters.remove(&old) {
                    waiters.insert(new, w);
                }
            }
            CeremonyEvent::Ignored { from, reason } => {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("ceremony message from {from} ignored: {reason}");
            }
            CeremonyEvent::Refused {
                proposal_id,
                reason,
            } => tracing::info!("refused to sign proposal {proposal_id}: {reason:?}"),
            CeremonyEvent::Proposed { .. }
            | CeremonyEvent::ProposalRejected { .. }
            | CeremonyEvent::Signed { .. } => {}
        }
    }

    fn cached(&self, d: &DeviceId) -> Option<Connection> {
        let mut conns = lock(&self.conns);
        match conns.get(d) {
            Some(c) if c.close_reason().is_none() => Some(c.clone()),
            Some(_) => {
                conns.remove(d);
                None
            }
            None => None,
        }
    }
}

/// Counts a ceremony's end in `tend_ceremonies_total{role, outcome}`.
fn count_outcome(node: &Node, e: &CeremonyEvent) {
    let (role, outcome) = match e {
        CeremonyEvent::Completed(_) => ("coordinator", "completed"),
        CeremonyEvent::Aborted {
            reason: AbortReason::EpochChanged { .. },
            ..
        } => return, // retried under the new epoch
        CeremonyEvent::Aborted { .. } => ("coordinator", "aborted"),
        CeremonyEvent::Signed { .. } => ("signer", "signed"),
        CeremonyEvent::Refused { .. } => ("signer", "refused"),
        _ => return,
    };
    node.metrics()
        .ceremonies
        .get_or_create(&vec![
            ("role".to_string(), role.to_string()),
            ("outcome".to_string(), outcome.to_string()),
        ])
        .inc();
}

fn refusal_detail(refusals: &[String]) -> String {
    if refusals.is_empty() {
        String::new()
    } else {
        format!(" ({})", refusals.join("; "))
    }
}

/// Members of the device's current journal.
pub(crate) fn current_members(node: &Node) -> Vec<DeviceId> {
    let d = node.device();
    d.store()
        .maintenance_state(d.namespace())
        .ok()
        .and_then(|s| s.membership().map(|m| m.members.iter().copied().collect()))
        .unwrap_or_default()
}

/// Where `device` listens: the peer book, else the addresses of a running key generation.
fn address_of(node: &Node, device: &DeviceId) -> Option<SocketAddr> {
    node.peer_address(device).or_else(|| {
        lock(&node.maint().dkg)
            .as_ref()
            .and_then(|r| r.address_of(device))
    })
}

/// Sends one message to `to` and returns its reply. Reuses a cached connection (ours or
/// one the peer opened), and dials afresh once if that fails.
pub(crate) async fn send(
    node: &Node,
    to: DeviceId,
    msg: &MaintMessage,
) -> Result<MaintReply, SendError> {
    if node.is_blocked(&to) {
        return Err(SendError::Blocked(to));
    }
    let bytes = msg.to_bytes();
    if let Some(conn) = node.maint().cached(&to) {
        if let Ok(r) = exchange(&conn, to, &bytes).await {
            return Ok(r);
        }
        lock(&node.maint().conns).remove(&to);
    }
    let addr = address_of(node, &to).ok_or(SendError::NoAddress(to))?;
    let unreachable = |detail: String| SendError::Unreachable { device: to, detail };
    let ep_addr = endpoint::endpoint_addr(to, addr).map_err(|e| unreachable(e.to_string()))?;
    let conn = match tokio::time::timeout(
        node.connect_timeout(),
        node.endpoint().connect(ep_addr, MAINT_ALPN),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(unreachable(format!("connect: {e}"))),
        Err(_) => return Err(unreachable("connect: timed out".into())),
    };
    lock(&node.maint().conns).insert(to, conn.clone());
    // The peer answers its own messages over the connection cached for us, which may be
    // this one: serve its streams here as on an accepted connection, or it waits out
    // the stream timeout before dialling back (10 s lost per ceremony or key generation).
    tokio::spawn(accept_streams(node.clone(), to, conn.clone()));
    exchange(&conn, to, &bytes).await
}

async fn exchange(conn: &Connection, to: DeviceId, bytes: &[u8]) -> Result<MaintReply, SendError> {
    let unreachable = |detail: String| SendError::Unreachable { device: to, detail };
    let fut = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| unreachable(format!("open stream: {e}")))?;
        endpoint::write_frame(&mut send, bytes)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = send.finish();
        let reply = endpoint::read_frame(&mut recv, MAX_REPLY_FRAME)
            .await
            .map_err(|e| match e {
                // A peer that closes the connection at the handshake gives its reason.
                FrameError::Closed | FrameError::Io(_) => match conn.close_reason() {
                    Some(r) => unreachable(r.to_string()),
                    None => unreachable(e.to_string()),
                },
                FrameError::Oversized { .. } => SendError::BadReply {
                    device: to,
                    detail: e.to_string(),
                },
            })?;
        from_canonical::<MaintReply>(&reply).map_err(|e| SendError::BadReply {
            device: to,
            detail: e.to_string(),
        })
    };
    tokio::time::timeout(STREAM_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(unreachable("no reply in time".into())))
}

/// Whether a `tend/maint/1` connection from `peer` is admitted: a current member, a
/// configured peer, or a device named in the key generation this device takes part in.
fn admits(node: &Node, peer: &DeviceId) -> bool {
    if current_members(node).contains(peer) {
        return true;
    }
    if lock(&node.maint().dkg)
        .as_ref()
        .is_some_and(|r| r.names(peer))
    {
        return true;
    }
    crate::dkg::is_configured_peer(node, peer)
}

/// Serves one incoming `tend/maint/1` connection (the node's accept loop hands it over).
pub(crate) async fn serve(node: Node, conn: Connection) {
    let peer = endpoint::device_of(conn.remote_id());
    if !blocking(|| admits(&node, &peer)) {
        node.maint()
            .counters
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        node.metrics().refuse("maint_not_member");
        conn.close(
            endpoint::code(close_code::NOT_MEMBER),
            b"not a member of this authority",
        );
        return;
    }
    // Lets this node answer a peer whose address it does not know.
    lock(&node.maint().conns)
        .entry(peer)
        .or_insert_with(|| conn.clone());
    accept_streams(node, peer, conn).await;
}

/// Handles the streams `peer` opens on a `tend/maint/1` connection, whichever side
/// dialled it; each message is checked as it arrives ([`receive`]).
async fn accept_streams(node: Node, peer: DeviceId, conn: Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let node = node.clone();
        tokio::spawn(async move { handle_stream(node, peer, send, recv).await });
    }
}

async fn handle_stream(node: Node, peer: DeviceId, mut send: SendStream, mut recv: RecvStream) {
    let bytes = match tokio::time::timeout(
        STREAM_TIMEOUT,
        endpoint::read_frame(&mut recv, MAX_MAINT_FRAME),
    )
    .await
    {
        Ok(Ok(b)) => Some(b),
        Ok(Err(FrameError::Oversized { .. })) => None,
        _ => return,
    };
    let reply = match bytes.as_deref().map(MaintMessage::from_bytes) {
        None => MaintReply::refused("message too large"),
        Some(Err(e)) => MaintReply::refused(format!("malformed message: {e}")),
        Some(Ok(msg)) => receive(&node, peer, msg).await,
    };
    if let MaintReply::Refused { reason } = &reply {
        node.maint()
            .counters
            .refused_messages
            .fetch_add(1, Ordering::Relaxed);
        node.metrics().refuse("maint_refused");
        tracing::debug!("refused a maintenance message from {peer}: {reason}");
    }
    let _ = endpoint::write_frame(&mut send, &to_canonical(&reply)).await;
    let _ = send.finish();
    // Let the reply reach the peer before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

async fn receive(node: &Node, peer: DeviceId, msg: MaintMessage) -> MaintReply {
    match msg {
        MaintMessage::Ceremony(bytes) => {
            if !current_members(node).contains(&peer) {
                return MaintReply::refused("not a member of this authority");
            }
            let maint = node.maint();
            maint
                .counters
                .ceremony_messages
                .fetch_add(1, Ordering::Relaxed);
            let input = CeremonyInput::Message {
                from: peer,
                bytes: bytes.into_vec(),
            };
            let outputs = match blocking(|| maint.step(node, input)) {
                Ok(o) => o,
                Err(e) => return MaintReply::refused(format!("cannot read the journal: {e}")),
            };
            let ignored = outputs.iter().find_map(|o| match o {
                CeremonyOutput::Event(CeremonyEvent::Ignored { from, reason }) if *from == peer => {
                    Some(reason.clone())
                }
                _ => None,
            });
            maint.carry_out(node, outputs);
            match ignored {
                Some(reason) => MaintReply::Refused { reason },
                None => MaintReply::Accepted,
            }
        }
        other => crate::dkg::receive(node, peer, other).await,
    }
}

/// Ticks the engine, expires key generations, and runs the automatic snapshot trigger.
pub(crate) async fn timer_loop(node: Node) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let maint = node.maint();
        match blocking(|| maint.step(&node, CeremonyInput::Tick)) {
            Ok(outputs) => maint.carry_out(&node, outputs),
            Err(e) => tracing::warn!("ceremony tick: {e}"),
        }
        crate::dkg::expire(&node);
        maybe_trigger(&node);
    }
}

/// The automatic snapshot rule: only the admin of the current journal proposes (so at most
/// one device proposes at a time, and every device can tell which), only when its engine is
/// idle and no key generation runs, at most every [`TRIGGER_EVERY`].
fn maybe_trigger(node: &Node) {
    let maint = node.maint();
    let Some(trigger) = lock(&maint.trigger).clone() else {
        return;
    };
    {
        let mut last = lock(&maint.last_trigger);
        if last.is_some_and(|t| t.elapsed() < TRIGGER_EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    if !lock(&maint.engine).is_idle() || lock(&maint.dkg).is_some() {
        return;
    }
    let device = node.device();
    let ns = device.namespace();
    let Ok(state) = blocking(|| device.store().maintenance_state(ns)) else {
        return;
    };
    if !state.is_admin_at(&node.device_id(), state.current_epoch()) {
        return;
    }
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(target) = blocking(|| (trigger.0)(device.store(), ns, now_secs)) else {
        return;
    };
    let node = node.clone();
    tokio::spawn(async move {
        match node
            .propose_snapshot(Some(target), DEFAULT_CEREMONY_TIMEOUT)
            .await
        {
            Ok(c) => tracing::info!("automatic snapshot at epoch {}", c.snapshot.epoch),
            Err(e) => tracing::info!("automatic snapshot at epoch {target}: {e}"),
        }
    });
}

impl Node {
    /// Runs a snapshot ceremony coordinated by this device over the network, for every
    /// fact below `target` (default: the current epoch + 1), and returns the completed
    /// snapshot; fails on refusals, abort or `timeout`. A ceremony aborted by an identity
    /// epoch advance is retried under the new key and keeps this call waiting.
    pub async fn propose_snapshot(
        &self,
        target: Option<Epoch>,
        timeout: Duration,
    ) -> Result<SnapshotCompleted, CeremonyError> {
        // Members sign only a prefix they hold exactly as the proposer does. A fact written
        // just before the proposal (a metadata advertisement, say) can still be in flight:
        // members then refuse with a digest mismatch, and after another sync round a new
        // proposal (at a new target, since a member votes once per target) succeeds.
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            self.sync_now().await;
            match self.propose_once(target, timeout).await {
                Err(CeremonyError::Aborted(why))
                    if target.is_none() && attempt < ATTEMPTS && why.contains("DigestMismatch") =>
                {
                    attempt += 1;
                    tracing::info!(
                        "snapshot proposal refused ({why}); syncing and proposing again"
                    );
                }
                other => return other,
            }
        }
    }

    async fn propose_once(
        &self,
        target: Option<Epoch>,
        timeout: Duration,
    ) -> Result<SnapshotCompleted, CeremonyError> {
        let device = self.device();
        let target = match target {
            Some(t) => t,
            None => blocking(|| device.store().maintenance_state(device.namespace()))?
                .current_epoch()
                .next(),
        };
        let maint = self.maint();
        let input = CeremonyInput::Propose {
            target_epoch: target,
            timeout_ms: timeout.as_millis() as u64,
        };
        let outputs = blocking(|| maint.step(self, input))?;
        let mut proposal = None;
        for o in &outputs {
            match o {
                CeremonyOutput::Event(CeremonyEvent::Proposed { proposal_id, .. }) => {
                    proposal = Some(*proposal_id)
                }
                CeremonyOutput::Event(CeremonyEvent::ProposalRejected { reason, .. }) => {
                    let reason = format!("{reason:?}");
                    maint.carry_out(self, outputs);
                    return Err(CeremonyError::Rejected(reason));
                }
                _ => {}
            }
        }
        let Some(id) = proposal else {
            maint.carry_out(self, outputs);
            return Err(CeremonyError::Rejected("the engine did not propose".into()));
        };
        let (tx, rx) = oneshot::channel();
        lock(&maint.waiters).insert(
            id,
            Waiter {
                tx,
                refusals: Vec::new(),
            },
        );
        maint.carry_out(self, outputs);
        // The engine's own deadline ends the wait; the grace covers a retry's new one.
        let secs = timeout.as_secs();
        match tokio::time::timeout(timeout * 2 + Duration::from_secs(1), rx).await {
            Ok(Ok(Ok(c))) => Ok(c),
            Ok(Ok(Err(CeremonyError::TimedOut { detail, .. }))) => {
                Err(CeremonyError::TimedOut { secs, detail })
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(CeremonyError::Stopped),
            Err(_) => {
                // Our receiver is gone: drop its waiter, whatever proposal id it moved to.
                lock(&maint.waiters).retain(|_, w| !w.tx.is_closed());
                Err(CeremonyError::TimedOut {
                    secs,
                    detail: String::new(),
                })
            }
        }
    }

    /// Counters of the maintenance protocol.
    pub fn maint_stats(&self) -> MaintStats {
        self.maint().stats()
    }

    /// Whether this node's ceremony engine has no open session.
    pub fn ceremony_idle(&self) -> bool {
        lock(&self.maint().engine).is_idle()
    }

    /// Proposals this node coordinates right now.
    pub fn open_ceremonies(&self) -> Vec<Hash32> {
        lock(&self.maint().engine).open_proposals()
    }

    /// Sets the automatic snapshot trigger (called on the node's timer; acted on only
    /// while this device is the admin).
    pub fn set_snapshot_trigger(&self, trigger: SnapshotTrigger) {
        *lock(&self.maint().trigger) = Some(trigger);
    }

    /// Sends one raw maintenance message to `to` (tests of the refusal rules).
    pub async fn send_maint(
        &self,
        to: DeviceId,
        msg: &MaintMessage,
    ) -> Result<MaintReply, SendError> {
        send(self, to, msg).await
    }
}
