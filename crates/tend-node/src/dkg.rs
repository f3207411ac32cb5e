//! Distributed key generation over the network: the admin's node runs a FROST DKG among
//! the named members over `tend/maint/1`, each member saves its own share in its own home,
//! and the admin writes the membership change.
//!
//! Flow: the admin sends every other member `DkgInvite` (the session: authority, next
//! identity epoch, sorted members, threshold; and where each member listens) and waits
//! until all accepted; then `DkgStart`. Each member then broadcasts its round-1 package to
//! every other member directly, and sends each member its private round-2 package
//! directly, over the authenticated, encrypted iroh connection to that member (shares never
//! pass through the admin). A member that finishes saves its share (0600) and reports the
//! group key it derived (`DkgFinished`). The admin writes the `MembershipChange` only if
//! every member derived the same group key as itself: a member that sent different round-1
//! packages to different members (equivocation) makes the group keys differ and the run
//! fails; so does a run in which a member of this journal reported another maintenance
//! epoch than the admin's (every participant must be at it, and `DkgInvite` carries it
//! for the members to check; ARCHITECTURE section 10).
//! The admin then sends each member `DkgJoin` with the authority's facts and the
//! signed change; the member checks that the change names the session's members,
//! threshold, identity epoch and its own share's group key, stores the facts and adopts the
//! authority's journal. Only then does the admin store the change itself, so no signer
//! lags behind the new identity epoch.
//!
//! Authorisation of an invitation (the member's side): the inviter must be named in the
//! session and so must this device, no other run may be open, and either the inviter is
//! the admin of this device's current journal (a re-deal: the session must be for this
//! authority and the next identity epoch), or this device is not yet part of a
//! multi-device authority (its journal has no membership yet, or it is the only member)
//! and the inviter is one of its configured peers (the `peers` setting, which `--peer`
//! fills). Round messages are taken only for the accepted session, from the authenticated
//! connection of a device named in it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tend_core::{AuthorityId, DeviceId, Hash32, JournalNamespace, MaintenanceEpoch, UnsignedFact};
use tend_crypto::dkg::{DkgAction, DkgMessage, DkgParticipant, DkgSession};
use tend_replica::keygen::{self, Invitation, KeyGenError, KeyGenPlan, Refusal};
use tend_store::StoreError;

use crate::discovery::{is_configured_peer, PeerAddr};
use crate::fleet::AuthorityCreated;
use crate::maint::{
    blocking, decode_facts, lock, send, DkgRun, MaintHandle, MaintMessage, MaintReply, SendError,
};

/// How long a member keeps an accepted key generation that has not finished.
const MEMBER_RUN_TTL: Duration = Duration::from_secs(120);
/// Round messages buffered per member before `DkgStart` arrives.
const MAX_EARLY_PER_MEMBER: usize = 4;

/// Why a key generation over the network failed.
#[derive(Debug, thiserror::Error)]
pub enum DkgNetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    #[error("member {0} has no known address (give it with --peer)")]
    NoAddress(DeviceId),
    #[error("another key generation is running on this device")]
    Busy,
    #[error("member {member} refused the key generation: {reason}")]
    Refused { member: DeviceId, reason: String },
    #[error("member {member} is unreachable: {source}")]
    Unreachable {
        member: DeviceId,
        #[source]
        source: SendError,
    },
    #[error("key generation failed: {0}")]
    Failed(String),
    #[error("key generation timed out after {0} s (are all members running?)")]
    TimedOut(u64),
    #[error("the membership change was rejected: {0}")]
    Rejected(String),
}

impl DkgNetError {
    /// Whether the run failed because a participant was at another maintenance epoch
    /// (worth another sync round and one more run).
    fn is_epoch_mismatch(&self) -> bool {
        match self {
            Self::Refused { reason, .. } => Refusal::is_epoch_mismatch(reason),
            Self::KeyGen(e) => e.is_epoch_mismatch(),
            _ => false,
        }
    }
}

/// Drops a member-side run past its deadline.
pub(crate) fn expire(h: &MaintHandle) {
    let mut run = lock(&h.maint.dkg);
    if run.as_ref().is_some_and(|r| r.deadline <= Instant::now()) {
        tracing::info!("key generation expired");
        *run = None;
    }
}

/// Carries out a participant's outputs: messages to members (round 1 to every other
/// member, round 2 to its one recipient), the share saved in the home, the group key
/// reported to the admin.
fn apply_outputs(h: &MaintHandle, outputs: Vec<DkgAction>) {
    let me = h.device_id();
    for o in outputs {
        match o {
            DkgAction::Send(msg) => {
                let members = match lock(&h.maint.dkg).as_ref() {
                    Some(r) => r.session.members.clone(),
                    None => return,
                };
                let targets: Vec<DeviceId> = match msg.to {
                    Some(d) => vec![d],
                    None => members.into_iter().filter(|d| *d != me).collect(),
                };
                let wire = MaintMessage::Dkg(ByteBuf::from(msg.to_bytes()));
                for t in targets {
                    spawn_send(h, t, wire.clone());
                }
            }
            DkgAction::Finished(share) => {
                let saved = blocking(|| share.save(h.device.home()));
                let epoch = own_epoch_in(h, share.session().context);
                let mut guard = lock(&h.maint.dkg);
                let Some(run) = guard.as_mut() else { return };
                match saved {
                    Ok(path) => {
                        tracing::info!("key share saved in {}", path.display());
                        let report = MaintMessage::DkgFinished {
                            session: run.id,
                            group_key: share.group_key(),
                            maintenance_epoch: epoch,
                        };
                        let admin = run.admin;
                        run.share = Some(*share);
                        drop(guard);
                        if admin != me {
                            spawn_send(h, admin, report);
                        }
                    }
                    Err(e) => run.failed = Some(format!("cannot save the key share: {e}")),
                }
            }
        }
    }
}

/// This device's maintenance epoch in the authority journal `context`, if that is its
/// current journal (a member being re-dealt); `None` for a device joining anew.
fn own_epoch_in(h: &MaintHandle, context: [u8; 32]) -> Option<MaintenanceEpoch> {
    let device = &h.device;
    let ns = device.namespace();
    if ns != JournalNamespace::Authority(AuthorityId(context)) {
        return None;
    }
    match blocking(|| device.store().maintenance_state(ns)) {
        Ok(s) => Some(s.maintenance_epoch()),
        Err(e) => {
            tracing::warn!("cannot read the maintenance epoch: {e}");
            None
        }
    }
}

/// Sends on its own task; a failure marks the run failed (the admin then reports it).
fn spawn_send(h: &MaintHandle, to: DeviceId, msg: MaintMessage) {
    let h = h.clone();
    tokio::spawn(async move {
        let failure = match send(&h, to, &msg).await {
            Ok(MaintReply::Accepted) => None,
            Ok(MaintReply::Refused { reason }) => Some(format!("{to} refused: {reason}")),
            Err(e) => Some(e.to_string()),
        };
        if let Some(f) = failure {
            tracing::warn!("key generation message not delivered: {f}");
            if let Some(run) = lock(&h.maint.dkg).as_mut() {
                run.failed.get_or_insert(f);
            }
        }
    });
}

/// Starts this device's participant (on `DkgStart`, or on the admin) and feeds it the
/// round messages that arrived early.
fn start_participant(h: &MaintHandle) -> Result<(), String> {
    let mut rng = rand::rngs::OsRng;
    let mut outputs = Vec::new();
    {
        let mut guard = lock(&h.maint.dkg);
        let Some(run) = guard.as_mut() else {
            return Err("no key generation is running".into());
        };
        if run.participant.is_some() {
            return Ok(());
        }
        let (mut p, out) = DkgParticipant::start(run.session.clone(), h.device_id(), &mut rng)
            .map_err(|e| e.to_string())?;
        outputs.extend(out);
        for m in std::mem::take(&mut run.early) {
            match p.handle(m) {
                Ok(o) => outputs.extend(o),
                Err(e) => run.failed = Some(e.to_string()),
            }
        }
        run.participant = Some(p);
    }
    apply_outputs(h, outputs);
    Ok(())
}

/// Handles a key generation message from the authenticated `peer`.
pub(crate) async fn receive(h: &MaintHandle, peer: DeviceId, msg: MaintMessage) -> MaintReply {
    let reply = blocking(|| receive_sync(h, peer, msg));
    if reply == MaintReply::Accepted {
        h.maint.count_dkg_message();
    }
    reply
}

fn receive_sync(h: &MaintHandle, peer: DeviceId, msg: MaintMessage) -> MaintReply {
    let me = h.device_id();
    match msg {
        MaintMessage::DkgInvite {
            session,
            addrs,
            maintenance_epoch,
        } => invite(h, peer, session, addrs, maintenance_epoch),
        MaintMessage::DkgStart { session } => {
            {
                let guard = lock(&h.maint.dkg);
                match guard.as_ref() {
                    Some(r) if r.id == session && r.admin == peer => {}
                    _ => return MaintReply::refused("no such key generation from this admin"),
                }
            }
            match start_participant(h) {
                Ok(()) => MaintReply::Accepted,
                Err(e) => MaintReply::refused(e),
            }
        }
        MaintMessage::Dkg(bytes) => {
            let m = match DkgMessage::from_bytes(&bytes) {
                Ok(m) => m,
                Err(e) => return MaintReply::refused(e.to_string()),
            };
            let outputs = {
                let mut guard = lock(&h.maint.dkg);
                let Some(run) = guard.as_mut() else {
                    return MaintReply::refused("no key generation is running");
                };
                if m.session != run.id || m.from != peer || !run.names(&peer) || peer == me {
                    return MaintReply::refused("not a message of the accepted key generation");
                }
                match run.participant.as_mut() {
                    None => {
                        if run.early.len() >= MAX_EARLY_PER_MEMBER * run.session.members.len() {
                            return MaintReply::refused("too many early messages");
                        }
                        run.early.push(m);
                        return MaintReply::Accepted;
                    }
                    Some(p) => match p.handle(m) {
                        Ok(o) => o,
                        Err(e) => {
                            run.failed.get_or_insert(e.to_string());
                            return MaintReply::refused(e.to_string());
                        }
                    },
                }
            };
            apply_outputs(h, outputs);
            MaintReply::Accepted
        }
        MaintMessage::DkgFinished {
            session,
            group_key,
            maintenance_epoch,
        } => {
            let mut guard = lock(&h.maint.dkg);
            match guard.as_mut() {
                Some(r) if r.id == session && r.admin == me && r.names(&peer) => {
                    r.finished.insert(peer, (group_key, maintenance_epoch));
                    MaintReply::Accepted
                }
                _ => MaintReply::refused("no such key generation on this admin"),
            }
        }
        MaintMessage::DkgJoin { session, facts } => join(h, peer, session, facts),
        MaintMessage::DkgAbort { session } => {
            let mut guard = lock(&h.maint.dkg);
            if guard
                .as_ref()
                .is_some_and(|r| r.id == session && r.admin == peer)
            {
                *guard = None;
                MaintReply::Accepted
            } else {
                MaintReply::refused("no such key generation from this admin")
            }
        }
        MaintMessage::Ceremony(_) | MaintMessage::Completion { .. } => {
            MaintReply::refused("not a key generation message")
        }
    }
}

/// The member's side of an invitation (the authorisation rule of this module's docs).
fn invite(
    h: &MaintHandle,
    peer: DeviceId,
    session: DkgSession,
    addrs: Vec<(DeviceId, String)>,
    admin_epoch: MaintenanceEpoch,
) -> MaintReply {
    let me = h.device_id();
    let id = session.id();
    {
        let guard = lock(&h.maint.dkg);
        if let Some(r) = guard.as_ref() {
            return if r.id == id && r.admin == peer {
                MaintReply::Accepted
            } else {
                MaintReply::refused("another key generation is running")
            };
        }
    }
    let device = &h.device;
    let ns = device.namespace();
    let state = match device.store().maintenance_state(ns) {
        Ok(s) => s,
        Err(e) => return MaintReply::refused(format!("cannot read the journal: {e}")),
    };
    let invitation = Invitation {
        session: &session,
        inviter: peer,
        admin_epoch,
    };
    let configured = is_configured_peer(device.store(), &peer);
    if let Err(refusal) = keygen::answer_invitation(&state, ns, me, invitation, configured) {
        return MaintReply::refused(refusal.to_string());
    }
    let mut map = HashMap::new();
    for (d, a) in addrs {
        if !session.members.contains(&d) {
            continue;
        }
        match a.parse::<SocketAddr>() {
            Ok(a) => {
                map.insert(d, a);
            }
            Err(_) => return MaintReply::refused(format!("bad address {a:?} for {d}")),
        }
    }
    let mut guard = lock(&h.maint.dkg);
    if guard.is_some() {
        return MaintReply::refused("another key generation is running");
    }
    *guard = Some(DkgRun::new(
        session,
        peer,
        map,
        Instant::now() + MEMBER_RUN_TTL,
    ));
    tracing::info!("accepted key generation {id} from {peer}");
    MaintReply::Accepted
}

/// The member's side of `DkgJoin`: check the membership change against the session and the
/// saved share, store the authority's facts, adopt its journal.
fn join(h: &MaintHandle, peer: DeviceId, session: Hash32, facts: Vec<ByteBuf>) -> MaintReply {
    let (s, share, addrs) = {
        let guard = lock(&h.maint.dkg);
        match guard.as_ref() {
            Some(r) if r.id == session && r.admin == peer => match &r.share {
                Some(share) => (r.session.clone(), share.clone(), r.addrs.clone()),
                None => return MaintReply::refused("this device has no share of the session yet"),
            },
            _ => return MaintReply::refused("no such key generation from this admin"),
        }
    };
    let ns = JournalNamespace::Authority(AuthorityId(s.context));
    let verified = match decode_facts(&facts, ns) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let device = &h.device;
    if let Err(e) = device.store().insert_batch(&verified) {
        return MaintReply::refused(format!("cannot store the authority's facts: {e}"));
    }
    let state = match device.store().maintenance_state(ns) {
        Ok(s) => s,
        Err(e) => return MaintReply::refused(format!("cannot read the journal: {e}")),
    };
    if !keygen::joined(&state, &s, share.group_key()) {
        return MaintReply::refused("the membership change does not match the key generation");
    }
    if device.namespace() != ns {
        if let Err(e) = device.adopt_namespace(ns) {
            return MaintReply::refused(format!("cannot adopt the authority's journal: {e}"));
        }
        tracing::info!("joined authority {ns}");
    }
    // The other members are now sync peers.
    for (d, a) in addrs {
        if d != h.device_id() {
            if let Err(e) = h.node.add_peer(PeerAddr { device: d, addr: a }) {
                tracing::warn!("cannot remember peer {d}: {e}");
            }
        }
    }
    *lock(&h.maint.dkg) = None;
    h.node.after_local_write();
    tokio::spawn(h.node.sync_now());
    MaintReply::Accepted
}

/// Makes this device's authority a `threshold`-of-N authority of this device and
/// `members` by a DKG over the network (see the module docs). Every member must be
/// running and reachable at a known address; each saves its own share in its own home.
/// Returns what the admin wrote.
///
/// Every member of this journal must be at this device's maintenance epoch, so it
/// syncs first; a run that fails because a participant is (or, when it finished, was)
/// at another epoch (a snapshot completed meanwhile) syncs and runs again until
/// `timeout` has passed. More than one round may be needed: a member that lacks a
/// snapshot's blob holds the completion back until its own next round fetched the blob.
pub(crate) async fn create_authority(
    h: &MaintHandle,
    threshold: u16,
    members: &[DeviceId],
    timeout: Duration,
) -> Result<AuthorityCreated, DkgNetError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        h.node.sync_now().await;
        match create_authority_once(h, threshold, members, timeout).await {
            Err(e) if e.is_epoch_mismatch() && tokio::time::Instant::now() < deadline => {
                tracing::info!("key generation at another maintenance epoch ({e}); syncing again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

async fn create_authority_once(
    h: &MaintHandle,
    threshold: u16,
    members: &[DeviceId],
    timeout: Duration,
) -> Result<AuthorityCreated, DkgNetError> {
    let me = h.device_id();
    let device = h.device.clone();
    let ns = device.namespace();
    let state = blocking(|| device.store().maintenance_state(ns))?;
    let plan = KeyGenPlan::new(&state, ns, me, members, threshold)?;
    let session = plan.session.clone();
    let all = session.members.clone();
    let mut addrs = vec![(me, h.listen.to_string())];
    for m in all.iter().filter(|m| **m != me) {
        let a = h.node.peer_address(m).ok_or(DkgNetError::NoAddress(*m))?;
        addrs.push((*m, a.to_string()));
    }
    let id = session.id();
    {
        let mut guard = lock(&h.maint.dkg);
        if guard.is_some() {
            return Err(DkgNetError::Busy);
        }
        let addrs = addrs
            .iter()
            .filter_map(|(d, a)| Some((*d, a.parse().ok()?)))
            .collect();
        let deadline = Instant::now() + timeout + MEMBER_RUN_TTL;
        *guard = Some(DkgRun::new(session.clone(), me, addrs, deadline));
    }
    let others: Vec<DeviceId> = all.iter().copied().filter(|d| *d != me).collect();
    let result = run_as_admin(h, &plan, id, &others, addrs, timeout).await;
    if result.is_err() {
        let abort = MaintMessage::DkgAbort { session: id };
        for d in &others {
            let _ = send(h, *d, &abort).await;
        }
    }
    *lock(&h.maint.dkg) = None;
    result
}

async fn run_as_admin(
    h: &MaintHandle,
    plan: &KeyGenPlan,
    id: Hash32,
    others: &[DeviceId],
    addrs: Vec<(DeviceId, String)>,
    timeout: Duration,
) -> Result<AuthorityCreated, DkgNetError> {
    let started = Instant::now();
    let session = &plan.session;
    let me = h.device_id();
    // Everyone accepts before anyone broadcasts, so no round message meets a member
    // that does not know the session yet.
    let invite = MaintMessage::DkgInvite {
        session: session.clone(),
        addrs,
        maintenance_epoch: plan.epoch,
    };
    tell_all(h, others, &invite).await?;
    tell_all(h, others, &MaintMessage::DkgStart { session: id }).await?;
    start_participant(h).map_err(DkgNetError::Failed)?;
    let group_key = loop {
        {
            let guard = lock(&h.maint.dkg);
            let Some(run) = guard.as_ref() else {
                return Err(DkgNetError::Failed("the run was dropped".into()));
            };
            if let Some(f) = &run.failed {
                return Err(DkgNetError::Failed(f.clone()));
            }
            if let Some(share) = &run.share {
                if let Some(verdict) = plan.verdict(me, share.group_key(), &run.finished) {
                    break verdict?;
                }
            }
        }
        if started.elapsed() >= timeout {
            return Err(DkgNetError::TimedOut(timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let device = h.device.clone();
    let ns = device.namespace();
    let (change, facts) = blocking(|| -> Result<_, DkgNetError> {
        let state = device.store().maintenance_state(ns)?;
        plan.still_at(state.maintenance_epoch())?;
        let change = UnsignedFact {
            namespace: ns,
            epoch: state.current_epoch(),
            payload: plan.membership_change(group_key),
        }
        .sign(device.key().signing_key());
        let mut facts = Vec::new();
        for f in device.store().scan_maintenance(ns)? {
            let f = f?
                .verify()
                .map_err(|e| DkgNetError::Failed(e.to_string()))?;
            if keygen::carried_by_join(f.payload()) {
                facts.push(ByteBuf::from(f.bytes().to_vec()));
            }
        }
        facts.push(ByteBuf::from(change.bytes().to_vec()));
        Ok((change, facts))
    })?;
    let join = MaintMessage::DkgJoin { session: id, facts };
    if let Err(e) = tell_all(h, others, &join).await {
        // The change is valid and the shares exist: members that missed the join learn
        // the change by sync once they adopt the journal; say so, but go on.
        tracing::warn!("a member did not take the join: {e}");
    }
    let report = blocking(|| device.store().insert_batch(std::slice::from_ref(&change)))?;
    if let Some(r) = report.rejected.first() {
        return Err(DkgNetError::Rejected(r.error.to_string()));
    }
    // The admin keys the new epoch for the vault if the authority uses one (section 14);
    // the change stands either way, and `tend vault key` can do it later.
    if let Err(e) = blocking(|| crate::vault_peer::key_epoch_if_enabled(&device)) {
        tracing::warn!("the new identity epoch has no vault key yet: {e}");
    }
    h.node.after_local_write();
    tokio::spawn(h.node.sync_now());
    Ok(AuthorityCreated {
        namespace: ns.to_string(),
        identity_epoch: session.identity_epoch,
        threshold: session.threshold,
        members: session.members.iter().map(ToString::to_string).collect(),
        group_key: hex::encode(group_key.0),
    })
}

/// Sends `msg` to every device in `to` at once; all must accept it.
async fn tell_all(h: &MaintHandle, to: &[DeviceId], msg: &MaintMessage) -> Result<(), DkgNetError> {
    let mut tasks = tokio::task::JoinSet::new();
    for d in to {
        let h = h.clone();
        let msg = msg.clone();
        let d = *d;
        tasks.spawn(async move { (d, send(&h, d, &msg).await) });
    }
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let err = match r {
            Ok((_, Ok(MaintReply::Accepted))) => None,
            Ok((member, Ok(MaintReply::Refused { reason }))) => {
                Some(DkgNetError::Refused { member, reason })
            }
            Ok((member, Err(source))) => Some(DkgNetError::Unreachable { member, source }),
            Err(e) => Some(DkgNetError::Failed(e.to_string())),
        };
        if first_err.is_none() {
            first_err = err;
        }
    }
    first_err.map_or(Ok(()), Err)
}
