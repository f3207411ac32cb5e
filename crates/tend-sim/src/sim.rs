//! The seeded simulation: devices, the faulty network, the random workload, the heal
//! phase, and the bookkeeping the invariants need.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_bytes::ByteBuf;
use tend_core::app::{Delete, LogCursor, Put, Space, Trim, Value};
use tend_core::maintenance::{AdminReplacement, UpgradeActivated, UpgradeMetadata, UpgradePolicy};
use tend_core::{
    AuthorityFact, AuthorityGenesis, DataOp, DeviceId, Epoch, FactFormat, GroupKey, Hash32,
    JournalNamespace, MaintenanceEpoch, MaintenanceFact, MembershipChange, Payload,
    ProtocolVersion, UnsignedFact, VerifiedFact,
};
use tend_crypto::DkgSession;
use tend_replica::keygen;
use tend_snapshot::{
    CeremonyAction, CeremonyEvent, CeremonyInput, Recipient, SignerKey, SnapshotEngine,
};
use tend_sync::{
    AbortReason, FenceStatus, LocalView, ManagerAction, ManagerConfig, ManagerError, PeerConfig,
    PeerManager, PeerStatus, RateConfig, RefuseReason, Role, SessionConfig, SessionId,
    SessionManager, SessionResult, SyncMessage,
};

use crate::device::{Core, Key, Settled};
use tend_replica::upgrade::{
    artifact_cid, plan, BlobInput, Decision, PlanConfig, UpgradeAction, UpgradeInput,
    UpgradeSession, DEFAULT_MAX_ATTEMPTS,
};
use tend_replica::{Admission, EngineView};

/// The shape of one run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Devices in the fleet (all members at genesis).
    pub devices: usize,
    /// Random workload steps before the heal phase.
    pub steps: usize,
    /// Sync rounds the heal phase may take before convergence counts as failed.
    pub heal_rounds: usize,
    /// Whether a membership change's DKG makes every new member persist the change with
    /// its share (the fix for seed 173, 884 in the current random stream; off reproduces
    /// the split).
    pub dkg_persists_change: bool,
    /// Whether every DKG participant must be at the admin's `MaintenanceEpoch` (the fix
    /// for seed 447, 612 in the current random stream; off reproduces the fallback).
    pub dkg_binds_maintenance_epoch: bool,
    /// Whether devices drop facts a late-learned membership change makes inadmissible
    /// (the fix for seed 33; off reproduces the divergence).
    pub revalidate_on_membership_change: bool,
    /// Whether a signer's votes (one digest per target epoch) survive a crash (the fix
    /// for seed 1447; off keeps them in the engine's memory only).
    pub signers_lock_epoch: bool,
    /// Whether pruning keeps the application facts that are live in the prefix below the
    /// snapshot (the GC rule; off prunes every application fact below it, so live values
    /// are lost and the application-state invariant must fail).
    pub gc_keeps_live_facts: bool,
    /// Whether settling a snapshot drops the application facts below it that are live in
    /// the device's own prefix but not in the snapshot's (the fix for seed 111; off, a
    /// device that settled without some covered facts reads stale values forever).
    pub settle_drops_stale: bool,
    /// Whether a responder past an activated fence refuses, and aborts mid-session, an
    /// initiator whose announced version does not meet it, as the running node does (off,
    /// only a device's own fence binds and the peer-side fence check fails).
    pub responder_checks_peer_fence: bool,
    /// Whether a device that runs a published release without its `UpgradeReady` in the
    /// journal (lost in a crash after the install) writes it again (off, the readiness is
    /// lost for good and the end check fails).
    pub reannounce_ready: bool,
    /// Network faults during the workload (the heal phase is clean).
    pub net: NetFaults,
    /// How the workload partitions the devices.
    pub partitions: PartitionStyle,
    /// One device (the last) installs no upgrade before the heal phase, so an activated
    /// fence leaves it a release behind: it must be refused sessions with a reason and no
    /// session may cross the fence until it catches up.
    pub fence_laggard: bool,
    /// Every published upgrade carries an activation fence (else half do).
    pub always_fence: bool,
    /// Chance, per workload step, of an extra upgrade step (publish, install, activate).
    pub extra_upgrades: f64,
    /// Chance that a device crashes while installing an upgrade: half the time before the
    /// new release is on disk, half the time after it but before its `UpgradeReady` is.
    pub install_crash: f64,
    /// The admin publishes two packages at once (same or consecutive versions, each with
    /// its own fence).
    pub concurrent_publish: bool,
    /// Largest offset, in ms, of a device's local clock from the simulated time (each
    /// device gets a random offset in `0..=clock_skew_ms` and a drift of up to +-5%);
    /// 0 means every device reads the same clock.
    pub clock_skew_ms: u64,
    /// Devices pick the peers of their workload sessions with tend-sync's `PeerManager`
    /// (the node's scorer, fed every session's outcome, on the device's clock), refuse
    /// sessions from peers they banned, and run the rate limits a running device starts
    /// with (`RateConfig::device_default`) on the device's clock. (Off, peers are drawn at
    /// random and nothing is limited; every run still keeps the scores.)
    pub peer_scoring: bool,
    /// The last device is hostile: every step it opens a burst of sessions to every peer
    /// and sends garbage on every session once the Hello is through. The invariants then
    /// hold for the honest devices, and its score must fall on every device it reached.
    pub bad_peer: bool,
}

/// Network fault rates, per message, and the latency range.
#[derive(Clone, Copy, Debug)]
pub struct NetFaults {
    pub drop: f64,
    pub dup: f64,
    pub reorder: f64,
    pub min_latency_ms: u64,
    pub max_latency_ms: u64,
}

impl NetFaults {
    /// The default workload's faults: 5% loss, 3% duplication, 3% reordering, 1-40 ms.
    pub const DEFAULT: Self = Self {
        drop: 0.05,
        dup: 0.03,
        reorder: 0.03,
        min_latency_ms: 1,
        max_latency_ms: 40,
    };
}

/// How the workload partitions the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionStyle {
    /// Now and then a random split into two groups; now and then a heal.
    TwoGroups,
    /// Now and then a 2/2/1 split (five devices: three groups); now and then a heal.
    ThreeWay,
    /// Partitions that last about 100 ms: within each step the network flips between a
    /// heal, a fresh two-group split, and a cascade (one split heals as another starts).
    Flapping,
    /// The partition starts while sync sessions are in flight: every device opens
    /// sessions, a few ms later a split cuts the messages of the open sessions.
    MidSession,
}

impl SimConfig {
    /// A small run whose shape (3 to 5 devices) is drawn from the seed.
    pub fn small(seed: u64, steps: usize) -> Self {
        Self {
            seed,
            devices: 3 + (seed % 3) as usize,
            steps,
            heal_rounds: 12,
            dkg_persists_change: true,
            dkg_binds_maintenance_epoch: true,
            revalidate_on_membership_change: true,
            signers_lock_epoch: true,
            gc_keeps_live_facts: true,
            settle_drops_stale: true,
            responder_checks_peer_fence: true,
            reannounce_ready: true,
            net: NetFaults::DEFAULT,
            partitions: PartitionStyle::TwoGroups,
            fence_laggard: false,
            always_fence: false,
            extra_upgrades: 0.0,
            install_crash: 0.0,
            concurrent_publish: false,
            clock_skew_ms: 0,
            peer_scoring: false,
            bad_peer: false,
        }
    }
}

/// Counters of one run, to show that the workload actually happened.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Application facts written: log appends and data writes.
    pub app_facts: u64,
    /// Of those, data operations: puts, deletes and log trims.
    pub data_writes: u64,
    /// Of those, log trims.
    pub trims: u64,
    /// Keys of the final (reference) application state that read with a conflict
    /// (concurrent puts no later write superseded).
    pub conflicts: u64,
    pub sessions_completed: u64,
    pub sessions_failed: u64,
    pub snapshots_completed: u64,
    pub settles: u64,
    pub pruned: u64,
    /// Covered application facts dropped at settle as stale (see `Settled::stale`).
    pub stale: u64,
    pub quarantined: u64,
    pub reissued: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub membership_changes: u64,
    pub upgrades_published: u64,
    pub upgrades_activated: u64,
    pub admin_replacements: u64,
    pub rogue_ops: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub heal_rounds: u64,
    /// Open sessions whose two ends a partition separated (messages in flight cut).
    pub sessions_cut: u64,
    /// Sessions refused because one side did not satisfy an activated fence.
    pub fence_refusals: u64,
    /// Crashes in the middle of installing an upgrade.
    pub install_crashes: u64,
    /// Sessions the fence-one-behind laggard saw refused or aborted for a fence.
    pub laggard_fence_refusals: u64,
    /// Devices that, at the end, run a published package's release while the journal
    /// holds no `UpgradeReady` of theirs for it (a crash lost it after the install).
    pub silent_installs: u64,
    /// `UpgradeReady` facts written again for a release already running.
    pub ready_reannounced: u64,
    /// Sessions the hostile device tried to open (`bad_peer`).
    pub flood_attempts: u64,
    /// Incoming sessions an honest device's rate limits refused.
    pub rate_limited: u64,
    /// Sessions ended as misbehaviour by the peer (garbage, protocol violations).
    pub misbehaviours: u64,
    /// Incoming sessions refused because the device had banned the peer.
    pub banned_refusals: u64,
    /// Workload sessions whose peer the scorer picked.
    pub scored_picks: u64,
    /// Honest devices whose scorer ended the run with the hostile device banned.
    pub bad_peer_banned_on: u64,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub stats: Stats,
    /// Invariant violations; empty means the run passed.
    pub violations: Vec<String>,
    /// A hash over every device's final journal and state: equal for equal runs.
    pub fingerprint: Hash32,
}

/// A simulated device: the journal side plus the two protocol engines.
pub struct Device {
    pub core: Core,
    pub manager: SessionManager,
    pub engine: Option<SnapshotEngine>,
    pub online: bool,
    /// Incarnation: bumped by every crash, so messages to a dead process are dropped.
    pub inc: u64,
    /// The identity epoch the device's sessions run under.
    pub session_epoch: u64,
    /// Peer scores and statuses, fed every session's outcome. Kept across crashes, as the
    /// node keeps its peer table in the store.
    pub peers: PeerManager,
}

#[derive(Clone, Debug)]
enum Msg {
    Sync {
        from_sid: SessionId,
        to_sid: Option<SessionId>,
    },
    Ceremony,
}

#[derive(Clone, Debug)]
struct Delivery {
    from: usize,
    from_inc: u64,
    to: usize,
    /// `None` for a new stream (Hello), which any incarnation may take.
    to_inc: Option<u64>,
    msg: Msg,
    bytes: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Event {
    Deliver(Delivery),
    Wake { d: usize, inc: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Route {
    peer: usize,
    peer_inc: u64,
    peer_sid: Option<SessionId>,
}

/// Every fact that was ever durable on some device, and where.
#[derive(Default)]
pub struct Oracle {
    pub facts: BTreeMap<Key, (VerifiedFact, BTreeSet<usize>)>,
}

const CLEAN: NetFaults = NetFaults {
    drop: 0.0,
    dup: 0.0,
    reorder: 0.0,
    min_latency_ms: 1,
    max_latency_ms: 5,
};

/// One seeded simulation.
pub struct Sim {
    pub cfg: SimConfig,
    pub devices: Vec<Device>,
    pub namespace: JournalNamespace,
    pub oracle: Oracle,
    pub stats: Stats,
    pub violations: Vec<String>,
    /// `(old, new, activation)` of every replacement written.
    pub replacements: Vec<(DeviceId, DeviceId, Epoch)>,
    /// Failed or refused sessions by (shortened) result.
    pub failures: BTreeMap<String, u64>,
    rng: StdRng,
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), Event>,
    link_free: BTreeMap<(usize, usize), Duration>,
    routes: BTreeMap<(usize, u64, SessionId), Route>,
    /// Group a device is in; devices in different groups cannot talk.
    partition: Vec<u8>,
    faults: NetFaults,
    ids: Vec<DeviceId>,
    /// Whether the heal phase runs (no fault is injected then).
    healing: bool,
    /// Per device, with clock skew: (offset, rate) of its local clock.
    clocks: Vec<(Duration, f64)>,
}

fn manager_config() -> ManagerConfig {
    ManagerConfig {
        max_concurrent: 8,
        max_per_peer: 2,
        session: SessionConfig {
            idle_timeout: Duration::from_secs(2),
            ..SessionConfig::default()
        },
        ..ManagerConfig::default()
    }
}

/// Sessions the hostile device tries to open to each peer per workload step.
const FLOOD_BURST: usize = 20;

/// The session manager of device `d` in a run of `cfg`: the hostile device ignores every
/// limit; with peer scoring the others run a device's default rate limits.
fn manager_config_for(cfg: &SimConfig, d: usize) -> ManagerConfig {
    let base = manager_config();
    if cfg.bad_peer && d + 1 == cfg.devices {
        ManagerConfig {
            max_concurrent: 256,
            max_per_peer: 64,
            rate: RateConfig::UNLIMITED,
            ..base
        }
    } else if cfg.peer_scoring {
        ManagerConfig {
            rate: RateConfig::device_default(),
            ..base
        }
    } else {
        base
    }
}

fn peer_config() -> PeerConfig {
    PeerConfig {
        max_sessions_per_peer: 2,
        ..PeerConfig::default()
    }
}

/// A peer's trust by its role, as `tend_node::peer_table::role_trust` gives it.
fn role_trust(state: &tend_core::MaintenanceState, peer: &DeviceId) -> f64 {
    if state.is_admin_at(peer, state.current_epoch()) {
        1.0
    } else if state.membership().is_some_and(|m| m.members.contains(peer)) {
        0.8
    } else {
        0.5
    }
}

fn threshold_for(members: usize) -> u16 {
    // FROST needs t >= 2 with more than one member; a majority otherwise.
    match members {
        0 | 1 => 1,
        m => (m / 2 + 1).max(2) as u16,
    }
}

impl Sim {
    /// A fleet of `cfg.devices` members with a genesis and a real DKG.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut keys: Vec<SigningKey> = (0..cfg.devices)
            .map(|_| SigningKey::generate(&mut rng))
            .collect();
        keys.sort_by_key(|k| k.verifying_key().to_bytes());
        let ids: Vec<DeviceId> = keys
            .iter()
            .map(|k| DeviceId(k.verifying_key().to_bytes()))
            .collect();
        let mut nonce = [0u8; 32];
        rng.fill(&mut nonce);
        let t = threshold_for(ids.len());
        let (group_key, signer_keys) = deal(&ids, t, nonce, 0, &keys, &mut rng);
        let genesis = AuthorityGenesis {
            nonce,
            members: ids.clone(),
            threshold: t,
            group_key,
            admin: ids[0],
        };
        let namespace = JournalNamespace::Authority(genesis.authority_id());
        let genesis = UnsignedFact {
            namespace,
            epoch: Epoch::ZERO,
            payload: Payload::Authority(AuthorityFact::Genesis(genesis)),
        }
        .sign(&keys[0]);
        let devices = keys
            .into_iter()
            .zip(signer_keys)
            .enumerate()
            .map(|(i, (k, sk))| {
                let archive = rng.gen_bool(0.3);
                let mut core = Core::new(k, &genesis, archive);
                core.revalidate_on_change = cfg.revalidate_on_membership_change;
                core.gc_keeps_live = cfg.gc_keeps_live_facts;
                core.drop_stale = cfg.settle_drops_stale;
                core.durable.keys.insert(0, sk);
                let mut peers = PeerManager::new(peer_config());
                for (j, id) in ids.iter().enumerate() {
                    if j != i {
                        peers.add(*id, if j == 0 { 1.0 } else { 0.8 });
                    }
                }
                let mut d = Device {
                    core,
                    manager: SessionManager::new(manager_config_for(&cfg, i)),
                    engine: None,
                    online: true,
                    inc: 0,
                    session_epoch: 0,
                    peers,
                };
                d.start_engine();
                d
            })
            .collect();
        let n = cfg.devices;
        let mut sim = Self {
            cfg,
            devices,
            namespace,
            oracle: Oracle::default(),
            stats: Stats::default(),
            violations: Vec::new(),
            replacements: Vec::new(),
            failures: BTreeMap::new(),
            rng,
            now: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            link_free: BTreeMap::new(),
            routes: BTreeMap::new(),
            partition: vec![0; n],
            faults: CLEAN,
            ids,
            healing: false,
            clocks: Vec::new(),
        };
        if sim.cfg.clock_skew_ms > 0 {
            // A stream of its own, so the rest of the run draws as without skew.
            let mut r = StdRng::seed_from_u64(sim.cfg.seed ^ 0x5eed_c10c);
            let max = sim.cfg.clock_skew_ms;
            sim.clocks = (0..n)
                .map(|_| {
                    let offset = Duration::from_millis(r.gen_range(0..=max));
                    (offset, r.gen_range(0.95..=1.05))
                })
                .collect();
        }
        for d in 0..n {
            sim.collect_durable(d);
        }
        sim
    }

    /// Runs the workload, heals, and checks the invariants.
    pub fn run(mut self) -> Report {
        self.execute();
        let mut h = blake3::Hasher::new();
        for d in &self.devices {
            h.update(&d.core.tail_digest(Epoch::ZERO).0);
            h.update(&d.core.state.state_digest().0);
        }
        Report {
            seed: self.cfg.seed,
            stats: self.stats,
            violations: self.violations,
            fingerprint: Hash32(*h.finalize().as_bytes()),
        }
    }

    /// Like [`Sim::run`], keeping the simulation for inspection.
    pub fn execute(&mut self) {
        self.faults = self.cfg.net;
        for _ in 0..self.cfg.steps {
            self.random_step();
        }
        self.heal();
        for (d, dev) in self.devices.iter().enumerate() {
            let st = &dev.core.state;
            if silent_install(&dev.core) && st.is_member_at(&dev.core.me, st.current_epoch()) {
                self.stats.silent_installs += 1;
                self.violations.push(format!(
                    "device {d} runs release {} of a published package, but no UpgradeReady of it is in the journal after the heal",
                    dev.core.durable.version
                ));
            }
        }
        crate::invariants::check(self);
        self.check_bad_peer();
    }

    /// With a hostile device: on every honest device it misbehaved against, its trust and
    /// score fell below those of a fresh peer of its role, and it is banned once it
    /// misbehaved as often as the ban takes.
    fn check_bad_peer(&mut self) {
        let Some(bad) = self.bad_peer() else { return };
        let bad_id = self.ids[bad];
        let config = peer_config();
        for h in 0..bad {
            let Some(p) = self.devices[h].peers.get(&bad_id) else {
                continue;
            };
            if p.status == PeerStatus::Banned {
                self.stats.bad_peer_banned_on += 1;
            }
            if p.misbehaviours == 0 {
                continue;
            }
            let fresh = tend_sync::PeerMetadata::new(bad_id, p.role_trust);
            let max = config.max_sessions_per_peer;
            if p.trust_level >= fresh.trust_level || p.score(max) >= fresh.score(max) {
                self.violations.push(format!(
                    "device {h} saw the hostile device misbehave {} times, yet trusts it {} (score {}) as a fresh peer {} ({})",
                    p.misbehaviours,
                    p.trust_level,
                    p.score(max),
                    fresh.trust_level,
                    fresh.score(max)
                ));
            }
            if p.misbehaviours >= config.ban_after_misbehaviours && p.status != PeerStatus::Banned {
                self.violations.push(format!(
                    "device {h} saw the hostile device misbehave {} times and did not ban it",
                    p.misbehaviours
                ));
            }
        }
    }

    /// Device `d`'s local clock: the simulated time, or with clock skew, an offset plus
    /// the simulated time run at the device's rate.
    fn clock(&self, d: usize) -> Duration {
        match self.clocks.get(d) {
            Some(&(offset, rate)) => offset + self.now.mul_f64(rate),
            None => self.now,
        }
    }

    /// The simulated time at which device `d`'s local clock reads `t`.
    fn global_time(&self, d: usize, t: Duration) -> Duration {
        match self.clocks.get(d) {
            Some(&(offset, rate)) => t.saturating_sub(offset).div_f64(rate),
            None => t,
        }
    }

    fn push(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), e);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.devices[a].online && self.devices[b].online && self.partition[a] == self.partition[b]
    }

    /// Takes `d`'s newly durable facts into the oracle.
    fn collect_durable(&mut self, d: usize) {
        for f in std::mem::take(&mut self.devices[d].core.newly_durable) {
            self.oracle
                .facts
                .entry(f.order_key())
                .or_insert_with(|| (f, BTreeSet::new()))
                .1
                .insert(d);
        }
    }

    fn transmit(&mut self, d: Delivery) {
        self.stats.messages += 1;
        if !self.reachable(d.from, d.to) || self.rng.gen_bool(self.faults.drop) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.faults.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let latency = Duration::from_millis(
                self.rng
                    .gen_range(self.faults.min_latency_ms..=self.faults.max_latency_ms),
            );
            let mut at = self.now + latency;
            // Sync streams are ordered (one QUIC stream) unless a reorder fault strikes.
            if matches!(d.msg, Msg::Sync { .. }) && !self.rng.gen_bool(self.faults.reorder) {
                let free = self
                    .link_free
                    .get(&(d.from, d.to))
                    .copied()
                    .unwrap_or_default();
                at = at.max(free + Duration::from_micros(1));
                self.link_free.insert((d.from, d.to), at);
            }
            self.push(at, Event::Deliver(d.clone()));
        }
    }

    fn local_view(&self, d: usize) -> LocalView {
        let dev = &self.devices[d];
        LocalView {
            device: dev.core.me,
            namespace: self.namespace,
            protocol: dev.core.durable.version,
            epoch: MaintenanceEpoch {
                identity_epoch: dev.session_epoch,
                snapshot_epoch: dev.core.state.snapshot_epoch(),
            },
            fence: dev.core.fence(),
        }
    }

    fn apply(&mut self, d: usize, actions: Vec<ManagerAction>) {
        let inc = self.devices[d].inc;
        for a in actions {
            match a {
                ManagerAction::Send { session, bytes, .. } => {
                    let Some(r) = self.routes.get(&(d, inc, session)).copied() else {
                        continue;
                    };
                    // A message after the Hello whose answer has not come back would go out
                    // as a new stream here, where the responder reads it as a broken Hello
                    // and blames the sender; on the node it follows the Hello on the same
                    // stream. With peer scoring, where blame bans, it is not sent (the
                    // responder's session then ends by its idle timeout). Without, the
                    // random stream of the older scenarios stays as it was.
                    if self.cfg.peer_scoring && r.peer_sid.is_none() {
                        continue;
                    }
                    // The hostile device answers and follows up with garbage.
                    let bytes = if self.bad_peer() == Some(d) {
                        vec![0xff; 24]
                    } else {
                        bytes
                    };
                    self.transmit(Delivery {
                        from: d,
                        from_inc: inc,
                        to: r.peer,
                        to_inc: Some(r.peer_inc),
                        msg: Msg::Sync {
                            from_sid: session,
                            to_sid: r.peer_sid,
                        },
                        bytes,
                    });
                }
                ManagerAction::WakeAt(t) => {
                    let at = self.global_time(d, t).max(self.now);
                    self.push(at, Event::Wake { d, inc })
                }
                ManagerAction::Closed {
                    session,
                    outcome,
                    peer,
                } => {
                    let route = self.routes.remove(&(d, inc, session));
                    let (now, wall_ms) = (self.clock(d), self.now.as_millis() as u64);
                    if matches!(&outcome.result, SessionResult::Failed(r) if r.is_misbehaviour()) {
                        self.stats.misbehaviours += 1;
                    }
                    self.devices[d].peers.session_ended_at(
                        &peer,
                        &outcome.result,
                        now,
                        Some(wall_ms),
                    );
                    match outcome.result {
                        SessionResult::Completed => {
                            self.stats.sessions_completed += 1;
                            if let Some(r) = route {
                                self.fetch_blobs(d, r.peer);
                            }
                        }
                        other => {
                            self.stats.sessions_failed += 1;
                            let fenced = matches!(
                                other,
                                SessionResult::Refused {
                                    reason: RefuseReason::FenceNotSatisfied { .. }
                                        | RefuseReason::PeerFenceNotSatisfied { .. },
                                    ..
                                } | SessionResult::Aborted {
                                    reason: AbortReason::FenceNotSatisfied { .. }
                                        | AbortReason::PeerFenceNotSatisfied { .. },
                                    ..
                                }
                            );
                            if fenced {
                                self.stats.fence_refusals += 1;
                                if self.cfg.fence_laggard && d + 1 == self.devices.len() {
                                    self.stats.laggard_fence_refusals += 1;
                                }
                            }
                            let key = format!("{other:?}");
                            let key = key.chars().take(60).collect::<String>();
                            *self.failures.entry(key).or_default() += 1;
                        }
                    }
                }
            }
        }
    }

    /// Blob transfer rides on a completed session: `d` takes the blob of the peer's latest
    /// snapshot if it lacks it (content-addressed, so no trust is needed).
    fn fetch_blobs(&mut self, d: usize, peer: usize) {
        if !self.reachable(d, peer) {
            return;
        }
        let mut want: Vec<_> = [&self.devices[d], &self.devices[peer]]
            .iter()
            .filter_map(|x| x.core.state.latest_snapshot.as_ref())
            .map(|s| s.snapshot.blob_cid)
            .collect();
        // With each snapshot blob of version 3, the item blob it names (the node fetches
        // it only when settling needs it; here the model's coverage bookkeeping does).
        let items: Vec<_> = want
            .iter()
            .filter_map(|cid| self.devices[peer].core.durable.blobs.get(cid))
            .filter_map(|b| tend_snapshot::blob::read_item_ref(&b[..]).ok().flatten())
            .map(|r| r.cid)
            .collect();
        want.extend(items);
        for cid in want {
            if self.devices[d].core.durable.blobs.contains_key(&cid) {
                continue;
            }
            if let Some(b) = self.devices[peer].core.durable.blobs.get(&cid).cloned() {
                self.devices[d].core.durable.blobs.insert(cid, b);
            }
        }
    }

    /// What a device does after any input: abort sessions of an old identity epoch (rule
    /// 9), close sessions when its fence is not satisfied (rule 7), re-issue late facts
    /// and settle a new snapshot (rules 4 and 5).
    fn after(&mut self, d: usize) {
        if !self.devices[d].online {
            return;
        }
        let now = self.clock(d);
        let ie = self.devices[d].core.state.identity_epoch();
        if ie > self.devices[d].session_epoch {
            self.devices[d].session_epoch = ie;
            let actions = self.devices[d]
                .manager
                .identity_epoch_advanced(now, self.namespace, ie);
            self.apply(d, actions);
        }
        let blocked = matches!(
            self.devices[d].core.fence(),
            FenceStatus::NotSatisfied { .. }
        );
        self.devices[d].core.fence_blocked = blocked;
        // The sessions a fence ends, by the rule the running node applies.
        if self.devices[d].manager.active() > 0 {
            let dev = &mut self.devices[d];
            let (state, running) = (dev.core.state.clone(), dev.core.durable.version);
            let peer_side = self.cfg.responder_checks_peer_fence;
            let actions = dev.manager.abort_where(now, |s| {
                match tend_replica::fence_abort(&state, Some(running), s)? {
                    AbortReason::PeerFenceNotSatisfied { .. } if !peer_side => None,
                    reason => Some(reason),
                }
            });
            self.apply(d, actions);
        }
        match self.devices[d].core.settle() {
            Ok(Some(s)) => self.on_settled(d, s),
            Ok(None) => {}
            Err(why) => {
                let msg = format!("device {d}: {why}");
                if !self.violations.contains(&msg) {
                    self.violations.push(msg);
                }
            }
        }
        self.collect_durable(d);
    }

    /// Checks that a prune relied on a verified completion (rule 4).
    fn on_settled(&mut self, d: usize, s: Settled) {
        self.stats.settles += 1;
        self.stats.pruned += s.pruned.len() as u64;
        self.stats.stale += s.stale.len() as u64;
        self.stats.quarantined += s.quarantined.len() as u64;
        self.stats.reissued += s.reissued.len() as u64;
        let core = &self.devices[d].core;
        if let Some(bad) = s.pruned.iter().find(|k| k.0 >= s.epoch) {
            self.violations.push(format!(
                "device {d} pruned fact at epoch {} at or above the snapshot epoch {}",
                bad.0, s.epoch
            ));
        }
        if let Some(bad) = s.stale.iter().find(|k| k.0 >= s.epoch) {
            self.violations.push(format!(
                "device {d} dropped a stale fact at epoch {} at or above the snapshot epoch {}",
                bad.0, s.epoch
            ));
        }
        if s.changed_app_state {
            self.violations.push(format!(
                "device {d}'s pruning below snapshot {} changed the application state it reads",
                s.epoch
            ));
        }
        if s.pruned.is_empty() && s.quarantined.is_empty() && s.stale.is_empty() {
            return;
        }
        let completion = s
            .completion
            .and_then(|id| core.all().find(|(k, _)| k.1 == id).map(|(_, f)| f.clone()));
        let verified = completion.as_ref().is_some_and(|f| match f.payload() {
            Payload::Maintenance(MaintenanceFact::SnapshotCompleted(c)) => {
                let msg = c.snapshot.signing_message(&self.namespace, &c.proposal_id);
                c.snapshot.epoch == s.epoch
                    && core
                        .state
                        .membership_at(f.epoch())
                        .is_some_and(|m| m.group_key.verify(&msg, &c.threshold_signature))
            }
            _ => false,
        });
        if !verified {
            self.violations.push(format!(
                "device {d} pruned below epoch {} without a verified SnapshotCompleted in its journal",
                s.epoch
            ));
        }
    }

    /// Feeds one ceremony input to device `d` and carries out the outputs.
    fn feed(&mut self, d: usize, input: CeremonyInput) {
        if !self.devices[d].online {
            return;
        }
        let now = self.clock(d);
        let dev = &mut self.devices[d];
        let Some(engine) = dev.engine.as_mut() else {
            return;
        };
        let view = EngineView::new(&dev.core).unwrap_or_else(|e| match e {});
        let outputs = engine.handle(now, &view, input, &mut self.rng);
        let inc = dev.inc;
        for o in outputs {
            match o {
                CeremonyAction::Send { to, message } => {
                    let bytes = message.to_bytes();
                    let targets: Vec<usize> = match to {
                        Recipient::All => {
                            let members = self.devices[d]
                                .core
                                .state
                                .membership()
                                .map(|m| m.members.clone())
                                .unwrap_or_default();
                            (0..self.devices.len())
                                .filter(|j| *j != d && members.contains(&self.ids[*j]))
                                .collect()
                        }
                        Recipient::Device(id) => {
                            self.ids.iter().position(|x| *x == id).into_iter().collect()
                        }
                    };
                    for to in targets {
                        self.transmit(Delivery {
                            from: d,
                            from_inc: inc,
                            to,
                            to_inc: None,
                            msg: Msg::Ceremony,
                            bytes: bytes.clone(),
                        });
                    }
                }
                CeremonyAction::WriteFact(f) => {
                    self.devices[d].core.write_unsigned(f);
                }
                CeremonyAction::StoreBlob { cid, bytes } => {
                    self.devices[d].core.durable.blobs.insert(cid, bytes);
                }
                // A signer's votes (one digest per target epoch, the engine's fix for seed
                // 1447, where a member signed two snapshots at one epoch and devices that
                // pruned for the one the reducer did not pick lost facts) are durable
                // before anything it answers leaves, so a restart cannot make it vote
                // twice either.
                CeremonyAction::SaveVotes(votes) => {
                    if self.cfg.signers_lock_epoch {
                        self.devices[d].core.durable.signed = votes;
                    }
                }
                CeremonyAction::Event(CeremonyEvent::Completed(_)) => {
                    self.stats.snapshots_completed += 1;
                }
                // As the node does: a session with the coordinator, now.
                CeremonyAction::Event(CeremonyEvent::CompletionAnnounced {
                    coordinator, ..
                }) => {
                    if let Some(c) = self.ids.iter().position(|x| *x == coordinator) {
                        self.open(d, c);
                    }
                }
                CeremonyAction::Event(_) => {}
            }
        }
        self.after(d);
    }

    fn deliver(&mut self, m: Delivery) {
        let to = m.to;
        if !self.reachable(m.from, to) || m.to_inc.is_some_and(|i| i != self.devices[to].inc) {
            self.stats.dropped += 1;
            return;
        }
        let now = self.clock(to);
        match m.msg {
            Msg::Ceremony => {
                let from = self.ids[m.from];
                self.feed(
                    to,
                    CeremonyInput::Message {
                        from,
                        bytes: m.bytes,
                    },
                );
            }
            Msg::Sync {
                from_sid,
                to_sid: Some(sid),
            } => {
                let inc = self.devices[to].inc;
                if !self.routes.contains_key(&(to, inc, sid)) {
                    return;
                }
                // The other side of the fence: a device past an activated fence must not
                // take facts from a peer whose release does not meet it.
                // (ARCHITECTURE section 12: a fence binds the responder; an initiator
                // does not judge its responder's version, so an old device can be
                // reached and learn of the activation.)
                let peer_version = self.devices[m.from].core.durable.version;
                let st = &self.devices[to].core.state;
                let responder = self.devices[to]
                    .manager
                    .session(sid)
                    .is_some_and(|s| s.role() == Role::Responder);
                let peer_fenced = responder
                    && st
                        .fence_check_peer(st.current_epoch(), peer_version)
                        .is_err();
                let dev = &mut self.devices[to];
                let before = dev.core.held();
                let mut host = Admission::new(&mut dev.core);
                let actions = dev.manager.handle(now, sid, &m.bytes, &mut host);
                let (facts, adopted) = host.finish();
                dev.core.take_admitted(facts, adopted);
                let admitted = dev.core.held().saturating_sub(before);
                if peer_fenced && admitted > 0 {
                    self.violations.push(format!(
                        "device {to} admitted {admitted} facts through a session from device {} running {peer_version}, below an activation fence it is past",
                        m.from
                    ));
                }
                let _ = from_sid;
                self.apply(to, actions);
                self.after(to);
            }
            Msg::Sync {
                from_sid,
                to_sid: None,
            } => {
                let from_id = self.ids[m.from];
                // A responder past a fence refuses an initiator whose announced version
                // does not meet it (checked before the manager, as the node does).
                let st = &self.devices[to].core.state;
                let refusal = match SyncMessage::decode(&m.bytes, usize::MAX) {
                    Ok(SyncMessage::Hello(h)) if self.cfg.responder_checks_peer_fence => {
                        st.fence_check_peer(st.current_epoch(), h.protocol).err()
                    }
                    _ => None,
                };
                if let Some(r) = refusal {
                    self.stats.fence_refusals += 1;
                    let reason = RefuseReason::PeerFenceNotSatisfied {
                        fence: r.fence,
                        required: r.required,
                        local_epoch: r.local_epoch,
                    };
                    let inc = self.devices[to].inc;
                    self.transmit(Delivery {
                        from: to,
                        from_inc: inc,
                        to: m.from,
                        to_inc: Some(m.from_inc),
                        msg: Msg::Sync {
                            from_sid: SessionId(u64::MAX),
                            to_sid: Some(from_sid),
                        },
                        bytes: SyncMessage::Refuse(reason).encode(),
                    });
                    return;
                }
                // A banned peer gets no session (the node closes its connection).
                if self.cfg.peer_scoring
                    && self.devices[to].peers.get(&from_id).map(|p| p.status)
                        == Some(PeerStatus::Banned)
                {
                    self.stats.banned_refusals += 1;
                    return;
                }
                let local = self.local_view(to);
                let dev = &mut self.devices[to];
                let items = dev.core.session_items();
                let inc = dev.inc;
                let mut host = Admission::new(&mut dev.core);
                let accepted = dev
                    .manager
                    .accept(now, from_id, &m.bytes, local, items, &mut host);
                let (facts, adopted) = host.finish();
                dev.core.take_admitted(facts, adopted);
                match accepted {
                    Ok((sid, actions)) => {
                        let trust = role_trust(&self.devices[to].core.state, &from_id);
                        let peers = &mut self.devices[to].peers;
                        peers.add(from_id, trust);
                        peers.session_started(&from_id);
                        self.routes.insert(
                            (to, inc, sid),
                            Route {
                                peer: m.from,
                                peer_inc: m.from_inc,
                                peer_sid: Some(from_sid),
                            },
                        );
                        if let Some(r) = self.routes.get_mut(&(m.from, m.from_inc, from_sid)) {
                            r.peer_sid = Some(sid);
                            r.peer_inc = inc;
                        }
                        self.apply(to, actions);
                        self.after(to);
                    }
                    Err(
                        ManagerError::AtCapacity { refusal, .. }
                        | ManagerError::RateLimited { refusal, .. },
                    ) => {
                        if refusal == SyncMessage::Refuse(RefuseReason::Busy).encode() {
                            // At capacity: not a rate limit.
                        } else {
                            self.stats.rate_limited += 1;
                        }
                        self.transmit(Delivery {
                            from: to,
                            from_inc: inc,
                            to: m.from,
                            to_inc: Some(m.from_inc),
                            msg: Msg::Sync {
                                from_sid: SessionId(u64::MAX),
                                to_sid: Some(from_sid),
                            },
                            bytes: refusal,
                        });
                    }
                    // A garbled Hello (a duplicate, say) opens nothing.
                    Err(_) => {}
                }
            }
        }
    }

    /// Processes events up to `until`.
    fn run_until(&mut self, until: Duration) {
        let mut guard = 0u64;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), e) = entry.remove_entry();
            self.now = self.now.max(at);
            match e {
                Event::Deliver(m) => self.deliver(m),
                Event::Wake { d, inc } => {
                    if self.devices[d].online && self.devices[d].inc == inc {
                        let now = self.clock(d);
                        let dev = &mut self.devices[d];
                        let mut host = Admission::new(&mut dev.core);
                        let actions = dev.manager.poll(now, &mut host);
                        let (facts, adopted) = host.finish();
                        dev.core.take_admitted(facts, adopted);
                        self.apply(d, actions);
                        self.after(d);
                    }
                }
            }
            guard += 1;
            assert!(
                guard < 5_000_000,
                "seed {}: simulation does not settle",
                self.cfg.seed
            );
        }
        self.now = self.now.max(until);
    }

    /// Device `a` opens a sync session to `b`.
    fn open(&mut self, a: usize, b: usize) {
        if !self.devices[a].online || a == b {
            return;
        }
        let peer = self.ids[b];
        if self.cfg.peer_scoring
            && self.devices[a].peers.get(&peer).map(|p| p.status) == Some(PeerStatus::Banned)
        {
            return;
        }
        if !self.devices[a].manager.has_room_for(&peer) {
            return;
        }
        let local = self.local_view(a);
        let now = self.clock(a);
        let inc = self.devices[a].inc;
        let items = self.devices[a].core.session_items();
        let Ok((sid, actions)) = self.devices[a].manager.open(now, peer, local, items) else {
            return;
        };
        let trust = role_trust(&self.devices[a].core.state, &peer);
        self.devices[a].peers.add(peer, trust);
        self.devices[a].peers.session_started(&peer);
        self.routes.insert(
            (a, inc, sid),
            Route {
                peer: b,
                peer_inc: self.devices[b].inc,
                peer_sid: None,
            },
        );
        // The Hello goes on a new stream: route it by hand (no peer session yet).
        for act in actions {
            match act {
                ManagerAction::Send { bytes, .. } => self.transmit(Delivery {
                    from: a,
                    from_inc: inc,
                    to: b,
                    to_inc: None,
                    msg: Msg::Sync {
                        from_sid: sid,
                        to_sid: None,
                    },
                    bytes,
                }),
                other => self.apply(a, vec![other]),
            }
        }
        self.after(a);
    }

    /// The two best peers of `a` by its scorer (on its clock), among its members: the
    /// workload draws one of them, so sessions still spread.
    fn scored_peers(&mut self, a: usize) -> Vec<usize> {
        let members = self.members_of(a);
        let now = self.clock(a);
        let dev = &mut self.devices[a];
        for &j in members.iter().filter(|j| **j != a) {
            let trust = role_trust(&dev.core.state, &self.ids[j]);
            dev.peers.add(self.ids[j], trust);
            dev.peers.set_role_trust(&self.ids[j], trust);
        }
        let picks: Vec<usize> = dev
            .peers
            .select_at(usize::MAX, now)
            .into_iter()
            .filter_map(|id| self.ids.iter().position(|x| *x == id))
            .filter(|j| members.contains(j) && *j != a)
            .take(2)
            .collect();
        if !picks.is_empty() {
            self.stats.scored_picks += 1;
        }
        picks
    }

    /// The hostile device (the last) opens a burst of sessions to every other device; its
    /// sends past the Hello are garbage (see [`Sim::apply`]).
    fn flood(&mut self) {
        let bad = self.devices.len() - 1;
        if !self.devices[bad].online {
            return;
        }
        for b in 0..bad {
            for _ in 0..FLOOD_BURST {
                self.stats.flood_attempts += 1;
                self.open(bad, b);
            }
        }
    }

    /// The hostile device, if the run has one.
    pub fn bad_peer(&self) -> Option<usize> {
        self.cfg.bad_peer.then(|| self.devices.len() - 1)
    }

    fn members_of(&self, d: usize) -> Vec<usize> {
        let m = self.devices[d].core.state.membership();
        (0..self.devices.len())
            .filter(|j| m.is_some_and(|m| m.members.contains(&self.ids[*j])))
            .collect()
    }

    fn is_admin_now(&self, d: usize) -> bool {
        let s = &self.devices[d].core.state;
        s.is_admin_at(&self.ids[d], s.current_epoch())
    }

    fn pick(&mut self, from: &[usize]) -> Option<usize> {
        if from.is_empty() {
            None
        } else {
            Some(from[self.rng.gen_range(0..from.len())])
        }
    }

    fn online(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|d| self.devices[*d].online)
            .collect()
    }

    fn random_step(&mut self) {
        let online = self.online();
        let roll: u32 = self.rng.gen_range(0..100);
        match roll {
            0..=29 => {
                if let Some(d) = self.pick(&online) {
                    let n = self.rng.gen_range(1..=3);
                    for _ in 0..n {
                        self.write_app(d);
                    }
                    self.after(d);
                }
            }
            30..=54 => {
                for _ in 0..2 {
                    if let Some(a) = self.pick(&online) {
                        let peers = if self.cfg.peer_scoring {
                            self.scored_peers(a)
                        } else {
                            self.members_of(a)
                        };
                        if let Some(b) = self.pick(&peers) {
                            self.open(a, b);
                        }
                    }
                }
            }
            55..=61 => {
                if let Some(d) = self.pick(&online) {
                    self.propose(d);
                }
            }
            62..=64 => self.membership_change(),
            65..=71 => self.upgrade_step(),
            72..=73 => self.replace_admin(),
            74..=76 => self.rogue_op(),
            77..=80 => {
                if let Some(d) = self.pick(&online) {
                    self.crash(d);
                }
            }
            81..=86 => {
                let down: Vec<usize> = (0..self.devices.len())
                    .filter(|d| !self.devices[*d].online)
                    .collect();
                if let Some(d) = self.pick(&down) {
                    self.restart(d);
                }
            }
            87..=90 => match self.cfg.partitions {
                PartitionStyle::MidSession => self.partition_mid_session(),
                _ => self.split(),
            },
            91..=95 => self.partition.iter_mut().for_each(|p| *p = 0),
            _ => {}
        }
        if self.cfg.extra_upgrades > 0.0 && self.rng.gen_bool(self.cfg.extra_upgrades) {
            self.upgrade_step();
        }
        if self.cfg.bad_peer {
            self.flood();
        }
        for d in 0..self.devices.len() {
            if self.devices[d].online && self.rng.gen_bool(0.3) {
                self.devices[d].core.flush();
                self.collect_durable(d);
            }
        }
        if self.cfg.partitions == PartitionStyle::Flapping {
            // Four slices of 100 ms; before each the network may flip.
            for _ in 0..4 {
                match self.rng.gen_range(0..10) {
                    0..=2 => self.partition.iter_mut().for_each(|p| *p = 0),
                    3..=5 => self.split(),
                    6..=7 => self.cascade(),
                    _ => {}
                }
                let until = self.now + Duration::from_millis(100);
                self.run_until(until);
            }
        } else {
            let until = self.now + Duration::from_millis(400);
            self.run_until(until);
        }
        for d in 0..self.devices.len() {
            self.feed(d, CeremonyInput::Tick);
        }
    }

    /// A new partition in the configured style: two random groups, or a 2/2/1 split.
    fn split(&mut self) {
        self.stats.partitions += 1;
        if self.cfg.partitions == PartitionStyle::ThreeWay {
            let mut order: Vec<usize> = (0..self.partition.len()).collect();
            for i in (1..order.len()).rev() {
                let j = self.rng.gen_range(0..=i);
                order.swap(i, j);
            }
            // 2/2/1 with five devices (groups of two, the rest alone, with fewer).
            for (k, d) in order.into_iter().enumerate() {
                self.partition[d] = [0, 0, 1, 1, 2][k.min(4)];
            }
        } else {
            for p in 0..self.partition.len() {
                self.partition[p] = self.rng.gen_range(0..2);
            }
        }
    }

    /// A cascading partition: one group's cut heals as another starts. One device of
    /// the current minority side rejoins the others, and a different device is cut off.
    fn cascade(&mut self) {
        let n = self.partition.len();
        let cut: Vec<usize> = (0..n).filter(|d| self.partition[*d] != 0).collect();
        let whole: Vec<usize> = (0..n).filter(|d| self.partition[*d] == 0).collect();
        let (Some(back), Some(out)) = (self.pick(&cut), self.pick(&whole)) else {
            return self.split();
        };
        self.stats.partitions += 1;
        self.partition[back] = 0;
        self.partition[out] = 3;
    }

    /// Every online device opens a session to a member; a few ms later, while those
    /// sessions are in flight, a two-group split cuts them.
    fn partition_mid_session(&mut self) {
        for a in self.online() {
            let peers = self.members_of(a);
            if let Some(b) = self.pick(&peers) {
                self.open(a, b);
            }
        }
        let until = self.now + Duration::from_millis(self.rng.gen_range(2..=30));
        self.run_until(until);
        self.split();
        let cut = self
            .routes
            .iter()
            .filter(|((d, inc, _), r)| {
                self.devices[*d].inc == *inc && self.partition[*d] != self.partition[r.peer]
            })
            .count();
        self.stats.sessions_cut += cut as u64;
    }

    /// Device `d` writes one application fact: a log append (`Payload::Application`, log
    /// "note" or "audit"), or a data operation on a small key space (2 collections of 3
    /// keys, so overwrites, deletes and concurrent writes are common): a put or a delete
    /// superseding the heads of the key the device holds, or now and then a log trim
    /// below one of the entries it holds.
    fn write_app(&mut self, d: usize) {
        let core = &self.devices[d].core;
        let me = core.me;
        if !core.state.is_member_at(&me, core.state.current_epoch()) {
            return;
        }
        let mut data = [0u8; 12];
        self.rng.fill(&mut data);
        let roll: u32 = self.rng.gen_range(0..100);
        let payload = if roll < 40 {
            let kind = if roll < 30 { "note" } else { "audit" };
            Payload::Application {
                kind: kind.into(),
                data: data.to_vec(),
            }
        } else {
            let app = self.devices[d].core.app_state();
            let collection = format!("c{}", self.rng.gen_range(0..2));
            let key = format!("k{}", self.rng.gen_range(0..3));
            let supersedes = app.heads(Space::Collection, &collection, &key);
            let op = if roll < 92 || app.log_len() == 0 {
                if roll >= 80 && app.get(&collection, &key).is_some() {
                    DataOp::Delete(Delete {
                        collection,
                        key,
                        supersedes,
                    })
                } else {
                    DataOp::Put(Put {
                        collection,
                        key,
                        value: Value::Inline(ByteBuf::from(data.to_vec())),
                        supersedes,
                    })
                }
            } else {
                // Trim below one of the entries of a log this device holds (never beyond
                // what it has seen, as a real writer).
                let log = if roll < 96 { "note" } else { "audit" };
                let entries: Vec<LogCursor> = app.log_entries(log, None).collect();
                let Some(before) = self.pick_cursor(&entries) else {
                    return;
                };
                self.stats.trims += 1;
                DataOp::Trim(Trim {
                    log: log.into(),
                    before,
                })
            };
            self.stats.data_writes += 1;
            Payload::Data(op)
        };
        self.stats.app_facts += 1;
        // Every fact format (a fleet between releases writes them all), the timed ones by a
        // clock that runs d * 7 s ahead on device d: nothing may depend on clocks agreeing.
        let skewed = self.now + Duration::from_secs(7 * d as u64);
        let time_ms = u64::try_from(skewed.as_millis()).unwrap_or(u64::MAX);
        let format = match roll % 3 {
            0 => FactFormat::Untimed,
            1 => FactFormat::Timed { time_ms },
            _ => FactFormat::TimedZip215 { time_ms },
        };
        self.devices[d].core.write_in(payload, format);
    }

    fn pick_cursor(&mut self, from: &[LogCursor]) -> Option<LogCursor> {
        if from.is_empty() {
            None
        } else {
            Some(from[self.rng.gen_range(0..from.len())])
        }
    }

    fn propose(&mut self, d: usize) {
        let s = &self.devices[d].core.state;
        // Usually a valid target (above the last completion); sometimes the current epoch,
        // which the engine must refuse as stale when a completion sits there.
        let above = s
            .latest_snapshot
            .as_ref()
            .map_or(s.snapshot_epoch(), |c| c.completed_at)
            .next();
        let target = if self.rng.gen_bool(0.8) {
            s.current_epoch().max(above)
        } else {
            s.current_epoch()
        };
        self.feed(
            d,
            CeremonyInput::Propose {
                target_epoch: target,
                timeout_ms: 3_000,
            },
        );
    }

    fn admin(&self) -> Option<usize> {
        (0..self.devices.len()).find(|d| self.devices[*d].online && self.is_admin_now(*d))
    }

    /// The admin re-deals the key, adds a device or removes one, with a real DKG among
    /// the new members (all of whom must be online and reachable, as a DKG needs).
    fn membership_change(&mut self) {
        let Some(a) = self.admin() else { return };
        let current = self.members_of(a);
        let outside: Vec<usize> = (0..self.devices.len())
            .filter(|d| !current.contains(d))
            .collect();
        let mut next = current.clone();
        match self.rng.gen_range(0..3) {
            0 => {}
            1 => {
                let removable: Vec<usize> = current.iter().copied().filter(|d| *d != a).collect();
                match self.pick(&removable) {
                    Some(r) => next.retain(|d| *d != r),
                    None => return,
                }
            }
            _ => match self.pick(&outside) {
                Some(x) => next.push(x),
                None => return,
            },
        }
        if next.iter().any(|d| !self.reachable(a, *d)) {
            return;
        }
        // The DKG is a maintenance session (rule 9): every participant must be at the
        // admin's maintenance epoch, snapshot epoch included. Otherwise an admin that
        // missed a snapshot writes the change below it, and the members that completed
        // the snapshot re-verify its completion against the new key, fail, and fall back
        // to the older snapshot while having pruned for the newer one (found by the
        // simulator, seed 447; seed 612 in the current random stream).
        let epoch = self.devices[a].core.state.maintenance_epoch();
        let epochs = next.iter().map(|d| {
            let state = &self.devices[*d].core.state;
            (self.ids[*d], Some(state.maintenance_epoch()))
        });
        if self.cfg.dkg_binds_maintenance_epoch && keygen::laggard(epoch, epochs).is_some() {
            return;
        }
        next.sort_unstable();
        let members: Vec<DeviceId> = next.iter().map(|d| self.ids[*d]).collect();
        let identity_epoch = self.devices[a].core.state.identity_epoch() + 1;
        let t = threshold_for(members.len());
        let context = *self.namespace.to_bytes()[1..]
            .first_chunk::<32>()
            .expect("32-byte id");
        let keys: Vec<SigningKey> = next
            .iter()
            .map(|d| self.devices[*d].core.key.clone())
            .collect();
        let (group_key, signer_keys) =
            deal(&members, t, context, identity_epoch, &keys, &mut self.rng);
        self.stats.membership_changes += 1;
        let change =
            self.devices[a]
                .core
                .write(Payload::Authority(AuthorityFact::MembershipChanged(
                    MembershipChange {
                        identity_epoch,
                        members,
                        threshold: t,
                        group_key,
                    },
                )));
        // The DKG ends with every new member persisting the change together with its
        // share. Without this, a member holding the new key but not the change could
        // sign a snapshot under the old identity epoch whose prefix omits the change:
        // devices with the change cannot verify that completion (it is checked against
        // the new group key) and devices without it answer the change `Late`, a
        // permanent split (found by the simulator, seed 173).
        let dkg_atomic = self.cfg.dkg_persists_change;
        if dkg_atomic {
            self.devices[a].core.flush();
        }
        for (d, k) in next.iter().zip(signer_keys) {
            self.devices[*d]
                .core
                .durable
                .keys
                .insert(identity_epoch, k.clone());
            if dkg_atomic && *d != a {
                self.devices[*d].core.install_durable(change.clone());
            }
            self.feed(*d, CeremonyInput::InstallKey(k));
        }
        self.after(a);
    }

    fn upgrade_step(&mut self) {
        match self.rng.gen_range(0..3) {
            0 => {
                let Some(a) = self.admin() else { return };
                let s = &self.devices[a].core.state;
                let top = s
                    .upgrades
                    .values()
                    .map(|u| u.metadata.version)
                    .chain([self.devices[a].core.durable.version])
                    .max()
                    .unwrap_or(ProtocolVersion::CURRENT);
                let current = s.current_epoch();
                // Two packages at once: the second at the same version or the next one.
                let packages = if self.cfg.concurrent_publish { 2 } else { 1 };
                for k in 0..packages {
                    let fence = (self.cfg.always_fence || self.rng.gen_bool(0.5))
                        .then(|| Epoch(current.0 + self.rng.gen_range(0..3)));
                    let mut id = [0u8; 32];
                    self.rng.fill(&mut id);
                    let bump = if k > 0 && self.rng.gen_bool(0.5) {
                        2
                    } else {
                        1
                    };
                    let meta = UpgradeMetadata {
                        package_id: Hash32(id),
                        version: ProtocolVersion {
                            minor: top.minor + bump,
                            ..top
                        },
                        artifact_hash: Hash32(*blake3::hash(&artifact_of(&Hash32(id))).as_bytes()),
                        artifact_size: ARTIFACT_BYTES as u64,
                        fence,
                        cohort_percent: 100,
                    };
                    self.stats.upgrades_published += 1;
                    self.devices[a].core.write(Payload::Maintenance(
                        MaintenanceFact::UpgradePublished(meta),
                    ));
                }
                self.after(a);
            }
            1 => {
                let online = self.online();
                if let Some(d) = self.pick(&online) {
                    self.install_upgrades(d);
                    self.after(d);
                }
            }
            _ => {
                let Some(a) = self.admin() else { return };
                self.install_upgrades(a);
                if !self.devices[a].online {
                    return; // crashed while installing
                }
                let s = &self.devices[a].core.state;
                let Some(u) = s
                    .upgrades
                    .values()
                    .find(|u| u.activated.is_none() && !u.ready.is_empty())
                else {
                    return;
                };
                let act = UpgradeActivated {
                    package_id: u.metadata.package_id,
                    to_version: u.metadata.version,
                    activation_fence: u.metadata.fence,
                };
                let at = s
                    .package_fact_epoch(&act.package_id)
                    .unwrap_or(s.current_epoch());
                self.stats.upgrades_activated += 1;
                self.devices[a].core.write_at(
                    at,
                    Payload::Maintenance(MaintenanceFact::UpgradeActivated(act)),
                );
                self.after(a);
            }
        }
    }

    /// Device `d` runs its upgrade pipeline as the node does (`tend_replica::upgrade`):
    /// [`plan`] decides which published packages it takes, and each one's
    /// [`UpgradeSession`] is driven to its end (fetch and verify the artifact, install,
    /// record, `UpgradeReady`), packages in version order. What the simulator adds is the
    /// crash model: a crash before the new release is on disk, or after it but before the
    /// `UpgradeReady` leaves the write buffer.
    fn install_upgrades(&mut self, d: usize) {
        if !self.devices[d].online {
            return;
        }
        let laggard = self.cfg.fence_laggard && d + 1 == self.devices.len();
        if laggard && !self.healing {
            return;
        }
        let core = &self.devices[d].core;
        let config = PlanConfig {
            policy: UpgradePolicy::Automatic,
            explicit: false,
            retry: false,
            running: core.durable.version,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        };
        let mut taken: Vec<UpgradeSession> = plan(
            &core.state,
            &core.me,
            &config,
            &core.durable.upgrade_outcomes,
        )
        .into_iter()
        .filter_map(|(_, decision)| match decision {
            Decision::Start(session, _) => Some(session),
            Decision::Skip(_) => None,
        })
        // A release already running whose readiness is missing (a crash took it from the
        // write buffer) is announced again; switched off, the bug of seed 3 returns.
        .filter(|s| self.cfg.reannounce_ready || s.package().version > config.running)
        .collect();
        taken.sort_by_key(|s| s.package().version);
        let mut crash_after = false;
        for session in taken {
            if session.package().version <= self.devices[d].core.durable.version
                && silent_install(&self.devices[d].core)
            {
                self.stats.ready_reannounced += 1;
            }
            match self.drive_upgrade(d, session) {
                Some(after) => crash_after |= after,
                None => return, // crashed before the install
            }
        }
        if crash_after {
            self.stats.install_crashes += 1;
            self.crash(d);
        }
    }

    /// Drives one package's pipeline on device `d`. `None` if the device crashed before
    /// the install; else whether it is to crash once the pipeline is done.
    fn drive_upgrade(&mut self, d: usize, mut session: UpgradeSession) -> Option<bool> {
        let epoch = |sim: &Self| sim.devices[d].core.state.maintenance_epoch();
        let mut crash_after = false;
        let mut actions: VecDeque<UpgradeAction> = [UpgradeAction::FetchBlob {
            cid: artifact_cid(&session.package().artifact_hash),
        }]
        .into();
        while let Some(action) = actions.pop_front() {
            let input = match action {
                UpgradeAction::FetchBlob { .. } => UpgradeInput::Blob {
                    epoch: epoch(self),
                    blob: BlobInput::Bytes(artifact_of(&session.package().package_id)),
                },
                UpgradeAction::Install { package, .. } => {
                    let crash = !self.healing
                        && self.cfg.install_crash > 0.0
                        && self.rng.gen_bool(self.cfg.install_crash);
                    if crash && self.rng.gen_bool(0.5) {
                        self.stats.install_crashes += 1;
                        self.crash(d);
                        return None;
                    }
                    crash_after |= crash;
                    let core = &mut self.devices[d].core;
                    core.durable.version = core.durable.version.max(package.version);
                    UpgradeInput::InstallFinished {
                        epoch: epoch(self),
                        result: Ok(()),
                    }
                }
                UpgradeAction::Record(status) => {
                    let id = session.package().package_id;
                    self.devices[d]
                        .core
                        .durable
                        .upgrade_outcomes
                        .insert(id, status);
                    continue;
                }
                UpgradeAction::WriteReady(ready) => {
                    let core = &mut self.devices[d].core;
                    let at = core
                        .state
                        .package_fact_epoch(&ready.package_id)
                        .unwrap_or(core.state.current_epoch());
                    core.write_at(
                        at,
                        Payload::Maintenance(MaintenanceFact::UpgradeReady(ready)),
                    );
                    continue;
                }
                UpgradeAction::Report(_) => continue,
            };
            actions.extend(session.handle(input));
        }
        Some(crash_after)
    }

    fn replace_admin(&mut self) {
        let Some(a) = self.admin() else { return };
        let others: Vec<usize> = self.members_of(a).into_iter().filter(|d| *d != a).collect();
        let Some(n) = self.pick(&others) else { return };
        let activation =
            Epoch(self.devices[a].core.state.current_epoch().0 + self.rng.gen_range(1..=2));
        self.stats.admin_replacements += 1;
        self.replacements
            .push((self.ids[a], self.ids[n], activation));
        self.devices[a]
            .core
            .write(Payload::Maintenance(MaintenanceFact::AdminReplacement(
                AdminReplacement {
                    old_admin: self.ids[a],
                    new_admin: self.ids[n],
                    activation_epoch: activation,
                },
            )));
        self.after(a);
    }

    /// A retired admin keeps issuing admin operations; reduction must ignore them.
    fn rogue_op(&mut self) {
        let retired: Vec<usize> = self
            .replacements
            .iter()
            .filter_map(|(old, _, _)| self.ids.iter().position(|x| x == old))
            .filter(|d| self.devices[*d].online)
            .collect();
        let Some(d) = self.pick(&retired) else { return };
        self.stats.rogue_ops += 1;
        let mut id = [0u8; 32];
        self.rng.fill(&mut id);
        let meta = UpgradeMetadata {
            package_id: Hash32(id),
            version: ProtocolVersion {
                major: 1,
                minor: 900,
                patch: 0,
            },
            artifact_hash: Hash32([0xee; 32]),
            artifact_size: 1,
            fence: Some(self.devices[d].core.state.current_epoch()),
            cohort_percent: 100,
        };
        self.devices[d]
            .core
            .write(Payload::Maintenance(MaintenanceFact::UpgradePublished(
                meta,
            )));
        self.after(d);
    }

    fn crash(&mut self, d: usize) {
        self.stats.crashes += 1;
        let dev = &mut self.devices[d];
        dev.online = false;
        dev.inc += 1;
        dev.core.crash();
        dev.manager = SessionManager::new(manager_config_for(&self.cfg, d));
        dev.engine = None;
    }

    fn restart(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        dev.online = true;
        dev.core.rebuild();
        dev.session_epoch = dev.core.state.identity_epoch();
        dev.start_engine();
        self.after(d);
    }

    /// Ends every fault, brings every device back, and syncs until the members agree.
    fn heal(&mut self) {
        self.healing = true;
        self.faults = CLEAN;
        self.partition.iter_mut().for_each(|p| *p = 0);
        for d in 0..self.devices.len() {
            if !self.devices[d].online {
                self.restart(d);
            }
        }
        // Let ceremonies in flight finish or time out.
        let until = self.now + Duration::from_secs(5);
        self.run_until(until);
        for round in 0..self.cfg.heal_rounds {
            self.stats.heal_rounds = round as u64 + 1;
            for d in 0..self.devices.len() {
                self.install_upgrades(d);
                self.devices[d].core.flush();
                self.after(d);
            }
            for a in 0..self.devices.len() {
                for b in self.members_of(a) {
                    self.open(a, b);
                }
            }
            let until = self.now + Duration::from_secs(10);
            self.run_until(until);
            for d in 0..self.devices.len() {
                self.feed(d, CeremonyInput::Tick);
                self.devices[d].core.flush();
                self.collect_durable(d);
            }
            if round > 0 && crate::invariants::disagreement(self).is_none() {
                break;
            }
        }
    }
}

impl Device {
    /// A fresh snapshot engine with every durable key installed.
    fn start_engine(&mut self) {
        let mut e = SnapshotEngine::new(self.core.me);
        e.restore_votes(self.core.durable.signed.clone());
        let mut rng = StdRng::seed_from_u64(0);
        let view = EngineView::new(&self.core).unwrap_or_else(|e| match e {});
        for k in self.core.durable.keys.values() {
            e.handle(
                Duration::ZERO,
                &view,
                CeremonyInput::InstallKey(k.clone()),
                &mut rng,
            );
        }
        self.engine = Some(e);
    }
}

/// A group key and one signer key per member: a real FROST DKG, or the device key of a
/// one-device authority.
fn deal(
    members: &[DeviceId],
    t: u16,
    context: [u8; 32],
    identity_epoch: u64,
    keys: &[SigningKey],
    rng: &mut StdRng,
) -> (GroupKey, Vec<SignerKey>) {
    if members.len() == 1 {
        let key = keys[0].clone();
        return (
            GroupKey(key.verifying_key().to_bytes()),
            vec![SignerKey::Single {
                identity_epoch,
                key,
            }],
        );
    }
    let session = DkgSession {
        context,
        identity_epoch,
        members: members.to_vec(),
        threshold: t,
    };
    let shares = tend_crypto::run_in_memory(&session, rng).expect("an in-memory DKG completes");
    let group_key = shares[0].group_key();
    (
        group_key,
        shares.into_iter().map(SignerKey::Frost).collect(),
    )
}

/// Whether the device runs the release of a published package while none of the packages
/// of that release lists it as ready.
/// Bytes of a simulated package's artifact, made from its id (so every device can "fetch"
/// it, and its hash is the one published).
const ARTIFACT_BYTES: usize = 1024;

fn artifact_of(package_id: &Hash32) -> Vec<u8> {
    package_id.0.repeat(ARTIFACT_BYTES / 32)
}

fn silent_install(core: &Core) -> bool {
    let mut of_release = core
        .state
        .upgrades
        .values()
        .filter(|u| u.metadata.version == core.durable.version)
        .peekable();
    of_release.peek().is_some() && of_release.all(|u| !u.ready.contains(&core.me))
}
