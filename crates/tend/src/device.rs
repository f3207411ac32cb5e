//! [`Device`]: one device home opened by the application, its data operations, its
//! subscriptions and the node that keeps it in sync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use tend_core::DeviceId;
use tend_node::data::{self as node_data, Bytes64, DataRequest, DataResponse};
use tend_node::{Node, NodeConfig, PeerAddr};
use tokio::sync::watch;

use crate::changes::{self, Change, Cursor, Subscriptions};
use crate::data::{device_id, Batch, CacheEntry, Entry, LogCursor, LogEntry, Scan, Written};
use crate::error::{Error, Result};

/// How long [`Device::create_authority`] keeps trying (members must answer within it).
const AUTHORITY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Device::stop`] waits for the node's tasks to let go of the device.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// How often [`Device::join`] looks whether the admin's authority arrived.
const JOIN_CHECK: Duration = Duration::from_millis(50);

/// How the device's node runs: where it listens, whom it syncs with, how often.
///
/// ```
/// use std::time::Duration;
/// let options = tend::SyncOptions::new()
///     .listen("127.0.0.1:7001".parse().unwrap())
///     .sync_interval(Duration::from_secs(2));
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct SyncOptions {
    listen: SocketAddr,
    peers: Vec<PeerAddr>,
    sync_interval: Duration,
    control_socket: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncOptions {
    /// Listen on 127.0.0.1 on a free port, no peers yet, a sync round every 10 s, no
    /// control socket.
    pub fn new() -> Self {
        SyncOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            sync_interval: Duration::from_secs(10),
            control_socket: false,
        }
    }

    /// Where the node's endpoint (QUIC over UDP) listens; port 0 picks a free one.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// A peer to sync with (also remembered in the store for the next start).
    pub fn peer(mut self, peer: PeerAddr) -> Self {
        self.peers.push(peer);
        self
    }

    /// Time between the node's sync rounds.
    pub fn sync_interval(mut self, interval: Duration) -> Self {
        self.sync_interval = interval;
        self
    }

    /// Whether to serve the control socket in the home, so the `tend` CLI can talk to the
    /// device while the application runs it (unix only; ignored elsewhere).
    pub fn control_socket(mut self, serve: bool) -> Self {
        self.control_socket = serve && cfg!(unix);
        self
    }

    fn node_config(&self) -> NodeConfig {
        NodeConfig {
            listen: self.listen,
            peers: self.peers.clone(),
            sync_interval: self.sync_interval,
            control_socket: self.control_socket,
            // An embedded device runs the application's release, not a `tend` binary that
            // tend's upgrade pipeline would replace.
            upgrades: false,
            ..NodeConfig::default()
        }
    }
}

/// The authority a device belongs to: the devices that share its journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    /// The authority's journal (`authority:HEX`).
    pub id: String,
    /// Its members.
    pub members: Vec<DeviceId>,
    /// Signatures a snapshot needs.
    pub threshold: u16,
    /// Increases with every change of the members or their key.
    pub identity_epoch: u64,
}

/// A device's health at a glance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The device.
    pub device_id: DeviceId,
    /// The authority journal it writes to.
    pub authority: String,
    /// Whether its node runs.
    pub running: bool,
    /// Where the node listens, while it runs.
    pub listen_addr: Option<SocketAddr>,
    /// Facts in the authority's journal.
    pub facts: u64,
    /// The journal's digest: devices that hold the same facts show the same one.
    pub digest: String,
    /// The newest cursor of the changes feed.
    pub last_cursor: Cursor,
    /// The store file's size in bytes.
    pub store_bytes: u64,
    /// The peers the node knows, while it runs.
    pub peers: Vec<PeerStatus>,
}

/// A peer as the running node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer.
    pub device_id: DeviceId,
    /// Its address, if known.
    pub addr: Option<String>,
    /// `active`, `backoff`, `blocked`, ...
    pub status: String,
    /// Sessions with it that succeeded.
    pub successful_syncs: u64,
    /// Sessions with it that failed.
    pub failed_syncs: u64,
}

/// What one [`Device::sync_now`] round did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Sessions run (one per peer chosen).
    pub sessions: usize,
    /// Sessions that completed.
    pub succeeded: usize,
    /// Facts received and stored.
    pub facts_received: u64,
    /// Facts sent.
    pub facts_sent: u64,
}

struct Inner {
    device: Arc<tend_node::Device>,
    node: Mutex<Option<Node>>,
    /// Serialises start and stop (they await while `node` must not be held).
    lifecycle: tokio::sync::Mutex<()>,
    /// The newest cursor of the changes feed, raised by the store after each commit.
    newest: watch::Receiver<u64>,
    subscriptions: Subscriptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A node left running keeps its tasks (and the store) alive: stop it on the way
        // out when there is a runtime to do it on.
        if let Some(node) = lock(&self.node).take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { node.shutdown().await });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One tend device, opened by the application: a home directory (the device's key and its
/// redb store) and, once [`Device::start`]ed, the node that syncs it with the authority's
/// other devices.
///
/// Cloning gives another handle to the same device. Data operations are synchronous (a
/// write is durable when it returns); they do disk I/O, so async code with tight latency
/// budgets may run them in `tokio::task::spawn_blocking`. Starting, stopping, syncing and
/// subscriptions need a tokio runtime.
///
/// ```
/// # fn main() -> Result<(), tend::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let device = tend::Device::create(dir.path())?;
/// device.put("todo", "milk", b"2 litres")?;
/// let entry = device.get("todo", "milk")?.expect("just written");
/// assert_eq!(entry.value, b"2 litres");
/// assert_eq!(entry.version.author, device.id());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id())
            .field("home", &self.home())
            .field("running", &self.is_running())
            .finish()
    }
}

impl Device {
    /// Creates a device in `home` (made if absent): a new key (owner-only file), an empty
    /// store, and an authority of this device alone, so it can write at once. Refuses a
    /// directory that already holds a device.
    pub fn create(home: impl AsRef<Path>) -> Result<Device> {
        // Announced at once, as `tend init` does, so writes made before `start` are in the
        // newest fact format.
        let device = tend_node::upgrade::init_announced(home.as_ref(), &mut rand::rngs::OsRng)?;
        Device::wrap(device)
    }

    /// Opens the device in `home`.
    pub fn open(home: impl AsRef<Path>) -> Result<Device> {
        Device::wrap(tend_node::Device::open(home.as_ref())?)
    }

    /// Opens the device in `home`, creating it if the directory holds none.
    pub fn open_or_create(home: impl AsRef<Path>) -> Result<Device> {
        match Device::open(home.as_ref()) {
            Err(Error::NotADevice(_)) => Device::create(home),
            other => other,
        }
    }

    fn wrap(device: tend_node::Device) -> Result<Device> {
        let store = device.store();
        let (tx, newest) = watch::channel(store.last_change()?);
        store.on_change(move |seq| {
            tx.send_replace(seq);
        });
        Ok(Device {
            inner: Arc::new(Inner {
                device: Arc::new(device),
                node: Mutex::new(None),
                lifecycle: tokio::sync::Mutex::new(()),
                newest,
                subscriptions: Subscriptions::default(),
            }),
        })
    }

    /// The device's id: its public key, the name other devices know it by.
    pub fn id(&self) -> DeviceId {
        self.inner.device.device_id()
    }

    /// The home directory.
    pub fn home(&self) -> PathBuf {
        self.inner.device.home().to_owned()
    }

    fn node(&self) -> Option<Node> {
        lock(&self.inner.node).clone()
    }

    fn running(&self) -> Result<Node> {
        self.node().ok_or(Error::NotRunning)
    }

    /// Runs a data request: through the running node, which pushes a write to its peers
    /// at once, or on the store when the node is stopped (the next start syncs it).
    fn run(&self, request: DataRequest) -> Result<DataResponse> {
        Ok(match self.node() {
            Some(node) => node.data(request)?,
            None => node_data::run(&self.inner.device, request)?,
        })
    }

    fn written(&self, request: DataRequest) -> Result<Written> {
        match self.run(request)? {
            DataResponse::Written(w) => w.try_into(),
            other => Err(unexpected(&other)),
        }
    }

    // ---- collections ----

    /// Writes `value` under `key` in `collection`. The collection and key are 1 to 256
    /// printable characters; values above 16 KiB are stored as blobs (up to 64 MiB).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let device = tend::Device::create(dir.path()).unwrap();
    /// let written = device.put("settings", "theme", b"dark").unwrap();
    /// assert_eq!(device.get("settings", "theme").unwrap().unwrap().version.id, written.id);
    /// ```
    pub fn put(&self, collection: &str, key: &str, value: impl AsRef<[u8]>) -> Result<Written> {
        self.written(DataRequest::Put {
            collection: collection.into(),
            key: key.into(),
            value: Bytes64(value.as_ref().to_vec()),
        })
    }

    /// What `key` of `collection` reads as; `None` when absent (never written, or deleted).
    pub fn get(&self, collection: &str, key: &str) -> Result<Option<Entry>> {
        match self.run(DataRequest::Get {
            collection: collection.into(),
            key: key.into(),
        })? {
            DataResponse::Value(v) => v.map(Entry::try_from).transpose(),
            other => Err(unexpected(&other)),
        }
    }

    /// Deletes `key` of `collection`; [`Error::NotFound`] if it is absent.
    pub fn delete(&self, collection: &str, key: &str) -> Result<Written> {
        self.written(DataRequest::Delete {
            collection: collection.into(),
            key: key.into(),
        })
    }

    /// The live keys of `collection` that `scan` selects, in key order.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let device = tend::Device::create(dir.path()).unwrap();
    /// device.put("todo", "1", b"buy milk").unwrap();
    /// device.put("todo", "2", b"call mum").unwrap();
    /// let keys: Vec<String> = device
    ///     .scan("todo", &tend::Scan::new())
    ///     .unwrap()
    ///     .into_iter()
    ///     .map(|e| e.key)
    ///     .collect();
    /// assert_eq!(keys, ["1", "2"]);
    /// ```
    pub fn scan(&self, collection: &str, scan: &Scan) -> Result<Vec<Entry>> {
        match self.run(DataRequest::Scan {
            collection: collection.into(),
            prefix: scan.prefix.clone(),
            after: scan.after.clone(),
            limit: scan.limit,
        })? {
            DataResponse::Scan(v) => v.into_iter().map(Entry::try_from).collect(),
            other => Err(unexpected(&other)),
        }
    }

    // ---- logs ----

    /// Appends `data` (at most 63 KiB) to `log`; returns the entry's cursor.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let device = tend::Device::create(dir.path()).unwrap();
    /// let first = device.log_append("events", b"started").unwrap();
    /// device.log_append("events", b"stopped").unwrap();
    /// let rest = device.log_read("events", Some(first), 10).unwrap();
    /// assert_eq!(rest.len(), 1);
    /// assert_eq!(rest[0].data, b"stopped");
    /// ```
    pub fn log_append(&self, log: &str, data: impl AsRef<[u8]>) -> Result<LogCursor> {
        let w = self.written(DataRequest::LogAppend {
            log: log.into(),
            data: Bytes64(data.as_ref().to_vec()),
        })?;
        w.log_cursor
            .ok_or_else(|| Error::Corrupt("an append returned no cursor".into()))
    }

    /// Up to `limit` (1 to 10,000) entries of `log` after `after` (from the first when
    /// `None`), in log order.
    pub fn log_read(
        &self,
        log: &str,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<Vec<LogEntry>> {
        match self.run(DataRequest::LogRead {
            log: log.into(),
            after: after.map(|c| c.to_string()),
            limit,
        })? {
            DataResponse::Log(v) => v.into_iter().map(LogEntry::try_from).collect(),
            other => Err(unexpected(&other)),
        }
    }

    /// Drops the entries of `log` below `before`, on every device.
    pub fn log_trim(&self, log: &str, before: LogCursor) -> Result<Written> {
        self.written(DataRequest::LogTrim {
            log: log.into(),
            before: before.to_string(),
        })
    }

    // ---- cache ----

    /// Writes a replicated cache entry for `key`, computed at the current epoch.
    pub fn cache_put(&self, key: &str, value: impl AsRef<[u8]>) -> Result<Written> {
        self.written(DataRequest::CachePut {
            key: key.into(),
            value: Bytes64(value.as_ref().to_vec()),
        })
    }

    /// Reads a cache entry: valid, stale (invalidated since it was computed) or absent.
    pub fn cache_get(&self, key: &str) -> Result<CacheEntry> {
        match self.run(DataRequest::CacheGet { key: key.into() })? {
            DataResponse::Cache(c) => Ok(c.into()),
            other => Err(unexpected(&other)),
        }
    }

    // ---- batches ----

    /// Commits every write of `batch` in one transaction, or none: if one write is
    /// refused (bad input, a delete of an absent key), nothing is written. Returns what
    /// each write stored, in order. At most 100,000 writes.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let device = tend::Device::create(dir.path()).unwrap();
    /// let bad = tend::Batch::new().put("todo", "1", b"buy milk").put("", "2", b"no collection");
    /// assert!(device.commit(bad).is_err());
    /// assert!(device.get("todo", "1").unwrap().is_none(), "nothing of the batch was written");
    /// ```
    pub fn commit(&self, batch: Batch) -> Result<Vec<Written>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self.run(DataRequest::Batch { ops: batch.ops })? {
            DataResponse::Batch(v) => v.into_iter().map(Written::try_from).collect(),
            other => Err(unexpected(&other)),
        }
    }

    // ---- changes ----

    /// The changes the device admits after `from` (its own writes and what sync brings),
    /// in admission order, decoded; the stream stays open and yields new changes as they
    /// are committed. Save a change's [`Change::cursor`] and subscribe from it later (also
    /// after a restart) to continue exactly after that change. The writes of one
    /// [`Batch`] (and the facts of one sync exchange) are admitted together, in fact-id
    /// order.
    ///
    /// A read error ends the stream after yielding it. The stream keeps the device's store
    /// open while it lives. Needs a tokio runtime.
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tend::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let device = tend::Device::create(dir.path())?;
    /// let from = device.last_cursor()?;
    /// device.put("todo", "1", b"buy milk")?;
    /// let mut changes = Box::pin(device.subscribe(from));
    /// let change = changes.next().await.expect("a change")?;
    /// assert!(matches!(change.kind, tend::ChangeKind::Put { ref key, .. } if key == "1"));
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self, from: Cursor) -> impl Stream<Item = Result<Change>> + Send + 'static {
        changes::subscribe(
            &self.inner.subscriptions,
            &self.inner.device,
            self.inner.newest.clone(),
            from,
        )
    }

    /// The newest cursor of the changes feed: subscribe from it to see only what comes
    /// next.
    pub fn last_cursor(&self) -> Result<Cursor> {
        Ok(Cursor::from_u64(self.inner.device.store().last_change()?))
    }

    // ---- sync ----

    /// Starts the node: binds its endpoint and syncs with the authority's members every
    /// round (and whenever asked). Returns the address other devices reach it at.
    pub async fn start(&self, options: SyncOptions) -> Result<PeerAddr> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        if self.node().is_some() {
            return Err(Error::AlreadyRunning);
        }
        let node = Node::start_shared(self.inner.device.clone(), options.node_config()).await?;
        let addr = node.peer_addr();
        *lock(&self.inner.node) = Some(node);
        Ok(addr)
    }

    /// Stops the node (closes its sessions and endpoint) and waits, up to 5 s, until its
    /// tasks have let go of the device, so that once every handle and subscription is
    /// dropped the home can be opened again at once. The device stays open for reads and
    /// writes; a no-op when it is not running.
    pub async fn stop(&self) {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let node = lock(&self.inner.node).take();
        let Some(node) = node else {
            return;
        };
        node.shutdown().await;
        drop(node);
        // Session tasks end as the endpoint closes; the node's last one drops its share of
        // the device. What remains is this handle's and each live subscription's.
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        while Arc::strong_count(&self.inner.device) > 1 + self.inner.subscriptions.live()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the node runs.
    pub fn is_running(&self) -> bool {
        self.node().is_some()
    }

    /// The address other devices reach this one at, while it runs.
    pub fn peer_addr(&self) -> Option<PeerAddr> {
        self.node().map(|n| n.peer_addr())
    }

    /// Adds a peer to sync with. It is remembered in the store, so it is used on the next
    /// start too; while the node runs, the next round includes it.
    pub fn add_peer(&self, peer: PeerAddr) -> Result<()> {
        if peer.device == self.id() {
            return Err(Error::InvalidInput("a device is not its own peer".into()));
        }
        match self.node() {
            Some(node) => node.add_peer(peer)?,
            None => tend_node::discovery::remember_peers(self.inner.device.store(), &[peer])?,
        }
        Ok(())
    }

    /// Runs a sync round now with the peers the node picks, and waits for it.
    pub async fn sync_now(&self) -> Result<SyncReport> {
        let node = self.running()?;
        let round = node.sync_now().await;
        Ok(SyncReport {
            sessions: round.sessions.len(),
            succeeded: round.sessions.iter().filter(|s| s.ok).count(),
            facts_received: round.sessions.iter().map(|s| s.facts_accepted).sum(),
            facts_sent: round.sessions.iter().map(|s| s.facts_sent).sum(),
        })
    }

    /// The device's status: journal, changes feed, and the node's peers while it runs.
    pub fn status(&self) -> Result<Status> {
        let device = &self.inner.device;
        let journal = device.status()?;
        let current = journal
            .namespaces
            .iter()
            .find(|n| n.namespace == journal.current_namespace);
        let node = self.node();
        let peers = match &node {
            None => Vec::new(),
            Some(n) => n
                .peers()
                .into_iter()
                .map(|p| {
                    Ok(PeerStatus {
                        device_id: device_id(&p.device_id)?,
                        addr: p.addr,
                        status: p.status,
                        successful_syncs: p.successful_syncs,
                        failed_syncs: p.failed_syncs,
                    })
                })
                .collect::<Result<_>>()?,
        };
        Ok(Status {
            device_id: self.id(),
            authority: journal.current_namespace.clone(),
            running: node.is_some(),
            listen_addr: node.as_ref().map(|n| n.listen_addr()),
            facts: current.map_or(0, |n| n.facts),
            digest: current.map_or_else(String::new, |n| n.digest.clone()),
            last_cursor: self.last_cursor()?,
            store_bytes: journal.store_bytes,
            peers,
        })
    }

    // ---- authority ----

    /// The authority this device writes to.
    pub fn authority(&self) -> Result<Authority> {
        let s = self.inner.device.authority_status()?;
        Ok(Authority {
            id: s.namespace,
            members: s
                .members
                .iter()
                .map(|m| device_id(m))
                .collect::<Result<_>>()?,
            threshold: s.threshold,
            identity_epoch: s.identity_epoch,
        })
    }

    /// Makes this device's authority a `threshold`-of-N authority of this device and
    /// `members`: a FROST key generation over the network, each member keeping its own
    /// key share. This device must be the admin (a device made by [`Device::create`] is
    /// the admin of its own authority) and running; every member must be running, know
    /// this device as a peer before the key generation starts (its [`Device::add_peer`];
    /// a member refuses the connection of a device that is neither), and be reachable at
    /// an address this device knows (this device's [`Device::add_peer`]). Tries for up to
    /// 30 s. Run it again with more members to add devices later.
    ///
    /// ```no_run
    /// # async fn form(admin: tend::Device, member: tend::Device) -> Result<(), tend::Error> {
    /// let admin_addr = admin.peer_addr().expect("running");
    /// admin.add_peer(member.peer_addr().expect("running"))?;
    /// member.add_peer(admin_addr)?;
    /// let members = [member.id()];
    /// let (created, joined) = tokio::join!(
    ///     admin.create_authority(2, &members),
    ///     member.join(admin_addr, std::time::Duration::from_secs(30)),
    /// );
    /// assert_eq!(created?, joined?);
    /// # Ok(()) }
    /// ```
    pub async fn create_authority(
        &self,
        threshold: u16,
        members: &[DeviceId],
    ) -> Result<Authority> {
        let node = self.running()?;
        if members.is_empty() || members.iter().all(|m| *m == self.id()) {
            return Err(Error::InvalidInput(
                "an authority of several devices needs at least one other member".into(),
            ));
        }
        if threshold < 2 || usize::from(threshold) > members.len() + 1 {
            return Err(Error::InvalidInput(format!(
                "threshold {threshold} with {} members: it must be 2 to the number of members",
                members.len() + 1
            )));
        }
        node.create_authority(threshold, members, AUTHORITY_TIMEOUT)
            .await?;
        self.authority()
    }

    /// Joins the authority of the admin at `admin`: adds it as a peer (the admin's key
    /// generation is accepted from a configured peer only) and waits, up to `timeout`,
    /// until the admin's [`Device::create_authority`] has made this device a member.
    /// The device must be running. The admin must not start before this device knows it:
    /// call [`Device::add_peer`] with the admin's address first when both start at once.
    pub async fn join(&self, admin: PeerAddr, timeout: Duration) -> Result<Authority> {
        self.running()?;
        self.add_peer(admin)?;
        let me = self.id();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(a) = self.authority() {
                if a.members.len() > 1
                    && a.members.contains(&me)
                    && a.members.contains(&admin.device)
                {
                    return Ok(a);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Authority(format!(
                    "{} did not make this device a member within {timeout:?}",
                    admin.device
                )));
            }
            tokio::time::sleep(JOIN_CHECK).await;
        }
    }
}

fn unexpected(_: &DataResponse) -> Error {
    Error::Corrupt("the device answered with the wrong kind of result".into())
}
