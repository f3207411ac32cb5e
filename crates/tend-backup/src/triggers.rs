//! Automated snapshot triggers, over a store: [`evaluate`] measures the journal above the
//! latest snapshot and the age clock, and asks the pure decision (`tend_replica::trigger`,
//! re-exported here) whether the running node should propose a snapshot by itself.

use serde::{Deserialize, Serialize};
use tend_core::maintenance::MaintenanceFact;
use tend_core::{Epoch, JournalNamespace, MaintenanceState, Payload};
pub use tend_replica::trigger::{
    decide, JournalStats, SnapshotTriggers, TriggerDecision, TriggerReason,
};
use tend_store::{Store, StoreError};

use crate::error::BackupError;

/// Store setting holding the device's [`SnapshotTriggers`].
pub const TRIGGERS_SETTING: &str = "snapshot_triggers";
/// Store setting recording when the device first saw its latest snapshot (the age clock).
pub const OBSERVED_SETTING: &str = "snapshot_triggers_observed";

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

/// Measures the journal above the latest snapshot of `ns`: one scan of the facts at or
/// above it (cost linear in the tail, which the triggers keep bounded).
pub fn measure(
    store: &Store,
    state: &MaintenanceState,
    since_secs: Option<u64>,
) -> Result<JournalStats, BackupError> {
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
    let stats = measure(store, &state, Some(since))?;
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
