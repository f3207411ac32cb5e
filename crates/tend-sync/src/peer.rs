//! Peer bookkeeping and deterministic peer selection for sync rounds.
//!
//! score = 0.5 * trust + 0.3 * success rate + 0.2 * (1 - load), each term in [0, 1].
//! The success rate is smoothed (`(ok + 1) / (ok + failed + 2)`), so an unknown peer starts
//! at 0.5 and every failure lowers the peer's priority in later rounds. A peer is picked
//! only when its score exceeds the threshold. Ties are broken by device id, so the same
//! inputs always pick the same peers.
//!
//! Trust is the operator's setting for the peer when there is one, else the trust of its
//! role (the caller says which: admin, member, not a member), halved by each misbehaviour
//! (a protocol violation, invalid facts, a blob not matching its CID). Statuses follow what
//! happened: `Offline` after `offline_after_failures` consecutive connection failures or
//! timeouts (probed again every `offline_probe_interval`, online again on the next
//! success), `Banned` after `ban_after_misbehaviours` misbehaviours or by the operator.
//! Everything that must survive a restart is a [`PeerRecord`]. The clock is the caller's:
//! nothing here reads time.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tend_core::DeviceId;

use crate::session::{FailReason, SessionResult};

/// Whether a peer can be used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// Reachable as far as we know.
    Online,
    /// Known to be unreachable: only probed now and then.
    Offline,
    /// Misbehaved, or banned by the operator; never picked until unbanned.
    Banned,
}

/// What we know about one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerMetadata {
    pub device_id: DeviceId,
    pub status: PeerStatus,
    /// The effective trust in [0, 1]: the operator's setting or the role's trust, halved
    /// per misbehaviour.
    pub trust_level: f64,
    /// The trust of the peer's role, as the caller last said.
    pub role_trust: f64,
    /// The operator's trust for this peer, which overrides the role's.
    pub operator_trust: Option<f64>,
    /// Misbehaviours seen (each multiplies trust by the configured factor).
    pub misbehaviours: u32,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    /// Connection failures and timeouts since the last success.
    pub consecutive_failures: u32,
    /// Wall-clock time (Unix ms) of the last session that completed, either side.
    pub last_sync_unix_ms: Option<u64>,
    pub active_sessions: u32,
    /// An offline peer is probed again from this (caller's clock) time on.
    pub probe_at: Option<Duration>,
}

/// The part of [`PeerMetadata`] that survives a restart (stored by the caller).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub status: PeerStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_trust: Option<f64>,
    pub misbehaviours: u32,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_unix_ms: Option<u64>,
}

impl PeerMetadata {
    /// A new online peer whose role has the given trust.
    pub fn new(device_id: DeviceId, role_trust: f64) -> Self {
        Self {
            device_id,
            status: PeerStatus::Online,
            trust_level: clamp01(role_trust),
            role_trust: clamp01(role_trust),
            operator_trust: None,
            misbehaviours: 0,
            successful_syncs: 0,
            failed_syncs: 0,
            consecutive_failures: 0,
            last_sync_unix_ms: None,
            active_sessions: 0,
            probe_at: None,
        }
    }

    /// The smoothed success rate in [0, 1].
    pub fn success_rate(&self) -> f64 {
        (self.successful_syncs as f64 + 1.0)
            / (self.successful_syncs as f64 + self.failed_syncs as f64 + 2.0)
    }

    /// Load in [0, 1]: open sessions over the per-peer limit.
    pub fn load(&self, max_per_peer: u32) -> f64 {
        if max_per_peer == 0 {
            return 1.0;
        }
        clamp01(self.active_sessions as f64 / max_per_peer as f64)
    }

    /// The selection score in [0, 1].
    pub fn score(&self, max_per_peer: u32) -> f64 {
        0.5 * clamp01(self.trust_level)
            + 0.3 * self.success_rate()
            + 0.2 * (1.0 - self.load(max_per_peer))
    }

    /// What must survive a restart.
    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            status: self.status,
            operator_trust: self.operator_trust,
            misbehaviours: self.misbehaviours,
            successful_syncs: self.successful_syncs,
            failed_syncs: self.failed_syncs,
            consecutive_failures: self.consecutive_failures,
            last_sync_unix_ms: self.last_sync_unix_ms,
        }
    }

    fn retrust(&mut self, factor: f64) {
        let base = self.operator_trust.unwrap_or(self.role_trust);
        let exponent = i32::try_from(self.misbehaviours).unwrap_or(i32::MAX);
        self.trust_level = clamp01(base * clamp01(factor).powi(exponent));
    }
}

fn clamp01(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Configuration of peer selection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerConfig {
    /// Peers are picked only when their score exceeds this.
    pub min_score: f64,
    /// Sessions at once with one peer.
    pub max_sessions_per_peer: u32,
    /// Trust is multiplied by this after each misbehaviour.
    pub misbehaviour_trust_factor: f64,
    /// Consecutive connection failures or timeouts after which a peer is `Offline`.
    pub offline_after_failures: u32,
    /// How often an offline peer is probed.
    pub offline_probe_interval: Duration,
    /// Misbehaviours after which a peer is `Banned` (0: never banned automatically).
    pub ban_after_misbehaviours: u32,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            min_score: 0.3,
            max_sessions_per_peer: 1,
            misbehaviour_trust_factor: 0.5,
            offline_after_failures: 3,
            offline_probe_interval: Duration::from_secs(30),
            ban_after_misbehaviours: 3,
        }
    }
}

/// Whether a failure says the peer could not be reached or went silent (rather than that
/// it misbehaved): repeated ones take it offline.
fn is_connection_failure(reason: &FailReason) -> bool {
    matches!(reason, FailReason::Timeout | FailReason::Local(_))
}

/// Known peers and the choice of whom to sync with next.
#[derive(Clone, Debug, Default)]
pub struct PeerManager {
    config: PeerConfig,
    peers: BTreeMap<DeviceId, PeerMetadata>,
}

impl PeerManager {
    /// No peers yet.
    pub fn new(config: PeerConfig) -> Self {
        Self {
            config,
            peers: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PeerConfig {
        &self.config
    }

    /// Adds or replaces a peer.
    pub fn upsert(&mut self, peer: PeerMetadata) {
        self.peers.insert(peer.device_id, peer);
    }

    /// Adds a peer whose role has the given trust if it is unknown.
    pub fn add(&mut self, device: DeviceId, role_trust: f64) {
        self.peers
            .entry(device)
            .or_insert_with(|| PeerMetadata::new(device, role_trust));
    }

    /// Restores a peer from its stored record (its role's trust as given).
    pub fn restore(&mut self, device: DeviceId, role_trust: f64, record: &PeerRecord) {
        let mut p = PeerMetadata::new(device, role_trust);
        p.status = record.status;
        p.operator_trust = record.operator_trust.map(clamp01);
        p.misbehaviours = record.misbehaviours;
        p.successful_syncs = record.successful_syncs;
        p.failed_syncs = record.failed_syncs;
        p.consecutive_failures = record.consecutive_failures;
        p.last_sync_unix_ms = record.last_sync_unix_ms;
        p.retrust(self.config.misbehaviour_trust_factor);
        self.peers.insert(device, p);
    }

    /// Every peer's record, by device id.
    pub fn records(&self) -> Vec<(DeviceId, PeerRecord)> {
        self.peers
            .values()
            .map(|p| (p.device_id, p.record()))
            .collect()
    }

    /// Forgets a peer.
    pub fn remove(&mut self, device: &DeviceId) -> Option<PeerMetadata> {
        self.peers.remove(device)
    }

    /// One peer.
    pub fn get(&self, device: &DeviceId) -> Option<&PeerMetadata> {
        self.peers.get(device)
    }

    /// Every peer, by device id.
    pub fn iter(&self) -> impl Iterator<Item = &PeerMetadata> {
        self.peers.values()
    }

    /// Sets a peer's status (the operator's ban and unban). Unbanning forgives past
    /// misbehaviour; a peer set online is probed at once.
    pub fn set_status(&mut self, device: &DeviceId, status: PeerStatus) {
        let factor = self.config.misbehaviour_trust_factor;
        if let Some(p) = self.peers.get_mut(device) {
            if p.status == PeerStatus::Banned && status != PeerStatus::Banned {
                p.misbehaviours = 0;
                p.retrust(factor);
            }
            if status == PeerStatus::Online {
                p.consecutive_failures = 0;
                p.probe_at = None;
            }
            p.status = status;
        }
    }

    /// The trust of the peer's role (the caller knows the roles).
    pub fn set_role_trust(&mut self, device: &DeviceId, role_trust: f64) {
        let factor = self.config.misbehaviour_trust_factor;
        if let Some(p) = self.peers.get_mut(device) {
            p.role_trust = clamp01(role_trust);
            p.retrust(factor);
        }
    }

    /// The operator's trust for a peer (`None`: back to its role's).
    pub fn set_operator_trust(&mut self, device: &DeviceId, trust: Option<f64>) {
        let factor = self.config.misbehaviour_trust_factor;
        if let Some(p) = self.peers.get_mut(device) {
            p.operator_trust = trust.map(clamp01);
            p.retrust(factor);
        }
    }

    /// The score of a peer, if known.
    pub fn score(&self, device: &DeviceId) -> Option<f64> {
        self.peers
            .get(device)
            .map(|p| p.score(self.config.max_sessions_per_peer))
    }

    /// Up to `count` online peers for the next sync round (see [`PeerManager::select_at`]);
    /// offline peers are not probed.
    pub fn select(&self, count: usize) -> Vec<DeviceId> {
        self.pick(count, None)
    }

    /// Up to `count` peers for the next sync round at time `now`: online peers, and
    /// offline ones whose probe is due, whose score exceeds the threshold and that are
    /// below their session limit; best score first, ties by device id.
    pub fn select_at(&self, count: usize, now: Duration) -> Vec<DeviceId> {
        self.pick(count, Some(now))
    }

    fn pick(&self, count: usize, now: Option<Duration>) -> Vec<DeviceId> {
        let max = self.config.max_sessions_per_peer;
        let usable = |p: &PeerMetadata| match p.status {
            PeerStatus::Online => true,
            PeerStatus::Offline => now.is_some_and(|n| p.probe_at.is_none_or(|t| t <= n)),
            PeerStatus::Banned => false,
        };
        let mut eligible: Vec<(f64, DeviceId)> = self
            .peers
            .values()
            .filter(|p| usable(p) && p.active_sessions < max)
            .map(|p| (p.score(max), p.device_id))
            .filter(|(s, _)| *s > self.config.min_score)
            .collect();
        eligible.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        eligible.into_iter().take(count).map(|(_, d)| d).collect()
    }

    /// A session with `device` started.
    pub fn session_started(&mut self, device: &DeviceId) {
        if let Some(p) = self.peers.get_mut(device) {
            p.active_sessions = p.active_sessions.saturating_add(1);
        }
    }

    /// [`PeerManager::session_ended_at`] without a clock: no sync time is recorded and an
    /// offline peer is probed at the next [`PeerManager::select_at`].
    pub fn session_ended(&mut self, device: &DeviceId, result: &SessionResult) {
        self.session_ended_at(device, result, Duration::ZERO, None);
    }

    /// A session with `device` ended with `result` at `now` (the caller's monotonic
    /// clock) and `wall_unix_ms`: counts success or failure, sets the status (online on
    /// success; offline after repeated connection failures; banned after repeated
    /// misbehaviour) and lowers trust on misbehaviour. An abort for an epoch change is
    /// neither success nor failure.
    pub fn session_ended_at(
        &mut self,
        device: &DeviceId,
        result: &SessionResult,
        now: Duration,
        wall_unix_ms: Option<u64>,
    ) {
        let config = self.config;
        let Some(p) = self.peers.get_mut(device) else {
            return;
        };
        p.active_sessions = p.active_sessions.saturating_sub(1);
        match result {
            SessionResult::Completed => {
                p.successful_syncs += 1;
                p.consecutive_failures = 0;
                p.probe_at = None;
                if wall_unix_ms.is_some() {
                    p.last_sync_unix_ms = wall_unix_ms;
                }
                if p.status == PeerStatus::Offline {
                    p.status = PeerStatus::Online;
                }
            }
            SessionResult::Aborted { .. } => {}
            SessionResult::Refused { .. } => p.failed_syncs += 1,
            SessionResult::Failed(reason) => {
                p.failed_syncs += 1;
                if reason.is_misbehaviour() {
                    p.misbehaviours = p.misbehaviours.saturating_add(1);
                    p.retrust(config.misbehaviour_trust_factor);
                    if config.ban_after_misbehaviours > 0
                        && p.misbehaviours >= config.ban_after_misbehaviours
                    {
                        p.status = PeerStatus::Banned;
                    }
                } else if is_connection_failure(reason) {
                    p.consecutive_failures = p.consecutive_failures.saturating_add(1);
                    if p.status != PeerStatus::Banned
                        && config.offline_after_failures > 0
                        && p.consecutive_failures >= config.offline_after_failures
                    {
                        p.status = PeerStatus::Offline;
                        p.probe_at = Some(now + config.offline_probe_interval);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RefuseReason;
    use crate::session::FailReason;

    fn d(b: u8) -> DeviceId {
        DeviceId([b; 32])
    }

    #[test]
    fn score_formula_and_bounds() {
        let mut p = PeerMetadata::new(d(1), 1.0);
        // trust 1, success 0.5 (no history), load 0.
        assert!((p.score(1) - (0.5 + 0.15 + 0.2)).abs() < 1e-12);
        p.active_sessions = 1;
        assert!((p.score(1) - (0.5 + 0.15)).abs() < 1e-12);
        p.trust_level = 7.0;
        assert!(p.score(1) <= 1.0);
        assert_eq!(PeerMetadata::new(d(1), f64::NAN).trust_level, 0.0);
    }

    #[test]
    fn selection_is_deterministic_and_skips() {
        let mut m = PeerManager::new(PeerConfig::default());
        for b in [5, 3, 9, 1] {
            m.add(d(b), 0.8);
        }
        // Equal scores: by device id.
        assert_eq!(m.select(3), vec![d(1), d(3), d(5)]);
        // A failure lowers priority.
        m.session_started(&d(1));
        m.session_ended(
            &d(1),
            &SessionResult::Refused {
                by_peer: true,
                reason: RefuseReason::Busy,
            },
        );
        assert_eq!(m.select(4), vec![d(3), d(5), d(9), d(1)]);
        // At the session limit: skipped.
        m.session_started(&d(3));
        assert_eq!(m.select(4), vec![d(5), d(9), d(1)]);
        // Banned and below threshold: skipped.
        m.set_status(&d(5), PeerStatus::Banned);
        m.add(d(7), 0.0);
        for _ in 0..2 {
            m.session_ended(
                &d(7),
                &SessionResult::Failed(FailReason::Unexpected("facts")),
            );
        }
        assert_eq!(m.select(4), vec![d(9), d(1)]);
        // Success raises it again.
        m.session_ended(&d(3), &SessionResult::Completed);
        assert_eq!(m.select(1), vec![d(3)]);
    }

    fn timeout() -> SessionResult {
        SessionResult::Failed(FailReason::Timeout)
    }

    #[test]
    fn a_peer_that_fails_three_times_is_offline_skipped_then_probed() {
        let mut m = PeerManager::new(PeerConfig::default());
        m.add(d(1), 0.8);
        m.add(d(2), 0.8);
        let t0 = Duration::from_secs(100);
        for i in 0..3 {
            assert_eq!(
                m.get(&d(1)).unwrap().status,
                PeerStatus::Online,
                "failure {i}"
            );
            m.session_started(&d(1));
            m.session_ended_at(&d(1), &timeout(), t0, Some(1));
        }
        assert_eq!(m.get(&d(1)).unwrap().status, PeerStatus::Offline);
        assert_eq!(m.select_at(4, t0), vec![d(2)]);
        assert_eq!(m.select(4), vec![d(2)]);
        // Probed once the interval has passed; a success brings it back online.
        let later = t0 + PeerConfig::default().offline_probe_interval;
        assert_eq!(m.select_at(4, later), vec![d(2), d(1)]);
        m.session_started(&d(1));
        m.session_ended_at(
            &d(1),
            &SessionResult::Completed,
            later,
            Some(1_700_000_000_000),
        );
        let p = m.get(&d(1)).unwrap();
        assert_eq!(p.status, PeerStatus::Online);
        assert_eq!(p.consecutive_failures, 0);
        assert_eq!(p.last_sync_unix_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn misbehaviour_demotes_then_bans() {
        let mut m = PeerManager::new(PeerConfig::default());
        m.add(d(1), 1.0);
        let bad = SessionResult::Failed(FailReason::InvalidFacts {
            count: 3,
            first: "signature",
        });
        m.session_ended(&d(1), &bad);
        assert_eq!(m.get(&d(1)).unwrap().trust_level, 0.5);
        assert_eq!(m.get(&d(1)).unwrap().status, PeerStatus::Online);
        m.session_ended(&d(1), &bad);
        m.session_ended(&d(1), &bad);
        let p = m.get(&d(1)).unwrap();
        assert_eq!(p.status, PeerStatus::Banned);
        assert_eq!(p.trust_level, 0.125);
        assert!(m.select_at(1, Duration::MAX).is_empty());
        // A success does not lift a ban; the operator does, and forgives.
        m.session_ended(&d(1), &SessionResult::Completed);
        assert_eq!(m.get(&d(1)).unwrap().status, PeerStatus::Banned);
        m.set_status(&d(1), PeerStatus::Online);
        assert_eq!(m.get(&d(1)).unwrap().trust_level, 1.0);
        assert_eq!(m.select(1), vec![d(1)]);
    }

    #[test]
    fn trust_comes_from_the_operator_or_the_role_and_the_threshold_must_be_exceeded() {
        let config = PeerConfig {
            min_score: 0.5 * 0.4 + 0.3 * 0.5 + 0.2,
            ..PeerConfig::default()
        };
        let mut m = PeerManager::new(config);
        m.add(d(1), 0.4);
        // Exactly at the threshold: not picked.
        assert!(m.select(1).is_empty());
        m.set_role_trust(&d(1), 0.8);
        assert_eq!(m.select(1), vec![d(1)]);
        m.set_operator_trust(&d(1), Some(0.3));
        assert_eq!(m.get(&d(1)).unwrap().trust_level, 0.3);
        assert!(m.select(1).is_empty());
        m.set_operator_trust(&d(1), None);
        assert_eq!(m.get(&d(1)).unwrap().trust_level, 0.8);
    }

    #[test]
    fn records_restore_scores_and_statuses() {
        let mut m = PeerManager::new(PeerConfig::default());
        m.add(d(1), 0.8);
        m.add(d(2), 0.8);
        m.set_operator_trust(&d(2), Some(0.6));
        m.session_ended_at(&d(1), &SessionResult::Completed, Duration::ZERO, Some(42));
        m.session_ended(&d(2), &SessionResult::Failed(FailReason::Unexpected("x")));
        for _ in 0..3 {
            m.session_ended(&d(2), &timeout());
        }
        let bytes = serde_ipld_dagcbor::to_vec(&m.records()).unwrap();
        let records: Vec<(DeviceId, PeerRecord)> = serde_ipld_dagcbor::from_slice(&bytes).unwrap();
        let mut restored = PeerManager::new(PeerConfig::default());
        for (device, r) in &records {
            restored.restore(*device, 0.8, r);
        }
        for d in [d(1), d(2)] {
            let (a, b) = (m.get(&d).unwrap(), restored.get(&d).unwrap());
            assert_eq!(a.record(), b.record());
            assert_eq!(a.trust_level, b.trust_level);
            assert_eq!(m.score(&d), restored.score(&d));
        }
        assert_eq!(restored.get(&d(2)).unwrap().status, PeerStatus::Offline);
        assert_eq!(restored.get(&d(1)).unwrap().last_sync_unix_ms, Some(42));
    }
}
