//! Prometheus metrics of a running device, served at `GET /metrics` by axum.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Labels of a metric family: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// Every metric a node exports. Counter names carry no `_total`: prometheus-client adds it.
pub struct Metrics {
    registry: Registry,
    /// Wall time of a sync session, seconds, both roles.
    pub sync_latency: Histogram,
    /// Facts sent in sessions.
    pub facts_sent: Counter,
    /// Facts received in sessions (valid or not).
    pub facts_received: Counter,
    /// Sync message bytes sent.
    pub bytes_sent: Counter,
    /// Sync message bytes received.
    pub bytes_received: Counter,
    /// Sessions opened, both roles.
    pub sessions_opened: Counter,
    /// Sessions that completed.
    pub sessions_completed: Counter,
    /// Sessions aborted (identity epoch advanced, closed, shutdown).
    pub sessions_aborted: Counter,
    /// Sessions that failed or were refused, and connects that failed.
    pub sessions_failed: Counter,
    /// Rejected incoming facts, by reason label.
    pub facts_rejected: Family<Labels, Counter>,
    /// Connections refused at the handshake, by reason.
    pub handshake_refusals: Family<Labels, Counter>,
    /// Current selection score per peer.
    pub peer_score: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Blobs fetched from peers, verified and stored.
    pub blobs_fetched: Counter,
    /// Blob bytes fetched from peers.
    pub blob_bytes_received: Counter,
    /// Blobs refused from peers, by reason (`mismatch`, `oversized`, `malformed`).
    pub blobs_rejected: Family<Labels, Counter>,
    /// Local-network announcements not used, by reason (see
    /// [`crate::discovery::local::LocalError::reason`]).
    pub announcements_refused: Family<Labels, Counter>,
    /// What a rate limit held back, by `direction` (`in`, `out`), `scope` (`peer`,
    /// `global`) and `kind` (`facts`, `bytes`, `sessions`, `messages`): a fact batch sent
    /// later, a frame read later, a session refused.
    pub rate_limited: Family<Labels, Counter>,
    /// Seconds incoming frames waited for the incoming rate limits, summed over frames.
    pub rate_limit_wait_seconds: Counter<f64, AtomicU64>,
    /// Sessions this device did not start because its own session limit was reached
    /// (not counted against the peer).
    pub sessions_skipped: Counter,
    /// Sessions ended mid-way because an activated fence became unsatisfied, by `side`
    /// (`local`: this device; `peer`: the peer's announced version).
    pub fence_aborts: Family<Labels, Counter>,
    /// Automatic garbage collections after a verified snapshot.
    pub gc_runs: Counter,
    /// Facts those collections pruned.
    pub gc_facts_pruned: Counter,
    /// Bytes those collections gave back to the file system (store file size before the
    /// prune minus after the compaction).
    pub gc_bytes_reclaimed: Counter,
    /// Facts in the journal, read at each scrape.
    pub journal_facts: Gauge,
    /// Live keys of the application's collections, read at each scrape.
    pub live_keys: Gauge,
    /// Untrimmed log entries, read at each scrape.
    pub log_entries: Gauge,
    /// Size of the store file in bytes, read at each scrape.
    pub store_bytes: Gauge,
    /// The authority's identity epoch, read at each scrape.
    pub identity_epoch: Gauge,
    /// The latest verified snapshot's epoch (0 before the first), read at each scrape.
    pub snapshot_epoch: Gauge,
    /// Unix time in seconds of the last successful sync with each peer.
    pub peer_last_sync: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Snapshot ceremonies this device coordinated or signed, by `role` and `outcome`
    /// (`completed`, `aborted`, `refused`).
    pub ceremonies: Family<Labels, Counter>,
    /// Runs of the upgrade pipeline on a running device, by `outcome` (`ok`, `failed`).
    pub upgrade_runs: Family<Labels, Counter>,
    /// Backups exported through a running device, by `outcome` (`ok`, `failed`).
    pub backups: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tend` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tend");
        let sync_latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let m = Metrics {
            sync_latency: sync_latency.clone(),
            facts_sent: Counter::default(),
            facts_received: Counter::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            sessions_opened: Counter::default(),
            sessions_completed: Counter::default(),
            sessions_aborted: Counter::default(),
            sessions_failed: Counter::default(),
            facts_rejected: Family::default(),
            handshake_refusals: Family::default(),
            peer_score: Family::default(),
            blobs_fetched: Counter::default(),
            blob_bytes_received: Counter::default(),
            blobs_rejected: Family::default(),
            announcements_refused: Family::default(),
            rate_limited: Family::default(),
            rate_limit_wait_seconds: Counter::default(),
            sessions_skipped: Counter::default(),
            fence_aborts: Family::default(),
            gc_runs: Counter::default(),
            gc_facts_pruned: Counter::default(),
            gc_bytes_reclaimed: Counter::default(),
            journal_facts: Gauge::default(),
            live_keys: Gauge::default(),
            log_entries: Gauge::default(),
            store_bytes: Gauge::default(),
            identity_epoch: Gauge::default(),
            snapshot_epoch: Gauge::default(),
            peer_last_sync: Family::default(),
            ceremonies: Family::default(),
            upgrade_runs: Family::default(),
            backups: Family::default(),
            registry: Registry::default(),
        };
        for (name, help, gauge) in [
            ("journal_facts", "Facts in the journal", &m.journal_facts),
            ("live_keys", "Live keys of the collections", &m.live_keys),
            ("log_entries", "Untrimmed log entries", &m.log_entries),
            ("store_bytes", "Size of the store file", &m.store_bytes),
            (
                "identity_epoch",
                "The authority's identity epoch",
                &m.identity_epoch,
            ),
            (
                "snapshot_epoch",
                "The latest verified snapshot's epoch",
                &m.snapshot_epoch,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "peer_last_sync_seconds",
            "Unix time of the last successful sync with each peer",
            m.peer_last_sync.clone(),
        );
        registry.register(
            "ceremonies",
            "Snapshot ceremonies by role and outcome",
            m.ceremonies.clone(),
        );
        registry.register(
            "upgrade_runs",
            "Upgrade pipeline runs by outcome",
            m.upgrade_runs.clone(),
        );
        registry.register(
            "backups",
            "Backups exported through the running device by outcome",
            m.backups.clone(),
        );
        registry.register(
            "sync_latency_seconds",
            "Duration of sync sessions",
            sync_latency,
        );
        registry.register("facts_sent", "Facts sent to peers", m.facts_sent.clone());
        registry.register(
            "facts_received",
            "Facts received from peers",
            m.facts_received.clone(),
        );
        registry.register(
            "sync_bytes_sent",
            "Sync message bytes sent",
            m.bytes_sent.clone(),
        );
        registry.register(
            "sync_bytes_received",
            "Sync message bytes received",
            m.bytes_received.clone(),
        );
        registry.register(
            "sessions_opened",
            "Sync sessions opened, both roles",
            m.sessions_opened.clone(),
        );
        registry.register(
            "sessions_completed",
            "Sync sessions that completed",
            m.sessions_completed.clone(),
        );
        registry.register(
            "sessions_aborted",
            "Sync sessions aborted (epoch advanced, closed)",
            m.sessions_aborted.clone(),
        );
        registry.register(
            "sessions_failed",
            "Sync sessions that failed or were refused",
            m.sessions_failed.clone(),
        );
        registry.register(
            "facts_rejected",
            "Incoming facts rejected, by reason",
            m.facts_rejected.clone(),
        );
        registry.register(
            "handshake_refusals",
            "Connections refused at the handshake, by reason",
            m.handshake_refusals.clone(),
        );
        registry.register(
            "peer_score",
            "Peer selection score in [0, 1]",
            m.peer_score.clone(),
        );
        registry.register(
            "blobs_fetched",
            "Blobs fetched from peers and stored",
            m.blobs_fetched.clone(),
        );
        registry.register(
            "blob_bytes_received",
            "Blob bytes fetched from peers",
            m.blob_bytes_received.clone(),
        );
        registry.register(
            "blobs_rejected",
            "Blobs refused from peers, by reason",
            m.blobs_rejected.clone(),
        );
        registry.register(
            "announcements_refused",
            "Local-network announcements not used, by reason",
            m.announcements_refused.clone(),
        );
        registry.register(
            "rate_limited",
            "Fact batches, frames and sessions a rate limit held back, by direction, scope and kind",
            m.rate_limited.clone(),
        );
        registry.register(
            "rate_limit_wait_seconds",
            "Seconds incoming frames waited for the incoming rate limits",
            m.rate_limit_wait_seconds.clone(),
        );
        registry.register(
            "sessions_skipped",
            "Sessions not started because this device's own session limit was reached",
            m.sessions_skipped.clone(),
        );
        registry.register(
            "fence_aborts",
            "Sessions ended mid-way by an activated fence, by side",
            m.fence_aborts.clone(),
        );
        registry.register(
            "gc_runs",
            "Automatic garbage collections after a verified snapshot",
            m.gc_runs.clone(),
        );
        registry.register(
            "gc_facts_pruned",
            "Facts pruned by automatic garbage collection",
            m.gc_facts_pruned.clone(),
        );
        registry.register(
            "gc_bytes_reclaimed",
            "Store bytes automatic garbage collection gave back to the file system",
            m.gc_bytes_reclaimed.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts what a rate limit held back.
    pub fn limited(&self, what: &tend_sync::Limited, n: u64) {
        self.rate_limited
            .get_or_create(&vec![
                ("direction".to_string(), what.direction_label().to_string()),
                ("scope".to_string(), what.scope_label().to_string()),
                ("kind".to_string(), what.kind_label().to_string()),
            ])
            .inc_by(n);
    }

    /// Counts a session ended by a fence.
    pub fn fence_abort(&self, side: &str) {
        self.fence_aborts
            .get_or_create(&vec![("side".to_string(), side.to_string())])
            .inc();
    }

    /// Counts a rejected fact.
    pub fn reject(&self, reason: &str, n: u64) {
        self.facts_rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc_by(n);
    }

    /// Counts a handshake refusal.
    pub fn refuse(&self, reason: &str) {
        self.handshake_refusals
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Counts a refused blob.
    pub fn reject_blob(&self, reason: &str) {
        self.blobs_rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Counts one event of `family` under `outcome`.
    pub fn count_outcome(&self, family: &Family<Labels, Counter>, outcome: &str) {
        family
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }

    /// Sets a peer's score gauge.
    pub fn set_score(&self, peer: &str, score: f64) {
        self.peer_score
            .get_or_create(&vec![("peer".to_string(), peer.to_string())])
            .set(score);
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `refresh` brings the
/// gauges read from the store up to date before each scrape. Anything else gets 404.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, refresh) = (metrics.clone(), refresh.clone());
            async move {
                // The gauges read the store: off the async workers.
                let body = tokio::task::spawn_blocking(move || {
                    refresh();
                    metrics.render()
                })
                .await
                .unwrap_or_default();
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("the metrics endpoint stopped: {e}");
    }
}

/// Binds the metrics listener (loopback in tests).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
