//! An in-process authority for tests, benchmarks and `devnet`: N devices, each with its
//! own `Journal`, device key, FROST share from a real DKG and [`SnapshotEngine`], passing
//! ceremony messages as bytes through one in-memory FIFO queue. Order is deterministic
//! and randomness comes from one seeded RNG, so a run is reproducible.

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_core::{CryptoRng, RngCore};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{
    AuthorityFact, AuthorityGenesis, ContentId, DeviceId, Epoch, FactId, GroupKey, Journal,
    JournalNamespace, MaintenanceState, MembershipChange, Payload, UnsignedFact, VerifiedFact,
};
use tend_crypto::{DeviceKey, DkgSession, KeyShare};

use crate::ceremony::{
    CeremonyAction, CeremonyEvent, CeremonyInput, JournalView, Recipient, SignerKey, SnapshotEngine,
};

/// Simulated one-way latency of a message, so deadlines are meaningful.
const HOP_MS: u64 = 1;

/// Why the in-process driver could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid authority shape: {0}")]
    InvalidShape(String),
    #[error("DKG failed: {0}")]
    Dkg(#[from] tend_crypto::DkgError),
    #[error("journal rejected a fact: {0}")]
    Journal(#[from] tend_core::JournalError),
    #[error("no device {0}")]
    NoDevice(usize),
    #[error("the ceremony did not complete: {0:?}")]
    NotCompleted(Vec<CeremonyEvent>),
}

struct Device {
    key: DeviceKey,
    journal: Journal,
    engine: SnapshotEngine,
    shares: BTreeMap<u64, KeyShare>,
    blobs: BTreeMap<ContentId, Vec<u8>>,
    online: bool,
    /// The reduced state of `journal`, dropped whenever the journal changes: reducing
    /// verifies every completion's signature, too slow to redo for every message.
    state: Option<MaintenanceState>,
}

struct Envelope {
    from: DeviceId,
    to: usize,
    bytes: Vec<u8>,
}

/// N devices of one authority in one process.
pub struct InProcessAuthority {
    namespace: JournalNamespace,
    threshold: u16,
    devices: Vec<Device>,
    index: BTreeMap<DeviceId, usize>,
    queue: VecDeque<Envelope>,
    rng: StdRng,
    now_ms: u64,
    /// Whether facts a device writes reach every online device at once.
    pub auto_sync: bool,
    events: Vec<(DeviceId, CeremonyEvent)>,
}

impl std::fmt::Debug for InProcessAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessAuthority")
            .field("namespace", &self.namespace)
            .field("devices", &self.devices.len())
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl InProcessAuthority {
    /// Creates `n` devices, runs a DKG for a `t`-of-`n` group key (or uses the device key
    /// when `n == t == 1`), and writes the genesis (authored by the admin, device 0 in
    /// id order) into every journal.
    pub fn create(
        n: usize,
        t: u16,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Self, DriverError> {
        if n == 0 || usize::from(t) > n || t == 0 || (t == 1 && n > 1) {
            return Err(DriverError::InvalidShape(format!(
                "{t}-of-{n}: need 1 <= t <= n, and t >= 2 when n > 1 (FROST)"
            )));
        }
        let mut rng =
            StdRng::from_rng(rng).map_err(|e| DriverError::InvalidShape(e.to_string()))?;
        let mut keys: Vec<DeviceKey> = (0..n).map(|_| DeviceKey::generate(&mut rng)).collect();
        keys.sort_by_key(|k| k.device_id());
        let members: Vec<DeviceId> = keys.iter().map(|k| k.device_id()).collect();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);

        let (group_key, shares) = deal(&members, t, nonce, 0, &keys, &mut rng)?;
        let genesis = AuthorityGenesis {
            nonce,
            members: members.clone(),
            threshold: t,
            group_key,
            admin: members[0],
        };
        let namespace = JournalNamespace::Authority(genesis.authority_id());
        let genesis_fact = UnsignedFact {
            namespace,
            epoch: Epoch::ZERO,
            payload: Payload::Authority(AuthorityFact::Genesis(genesis)),
        }
        .sign(keys[0].signing_key());

        let mut devices = Vec::new();
        for (key, share) in keys.into_iter().zip(shares) {
            let mut journal = Journal::new(namespace);
            journal.insert(genesis_fact.clone())?;
            let engine = SnapshotEngine::new(key.device_id());
            devices.push(Device {
                key,
                journal,
                engine,
                shares: BTreeMap::new(),
                blobs: BTreeMap::new(),
                online: true,
                state: None,
            });
            let d = devices.last_mut().expect("just pushed");
            d.install(share, 0);
        }
        let index = members.iter().enumerate().map(|(i, d)| (*d, i)).collect();
        let mut auth = Self {
            namespace,
            threshold: t,
            devices,
            index,
            queue: VecDeque::new(),
            rng,
            now_ms: 0,
            auto_sync: true,
            events: Vec::new(),
        };
        for i in 0..n {
            if let Some(key) = auth.devices[i].signer_key(0) {
                auth.feed(i, CeremonyInput::InstallKey(key));
            }
        }
        Ok(auth)
    }

    /// Re-deals the group key with a fresh DKG among the current members: the admin writes
    /// a `MembershipChange` (identity epoch + 1), every online device receives it and
    /// installs its new share. Open ceremonies under the old epoch abort and retry.
    pub fn run_dkg(&mut self) -> Result<GroupKey, DriverError> {
        let state = self.state(0);
        let identity_epoch = state.identity_epoch() + 1;
        let members: Vec<DeviceId> = self.device_ids();
        let admin = state.admin_at(state.current_epoch()).unwrap_or(members[0]);
        let admin_idx = self.index[&admin];
        let context = *self.namespace.to_bytes()[1..]
            .first_chunk::<32>()
            .expect("a namespace id is 32 bytes");
        let keys: Vec<DeviceKey> = self.devices.iter().map(|d| d.key.clone()).collect();
        let (group_key, shares) = deal(
            &members,
            self.threshold,
            context,
            identity_epoch,
            &keys,
            &mut self.rng,
        )?;
        let change = MembershipChange {
            identity_epoch,
            members: members.clone(),
            threshold: self.threshold,
            group_key,
        };
        let epoch = self.state(admin_idx).current_epoch();
        self.write_fact(
            admin_idx,
            UnsignedFact {
                namespace: self.namespace,
                epoch,
                payload: Payload::Authority(AuthorityFact::MembershipChanged(change)),
            },
        )?;
        for (i, share) in shares.into_iter().enumerate() {
            self.devices[i].install(share.clone(), identity_epoch);
            let key = self.devices[i].signer_key(identity_epoch);
            if let Some(key) = key {
                self.feed(i, CeremonyInput::InstallKey(key));
            }
        }
        Ok(group_key)
    }

    /// The authority's journal namespace.
    pub fn namespace(&self) -> JournalNamespace {
        self.namespace
    }

    /// Device ids, in device index order (sorted).
    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|d| d.key.device_id()).collect()
    }

    /// Device `i`'s journal.
    pub fn journal(&self, i: usize) -> &Journal {
        &self.devices[i].journal
    }

    /// Device `i`'s reduced maintenance state.
    pub fn state(&self, i: usize) -> MaintenanceState {
        let d = &self.devices[i];
        d.state
            .clone()
            .unwrap_or_else(|| tend_core::reduce(self.namespace, d.journal.iter()))
    }

    /// Device `i`'s key (to sign facts in tests).
    pub fn device_key(&self, i: usize) -> &DeviceKey {
        &self.devices[i].key
    }

    /// Device `i`'s FROST share for `identity_epoch`.
    pub fn key_share(&self, i: usize, identity_epoch: u64) -> Option<&KeyShare> {
        self.devices[i].shares.get(&identity_epoch)
    }

    /// A blob stored by any device.
    pub fn blob(&self, cid: &ContentId) -> Option<&[u8]> {
        self.devices
            .iter()
            .find_map(|d| d.blobs.get(cid))
            .map(Vec::as_slice)
    }

    /// The driver's clock.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Takes the collected events.
    pub fn take_events(&mut self) -> Vec<(DeviceId, CeremonyEvent)> {
        std::mem::take(&mut self.events)
    }

    /// Takes a device off the network (messages to and from it are dropped) or back on.
    pub fn set_online(&mut self, i: usize, online: bool) {
        self.devices[i].online = online;
    }

    /// Device `i` writes `count` application facts at its current epoch; with `sync`,
    /// every online device gets them too.
    pub fn append_application_facts(
        &mut self,
        i: usize,
        count: usize,
        sync: bool,
    ) -> Result<Vec<FactId>, DriverError> {
        let d = self.devices.get_mut(i).ok_or(DriverError::NoDevice(i))?;
        let epoch = tend_core::reduce(self.namespace, d.journal.iter()).current_epoch();
        let mut ids = Vec::new();
        let mut facts = Vec::new();
        for _ in 0..count {
            let mut data = [0u8; 16];
            self.rng.fill_bytes(&mut data);
            let f = UnsignedFact {
                namespace: self.namespace,
                epoch,
                payload: Payload::Application {
                    kind: "note".into(),
                    data: data.to_vec(),
                },
            }
            .sign(d.key.signing_key());
            ids.push(f.id());
            d.journal.insert(f.clone())?;
            d.state = None;
            facts.push(f);
        }
        if sync {
            for f in facts {
                self.broadcast_fact(i, &f)?;
            }
        }
        Ok(ids)
    }

    /// Inserts an already signed fact into device `i`'s journal only.
    pub fn insert_fact(&mut self, i: usize, fact: VerifiedFact) -> Result<bool, DriverError> {
        let d = self.devices.get_mut(i).ok_or(DriverError::NoDevice(i))?;
        d.state = None;
        Ok(d.journal.insert(fact)?)
    }

    /// Merges every online device's journal into every other's.
    pub fn sync_all(&mut self) -> Result<(), DriverError> {
        let mut union = Journal::new(self.namespace);
        for d in self.devices.iter().filter(|d| d.online) {
            union.merge(&d.journal)?;
        }
        for d in self.devices.iter_mut().filter(|d| d.online) {
            d.journal.merge(&union)?;
            d.state = None;
        }
        Ok(())
    }

    /// Device `proposer` starts a snapshot ceremony for `target_epoch`; returns at once.
    pub fn propose(&mut self, proposer: usize, target_epoch: Epoch, timeout_ms: u64) {
        self.feed(
            proposer,
            CeremonyInput::Propose {
                target_epoch,
                timeout_ms,
            },
        );
    }

    /// Delivers one queued message; returns false when the queue is empty.
    pub fn step(&mut self) -> bool {
        let Some(env) = self.queue.pop_front() else {
            return false;
        };
        self.now_ms += HOP_MS;
        let sender_online = self
            .index
            .get(&env.from)
            .is_some_and(|i| self.devices[*i].online);
        if self.devices[env.to].online && sender_online {
            self.feed(
                env.to,
                CeremonyInput::Message {
                    from: env.from,
                    bytes: env.bytes,
                },
            );
        }
        true
    }

    /// Delivers messages until none are left (bounded, in case of a protocol loop).
    pub fn run_until_quiet(&mut self) {
        for _ in 0..1_000_000 {
            if !self.step() {
                return;
            }
        }
    }

    /// Moves the clock forward and ticks every device (expiring deadlines).
    pub fn advance_time(&mut self, ms: u64) {
        self.now_ms += ms;
        for i in 0..self.devices.len() {
            self.feed(i, CeremonyInput::Tick);
        }
        self.run_until_quiet();
    }

    /// Runs a whole ceremony proposed by device 0 and returns the completion; the
    /// completion fact is in every online journal afterwards.
    pub fn run_snapshot(&mut self, target_epoch: Epoch) -> Result<SnapshotCompleted, DriverError> {
        self.run_snapshot_from(0, target_epoch)
    }

    /// Like [`InProcessAuthority::run_snapshot`], proposed by device `proposer`.
    pub fn run_snapshot_from(
        &mut self,
        proposer: usize,
        target_epoch: Epoch,
    ) -> Result<SnapshotCompleted, DriverError> {
        if proposer >= self.devices.len() {
            return Err(DriverError::NoDevice(proposer));
        }
        let start = self.events.len();
        self.propose(proposer, target_epoch, 60_000);
        self.run_until_quiet();
        let me = self.devices[proposer].key.device_id();
        let events: Vec<CeremonyEvent> = self.events[start..]
            .iter()
            .filter(|(d, _)| *d == me)
            .map(|(_, e)| e.clone())
            .collect();
        events
            .iter()
            .find_map(|e| match e {
                CeremonyEvent::Completed(c) => Some(c.clone()),
                _ => None,
            })
            .ok_or(DriverError::NotCompleted(events))
    }

    /// Feeds one input to device `i` and carries out its outputs.
    fn feed(&mut self, i: usize, input: CeremonyInput) {
        let now = std::time::Duration::from_millis(self.now_ms);
        let namespace = self.namespace;
        let d = &mut self.devices[i];
        let state = d
            .state
            .get_or_insert_with(|| tend_core::reduce(namespace, d.journal.iter()))
            .clone();
        let view = JournalView::with_state(&d.journal, state);
        let outputs = d.engine.handle(now, &view, input, &mut self.rng);
        let me = self.devices[i].key.device_id();
        for o in outputs {
            match o {
                CeremonyAction::Send { to, message } => {
                    let bytes = message.to_bytes();
                    let targets: Vec<usize> = match to {
                        Recipient::All => (0..self.devices.len()).filter(|j| *j != i).collect(),
                        Recipient::Device(d) => self.index.get(&d).copied().into_iter().collect(),
                    };
                    for to in targets {
                        self.queue.push_back(Envelope {
                            from: me,
                            to,
                            bytes: bytes.clone(),
                        });
                    }
                }
                CeremonyAction::WriteFact(f) => {
                    // Facts are signed by the device and always accepted locally.
                    let _ = self.write_fact(i, f);
                }
                CeremonyAction::StoreBlob { cid, bytes } => {
                    self.devices[i].blobs.insert(cid, bytes);
                }
                // The engines live as long as the driver: their votes need no keeping.
                CeremonyAction::SaveVotes(_) => {}
                CeremonyAction::Event(e) => self.events.push((me, e)),
            }
        }
    }

    fn write_fact(&mut self, i: usize, f: UnsignedFact) -> Result<VerifiedFact, DriverError> {
        let fact = f.sign(self.devices[i].key.signing_key());
        self.devices[i].journal.insert(fact.clone())?;
        self.devices[i].state = None;
        if self.auto_sync {
            self.broadcast_fact(i, &fact)?;
        }
        Ok(fact)
    }

    fn broadcast_fact(&mut self, from: usize, fact: &VerifiedFact) -> Result<(), DriverError> {
        for (j, d) in self.devices.iter_mut().enumerate() {
            if j != from && d.online {
                d.journal.insert(fact.clone())?;
                d.state = None;
            }
        }
        Ok(())
    }
}

impl Device {
    fn install(&mut self, share: Option<KeyShare>, identity_epoch: u64) {
        if let Some(s) = share {
            self.shares.insert(identity_epoch, s);
        }
    }

    fn signer_key(&self, identity_epoch: u64) -> Option<SignerKey> {
        match self.shares.get(&identity_epoch) {
            Some(s) => Some(SignerKey::Frost(s.clone())),
            None => Some(SignerKey::Single {
                identity_epoch,
                key: self.key.signing_key().clone(),
            }),
        }
    }
}

/// A group key and one share per member (`None` for a one-device authority, which signs
/// with its device key).
fn deal(
    members: &[DeviceId],
    t: u16,
    context: [u8; 32],
    identity_epoch: u64,
    keys: &[DeviceKey],
    rng: &mut StdRng,
) -> Result<(GroupKey, Vec<Option<KeyShare>>), DriverError> {
    if members.len() == 1 {
        return Ok((GroupKey(*members[0].as_bytes()), vec![None]));
    }
    let session = DkgSession {
        context,
        identity_epoch,
        members: members.to_vec(),
        threshold: t,
    };
    let shares = tend_crypto::run_in_memory(&session, rng)?;
    let group_key = shares[0].group_key();
    debug_assert_eq!(keys.len(), shares.len());
    Ok((group_key, shares.into_iter().map(Some).collect()))
}
