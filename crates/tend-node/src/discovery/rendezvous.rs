//! The rendezvous service (`tend rendezvous`) and its client: devices publish signed,
//! expiring address records and resolve those of their authority's members.
//!
//! The protocol is HTTP/1.1 with JSON bodies, one request per connection:
//!
//! - `POST /v1/records` with an [`AddressRecord`]: `200 {"stored": "new" | "replaced" |
//!   "unchanged"}`, or `4xx`/`503 {"error": "..."}`.
//! - `GET /v1/records/DEVICE_ID`: `200` with the live record, or `404`.
//!
//! The server checks every record ([`RecordTable`]); the client checks every answer again,
//! since the server is not trusted. Both are thin: the rules live in
//! [`super::record`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tend_core::DeviceId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::record::{AddressRecord, Inserted, RecordError, RecordLimits, RecordTable};
use super::{AddressSource, DiscoveryHost, PeerAddr};
use crate::device::Device;

/// Largest request or response head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest body accepted (a record with the maximum of addresses is well below).
const MAX_BODY: usize = 4 * 1024;

/// Why the rendezvous server or client failed.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("rendezvous {server}: {detail}")]
    Io { server: SocketAddr, detail: String },
    #[error("rendezvous {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("rendezvous {server} answered {status}: {message}")]
    Refused {
        server: SocketAddr,
        status: u16,
        message: String,
    },
    #[error("rendezvous {server} sent a malformed answer: {detail}")]
    Protocol { server: SocketAddr, detail: String },
    #[error("rendezvous {server} sent an unusable record: {source}")]
    Record {
        server: SocketAddr,
        source: RecordError,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// The current time in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Server

/// How the rendezvous server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most devices with a record.
    pub capacity: usize,
    /// What records may claim.
    pub limits: RecordLimits,
    /// Most connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// A connection that has not sent its request within this is closed.
    pub io_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            limits: RecordLimits::default(),
            max_connections: 128,
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// Binds the server's listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, RendezvousError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RendezvousError::Listen { addr, source })
}

/// Serves records on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: ServerConfig) {
    let table = Arc::new(Mutex::new(RecordTable::new(config.capacity, config.limits)));
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                lock(&table).expire(unix_ms());
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let table = table.clone();
                let timeout = config.io_timeout;
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(timeout, handle(stream, &table)).await;
                });
            }
        }
    }
}

/// Runs a server on `listen` until SIGINT or SIGTERM; `on_start` gets the bound address.
pub fn run_blocking(
    listen: SocketAddr,
    config: ServerConfig,
    on_start: impl FnOnce(SocketAddr),
) -> Result<(), RendezvousError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(RendezvousError::Runtime)?;
    rt.block_on(async move {
        let listener = bind(listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| RendezvousError::Listen {
                addr: listen,
                source,
            })?;
        let stop = crate::signal::stop_requested();
        on_start(addr);
        tokio::select! {
            _ = serve(listener, config) => {}
            _ = stop => {}
        }
        Ok(())
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle(mut stream: TcpStream, table: &Mutex<RecordTable>) {
    let (status, body) = match read_message(&mut stream).await {
        Ok((head, body)) => route(&head, &body, table),
        Err(detail) => (400, error_body(&detail)),
    };
    let _ = write_message(
        &mut stream,
        &format!("HTTP/1.1 {status} {}", reason(status)),
        &body,
    )
    .await;
}

fn route(head: &str, body: &[u8], table: &Mutex<RecordTable>) -> (u16, String) {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path) {
        ("POST", "/v1/records") => {
            let record: AddressRecord = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return (400, error_body(&format!("bad record: {e}"))),
            };
            match lock(table).insert(record, unix_ms()) {
                Ok(done) => {
                    let stored = match done {
                        Inserted::New => "new",
                        Inserted::Replaced => "replaced",
                        Inserted::Unchanged => "unchanged",
                    };
                    (200, serde_json::json!({ "stored": stored }).to_string())
                }
                Err(e @ RecordError::Stale { .. }) => (409, error_body(&e.to_string())),
                Err(e @ RecordError::TableFull { .. }) => (503, error_body(&e.to_string())),
                Err(e) => (400, error_body(&e.to_string())),
            }
        }
        ("GET", p) if p.starts_with("/v1/records/") => {
            let Ok(id) = p["/v1/records/".len()..].parse::<DeviceId>() else {
                return (400, error_body("bad device id"));
            };
            match lock(table).get(&id, unix_ms()) {
                Some(r) => (200, serde_json::to_string(r).unwrap_or_default()),
                None => (404, error_body("no record")),
            }
        }
        _ => (404, error_body("no such resource")),
    }
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads one HTTP/1.1 message: the head (up to [`MAX_HEAD`]) and a body of
/// `Content-Length` bytes (up to [`MAX_BODY`]), or to the end of the stream if the
/// length is absent (responses).
async fn read_message(stream: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err("head too large".into());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the end of the head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| "head is not UTF-8".to_string())?
        .to_string();
    let mut body = buf[head_end + 4..].to_vec();
    let length = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| "bad content-length".to_string())?;
    let limit = length.unwrap_or(MAX_BODY);
    if limit > MAX_BODY {
        return Err("body too large".into());
    }
    while body.len() < limit {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            if length.is_some() {
                return Err("connection closed inside the body".into());
            }
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if body.len() > limit {
        return Err("body too large".into());
    }
    Ok((head, body))
}

async fn write_message(stream: &mut TcpStream, first: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "{first}\r\nHost: tend\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.flush().await
}

// ---------------------------------------------------------------------------------------
// Client

/// Talks to one rendezvous server.
#[derive(Clone, Debug)]
pub struct Client {
    server: SocketAddr,
    timeout: Duration,
}

impl Client {
    /// A client of `server`; each request gives up after `timeout`.
    pub fn new(server: SocketAddr, timeout: Duration) -> Self {
        Self { server, timeout }
    }

    /// Publishes a record.
    pub async fn publish(&self, record: &AddressRecord) -> Result<(), RendezvousError> {
        let body = serde_json::to_string(record).map_err(|e| self.protocol(e.to_string()))?;
        let (status, body) = self.request("POST /v1/records", &body).await?;
        if status == 200 {
            Ok(())
        } else {
            Err(self.refused(status, &body))
        }
    }

    /// Fetches a device's record as the server has it, unchecked (see [`Client::resolve`]).
    pub async fn fetch(&self, device: DeviceId) -> Result<Option<AddressRecord>, RendezvousError> {
        let (status, body) = self
            .request(&format!("GET /v1/records/{device}"), "")
            .await?;
        match status {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.protocol(format!("bad record: {e}"))),
            404 => Ok(None),
            _ => Err(self.refused(status, &body)),
        }
    }

    /// A device's record, if the server has one that is `device`'s, signed by it and live
    /// at `now`.
    pub async fn resolve(
        &self,
        device: DeviceId,
        now: u64,
        limits: &RecordLimits,
    ) -> Result<Option<AddressRecord>, RendezvousError> {
        let Some(record) = self.fetch(device).await? else {
            return Ok(None);
        };
        record
            .verify_for(device, now, limits)
            .map_err(|source| RendezvousError::Record {
                server: self.server,
                source,
            })?;
        Ok(Some(record))
    }

    async fn request(&self, line: &str, body: &str) -> Result<(u16, Vec<u8>), RendezvousError> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.server)
                .await
                .map_err(|e| self.io(e.to_string()))?;
            write_message(&mut stream, &format!("{line} HTTP/1.1"), body)
                .await
                .map_err(|e| self.io(e.to_string()))?;
            let (head, body) = read_message(&mut stream)
                .await
                .map_err(|e| self.protocol(e))?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| self.protocol("no status code".into()))?;
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| RendezvousError::Timeout {
                server: self.server,
                timeout: self.timeout,
            })?
    }

    fn io(&self, detail: String) -> RendezvousError {
        RendezvousError::Io {
            server: self.server,
            detail,
        }
    }

    fn protocol(&self, detail: String) -> RendezvousError {
        RendezvousError::Protocol {
            server: self.server,
            detail,
        }
    }

    fn refused(&self, status: u16, body: &[u8]) -> RendezvousError {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        RendezvousError::Refused {
            server: self.server,
            status,
            message,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The node's address source

/// How a node uses a rendezvous server.
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// The server.
    pub server: SocketAddr,
    /// Time between publishing the own record and resolving the members' records.
    pub interval: Duration,
    /// Lifetime of the records this node publishes (several intervals, so one lost
    /// publication does not make the device vanish).
    pub lifetime: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// What records from the server may claim.
    pub limits: RecordLimits,
}

impl RendezvousConfig {
    /// Defaults for `server`: publish and resolve every 30 s, records live 5 minutes.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            interval: Duration::from_secs(30),
            lifetime: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            limits: RecordLimits::default(),
        }
    }
}

/// What the background task learned, shared with the [`AddressSource`] the node polls.
#[derive(Default)]
struct Learned {
    /// The newest verified record of each member.
    records: BTreeMap<DeviceId, AddressRecord>,
    /// The last failure, for status and tests.
    last_error: Option<String>,
    /// Successful publications.
    published: u64,
}

/// An [`AddressSource`] backed by a rendezvous server. A background task publishes this
/// device's record and resolves its authority's members every interval (the node asks
/// sources synchronously at each round, so the network work happens beside it); the
/// source hands out the members' verified, unexpired addresses. Dropping it stops the
/// task.
pub struct RendezvousSource {
    learned: Arc<Mutex<Learned>>,
    task: JoinHandle<()>,
}

impl RendezvousSource {
    /// Starts publishing `listen` for `device` and resolving its members. Holds the device
    /// only weakly, so a stopped node's store can be reopened; must be called inside a
    /// tokio runtime.
    pub fn start(device: &Arc<Device>, listen: SocketAddr, config: RendezvousConfig) -> Self {
        let learned = Arc::new(Mutex::new(Learned::default()));
        let task = tokio::spawn(refresh_loop(
            Arc::downgrade(device),
            listen,
            config,
            learned.clone(),
        ));
        Self { learned, task }
    }

    /// The last error of publishing or resolving, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.learned).last_error.clone()
    }

    /// Records published so far.
    pub fn published(&self) -> u64 {
        lock(&self.learned).published
    }
}

impl Drop for RendezvousSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AddressSource for RendezvousSource {
    fn name(&self) -> &str {
        "rendezvous"
    }

    fn peers(&self) -> Vec<PeerAddr> {
        let now = unix_ms();
        lock(&self.learned)
            .records
            .values()
            .filter(|r| r.expires_at > now)
            .filter_map(AddressRecord::peer_addr)
            .collect()
    }
}

/// Adds a rendezvous source to a running node: it publishes the node's listen address and
/// resolves its members from now on.
pub fn attach(node: &impl DiscoveryHost, config: RendezvousConfig) {
    let source = RendezvousSource::start(node.device(), node.listen_addr(), config);
    node.add_source(Box::new(source));
}

async fn refresh_loop(
    device: Weak<Device>,
    listen: SocketAddr,
    config: RendezvousConfig,
    learned: Arc<Mutex<Learned>>,
) {
    let client = Client::new(config.server, config.timeout);
    let lifetime = config.lifetime.as_millis() as u64;
    let mut last_issued = 0u64;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Take what is needed from the device and let go of it before any network wait.
        let (key, me, members) = {
            let Some(device) = device.upgrade() else {
                return;
            };
            let members = device
                .store()
                .maintenance_state(device.namespace())
                .ok()
                .and_then(|s| s.membership().map(|m| m.members.clone()))
                .unwrap_or_default();
            (
                device.key().signing_key().clone(),
                device.device_id(),
                members,
            )
        };
        // Strictly increasing, so the server never refuses our own update as stale.
        let issued = unix_ms().max(last_issued + 1);
        last_issued = issued;
        let record = AddressRecord::sign(&key, vec![listen], issued, issued + lifetime);
        let mut error = match client.publish(&record).await {
            Ok(()) => {
                lock(&learned).published += 1;
                None
            }
            Err(e) => Some(e.to_string()),
        };
        let mut found = BTreeMap::new();
        for member in members.iter().filter(|m| **m != me) {
            match client.resolve(*member, unix_ms(), &config.limits).await {
                Ok(Some(r)) => {
                    found.insert(*member, r);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("rendezvous: {e}");
                    error = Some(e.to_string());
                }
            }
        }
        let mut l = lock(&learned);
        // Keep an earlier record the server no longer answers with until it expires, but
        // never for a device that left the membership; never go back to an older record.
        l.records.retain(|d, _| members.contains(d));
        for (d, r) in found {
            let newer = l
                .records
                .get(&d)
                .is_none_or(|old| r.issued_at > old.issued_at);
            if newer {
                l.records.insert(d, r);
            }
        }
        l.last_error = error;
    }
}
