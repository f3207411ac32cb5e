//! The local HTTP API of a running device (`tend run --api 127.0.0.1:PORT`), on axum: the
//! public way for programs in any language to read and write the application state and to
//! follow the device's changes live. The control socket stays the CLI's private channel.
//!
//! - `GET/PUT/DELETE /v1/kv/{collection}/{key}`: values as `application/octet-stream`
//!   (a key may contain `/`); `GET /v1/kv/{collection}?prefix=&after=&limit=` (JSON).
//! - `POST /v1/logs/{log}` (the body is the entry; answers its cursor),
//!   `GET /v1/logs/{log}?after=&limit=` (JSON).
//! - `GET /v1/changes?since=CURSOR`: Server-Sent Events, one per fact the device admits
//!   (its own writes and what sync brings), in admission order, live; each event's id is
//!   its cursor, so a client resumes with `Last-Event-ID` (see `tend_store::changes`).
//! - `GET /v1/status`: the node's status, with what the dashboard shows besides (the
//!   authority, snapshots and GC, live state counts, upgrades, sync counters).
//! - `GET /`: the fleet dashboard ([`dashboard`]), a page embedded in the binary.
//!
//! Every request but the dashboard's page and assets needs `Authorization: Bearer TOKEN`,
//! the token in `HOME/api.token` (0600, made when absent); without it the answer is 401
//! and nothing is read or written. The page holds no data: it asks for the token and
//! sends it with each of its own requests.
//! Errors are JSON `{"error": "..."}`. Writes go through the device's group commit with
//! [`crate::data::write`], as the control socket's do, and running sessions hear about
//! them. Store work runs off the async workers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use tend_core::app::{LogCursor, Value};
use tend_core::{DataOp, Payload};
use tend_crypto::secret_file::{self, KeyFileError};
use tend_store::{Change, StoreError};
use tokio::sync::watch;

use crate::control::error_line;
use crate::data::{self, Bytes64, DataRequest, DataResponse, LogEntry, ValueRead, Written};
use crate::device::{Device, DeviceError};
use crate::node::Node;

pub mod dashboard;

/// The token file in the device's home.
pub const TOKEN_FILE: &str = "api.token";
/// Largest log entry `POST /v1/logs/{log}` accepts (an entry is one fact).
pub const MAX_LOG_ENTRY_BYTES: usize = tend_core::MAX_FACT_BYTES - 1024;
/// Changes read from the store at a time by one feed.
const FEED_PAGE: usize = 256;
/// Entries a scan or log read returns when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0} is not a tend home (no store.redb); run `tend init --home {0}` first")]
    NotInitialised(PathBuf),
    #[error("the API token: {0}")]
    Token(#[from] KeyFileError),
    #[error("cannot serve the HTTP API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The API token of the device in `home`: read from `HOME/api.token`, or made (32 random
/// bytes as hex, 0600) when the file is absent. A token file others may read is refused.
pub fn load_or_create_token(home: &FsPath) -> Result<String, ApiError> {
    if !home.join(crate::device::STORE_FILE).exists() {
        return Err(ApiError::NotInitialised(home.to_owned()));
    }
    let path = home.join(TOKEN_FILE);
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        let token = hex::encode(bytes);
        secret_file::write_new(&path, format!("{token}\n").as_bytes())?;
        return Ok(token);
    }
    let raw = secret_file::read_private(&path, None)?;
    let token = String::from_utf8(raw)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty() && t.len() <= 1024 && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| KeyFileError::Corrupt {
            path: path.clone(),
            reason: "an API token is one line of printable ASCII".into(),
        })?;
    Ok(token)
}

/// Binds the API's TCP listener (before the node starts, so a taken port is an error at
/// once).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ApiError> {
    let bind_err = |source| ApiError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Serves the API of `node` on `listener` with `token` until the runtime stops; returns
/// the address it serves on. Must be called within the node's tokio runtime.
pub fn serve(
    node: &Node,
    listener: std::net::TcpListener,
    token: String,
) -> Result<SocketAddr, ApiError> {
    let addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| ApiError::Bind { addr, source })?;
    let app = router(node, token)?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the HTTP API stopped: {e}");
        }
    });
    Ok(addr)
}

/// The API's routes over `node`, guarded by `token`.
pub fn router(node: &Node, token: String) -> Result<Router, ApiError> {
    let store = node.device().store();
    let (tx, rx) = watch::channel(store.last_change()?);
    store.on_change(move |seq| {
        tx.send_replace(seq);
    });
    let state = ApiState {
        node: node.clone(),
        token: Arc::from(token.into_bytes()),
        changes: rx,
    };
    Ok(Router::new()
        .route("/v1/status", get(status))
        .route("/v1/kv/{collection}", get(scan))
        .route(
            "/v1/kv/{collection}/{*key}",
            get(get_value).put(put_value).delete(delete_value),
        )
        .route(
            "/v1/logs/{log}",
            get(log_read)
                .post(log_append)
                .layer(DefaultBodyLimit::max(MAX_LOG_ENTRY_BYTES)),
        )
        .route("/v1/changes", get(changes))
        .merge(dashboard::routes())
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(data::MAX_VALUE_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state))
}

#[derive(Clone)]
struct ApiState {
    node: Node,
    token: Arc<[u8]>,
    /// The newest cursor of the changes feed, as the store reports commits.
    changes: watch::Receiver<u64>,
}

/// An error answer: its status and `{"error": "..."}`.
#[derive(Debug)]
struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<DeviceError> for HttpError {
    fn from(e: DeviceError) -> Self {
        let status = match &e {
            DeviceError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            DeviceError::NotFound(_) => StatusCode::NOT_FOUND,
            // The request is fine but the device's state refuses it (now).
            DeviceError::Unavailable(_)
            | DeviceError::Rejected(_)
            | DeviceError::ArchiveDevice
            | DeviceError::NoCurrentJournal => StatusCode::CONFLICT,
            DeviceError::Store(StoreError::Busy { .. } | StoreError::Locked { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error_line(&e))
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        DeviceError::Store(e).into()
    }
}

impl From<PathRejection> for HttpError {
    fn from(r: PathRejection) -> Self {
        Self::bad(format!("bad path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for HttpError {
    fn from(r: QueryRejection) -> Self {
        Self::bad(format!("bad query: {}", r.body_text()))
    }
}

impl From<BytesRejection> for HttpError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(status, "the body is larger than this endpoint takes")
        } else {
            Self::new(status, format!("cannot read the body: {}", r.body_text()))
        }
    }
}

/// Refuses every request without the right `Authorization: Bearer TOKEN` before it is
/// routed, so nothing is read or written for it.
async fn authorize(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    if dashboard::is_public(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same_secret(t.as_bytes(), &st.token) => next.run(req).await,
        Some(_) => HttpError::new(StatusCode::UNAUTHORIZED, "wrong API token").into_response(),
        None => HttpError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer TOKEN` (the token is in HOME/api.token)",
        )
        .into_response(),
    }
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs `f` on the node on a blocking thread.
async fn blocking<T, F>(node: &Node, f: F) -> Result<T, HttpError>
where
    T: Send + 'static,
    F: FnOnce(&Node) -> Result<T, HttpError> + Send + 'static,
{
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .map_err(|e| HttpError::internal(format!("the request failed: {e}")))?
}

/// Runs a data read through [`data::run`].
fn run_data(node: &Node, request: DataRequest) -> Result<DataResponse, HttpError> {
    Ok(data::run(node.device(), request)?)
}

/// Writes through the device's group commit without holding a thread while it waits
/// ([`data::write`]); running sessions hear of the write, as from the control socket.
async fn write_data(node: &Node, request: DataRequest) -> Result<DataResponse, HttpError> {
    let after = node.clone();
    Ok(data::write(node.device(), request, move || after.after_local_write()).await?)
}

/// With `If-Match`, refuses the write unless the key reads as the expected version now.
async fn if_version(
    node: &Node,
    collection: &str,
    key: &str,
    expected: Option<String>,
) -> Result<(), HttpError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let (collection, key) = (collection.to_owned(), key.to_owned());
    blocking(node, move |n| {
        check_version(n.device(), &collection, &key, &expected)
    })
    .await
}

fn unexpected() -> HttpError {
    HttpError::internal("the device answered with the wrong kind of result")
}

/// `If-Match: "ID"` (or `*`): the write applies only while the key reads as that version
/// (any version). Checked just before the write; a write from a peer that lands in
/// between shows up as a conflict, never as a lost value.
fn if_match(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    headers
        .get(header::IF_MATCH)
        .map(|v| {
            v.to_str()
                .map(|s| s.trim().trim_matches('"').to_owned())
                .map_err(|_| HttpError::bad("If-Match must be ASCII"))
        })
        .transpose()
}

fn check_version(
    device: &Device,
    collection: &str,
    key: &str,
    expected: &str,
) -> Result<(), HttpError> {
    let current = data::run(
        device,
        DataRequest::Get {
            collection: collection.into(),
            key: key.into(),
        },
    )?;
    let DataResponse::Value(current) = current else {
        return Err(unexpected());
    };
    match current {
        None => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("{collection}/{key} is absent, not at version {expected}"),
        )),
        Some(v) if expected == "*" || v.version.id == expected => Ok(()),
        Some(v) => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "{collection}/{key} is at version {}, not {expected}",
                v.version.id
            ),
        )),
    }
}

fn header_value(s: &str) -> Result<HeaderValue, HttpError> {
    HeaderValue::from_str(s).map_err(|_| HttpError::internal("a header value is not ASCII"))
}

/// A value's bytes, its version in `ETag` and `X-Tend-*` headers.
fn value_response(v: ValueRead) -> Result<Response, HttpError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::ETAG,
        header_value(&format!("\"{}\"", v.version.id))?,
    );
    headers.insert("x-tend-epoch", header_value(&v.version.epoch.to_string())?);
    headers.insert("x-tend-author", header_value(&v.version.author)?);
    headers.insert(
        "x-tend-conflicts",
        header_value(&v.conflicts.len().to_string())?,
    );
    if let Some(blob) = &v.blob {
        headers.insert("x-tend-blob", header_value(blob)?);
    }
    Ok((headers, v.value.0).into_response())
}

async fn get_value(
    State(st): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path((collection, key)) = path?;
    let answer = blocking(&st.node, {
        let (collection, key) = (collection.clone(), key.clone());
        move |n| run_data(n, DataRequest::Get { collection, key })
    })
    .await?;
    match answer {
        DataResponse::Value(Some(v)) => value_response(v),
        DataResponse::Value(None) => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("{collection}/{key} is absent"),
        )),
        _ => Err(unexpected()),
    }
}

async fn put_value(
    State(st): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Written>, HttpError> {
    let Path((collection, key)) = path?;
    let expected = if_match(&headers)?;
    let value = body?;
    if_version(&st.node, &collection, &key, expected).await?;
    let request = DataRequest::Put {
        collection,
        key,
        value: Bytes64(value.to_vec()),
    };
    match write_data(&st.node, request).await? {
        DataResponse::Written(w) => Ok(Json(w)),
        _ => Err(unexpected()),
    }
}

async fn delete_value(
    State(st): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Written>, HttpError> {
    let Path((collection, key)) = path?;
    let expected = if_match(&headers)?;
    if_version(&st.node, &collection, &key, expected).await?;
    match write_data(&st.node, DataRequest::Delete { collection, key }).await? {
        DataResponse::Written(w) => Ok(Json(w)),
        _ => Err(unexpected()),
    }
}

#[derive(Deserialize)]
struct ScanParams {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// A page of a collection.
#[derive(Serialize)]
struct ScanPage {
    entries: Vec<ValueRead>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<String>,
}

async fn scan(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ScanParams>, QueryRejection>,
) -> Result<Json<ScanPage>, HttpError> {
    let Path(collection) = path?;
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    let request = DataRequest::Scan {
        collection,
        prefix: q.prefix,
        after: q.after,
        limit,
    };
    match blocking(&st.node, move |n| run_data(n, request)).await? {
        DataResponse::Scan(entries) => Ok(Json(ScanPage {
            next_after: (entries.len() == limit)
                .then(|| entries.last().map(|e| e.key.clone()))
                .flatten(),
            entries,
        })),
        _ => Err(unexpected()),
    }
}

async fn log_append(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Written>), HttpError> {
    let Path(log) = path?;
    let data = body?;
    if data.len() > MAX_LOG_ENTRY_BYTES {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the entry is {} bytes; a log entry holds at most {MAX_LOG_ENTRY_BYTES}",
                data.len()
            ),
        ));
    }
    let request = DataRequest::LogAppend {
        log,
        data: Bytes64(data.to_vec()),
    };
    match write_data(&st.node, request).await? {
        DataResponse::Written(w) => Ok((StatusCode::CREATED, Json(w))),
        _ => Err(unexpected()),
    }
}

#[derive(Deserialize)]
struct LogParams {
    after: Option<String>,
    limit: Option<usize>,
}

/// A page of a log.
#[derive(Serialize)]
struct LogPage {
    entries: Vec<LogEntry>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<String>,
}

async fn log_read(
    State(st): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<LogParams>, QueryRejection>,
) -> Result<Json<LogPage>, HttpError> {
    let Path(log) = path?;
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    let request = DataRequest::LogRead {
        log,
        after: q.after,
        limit,
    };
    match blocking(&st.node, move |n| run_data(n, request)).await? {
        DataResponse::Log(entries) => Ok(Json(LogPage {
            next_after: (entries.len() == limit)
                .then(|| entries.last().map(|e| e.cursor.clone()))
                .flatten(),
            entries,
        })),
        _ => Err(unexpected()),
    }
}

async fn status(State(st): State<ApiState>) -> Result<Json<serde_json::Value>, HttpError> {
    blocking(&st.node, |n| {
        let status = n
            .status()
            .map_err(|e| HttpError::internal(error_line(&e)))?;
        let cursor = n.device().store().last_change()?;
        let mut v = serde_json::to_value(status)
            .map_err(|e| HttpError::internal(format!("cannot encode the status: {e}")))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("changes_cursor".into(), cursor.into());
            o.extend(dashboard_status(n)?);
        }
        Ok(Json(v))
    })
    .await
}

/// What `/v1/status` adds to the node's status for the dashboard. A part the device
/// cannot tell yet (no authority before it joins one) is `null`.
fn dashboard_status(node: &Node) -> Result<serde_json::Map<String, serde_json::Value>, HttpError> {
    let device = node.device();
    let json = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| HttpError::internal(format!("cannot encode the status: {e}")))
    };
    let app = device.store().app_state(device.namespace())?;
    let m = node.metrics();
    let mut o = serde_json::Map::new();
    o.insert(
        "authority".into(),
        json(serde_json::to_value(device.authority_status().ok()))?,
    );
    o.insert(
        "snapshot".into(),
        json(serde_json::to_value(device.snapshot_status().ok()))?,
    );
    o.insert(
        "upgrades".into(),
        json(serde_json::to_value(crate::upgrade::status(device).ok()))?,
    );
    o.insert("upgrade_running".into(), node.upgrade_running().into());
    o.insert(
        "app".into(),
        serde_json::json!({ "live_keys": app.live_keys(), "log_entries": app.log_len() }),
    );
    o.insert(
        "sync".into(),
        serde_json::json!({
            "facts_sent": m.facts_sent.get(),
            "facts_received": m.facts_received.get(),
            "bytes_sent": m.bytes_sent.get(),
            "bytes_received": m.bytes_received.get(),
            "sessions_completed": m.sessions_completed.get(),
            "sessions_failed": m.sessions_failed.get(),
            "sessions_aborted": m.sessions_aborted.get(),
            "gc_runs": m.gc_runs.get(),
            "gc_facts_pruned": m.gc_facts_pruned.get(),
            "gc_bytes_reclaimed": m.gc_bytes_reclaimed.get(),
        }),
    );
    Ok(o)
}

#[derive(Deserialize)]
struct ChangesParams {
    since: Option<String>,
}

/// One event of the changes feed (its SSE id is `cursor`).
#[derive(Serialize, Default)]
struct ChangeEvent {
    cursor: u64,
    namespace: String,
    epoch: u64,
    id: String,
    author: String,
    /// `put`, `delete`, `log_append`, `log_trim`, `cache_put`, or `other` (maintenance,
    /// authority and unknown facts; `kind` says which).
    op: &'static str,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    collection: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// The value of a put or cache put (base64), unless it is a large value.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Bytes64>,
    /// The blob and length of a large value.
    #[serde(skip_serializing_if = "Option::is_none")]
    blob: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
    /// The log cursor of an appended entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    log_cursor: Option<String>,
    /// A log entry's bytes (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Bytes64>,
    /// A trim's cursor: entries below it are gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<String>,
}

/// The event of a change, or `None` when its fact is no longer stored (pruned or
/// retracted since).
fn change_event(device: &Device, c: &Change) -> Result<Option<ChangeEvent>, HttpError> {
    let Some(stored) = device.store().get(c.namespace, c.epoch, &c.id)? else {
        return Ok(None);
    };
    let (author, payload) = stored
        .author_payload()
        .map_err(|e| HttpError::internal(format!("stored fact {}: {e}", c.id)))?;
    let mut ev = ChangeEvent {
        cursor: c.seq,
        namespace: c.namespace.to_string(),
        epoch: c.epoch.0,
        id: c.id.to_string(),
        author: author.to_string(),
        op: "other",
        kind: payload.kind_name(),
        ..ChangeEvent::default()
    };
    match payload {
        Payload::Application { kind, data } => {
            ev.op = "log_append";
            ev.log_cursor = Some(
                LogCursor {
                    epoch: c.epoch,
                    seq: 0,
                    id: c.id,
                }
                .to_string(),
            );
            ev.log = Some(kind);
            ev.data = Some(Bytes64(data));
        }
        Payload::Data(DataOp::Append(a)) => {
            ev.op = "log_append";
            ev.log_cursor = Some(
                LogCursor {
                    epoch: c.epoch,
                    seq: a.seq,
                    id: c.id,
                }
                .to_string(),
            );
            ev.log = Some(a.log);
            ev.data = Some(Bytes64(a.data.into_vec()));
        }
        Payload::Data(DataOp::Put(p)) => {
            ev.op = "put";
            ev.collection = Some(p.collection);
            ev.key = Some(p.key);
            match p.value {
                Value::Inline(b) => ev.value = Some(Bytes64(b.into_vec())),
                Value::Blob { cid, len } => {
                    ev.blob = Some(cid.to_string());
                    ev.len = Some(len);
                }
            }
        }
        Payload::Data(DataOp::Delete(d)) => {
            ev.op = "delete";
            ev.collection = Some(d.collection);
            ev.key = Some(d.key);
        }
        Payload::Data(DataOp::Trim(t)) => {
            ev.op = "log_trim";
            ev.log = Some(t.log);
            ev.before = Some(t.before.to_string());
        }
        Payload::Data(DataOp::CachePut(p)) => {
            ev.op = "cache_put";
            ev.key = Some(p.key);
            ev.value = Some(Bytes64(p.value.into_vec()));
        }
        _ => {}
    }
    Ok(Some(ev))
}

/// The events after `cursor` (one page) and the cursor the page ends at.
fn feed_page(device: &Device, cursor: u64) -> Result<(Vec<Event>, u64), HttpError> {
    let changes = device.store().changes_since(cursor, FEED_PAGE)?;
    let end = changes.last().map_or(cursor, |c| c.seq);
    let mut events = Vec::with_capacity(changes.len());
    for c in &changes {
        if let Some(ev) = change_event(device, c)? {
            let data = serde_json::to_string(&ev)
                .map_err(|e| HttpError::internal(format!("cannot encode a change: {e}")))?;
            events.push(
                Event::default()
                    .id(c.seq.to_string())
                    .event("change")
                    .data(data),
            );
        }
    }
    Ok((events, end))
}

/// Where a feed starts: after `Last-Event-ID` (a reconnecting client), else after `since`
/// (`now`: after the newest change), else from the first change.
fn feed_start(headers: &HeaderMap, since: Option<&str>, device: &Device) -> Result<u64, HttpError> {
    if let Some(v) = headers.get("last-event-id") {
        return v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| HttpError::bad("Last-Event-ID must be a cursor (a whole number)"));
    }
    match since {
        None => Ok(0),
        Some("now") => Ok(device.store().last_change()?),
        Some(s) => s.trim().parse::<u64>().map_err(|_| {
            HttpError::bad(format!(
                "since must be a cursor (a whole number) or `now`, not {:?}",
                s.chars().take(40).collect::<String>()
            ))
        }),
    }
}

struct Feed {
    node: Node,
    cursor: u64,
    newest: watch::Receiver<u64>,
    pending: VecDeque<Event>,
    done: bool,
}

async fn changes(
    State(st): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<ChangesParams>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let Query(q) = query?;
    let cursor = blocking(&st.node, move |n| {
        feed_start(&headers, q.since.as_deref(), n.device())
    })
    .await?;
    let feed = Feed {
        node: st.node.clone(),
        cursor,
        newest: st.changes.clone(),
        pending: VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(feed, |mut f| async move {
        loop {
            if let Some(ev) = f.pending.pop_front() {
                return Some((Ok(ev), f));
            }
            if f.done {
                return None;
            }
            let node = f.node.clone();
            let cursor = f.cursor;
            let page = tokio::task::spawn_blocking(move || feed_page(node.device(), cursor))
                .await
                .map_err(|e| HttpError::internal(format!("the feed failed: {e}")))
                .and_then(|r| r);
            match page {
                Ok((events, end)) if end > f.cursor => {
                    f.cursor = end;
                    f.pending.extend(events);
                }
                // Caught up: wait until the store reports a newer change. The store tells
                // after each commit, so a commit this read missed has already raised it.
                Ok(_) => {
                    if f.newest.wait_for(|&newest| newest > cursor).await.is_err() {
                        return None;
                    }
                }
                Err(e) => {
                    f.done = true;
                    let data = serde_json::json!({ "error": e.message }).to_string();
                    return Some((Ok(Event::default().event("error").data(data)), f));
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
