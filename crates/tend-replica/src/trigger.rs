//! When a device proposes a snapshot by itself: a pure decision over the reduced state,
//! the journal's figures above the latest snapshot, the device's limits and the time.
//! The caller measures (tend-backup's `triggers::evaluate` over a store) and proposes.

use serde::{Deserialize, Serialize};
use tend_core::{Epoch, MaintenanceState};

/// When a device proposes a snapshot by itself. A limit of 0 disables that trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTriggers {
    /// Facts at or above the latest snapshot epoch.
    pub facts: u64,
    /// Bytes of those facts (canonical encoding).
    pub bytes: u64,
    /// Seconds since the device first saw the latest snapshot (or, before any snapshot,
    /// since it first evaluated the triggers), provided some new fact was written.
    pub age_secs: u64,
}

impl Default for SnapshotTriggers {
    /// 100 000 facts, 64 MiB, one week.
    fn default() -> Self {
        Self {
            facts: 100_000,
            bytes: 64 << 20,
            age_secs: 7 * 24 * 3600,
        }
    }
}

/// The journal figures the decision looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Facts at or above the latest snapshot epoch (all facts without a snapshot).
    pub facts_since: u64,
    /// Their bytes.
    pub bytes_since: u64,
    /// Those that are not snapshot ceremony facts (proposals, completions): without any,
    /// another snapshot would cover nothing new.
    pub new_facts_since: u64,
    /// When the age clock started, in seconds since the Unix epoch.
    pub since_secs: Option<u64>,
}

/// Which limit was passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "trigger", rename_all = "lowercase")]
pub enum TriggerReason {
    Facts { count: u64, limit: u64 },
    Bytes { bytes: u64, limit: u64 },
    Age { secs: u64, limit: u64 },
}

/// What the device should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum TriggerDecision {
    /// No limit passed (or nothing new to cover, or no authority yet).
    Idle,
    /// A proposal is open: let its ceremony finish (or time out) first.
    Pending { target_epoch: Epoch },
    /// Propose a snapshot covering every fact below `target_epoch`.
    Propose {
        target_epoch: Epoch,
        reason: TriggerReason,
    },
}

/// Decides whether to propose a snapshot: a pure function of the reduced state, the
/// journal figures, the settings and the time.
///
/// The target is `current_epoch + 1`, as `tend snapshot propose` picks it: every fact
/// written so far falls below it, and the proposal moves writers to the target so the
/// prefix stops growing.
pub fn decide(
    state: &MaintenanceState,
    stats: &JournalStats,
    triggers: &SnapshotTriggers,
    now_secs: u64,
) -> TriggerDecision {
    if state.membership().is_none() {
        return TriggerDecision::Idle;
    }
    if let Some(p) = state
        .proposals
        .values()
        .map(|p| p.proposal.target_epoch)
        .max()
    {
        return TriggerDecision::Pending { target_epoch: p };
    }
    if stats.new_facts_since == 0 {
        return TriggerDecision::Idle;
    }
    let reason = if triggers.facts > 0 && stats.facts_since >= triggers.facts {
        Some(TriggerReason::Facts {
            count: stats.facts_since,
            limit: triggers.facts,
        })
    } else if triggers.bytes > 0 && stats.bytes_since >= triggers.bytes {
        Some(TriggerReason::Bytes {
            bytes: stats.bytes_since,
            limit: triggers.bytes,
        })
    } else {
        stats
            .since_secs
            .map(|since| now_secs.saturating_sub(since))
            .filter(|age| triggers.age_secs > 0 && *age >= triggers.age_secs)
            .map(|secs| TriggerReason::Age {
                secs,
                limit: triggers.age_secs,
            })
    };
    match reason {
        Some(reason) => TriggerDecision::Propose {
            target_epoch: state.current_epoch().next(),
            reason,
        },
        None => TriggerDecision::Idle,
    }
}
