//! Snapshot ceremonies over the network: the `tend/maint/1` protocol, the node's
//! [`tend_snapshot::SnapshotEngine`] driver (messages, timer, keys, effects) and automatic
//! snapshot triggers. The protocol's messages, the node's maintenance state and its
//! connections live below, in [`crate::maint`], which key generation ([`crate::dkg`])
//! shares; this module works only through the handle the node gives it there.
//!
//! Protocol `tend/maint/1` (one ALPN on the device's iroh endpoint, beside `tend/sync/1`):
//! every message travels on its own bidirectional QUIC stream as one frame (u32 big-endian
//! length, then the canonical DAG-CBOR of a [`MaintMessage`], at most [`MAX_MAINT_FRAME`]
//! bytes, refused before it is buffered); the receiver answers with one frame holding a
//! [`MaintReply`] and finishes the stream. The sender of a message is the connection's
//! authenticated endpoint id, never a field of the message. A connection is admitted only
//! from a current member, from a configured peer (the `peers` setting, `--peer`) or from a
//! device named in a key generation this device accepted; anything else is closed at the
//! handshake with `NOT_MEMBER` and counted. Ceremony messages are accepted from current
//! members only; key generation messages follow the rule in [`crate::dkg`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{DeviceId, Epoch, MaintenanceFact, MaintenanceState, Payload};
use tend_crypto::KeyShare;
use tend_snapshot::{
    AbortReason, CeremonyAction, CeremonyEvent, CeremonyInput, LocalJournal, MessageBody,
    Recipient, Refusal, SignerKey,
};
use tokio::sync::oneshot;

use crate::device::DeviceError;
pub use crate::endpoint::MAINT_ALPN;
use crate::maint::{
    blocking, current_members, decode_facts, lock, send, Maint, MaintHandle, Waiter,
};
pub use crate::maint::{
    CeremonyError, MaintMessage, MaintReply, MaintStats, SendError, SnapshotTrigger,
    MAX_MAINT_FRAME,
};
use crate::replica::DeviceReplica;
use tend_replica::EngineView;

/// How often the engine is ticked (deadlines, epoch changes, retries).
const TICK: Duration = Duration::from_millis(200);
/// A ceremony's default deadline.
pub const DEFAULT_CEREMONY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often automatic snapshot triggers are evaluated.
const TRIGGER_EVERY: Duration = Duration::from_secs(10);

/// The key for the current identity epoch, if the engine does not hold it yet: the
/// device key for a one-device authority, else the FROST share saved in the home.
fn key_to_install(h: &MaintHandle, state: &MaintenanceState) -> Option<SignerKey> {
    let m = state.membership()?;
    let me = h.device_id();
    if !m.members.contains(&me) {
        return None;
    }
    let wanted = (m.identity_epoch, m.group_key);
    if *lock(&h.maint.installed) == Some(wanted) {
        return None;
    }
    let key = if m.members.len() == 1 {
        SignerKey::Single {
            identity_epoch: m.identity_epoch,
            key: h.device.key().signing_key().clone(),
        }
    } else {
        match KeyShare::load(h.device.home(), m.identity_epoch) {
            Ok(s) if s.group_key() == m.group_key => SignerKey::Frost(s),
            // Not (yet) ours: the key generation may still be saving it; try again on
            // the next tick.
            Ok(_) | Err(_) => return None,
        }
    };
    *lock(&h.maint.installed) = Some(wanted);
    Some(key)
}

/// Feeds one input to the engine over the device's current journal.
fn step(h: &MaintHandle, input: CeremonyInput) -> Result<Vec<CeremonyAction>, DeviceError> {
    let device = &h.device;
    let maint = &h.maint;
    let replica = DeviceReplica::new(device);
    let view = EngineView::new(&replica)?;
    let now = maint.start.elapsed();
    let mut rng = rand::rngs::OsRng;
    let mut out = Vec::new();
    let mut engine = lock(&maint.engine);
    let mut restored = lock(&maint.votes_restored);
    if !*restored {
        crate::votes::restore(device.store(), &mut engine)?;
        *restored = true;
    }
    if let Some(key) = key_to_install(h, view.state()) {
        out.extend(engine.handle(now, &view, CeremonyInput::InstallKey(key), &mut rng));
    }
    out.extend(engine.handle(now, &view, input, &mut rng));
    Ok(out)
}

/// Carries out the engine's effects: messages go out on their own tasks, facts are
/// signed and stored (then pushed to peers, so proposals and completions reach everyone),
/// blobs are stored, events settle waiting proposers.
///
/// The facts a coordinator writes on completing a ceremony go to each member with its
/// `Closed { completed: true }`, in one message ([`MaintMessage::Completion`]): a member
/// then holds the completion when it handles `Closed` and opens no session for it. In a
/// fleet of 20, those sessions (19 at once against one coordinator serving 8 at a time)
/// were half of the ceremony's time. A member that refuses the message (an older release
/// cannot decode it) gets the plain `Closed`.
fn carry_out(h: &MaintHandle, outputs: Vec<CeremonyAction>) {
    let mut written = Vec::new();
    for o in outputs {
        match o {
            CeremonyAction::Send { to, message } => {
                let targets = match to {
                    Recipient::Device(d) => vec![d],
                    Recipient::All => current_members(h)
                        .into_iter()
                        .filter(|d| *d != h.device_id())
                        .collect(),
                };
                let bytes = ByteBuf::from(message.to_bytes());
                let completion = match message.body {
                    MessageBody::Closed { completed: true } if !written.is_empty() => {
                        Some(MaintMessage::Completion {
                            facts: written.clone(),
                            closed: bytes.clone(),
                        })
                    }
                    _ => None,
                };
                let msg = MaintMessage::Ceremony(bytes);
                for d in targets {
                    let h = h.clone();
                    let (msg, completion) = (msg.clone(), completion.clone());
                    tokio::spawn(async move {
                        if let Some(completion) = completion {
                            match send(&h, d, &completion).await {
                                Ok(MaintReply::Accepted) => return,
                                Ok(MaintReply::Refused { reason }) => tracing::debug!(
                                    "{d} refused the completion: {reason}; sending Closed alone"
                                ),
                                Err(e) => tracing::debug!("completion not delivered: {e}"),
                            }
                        }
                        match send(&h, d, &msg).await {
                            Ok(MaintReply::Accepted) => {}
                            Ok(MaintReply::Refused { reason }) => {
                                tracing::debug!("{d} refused a ceremony message: {reason}")
                            }
                            Err(e) => tracing::debug!("ceremony message not delivered: {e}"),
                        }
                    });
                }
            }
            CeremonyAction::WriteFact(f) => match blocking(|| h.device.write(f)) {
                Ok(fact) => written.push(ByteBuf::from(fact.bytes().to_vec())),
                Err(e) => tracing::warn!("cannot write a ceremony fact: {e}"),
            },
            CeremonyAction::StoreBlob { cid, bytes } => {
                if let Err(e) = blocking(|| h.device.store().put_blob(cid.codec(), &bytes)) {
                    tracing::warn!("cannot store snapshot blob {cid}: {e}");
                }
            }
            CeremonyAction::SaveVotes(votes) => {
                if let Err(e) = blocking(|| crate::votes::save(h.device.store(), &votes)) {
                    // Nothing after it may leave: it carries the vote that was not kept.
                    tracing::warn!("cannot keep this member's snapshot votes: {e}");
                    break;
                }
            }
            CeremonyAction::Event(CeremonyEvent::CompletionAnnounced { coordinator, .. }) => {
                tokio::spawn(h.node.sync_with(coordinator));
            }
            CeremonyAction::Event(e) => {
                count_outcome(h, &e);
                on_event(&h.maint, e)
            }
        }
    }
    if !written.is_empty() {
        h.node.after_local_write();
    }
}

fn on_event(maint: &Maint, e: CeremonyEvent) {
    let mut waiters = lock(&maint.waiters);
    match e {
        CeremonyEvent::Completed(c) => {
            maint.counters.completed.fetch_add(1, Ordering::Relaxed);
            tracing::info!("snapshot at epoch {} completed", c.snapshot.epoch);
            if let Some(w) = waiters.remove(&c.proposal_id) {
                let _ = w.tx.send(Ok(c));
            }
        }
        CeremonyEvent::PeerRefused {
            proposal_id,
            from,
            reason,
        } => {
            if let Some(w) = waiters.get_mut(&proposal_id) {
                w.refusals.push((from, reason));
            }
        }
        CeremonyEvent::Aborted {
            proposal_id,
            reason,
        } => {
            // An epoch change is retried under the new epoch ([`CeremonyEvent::Retried`]
            // moves the waiter); other aborts end the wait.
            if matches!(reason, AbortReason::EpochChanged { .. }) {
                return;
            }
            if let Some(w) = waiters.remove(&proposal_id) {
                let detail = refusal_detail(&w.refusals);
                let err = match reason {
                    AbortReason::TimedOut => CeremonyError::TimedOut { secs: 0, detail },
                    other => CeremonyError::Aborted {
                        why: format!("{other:?}{detail}"),
                        prefix_differs: w
                            .refusals
                            .iter()
                            .any(|(_, r)| matches!(r, Refusal::DigestMismatch { .. })),
                    },
                };
                let _ = w.tx.send(Err(err));
            }
        }
        CeremonyEvent::Retried { old, new, epoch } => {
            tracing::info!(
                "snapshot proposal retried under identity epoch {}",
                epoch.identity_epoch
            );
            if let Some(w) = waiters.remove(&old) {
                waiters.insert(new, w);
            }
        }
        CeremonyEvent::Ignored { from, reason } => {
            maint.counters.ignored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("ceremony message from {from} ignored: {reason}");
        }
        CeremonyEvent::Refused {
            proposal_id,
            reason,
        } => tracing::info!("refused to sign proposal {proposal_id}: {reason:?}"),
        CeremonyEvent::Proposed { .. }
        | CeremonyEvent::CompletionAnnounced { .. }
        | CeremonyEvent::ProposalRejected { .. }
        | CeremonyEvent::Signed { .. } => {}
    }
}

/// Counts a ceremony's end in `tend_ceremonies_total{role, outcome}`.
fn count_outcome(h: &MaintHandle, e: &CeremonyEvent) {
    let (role, outcome) = match e {
        CeremonyEvent::Completed(_) => ("coordinator", "completed"),
        CeremonyEvent::Aborted {
            reason: AbortReason::EpochChanged { .. },
            ..
        } => return, // retried under the new epoch
        CeremonyEvent::Aborted { .. } => ("coordinator", "aborted"),
        CeremonyEvent::Signed { .. } => ("signer", "signed"),
        CeremonyEvent::Refused { .. } => ("signer", "refused"),
        _ => return,
    };
    h.metrics
        .ceremonies
        .get_or_create(&vec![
            ("role".to_string(), role.to_string()),
            ("outcome".to_string(), outcome.to_string()),
        ])
        .inc();
}

fn refusal_detail(refusals: &[(DeviceId, Refusal)]) -> String {
    if refusals.is_empty() {
        return String::new();
    }
    let each: Vec<String> = refusals
        .iter()
        .map(|(from, reason)| format!("{from} refused: {reason:?}"))
        .collect();
    format!(" ({})", each.join("; "))
}

/// Handles a message from the authenticated `peer`: a ceremony message here, a key
/// generation message in [`crate::dkg`].
pub(crate) async fn receive(h: &MaintHandle, peer: DeviceId, msg: MaintMessage) -> MaintReply {
    match msg {
        MaintMessage::Ceremony(bytes) => receive_ceremony(h, peer, bytes),
        MaintMessage::Completion { facts, closed } => match receive_completion(h, peer, facts) {
            MaintReply::Accepted => receive_ceremony(h, peer, closed),
            refused => refused,
        },
        other => crate::dkg::receive(h, peer, other).await,
    }
}

/// Steps the engine with a ceremony message from `peer` and carries out what it says.
fn receive_ceremony(h: &MaintHandle, peer: DeviceId, bytes: ByteBuf) -> MaintReply {
    if !current_members(h).contains(&peer) {
        return MaintReply::refused("not a member of this authority");
    }
    h.maint
        .counters
        .ceremony_messages
        .fetch_add(1, Ordering::Relaxed);
    let input = CeremonyInput::Message {
        from: peer,
        bytes: bytes.into_vec(),
    };
    let outputs = match blocking(|| step(h, input)) {
        Ok(o) => o,
        Err(e) => return MaintReply::refused(format!("cannot read the journal: {e}")),
    };
    let ignored = outputs.iter().find_map(|o| match o {
        CeremonyAction::Event(CeremonyEvent::Ignored { from, reason }) if *from == peer => {
            Some(reason.clone())
        }
        _ => None,
    });
    carry_out(h, outputs);
    match ignored {
        Some(reason) => MaintReply::Refused { reason },
        None => MaintReply::Accepted,
    }
}

/// Admits the facts a coordinator wrote on completing a ceremony
/// ([`MaintMessage::Completion`]; the caller then handles its `Closed`) as a session
/// would, once they prove to be exactly that: a member's, of this journal, a completion
/// newer than this device's latest snapshot whose threshold signature verifies, and at
/// most the tombstone of the blob it supersedes. Anything else comes by sync, under its
/// rate limits, so a member cannot use this to write unlimited facts. A completion whose
/// blob this device lacks is held back as in a session, and `Closed` then fetches it.
fn receive_completion(h: &MaintHandle, peer: DeviceId, facts: Vec<ByteBuf>) -> MaintReply {
    let ns = h.device.namespace();
    let state = match blocking(|| h.device.store().maintenance_state(ns)) {
        Ok(s) => s,
        Err(e) => return MaintReply::refused(format!("cannot read the journal: {e}")),
    };
    if !state
        .membership()
        .is_some_and(|m| m.members.contains(&peer))
    {
        return MaintReply::refused("not a member of this authority");
    }
    let verified = match decode_facts(&facts, ns) {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let latest = state.latest_snapshot.as_ref();
    let Some((first, rest)) = verified.split_first() else {
        return MaintReply::refused("no completion");
    };
    let Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) = first.payload() else {
        return MaintReply::refused("the first fact is not a snapshot completion");
    };
    let certified = state
        .membership_at(first.epoch())
        .is_some_and(|m| c.certify(&ns, &m.group_key).is_some());
    if !certified {
        return MaintReply::refused("the threshold signature does not verify");
    }
    if latest.is_some_and(|l| l.proposal_id == c.proposal_id) {
        return MaintReply::Accepted;
    }
    if latest.is_some_and(|l| l.snapshot.epoch >= c.snapshot.epoch) {
        return MaintReply::refused("not newer than this device's latest snapshot");
    }
    let superseded = latest.map(|l| l.snapshot.blob_cid);
    let only_its_tombstone = match rest {
        [] => true,
        [t] => matches!(
            t.payload(),
            Payload::Maintenance(MaintenanceFact::BlobTombstone(b)) if Some(b.cid) == superseded
        ),
        _ => false,
    };
    if !only_its_tombstone {
        return MaintReply::refused("more than the completion and its superseded blob's tombstone");
    }
    match blocking(|| h.node.admit_facts(verified)) {
        Ok(()) => MaintReply::Accepted,
        Err(reason) => MaintReply::Refused { reason },
    }
}

/// Ticks the engine, expires key generations, and runs the automatic snapshot trigger.
pub(crate) async fn timer_loop(h: MaintHandle) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match blocking(|| step(&h, CeremonyInput::Tick)) {
            Ok(outputs) => carry_out(&h, outputs),
            Err(e) => tracing::warn!("ceremony tick: {e}"),
        }
        crate::dkg::expire(&h);
        maybe_trigger(&h);
    }
}

/// The automatic snapshot rule: only the admin of the current journal proposes (so at most
/// one device proposes at a time, and every device can tell which), only when its engine is
/// idle and no key generation runs, at most every [`TRIGGER_EVERY`].
fn maybe_trigger(h: &MaintHandle) {
    let maint = &h.maint;
    let Some(trigger) = lock(&maint.trigger).clone() else {
        return;
    };
    {
        let mut last = lock(&maint.last_trigger);
        if last.is_some_and(|t| t.elapsed() < TRIGGER_EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    if !lock(&maint.engine).is_idle() || lock(&maint.dkg).is_some() {
        return;
    }
    let device = &h.device;
    let ns = device.namespace();
    let Ok(state) = blocking(|| device.store().maintenance_state(ns)) else {
        return;
    };
    if !state.is_admin_at(&h.device_id(), state.current_epoch()) {
        return;
    }
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(target) = blocking(|| (trigger.0)(device.store(), ns, now_secs)) else {
        return;
    };
    let h = h.clone();
    tokio::spawn(async move {
        match propose_snapshot(&h, Some(target), DEFAULT_CEREMONY_TIMEOUT).await {
            Ok(c) => tracing::info!("automatic snapshot at epoch {}", c.snapshot.epoch),
            Err(e) => tracing::info!("automatic snapshot at epoch {target}: {e}"),
        }
    });
}

/// Runs a snapshot ceremony coordinated by this device over the network, for every
/// fact below `target` (default: the current epoch + 1), and returns the completed
/// snapshot; fails on refusals, abort or `timeout`. A ceremony aborted by an identity
/// epoch advance is retried under the new key and keeps this call waiting.
pub(crate) async fn propose_snapshot(
    h: &MaintHandle,
    target: Option<Epoch>,
    timeout: Duration,
) -> Result<SnapshotCompleted, CeremonyError> {
    // Members sign only a prefix they hold exactly as the proposer does. A fact written
    // just before the proposal (a metadata advertisement, say) can still be in flight:
    // members then refuse with a digest mismatch, and after another sync round a new
    // proposal (at a new target, since a member votes once per target) succeeds.
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        h.node.sync_now().await;
        match propose_once(h, target, timeout).await {
            Err(CeremonyError::Aborted {
                why,
                prefix_differs: true,
            }) if target.is_none() && attempt < ATTEMPTS => {
                attempt += 1;
                tracing::info!("snapshot proposal refused ({why}); syncing and proposing again");
            }
            other => return other,
        }
    }
}

async fn propose_once(
    h: &MaintHandle,
    target: Option<Epoch>,
    timeout: Duration,
) -> Result<SnapshotCompleted, CeremonyError> {
    let device = &h.device;
    let target = match target {
        Some(t) => t,
        None => blocking(|| device.store().maintenance_state(device.namespace()))?
            .current_epoch()
            .next(),
    };
    let maint = &h.maint;
    let input = CeremonyInput::Propose {
        target_epoch: target,
        timeout_ms: timeout.as_millis() as u64,
    };
    let outputs = blocking(|| step(h, input))?;
    let mut proposal = None;
    for o in &outputs {
        match o {
            CeremonyAction::Event(CeremonyEvent::Proposed { proposal_id, .. }) => {
                proposal = Some(*proposal_id)
            }
            CeremonyAction::Event(CeremonyEvent::ProposalRejected { reason, .. }) => {
                let reason = format!("{reason:?}");
                carry_out(h, outputs);
                return Err(CeremonyError::Rejected(reason));
            }
            _ => {}
        }
    }
    let Some(id) = proposal else {
        carry_out(h, outputs);
        return Err(CeremonyError::Rejected("the engine did not propose".into()));
    };
    let (tx, rx) = oneshot::channel();
    lock(&maint.waiters).insert(
        id,
        Waiter {
            tx,
            refusals: Vec::new(),
        },
    );
    carry_out(h, outputs);
    // The engine's own deadline ends the wait; the grace covers a retry's new one.
    let secs = timeout.as_secs();
    match tokio::time::timeout(timeout * 2 + Duration::from_secs(1), rx).await {
        Ok(Ok(Ok(c))) => Ok(c),
        Ok(Ok(Err(CeremonyError::TimedOut { detail, .. }))) => {
            Err(CeremonyError::TimedOut { secs, detail })
        }
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(CeremonyError::Stopped),
        Err(_) => {
            // Our receiver is gone: drop its waiter, whatever proposal id it moved to.
            lock(&maint.waiters).retain(|_, w| !w.tx.is_closed());
            Err(CeremonyError::TimedOut {
                secs,
                detail: String::new(),
            })
        }
    }
}
