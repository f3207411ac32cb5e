//! The maintenance protocol `tend/maint/1` below snapshot ceremonies ([`crate::ceremony`])
//! and key generation ([`crate::dkg`]): its messages and replies, the state a node keeps
//! for it, sending a message over a cached connection, admitting and serving incoming
//! connections, and `MaintHandle`, all that either module is handed of the node.
//!
//! The wire (see [`crate::ceremony`] for the protocol): every message travels on its own
//! bidirectional QUIC stream as one frame holding a [`MaintMessage`], at most
//! [`MAX_MAINT_FRAME`] bytes; the receiver answers with one frame holding a
//! [`MaintReply`]. A connection is admitted only from a current member, a configured peer
//! or a device named in the key generation this device takes part in.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{
    DeviceId, Epoch, GroupKey, Hash32, JournalNamespace, MaintenanceEpoch, VerifiedFact,
};
use tend_crypto::dkg::{DkgMessage, DkgParticipant, DkgSession};
use tend_crypto::KeyShare;
use tend_snapshot::{Refusal, SnapshotEngine};
use tend_store::{Store, StoreError};
use tokio::sync::oneshot;

use crate::device::Device;
use crate::discovery::PeerAddr;
use crate::endpoint::{self, close_code, FrameError, MAINT_ALPN};
use crate::metrics::Metrics;

/// Largest message frame accepted (a join message carries the authority's facts).
pub const MAX_MAINT_FRAME: usize = 4 << 20;
/// Largest reply frame accepted.
const MAX_REPLY_FRAME: usize = 64 * 1024;
/// How long a sender waits for a reply, and a receiver for a message.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Coordinator to a member of its ceremony: the facts it wrote on completing it (the
    /// `SnapshotCompleted`, and the tombstone of the blob it supersedes), then its
    /// `Closed { completed: true }` for the member (the bytes of a `CeremonyMessage`),
    /// handled once the facts are in: the member holds the completion without a sync
    /// session. A member that refuses it (a node of an older release cannot decode it)
    /// is sent the `Closed` alone, and fetches the completion when it arrives, as before.
    Completion {
        facts: Vec<ByteBuf>,
        closed: ByteBuf,
    },
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
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("the snapshot proposal was rejected: {0}")]
    Rejected(String),
    #[error("the snapshot ceremony timed out after {secs} s{detail}")]
    TimedOut { secs: u64, detail: String },
    #[error("the snapshot ceremony was aborted: {why}")]
    Aborted {
        why: String,
        /// Whether a member refused because its prefix differs from the proposer's (a
        /// fact still in flight, say): worth another sync and proposal.
        prefix_differs: bool,
    },
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
    /// Messages this node could not deliver (peer blocked, no address, unreachable).
    #[serde(default)]
    pub undelivered: u64,
}

/// The counters behind [`MaintStats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) refused_connections: AtomicU64,
    pub(crate) refused_messages: AtomicU64,
    pub(crate) ceremony_messages: AtomicU64,
    pub(crate) dkg_messages: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) undelivered: AtomicU64,
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

/// A proposer waiting for its ceremony to end.
pub(crate) struct Waiter {
    pub(crate) tx: oneshot::Sender<Result<SnapshotCompleted, CeremonyError>>,
    pub(crate) refusals: Vec<(DeviceId, Refusal)>,
}

/// One key generation this device takes part in ([`crate::dkg`] runs it; sending and
/// admission read its members and addresses).
pub(crate) struct DkgRun {
    pub(crate) session: DkgSession,
    pub(crate) id: Hash32,
    pub(crate) admin: DeviceId,
    pub(crate) addrs: HashMap<DeviceId, SocketAddr>,
    pub(crate) participant: Option<DkgParticipant>,
    /// Round messages that arrived before `DkgStart`.
    pub(crate) early: Vec<DkgMessage>,
    pub(crate) share: Option<KeyShare>,
    /// Group keys the members reported, with their maintenance epochs (on the admin).
    pub(crate) finished: BTreeMap<DeviceId, (GroupKey, Option<MaintenanceEpoch>)>,
    pub(crate) failed: Option<String>,
    pub(crate) deadline: Instant,
}

impl DkgRun {
    /// A run of `session` led by `admin`, nothing received yet, forgotten after `deadline`.
    pub(crate) fn new(
        session: DkgSession,
        admin: DeviceId,
        addrs: HashMap<DeviceId, SocketAddr>,
        deadline: Instant,
    ) -> Self {
        Self {
            id: session.id(),
            session,
            admin,
            addrs,
            participant: None,
            early: Vec::new(),
            share: None,
            finished: BTreeMap::new(),
            failed: None,
            deadline,
        }
    }

    /// Where member `d` listens, as the admin announced.
    pub(crate) fn address_of(&self, d: &DeviceId) -> Option<SocketAddr> {
        self.addrs.get(d).copied()
    }

    /// Whether `d` is named in the session.
    pub(crate) fn names(&self, d: &DeviceId) -> bool {
        self.session.members.contains(d)
    }
}

/// The maintenance state a node holds: its ceremony engine, waiting proposers, cached
/// connections, the key generation it takes part in, and counters.
pub struct Maint {
    pub(crate) engine: Mutex<SnapshotEngine>,
    /// Whether the votes kept in the store were handed to the engine (at its first step).
    pub(crate) votes_restored: Mutex<bool>,
    /// The (identity epoch, group key) whose key the engine holds.
    pub(crate) installed: Mutex<Option<(u64, GroupKey)>>,
    pub(crate) waiters: Mutex<HashMap<Hash32, Waiter>>,
    conns: Mutex<HashMap<DeviceId, Connection>>,
    pub(crate) dkg: Mutex<Option<DkgRun>>,
    pub(crate) counters: Counters,
    pub(crate) trigger: Mutex<Option<SnapshotTrigger>>,
    pub(crate) last_trigger: Mutex<Option<Instant>>,
    pub(crate) start: Instant,
}

impl std::fmt::Debug for Maint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maint").finish_non_exhaustive()
    }
}

impl Maint {
    /// The state of a node for device `me`.
    pub(crate) fn new(me: DeviceId) -> Self {
        Self {
            engine: Mutex::new(SnapshotEngine::new(me)),
            votes_restored: Mutex::new(false),
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

    /// Counters of the maintenance protocol.
    pub(crate) fn stats(&self) -> MaintStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MaintStats {
            refused_connections: g(&c.refused_connections),
            refused_messages: g(&c.refused_messages),
            ceremony_messages: g(&c.ceremony_messages),
            dkg_messages: g(&c.dkg_messages),
            ignored: g(&c.ignored),
            completed: g(&c.completed),
            undelivered: g(&c.undelivered),
        }
    }

    pub(crate) fn count_dkg_message(&self) {
        self.counters.dkg_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the ceremony engine has no open session.
    pub(crate) fn ceremony_idle(&self) -> bool {
        lock(&self.engine).is_idle()
    }

    /// Proposals the engine coordinates right now.
    pub(crate) fn open_ceremonies(&self) -> Vec<Hash32> {
        lock(&self.engine).open_proposals()
    }

    /// Sets the automatic snapshot trigger.
    pub(crate) fn set_trigger(&self, trigger: SnapshotTrigger) {
        *lock(&self.trigger) = Some(trigger);
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

/// What the maintenance protocol asks of the node it runs in. The node implements it and
/// routes received messages to the ceremony engine or the key generation.
pub(crate) trait MaintHost: Send + Sync {
    /// The known direct address of `device`, if any.
    fn peer_address(&self, device: &DeviceId) -> Option<SocketAddr>;
    /// Whether `device` is blocked by this node.
    fn is_blocked(&self, device: &DeviceId) -> bool;
    /// Adds (or moves) a sync peer and persists it.
    fn add_peer(&self, peer: PeerAddr) -> Result<(), StoreError>;
    /// Tells running sessions about a store write (and pushes it to peers).
    fn after_local_write(&self);
    /// Runs one sync round.
    fn sync_now(&self) -> BoxFuture<'static, ()>;
    /// Runs one sync session with `device`, if its address is known.
    fn sync_with(&self, device: DeviceId) -> BoxFuture<'static, ()>;
    /// Handles one message from the authenticated `peer`.
    fn receive(&self, peer: DeviceId, msg: MaintMessage) -> BoxFuture<'static, MaintReply>;
    /// Admits facts a peer sent outside a session, as a session's facts are admitted
    /// (checked against the reduced state, a newer snapshot with its blob's facts), and
    /// writes them in one transaction. Blocks on the store.
    fn admit_facts(&self, facts: Vec<VerifiedFact>) -> Result<(), String>;
}

/// All that snapshot ceremonies and key generation are handed of the running node: its
/// device, endpoint, metrics and maintenance state, where it listens, how long to wait for
/// a connection, and the [`MaintHost`] for the rest. Cloning is cheap.
#[derive(Clone)]
pub(crate) struct MaintHandle {
    pub(crate) device: Arc<Device>,
    pub(crate) endpoint: Endpoint,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) maint: Arc<Maint>,
    /// The address the endpoint listens on.
    pub(crate) listen: SocketAddr,
    /// Give up connecting to a peer after this long.
    pub(crate) connect_timeout: Duration,
    pub(crate) node: Arc<dyn MaintHost>,
}

impl MaintHandle {
    /// This device's id.
    pub(crate) fn device_id(&self) -> DeviceId {
        self.device.device_id()
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

/// Decodes and verifies facts a maintenance message carries, every one of journal `ns`;
/// the refusal to answer with otherwise.
pub(crate) fn decode_facts(
    facts: &[ByteBuf],
    ns: JournalNamespace,
) -> Result<Vec<VerifiedFact>, MaintReply> {
    facts
        .iter()
        .map(|f| match VerifiedFact::decode(f) {
            Ok(v) if v.namespace() == ns => Ok(v),
            Ok(_) => Err(MaintReply::refused("a fact of another journal")),
            Err(e) => Err(MaintReply::refused(format!("bad fact: {e}"))),
        })
        .collect()
}

/// Members of the device's current journal.
pub(crate) fn current_members(h: &MaintHandle) -> Vec<DeviceId> {
    let d = &h.device;
    d.store()
        .maintenance_state(d.namespace())
        .ok()
        .and_then(|s| s.membership().map(|m| m.members.iter().copied().collect()))
        .unwrap_or_default()
}

/// Where `device` listens: the peer book, else the addresses of a running key generation.
fn address_of(h: &MaintHandle, device: &DeviceId) -> Option<SocketAddr> {
    h.node.peer_address(device).or_else(|| {
        lock(&h.maint.dkg)
            .as_ref()
            .and_then(|r| r.address_of(device))
    })
}

/// Sends one message to `to` and returns its reply. Reuses a cached connection (ours or
/// one the peer opened), and dials afresh once if that fails.
pub(crate) async fn send(
    h: &MaintHandle,
    to: DeviceId,
    msg: &MaintMessage,
) -> Result<MaintReply, SendError> {
    let sent = deliver(h, to, msg).await;
    if sent.is_err() {
        h.maint.counters.undelivered.fetch_add(1, Ordering::Relaxed);
    }
    sent
}

async fn deliver(
    h: &MaintHandle,
    to: DeviceId,
    msg: &MaintMessage,
) -> Result<MaintReply, SendError> {
    if h.node.is_blocked(&to) {
        return Err(SendError::Blocked(to));
    }
    let bytes = msg.to_bytes();
    if let Some(conn) = h.maint.cached(&to) {
        if let Ok(r) = exchange(&conn, to, &bytes).await {
            return Ok(r);
        }
        lock(&h.maint.conns).remove(&to);
    }
    let addr = address_of(h, &to).ok_or(SendError::NoAddress(to))?;
    let unreachable = |detail: String| SendError::Unreachable { device: to, detail };
    let ep_addr = endpoint::endpoint_addr(to, addr).map_err(|e| unreachable(e.to_string()))?;
    let conn = match tokio::time::timeout(
        h.connect_timeout,
        h.endpoint.connect(ep_addr, MAINT_ALPN),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(unreachable(format!("connect: {e}"))),
        Err(_) => return Err(unreachable("connect: timed out".into())),
    };
    lock(&h.maint.conns).insert(to, conn.clone());
    // The peer answers its own messages over the connection cached for us, which may be
    // this one: serve its streams here as on an accepted connection, or it waits out
    // the stream timeout before dialling back (10 s lost per ceremony or key generation).
    tokio::spawn(accept_streams(h.clone(), to, conn.clone()));
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
fn admits(h: &MaintHandle, peer: &DeviceId) -> bool {
    if current_members(h).contains(peer) {
        return true;
    }
    if lock(&h.maint.dkg).as_ref().is_some_and(|r| r.names(peer)) {
        return true;
    }
    crate::discovery::is_configured_peer(h.device.store(), peer)
}

/// Serves one incoming `tend/maint/1` connection (the node's accept loop hands it over).
pub(crate) async fn serve(h: MaintHandle, conn: Connection) {
    let peer = endpoint::device_of(conn.remote_id());
    if !blocking(|| admits(&h, &peer)) {
        h.maint
            .counters
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        h.metrics.refuse("maint_not_member");
        conn.close(
            endpoint::code(close_code::NOT_MEMBER),
            b"not a member of this authority",
        );
        return;
    }
    // Lets this node answer a peer whose address it does not know.
    lock(&h.maint.conns)
        .entry(peer)
        .or_insert_with(|| conn.clone());
    accept_streams(h, peer, conn).await;
}

/// Handles the streams `peer` opens on a `tend/maint/1` connection, whichever side
/// dialled it; each message is checked as it arrives ([`receive`]).
async fn accept_streams(h: MaintHandle, peer: DeviceId, conn: Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let h = h.clone();
        tokio::spawn(async move { handle_stream(h, peer, send, recv).await });
    }
}

async fn handle_stream(h: MaintHandle, peer: DeviceId, mut send: SendStream, mut recv: RecvStream) {
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
        Some(Ok(msg)) => h.node.receive(peer, msg).await,
    };
    if let MaintReply::Refused { reason } = &reply {
        h.maint
            .counters
            .refused_messages
            .fetch_add(1, Ordering::Relaxed);
        h.metrics.refuse("maint_refused");
        tracing::debug!("refused a maintenance message from {peer}: {reason}");
    }
    let _ = endpoint::write_frame(&mut send, &to_canonical(&reply)).await;
    let _ = send.finish();
    // Let the reply reach the peer before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}
