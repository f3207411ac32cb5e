//! The control socket: a Unix socket `control.sock` in the home (0600) speaking
//! newline-delimited JSON, and the blocking [`Client`] the CLI uses to reach a running
//! device. While a device runs it holds the store, so every CLI command that needs the
//! store goes through here; [`ops`] holds the operations both paths share.
//!
//! Protocol version 1. A request is one line of at most [`MAX_REQUEST_BYTES`], a JSON
//! object with the version `v` and the command `cmd` (snake case of a [`Request`]
//! variant) beside the variant's fields; [`parse_request`] reads it. Examples:
//! `{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"add_fact","kind":"note","data":"text"}`,
//! `{"v":1,"cmd":"journal_list","from_epoch":0,"limit":100}`,
//! `{"v":1,"cmd":"snapshot_propose","epoch":12}` (a ceremony over the network),
//! `{"v":1,"cmd":"gc","dry_run":true}`,
//! `{"v":1,"cmd":"upgrade_publish","artifact":"/abs/path","version":"1.2.0","cohort":100}`,
//! `{"v":1,"cmd":"cache_check","key":"k","epoch":3}`,
//! `{"v":1,"cmd":"backup_export","out":"/abs/b.age","recipients":["age1..."]}`. The commands: `status`, `peers`,
//! `sync_now`, `add_fact`, `journal_list`, `authority_status`, `authority_create`,
//! `snapshot_status`, `snapshot_propose`, `gc`, `set_gc_policy`, `get_setting`,
//! `put_setting` (only the keys in [`PLUGIN_SETTINGS`]), `upgrade_status`,
//! `peer_trust`, `peer_ban`, `upgrade_publish`, `upgrade_widen`, `upgrade_activate`, `upgrade_apply`, `upgrade_configure`,
//! `admin_status`, `admin_replace`, `cache_invalidate`, `cache_check`, `backup_export`.
//!
//! `backup_export` writes an encrypted archive of the journal while the device keeps
//! syncing: the node runs the [`BackupExporter`] that `tend run` installs (tend-node
//! does not depend on tend-backup) on a blocking thread, over its open store. Paths are
//! absolute (the device's working directory is not the client's) and the device opens
//! them itself: it runs as the same user, the socket being owner-only. The passphrase
//! travels as the path of its file, never as text, so it is not in any request line (or
//! a log of one). A node without an exporter answers that it was started without backup
//! support. There is no progress over the socket; the answer is the export's report.
//!
//! Each request gets one line back: `{"v":1,"ok":true,"result":...}`, the result being the
//! same struct the CLI prints for that command on a stopped device, or
//! `{"v":1,"ok":false,"error":"..."}`. A malformed request, an unknown command or another
//! version gets an error line and the connection stays usable; a line longer than the
//! limit gets an error line and the connection is closed (the rest is not read).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{DeviceId, Epoch, VerifiedFact};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::ceremony::{CeremonyError, DEFAULT_CEREMONY_TIMEOUT};
use crate::device::{Device, GcReport, JournalStatus};
use crate::dkg::DkgNetError;
use crate::fleet::AuthorityCreated;
use crate::metrics::Metrics;
use crate::peer_table::PeerTableError;
use crate::status::{NodeStatus, PeerInfo, RoundReport};

pub mod ops;

pub use crate::error::error_line;

use ops::Op;

/// File name of the control socket in a home.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The control protocol version.
pub const CONTROL_VERSION: u32 = 1;
/// Longest request line accepted (a fact's data is at most 63 KiB, escaped JSON more).
pub const MAX_REQUEST_BYTES: usize = 512 * 1024;
/// Longest response line the client reads.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Settings that `get_setting` and `put_setting` may touch: those of plug-ins the node
/// stores but does not interpret (the snapshot triggers of `tend_backup::triggers`, whose
/// types live above this crate). Any other key is refused, so the socket cannot rewrite
/// the node's own state (peers, votes, upgrade outcomes).
pub const PLUGIN_SETTINGS: &[&str] = &["snapshot_triggers"];
/// How long the client waits for most answers.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client waits for a backup export: it streams the whole journal (about
/// 1.5 s per million facts on the benchmark machine), so a long wait means a very large
/// journal or a slow disk, not a wedged device.
const EXPORT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The answer to `backup_export` on a node without a [`BackupExporter`].
pub const NO_BACKUP_SUPPORT: &str =
    "this device was started without backup support (`tend run` provides it)";

/// What `backup_export` asks of the [`BackupExporter`]: the request's fields, its paths
/// checked to be absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRequest {
    /// The archive to write (must not exist).
    pub out: PathBuf,
    /// A file holding the passphrase, which the device reads.
    pub passphrase_file: Option<PathBuf>,
    /// age public keys whose identities may open the archive.
    pub recipients: Vec<String>,
}

/// The error a [`BackupExporter`] returns; the client gets it as one line with its causes.
pub type ExportFailure = Box<dyn std::error::Error + Send + Sync>;

/// Writes a backup archive of the running device's journal, from the device's open store,
/// and returns the export's report as JSON. `tend run` installs tend-backup's export
/// (tend-node does not depend on tend-backup); the node calls it on a blocking thread,
/// so sync goes on meanwhile.
#[derive(Clone)]
pub struct BackupExporter(
    #[allow(clippy::type_complexity)]
    pub  Arc<
        dyn Fn(&Device, &ExportRequest) -> Result<serde_json::Value, ExportFailure> + Send + Sync,
    >,
);

impl std::fmt::Debug for BackupExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupExporter")
    }
}

/// An error of the running device, answered as one line with its causes.
pub type Failure = Box<dyn std::error::Error + Send + Sync>;

/// What the control socket asks of the running device it serves. [`crate::Node`]
/// implements it, so the socket sits below the node and never names it.
pub(crate) trait RunningDevice: Send + Sync + 'static {
    /// The device (its store is shared with the node).
    fn device(&self) -> &Arc<Device>;
    /// The metrics.
    fn metrics(&self) -> &Metrics;
    /// The node's status (`status`).
    fn status(&self) -> Result<NodeStatus, Failure>;
    /// Known peers, with scores (`peers`).
    fn peers(&self) -> Vec<PeerInfo>;
    /// Sets the operator's trust for a peer (`None`: back to its role's) or bans it.
    fn edit_peer(
        &self,
        device: DeviceId,
        trust: Option<Option<f64>>,
        banned: Option<bool>,
    ) -> Result<PeerInfo, PeerTableError>;
    /// Runs one sync round now.
    fn sync_now(&self) -> BoxFuture<'_, RoundReport>;
    /// Appends an application fact.
    fn add_fact(&self, kind: &str, data: &[u8]) -> Result<VerifiedFact, Failure>;
    /// Runs a snapshot ceremony over the network.
    fn propose_snapshot(
        &self,
        target: Option<Epoch>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<SnapshotCompleted, CeremonyError>>;
    /// Makes the authority a `threshold`-of-N one of this device and `members`.
    fn create_authority<'a>(
        &'a self,
        threshold: u16,
        members: &'a [DeviceId],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<AuthorityCreated, DkgNetError>>;
    /// GC off the async workers.
    fn gc(&self, dry_run: bool) -> Result<GcReport, Failure>;
    /// Whether an upgrade pipeline run is in progress.
    fn upgrade_running(&self) -> bool;
    /// Tells running sessions about a store write.
    fn after_local_write(&self);
    /// The installed backup exporter, if any.
    fn backup_exporter(&self) -> Option<BackupExporter>;
}

/// The running device a control connection talks to.
type Served = Arc<dyn RunningDevice>;

/// Why a request line was refused before it reached the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request of more than {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("malformed request: missing or non-integer version field \"v\"")]
    MissingVersion,
    #[error("control protocol version {0} is not supported (this device speaks 1)")]
    Version(u64),
}

/// Reads one request line (without or with its trailing newline): at most
/// [`MAX_REQUEST_BYTES`], a JSON object whose `v` is [`CONTROL_VERSION`], and a known
/// command with its fields. Pure: the server and the fuzz target call only this.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong(MAX_REQUEST_BYTES));
    }
    // The version is checked before the command, so a newer client gets "version 2 is
    // not supported" rather than a complaint about a command it knows and we do not.
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| RequestError::Malformed(e.to_string()))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(CONTROL_VERSION) => {}
        Some(v) => return Err(RequestError::Version(v)),
        None => return Err(RequestError::MissingVersion),
    }
    // serde would also take a variant's index as the tag (`"cmd":7`): only names count.
    if !value.get("cmd").is_some_and(serde_json::Value::is_string) {
        return Err(RequestError::Malformed(
            "the command \"cmd\" must be a string".into(),
        ));
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| RequestError::Malformed(e.to_string()))
}

/// Why the control socket or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot serve the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another device is already running in this home ({0} answers)")]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running device answered with something unreadable: {0}")]
    BadResponse(String),
    #[error("the running device speaks control protocol {0}, this client speaks 1")]
    Version(u32),
    #[error("{0}")]
    Remote(String),
}

/// The line a client sends for `request` (without the newline).
pub fn encode_request(request: &Request) -> Result<String, serde_json::Error> {
    serde_json::to_string(&EnvelopeRef {
        v: CONTROL_VERSION,
        request,
    })
}

/// The fuzz target's and the corpus test's check: [`parse_request`] must not panic, and
/// a request that parses must come back unchanged from [`encode_request`] and another
/// parse (what the client sends is what the device reads). Panics if it does not.
pub fn check_request_line(line: &[u8]) -> Result<Request, RequestError> {
    let request = parse_request(line)?;
    let again = encode_request(&request)
        .map_err(|e| RequestError::Malformed(e.to_string()))
        .and_then(|l| parse_request(l.as_bytes()));
    assert_eq!(
        again.as_ref(),
        Ok(&request),
        "a parsed request does not survive encoding"
    );
    Ok(request)
}

/// A control request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Device id, listen address, peers, journal status.
    Status,
    /// Peer metadata and scores.
    Peers,
    /// Run a sync round now.
    SyncNow,
    /// Append an application fact.
    AddFact {
        /// The application's name for this kind of fact.
        kind: String,
        /// The fact's data, as text.
        data: String,
    },
    /// Run a snapshot ceremony coordinated by this device; answers with the completion.
    SnapshotPropose {
        /// Target epoch (default: the current epoch + 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
        /// Give up after this many seconds (default 30).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Make this device's authority a threshold authority by key generation over the
    /// network among this device and `members` (device ids).
    AuthorityCreate {
        /// Signatures needed for a snapshot.
        threshold: u16,
        /// The other members' device ids.
        members: Vec<String>,
        /// Give up after this many seconds (default 60).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Up to `limit` facts from `from_epoch` on, in `(epoch, id)` order.
    JournalList(ops::ListJournal),
    /// Members, threshold, group key, identity epoch and admin.
    AuthorityStatus(ops::GetAuthorityStatus),
    /// The latest verified snapshot, open proposals and the GC policy.
    SnapshotStatus(ops::GetSnapshotStatus),
    /// Prunes what the latest verified snapshot covers (or reports it, with `dry_run`),
    /// then compacts the store once no sync session holds it (see `GcReport::compacted`).
    Gc {
        /// Report without pruning.
        #[serde(default)]
        dry_run: bool,
    },
    /// Sets the device's GC policy.
    SetGcPolicy(ops::SetGcPolicy),
    /// A plug-in setting (one of [`PLUGIN_SETTINGS`]); `null` when unset.
    GetSetting {
        /// The setting's key.
        key: String,
    },
    /// Writes a plug-in setting (one of [`PLUGIN_SETTINGS`]).
    PutSetting {
        /// The setting's key.
        key: String,
        /// Its JSON value.
        value: serde_json::Value,
    },
    /// Packages, readiness, this device's outcomes and fence status.
    UpgradeStatus(ops::GetUpgradeStatus),
    /// Publishes an upgrade package (admin only).
    UpgradePublish(ops::PublishUpgrade),
    /// Sets the operator's trust for a peer, in [0, 1] (absent: back to its role's).
    PeerTrust {
        /// The peer's device id (hex).
        device_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trust: Option<crate::peer_table::Trust>,
    },
    /// Bans a peer (no sync sessions either way) or lifts a ban.
    PeerBan {
        /// The peer's device id (hex).
        device_id: String,
        banned: bool,
    },
    /// Widens a package's staged rollout (admin only).
    UpgradeWiden(ops::WidenUpgrade),
    /// Activates a package (admin only).
    UpgradeActivate(ops::ActivateUpgrade),
    /// Runs the upgrade pipeline now.
    UpgradeApply(ops::ApplyUpgrades),
    /// Sets the install command, upgrade policy or install attempts (those given).
    UpgradeConfigure(ops::ConfigureUpgrades),
    /// The admin in charge and its replacements.
    AdminStatus(ops::GetAdminStatus),
    /// Hands the admin role to `new` from `at_epoch`.
    AdminReplace(ops::ReplaceAdmin),
    /// Invalidates cache keys.
    CacheInvalidate(ops::InvalidateCache),
    /// Whether an entry cached at `epoch` under `key` is still valid.
    CacheCheck(ops::CheckCache),
    /// An application data operation (collections, logs, the replicated cache):
    /// `{"v":1,"cmd":"data","op":"put","collection":"c","key":"k","value":"<base64>"}`.
    Data(crate::data::DataRequest),
    /// Writes an encrypted backup archive of the journal (with the plug-in `tend run`
    /// installs); the answer is the export's report.
    BackupExport {
        /// Absolute path of the archive to write (must not exist); the device writes it
        /// under a temporary name and renames it at the end.
        out: PathBuf,
        /// Absolute path of a file holding the passphrase: the device reads it, so the
        /// passphrase itself never crosses the socket.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase_file: Option<PathBuf>,
        /// age public keys (age1...) whose identities may open the archive.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        recipients: Vec<String>,
    },
}

impl Request {
    /// How long the client waits for the answer: ceremonies and installs take longer
    /// than their own timeouts allow the device.
    fn response_timeout(&self) -> Duration {
        let margin = Duration::from_secs(30);
        match self {
            Request::SnapshotPropose { timeout_secs, .. } => {
                timeout_secs.map_or(
                    crate::ceremony::DEFAULT_CEREMONY_TIMEOUT,
                    Duration::from_secs,
                ) + margin
            }
            Request::AuthorityCreate { timeout_secs, .. } => {
                Duration::from_secs(timeout_secs.unwrap_or(60)) + margin
            }
            Request::UpgradeApply(_) => ops::INSTALL_TIMEOUT + margin,
            Request::BackupExport { .. } => EXPORT_RESPONSE_TIMEOUT,
            _ => DEFAULT_RESPONSE_TIMEOUT,
        }
        .max(DEFAULT_RESPONSE_TIMEOUT)
    }
}

#[derive(Deserialize)]
struct Envelope {
    // Read (and checked) by `parse_request` before the envelope is.
    #[allow(dead_code)]
    v: u32,
    #[serde(flatten)]
    request: Request,
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u32,
    #[serde(flatten)]
    request: &'a Request,
}

/// A control response line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// One line saying why, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(v) => Self {
                v: CONTROL_VERSION,
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Self::err(format!("cannot encode the result: {e}")),
        }
    }

    fn err(msg: impl Into<String>) -> Self {
        Self {
            v: CONTROL_VERSION,
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// What `add_fact` returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddedFact {
    /// The fact id (hex).
    pub id: String,
    /// The journal epoch it was stamped with.
    pub epoch: u64,
}

/// The control socket path of a home.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join(CONTROL_SOCKET)
}

/// Binds `control.sock` in the node's home (0600) and serves it. A stale socket file
/// (nobody answers) is replaced; a live one means another device runs here.
pub(crate) fn serve(node: Served) -> Result<(PathBuf, JoinHandle<()>), ControlError> {
    let path = socket_path(node.device().home());
    if path.exists() {
        if StdUnixStream::connect(&path).is_ok() {
            return Err(ControlError::AlreadyRunning(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| ControlError::Bind {
        path: path.clone(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ControlError::Bind {
                path: path.clone(),
                source,
            },
        )?;
    }
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move { serve_client(node, stream).await });
        }
    });
    Ok((path, task))
}

async fn serve_client(node: Served, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = TokioBufReader::new(read);
    loop {
        let line = match read_line_limited(&mut reader, MAX_REQUEST_BYTES).await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(max))) => {
                // The rest of the line is still unread: answer, and hang up rather than
                // parse its tail as requests.
                let resp = Response::err(RequestError::TooLong(max).to_string());
                let _ = write_response(&mut write, &resp).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let resp = match parse_request(&line) {
            Ok(request) => answer(&node, request).await,
            Err(e) => Response::err(e.to_string()),
        };
        if write_response(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

/// Reads one line of at most `max` bytes (without its newline): `None` at end of input,
/// `Some(Err(max))` when the line is longer (the rest is not read).
async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Result<Vec<u8>, usize>>> {
    let mut buf = Vec::new();
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() { None } else { Some(Ok(buf)) });
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        buf.extend_from_slice(chunk);
        let consumed = done.unwrap_or(chunk.len());
        r.consume(consumed);
        if buf.len() > max {
            return Ok(Some(Err(max)));
        }
        if done.is_some() {
            return Ok(Some(Ok(buf)));
        }
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp)
        .unwrap_or_else(|_| br#"{"v":1,"ok":false,"error":"cannot encode response"}"#.to_vec());
    line.push(b'\n');
    w.write_all(&line).await
}

/// Runs `f` on the node off the async workers (store reads and writes block) and turns
/// its outcome into a response.
async fn on_node<T, E, F>(node: &Served, f: F) -> Response
where
    T: Serialize + Send + 'static,
    E: Into<Failure> + Send + 'static,
    F: FnOnce(&dyn RunningDevice) -> Result<T, E> + Send + 'static,
{
    let node = node.clone();
    match tokio::task::spawn_blocking(move || f(&*node)).await {
        Ok(Ok(v)) => Response::ok(v),
        Ok(Err(e)) => Response::err(error_line(&*e.into())),
        Err(e) => Response::err(format!("the request failed: {e}")),
    }
}

/// Like [`on_node`] for a write: running sessions hear about it afterwards (a membership
/// or epoch change aborts the sessions under the old identity epoch).
async fn write_on_node<T, E, F>(node: &Served, f: F) -> Response
where
    T: Serialize + Send + 'static,
    E: Into<Failure> + Send + 'static,
    F: FnOnce(&dyn RunningDevice) -> Result<T, E> + Send + 'static,
{
    on_node(node, move |n| {
        let r = f(n);
        n.after_local_write();
        r
    })
    .await
}

/// Runs one [`Op`] on the running device: the same `run` a stopped device's CLI calls.
async fn run_op<O: Op>(node: &Served, op: O) -> Response {
    if op.writes() {
        write_on_node(node, move |n| op.run(n.device())).await
    } else {
        on_node(node, move |n| op.run(n.device())).await
    }
}

/// Each [`Op`] is the request of one command.
macro_rules! op_requests {
    ($($op:ty => $variant:ident),* $(,)?) => {
        $(impl From<$op> for Request {
            fn from(op: $op) -> Request {
                Request::$variant(op)
            }
        })*
    };
}

op_requests! {
    ops::ListJournal => JournalList,
    ops::GetAuthorityStatus => AuthorityStatus,
    ops::GetSnapshotStatus => SnapshotStatus,
    ops::SetGcPolicy => SetGcPolicy,
    ops::GetUpgradeStatus => UpgradeStatus,
    ops::PublishUpgrade => UpgradePublish,
    ops::WidenUpgrade => UpgradeWiden,
    ops::ActivateUpgrade => UpgradeActivate,
    ops::ApplyUpgrades => UpgradeApply,
    ops::ConfigureUpgrades => UpgradeConfigure,
    ops::GetAdminStatus => AdminStatus,
    ops::ReplaceAdmin => AdminReplace,
    ops::InvalidateCache => CacheInvalidate,
    ops::CheckCache => CacheCheck,
    crate::data::DataRequest => Data,
}

fn plugin_setting(key: &str) -> Result<(), ops::OpError> {
    if PLUGIN_SETTINGS.contains(&key) {
        Ok(())
    } else {
        Err(ops::OpError::Invalid(format!(
            "setting {key:?} is not available through the control socket"
        )))
    }
}

async fn answer(node: &Served, request: Request) -> Response {
    match request {
        Request::Status => match node.status() {
            Ok(s) => Response::ok(s),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Peers => Response::ok(node.peers()),
        Request::PeerTrust { device_id, trust } => {
            on_node(node, move |n| {
                let device = crate::peer_table::parse_device(&device_id)?;
                n.edit_peer(device, Some(trust.map(|t| t.0)), None)
            })
            .await
        }
        Request::PeerBan { device_id, banned } => {
            on_node(node, move |n| {
                let device = crate::peer_table::parse_device(&device_id)?;
                n.edit_peer(device, None, Some(banned))
            })
            .await
        }
        Request::SyncNow => Response::ok(node.sync_now().await),
        Request::AddFact { kind, data } => match node.add_fact(&kind, data.as_bytes()) {
            Ok(f) => Response::ok(AddedFact {
                id: f.id().to_string(),
                epoch: f.epoch().0,
            }),
            Err(e) => Response::err(e.to_string()),
        },
        Request::SnapshotPropose {
            epoch,
            timeout_secs,
        } => {
            let timeout = timeout_secs.map_or(DEFAULT_CEREMONY_TIMEOUT, Duration::from_secs);
            match node
                .propose_snapshot(epoch.map(tend_core::Epoch), timeout)
                .await
            {
                Ok(c) => Response::ok(SnapshotDone {
                    proposal_id: c.proposal_id.to_string(),
                    epoch: c.snapshot.epoch.0,
                    digest: c.snapshot.digest.to_string(),
                    blob_cid: c.snapshot.blob_cid.to_string(),
                }),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::AuthorityCreate {
            threshold,
            members,
            timeout_secs,
        } => {
            let mut ids = Vec::new();
            for m in &members {
                match m.parse::<tend_core::DeviceId>() {
                    Ok(d) => ids.push(d),
                    Err(e) => return Response::err(format!("bad member {m:?}: {e}")),
                }
            }
            let timeout = Duration::from_secs(timeout_secs.unwrap_or(60));
            match node.create_authority(threshold, &ids, timeout).await {
                Ok(c) => Response::ok(c),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::JournalList(op) => run_op(node, op).await,
        Request::AuthorityStatus(op) => run_op(node, op).await,
        Request::SnapshotStatus(op) => run_op(node, op).await,
        Request::Gc { dry_run } => write_on_node(node, move |n| n.gc(dry_run)).await,
        Request::SetGcPolicy(op) => run_op(node, op).await,
        Request::GetSetting { key } => {
            on_node(node, move |n| {
                plugin_setting(&key)?;
                Ok::<_, ops::OpError>(n.device().store().get_setting::<serde_json::Value>(&key)?)
            })
            .await
        }
        Request::PutSetting { key, value } => {
            on_node(node, move |n| {
                plugin_setting(&key)?;
                n.device().store().put_setting(&key, &value)?;
                Ok::<_, ops::OpError>(value)
            })
            .await
        }
        Request::UpgradeStatus(op) => run_op(node, op).await,
        Request::UpgradePublish(op) => run_op(node, op).await,
        Request::UpgradeWiden(op) => run_op(node, op).await,
        Request::UpgradeActivate(op) => run_op(node, op).await,
        Request::UpgradeApply(op) => {
            // The node runs the pipeline by itself after rounds that bring data; two runs
            // at once could install twice.
            if node.upgrade_running() {
                return Response::err(
                    "the device is running its upgrade pipeline right now; try again shortly",
                );
            }
            run_op(node, op).await
        }
        Request::UpgradeConfigure(op) => run_op(node, op).await,
        Request::AdminStatus(op) => run_op(node, op).await,
        Request::AdminReplace(op) => run_op(node, op).await,
        Request::CacheInvalidate(op) => run_op(node, op).await,
        Request::CacheCheck(op) => run_op(node, op).await,
        Request::Data(op) if op.is_write() => {
            let after = node.clone();
            let written = crate::data::write(node.device(), op, move || after.after_local_write());
            match written.await {
                Ok(v) => Response::ok(v),
                Err(e) => Response::err(error_line(&e)),
            }
        }
        Request::Data(op) => run_op(node, op).await,
        Request::BackupExport {
            out,
            passphrase_file,
            recipients,
        } => {
            let Some(exporter) = node.backup_exporter() else {
                return Response::err(NO_BACKUP_SUPPORT);
            };
            // The device's working directory is not the client's.
            for p in std::iter::once(&out).chain(passphrase_file.as_ref()) {
                if !p.is_absolute() {
                    return Response::err(format!("the path {} is not absolute", p.display()));
                }
            }
            let request = ExportRequest {
                out,
                passphrase_file,
                recipients,
            };
            // A read of the whole journal: off the async workers, so sessions go on.
            let worker = node.clone();
            let done =
                tokio::task::spawn_blocking(move || (exporter.0)(worker.device(), &request)).await;
            let outcome = if matches!(done, Ok(Ok(_))) {
                "ok"
            } else {
                "failed"
            };
            node.metrics()
                .count_outcome(&node.metrics().backups, outcome);
            match done {
                Ok(Ok(report)) => Response::ok(report),
                Ok(Err(e)) => Response::err(error_line(&*e)),
                Err(e) => Response::err(format!("the export failed: {e}")),
            }
        }
    }
}

/// What `snapshot_propose` returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDone {
    /// The proposal id (hex).
    pub proposal_id: String,
    /// The snapshot's epoch: it covers every fact below.
    pub epoch: u64,
    /// The prefix digest.
    pub digest: String,
    /// The snapshot blob's CID.
    pub blob_cid: String,
}

/// A blocking client of a running device's control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<StdUnixStream>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish()
    }
}

impl Client {
    /// Connects to the device running in `home`; `Ok(None)` when none answers there.
    pub fn connect(home: &Path) -> Result<Option<Client>, ControlError> {
        let path = socket_path(home);
        if !path.exists() {
            return Ok(None);
        }
        let stream = match StdUnixStream::connect(&path) {
            Ok(s) => s,
            // A stale socket of a device that is gone.
            Err(_) => return Ok(None),
        };
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        // A sync round may take a while; a wedged device should not hang the CLI forever.
        stream
            .set_read_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
            .map_err(io)?;
        Ok(Some(Client {
            reader: BufReader::new(stream),
            path,
        }))
    }

    /// Sends one raw line and returns the raw response (for tests of bad requests).
    pub fn raw(&mut self, line: &str) -> Result<Response, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes()).map_err(io)?;
        stream.write_all(b"\n").map_err(io)?;
        stream.flush().map_err(io)?;
        let mut buf = Vec::new();
        let n = std::io::Read::take(&mut self.reader, MAX_RESPONSE_BYTES as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::BadResponse("connection closed".into()));
        }
        if n as u64 == MAX_RESPONSE_BYTES as u64 && buf.last() != Some(&b'\n') {
            // The rest of the line is still in the socket: this connection is spent.
            return Err(ControlError::BadResponse(format!(
                "the answer is longer than {} MiB (ask for less, e.g. a smaller --limit)",
                MAX_RESPONSE_BYTES >> 20
            )));
        }
        let resp: Response =
            serde_json::from_slice(&buf).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        if resp.v != CONTROL_VERSION {
            return Err(ControlError::Version(resp.v));
        }
        Ok(resp)
    }

    /// Sends a request; the result on success, [`ControlError::Remote`] otherwise.
    pub fn request(&mut self, request: Request) -> Result<serde_json::Value, ControlError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(request.response_timeout()))
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        let line =
            encode_request(&request).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        let resp = self.raw(&line)?;
        if resp.ok {
            Ok(resp.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ControlError::Remote(
                resp.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }

    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        request: Request,
    ) -> Result<T, ControlError> {
        serde_json::from_value(self.request(request)?)
            .map_err(|e| ControlError::BadResponse(e.to_string()))
    }

    /// Runs an application data operation on the running device.
    pub fn data(
        &mut self,
        request: crate::data::DataRequest,
    ) -> Result<crate::data::DataResponse, ControlError> {
        self.run(request)
    }

    /// Runs `op` on the running device: the same [`Op::run`] a stopped device runs in
    /// the CLI, so the answer is the same struct either way.
    pub fn run<O: Op + Into<Request>>(&mut self, op: O) -> Result<O::Output, ControlError> {
        self.typed(op.into())
    }

    /// The device's status.
    pub fn status(&mut self) -> Result<NodeStatus, ControlError> {
        self.typed(Request::Status)
    }

    /// The journal part of the status (what `tend journal status` shows).
    pub fn journal_status(&mut self) -> Result<JournalStatus, ControlError> {
        Ok(self.status()?.journal)
    }

    /// Known peers.
    pub fn peers(&mut self) -> Result<Vec<PeerInfo>, ControlError> {
        self.typed(Request::Peers)
    }

    /// Runs a sync round now.
    pub fn sync_now(&mut self) -> Result<RoundReport, ControlError> {
        self.typed(Request::SyncNow)
    }

    /// Runs a snapshot ceremony on the running device.
    pub fn snapshot_propose(
        &mut self,
        epoch: Option<u64>,
        timeout_secs: Option<u64>,
    ) -> Result<SnapshotDone, ControlError> {
        self.typed(Request::SnapshotPropose {
            epoch,
            timeout_secs,
        })
    }

    /// Runs key generation over the network from the running (admin) device.
    pub fn authority_create(
        &mut self,
        threshold: u16,
        members: Vec<String>,
    ) -> Result<crate::fleet::AuthorityCreated, ControlError> {
        self.typed(Request::AuthorityCreate {
            threshold,
            members,
            timeout_secs: None,
        })
    }

    /// Appends an application fact.
    pub fn add_fact(&mut self, kind: &str, data: &str) -> Result<AddedFact, ControlError> {
        self.typed(Request::AddFact {
            kind: kind.into(),
            data: data.into(),
        })
    }

    /// Prunes (or with `dry_run` reports) what the latest verified snapshot covers.
    pub fn gc(&mut self, dry_run: bool) -> Result<GcReport, ControlError> {
        self.typed(Request::Gc { dry_run })
    }

    /// A plug-in setting (one of [`PLUGIN_SETTINGS`]), `None` when unset.
    pub fn get_setting<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, ControlError> {
        self.typed(Request::GetSetting { key: key.into() })
    }

    /// Writes a plug-in setting (one of [`PLUGIN_SETTINGS`]).
    pub fn put_setting<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), ControlError> {
        let value =
            serde_json::to_value(value).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        self.request(Request::PutSetting {
            key: key.into(),
            value,
        })
        .map(drop)
    }

    /// Sets (or with `None` clears) the operator's trust for a peer.
    pub fn peer_trust(
        &mut self,
        device_id: String,
        trust: Option<f64>,
    ) -> Result<PeerInfo, ControlError> {
        self.typed(Request::PeerTrust {
            device_id,
            trust: trust.map(crate::peer_table::Trust),
        })
    }

    /// Bans a peer or lifts a ban.
    pub fn peer_ban(&mut self, device_id: String, banned: bool) -> Result<PeerInfo, ControlError> {
        self.typed(Request::PeerBan { device_id, banned })
    }

    /// Has the running device write a backup archive to `out` (absolute, as is
    /// `passphrase_file`); the export's report, as the device's exporter gives it.
    pub fn backup_export(
        &mut self,
        out: PathBuf,
        passphrase_file: Option<PathBuf>,
        recipients: Vec<String>,
    ) -> Result<serde_json::Value, ControlError> {
        self.request(Request::BackupExport {
            out,
            passphrase_file,
            recipients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_through_its_line() {
        let req = Request::from(ops::ConfigureUpgrades {
            install_cmd: Some("true".into()),
            policy: Some(tend_core::maintenance::UpgradePolicy::Manual),
            max_attempts: None,
        });
        let line = encode_request(&req).unwrap();
        assert!(
            line.starts_with(r#"{"v":1,"cmd":"upgrade_configure""#),
            "{line}"
        );
        assert_eq!(parse_request(line.as_bytes()), Ok(req));
        // A command without fields reads as before it became an `Op`.
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"upgrade_status"}"#),
            Ok(Request::UpgradeStatus(ops::GetUpgradeStatus {}))
        );
        assert_eq!(
            encode_request(&ops::GetAdminStatus {}.into()).unwrap(),
            r#"{"v":1,"cmd":"admin_status"}"#
        );
        // The newline the server strips may also be left on.
        assert_eq!(
            parse_request(b"{\"v\":1,\"cmd\":\"status\"}\n"),
            Ok(Request::Status)
        );
    }

    #[test]
    fn the_version_is_checked_before_the_command() {
        assert_eq!(
            parse_request(br#"{"v":2,"cmd":"no_such_thing"}"#),
            Err(RequestError::Version(2))
        );
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#),
            Err(RequestError::MissingVersion)
        );
        assert!(matches!(
            parse_request(br#"{"v":1,"cmd":"no_such_thing"}"#),
            Err(RequestError::Malformed(_))
        ));
        // A variant's index is not a command.
        assert!(matches!(
            parse_request(br#"{"v":1,"cmd":0}"#),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn a_line_over_the_limit_is_refused_before_it_is_read() {
        let mut line = br#"{"v":1,"cmd":"add_fact","kind":"k","data":""#.to_vec();
        line.resize(MAX_REQUEST_BYTES, b'a');
        line.extend_from_slice(br#""}"#);
        assert_eq!(
            parse_request(&line),
            Err(RequestError::TooLong(MAX_REQUEST_BYTES))
        );
        // At the limit exactly, the same request is fine.
        let mut line = br#"{"v":1,"cmd":"add_fact","kind":"k","data":""#.to_vec();
        line.resize(MAX_REQUEST_BYTES - 2, b'a');
        line.extend_from_slice(br#""}"#);
        assert!(matches!(parse_request(&line), Ok(Request::AddFact { .. })));
    }

    #[test]
    fn ceremonies_and_installs_wait_longer_than_their_own_timeouts() {
        let propose = Request::SnapshotPropose {
            epoch: None,
            timeout_secs: Some(600),
        };
        assert!(propose.response_timeout() > Duration::from_secs(600));
        let apply = Request::from(ops::ApplyUpgrades {
            install_cmd: None,
            retry: false,
        });
        assert!(apply.response_timeout() > ops::INSTALL_TIMEOUT);
        assert_eq!(Request::Status.response_timeout(), DEFAULT_RESPONSE_TIMEOUT);
        let export = Request::BackupExport {
            out: "/b.age".into(),
            passphrase_file: None,
            recipients: vec![],
        };
        assert!(export.response_timeout() > Duration::from_secs(600));
    }

    #[test]
    fn a_backup_export_carries_the_passphrase_file_path() {
        let line = br#"{"v":1,"cmd":"backup_export","out":"/x/b.age","passphrase_file":"/x/pass"}"#;
        assert_eq!(
            parse_request(line),
            Ok(Request::BackupExport {
                out: "/x/b.age".into(),
                passphrase_file: Some("/x/pass".into()),
                recipients: vec![],
            })
        );
    }
}
