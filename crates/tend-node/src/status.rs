//! What a running device reports: its status, what it knows of each peer, and the
//! sessions of a sync round. The node fills them in; the control socket carries them.

use serde::{Deserialize, Serialize};

use crate::device::JournalStatus;

/// What we know about one peer, as `tend peers` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    /// The peer's device id (hex).
    pub device_id: String,
    /// Its direct address, if known (peers that only dialled us have none).
    pub addr: Option<String>,
    /// `online`, `offline` (after repeated connection failures; probed now and then) or
    /// `banned` (after repeated misbehaviour, or by the operator).
    pub status: String,
    /// Trust in [0, 1]: the operator's setting for the peer, else its role's (admin,
    /// member, other), halved on each misbehaviour.
    pub trust: f64,
    /// The operator's trust for this peer (`tend peers trust`), if set.
    pub operator_trust: Option<f64>,
    /// Misbehaviours seen (protocol violations, invalid facts, bad blobs).
    pub misbehaviours: u32,
    /// Connection failures and timeouts since the last success.
    pub consecutive_failures: u32,
    /// When a session with the peer last completed (Unix ms), either side; kept across
    /// restarts.
    pub last_sync_unix_ms: Option<u64>,
    /// Sessions that completed.
    pub successful_syncs: u64,
    /// Sessions that failed, were refused, or never connected.
    pub failed_syncs: u64,
    /// Sessions open now.
    pub active_sessions: u32,
    /// Selection score in [0, 1] (DESIGN section 4).
    pub score: f64,
    /// Blocked by this node (partition tests, operator).
    pub blocked: bool,
}

/// The outcome of one session of a round, as `tend sync now` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerOutcome {
    /// The peer's device id (hex).
    pub peer: String,
    /// The address dialled.
    pub addr: String,
    /// `completed`, `aborted: ...`, `refused: ...`, `failed: ...`, `unreachable: ...`,
    /// `skipped: ...` (this device's own session limit), `local error: ...`.
    pub result: String,
    /// Whether the (last) session completed.
    pub ok: bool,
    /// Sessions opened: more than one when an epoch change aborted earlier ones.
    pub attempts: u32,
    /// Counters of the last session.
    pub facts_sent: u64,
    pub facts_received: u64,
    /// New facts stored.
    pub facts_accepted: u64,
    pub facts_rejected: u64,
    pub duration_ms: u64,
}

/// One sync round.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoundReport {
    /// One entry per peer contacted.
    pub sessions: Vec<PeerOutcome>,
}

impl RoundReport {
    /// Whether every session completed.
    pub fn all_ok(&self) -> bool {
        self.sessions.iter().all(|s| s.ok)
    }
}

/// A running device's status, as `tend status` and the control socket show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// This device's id (hex), which is also its iroh endpoint id.
    pub device_id: String,
    /// Where the endpoint listens.
    pub listen_addr: String,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<String>,
    /// The journal this device writes and synchronises.
    pub namespace: String,
    /// Membership changes seen so far.
    pub identity_epoch: u64,
    /// Known peers.
    pub peers: Vec<PeerInfo>,
    /// The latest successful sync with any peer (Unix ms).
    pub last_sync_unix_ms: Option<u64>,
    /// What `tend journal status` shows.
    pub journal: JournalStatus,
}
