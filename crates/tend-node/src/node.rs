//! The running device: an iroh endpoint, the sync driver (periodic rounds, incoming
//! sessions) that moves tend-sync's session state machines over QUIC streams, the
//! control socket and the metrics endpoint.
//!
//! Sessions are owned by one [`SessionManager`] behind a mutex; each session has a driver
//! task that owns the stream's send half and one channel on which it receives, in order,
//! frames read by a reader task, frames the state machine wants sent, and the session's
//! end. Incoming facts are checked against the reduced state and buffered while the
//! state machine runs, then written with one `insert_batch` per message, so a batch of 512
//! facts costs one redb commit, not 512.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::Endpoint;
use serde::{Deserialize, Serialize};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{
    ContentId, DeviceId, Epoch, FactId, Hash32, JournalNamespace, MaintenanceState, Payload,
    ProtocolVersion, VerifiedFact,
};
use tend_replica::Admission;
use tend_store::{Store, StoreError};
use tend_sync::{
    AbortReason, FactHost, FailReason, FenceStatus, LocalView, ManagerAction, ManagerConfig,
    ManagerError, MemItems, MessageError, Outcome, PeerConfig, PeerManager, PeerStatus,
    RefuseReason, SessionId, SessionManager, SessionResult, SessionStats, SharedItems, SyncItem,
    SyncMessage,
};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::device::{Device, DeviceError};

mod autogc;
use crate::ceremony::{self, CeremonyError, MaintStats, SnapshotTrigger};
use crate::control::{self, BackupExporter, Failure, RunningDevice};
use crate::discovery::{self, AddressSource, DiscoveryHost, PeerAddr, StaticPeers};
use crate::dkg::{self, DkgNetError};
use crate::endpoint::{self, close_code, FrameError};
use crate::fleet::AuthorityCreated;
use crate::maint::{self, Maint, MaintHandle, MaintHost, MaintMessage, MaintReply, SendError};
use crate::metrics::Metrics;
use crate::peer_table::{PeerTableError, STRANGER_TRUST};
use crate::replica::{DeviceReplica, SessionIndex};
use crate::upgrade;

pub use crate::status::{NodeStatus, PeerInfo, PeerOutcome, RoundReport};

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where the endpoint listens (loopback in tests and devnets).
    pub listen: SocketAddr,
    /// Static peers (`--peer`); they are also persisted in the store's `peers` setting.
    pub peers: Vec<PeerAddr>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Time between sync rounds.
    pub sync_interval: Duration,
    /// Push on write: a local write starts a round at once instead of waiting for the
    /// next one (see `round_loop`). Off only where every session is started by hand.
    pub push_on_write: bool,
    /// Peers contacted per round.
    pub fanout: usize,
    /// Immediate retries of a session aborted because an identity epoch advanced.
    pub epoch_retries: u32,
    /// Give up connecting to a peer after this long.
    pub connect_timeout: Duration,
    /// Whether to serve the control socket in the home.
    pub control_socket: bool,
    /// Session limits, session tunables (frame and batch sizes) and rate limits.
    pub manager: ManagerConfig,
    /// Peer selection.
    pub peer: PeerConfig,
    /// Largest blob this device serves or fetches.
    pub max_blob_bytes: u64,
    /// Drive upgrades: advertise `DeviceMetadata` at start, and after rounds that brought
    /// facts or blobs run the upgrade pipeline when an install command is configured.
    pub upgrades: bool,
    /// A rendezvous server to publish this device's address to and resolve members from.
    pub rendezvous: Option<discovery::rendezvous::RendezvousConfig>,
    /// Local-network discovery: announce on, and learn members from, a multicast group.
    pub local_discovery: Option<discovery::local::LocalConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let manager = ManagerConfig {
            // Two devices may open sessions to each other at the same moment; a second
            // slot per peer keeps that from being refused as busy.
            max_per_peer: 2,
            // Rate limits are on: both ways, per peer and for the device (`tend run`
            // flags change them).
            rate: tend_sync::RateConfig::device_default(),
            ..ManagerConfig::default()
        };
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            metrics: None,
            sync_interval: Duration::from_secs(10),
            push_on_write: true,
            fanout: 3,
            epoch_retries: 3,
            connect_timeout: Duration::from_secs(5),
            control_socket: true,
            manager,
            peer: PeerConfig {
                max_sessions_per_peer: 2,
                ..PeerConfig::default()
            },
            max_blob_bytes: crate::blobs::DEFAULT_MAX_BLOB_BYTES,
            upgrades: true,
            rendezvous: None,
            local_discovery: None,
        }
    }
}

/// Why the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    LocalDiscovery(#[from] discovery::local::LocalError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Events a session's driver task handles, in order.
enum Ev {
    /// A frame from the peer (or why reading stopped), with its place in the read-ahead
    /// ([`READ_AHEAD_FRAMES`]), given back when the driver drops it after handling.
    Incoming(Result<Vec<u8>, FrameError>, OwnedSemaphorePermit),
    /// A frame to send.
    Send(Vec<u8>),
    /// The session ended.
    Closed(Outcome),
}

/// Known peers: scores from tend-sync's [`PeerManager`], addresses beside them.
struct PeerBook {
    manager: PeerManager,
    addrs: HashMap<DeviceId, SocketAddr>,
    blocked: HashSet<DeviceId>,
    /// Unreachable peers are skipped until the time given, with a doubling backoff, so a
    /// device that is away does not cost every round a connect timeout.
    backoff: HashMap<DeviceId, (Instant, Duration)>,
}

/// First and longest wait before retrying an unreachable peer.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The items sessions were last given ([`Inner::session_inputs`]), with what they were
/// read at: the changes feed's last sequence number, the floor, and the store's count of
/// removing commits ([`tend_store::Store::removals`]).
#[derive(Clone)]
struct ItemsCache {
    /// The journal they are of: a device that joins an authority changes journal.
    namespace: JournalNamespace,
    change: u64,
    floor: Epoch,
    removals: u64,
    items: Arc<MemItems>,
}

/// Up to this many admissions since the items were read are merged into them from the
/// changes feed; more (a catch-up) are read afresh from the index.
const FOLLOWED_CHANGES: u64 = 100_000;

/// The longest the peer table goes without a durable write of its own
/// ([`Inner::persist_peers`]).
const PEERS_DURABLE_EVERY: Duration = Duration::from_secs(30);

struct Inner {
    device: Arc<Device>,
    /// Snapshot ceremonies and key generation over `tend/maint/1`.
    maint: Arc<Maint>,
    config: NodeConfig,
    endpoint: Endpoint,
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    metrics_addr: Mutex<Option<SocketAddr>>,
    manager: Mutex<SessionManager>,
    routes: Mutex<HashMap<SessionId, mpsc::UnboundedSender<Ev>>>,
    peers: Mutex<PeerBook>,
    sources: Mutex<Vec<Box<dyn AddressSource>>>,
    /// The item lists handed to sessions that are still held (by a session or the cache):
    /// `load_fact` finds a fact's epoch in them (the store has no index by id alone). A
    /// peer asks only for facts it was offered, so these are enough, and memory follows
    /// the running sessions rather than every id this node ever offered or received.
    offered: Mutex<Vec<Weak<MemItems>>>,
    /// The items the last session was given: sessions reuse them until a fact is admitted
    /// (every admission appends a change) or the floor moves, and then bring them up to
    /// date from the changes feed, instead of reading a million items each.
    items_cache: Mutex<Option<ItemsCache>>,
    /// When the peer table was last written durably.
    peers_durable_at: Mutex<Option<Instant>>,
    /// The identity epoch sessions were last told about.
    identity_epoch: AtomicU64,
    /// Each peer's GC floor (latest verified snapshot epoch) as of its last handshake:
    /// the next session reconciles only items at or above the higher of both floors.
    peer_floors: Mutex<HashMap<DeviceId, Epoch>>,
    /// Initiated sessions whose `Accept` (carrying the peer's floor) has not arrived.
    awaiting_accept: Mutex<HashMap<SessionId, DeviceId>>,
    /// Blobs of snapshot completions held back because this device has not seen the
    /// snapshot's state facts (see [`tend_replica::Admission`]); the next round fetches them.
    held_snapshots: Mutex<HashSet<ContentId>>,
    /// Blobs of held-back completions that no peer holds: their completion is admitted
    /// without them rather than never.
    unavailable_snapshots: Mutex<HashSet<ContentId>>,
    /// Whether an upgrade pipeline run is in progress (one at a time).
    applying: Arc<AtomicBool>,
    /// Facts stored from sessions either way; rounds compare it with `facts_seen` to know
    /// whether anything arrived since the last one (responder sessions included).
    facts_stored: AtomicU64,
    facts_seen: AtomicU64,
    next_wake: Mutex<Option<Duration>>,
    wake: Notify,
    /// Raised by every local write: the round loop runs a pushed round soon after (see
    /// [`round_loop`]). A `Notify` keeps one permit, so writes made while a round runs
    /// ask for exactly one more round, however many they are.
    push: Notify,
    round: tokio::sync::Mutex<()>,
    /// Numbers the rounds: a round's sessions are one group of the session manager, which
    /// asks for each missing fact once between them.
    rounds: AtomicU64,
    start: Instant,
    closing: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    control_path: Mutex<Option<PathBuf>>,
    /// The `backup_export` plug-in, if `tend run` installed one.
    backup_exporter: Mutex<Option<BackupExporter>>,
    /// Automatic GC: the latest snapshot epoch collected (or settled) so far, and whether
    /// a collection is running.
    auto_gc: autogc::AutoGc,
}

/// Locks a mutex, recovering from poisoning: every critical section leaves the data
/// consistent, so a panicked holder does not make it unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running device. Cloning gives another handle to the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("device", &self.inner.device.device_id())
            .field("listen", &self.inner.listen)
            .finish()
    }
}

/// What `tend run` prints when the node is up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartInfo {
    /// The device id (hex).
    pub device_id: String,
    /// The endpoint's address.
    pub listen_addr: String,
    /// The metrics endpoint's address, if serving.
    pub metrics_addr: Option<String>,
    /// The control socket's path, if serving.
    pub control_socket: Option<String>,
}

impl Node {
    /// Starts a node over an open device: binds the endpoint, starts accepting sessions,
    /// the sync timer, and (as configured) the metrics endpoint and control socket.
    pub async fn start(device: Device, config: NodeConfig) -> Result<Node, NodeError> {
        Self::start_shared(Arc::new(device), config).await
    }

    /// [`Node::start`] over a device the caller keeps using (the `tend` library crate
    /// holds it across starts and stops of its node).
    pub async fn start_shared(device: Arc<Device>, config: NodeConfig) -> Result<Node, NodeError> {
        crate::blobs::remove_stale_scratch(device.store().path());
        let endpoint = bind_endpoint(&device, config.listen).await?;
        let listen = endpoint::local_addr(&endpoint).unwrap_or(config.listen);
        let namespace = device.namespace();
        let state = device.store().maintenance_state(namespace)?;
        let mut peer_manager = PeerManager::new(config.peer);
        // Scores, statuses and operator settings of earlier runs.
        for (d, record) in crate::peer_table::load(device.store())? {
            if d != device.device_id() {
                peer_manager.restore(d, crate::peer_table::role_trust(&state, &d), &record);
            }
        }
        let mut addrs = HashMap::new();
        let persisted = discovery::load_peers(device.store())?;
        discovery::remember_peers(device.store(), &config.peers)?;
        for p in persisted.iter().chain(&config.peers) {
            if p.device != device.device_id() {
                peer_manager.add(p.device, crate::peer_table::role_trust(&state, &p.device));
                addrs.insert(p.device, p.addr);
            }
        }
        let sources: Vec<Box<dyn AddressSource>> =
            vec![Box::new(StaticPeers(config.peers.clone()))];
        let inner = Arc::new(Inner {
            maint: Arc::new(Maint::new(device.device_id())),
            config: config.clone(),
            endpoint,
            listen,
            metrics: Arc::new(Metrics::new()),
            metrics_addr: Mutex::new(None),
            manager: Mutex::new(SessionManager::new(config.manager.clone())),
            routes: Mutex::new(HashMap::new()),
            peers: Mutex::new(PeerBook {
                manager: peer_manager,
                addrs,
                blocked: HashSet::new(),
                backoff: HashMap::new(),
            }),
            sources: Mutex::new(sources),
            offered: Mutex::new(Vec::new()),
            items_cache: Mutex::new(None),
            peers_durable_at: Mutex::new(None),
            identity_epoch: AtomicU64::new(state.identity_epoch()),
            peer_floors: Mutex::new(HashMap::new()),
            awaiting_accept: Mutex::new(HashMap::new()),
            held_snapshots: Mutex::new(HashSet::new()),
            unavailable_snapshots: Mutex::new(HashSet::new()),
            applying: Arc::new(AtomicBool::new(false)),
            facts_stored: AtomicU64::new(0),
            facts_seen: AtomicU64::new(0),
            next_wake: Mutex::new(None),
            wake: Notify::new(),
            push: Notify::new(),
            round: tokio::sync::Mutex::new(()),
            rounds: AtomicU64::new(0),
            start: Instant::now(),
            closing: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            control_path: Mutex::new(None),
            backup_exporter: Mutex::new(None),
            auto_gc: autogc::AutoGc::load(&device),
            device,
        });
        let node = Node { inner };
        if config.upgrades {
            // Peers and the admin's readiness check read the running version from here.
            if let Err(e) = blocking(|| upgrade::advertise(&node.inner.device)) {
                tracing::warn!("cannot advertise device metadata: {e}");
            }
        }
        if let Some(r) = &config.rendezvous {
            discovery::rendezvous::attach(&node, r.clone());
        }
        if let Some(l) = &config.local_discovery {
            discovery::local::attach(&node, l.clone())?;
        }
        node.inner.update_score_gauges();
        let mut tasks = vec![
            tokio::spawn(accept_loop(node.inner.clone())),
            tokio::spawn(timer_loop(node.inner.clone())),
            tokio::spawn(round_loop(node.clone())),
            tokio::spawn(ceremony::timer_loop(node.maint_handle())),
        ];
        if let Some(addr) = config.metrics {
            let listener = crate::metrics::bind(addr)
                .await
                .map_err(|source| NodeError::Metrics { addr, source })?;
            *lock(&node.inner.metrics_addr) = listener.local_addr().ok();
            let inner = Arc::downgrade(&node.inner);
            let refresh = Arc::new(move || {
                if let Some(inner) = inner.upgrade() {
                    inner.refresh_gauges();
                }
            });
            tasks.push(tokio::spawn(crate::metrics::serve(
                listener,
                node.inner.metrics.clone(),
                refresh,
            )));
        }
        if config.control_socket {
            let (path, task) = control::serve(Arc::new(node.clone()))?;
            *lock(&node.inner.control_path) = Some(path);
            tasks.push(task);
        }
        lock(&node.inner.tasks).extend(tasks);
        Ok(node)
    }

    /// The device (its store is shared with the node; redb serialises writes).
    pub fn device(&self) -> &Arc<Device> {
        &self.inner.device
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        self.inner.device.device_id()
    }

    /// The address the endpoint listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// This node as a peer address others can use.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr {
            device: self.device_id(),
            addr: self.inner.listen,
        }
    }

    /// The metrics endpoint's address, if serving.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        *lock(&self.inner.metrics_addr)
    }

    /// The control socket's path, if serving.
    pub fn control_path(&self) -> Option<PathBuf> {
        lock(&self.inner.control_path).clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// What `tend run` prints at start.
    pub fn start_info(&self) -> StartInfo {
        StartInfo {
            device_id: self.device_id().to_string(),
            listen_addr: self.listen_addr().to_string(),
            metrics_addr: self.metrics_addr().map(|a| a.to_string()),
            control_socket: self.control_path().map(|p| p.display().to_string()),
        }
    }

    /// Adds a peer address source (local discovery, rendezvous), asked every round.
    pub fn add_source(&self, source: Box<dyn AddressSource>) {
        lock(&self.inner.sources).push(source);
    }

    /// Adds (or moves) a peer and persists it in the `peers` setting.
    pub fn add_peer(&self, peer: PeerAddr) -> Result<(), NodeError> {
        self.inner.learn(&[peer]);
        discovery::remember_peers(self.inner.device.store(), &[peer])?;
        Ok(())
    }

    /// Blocks a peer: no sessions with it either way until unblocked.
    pub fn block_peer(&self, device: DeviceId) {
        lock(&self.inner.peers).blocked.insert(device);
    }

    /// Lifts a block.
    pub fn unblock_peer(&self, device: &DeviceId) {
        lock(&self.inner.peers).blocked.remove(device);
    }

    /// The operator's trust for a peer (`None`: back to its role's) or a ban (`Some(true)`)
    /// or unban, persisted in the peer table. A banned peer gets no session either way.
    pub fn edit_peer(
        &self,
        device: DeviceId,
        trust: Option<Option<f64>>,
        banned: Option<bool>,
    ) -> Result<PeerInfo, PeerTableError> {
        let state = self.inner.state()?;
        {
            let mut book = lock(&self.inner.peers);
            book.manager
                .add(device, crate::peer_table::role_trust(&state, &device));
            crate::peer_table::edit(&mut book.manager, &device, trust, banned)?;
            crate::peer_table::save(self.inner.store(), &book.manager)?;
        }
        self.inner
            .peer_infos()
            .into_iter()
            .find(|p| p.device_id == device.to_string())
            .ok_or(PeerTableError::UnknownPeer(device))
    }

    /// What snapshot ceremonies and key generation are handed of this node.
    fn maint_handle(&self) -> MaintHandle {
        MaintHandle {
            device: self.inner.device.clone(),
            endpoint: self.inner.endpoint.clone(),
            metrics: self.inner.metrics.clone(),
            maint: self.inner.maint.clone(),
            listen: self.inner.listen,
            connect_timeout: self.inner.config.connect_timeout,
            node: Arc::new(self.clone()),
        }
    }

    /// Runs a snapshot ceremony coordinated by this device over the network, for every
    /// fact below `target` (default: the current epoch + 1), and returns the completed
    /// snapshot; fails on refusals, abort or `timeout`. A ceremony aborted by an identity
    /// epoch advance is retried under the new key and keeps this call waiting.
    pub async fn propose_snapshot(
        &self,
        target: Option<Epoch>,
        timeout: Duration,
    ) -> Result<SnapshotCompleted, CeremonyError> {
        ceremony::propose_snapshot(&self.maint_handle(), target, timeout).await
    }

    /// Counters of the maintenance protocol.
    pub fn maint_stats(&self) -> MaintStats {
        self.inner.maint.stats()
    }

    /// Whether this node's ceremony engine has no open session.
    pub fn ceremony_idle(&self) -> bool {
        self.inner.maint.ceremony_idle()
    }

    /// Proposals this node coordinates right now.
    pub fn open_ceremonies(&self) -> Vec<Hash32> {
        self.inner.maint.open_ceremonies()
    }

    /// Sets the automatic snapshot trigger (called on the node's timer; acted on only
    /// while this device is the admin).
    pub fn set_snapshot_trigger(&self, trigger: SnapshotTrigger) {
        self.inner.maint.set_trigger(trigger);
    }

    /// Sends one raw maintenance message to `to` (tests of the refusal rules).
    pub async fn send_maint(
        &self,
        to: DeviceId,
        msg: &MaintMessage,
    ) -> Result<MaintReply, SendError> {
        maint::send(&self.maint_handle(), to, msg).await
    }

    /// Makes this device's authority a `threshold`-of-N authority of this device and
    /// `members` by a DKG over the network (see [`crate::dkg`]). Every member must be
    /// running and reachable at a known address; each saves its own share in its own home.
    /// Returns what the admin wrote.
    ///
    /// Every member of this journal must be at this device's maintenance epoch, so it
    /// syncs first; a run that fails because a participant is (or, when it finished, was)
    /// at another epoch (a snapshot completed meanwhile) syncs and runs again until
    /// `timeout` has passed. More than one round may be needed: a member that lacks a
    /// snapshot's blob holds the completion back until its own next round fetched the blob.
    pub async fn create_authority(
        &self,
        threshold: u16,
        members: &[DeviceId],
        timeout: Duration,
    ) -> Result<AuthorityCreated, DkgNetError> {
        dkg::create_authority(&self.maint_handle(), threshold, members, timeout).await
    }

    /// Tells running sessions about a store write made outside [`Node::append`].
    pub fn after_local_write(&self) {
        self.inner.after_local_write();
    }

    /// Known peers, with scores.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.inner.peer_infos()
    }

    /// The node's status.
    pub fn status(&self) -> Result<NodeStatus, NodeError> {
        let journal = self.inner.device.status()?;
        let state = self.inner.state()?;
        let peers = self.peers();
        Ok(NodeStatus {
            device_id: self.device_id().to_string(),
            listen_addr: self.listen_addr().to_string(),
            metrics_addr: self.metrics_addr().map(|a| a.to_string()),
            namespace: self.inner.namespace().to_string(),
            identity_epoch: state.identity_epoch(),
            last_sync_unix_ms: peers.iter().filter_map(|p| p.last_sync_unix_ms).max(),
            peers,
            journal,
        })
    }

    /// Appends a fact (signed at the current epoch). A membership change aborts the
    /// sessions running under the old identity epoch at once.
    pub fn append(&self, payload: Payload) -> Result<VerifiedFact, NodeError> {
        let fact = self.inner.device.append(payload)?;
        self.inner.after_local_write();
        Ok(fact)
    }

    /// Appends an application fact.
    pub fn add_fact(&self, kind: &str, data: &[u8]) -> Result<VerifiedFact, NodeError> {
        let fact = self.inner.device.add_application_fact(kind, data)?;
        self.inner.after_local_write();
        Ok(fact)
    }

    /// Carries out a data request (put, delete, log append or trim, cache put, a batch,
    /// or a read) on the running device; after a write, running sessions hear of it and a
    /// pushed round takes it to peers at once.
    pub fn data(
        &self,
        request: crate::data::DataRequest,
    ) -> Result<crate::data::DataResponse, DeviceError> {
        let write = request.is_write();
        let r = crate::data::run(&self.inner.device, request);
        if write {
            self.inner.after_local_write();
        }
        r
    }

    /// Runs one sync round now: picks peers by score, syncs with each (retrying sessions
    /// aborted by an epoch change), and returns every session's outcome.
    pub async fn sync_now(&self) -> RoundReport {
        let inner = self.inner.clone();
        let _round = inner.round.lock().await;
        let peers = inner.select_peers();
        let group = inner.rounds.fetch_add(1, Ordering::SeqCst);
        // Staggered: each peer's session starts when the one before has ended, or after
        // `ROUND_STAGGER` if it is still running. The next then reconciles against a
        // journal that already holds what the one before brought (at 8 and 20 devices
        // this took the fleet's sync bytes from 4.7-5.6 to 3.8 MB and from 44-45 to
        // 35 MB, BENCHMARKS), while a slow or dead peer delays the others by the
        // stagger at most. Sessions still running together share their wants (`group`).
        let mut outcomes: Vec<Option<PeerOutcome>> = Vec::new();
        let mut running: Vec<(usize, JoinHandle<PeerOutcome>)> = Vec::new();
        for peer in peers {
            if let Some((slot, mut last)) = running.pop() {
                match tokio::time::timeout(ROUND_STAGGER, &mut last).await {
                    Ok(outcome) => outcomes[slot] = outcome.ok(),
                    Err(_) => running.push((slot, last)),
                }
            }
            let inner = inner.clone();
            running.push((
                outcomes.len(),
                tokio::spawn(async move { sync_peer(inner, peer, Some(group)).await }),
            ));
            outcomes.push(None);
        }
        for (slot, h) in running {
            outcomes[slot] = h.await.ok();
        }
        let mut report = RoundReport::default();
        report.sessions.extend(outcomes.into_iter().flatten());
        let fetched = self.fetch_missing_blobs(&report).await;
        let stored = inner.facts_stored.load(Ordering::SeqCst);
        let arrived = inner.facts_seen.swap(stored, Ordering::SeqCst) != stored;
        if arrived || fetched > 0 {
            self.after_new_data();
        }
        inner.update_score_gauges();
        report
    }

    /// Fetches blobs the reduced state references and the store lacks from the peers of
    /// a round (those whose session completed first). Returns how many were stored.
    async fn fetch_missing_blobs(&self, round: &RoundReport) -> u64 {
        let inner = &self.inner;
        let mut wanted = match inner
            .state()
            .and_then(|st| crate::blobs::wanted(inner.store(), &st))
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot list missing blobs: {e}");
                return 0;
            }
        };
        // Blobs of completions held back until their state facts can come with them.
        let held: Vec<ContentId> = lock(&inner.held_snapshots).iter().copied().collect();
        for cid in &held {
            if !wanted.iter().any(|w| w.cid == *cid) {
                wanted.push(crate::blobs::Wanted {
                    cid: *cid,
                    size: None,
                });
            }
        }
        let mut sessions: Vec<&PeerOutcome> = round.sessions.iter().collect();
        sessions.sort_by_key(|s| !s.ok);
        let mut fetched = 0;
        // Per held blob: how many peers said they do not hold it.
        let mut missing: HashMap<ContentId, usize> = HashMap::new();
        let mut asked = 0;
        for s in sessions {
            if wanted.is_empty() {
                break;
            }
            let (Ok(device), Ok(addr)) = (s.peer.parse::<DeviceId>(), s.addr.parse()) else {
                continue;
            };
            let report = self.fetch_blobs(PeerAddr { device, addr }, &wanted).await;
            asked += 1;
            for cid in &report.missing {
                *missing.entry(*cid).or_default() += 1;
            }
            fetched += report.fetched.len() as u64;
            wanted.retain(|w| !report.fetched.contains(&w.cid));
        }
        let mut held_set = lock(&inner.held_snapshots);
        for cid in held {
            if !wanted.iter().any(|w| w.cid == cid) {
                // Fetched: the completion is taken with its state facts next session.
                held_set.remove(&cid);
            } else if asked > 0 && missing.get(&cid) == Some(&asked) {
                // Every peer asked lacks it (tombstoned or lost): admit the completion
                // alone rather than never learn the snapshot.
                tracing::warn!("no peer holds snapshot blob {cid}: taking its completion alone");
                held_set.remove(&cid);
                lock(&inner.unavailable_snapshots).insert(cid);
            }
        }
        drop(held_set);
        // An item blob settling waits for that every peer asked lacks: every member has
        // settled and dropped it, and settling takes its fallback.
        let store = inner.store();
        if let Ok(Some(want)) = store.get_setting::<String>(crate::replica::ITEM_BLOB_WANTED) {
            let gone = wanted
                .iter()
                .find(|w| w.cid.to_string() == want)
                .map(|w| w.cid);
            if let Some(cid) = gone.filter(|cid| asked > 0 && missing.get(cid) == Some(&asked)) {
                tracing::warn!("no peer holds item blob {cid}: settling without it");
                if let Err(e) = store.put_setting(crate::replica::ITEM_BLOB_UNAVAILABLE, &want) {
                    tracing::warn!("cannot record the missing item blob: {e}");
                }
                self.after_new_data();
            }
        }
        fetched
    }

    /// Fetches `wanted` blobs from `peer`, verifying each against its CID before storing
    /// it; a peer that sends bytes not matching the CID is demoted like a misbehaving
    /// sync peer.
    pub async fn fetch_blobs(
        &self,
        peer: PeerAddr,
        wanted: &[crate::blobs::Wanted],
    ) -> crate::blobs::FetchReport {
        fetch_blobs(&self.inner, peer, wanted).await
    }

    /// After a round brought facts or blobs: tells sessions about new epochs, advertises
    /// a changed running version, and runs the upgrade pipeline off the async threads
    /// when an install command is configured (one run at a time).
    fn after_new_data(&self) {
        let inner = &self.inner;
        match blocking(|| crate::reissue::reissue_uncovered(&inner.device)) {
            Ok(r) if !r.facts.is_empty() => {
                tracing::info!(
                    "re-issued {} facts not covered by the snapshot",
                    r.facts.len()
                );
                inner.after_local_write();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot re-issue uncovered facts: {e}"),
        }
        if !inner.config.upgrades {
            return;
        }
        let command = match upgrade::install_command(&inner.device) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read the install command: {e}");
                None
            }
        };
        let Some(command) = command else {
            if let Err(e) = blocking(|| upgrade::advertise(&inner.device)) {
                tracing::warn!("cannot advertise device metadata: {e}");
            }
            return;
        };
        if inner.applying.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let device = node.inner.device.clone();
            let mut installer = upgrade::CommandInstaller {
                command,
                home: device.home().to_owned(),
                timeout: Duration::from_secs(300),
            };
            match upgrade::apply(
                &device,
                device.store(),
                &mut installer,
                &upgrade::ApplyOptions::default(),
            ) {
                Ok(r) if r.has_failures() => {
                    tracing::warn!("upgrade pipeline: {r:?}");
                    node.metrics()
                        .count_outcome(&node.metrics().upgrade_runs, "failed");
                }
                Ok(_) => node
                    .metrics()
                    .count_outcome(&node.metrics().upgrade_runs, "ok"),
                Err(e) => {
                    tracing::warn!("upgrade pipeline failed: {e}");
                    node.metrics()
                        .count_outcome(&node.metrics().upgrade_runs, "failed");
                }
            }
            node.inner.after_local_write();
            node.inner.applying.store(false, Ordering::SeqCst);
        });
    }

    /// Installs the exporter `backup_export` requests run (tend-node does not depend on
    /// tend-backup; `tend run` provides it).
    pub fn set_backup_exporter(&self, exporter: BackupExporter) {
        *lock(&self.inner.backup_exporter) = Some(exporter);
    }

    /// The installed backup exporter, if any.
    pub fn backup_exporter(&self) -> Option<BackupExporter> {
        lock(&self.inner.backup_exporter).clone()
    }

    /// Whether an upgrade pipeline run is in progress.
    pub fn upgrade_running(&self) -> bool {
        self.inner.applying.load(Ordering::SeqCst)
    }

    /// `tend gc` while the node runs: [`Device::gc`] off the async workers.
    pub fn gc(&self, dry_run: bool) -> Result<crate::device::GcReport, NodeError> {
        Ok(blocking(|| self.inner.device.gc(dry_run))?)
    }

    /// Syncs with one given peer now (adding it if unknown).
    pub async fn sync_with(&self, peer: PeerAddr) -> PeerOutcome {
        self.inner.learn(&[peer]);
        sync_peer(self.inner.clone(), peer, None).await
    }

    /// Stops: closes sessions and the endpoint, stops every task, removes the control
    /// socket.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let now = inner.now();
        let actions = {
            let mut m = inner.lock_sessions();
            let ids: Vec<SessionId> = lock(&inner.routes).keys().copied().collect();
            let mut out = Vec::new();
            for id in ids {
                out.extend(m.close(now, id));
            }
            out
        };
        inner.dispatch(actions);
        for t in lock(&inner.tasks).drain(..) {
            t.abort();
        }
        let records = lock(&inner.peers).manager.records();
        if let Err(e) = crate::peer_table::save_records(inner.store(), records, true) {
            tracing::warn!("cannot persist the peer table: {e}");
        }
        // An automatic GC in progress holds the store: let it finish, so the store can be
        // reopened once this returns.
        inner.auto_gc.idle(Duration::from_secs(60)).await;
        let closing = inner.endpoint.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        if let Some(path) = lock(&inner.control_path).take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl DiscoveryHost for Node {
    fn device(&self) -> &Arc<Device> {
        Node::device(self)
    }

    fn listen_addr(&self) -> SocketAddr {
        Node::listen_addr(self)
    }

    fn metrics(&self) -> &Metrics {
        Node::metrics(self)
    }

    fn add_source(&self, source: Box<dyn AddressSource>) {
        Node::add_source(self, source)
    }
}

impl RunningDevice for Node {
    fn device(&self) -> &Arc<Device> {
        Node::device(self)
    }

    fn metrics(&self) -> &Metrics {
        Node::metrics(self)
    }

    fn status(&self) -> Result<NodeStatus, Failure> {
        Ok(Node::status(self)?)
    }

    fn peers(&self) -> Vec<PeerInfo> {
        Node::peers(self)
    }

    fn edit_peer(
        &self,
        device: DeviceId,
        trust: Option<Option<f64>>,
        banned: Option<bool>,
    ) -> Result<PeerInfo, PeerTableError> {
        Node::edit_peer(self, device, trust, banned)
    }

    fn sync_now(&self) -> BoxFuture<'_, RoundReport> {
        Box::pin(Node::sync_now(self))
    }

    fn add_fact(&self, kind: &str, data: &[u8]) -> Result<VerifiedFact, Failure> {
        Ok(Node::add_fact(self, kind, data)?)
    }

    fn propose_snapshot(
        &self,
        target: Option<Epoch>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<SnapshotCompleted, CeremonyError>> {
        Box::pin(Node::propose_snapshot(self, target, timeout))
    }

    fn create_authority<'a>(
        &'a self,
        threshold: u16,
        members: &'a [DeviceId],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<AuthorityCreated, DkgNetError>> {
        Box::pin(Node::create_authority(self, threshold, members, timeout))
    }

    fn gc(&self, dry_run: bool) -> Result<crate::device::GcReport, Failure> {
        Ok(Node::gc(self, dry_run)?)
    }

    fn upgrade_running(&self) -> bool {
        Node::upgrade_running(self)
    }

    fn after_local_write(&self) {
        Node::after_local_write(self)
    }

    fn backup_exporter(&self) -> Option<BackupExporter> {
        Node::backup_exporter(self)
    }
}

impl MaintHost for Node {
    fn peer_address(&self, device: &DeviceId) -> Option<SocketAddr> {
        lock(&self.inner.peers).addrs.get(device).copied()
    }

    fn is_blocked(&self, device: &DeviceId) -> bool {
        lock(&self.inner.peers).blocked.contains(device)
    }

    fn add_peer(&self, peer: PeerAddr) -> Result<(), StoreError> {
        self.inner.learn(&[peer]);
        discovery::remember_peers(self.inner.device.store(), &[peer])
    }

    fn after_local_write(&self) {
        self.inner.after_local_write();
    }

    fn sync_now(&self) -> BoxFuture<'static, ()> {
        let node = self.clone();
        Box::pin(async move {
            node.sync_now().await;
        })
    }

    fn sync_with(&self, device: DeviceId) -> BoxFuture<'static, ()> {
        let (inner, addr) = (self.inner.clone(), self.peer_address(&device));
        Box::pin(async move {
            if let Some(addr) = addr {
                sync_peer(inner, PeerAddr { device, addr }, None).await;
            }
        })
    }

    fn receive(&self, peer: DeviceId, msg: MaintMessage) -> BoxFuture<'static, MaintReply> {
        let h = self.maint_handle();
        Box::pin(async move { ceremony::receive(&h, peer, msg).await })
    }

    fn admit_facts(&self, facts: Vec<VerifiedFact>) -> Result<(), String> {
        self.inner.admit_pushed(facts)
    }
}

/// Opens the device in `home`, runs a node until SIGINT or SIGTERM, then shuts it down.
/// `on_start` is called once the node is up (to print its id and address).
pub fn run_blocking(
    home: &Path,
    config: NodeConfig,
    on_start: impl FnOnce(&Node),
) -> Result<(), NodeError> {
    let device = Device::open(home)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    rt.block_on(async move {
        let node = Node::start(device, config).await?;
        // Listening before the start is announced: a SIGTERM right after it stops the
        // device cleanly instead of killing it.
        let stop = crate::signal::stop_requested();
        on_start(&node);
        stop.await;
        node.shutdown().await;
        Ok(())
    })
}

impl SessionIndex for Inner {
    fn epoch_of(&self, id: &FactId) -> Option<Epoch> {
        let offered = lock(&self.offered);
        // Newest first: the current cache holds nearly every fact a peer asks for.
        offered
            .iter()
            .rev()
            .filter_map(Weak::upgrade)
            .find_map(|items| items.epoch_of(id))
    }

    fn blob_unavailable(&self, cid: &ContentId) -> bool {
        lock(&self.unavailable_snapshots).contains(cid)
    }

    fn fetch_blob(&self, cid: &ContentId) {
        lock(&self.held_snapshots).insert(*cid);
    }

    fn store_facts(&self, facts: &[VerifiedFact]) -> bool {
        self.store_received(facts)
    }
}

impl Inner {
    /// The session manager, locked. Its holder may be waiting for the store's writer lock
    /// (a frame's facts being written while GC prunes), so a caller that finds it taken
    /// waits as a blocking call: on an async worker the runtime hands that worker's other
    /// tasks to another thread rather than stall with it.
    fn lock_sessions(&self) -> MutexGuard<'_, SessionManager> {
        match self.manager.try_lock() {
            Ok(m) => m,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => blocking(|| lock(&self.manager)),
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The journal the node synchronises: the device's current one, which changes when
    /// the device joins an authority (key generation over the network).
    fn namespace(&self) -> JournalNamespace {
        self.device.namespace()
    }

    fn store(&self) -> &Store {
        self.device.store()
    }

    fn state(&self) -> Result<MaintenanceState, StoreError> {
        self.store().maintenance_state(self.namespace())
    }

    /// Members of the current membership; empty before the device knows its journal.
    fn members(&self) -> BTreeSet<DeviceId> {
        self.state()
            .ok()
            .and_then(|s| s.membership().map(|m| m.members.clone()))
            .unwrap_or_default()
    }

    fn learn(&self, peers: &[PeerAddr]) {
        let me = self.device.device_id();
        let state = self.state().ok();
        let mut book = lock(&self.peers);
        for p in peers {
            if p.device == me {
                continue;
            }
            let trust = state.as_ref().map_or(STRANGER_TRUST, |s| {
                crate::peer_table::role_trust(s, &p.device)
            });
            book.manager.add(p.device, trust);
            if book.addrs.insert(p.device, p.addr) != Some(p.addr) {
                // A new address is worth trying at once, even for a peer gone offline
                // at the old one (sources repeat known addresses every round: those
                // change nothing).
                book.backoff.remove(&p.device);
                if book.manager.get(&p.device).map(|m| m.status) == Some(PeerStatus::Offline) {
                    book.manager.set_status(&p.device, PeerStatus::Online);
                }
            }
        }
    }

    /// Peers for a round: the best-scored that have an address, are not blocked, and are
    /// members (any configured peer while this device does not know its membership yet).
    fn select_peers(&self) -> Vec<PeerAddr> {
        let mut learned = Vec::new();
        for s in lock(&self.sources).iter() {
            learned.extend(s.peers());
        }
        self.learn(&learned);
        // Learned addresses outlive this run (it writes only when something changed).
        if let Err(e) = discovery::remember_peers(self.store(), &learned) {
            tracing::warn!("cannot persist peers: {e}");
        }
        let members = self.members();
        let state = self.state().ok();
        let mut book = lock(&self.peers);
        if let Some(state) = &state {
            // Roles change with the membership and admin replacements.
            let known: Vec<DeviceId> = book.manager.iter().map(|p| p.device_id).collect();
            for d in known {
                book.manager
                    .set_role_trust(&d, crate::peer_table::role_trust(state, &d));
            }
        }
        // Offline peers come back as probes once their interval has passed.
        let candidates = book.manager.select_at(usize::MAX, self.now());
        let now = Instant::now();
        candidates
            .into_iter()
            .filter(|d| !book.blocked.contains(d))
            .filter(|d| book.backoff.get(d).is_none_or(|(until, _)| *until <= now))
            .filter(|d| members.is_empty() || members.contains(d))
            .filter_map(|d| {
                book.addrs.get(&d).map(|a| PeerAddr {
                    device: d,
                    addr: *a,
                })
            })
            .take(self.config.fanout.max(1))
            .collect()
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let book = lock(&self.peers);
        let max = self.config.peer.max_sessions_per_peer;
        book.manager
            .iter()
            .map(|p| PeerInfo {
                device_id: p.device_id.to_string(),
                addr: book.addrs.get(&p.device_id).map(|a| a.to_string()),
                status: format!("{:?}", p.status).to_lowercase(),
                trust: p.trust_level,
                successful_syncs: p.successful_syncs,
                failed_syncs: p.failed_syncs,
                active_sessions: p.active_sessions,
                score: p.score(max),
                blocked: book.blocked.contains(&p.device_id),
                operator_trust: p.operator_trust,
                misbehaviours: p.misbehaviours,
                consecutive_failures: p.consecutive_failures,
                last_sync_unix_ms: p.last_sync_unix_ms,
            })
            .collect()
    }

    fn update_score_gauges(&self) {
        for p in self.peer_infos() {
            self.metrics.set_score(&p.device_id, p.score);
        }
    }

    /// Reads the gauges a scrape reports from the store and the peer table.
    fn refresh_gauges(&self) {
        let m = &self.metrics;
        let ns = self.namespace();
        let store = self.store();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Ok(Some(stats)) = store.stats(ns) {
            m.journal_facts.set(gauge(stats.facts));
        }
        if let Ok(app) = store.app_state(ns) {
            m.live_keys.set(gauge(app.live_keys() as u64));
            m.log_entries.set(gauge(app.log_len() as u64));
        }
        if let Ok(meta) = std::fs::metadata(store.path()) {
            m.store_bytes.set(gauge(meta.len()));
        }
        if let Ok(state) = self.state() {
            m.identity_epoch.set(gauge(state.identity_epoch()));
            m.snapshot_epoch.set(gauge(state.snapshot_epoch().0));
        }
        for p in self.peer_infos() {
            if let Some(ms) = p.last_sync_unix_ms {
                m.peer_last_sync
                    .get_or_create(&vec![("peer".to_string(), p.device_id.clone())])
                    .set(ms as f64 / 1000.0);
            }
        }
    }

    /// The handshake view and the item snapshot a new session reconciles against.
    /// Items are those at or above the higher of our GC floor (latest verified snapshot)
    /// and the peer's, when known: below it the snapshot covers the facts, and a pruned
    /// device no longer has them.
    fn session_inputs(
        &self,
        peer_floor: Option<Epoch>,
    ) -> Result<(LocalView, SharedItems), StoreError> {
        let state = self.state()?;
        let floor = state
            .snapshot_epoch()
            .max(peer_floor.unwrap_or(Epoch::ZERO));
        let running = upgrade::running_version(&self.device, &state).unwrap_or_else(|e| {
            tracing::warn!("cannot read the running version: {e}");
            ProtocolVersion::CURRENT
        });
        let local = LocalView {
            device: self.device.device_id(),
            namespace: self.namespace(),
            protocol: running,
            epoch: state.maintenance_epoch(),
            fence: FenceStatus::from_state(&state, state.current_epoch(), running),
        };
        // Read before the items: a fact admitted or removed in between makes the key
        // stale, never the items.
        let (removals, highest_removed) = self.store().removals(self.namespace());
        let change = self.store().last_change()?;
        let cached = lock(&self.items_cache).clone();
        let started = Instant::now();
        let namespace = self.namespace();
        let items = match cached.filter(|c| c.namespace == namespace) {
            Some(c) if (c.change, c.floor, c.removals) == (change, floor, removals) => {
                return Ok((local, c.items));
            }
            // What was removed since is all below the floor (pruning and settling remove
            // only below the latest snapshot), so the items from the floor on are the
            // ones read plus those the changes feed lists since.
            Some(c)
                if floor >= c.floor
                    && (c.removals == removals || highest_removed.is_none_or(|h| h < floor))
                    && change - c.change <= FOLLOWED_CHANGES =>
            {
                self.follow_changes(&c.items, c.change, change, floor)?
            }
            _ => {
                let mut items = Vec::new();
                for item in self.store().items(namespace, floor..)? {
                    let (epoch, id) = item?;
                    items.push(SyncItem { epoch, id });
                }
                MemItems::from_sorted(namespace, items)
            }
        };
        let items = Arc::new(items);
        tracing::debug!(
            "{} items for sessions in {:?}",
            items.as_slice().len(),
            started.elapsed()
        );
        {
            let mut offered = lock(&self.offered);
            offered.retain(|o| o.strong_count() > 0);
            offered.push(Arc::downgrade(&items));
        }
        *lock(&self.items_cache) = Some(ItemsCache {
            namespace,
            change,
            floor,
            removals,
            items: items.clone(),
        });
        Ok((local, items))
    }

    /// `items` (read when the changes feed was at `from`) from `floor` on, with the facts
    /// of this journal at or above `floor` admitted after `from` up to at least `to`.
    fn follow_changes(
        &self,
        items: &MemItems,
        from: u64,
        to: u64,
        floor: Epoch,
    ) -> Result<MemItems, StoreError> {
        let ns = tend_sync::OrderedItems::namespace(items);
        let kept = items.as_slice();
        let kept = &kept[kept.partition_point(|i| i.epoch < floor)..];
        let mut all = Vec::with_capacity(kept.len() + (to - from) as usize);
        all.extend_from_slice(kept);
        let mut after = from;
        while after < to {
            let page = self.store().changes_since(after, 4096)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            all.extend(
                page.iter()
                    .filter(|c| c.namespace == ns && c.epoch >= floor)
                    .map(|c| SyncItem {
                        epoch: c.epoch,
                        id: c.id,
                    }),
            );
        }
        // A sorted run and a short unsorted tail: the stable sort merges them in one pass.
        all.sort();
        all.dedup();
        Ok(MemItems::from_sorted(ns, all))
    }

    /// The store as a session's state machine admits into it ([`tend_replica::Admission`]).
    fn replica(&self) -> DeviceReplica<'_> {
        DeviceReplica::in_session(&self.device, self)
    }

    /// Writes the facts a state machine admitted, adopts the snapshot they brought, then
    /// aborts sessions whose identity epoch is now stale. Returns the manager's resulting
    /// actions.
    fn flush(
        &self,
        host: Admission<'_, DeviceReplica<'_>>,
        m: &mut SessionManager,
    ) -> Vec<ManagerAction> {
        let (facts, adopted) = host.finish();
        if self.store_received(&facts) {
            if let Some(adopted) = adopted {
                if let Err(e) = tend_replica::adopt(&mut self.replica(), &adopted) {
                    tracing::warn!(
                        "cannot drop facts the snapshot at {} does not cover: {e}",
                        adopted.epoch
                    );
                }
            }
        }
        self.check_rules(m)
    }

    /// Writes admitted facts in one transaction; whether any were given and written.
    fn store_received(&self, facts: &[VerifiedFact]) -> bool {
        if facts.is_empty() {
            return false;
        }
        match self.store().insert_batch(facts) {
            Ok(report) => {
                self.facts_stored
                    .fetch_add(report.inserted, Ordering::SeqCst);
                for r in &report.rejected {
                    self.metrics.reject(r.error.reason(), 1);
                }
                true
            }
            Err(e) => {
                tracing::warn!("cannot store received facts: {e}");
                self.metrics.reject(e.reason(), facts.len() as u64);
                false
            }
        }
    }

    /// Tells the manager when the store's identity epoch moved past the one sessions run
    /// under (DESIGN rule 9).
    fn check_epoch(&self, m: &mut SessionManager) -> Vec<ManagerAction> {
        let Ok(state) = self.state() else {
            return Vec::new();
        };
        let e = state.identity_epoch();
        if e > self.identity_epoch.fetch_max(e, Ordering::SeqCst) {
            m.identity_epoch_advanced(self.now(), self.namespace(), e)
        } else {
            Vec::new()
        }
    }

    /// The rules that bind on running sessions, checked after every batch written, every
    /// local write and every timer tick (250 ms): the identity epoch (rule 9), the
    /// activation fences (rule 7), and the GC policy after a new verified snapshot.
    fn check_rules(&self, m: &mut SessionManager) -> Vec<ManagerAction> {
        let mut actions = self.check_epoch(m);
        if let Ok(state) = self.state() {
            actions.extend(self.check_fences(m, &state));
            if !self.closing.load(Ordering::SeqCst) {
                self.auto_gc.check(&self.device, &self.metrics, &state);
            }
        }
        for (what, n) in m.take_limited() {
            self.metrics.limited(&what, n);
        }
        actions
    }

    /// DESIGN rule 7 while sessions run, not only at the handshake: once an activated
    /// fence is unsatisfied, sessions end with a reason the peer shows. Every session ends
    /// when this device itself is past a fence its running version does not meet; a
    /// responder also ends a session whose initiator announced a version below a fence
    /// this device is past (the check `respond` makes at the handshake). An initiator
    /// does not judge its responder's version, as at the handshake: a device that has not
    /// seen the activation learns of it by being reached, and then ends the session
    /// itself.
    fn check_fences(&self, m: &mut SessionManager, state: &MaintenanceState) -> Vec<ManagerAction> {
        if m.active() == 0 || state.active_fence().is_none() {
            return Vec::new();
        }
        let running = match upgrade::running_version(&self.device, state) {
            Ok(running) => Some(running),
            Err(e) => {
                tracing::warn!("cannot read the running version: {e}");
                None
            }
        };
        let metrics = &self.metrics;
        m.abort_where(self.now(), |s| {
            let reason = tend_replica::fence_abort(state, running, s)?;
            metrics.fence_abort(match reason {
                AbortReason::PeerFenceNotSatisfied { .. } => "peer",
                _ => "local",
            });
            Some(reason)
        })
    }

    fn after_local_write(&self) {
        let actions = {
            let mut m = self.lock_sessions();
            self.check_rules(&mut m)
        };
        self.dispatch(actions);
        // Push on write: peers get the write now rather than at their next round. Facts
        // that arrive from peers never come through here, so they push nothing back.
        if self.config.push_on_write {
            self.push.notify_one();
        }
    }

    /// Waits until the incoming rate limits admit a frame of `len` bytes from `peer`. The
    /// reader of that stream waits meanwhile, so the transport's flow control slows the
    /// sender down.
    async fn pace_incoming(&self, peer: DeviceId, len: usize) {
        let mut ticket = tend_sync::InboundTicket::default();
        let mut waited = Duration::ZERO;
        loop {
            let now = self.now();
            let admit = {
                let mut m = self.lock_sessions();
                let admit = m.admit_incoming(peer, len, now, &mut ticket);
                for (what, n) in m.take_limited() {
                    self.metrics.limited(&what, n);
                }
                admit
            };
            match admit {
                tend_sync::Admit::Now => break,
                tend_sync::Admit::RetryAt(t) => {
                    let wait = t.saturating_sub(now).max(Duration::from_millis(1));
                    waited += wait;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if !waited.is_zero() {
            self.metrics
                .rate_limit_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
    }

    /// A frame arrived for session `sid`.
    fn handle(&self, sid: SessionId, bytes: &[u8]) {
        /// Frames slower than this to handle are logged (debug): the session lock is held.
        const SLOW_FRAME: Duration = Duration::from_millis(100);
        let initiated = lock(&self.awaiting_accept).remove(&sid);
        if let Some(peer) = initiated {
            // The first answer of an initiated session: note the peer's GC floor.
            if let Ok(SyncMessage::Accept(a)) =
                SyncMessage::decode(bytes, self.config.manager.session.max_message_bytes)
            {
                lock(&self.peer_floors).insert(peer, a.epoch.snapshot_epoch);
            }
        }
        let now = self.now();
        let started = Instant::now();
        let (mut locked, mut handled) = (Duration::ZERO, Duration::ZERO);
        let actions = self.admitting(|m, host| {
            locked = started.elapsed();
            let actions = m.handle(now, sid, bytes, host);
            handled = started.elapsed();
            actions
        });
        if started.elapsed() > SLOW_FRAME {
            tracing::debug!(
                "a frame of session {sid:?} took {:?}: {locked:?} waiting for the session lock, {:?} checking and admitting, {:?} writing",
                started.elapsed(),
                handled - locked,
                started.elapsed() - handled
            );
        }
        self.dispatch(actions);
    }

    /// Runs `admit` with the session manager, locked, and an admission into the store,
    /// then writes what was admitted ([`Inner::flush`]). Returns the manager's actions, to
    /// dispatch once the lock is released.
    fn admitting(
        &self,
        admit: impl FnOnce(
            &mut SessionManager,
            &mut Admission<'_, DeviceReplica<'_>>,
        ) -> Vec<ManagerAction>,
    ) -> Vec<ManagerAction> {
        let mut m = self.lock_sessions();
        let mut replica = self.replica();
        let mut host = Admission::new(&mut replica);
        let mut actions = admit(&mut m, &mut host);
        actions.extend(self.flush(host, &mut m));
        actions
    }

    /// Admits facts a peer sent outside a session (a ceremony's completion) as a frame's
    /// facts are: under the session lock, through the same admission, in one write. The
    /// first refusal is returned once the rest are written.
    fn admit_pushed(&self, facts: Vec<VerifiedFact>) -> Result<(), String> {
        let mut refused = None;
        let actions = self.admitting(|_, host| {
            for f in facts {
                if let Err(e) = host.admit(f) {
                    refused.get_or_insert(e.to_string());
                }
            }
            Vec::new()
        });
        self.dispatch(actions);
        refused.map_or(Ok(()), Err)
    }

    /// Timers of every session.
    fn poll(&self) {
        let now = self.now();
        let actions = self.admitting(|m, host| m.poll(now, host));
        self.dispatch(actions);
    }

    /// Ends session `sid` from our side.
    fn close(&self, sid: SessionId) {
        let now = self.now();
        let actions = self.lock_sessions().close(now, sid);
        self.dispatch(actions);
    }

    /// Carries out the manager's effects: frames and ends go to the sessions' drivers.
    fn dispatch(&self, actions: Vec<ManagerAction>) {
        for a in actions {
            match a {
                ManagerAction::Send { session, bytes, .. } => {
                    if let Some(tx) = lock(&self.routes).get(&session) {
                        let _ = tx.send(Ev::Send(bytes));
                    }
                }
                ManagerAction::WakeAt(t) => {
                    let mut w = lock(&self.next_wake);
                    if w.is_none_or(|cur| t < cur) {
                        *w = Some(t);
                        self.wake.notify_one();
                    }
                }
                ManagerAction::Closed {
                    session, outcome, ..
                } => {
                    if let Some(tx) = lock(&self.routes).remove(&session) {
                        let _ = tx.send(Ev::Closed(outcome));
                    }
                }
            }
        }
    }

    /// Books a finished session: peer score, metrics.
    fn record(&self, peer: DeviceId, outcome: &Outcome) {
        let s = &outcome.stats;
        tracing::debug!(
            "session with {peer}: {:?} in {:?}, {} rounds, {} facts sent, {} received",
            outcome.result,
            s.duration,
            s.reconcile_rounds,
            s.facts_sent,
            s.facts_received
        );
        let m = &self.metrics;
        m.sync_latency.observe(s.duration.as_secs_f64());
        m.facts_sent.inc_by(s.facts_sent);
        m.facts_received.inc_by(s.facts_received);
        m.bytes_sent.inc_by(s.bytes_sent);
        m.bytes_received.inc_by(s.bytes_received);
        for (reason, n) in &s.rejected {
            m.reject(reason, *n);
        }
        match &outcome.result {
            SessionResult::Completed => {
                m.sessions_completed.inc();
            }
            SessionResult::Aborted { .. } => {
                m.sessions_aborted.inc();
            }
            SessionResult::Refused { by_peer, reason } => {
                m.sessions_failed.inc();
                if !by_peer {
                    m.refuse(refuse_label(reason));
                }
                if let (true, RefuseReason::RateLimited { retry_after_ms }) = (by_peer, reason) {
                    // The peer asked us to come back later: do not open sessions to it
                    // before then.
                    let wait = Duration::from_millis(*retry_after_ms).min(BACKOFF_MAX);
                    lock(&self.peers)
                        .backoff
                        .insert(peer, (Instant::now() + wait, wait));
                }
            }
            SessionResult::Failed(_) => {
                m.sessions_failed.inc();
            }
        }
        let mut book = lock(&self.peers);
        book.manager.session_ended_at(
            &peer,
            &outcome.result,
            self.now(),
            Some(crate::peer_table::unix_ms_now()),
        );
        if let Some(score) = book.manager.score(&peer) {
            m.set_score(&peer.to_string(), score);
        }
        let records = book.manager.records();
        drop(book);
        self.persist_peers(records);
    }

    /// The trust of `device`'s role in the authority (see [`crate::peer_table`]).
    fn role_trust(&self, device: &DeviceId) -> f64 {
        self.state().map_or(STRANGER_TRUST, |s| {
            crate::peer_table::role_trust(&s, device)
        })
    }

    /// Writes the peer table, so scores, statuses and sync times survive a restart.
    /// Takes the records rather than the book, so the write happens after the peer lock
    /// is released. Sessions end every few seconds, and an fsync each time was a
    /// sizeable part of a busy fleet's work: the table is written durably at most every
    /// [`PEERS_DURABLE_EVERY`] (and at shutdown), and in between it rides on the store's
    /// next durable commit, so a crash loses at most that much of its history.
    fn persist_peers(&self, records: Vec<(DeviceId, tend_sync::PeerRecord)>) {
        let durable = {
            let mut last = lock(&self.peers_durable_at);
            let due = last.is_none_or(|t| t.elapsed() >= PEERS_DURABLE_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if let Err(e) = crate::peer_table::save_records(self.store(), records, durable) {
            tracing::warn!("cannot persist the peer table: {e}");
        }
    }
}

fn refuse_label(r: &tend_sync::RefuseReason) -> &'static str {
    use tend_sync::RefuseReason as R;
    match r {
        R::NotAuthorized => "not_member",
        R::UnknownNamespace(_) => "unknown_namespace",
        R::IncompatibleProtocol { .. } => "protocol",
        R::FenceNotSatisfied { .. } => "fence",
        R::PeerFenceNotSatisfied { .. } => "peer_fence",
        R::Busy => "busy",
        R::RateLimited { .. } => "rate_limited",
    }
}

/// Runs `f`, which writes to the store (redb commits wait for the disk), telling a
/// multi-threaded runtime that this worker blocks so other tasks move elsewhere.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A frame limit a little above the largest message, so an honest peer never hits it.
fn frame_limit(inner: &Inner) -> usize {
    inner.config.manager.session.max_message_bytes + 1024
}

/// Frames a session's reader reads ahead of its driver. Checking a frame's signatures
/// takes longer than receiving it (a catch-up from a fast peer), and without a bound the
/// frames queued for the driver held hundreds of megabytes at a million facts; at the
/// bound the reader stops and QUIC flow control slows the sender.
const READ_AHEAD_FRAMES: usize = 4;

/// Reads `peer`'s frames into the session's channel, each once the incoming rate limits
/// admit it, at most [`READ_AHEAD_FRAMES`] ahead of the driver.
fn spawn_reader(
    inner: Arc<Inner>,
    peer: DeviceId,
    mut recv: RecvStream,
    tx: mpsc::UnboundedSender<Ev>,
    max: usize,
) -> JoinHandle<()> {
    let read_ahead = Arc::new(Semaphore::new(READ_AHEAD_FRAMES));
    tokio::spawn(async move {
        loop {
            // Never closed, so this fails only if the semaphore were dropped: stop reading.
            let Ok(permit) = read_ahead.clone().acquire_owned().await else {
                break;
            };
            let r = endpoint::read_frame(&mut recv, max).await;
            if let Ok(frame) = &r {
                inner.pace_incoming(peer, frame.len()).await;
            }
            let end = r.is_err();
            if tx.send(Ev::Incoming(r, permit)).is_err() || end {
                break;
            }
        }
    })
}

/// Runs one session's I/O until it ends; returns its outcome.
async fn drive(
    inner: &Arc<Inner>,
    sid: SessionId,
    send: &mut SendStream,
    mut rx: mpsc::UnboundedReceiver<Ev>,
) -> Outcome {
    // A framing error is the peer's fault even though the state machine only sees a close.
    let mut misbehaved: Option<FailReason> = None;
    let mut broken = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            // The permit goes back once the frame is handled, letting the reader read on.
            Ev::Incoming(Ok(bytes), _permit) => blocking(|| inner.handle(sid, &bytes)),
            Ev::Incoming(Err(FrameError::Oversized { len, max }), _) => {
                misbehaved = Some(FailReason::Garbage(MessageError::Oversized { len, max }));
                inner.close(sid);
            }
            Ev::Incoming(Err(_), _) => inner.close(sid),
            Ev::Send(bytes) => {
                if !broken && endpoint::write_frame(send, &bytes).await.is_err() {
                    broken = true;
                    inner.close(sid);
                }
            }
            Ev::Closed(mut outcome) => {
                if let Some(reason) = misbehaved {
                    outcome.result = SessionResult::Failed(reason);
                }
                let _ = send.finish();
                return outcome;
            }
        }
    }
    Outcome {
        result: SessionResult::Aborted {
            by_peer: false,
            reason: AbortReason::Closed,
        },
        stats: SessionStats::default(),
    }
}

/// Closes a connection as a session's end demands: misbehaviour disconnects the peer.
fn close_after(conn: &Connection, outcome: &Outcome) {
    if let SessionResult::Failed(reason) = &outcome.result {
        if reason.is_misbehaviour() {
            conn.close(
                endpoint::code(close_code::MISBEHAVIOUR),
                reason.to_string().as_bytes(),
            );
        }
    }
}

fn describe(result: &SessionResult) -> String {
    match result {
        SessionResult::Completed => "completed".into(),
        SessionResult::Aborted {
            by_peer: true,
            reason:
                AbortReason::PeerFenceNotSatisfied {
                    fence, required, ..
                },
        } => format!(
            "aborted by the peer: version {required} became mandatory from epoch {fence} during \
             the session and this device runs an older one; upgrade it to sync again"
        ),
        SessionResult::Aborted { by_peer, reason } => {
            format!(
                "aborted{}: {reason}",
                if *by_peer { " by peer" } else { "" }
            )
        }
        SessionResult::Refused {
            by_peer: true,
            reason:
                tend_sync::RefuseReason::PeerFenceNotSatisfied {
                    fence, required, ..
                },
        } => format!(
            "refused by the peer: version {required} is mandatory from epoch {fence} and this \
             device runs an older one; upgrade it to sync again"
        ),
        // Every refusal reason reads "refused: ..." already.
        SessionResult::Refused { reason, .. } => reason.to_string(),
        SessionResult::Failed(reason) => format!("failed: {reason}"),
    }
}

/// Fetches `wanted` blobs from `peer`, verifying each against its CID before storing it;
/// a peer that sends bytes not matching the CID is demoted like a misbehaving sync peer.
async fn fetch_blobs(
    inner: &Inner,
    peer: PeerAddr,
    wanted: &[crate::blobs::Wanted],
) -> crate::blobs::FetchReport {
    let report = crate::blobs::fetch(
        &inner.endpoint,
        &inner.device,
        &inner.metrics,
        peer,
        wanted,
        inner.config.max_blob_bytes,
        inner.config.connect_timeout,
    )
    .await;
    if let Some(why) = &report.misbehaviour {
        tracing::warn!("peer {} sent a bad blob: {why}", peer.device);
        let trust = inner.role_trust(&peer.device);
        let mut book = lock(&inner.peers);
        book.manager.add(peer.device, trust);
        book.manager.session_started(&peer.device);
        book.manager.session_ended(
            &peer.device,
            &SessionResult::Failed(FailReason::Unexpected("blob not matching its CID")),
        );
        let records = book.manager.records();
        drop(book);
        inner.persist_peers(records);
    }
    report
}

/// After a session with `peer` in which a snapshot completion was held back for want of
/// its blob: fetches the blob from that peer, which holds the completion and so, unless
/// it was lost or tombstoned, the blob. Returns whether another session would now take
/// the completion (the blob arrived, or the peer lacks it and the completion goes alone).
async fn fetch_held_snapshots(inner: &Inner, peer: PeerAddr) -> bool {
    let held: Vec<crate::blobs::Wanted> = lock(&inner.held_snapshots)
        .iter()
        .filter(|cid| !inner.store().has_blob(cid).unwrap_or(false))
        .map(|cid| crate::blobs::Wanted {
            cid: *cid,
            size: None,
        })
        .collect();
    if held.is_empty() {
        return false;
    }
    let report = fetch_blobs(inner, peer, &held).await;
    let mut changed = false;
    let mut set = lock(&inner.held_snapshots);
    for cid in &report.fetched {
        changed |= set.remove(cid);
    }
    for cid in &report.missing {
        if set.remove(cid) {
            tracing::warn!(
                "peer {} offered a snapshot completion without its blob {cid}: taking the \
                 completion alone",
                peer.device
            );
            lock(&inner.unavailable_snapshots).insert(*cid);
            changed = true;
        }
    }
    changed
}

/// Syncs with one peer, retrying at once when an identity epoch change aborted it, and
/// once more when the session held back a snapshot completion whose blob this device
/// then fetched from the peer (so a device behind a snapshot catches up in one call).
/// Syncs with one peer, as one session of round `group` when there is one.
async fn sync_peer(inner: Arc<Inner>, peer: PeerAddr, group: Option<u64>) -> PeerOutcome {
    // DESIGN rule 7: a device past a fence its running version does not meet starts no
    // session; the refusal names the package and the versions.
    let refusal = inner.state().ok().and_then(|st| {
        let running = upgrade::running_version(&inner.device, &st).ok()?;
        st.fence_check(st.current_epoch(), running).err()
    });
    if let Some(r) = refusal {
        return PeerOutcome {
            peer: peer.device.to_string(),
            addr: peer.addr.to_string(),
            result: r.to_string(),
            ok: false,
            attempts: 0,
            facts_sent: 0,
            facts_received: 0,
            facts_accepted: 0,
            facts_rejected: 0,
            duration_ms: 0,
        };
    }
    let mut attempts = 0;
    let mut fetched_held = false;
    loop {
        attempts += 1;
        let (outcome, err) = match initiate(&inner, peer, group).await {
            Ok(o) => (Some(o), None),
            Err(e) => (None, Some(e)),
        };
        let retry = outcome.as_ref().is_some_and(|o| o.result.should_retry());
        if retry && attempts <= inner.config.epoch_retries {
            continue;
        }
        // Refused as busy while the peer runs a session of its own with us (both opened at
        // once, see `yields_to_own_session`): once that session ends, ours finds what is
        // left.
        let busy = outcome.as_ref().is_some_and(|o| {
            matches!(
                o.result,
                SessionResult::Refused {
                    by_peer: true,
                    reason: RefuseReason::Busy
                }
            )
        });
        if busy && attempts <= BUSY_RETRIES {
            // The peer's own session may still be on its way here: give it a moment to
            // arrive, then wait for it to end. The moment is drawn at random: a peer whose
            // every slot is taken (a coordinator that 19 members ask for the completion at
            // once) otherwise refuses all of them again together.
            tokio::time::sleep(busy_pause()).await;
            wait_for_sessions_with(&inner, &peer.device, Instant::now() + SESSION_WAIT).await;
            continue;
        }
        let completed = outcome.as_ref().is_some_and(|o| o.result.is_success());
        if completed && !fetched_held && fetch_held_snapshots(&inner, peer).await {
            fetched_held = true;
            continue;
        }
        let mut out = PeerOutcome {
            peer: peer.device.to_string(),
            addr: peer.addr.to_string(),
            result: String::new(),
            ok: false,
            attempts,
            facts_sent: 0,
            facts_received: 0,
            facts_accepted: 0,
            facts_rejected: 0,
            duration_ms: 0,
        };
        match (outcome, err) {
            (Some(o), _) => {
                out.result = describe(&o.result);
                out.ok = o.result.is_success();
                out.facts_sent = o.stats.facts_sent;
                out.facts_received = o.stats.facts_received;
                out.facts_accepted = o.stats.facts_accepted;
                out.facts_rejected = o.stats.rejected_total();
                out.duration_ms = o.stats.duration.as_millis() as u64;
            }
            (None, Some(e)) => {
                if matches!(e, InitiateError::NoRoom { .. }) {
                    // Nothing was opened.
                    out.attempts -= 1;
                }
                out.result = e.to_string();
            }
            (None, None) => out.result = "unreachable".into(),
        }
        return out;
    }
}

/// Why [`initiate`] opened no session.
#[derive(Debug, thiserror::Error)]
enum InitiateError {
    /// This device's own session manager has no slot free (for any peer, or for this
    /// one): nothing was attempted and nothing is counted against the peer.
    #[error("skipped: this device is at its own session limit ({active} open, {with_peer} with this peer); not the peer's fault")]
    NoRoom { active: usize, with_peer: usize },
    /// A local problem (the store could not be read, a session could not be built): not
    /// counted against the peer either.
    #[error("local error: {0}")]
    Local(String),
    /// The node is stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// Connecting or opening the stream failed: counted as a failed sync with the peer,
    /// which is then skipped for a while (doubling from 1 s to 60 s).
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// Whether this node has a session slot for `peer`; if not, why not (counted as skipped).
fn room_for(inner: &Inner, peer: &DeviceId) -> Result<(), InitiateError> {
    let m = inner.lock_sessions();
    if m.has_room_for(peer) {
        return Ok(());
    }
    inner.metrics.sessions_skipped.inc();
    Err(InitiateError::NoRoom {
        active: m.active(),
        with_peer: m.active_with(peer),
    })
}

/// Waits, until `until` at most, for no session with `peer` to be open. A session the peer
/// opened brings what it has and takes what it lacks; one of ours opened alongside would
/// send the same facts a second time (every fact twice in a catch-up, where the peer pulls
/// for minutes while this device's round starts). Opened after it, ours finds what is
/// left. The bound keeps a peer that opens sessions back to back from holding a round.
async fn wait_for_sessions_with(inner: &Inner, peer: &DeviceId, until: Instant) {
    while inner.lock_sessions().active_with(peer) > 0
        && Instant::now() < until
        && !inner.closing.load(Ordering::SeqCst)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether an incoming session from `peer` is refused as busy because this device has a
/// session of its own to `peer` running. Two devices that open sessions to each other at
/// the same moment both pass [`wait_for_sessions_with`]; the one with the smaller id then
/// keeps its own session and refuses the other's, and the refused side waits for the
/// kept session to end and tries again ([`sync_peer`]), so each fact crosses once and
/// both calls still return synced.
fn yields_to_own_session(m: &SessionManager, me: DeviceId, peer: DeviceId) -> bool {
    me < peer
        && m.sessions_with(&peer).iter().any(|id| {
            m.session(*id)
                .is_some_and(|s| s.role() == tend_sync::Role::Initiator && !s.is_finished())
        })
}

/// The longest a session waits for another with the same peer to end
/// ([`wait_for_sessions_with`]).
const SESSION_WAIT: Duration = Duration::from_secs(60);

/// How long a round lets one peer's session run before it starts the next peer's
/// alongside ([`Node::sync_now`]).
const ROUND_STAGGER: Duration = Duration::from_secs(2);

/// How long [`sync_peer`] pauses after a busy refusal before it waits for the peer's
/// session and tries again: 20 to 100 ms at random. A session on loopback or a LAN
/// arrives in a few milliseconds, and one over the internet is seen by
/// [`wait_for_sessions_with`] on the next try at the latest.
fn busy_pause() -> Duration {
    use rand::Rng as _;
    Duration::from_millis(rand::thread_rng().gen_range(20..=100))
}

/// How many times [`sync_peer`] tries again after a busy refusal (the peer refuses while
/// its own session with this device runs, `yields_to_own_session`).
const BUSY_RETRIES: u32 = 3;

/// One session as initiator. This device's own limits are checked before connecting and
/// are never blamed on the peer; a failure to connect or open the stream counts as a
/// failed sync with the peer and backs off.
async fn initiate(
    inner: &Arc<Inner>,
    peer: PeerAddr,
    group: Option<u64>,
) -> Result<Outcome, InitiateError> {
    let fail = |inner: &Inner, msg: String| {
        let mut book = lock(&inner.peers);
        let wait = book
            .backoff
            .get(&peer.device)
            .map_or(BACKOFF_MIN, |(_, w)| (*w * 2).min(BACKOFF_MAX));
        book.backoff
            .insert(peer.device, (Instant::now() + wait, wait));
        book.manager.session_started(&peer.device);
        // A connection failure: repeated ones take the peer offline.
        book.manager.session_ended_at(
            &peer.device,
            &SessionResult::Failed(FailReason::Local(msg.clone())),
            inner.now(),
            None,
        );
        let records = book.manager.records();
        drop(book);
        inner.persist_peers(records);
        inner.metrics.sessions_failed.inc();
        InitiateError::Unreachable(msg)
    };
    if inner.closing.load(Ordering::SeqCst) {
        return Err(InitiateError::ShuttingDown);
    }
    let until = Instant::now() + SESSION_WAIT;
    let (conn, mut send, recv, tx, rx, sid, actions) = loop {
        wait_for_sessions_with(inner, &peer.device, until).await;
        // Room first: a full manager is this device's state, not the peer's.
        room_for(inner, &peer.device)?;
        let addr = endpoint::endpoint_addr(peer.device, peer.addr)
            .map_err(|e| InitiateError::Local(e.to_string()))?;
        let conn = match tokio::time::timeout(
            inner.config.connect_timeout,
            inner.endpoint.connect(addr, endpoint::SYNC_ALPN),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(fail(inner, format!("connect: {e}"))),
            Err(_) => return Err(fail(inner, "connect: timed out".into())),
        };
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Err(fail(inner, format!("open stream: {e}"))),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Checked again under the lock that opens the session: connecting can take
        // seconds, and the peer may have opened a session of its own meanwhile (through
        // the very connection that let ours through). Then this connection goes, and the
        // wait starts over.
        let opened = {
            let now = inner.now();
            let mut m = inner.lock_sessions();
            if m.active_with(&peer.device) > 0
                && Instant::now() < until
                && !inner.closing.load(Ordering::SeqCst)
            {
                None
            } else {
                let known_floor = lock(&inner.peer_floors).get(&peer.device).copied();
                Some(match inner.session_inputs(known_floor) {
                    Ok((local, items)) => match match group {
                        Some(g) => m.open_in_group(now, peer.device, local, items, g),
                        None => m.open(now, peer.device, local, items),
                    } {
                        Ok((sid, actions)) => {
                            lock(&inner.routes).insert(sid, tx.clone());
                            lock(&inner.awaiting_accept).insert(sid, peer.device);
                            Ok((sid, actions))
                        }
                        // Another session took the last slot while this one connected.
                        Err(ManagerError::AtCapacity {
                            active, with_peer, ..
                        }) => {
                            inner.metrics.sessions_skipped.inc();
                            Err(InitiateError::NoRoom { active, with_peer })
                        }
                        Err(e) => Err(InitiateError::Local(e.to_string())),
                    },
                    Err(e) => Err(InitiateError::Local(e.to_string())),
                })
            }
        };
        match opened {
            Some(Ok((sid, actions))) => break (conn, send, recv, tx, rx, sid, actions),
            Some(Err(e)) => {
                conn.close(endpoint::code(close_code::DONE), b"no session");
                return Err(e);
            }
            None => conn.close(endpoint::code(close_code::DONE), b"no session"),
        }
    };
    {
        let mut book = lock(&inner.peers);
        book.backoff.remove(&peer.device);
        book.manager.session_started(&peer.device);
    }
    inner.metrics.sessions_opened.inc();
    inner.dispatch(actions);
    let reader = spawn_reader(inner.clone(), peer.device, recv, tx, frame_limit(inner));
    let outcome = drive(inner, sid, &mut send, rx).await;
    reader.abort();
    close_after(&conn, &outcome);
    if outcome.result.is_success() {
        conn.close(endpoint::code(close_code::DONE), b"done");
    } else {
        // Let an Abort we sent reach the peer before the connection goes.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        conn.close(endpoint::code(close_code::DONE), b"session ended");
    }
    inner.record(peer.device, &outcome);
    Ok(outcome)
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                return;
            };
            serve_connection(inner, conn).await;
        });
    }
}

/// Admits a connection only from a member (DESIGN section 4): anyone else is closed with
/// [`close_code::NOT_MEMBER`] before a stream is accepted. Then serves its sessions.
async fn serve_connection(inner: Arc<Inner>, conn: Connection) {
    let peer = endpoint::device_of(conn.remote_id());
    let blocked = lock(&inner.peers).blocked.contains(&peer);
    if blocked {
        inner.metrics.refuse("blocked");
        conn.close(
            endpoint::code(close_code::NOT_MEMBER),
            b"blocked by this device",
        );
        return;
    }
    if conn.alpn() == endpoint::MAINT_ALPN {
        // Maintenance messages have their own admission rule (members, and the devices
        // named in a key generation this device accepted).
        maint::serve(Node { inner }.maint_handle(), conn).await;
        return;
    }
    // A banned peer (repeated misbehaviour, or the operator) gets no sync session either
    // way; snapshot ceremonies among members stay open to it.
    let banned =
        lock(&inner.peers).manager.get(&peer).map(|p| p.status) == Some(PeerStatus::Banned);
    if banned {
        inner.metrics.refuse("banned");
        conn.close(
            endpoint::code(close_code::NOT_MEMBER),
            b"banned by this device",
        );
        return;
    }
    if !inner.members().contains(&peer) {
        inner.metrics.refuse("not_member");
        conn.close(
            endpoint::code(close_code::NOT_MEMBER),
            b"not a member of this authority",
        );
        return;
    }
    if conn.alpn() == endpoint::BLOB_ALPN {
        crate::blobs::serve(inner.device.clone(), conn, inner.config.max_blob_bytes).await;
        return;
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        let inner = inner.clone();
        let conn = conn.clone();
        tokio::spawn(async move { respond(inner, conn, peer, send, recv).await });
    }
}

/// One session as responder.
async fn respond(
    inner: Arc<Inner>,
    conn: Connection,
    peer: DeviceId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let limit = frame_limit(&inner);
    let idle = inner.config.manager.session.idle_timeout;
    let hello = match tokio::time::timeout(idle, endpoint::read_frame(&mut recv, limit)).await {
        Ok(Ok(h)) => h,
        Ok(Err(FrameError::Oversized { len, max })) => {
            inner.metrics.refuse("oversized_frame");
            let trust = inner.role_trust(&peer);
            let mut book = lock(&inner.peers);
            book.manager.add(peer, trust);
            book.manager.session_started(&peer);
            book.manager.session_ended(
                &peer,
                &SessionResult::Failed(FailReason::Garbage(MessageError::Oversized { len, max })),
            );
            let records = book.manager.records();
            drop(book);
            inner.persist_peers(records);
            conn.close(endpoint::code(close_code::MISBEHAVIOUR), b"oversized frame");
            return;
        }
        _ => return,
    };
    let mut hello_floor = None;
    if let Ok(SyncMessage::Hello(h)) = SyncMessage::decode(&hello, limit) {
        hello_floor = Some(h.epoch.snapshot_epoch);
        lock(&inner.peer_floors).insert(peer, h.epoch.snapshot_epoch);
        // DESIGN rule 7: a peer that has not seen the activation cannot refuse itself, so
        // its announced version is checked here, past the fence at our epoch.
        if let Err(refusal) = inner
            .state()
            .map(|st| st.fence_check_peer(st.current_epoch(), h.protocol))
            .unwrap_or(Ok(()))
        {
            inner.metrics.refuse("fence");
            let reason = RefuseReason::PeerFenceNotSatisfied {
                fence: refusal.fence,
                required: refusal.required,
                local_epoch: refusal.local_epoch,
            };
            let _ = endpoint::write_frame(&mut send, &SyncMessage::Refuse(reason).encode()).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            conn.close(
                endpoint::code(close_code::DONE),
                refusal.to_string().as_bytes(),
            );
            return;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let now = inner.now();
    let accepted = {
        let mut m = inner.lock_sessions();
        // Rate and room first: a refused attempt costs no store scan.
        match m.admit_session(now, peer) {
            Err(ManagerError::AtCapacity { refusal, .. }) => {
                Err(Some(("busy", refusal, Duration::ZERO)))
            }
            Err(ManagerError::RateLimited {
                refusal,
                retry_after_ms,
            }) => Err(Some((
                "rate_limited",
                refusal,
                Duration::from_millis(retry_after_ms).min(Duration::from_secs(1)),
            ))),
            Err(e) => {
                tracing::warn!("cannot accept a session: {e}");
                Err(None)
            }
            Ok(_) if yields_to_own_session(&m, inner.device.device_id(), peer) => Err(Some((
                "busy",
                SyncMessage::Refuse(RefuseReason::Busy).encode(),
                Duration::ZERO,
            ))),
            Ok(admitted) => {
                let mut replica = inner.replica();
                let mut host = Admission::new(&mut replica);
                match inner.session_inputs(hello_floor) {
                    Ok((local, items)) => {
                        match m.accept_admitted(admitted, now, &hello, local, items, &mut host) {
                            Ok((sid, actions)) => {
                                lock(&inner.routes).insert(sid, tx.clone());
                                Ok((sid, actions))
                            }
                            Err(e) => {
                                tracing::warn!("cannot accept a session: {e}");
                                Err(None)
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!("cannot read the store for a session: {e}");
                        Err(None)
                    }
                }
            }
        }
    };
    let (sid, actions) = match accepted {
        Ok(x) => x,
        Err(refusal) => {
            for (what, n) in inner.lock_sessions().take_limited() {
                inner.metrics.limited(&what, n);
            }
            if let Some((reason, bytes, hold)) = refusal {
                inner.metrics.refuse(reason);
                // A peer over its session rate gets its answer when it may try again: the
                // stream stays open until then, and QUIC bounds the streams a connection
                // may hold open, so a flooder cannot turn refusals into a flood of its own.
                tokio::time::sleep(hold).await;
                let _ = endpoint::write_frame(&mut send, &bytes).await;
            }
            let _ = send.finish();
            return;
        }
    };
    {
        // Incoming members are scored too, so misbehaviour demotes them.
        let trust = inner.role_trust(&peer);
        let mut book = lock(&inner.peers);
        book.manager.add(peer, trust);
        book.manager.session_started(&peer);
    }
    inner.metrics.sessions_opened.inc();
    inner.dispatch(actions);
    let reader = spawn_reader(inner.clone(), peer, recv, tx, limit);
    let outcome = drive(&inner, sid, &mut send, rx).await;
    reader.abort();
    close_after(&conn, &outcome);
    inner.record(peer, &outcome);
}

/// Runs session timers: at the earliest requested wake-up, and at least every 250 ms
/// (which also notices identity-epoch changes written to the store directly).
async fn timer_loop(inner: Arc<Inner>) {
    loop {
        let now = inner.now();
        let wait = lock(&inner.next_wake)
            .map(|t| t.saturating_sub(now))
            .unwrap_or(Duration::from_millis(250))
            .min(Duration::from_millis(250));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.wake.notified() => continue,
        }
        {
            let mut w = lock(&inner.next_wake);
            if w.is_some_and(|t| t <= inner.now()) {
                *w = None;
            }
        }
        blocking(|| inner.poll());
    }
}

/// Binds the node's endpoint. A given port (a device restarted where its peers know it)
/// may still be held for a moment by the endpoint of the node stopped just before (iroh
/// releases its socket after the stop, not during it; with push on write a round is often
/// in flight at a stop): it is retried for up to three seconds.
async fn bind_endpoint(device: &Device, listen: SocketAddr) -> Result<Endpoint, NodeError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match endpoint::bind(device.key(), listen).await {
            Err(endpoint::EndpointError::Bind(_))
                if listen.port() != 0 && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// How long a pushed round waits after the write that asked for it, so the writes of a
/// burst go in one round.
const PUSH_DEBOUNCE: Duration = Duration::from_millis(2);

/// The least time between the starts of two pushed rounds: a little more than one
/// session per peer under the per-peer limit of sessions a responder accepts (this
/// device's own incoming limit stands for its peers'), so pushing under a steady write
/// load is never refused as a flood. No gap without that limit.
fn push_gap(config: &NodeConfig) -> Duration {
    config
        .manager
        .rate
        .inbound_per_peer
        .sessions_per_sec
        .map_or(Duration::ZERO, |n| {
            Duration::from_secs_f64(1.25 / f64::from(n.get()))
        })
}

/// The wait before the next timed round: `interval` stretched or shrunk by up to half at
/// random, the mean unchanged. Devices started together (a fleet after an outage, a
/// devnet) would otherwise open their sessions at the same instants for as long as they
/// run, each round a burst of busy refusals.
fn jittered(interval: Duration) -> Duration {
    use rand::Rng as _;
    interval.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
}

/// A sync round at once, then every `sync_interval` on average ([`jittered`]), and a
/// pushed round soon after each local write (push on write): at most one round runs at a
/// time, writes made meanwhile ask for one more, and pushed rounds start at least
/// [`push_gap`] apart.
async fn round_loop(node: Node) {
    let interval = node.inner.config.sync_interval;
    let mut next_timed = tokio::time::Instant::now();
    let gap = push_gap(&node.inner.config);
    let mut last_push: Option<tokio::time::Instant> = None;
    loop {
        let pushed = tokio::select! {
            _ = tokio::time::sleep_until(next_timed) => false,
            _ = node.inner.push.notified() => true,
        };
        if pushed {
            let soonest = tokio::time::Instant::now() + PUSH_DEBOUNCE;
            let start = last_push.map_or(soonest, |last| (last + gap).max(soonest));
            tokio::time::sleep_until(start).await;
            last_push = Some(tokio::time::Instant::now());
        } else {
            next_timed = tokio::time::Instant::now() + jittered(interval);
        }
        if node.inner.closing.load(Ordering::SeqCst) {
            return;
        }
        node.sync_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_core::authority::{AuthorityFact, MembershipChange};
    use tend_core::{GroupKey, Payload, UnsignedFact, VerifiedFact};

    fn all_facts(device: &Device) -> Vec<VerifiedFact> {
        let ns = device.namespace();
        let store = device.store();
        store
            .scan(ns, ..)
            .expect("scan")
            .chain(store.scan_maintenance(ns).expect("scan"))
            .map(|f| f.expect("fact").verify().expect("verify"))
            .collect()
    }

    /// Timed rounds of devices started together drift apart: each wait is drawn anew
    /// within half an interval either way.
    #[test]
    fn timed_rounds_are_spread_around_the_interval() {
        let interval = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(interval)).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= interval / 2 && *w < interval * 3 / 2));
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(
            *min < interval * 3 / 4 && *max > interval * 5 / 4,
            "{min:?}..{max:?}"
        );
    }

    /// A device that has run sessions in its own journal and then joins an authority
    /// offers that authority's facts, including those stored before it switched: the
    /// items it last offered belong to the other journal and are not followed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_items_belong_to_the_journal_the_device_is_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = rand::thread_rng();
        let config = NodeConfig {
            control_socket: false,
            ..NodeConfig::default()
        };
        let node = Node::start(
            Device::init(&dir.path().join("joiner"), &mut rng).expect("init"),
            config,
        )
        .await
        .expect("start");
        let solo = node.device().namespace();
        let (_, before) = node.inner.session_inputs(None).expect("items");
        assert!(!before.is_empty(), "the solo journal's genesis");

        // An admin's authority adds this device; its facts arrive before the switch.
        let admin = Device::init(&dir.path().join("admin"), &mut rng).expect("init");
        let authority = admin.namespace();
        let mut members = vec![admin.device_id(), node.device().device_id()];
        members.sort();
        admin
            .write(UnsignedFact {
                namespace: authority,
                epoch: Epoch(1),
                payload: Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
                    identity_epoch: 1,
                    members,
                    threshold: 1,
                    group_key: GroupKey(admin.device_id().0),
                })),
            })
            .expect("membership");
        for i in 0..5 {
            admin.add_application_fact("notes", &[i]).expect("append");
        }
        let facts = all_facts(&admin);
        let report = node.device().store().insert_batch(&facts).expect("insert");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        node.device().adopt_namespace(authority).expect("adopt");
        assert_ne!(solo, authority);

        let (_, after) = node.inner.session_inputs(None).expect("items");
        let expected: Vec<SyncItem> = node
            .device()
            .store()
            .items(authority, ..)
            .expect("items")
            .map(|i| {
                let (epoch, id) = i.expect("item");
                SyncItem { epoch, id }
            })
            .collect();
        assert_eq!(tend_sync::OrderedItems::namespace(&*after), authority);
        assert_eq!(after.contiguous(), Some(expected.as_slice()));
        for f in &facts {
            let item = SyncItem {
                epoch: f.epoch(),
                id: f.id(),
            };
            assert!(
                expected.binary_search(&item).is_ok(),
                "{} is offered",
                f.id()
            );
        }
        node.shutdown().await;
    }
}
