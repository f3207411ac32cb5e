//! Automated snapshot triggers: whether a device should propose a snapshot by itself,
//! because the journal above the latest snapshot passed a fact count, a byte size or an
//! age. The decision ([`decide`]) is a pure function; [`evaluate`] gathers its inputs
//! from a store for the running node.

use serde::{Deserialize, Serialize};
use tend_core::maintenance::MaintenanceFact;
use tend_core::{Epoch, JournalNamespace, MaintenanceState, Payload};
use tend_store::{Store, StoreError};

use crate::error::BackupError;

/// Store setting holding the device's [`SnapshotTriggers`].
pub const TRIGGERS_SETTING: &str = "snapshot_triggers";
/// Store setting recording when the device first saw its latest snapshot (the age clock).
pub const OBSERVED_SETTING: &str = "snapshot_triggers_observed";

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

/// The device's trigger settings (the defaults when unset).
pub fn load_triggers(store: &Store) -> Result<SnapshotTriggers, StoreError> {
    Ok(store.get_setting(TRIGGERS_SETTING)?.unwrap_or_default())
}

/// Saves the device's trigger settings.
pub fn save_triggers(store: &Store, triggers: &SnapshotTriggers) -> Result<(), StoreError> {
    store.put_setting(TRIGGERS_SETTING, triggers)
}

#[derive(Serialize, Deserialize)]
struct Observed {
    snapshot_epoch: u64,
    at_secs: u64,
}

/// When the age clock of `ns` started: the time this device first evaluated the triggers
/// after its latest snapshot changed. Records `now_secs` when the snapshot is new.
pub fn age_clock_start(
    store: &Store,
    state: &MaintenanceState,
    now_secs: u64,
) -> Result<u64, StoreError> {
    let key = format!("{OBSERVED_SETTING}:{}", state.namespace);
    let epoch = state.snapshot_epoch().0;
    match store.get_setting::<Observed>(&key)? {
        Some(o) if o.snapshot_epoch == epoch => Ok(o.at_secs),
        _ => {
            store.put_setting(
                &key,
                &Observed {
                    snapshot_epoch: epoch,
                    at_secs: now_secs,
                },
            )?;
            Ok(now_secs)
        }
    }
}

impl JournalStats {
    /// Measures the journal above the latest snapshot of `ns`: one scan of the facts at
    /// or above it (cost linear in the tail, which the triggers keep bounded).
    pub fn measure(
        store: &Store,
        state: &MaintenanceState,
        since_secs: Option<u64>,
    ) -> Result<Self, BackupError> {
        let ns: JournalNamespace = state.namespace;
        let floor: Epoch = state.snapshot_epoch();
        let mut stats = JournalStats {
            since_secs,
            ..Default::default()
        };
        for f in store.scan(ns, floor..)? {
            let f = f?;
            stats.facts_since += 1;
            stats.bytes_since += f.bytes().len() as u64;
        }
        let mut ceremony = 0;
        for f in store.scan_maintenance(ns)? {
            let f = f?;
            if f.epoch < floor {
                continue;
            }
            let fact = f.verify().map_err(|source| StoreError::FactCorrupt {
                path: store.path().to_owned(),
                source,
            })?;
            if matches!(
                fact.payload(),
                Payload::Maintenance(
                    MaintenanceFact::SnapshotProposed(_) | MaintenanceFact::SnapshotCompleted(_)
                )
            ) {
                ceremony += 1;
            }
        }
        stats.new_facts_since = stats.facts_since.saturating_sub(ceremony);
        Ok(stats)
    }
}

/// Everything the running node needs on its timer: loads the settings, starts or reads
/// the age clock, measures the journal and decides.
pub fn evaluate(
    store: &Store,
    ns: JournalNamespace,
    now_secs: u64,
) -> Result<(TriggerDecision, JournalStats), BackupError> {
    let triggers = load_triggers(store)?;
    let state = store.maintenance_state(ns)?;
    let since = age_clock_start(store, &state, now_secs)?;
    let stats = JournalStats::measure(store, &state, Some(since))?;
    Ok((decide(&state, &stats, &triggers, now_secs), stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey};
    use tend_core::maintenance::SnapshotProposed;
    use tend_core::{reduce, DeviceId, Hash32, UnsignedFact, VerifiedFact};

    fn genesis(key: &SigningKey) -> VerifiedFact {
        let me = DeviceId(key.verifying_key().to_bytes());
        let g = AuthorityGenesis {
            nonce: [7; 32],
            members: vec![me],
            threshold: 1,
            group_key: GroupKey(me.0),
            admin: me,
        };
        UnsignedFact {
            namespace: JournalNamespace::Authority(g.authority_id()),
            epoch: Epoch::ZERO,
            payload: Payload::Authority(AuthorityFact::Genesis(g)),
        }
        .sign(key)
    }

    fn state_with(
        extra: impl Fn(JournalNamespace, &SigningKey) -> Vec<VerifiedFact>,
    ) -> MaintenanceState {
        let key = SigningKey::from_bytes(&[3; 32]);
        let g = genesis(&key);
        let ns = g.namespace();
        let mut facts = vec![g];
        facts.extend(extra(ns, &key));
        reduce(ns, &facts)
    }

    fn stats(facts: u64, bytes: u64, since: Option<u64>) -> JournalStats {
        JournalStats {
            facts_since: facts,
            bytes_since: bytes,
            new_facts_since: facts,
            since_secs: since,
        }
    }

    const T: SnapshotTriggers = SnapshotTriggers {
        facts: 1000,
        bytes: 1 << 20,
        age_secs: 3600,
    };

    #[test]
    fn below_every_limit_is_idle() {
        let s = state_with(|_, _| vec![]);
        assert_eq!(
            decide(&s, &stats(999, 1000, Some(0)), &T, 3599),
            TriggerDecision::Idle
        );
    }

    #[test]
    fn each_limit_triggers_at_the_next_epoch() {
        let s = state_with(|_, _| vec![]);
        let target = s.current_epoch().next();
        for (st, now) in [
            (stats(1000, 0, None), 0),
            (stats(1, 1 << 20, None), 0),
            (stats(1, 1, Some(100)), 3700),
        ] {
            match decide(&s, &st, &T, now) {
                TriggerDecision::Propose { target_epoch, .. } => assert_eq!(target_epoch, target),
                other => panic!("expected a proposal, got {other:?}"),
            }
        }
        assert!(matches!(
            decide(&s, &stats(5000, 0, None), &T, 0),
            TriggerDecision::Propose {
                reason: TriggerReason::Facts {
                    count: 5000,
                    limit: 1000
                },
                ..
            }
        ));
    }

    #[test]
    fn zero_disables_a_trigger() {
        let s = state_with(|_, _| vec![]);
        let off = SnapshotTriggers {
            facts: 0,
            bytes: 0,
            age_secs: 0,
        };
        assert_eq!(
            decide(&s, &stats(u64::MAX, u64::MAX, Some(0)), &off, u64::MAX),
            TriggerDecision::Idle
        );
    }

    #[test]
    fn nothing_new_or_no_authority_is_idle() {
        let s = state_with(|_, _| vec![]);
        let mut st = stats(5000, 0, Some(0));
        st.new_facts_since = 0;
        assert_eq!(decide(&s, &st, &T, 1 << 40), TriggerDecision::Idle);
        let empty = MaintenanceState::new(s.namespace);
        assert_eq!(
            decide(&empty, &stats(5000, 0, None), &T, 0),
            TriggerDecision::Idle
        );
    }

    #[test]
    fn an_open_proposal_waits() {
        let s = state_with(|ns, key| {
            vec![UnsignedFact {
                namespace: ns,
                epoch: Epoch(1),
                payload: Payload::Maintenance(MaintenanceFact::SnapshotProposed(
                    SnapshotProposed {
                        proposal_id: Hash32([1; 32]),
                        target_epoch: Epoch(9),
                        digest: Hash32([0; 32]),
                    },
                )),
            }
            .sign(key)]
        });
        assert_eq!(
            decide(&s, &stats(5000, 0, None), &T, 0),
            TriggerDecision::Pending {
                target_epoch: Epoch(9)
            }
        );
    }
}
