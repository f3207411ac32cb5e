//! A deterministic in-memory fleet: devices with in-memory journals and reduced state,
//! connected by a seeded simulated network that delays, reorders (across links) and drops
//! messages, driving the sans-IO session managers.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tend_core::{
    reduce, AuthorityFact, AuthorityGenesis, DeviceId, Epoch, FactId, GroupKey, Hash32, Journal,
    JournalError, JournalNamespace, MaintenanceEpoch, MaintenanceState, Payload, ProtocolVersion,
    UnsignedFact, VerifiedFact,
};
use tend_sync::{
    FactHost, FenceStatus, LocalView, ManagerAction, ManagerConfig, ManagerError, MemItems,
    Outcome, PeerConfig, PeerManager, SessionId, SessionManager, SessionResult, SharedItems,
    SyncItem,
};

/// A key from a small seed.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn device_id(k: &SigningKey) -> DeviceId {
    DeviceId(k.verifying_key().to_bytes())
}

/// The genesis of an authority whose members are `keys`, admin the first.
pub fn genesis(keys: &[SigningKey]) -> VerifiedFact {
    let mut members: Vec<DeviceId> = keys.iter().map(device_id).collect();
    members.sort();
    let admin = device_id(&keys[0]);
    let g = AuthorityGenesis {
        nonce: [42; 32],
        members,
        threshold: 1,
        group_key: GroupKey(admin.0),
        admin,
    };
    let ns = JournalNamespace::Authority(g.authority_id());
    UnsignedFact {
        namespace: ns,
        epoch: Epoch::ZERO,
        payload: Payload::Authority(AuthorityFact::Genesis(g)),
    }
    .sign(&keys[0])
}

/// An application fact. Epoch 0 holds the genesis alone (members write from epoch 1 on),
/// so a requested epoch 0 becomes 1.
pub fn note(key: &SigningKey, ns: JournalNamespace, epoch: u64, data: Vec<u8>) -> VerifiedFact {
    UnsignedFact {
        namespace: ns,
        epoch: Epoch(epoch.max(1)),
        payload: Payload::Application {
            kind: "note".into(),
            data,
        },
    }
    .sign(key)
}

/// An in-memory store: journal, reduced state, and an id index.
pub struct MemStore {
    pub journal: Journal,
    pub state: MaintenanceState,
    pub bytes: HashMap<FactId, (Epoch, Vec<u8>)>,
    /// Items advertised and bytes served without being in the journal (a malicious
    /// device's wares).
    pub bogus: BTreeMap<FactId, (Epoch, Vec<u8>)>,
}

impl MemStore {
    pub fn new(genesis: &VerifiedFact) -> Self {
        let ns = genesis.namespace();
        let mut s = Self {
            journal: Journal::new(ns),
            state: MaintenanceState::new(ns),
            bytes: HashMap::new(),
            bogus: BTreeMap::new(),
        };
        s.admit(genesis.clone()).expect("genesis admits");
        s
    }

    /// Inserts a fact this device authored (or was given out of band).
    pub fn add(&mut self, f: VerifiedFact) {
        self.admit(f).expect("own fact admits");
    }

    pub fn items(&self) -> SharedItems {
        let mut items: Vec<SyncItem> = self
            .journal
            .iter()
            .map(|f| SyncItem {
                epoch: f.epoch(),
                id: f.id(),
            })
            .collect();
        items.extend(
            self.bogus
                .iter()
                .map(|(id, (e, _))| SyncItem { epoch: *e, id: *id }),
        );
        Arc::new(MemItems::new(self.journal.namespace(), items))
    }

    pub fn digest(&self) -> Hash32 {
        self.journal.digest()
    }
}

impl FactHost for MemStore {
    fn load_fact(&self, _ns: JournalNamespace, id: &FactId) -> Option<Vec<u8>> {
        self.bytes
            .get(id)
            .or_else(|| self.bogus.get(id))
            .map(|(_, b)| b.clone())
    }

    fn admit(&mut self, fact: VerifiedFact) -> Result<bool, JournalError> {
        if self.journal.contains(fact.epoch(), &fact.id()) {
            return Ok(false);
        }
        self.state.check_admission(&fact)?;
        let simple = matches!(fact.payload(), Payload::Application { .. });
        self.bytes
            .insert(fact.id(), (fact.epoch(), fact.bytes().to_vec()));
        let epoch = fact.epoch();
        let new = self.journal.insert(fact)?;
        if simple {
            // Application facts only raise the highest epoch seen.
            self.state.observe_epoch(epoch);
        } else {
            self.state = reduce(self.journal.namespace(), self.journal.iter());
        }
        Ok(new)
    }

    fn is_authorized(&self, _ns: JournalNamespace, peer: &DeviceId) -> bool {
        self.state
            .membership()
            .is_some_and(|m| m.members.contains(peer))
    }
}

/// One simulated device.
pub struct Device {
    pub key: SigningKey,
    pub id: DeviceId,
    pub store: MemStore,
    pub manager: SessionManager,
    pub peers: PeerManager,
    /// The identity epoch this device runs sessions under (advanced by tests).
    pub identity_epoch: u64,
    pub fence: FenceStatus,
    pub online: bool,
}

impl Device {
    pub fn local_view(&self) -> LocalView {
        LocalView {
            device: self.id,
            namespace: self.store.journal.namespace(),
            protocol: ProtocolVersion::CURRENT,
            epoch: MaintenanceEpoch {
                identity_epoch: self.identity_epoch,
                snapshot_epoch: self.store.state.snapshot_epoch(),
            },
            fence: self.fence,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delivery {
    from: usize,
    to: usize,
    from_session: SessionId,
    /// `None` for the opening Hello.
    to_session: Option<SessionId>,
    bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Deliver(Delivery),
    Wake(usize),
}

/// A finished session, as the simulation saw it.
#[derive(Clone, Debug)]
pub struct Closed {
    pub at: Duration,
    pub device: usize,
    pub peer: usize,
    pub outcome: Outcome,
}

/// The simulated fleet and network.
pub struct Sim {
    pub devices: Vec<Device>,
    pub now: Duration,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    seq: u64,
    link_free: HashMap<(usize, usize), Duration>,
    routes: HashMap<(usize, SessionId), (usize, Option<SessionId>)>,
    by_id: HashMap<DeviceId, usize>,
    opened: HashSet<(usize, SessionId)>,
    /// Pairs that cannot reach each other.
    pub blocked: HashSet<(usize, usize)>,
    /// Probability that one message is lost.
    pub drop_prob: f64,
    pub max_latency_ms: u64,
    /// Retry aborted sessions at once (DESIGN rule 9).
    pub auto_retry: bool,
    pub closed: Vec<Closed>,
    pub messages: u64,
    pub bytes: u64,
}

impl Sim {
    /// `n` member devices of one authority, each holding just the genesis.
    pub fn new(n: usize, seed: u64, config: ManagerConfig) -> Self {
        let keys: Vec<SigningKey> = (0..n).map(|i| key(i as u8 + 1)).collect();
        let g = genesis(&keys);
        let ids: Vec<DeviceId> = keys.iter().map(device_id).collect();
        let devices: Vec<Device> = keys
            .into_iter()
            .map(|k| {
                let id = device_id(&k);
                let mut peers = PeerManager::new(PeerConfig {
                    max_sessions_per_peer: config.max_per_peer as u32,
                    ..PeerConfig::default()
                });
                for other in &ids {
                    if *other != id {
                        peers.add(*other, 0.8);
                    }
                }
                Device {
                    key: k,
                    id,
                    store: MemStore::new(&g),
                    manager: SessionManager::new(config.clone()),
                    peers,
                    identity_epoch: 0,
                    fence: FenceStatus::Satisfied,
                    online: true,
                }
            })
            .collect();
        let by_id = ids.iter().enumerate().map(|(i, d)| (*d, i)).collect();
        Self {
            devices,
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            seq: 0,
            link_free: HashMap::new(),
            routes: HashMap::new(),
            by_id,
            opened: HashSet::new(),
            blocked: HashSet::new(),
            drop_prob: 0.0,
            max_latency_ms: 20,
            auto_retry: true,
            closed: Vec::new(),
            messages: 0,
            bytes: 0,
        }
    }

    pub fn namespace(&self) -> JournalNamespace {
        self.devices[0].store.journal.namespace()
    }

    /// Adds `count` application facts authored by device `d` at epochs from `epoch`.
    pub fn author(&mut self, d: usize, count: usize, epoch: u64) {
        let ns = self.namespace();
        for i in 0..count {
            let data = format!("device {d} note {i} at {}", self.now.as_nanos()).into_bytes();
            let f = note(&self.devices[d].key, ns, epoch + (i as u64 % 5), data);
            self.devices[d].store.add(f);
        }
    }

    fn push(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, e)));
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.devices[a].online
            && self.devices[b].online
            && !self.blocked.contains(&(a, b))
            && !self.blocked.contains(&(b, a))
    }

    fn transmit(&mut self, from: usize, to: usize, d: Delivery) {
        self.messages += 1;
        self.bytes += d.bytes.len() as u64;
        if !self.reachable(from, to) || self.rng.gen_bool(self.drop_prob) {
            return;
        }
        // Random latency, but FIFO per directed link like one QUIC stream.
        let latency = Duration::from_millis(self.rng.gen_range(1..=self.max_latency_ms));
        let free = self.link_free.get(&(from, to)).copied().unwrap_or_default();
        let at = (self.now + latency).max(free + Duration::from_micros(1));
        self.link_free.insert((from, to), at);
        self.push(at, Event::Deliver(d));
    }

    fn apply(&mut self, d: usize, actions: Vec<ManagerAction>) {
        for a in actions {
            match a {
                ManagerAction::Send { session, bytes, .. } => {
                    let Some(&(peer, to_session)) = self.routes.get(&(d, session)) else {
                        continue;
                    };
                    self.transmit(
                        d,
                        peer,
                        Delivery {
                            from: d,
                            to: peer,
                            from_session: session,
                            to_session,
                            bytes,
                        },
                    );
                }
                ManagerAction::WakeAt(t) => self.push(t.max(self.now), Event::Wake(d)),
                ManagerAction::Closed {
                    session,
                    peer,
                    outcome,
                } => {
                    self.routes.remove(&(d, session));
                    let p = self.by_id[&peer];
                    self.devices[d].peers.session_ended(&peer, &outcome.result);
                    let retry = outcome.result.should_retry() && self.auto_retry;
                    // Only the side that opened a session retries it.
                    let initiator = self.opened.remove(&(d, session));
                    self.closed.push(Closed {
                        at: self.now,
                        device: d,
                        peer: p,
                        outcome,
                    });
                    if retry && initiator {
                        self.open(d, p);
                    }
                }
            }
        }
        self.check_epoch(d);
    }

    /// The store's reduced identity epoch moved past the session epoch: tell the manager.
    fn check_epoch(&mut self, d: usize) {
        let e = self.devices[d].store.state.identity_epoch();
        if e > self.devices[d].identity_epoch {
            self.advance_epoch(d, e);
        }
    }

    /// Advances device `d`'s identity epoch (an input event), aborting its sessions.
    pub fn advance_epoch(&mut self, d: usize, epoch: u64) {
        self.devices[d].identity_epoch = epoch;
        let ns = self.namespace();
        let now = self.now;
        let actions = self.devices[d]
            .manager
            .identity_epoch_advanced(now, ns, epoch);
        self.apply(d, actions);
    }

    /// Device `d` aborts its open sessions for which `reason_for` gives a reason (an
    /// input event, as a fence that became unsatisfied).
    pub fn abort_where(
        &mut self,
        d: usize,
        reason_for: impl FnMut(&tend_sync::Session) -> Option<tend_sync::AbortReason>,
    ) {
        let now = self.now;
        let actions = self.devices[d].manager.abort_where(now, reason_for);
        self.apply(d, actions);
    }

    /// Device `a` opens a session to `b` if both have room.
    pub fn open(&mut self, a: usize, b: usize) -> Option<SessionId> {
        self.open_in(a, b, None)
    }

    /// Device `a` opens a session to `b`, one of `group` if given (a round's sessions).
    pub fn open_in(&mut self, a: usize, b: usize, group: Option<u64>) -> Option<SessionId> {
        let peer = self.devices[b].id;
        if !self.devices[a].manager.has_room_for(&peer) || !self.devices[a].online {
            return None;
        }
        let local = self.devices[a].local_view();
        let items = self.devices[a].store.items();
        let now = self.now;
        let manager = &mut self.devices[a].manager;
        let opened = match group {
            Some(g) => manager.open_in_group(now, peer, local, items, g),
            None => manager.open(now, peer, local, items),
        };
        match opened {
            Ok((sid, actions)) => {
                self.devices[a].peers.session_started(&peer);
                self.routes.insert((a, sid), (b, None));
                self.opened.insert((a, sid));
                self.apply(a, actions);
                Some(sid)
            }
            Err(_) => None,
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let to = d.to;
        let now = self.now;
        match d.to_session {
            Some(sid) => {
                let dev = &mut self.devices[to];
                let actions = dev.manager.handle(now, sid, &d.bytes, &mut dev.store);
                // The first reply tells the initiator's route the responder's session id.
                self.apply(to, actions);
            }
            None => {
                let from_id = self.devices[d.from].id;
                let local = self.devices[to].local_view();
                let items = self.devices[to].store.items();
                let dev = &mut self.devices[to];
                match dev
                    .manager
                    .accept(now, from_id, &d.bytes, local, items, &mut dev.store)
                {
                    Ok((sid, actions)) => {
                        dev.peers.session_started(&from_id);
                        self.routes
                            .insert((to, sid), (d.from, Some(d.from_session)));
                        if let Some(r) = self.routes.get_mut(&(d.from, d.from_session)) {
                            r.1 = Some(sid);
                        }
                        self.apply(to, actions);
                    }
                    Err(
                        ManagerError::AtCapacity { refusal, .. }
                        | ManagerError::RateLimited { refusal, .. },
                    ) => {
                        // Answer on the initiator's stream, then forget it.
                        self.transmit(
                            to,
                            d.from,
                            Delivery {
                                from: to,
                                to: d.from,
                                from_session: SessionId(u64::MAX),
                                to_session: Some(d.from_session),
                                bytes: refusal,
                            },
                        );
                    }
                    Err(e) => panic!("accept failed: {e}"),
                }
            }
        }
    }

    /// Processes one event; false when there is none.
    pub fn step(&mut self) -> bool {
        let Some(Reverse((at, _, e))) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(at);
        match e {
            Event::Deliver(d) => self.deliver(d),
            Event::Wake(d) => {
                let now = self.now;
                let dev = &mut self.devices[d];
                let actions = dev.manager.poll(now, &mut dev.store);
                self.apply(d, actions);
            }
        }
        true
    }

    /// Runs until nothing is in flight and no session is open.
    pub fn run(&mut self) {
        let mut guard = 0u64;
        while self.step() {
            guard += 1;
            assert!(guard < 10_000_000, "simulation does not settle");
        }
        for d in &self.devices {
            assert_eq!(d.manager.active(), 0, "sessions left open on {:?}", d.id);
        }
    }

    /// One sync round: every online device opens sessions to its best `fanout` peers
    /// that it can reach, then the network runs until quiet.
    pub fn round(&mut self, fanout: usize) {
        for a in 0..self.devices.len() {
            if !self.devices[a].online {
                continue;
            }
            let picks = self.devices[a].peers.select(self.devices.len());
            let mut opened = 0;
            for p in picks {
                if opened == fanout {
                    break;
                }
                let b = self.by_id[&p];
                if self.reachable(a, b) && self.open(a, b).is_some() {
                    opened += 1;
                }
            }
        }
        self.run();
    }

    pub fn digests(&self) -> Vec<Hash32> {
        self.devices.iter().map(|d| d.store.digest()).collect()
    }

    pub fn converged(&self, which: &[usize]) -> bool {
        let first = self.devices[which[0]].store.digest();
        which
            .iter()
            .all(|&i| self.devices[i].store.digest() == first)
    }

    /// Rounds until `which` converge; returns how many it took.
    pub fn rounds_until_converged(&mut self, which: &[usize], max: usize, fanout: usize) -> usize {
        for r in 1..=max {
            self.round(fanout);
            if self.converged(which) {
                return r;
            }
        }
        panic!("no convergence in {max} rounds: {:?}", self.digests());
    }

    pub fn outcomes_of(&self, device: usize) -> Vec<&SessionResult> {
        self.closed
            .iter()
            .filter(|c| c.device == device)
            .map(|c| &c.outcome.result)
            .collect()
    }
}
