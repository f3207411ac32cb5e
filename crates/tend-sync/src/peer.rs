//! Peer bookkeeping and deterministic peer selection for sync rounds.
//!
//! score = 0.5 * trust + 0.3 * success rate + 0.2 * (1 - load), each term in [0, 1].
//! The success rate is smoothed (`(ok + 1) / (ok + failed + 2)`), so an unknown peer starts
//! at 0.5 and every failure lowers the peer's priority in later rounds. Misbehaviour also
//! halves trust. Ties are broken by device id, so the same inputs always pick the same
//! peers.

use std::collections::BTreeMap;

use tend_core::DeviceId;

use crate::session::SessionResult;

/// Whether a peer can be used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerStatus {
    /// Reachable as far as we know.
    Online,
    /// Known to be unreachable.
    Offline,
    /// Misbehaved; never picked until reinstated.
    Banned,
}

/// What we know about one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerMetadata {
    pub device_id: DeviceId,
    pub status: PeerStatus,
    /// In [0, 1].
    pub trust_level: f64,
    pub successful_syncs: u64,
    pub failed_syncs: u64,
    pub active_sessions: u32,
}

impl PeerMetadata {
    /// A new online peer with the given trust.
    pub fn new(device_id: DeviceId, trust_level: f64) -> Self {
        Self {
            device_id,
            status: PeerStatus::Online,
            trust_level: clamp01(trust_level),
            successful_syncs: 0,
            failed_syncs: 0,
            active_sessions: 0,
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
    /// Peers scoring below this are skipped.
    pub min_score: f64,
    /// Sessions at once with one peer.
    pub max_sessions_per_peer: u32,
    /// Trust is multiplied by this after misbehaviour.
    pub misbehaviour_trust_factor: f64,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            min_score: 0.3,
            max_sessions_per_peer: 1,
            misbehaviour_trust_factor: 0.5,
        }
    }
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

    /// Adds or replaces a peer.
    pub fn upsert(&mut self, peer: PeerMetadata) {
        self.peers.insert(peer.device_id, peer);
    }

    /// Adds a peer with the given trust if it is unknown.
    pub fn add(&mut self, device: DeviceId, trust_level: f64) {
        self.peers
            .entry(device)
            .or_insert_with(|| PeerMetadata::new(device, trust_level));
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

    /// Sets a peer's status.
    pub fn set_status(&mut self, device: &DeviceId, status: PeerStatus) {
        if let Some(p) = self.peers.get_mut(device) {
            p.status = status;
        }
    }

    /// The score of a peer, if known.
    pub fn score(&self, device: &DeviceId) -> Option<f64> {
        self.peers
            .get(device)
            .map(|p| p.score(self.config.max_sessions_per_peer))
    }

    /// Up to `count` peers for the next sync round: online, at or above the threshold,
    /// below their session limit; best score first, ties by device id.
    pub fn select(&self, count: usize) -> Vec<DeviceId> {
        let max = self.config.max_sessions_per_peer;
        let mut eligible: Vec<(f64, DeviceId)> = self
            .peers
            .values()
            .filter(|p| p.status == PeerStatus::Online && p.active_sessions < max)
            .map(|p| (p.score(max), p.device_id))
            .filter(|(s, _)| *s >= self.config.min_score)
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

    /// A session with `device` ended with `result`: counts success or failure and lowers
    /// trust on misbehaviour. An abort for an epoch change is neither.
    pub fn session_ended(&mut self, device: &DeviceId, result: &SessionResult) {
        let factor = self.config.misbehaviour_trust_factor;
        let Some(p) = self.peers.get_mut(device) else {
            return;
        };
        p.active_sessions = p.active_sessions.saturating_sub(1);
        match result {
            SessionResult::Completed => p.successful_syncs += 1,
            SessionResult::Aborted { .. } => {}
            SessionResult::Refused { .. } => p.failed_syncs += 1,
            SessionResult::Failed(reason) => {
                p.failed_syncs += 1;
                if reason.is_misbehaviour() {
                    p.trust_level = clamp01(p.trust_level * factor);
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
}
