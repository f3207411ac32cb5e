//! Key generation's decisions, sans-IO: the admin's plan of a run, whether a member takes
//! an invitation, when the admin may write the membership change, and what a member
//! checks before it joins. The FROST rounds themselves are tend-crypto's
//! `DkgParticipant`; carrying messages, saving shares and writing facts is the caller's
//! (tend-node's run over the network, its in-process fleet, the simulator).
//!
//! Key generation is a maintenance session (DESIGN rule 9): every participant already in
//! the authority's journal must be at the admin's maintenance epoch, snapshot epoch
//! included. An admin that missed a snapshot would write the change below it, and the
//! members that completed the snapshot would fail to re-verify it under the new key
//! (found by the simulator, seeds 447 and 863).
//!
//! ```
//! use tend_replica::keygen::Refusal;
//! // A refusal travels as text on `tend/maint/1`; its kind is read back in one place.
//! let text = Refusal::NotNamed.to_string();
//! assert!(!Refusal::is_epoch_mismatch(&text));
//! ```

use std::collections::BTreeMap;

use tend_core::authority::{AuthorityFact, GroupKey, MembershipChange};
use tend_core::{
    AuthorityId, DeviceId, JournalNamespace, MaintenanceEpoch, MaintenanceFact, MaintenanceState,
    Payload,
};
use tend_crypto::DkgSession;

/// How a member's refusal for being at another maintenance epoch begins on the wire. The
/// admin syncs and invites once more when it sees it. Older releases send this text, so
/// it stays the wire's word for it.
pub const EPOCH_MISMATCH: &str = "maintenance epoch mismatch";

/// A maintenance epoch as people read it.
pub fn show_epoch(e: MaintenanceEpoch) -> String {
    format!(
        "identity epoch {}, snapshot epoch {}",
        e.identity_epoch, e.snapshot_epoch.0
    )
}

/// Why a key generation cannot go on (the admin's side).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyGenError {
    #[error("this device is not the admin of its authority")]
    NotAdmin,
    #[error("invalid authority shape: {0}")]
    Shape(String),
    #[error(
        "members derived different group keys (a round-1 broadcast was not the same for everyone)"
    )]
    GroupKeyMismatch,
    #[error(
        "member {member} is at {}, the admin at {}: sync and run it again",
        show_epoch(*theirs),
        show_epoch(*ours)
    )]
    MemberAtAnotherEpoch {
        member: DeviceId,
        theirs: MaintenanceEpoch,
        ours: MaintenanceEpoch,
    },
    #[error(
        "this device's maintenance epoch moved during the key generation (from {} to {}): \
         a snapshot or membership change completed meanwhile; run it again",
        show_epoch(*from),
        show_epoch(*to)
    )]
    EpochMoved {
        from: MaintenanceEpoch,
        to: MaintenanceEpoch,
    },
}

impl KeyGenError {
    /// Whether a participant was at another maintenance epoch: worth a sync and one more
    /// run.
    pub fn is_epoch_mismatch(&self) -> bool {
        matches!(
            self,
            Self::MemberAtAnotherEpoch { .. } | Self::EpochMoved { .. }
        )
    }
}

/// The first participant whose maintenance epoch is not `admin_epoch`, with its epoch.
/// A participant with `None` joins anew (it holds no journal of this authority yet).
pub fn laggard(
    admin_epoch: MaintenanceEpoch,
    participants: impl IntoIterator<Item = (DeviceId, Option<MaintenanceEpoch>)>,
) -> Option<(DeviceId, MaintenanceEpoch)> {
    participants.into_iter().find_map(|(d, e)| match e {
        Some(e) if e != admin_epoch => Some((d, e)),
        _ => None,
    })
}

/// A key generation the admin is about to lead: the session, checked, and the
/// maintenance epoch the run is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyGenPlan {
    /// The FROST session: this authority, the next identity epoch, sorted members.
    pub session: DkgSession,
    /// The admin's maintenance epoch when the run starts.
    pub epoch: MaintenanceEpoch,
}

impl KeyGenPlan {
    /// Plans a run led by `admin` among `members` (the admin is added if absent):
    /// `admin` must be the admin of `state` now, `namespace` an authority's journal, and
    /// `2 <= threshold <= members`.
    pub fn new(
        state: &MaintenanceState,
        namespace: JournalNamespace,
        admin: DeviceId,
        members: &[DeviceId],
        threshold: u16,
    ) -> Result<Self, KeyGenError> {
        if !state.is_admin_at(&admin, state.current_epoch()) {
            return Err(KeyGenError::NotAdmin);
        }
        let mut all = members.to_vec();
        all.push(admin);
        all.sort();
        all.dedup();
        let n = all.len();
        if n < 2 || threshold < 2 || usize::from(threshold) > n {
            return Err(KeyGenError::Shape(format!(
                "{threshold}-of-{n}: an authority of several devices needs 2 <= threshold <= members"
            )));
        }
        let JournalNamespace::Authority(AuthorityId(context)) = namespace else {
            return Err(KeyGenError::Shape(
                "the current journal is not an authority".into(),
            ));
        };
        let session = DkgSession {
            context,
            identity_epoch: state.identity_epoch() + 1,
            members: all,
            threshold,
        };
        session
            .validate()
            .map_err(|e| KeyGenError::Shape(e.to_string()))?;
        Ok(Self {
            session,
            epoch: state.maintenance_epoch(),
        })
    }

    /// Whether the admin may write the change once every other member reported the
    /// group key it derived (and its maintenance epoch, `None` for one joining anew):
    /// `None` while a report is missing, else the group key all derived, or why not.
    pub fn verdict(
        &self,
        admin: DeviceId,
        own: GroupKey,
        reports: &BTreeMap<DeviceId, (GroupKey, Option<MaintenanceEpoch>)>,
    ) -> Option<Result<GroupKey, KeyGenError>> {
        let others = self.session.members.iter().filter(|m| **m != admin);
        if others.clone().any(|m| !reports.contains_key(m)) {
            return None;
        }
        if reports.values().any(|(k, _)| *k != own) {
            return Some(Err(KeyGenError::GroupKeyMismatch));
        }
        // A member of this journal whose epoch moved since it accepted (a snapshot
        // completed without the admin) would see the change below it.
        if let Some((member, theirs)) = laggard(self.epoch, reports.iter().map(|(m, r)| (*m, r.1)))
        {
            return Some(Err(KeyGenError::MemberAtAnotherEpoch {
                member,
                theirs,
                ours: self.epoch,
            }));
        }
        Some(Ok(own))
    }

    /// Whether the admin, now at `now`, may still write the change: a snapshot that
    /// completed since the members checked the epoch would put the change on the wrong
    /// side of it for some of them.
    pub fn still_at(&self, now: MaintenanceEpoch) -> Result<(), KeyGenError> {
        if now == self.epoch {
            Ok(())
        } else {
            Err(KeyGenError::EpochMoved {
                from: self.epoch,
                to: now,
            })
        }
    }

    /// The membership change the admin writes for `group_key`.
    pub fn membership_change(&self, group_key: GroupKey) -> Payload {
        membership_change(&self.session, group_key)
    }
}

/// The membership change that ends `session` with `group_key`.
pub fn membership_change(session: &DkgSession, group_key: GroupKey) -> Payload {
    Payload::Authority(AuthorityFact::MembershipChanged(MembershipChange {
        identity_epoch: session.identity_epoch,
        members: session.members.clone(),
        threshold: session.threshold,
        group_key,
    }))
}

/// Whether the admin hands a fact to joining members with the change: what they need to
/// admit it (the genesis, earlier membership changes, admin replacements). Everything
/// else comes by sync.
pub fn carried_by_join(payload: &Payload) -> bool {
    matches!(
        payload,
        Payload::Authority(_)
            | Payload::Maintenance(
                MaintenanceFact::AdminReplacement(_)
                    | MaintenanceFact::CertifiedAdminReplacement(_)
            )
    )
}

/// Whether `state` (after storing the join's facts) holds the membership `session` made,
/// with the group key of this member's own share.
pub fn joined(state: &MaintenanceState, session: &DkgSession, own: GroupKey) -> bool {
    state.membership().is_some_and(|m| {
        m.identity_epoch == session.identity_epoch
            && m.threshold == session.threshold
            && m.group_key == own
            && m.members.iter().eq(session.members.iter())
    })
}

/// A key generation invitation, as the invited member sees it.
#[derive(Clone, Copy, Debug)]
pub struct Invitation<'a> {
    /// The session it proposes.
    pub session: &'a DkgSession,
    /// The device that sent it (authenticated by the connection).
    pub inviter: DeviceId,
    /// The inviter's maintenance epoch.
    pub admin_epoch: MaintenanceEpoch,
}

/// Why a member refuses an invitation. Its text is what travels on `tend/maint/1`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("this device is not named in the key generation")]
    NotNamed,
    #[error("the inviting device is not named in the key generation")]
    InviterNotNamed,
    #[error("a re-deal must be for this authority and its next identity epoch")]
    NotTheNextEpoch,
    #[error(
        "{EPOCH_MISMATCH}: this device is at {}, the admin at {}: sync first",
        show_epoch(*ours),
        show_epoch(*admin)
    )]
    EpochMismatch {
        ours: MaintenanceEpoch,
        admin: MaintenanceEpoch,
    },
    #[error(
        "only this device's admin, or a configured peer while this device is in no \
         multi-device authority, may start a key generation here"
    )]
    NotAllowed,
}

impl Refusal {
    /// Whether a refusal's text (from any release) says the member was at another
    /// maintenance epoch. The one place that reads a refusal's words: `tend/maint/1`
    /// carries refusals as text, and a typed field would be refused by older releases'
    /// canonical decoding.
    pub fn is_epoch_mismatch(reason: &str) -> bool {
        reason.starts_with(EPOCH_MISMATCH)
    }
}

/// Whether `me`, whose journal `namespace` has reduced to `state`, takes `invitation`.
/// Either the inviter is the admin of this journal (a re-deal: for this authority, the
/// next identity epoch, at the admin's maintenance epoch), or this device is in no
/// multi-device authority yet and `inviter_is_configured_peer`.
pub fn answer_invitation(
    state: &MaintenanceState,
    namespace: JournalNamespace,
    me: DeviceId,
    invitation: Invitation<'_>,
    inviter_is_configured_peer: bool,
) -> Result<(), Refusal> {
    let Invitation {
        session,
        inviter,
        admin_epoch,
    } = invitation;
    session
        .validate()
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
    if !session.members.contains(&me) {
        return Err(Refusal::NotNamed);
    }
    if !session.members.contains(&inviter) {
        return Err(Refusal::InviterNotNamed);
    }
    let my_admin = state
        .membership()
        .is_some_and(|_| state.is_admin_at(&inviter, state.current_epoch()));
    if my_admin {
        let ours = matches!(namespace, JournalNamespace::Authority(a) if a.0 == session.context);
        if !ours || session.identity_epoch != state.identity_epoch() + 1 {
            return Err(Refusal::NotTheNextEpoch);
        }
        let mine = state.maintenance_epoch();
        if mine != admin_epoch {
            return Err(Refusal::EpochMismatch {
                ours: mine,
                admin: admin_epoch,
            });
        }
        return Ok(());
    }
    let unattached = state
        .membership()
        .is_none_or(|m| m.members.len() == 1 && m.members.contains(&me));
    if unattached && inviter_is_configured_peer {
        Ok(())
    } else {
        Err(Refusal::NotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use tend_core::authority::AuthorityGenesis;
    use tend_core::{reduce, Epoch, UnsignedFact};

    fn device(seed: u8) -> (SigningKey, DeviceId) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let id = DeviceId(key.verifying_key().to_bytes());
        (key, id)
    }

    /// A one-device authority whose admin is `seed`'s device.
    fn authority(seed: u8) -> (JournalNamespace, MaintenanceState, DeviceId) {
        let (key, me) = device(seed);
        let g = AuthorityGenesis {
            nonce: [seed; 32],
            members: vec![me],
            threshold: 1,
            group_key: GroupKey(me.0),
            admin: me,
        };
        let ns = JournalNamespace::Authority(g.authority_id());
        let fact = UnsignedFact {
            namespace: ns,
            epoch: Epoch::ZERO,
            payload: Payload::Authority(AuthorityFact::Genesis(g)),
        }
        .sign(&key);
        (ns, reduce(ns, &[fact]), me)
    }

    fn at(identity: u64, snapshot: u64) -> MaintenanceEpoch {
        MaintenanceEpoch {
            identity_epoch: identity,
            snapshot_epoch: Epoch(snapshot),
        }
    }

    #[test]
    fn only_the_admin_plans_a_threshold_authority() {
        let (ns, state, admin) = authority(1);
        let (_, b) = device(2);
        let (_, c) = device(3);
        assert_eq!(
            KeyGenPlan::new(&state, ns, b, &[admin, c], 2),
            Err(KeyGenError::NotAdmin)
        );
        assert!(matches!(
            KeyGenPlan::new(&state, ns, admin, &[b], 3),
            Err(KeyGenError::Shape(_))
        ));
        assert!(matches!(
            KeyGenPlan::new(&state, ns, admin, &[admin], 1),
            Err(KeyGenError::Shape(_))
        ));
        let plan = KeyGenPlan::new(&state, ns, admin, &[c, b, c], 2).unwrap();
        let mut sorted = vec![admin, b, c];
        sorted.sort();
        assert_eq!(plan.session.members, sorted);
        assert_eq!(plan.session.identity_epoch, state.identity_epoch() + 1);
        assert_eq!(plan.epoch, state.maintenance_epoch());
    }

    #[test]
    fn the_change_waits_for_every_report_and_one_group_key_at_one_epoch() {
        let (ns, state, admin) = authority(1);
        let (_, b) = device(2);
        let (_, c) = device(3);
        let plan = KeyGenPlan::new(&state, ns, admin, &[b, c], 2).unwrap();
        let key = GroupKey([9; 32]);
        let mut reports = BTreeMap::new();
        reports.insert(b, (key, None));
        assert_eq!(plan.verdict(admin, key, &reports), None);
        reports.insert(c, (key, Some(plan.epoch)));
        assert_eq!(plan.verdict(admin, key, &reports), Some(Ok(key)));
        reports.insert(c, (GroupKey([8; 32]), Some(plan.epoch)));
        assert_eq!(
            plan.verdict(admin, key, &reports),
            Some(Err(KeyGenError::GroupKeyMismatch))
        );
        let moved = at(plan.epoch.identity_epoch, plan.epoch.snapshot_epoch.0 + 5);
        reports.insert(c, (key, Some(moved)));
        let verdict = plan.verdict(admin, key, &reports).unwrap().unwrap_err();
        assert!(verdict.is_epoch_mismatch(), "{verdict}");
        assert!(plan.still_at(plan.epoch).is_ok());
        assert!(plan.still_at(moved).unwrap_err().is_epoch_mismatch());
        let Payload::Authority(AuthorityFact::MembershipChanged(m)) = plan.membership_change(key)
        else {
            panic!("not a membership change");
        };
        assert_eq!(
            (m.members, m.threshold, m.group_key),
            (plan.session.members.clone(), 2, key)
        );
    }

    #[test]
    fn a_member_takes_a_re_deal_only_from_its_admin_at_its_epoch() {
        let (ns, state, admin) = authority(1);
        let (_, b) = device(2);
        let plan = KeyGenPlan::new(&state, ns, admin, &[b], 2).unwrap();
        // The admin's own journal: a re-deal, at its epoch.
        let invite = |admin_epoch| Invitation {
            session: &plan.session,
            inviter: admin,
            admin_epoch,
        };
        assert_eq!(
            answer_invitation(&state, ns, admin, invite(plan.epoch), false),
            Ok(())
        );
        let other = at(7, 3);
        let refusal = answer_invitation(&state, ns, admin, invite(other), false).unwrap_err();
        assert!(
            Refusal::is_epoch_mismatch(&refusal.to_string()),
            "{refusal}"
        );
        // A device that is not named, or an inviter that is not.
        let (_, c) = device(3);
        assert_eq!(
            answer_invitation(&state, ns, c, invite(plan.epoch), true),
            Err(Refusal::NotNamed)
        );
        let stranger = Invitation {
            session: &plan.session,
            inviter: c,
            admin_epoch: plan.epoch,
        };
        assert_eq!(
            answer_invitation(&state, ns, admin, stranger, true),
            Err(Refusal::InviterNotNamed)
        );
        // A device alone in its own authority joins only a configured peer's run.
        let (b_ns, b_state, _) = authority(2);
        assert_eq!(
            answer_invitation(&b_state, b_ns, b, invite(plan.epoch), false),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            answer_invitation(&b_state, b_ns, b, invite(plan.epoch), true),
            Ok(())
        );
        assert!(!Refusal::is_epoch_mismatch(
            &Refusal::NotAllowed.to_string()
        ));
    }
}
