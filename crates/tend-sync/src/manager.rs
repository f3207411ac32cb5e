//! The session manager: owns running sessions, enforces the global and per-peer session
//! limits and rate limits (sessions a peer may open, frames it may send, fact batches we
//! send), routes messages and timers to them, aborts them when the identity epoch
//! advances or a fence becomes unsatisfied, and releases each session's resources when it
//! ends.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tend_core::{DeviceId, FactId, JournalError, JournalNamespace, VerifiedFact};

use crate::items::SharedItems;
use crate::message::{AbortReason, RefuseReason, SyncMessage};
use crate::rate::{Admit, InboundTicket, Limited, RateConfig, RateLimits};
use crate::session::{Action, FactHost, LocalView, Outcome, Session, SessionConfig, SessionError};

/// A session's handle, unique within one manager.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SessionId(pub u64);

/// Limits of a [`SessionManager`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Sessions open at once, over all peers.
    pub max_concurrent: usize,
    /// Sessions open at once with one peer.
    pub max_per_peer: usize,
    pub session: SessionConfig,
    pub rate: RateConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            max_per_peer: 1,
            session: SessionConfig::default(),
            rate: RateConfig::default(),
        }
    }
}

/// An effect for the caller, tagged with its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagerAction {
    /// Send bytes to `peer` on the session's stream.
    Send {
        session: SessionId,
        peer: DeviceId,
        bytes: Vec<u8>,
    },
    /// Call [`SessionManager::poll`] at this time.
    WakeAt(Duration),
    /// The session ended and was removed; close its stream.
    Closed {
        session: SessionId,
        peer: DeviceId,
        outcome: Outcome,
    },
}

/// An incoming session that passed the rate and capacity checks
/// ([`SessionManager::admit_session`]); only the manager makes one.
#[derive(Debug)]
pub struct AdmittedSession {
    peer: DeviceId,
}

/// Why a session was not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    /// No slot is free. For an incoming session, `refusal` is the encoded `Refuse(Busy)`
    /// to send back before closing the stream.
    #[error("at session capacity ({active} open, {with_peer} with this peer)")]
    AtCapacity {
        active: usize,
        with_peer: usize,
        refusal: Vec<u8>,
    },
    /// The peer opens sessions faster than the incoming session limit allows. `refusal`
    /// is the encoded `Refuse(RateLimited)` to send back before closing the stream.
    #[error("the peer opens sessions too fast; it may try again in {retry_after_ms} ms")]
    RateLimited {
        retry_after_ms: u64,
        refusal: Vec<u8>,
    },
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Owns the running sessions of a device.
///
/// Initiator sessions opened together as one group (a sync round with several peers,
/// [`SessionManager::open_in_group`]) share their wants: a fact one of them asked for is
/// not asked for by another of the group while both run. The caller waits for the whole
/// group, which together still brings everything, while one session alone may end
/// without some fact a sibling brings. A session that ends gives up its claims, so a
/// sibling's later answers may ask for them again. The claims exist only while two or
/// more sessions of a group run, so a lone session costs nothing.
pub struct SessionManager {
    config: ManagerConfig,
    sessions: BTreeMap<SessionId, Session>,
    per_peer: BTreeMap<DeviceId, usize>,
    rate: RateLimits,
    next_id: u64,
    /// The group of each grouped session.
    group_of: HashMap<SessionId, u64>,
    /// Per group with two or more running sessions: which session asked for each fact.
    asked: HashMap<u64, HashMap<FactId, SessionId>>,
}

/// The host as one session of a group sees it: wants are claimed against the group's
/// other sessions, everything else goes to the caller's host.
struct Grouped<'a> {
    host: &'a mut dyn FactHost,
    session: SessionId,
    asked: &'a mut HashMap<FactId, SessionId>,
}

impl FactHost for Grouped<'_> {
    fn load_fact(&self, namespace: JournalNamespace, id: &FactId) -> Option<Vec<u8>> {
        self.host.load_fact(namespace, id)
    }

    fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        self.host.admit(fact)
    }

    fn holds(&self, namespace: JournalNamespace, id: &FactId) -> bool {
        self.host.holds(namespace, id)
    }

    fn is_authorized(&self, namespace: JournalNamespace, peer: &DeviceId) -> bool {
        self.host.is_authorized(namespace, peer)
    }

    fn claim_want(&mut self, id: &FactId) -> bool {
        *self.asked.entry(*id).or_insert(self.session) == self.session && self.host.claim_want(id)
    }
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("active", &self.sessions.len())
            .field("per_peer", &self.per_peer)
            .finish()
    }
}

impl SessionManager {
    /// A manager with no sessions.
    pub fn new(config: ManagerConfig) -> Self {
        let rate = RateLimits::new(config.rate);
        Self {
            config,
            sessions: BTreeMap::new(),
            per_peer: BTreeMap::new(),
            rate,
            next_id: 0,
            group_of: HashMap::new(),
            asked: HashMap::new(),
        }
    }

    /// Runs `f` on session `id` with the host it should see: the caller's, or for a
    /// session of a group with running siblings, one that claims its wants.
    fn with_session<R>(
        &mut self,
        id: SessionId,
        host: &mut dyn FactHost,
        f: impl FnOnce(&mut Session, &mut dyn FactHost, &mut RateLimits) -> R,
    ) -> Option<R> {
        let session = self.sessions.get_mut(&id)?;
        let asked = self.group_of.get(&id).and_then(|g| self.asked.get_mut(g));
        Some(match asked {
            Some(asked) => {
                let mut grouped = Grouped {
                    host,
                    session: id,
                    asked,
                };
                f(session, &mut grouped, &mut self.rate)
            }
            None => f(session, host, &mut self.rate),
        })
    }

    /// Starts or drops a group's claims as its sessions come to overlap or stop.
    fn update_group(&mut self, group: u64) {
        let running = self.group_of.values().filter(|g| **g == group).count();
        if running > 1 {
            self.asked.entry(group).or_default();
        } else {
            self.asked.remove(&group);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// Open sessions.
    pub fn active(&self) -> usize {
        self.sessions.len()
    }

    /// Open sessions with `peer`.
    pub fn active_with(&self, peer: &DeviceId) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    /// Peers with at least one open session (for leak checks).
    pub fn peers_with_sessions(&self) -> usize {
        self.per_peer.len()
    }

    /// Whether a new session with `peer` fits the limits.
    pub fn has_room_for(&self, peer: &DeviceId) -> bool {
        self.sessions.len() < self.config.max_concurrent
            && self.active_with(peer) < self.config.max_per_peer
    }

    /// The session, if it is still open.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// Ids of open sessions with `peer`.
    pub fn sessions_with(&self, peer: &DeviceId) -> Vec<SessionId> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.peer() == *peer)
            .map(|(id, _)| *id)
            .collect()
    }

    fn capacity_error(&self, peer: &DeviceId) -> ManagerError {
        ManagerError::AtCapacity {
            active: self.sessions.len(),
            with_peer: self.active_with(peer),
            refusal: SyncMessage::Refuse(RefuseReason::Busy).encode(),
        }
    }

    /// Opens a session to `peer` as initiator.
    pub fn open(
        &mut self,
        now: Duration,
        peer: DeviceId,
        local: LocalView,
        items: SharedItems,
    ) -> Result<(SessionId, Vec<ManagerAction>), ManagerError> {
        if !self.has_room_for(&peer) {
            return Err(self.capacity_error(&peer));
        }
        let (session, actions) =
            Session::initiate(now, peer, local, items, self.config.session.clone())?;
        Ok(self.insert(session, actions))
    }

    /// Opens a session to `peer` as initiator, one of `group`: sessions of one group
    /// (a sync round with several peers) ask for each missing fact once between them
    /// while they run together, so the caller must wait for all of them.
    pub fn open_in_group(
        &mut self,
        now: Duration,
        peer: DeviceId,
        local: LocalView,
        items: SharedItems,
        group: u64,
    ) -> Result<(SessionId, Vec<ManagerAction>), ManagerError> {
        if !self.has_room_for(&peer) {
            return Err(self.capacity_error(&peer));
        }
        let (session, actions) =
            Session::initiate(now, peer, local, items, self.config.session.clone())?;
        let id = SessionId(self.next_id);
        self.group_of.insert(id, group);
        self.update_group(group);
        let (inserted, actions) = self.insert(session, actions);
        debug_assert_eq!(inserted, id);
        Ok((inserted, actions))
    }

    /// Accepts an incoming session whose first message is `hello`:
    /// [`SessionManager::admit_session`] then [`SessionManager::accept_admitted`].
    pub fn accept(
        &mut self,
        now: Duration,
        peer: DeviceId,
        hello: &[u8],
        local: LocalView,
        items: SharedItems,
        host: &mut dyn FactHost,
    ) -> Result<(SessionId, Vec<ManagerAction>), ManagerError> {
        let admitted = self.admit_session(now, peer)?;
        self.accept_admitted(admitted, now, hello, local, items, host)
    }

    /// The cheap half of accepting a session `peer` opens: charges the attempt to the
    /// incoming session rate limits (every attempt counts, refused or not) and checks
    /// for a free slot. A caller that must build the item snapshot first (a store scan)
    /// calls this before building it, so a refused peer costs nothing more.
    pub fn admit_session(
        &mut self,
        now: Duration,
        peer: DeviceId,
    ) -> Result<AdmittedSession, ManagerError> {
        if let Admit::RetryAt(t) = self.rate.admit_session(peer, now) {
            let retry_after_ms = u64::try_from(t.saturating_sub(now).as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            return Err(ManagerError::RateLimited {
                retry_after_ms,
                refusal: SyncMessage::Refuse(RefuseReason::RateLimited { retry_after_ms }).encode(),
            });
        }
        if !self.has_room_for(&peer) {
            return Err(self.capacity_error(&peer));
        }
        Ok(AdmittedSession { peer })
    }

    /// Accepts a session [`SessionManager::admit_session`] admitted (the slot is checked
    /// again; the rate is not charged twice).
    pub fn accept_admitted(
        &mut self,
        admitted: AdmittedSession,
        now: Duration,
        hello: &[u8],
        local: LocalView,
        items: SharedItems,
        host: &mut dyn FactHost,
    ) -> Result<(SessionId, Vec<ManagerAction>), ManagerError> {
        let peer = admitted.peer;
        if !self.has_room_for(&peer) {
            return Err(self.capacity_error(&peer));
        }
        let (session, actions) = Session::accept(
            now,
            peer,
            hello,
            local,
            items,
            self.config.session.clone(),
            host,
        )?;
        Ok(self.insert(session, actions))
    }

    fn insert(
        &mut self,
        session: Session,
        actions: Vec<Action>,
    ) -> (SessionId, Vec<ManagerAction>) {
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let peer = session.peer();
        *self.per_peer.entry(peer).or_insert(0) += 1;
        self.sessions.insert(id, session);
        let mut out = Vec::new();
        self.translate(id, peer, actions, &mut out);
        (id, out)
    }

    /// Routes a message from the peer to its session. Messages for sessions that are no
    /// longer open are ignored.
    pub fn handle(
        &mut self,
        now: Duration,
        id: SessionId,
        bytes: &[u8],
        host: &mut dyn FactHost,
    ) -> Vec<ManagerAction> {
        let mut out = Vec::new();
        let Some((peer, actions)) = self.with_session(id, host, |session, host, rate| {
            (session.peer(), session.handle(now, bytes, host, Some(rate)))
        }) else {
            return out;
        };
        self.translate(id, peer, actions, &mut out);
        out
    }

    /// Asks to read one frame of `bytes` bytes that `peer` sent on any session, under the
    /// incoming message and byte limits ([`RateLimits::admit_incoming`]): on `RetryAt`,
    /// stop reading from the peer and offer the frame again then with the same ticket.
    pub fn admit_incoming(
        &mut self,
        peer: DeviceId,
        bytes: usize,
        now: Duration,
        ticket: &mut InboundTicket,
    ) -> Admit {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.rate.admit_incoming(peer, bytes, now, ticket)
    }

    /// How often each rate limit held something back since the last call (for metrics).
    pub fn take_limited(&mut self) -> Vec<(Limited, u64)> {
        self.rate.take_limited()
    }

    /// Aborts every open session for which `reason_for` gives a reason, telling the peer
    /// (an activated fence that this device or the peer no longer satisfies, say).
    pub fn abort_where(
        &mut self,
        now: Duration,
        mut reason_for: impl FnMut(&Session) -> Option<AbortReason>,
    ) -> Vec<ManagerAction> {
        let mut out = Vec::new();
        let doomed: Vec<(SessionId, AbortReason)> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.is_finished())
            .filter_map(|(id, s)| reason_for(s).map(|r| (*id, r)))
            .collect();
        for (id, reason) in doomed {
            if let Some(session) = self.sessions.get_mut(&id) {
                let peer = session.peer();
                let actions = session.abort(now, reason);
                self.translate(id, peer, actions, &mut out);
            }
        }
        out
    }

    /// Runs timers of every session: timeouts and rate-limited sends.
    pub fn poll(&mut self, now: Duration, host: &mut dyn FactHost) -> Vec<ManagerAction> {
        let mut out = Vec::new();
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            if let Some((peer, actions)) = self.with_session(id, host, |session, host, rate| {
                (session.peer(), session.poll(now, host, Some(rate)))
            }) {
                self.translate(id, peer, actions, &mut out);
            }
        }
        out
    }

    /// The local identity epoch of `namespace` advanced: aborts every session of that
    /// namespace running under an older epoch (DESIGN rule 9).
    pub fn identity_epoch_advanced(
        &mut self,
        now: Duration,
        namespace: JournalNamespace,
        identity_epoch: u64,
    ) -> Vec<ManagerAction> {
        let mut out = Vec::new();
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.namespace() == namespace)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(session) = self.sessions.get_mut(&id) {
                let peer = session.peer();
                let actions = session.identity_epoch_advanced(now, identity_epoch);
                self.translate(id, peer, actions, &mut out);
            }
        }
        out
    }

    /// Closes a session from our side (the stream broke, shutdown).
    pub fn close(&mut self, now: Duration, id: SessionId) -> Vec<ManagerAction> {
        let mut out = Vec::new();
        if let Some(session) = self.sessions.get_mut(&id) {
            let peer = session.peer();
            let actions = session.close(now);
            self.translate(id, peer, actions, &mut out);
        }
        out
    }

    fn translate(
        &mut self,
        id: SessionId,
        peer: DeviceId,
        actions: Vec<Action>,
        out: &mut Vec<ManagerAction>,
    ) {
        for a in actions {
            match a {
                Action::Send(bytes) => out.push(ManagerAction::Send {
                    session: id,
                    peer,
                    bytes,
                }),
                Action::WakeAt(t) => out.push(ManagerAction::WakeAt(t)),
                Action::Finished(outcome) => {
                    self.release(id, peer);
                    out.push(ManagerAction::Closed {
                        session: id,
                        peer,
                        outcome,
                    });
                }
            }
        }
    }

    fn release(&mut self, id: SessionId, peer: DeviceId) {
        if self.sessions.remove(&id).is_some() {
            if let Some(n) = self.per_peer.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    self.per_peer.remove(&peer);
                }
            }
            if let Some(group) = self.group_of.remove(&id) {
                // What the session asked for and did not get may be asked for again.
                if let Some(asked) = self.asked.get_mut(&group) {
                    asked.retain(|_, by| *by != id);
                }
                self.update_group(group);
            }
        }
    }
}
