//! The control socket: a Unix socket `control.sock` in the home (0600) speaking
//! newline-delimited JSON, and the blocking [`Client`] the CLI uses to reach a running
//! device.
//!
//! Protocol version 1. A request is one line, at most [`MAX_REQUEST_BYTES`]:
//! `{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"peers"}`, `{"v":1,"cmd":"sync_now"}`,
//! `{"v":1,"cmd":"add_fact","kind":"note","data":"text"}`,
//! `{"v":1,"cmd":"snapshot_propose","epoch":12}` (a ceremony over the network; `epoch` and
//! `timeout_secs` optional), `{"v":1,"cmd":"authority_create","threshold":2,"members":
//! ["<device id>",...]}` (key generation over the network). Each gets one line back:
//! `{"v":1,"ok":true,"result":...}` or `{"v":1,"ok":false,"error":"..."}`. A malformed
//! request gets an error line; the connection stays usable.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::device::JournalStatus;
use crate::node::{Node, NodeStatus, PeerInfo, RoundReport};

/// File name of the control socket in a home.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The control protocol version.
pub const CONTROL_VERSION: u32 = 1;
/// Longest request line accepted (a fact's data is at most 63 KiB, escaped JSON more).
pub const MAX_REQUEST_BYTES: usize = 512 * 1024;
/// Longest response line the client reads.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

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
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    request: Request,
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
pub(crate) fn serve(node: Node) -> Result<(PathBuf, JoinHandle<()>), ControlError> {
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

async fn serve_client(node: Node, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = TokioBufReader::new(read);
    loop {
        let line = match read_line_limited(&mut reader, MAX_REQUEST_BYTES).await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(too_long))) => {
                let resp =
                    Response::err(format!("request of more than {too_long} bytes is too long"));
                let _ = write_response(&mut write, &resp).await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        if line.trim().is_empty() {
            continue;
        }
        let resp = answer(&node, &line).await;
        if write_response(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

/// Reads one line of at most `max` bytes: `None` at end of input, `Some(Err(max))` when
/// the line is longer (the rest is not read).
async fn read_line_limited<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Result<String, usize>>> {
    let mut buf = Vec::new();
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                None
            } else {
                Some(Ok(String::from_utf8_lossy(&buf).into_owned()))
            });
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
            return Ok(Some(Ok(String::from_utf8_lossy(&buf).into_owned())));
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

async fn answer(node: &Node, line: &str) -> Response {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Response::err(format!("malformed request: {e}")),
    };
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(CONTROL_VERSION) => {}
        Some(v) => {
            return Response::err(format!(
                "control protocol version {v} is not supported (this device speaks 1)"
            ))
        }
        None => return Response::err("malformed request: missing version field \"v\""),
    }
    let req: Envelope = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return Response::err(format!("malformed request: {e}")),
    };
    match req.request {
        Request::Status => match node.status() {
            Ok(s) => Response::ok(s),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Peers => Response::ok(node.peers()),
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
            let timeout = timeout_secs.map_or(
                crate::ceremony::DEFAULT_CEREMONY_TIMEOUT,
                Duration::from_secs,
            );
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
            .set_read_timeout(Some(Duration::from_secs(120)))
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
        let resp: Response =
            serde_json::from_slice(&buf).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        if resp.v != CONTROL_VERSION {
            return Err(ControlError::Version(resp.v));
        }
        Ok(resp)
    }

    /// Sends a request; the result on success, [`ControlError::Remote`] otherwise.
    pub fn request(&mut self, request: Request) -> Result<serde_json::Value, ControlError> {
        let line = serde_json::to_string(&Envelope {
            v: CONTROL_VERSION,
            request,
        })
        .map_err(|e| ControlError::BadResponse(e.to_string()))?;
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
}
