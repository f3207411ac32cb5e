//! Rate limits on what a device sends and accepts, per peer and for the whole device,
//! built on `governor` with a clock the caller drives.
//!
//! Outgoing: facts/s and bytes/s of the fact batches a device sends ([`Rate`]).
//! Incoming: sync sessions a peer may open per second, and messages/s and bytes/s of the
//! frames a device reads from peers ([`InboundRate`]). Each limit exists per peer and
//! globally (over all peers); `None` means unlimited, and the burst of every limit is one
//! second's worth.
//!
//! Time is whatever the caller passes as `now` (a `Duration` since its own origin); the
//! limiter never reads a clock, so runs are deterministic. Outgoing limits are checked in
//! the order peer facts, peer bytes, global facts, global bytes; when a later one refuses,
//! the earlier ones have already been charged, which errs on the slow side and never lets
//! more through than any limit allows. Incoming messages carry an [`InboundTicket`] so a
//! frame held back and offered again is not charged twice by the limits it already passed.
//! Every refusal is counted by [`Limited`] until the caller takes the counts
//! ([`RateLimits::take_limited`]) for its metrics.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tend_core::DeviceId;

type Limiter = RateLimiter<
    NotKeyed,
    InMemoryState,
    FakeRelativeClock,
    governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
>;

/// Outgoing limits: facts per second and bytes per second of the fact batches sent;
/// `None` means unlimited. The burst of each limit is one second's worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rate {
    pub facts_per_sec: Option<NonZeroU32>,
    pub bytes_per_sec: Option<NonZeroU32>,
}

impl Rate {
    /// No limit at all.
    pub const UNLIMITED: Rate = Rate {
        facts_per_sec: None,
        bytes_per_sec: None,
    };
}

/// Incoming limits: sync sessions opened per second, and messages and bytes per second of
/// the frames read; `None` means unlimited. The burst of each limit is one second's worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundRate {
    pub sessions_per_sec: Option<NonZeroU32>,
    pub messages_per_sec: Option<NonZeroU32>,
    pub bytes_per_sec: Option<NonZeroU32>,
}

impl InboundRate {
    /// No limit at all.
    pub const UNLIMITED: InboundRate = InboundRate {
        sessions_per_sec: None,
        messages_per_sec: None,
        bytes_per_sec: None,
    };
}

/// Configuration of [`RateLimits`]. The default is unlimited (what a test or a simulation
/// wants unless it studies limits); a running device uses [`RateConfig::device_default`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateConfig {
    /// Outgoing fact batches to one peer.
    pub per_peer: Rate,
    /// Outgoing fact batches to all peers together.
    pub global: Rate,
    /// Sessions, messages and bytes one peer may send us.
    pub inbound_per_peer: InboundRate,
    /// Sessions, messages and bytes all peers together may send us.
    pub inbound_global: InboundRate,
}

const fn nz(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

impl RateConfig {
    /// No limit at all.
    pub const UNLIMITED: RateConfig = RateConfig {
        per_peer: Rate::UNLIMITED,
        global: Rate::UNLIMITED,
        inbound_per_peer: InboundRate::UNLIMITED,
        inbound_global: InboundRate::UNLIMITED,
    };

    /// The limits a running device (`tend run`) starts with. An honest device stays well
    /// below them: it opens one session per peer per round (every 10 s; 0.4 s in tests
    /// and devnets) plus a few immediate retries and a round after each local write, and
    /// a session moves at most 2,048 facts / 512 KiB per message. A flooding peer is held
    /// to the per-peer figures, so it can take at most a quarter (sessions) to half
    /// (facts, bytes) or a fifth (messages) of the device's global budget.
    ///
    /// The per-peer facts and bytes are set for a device catching up from one peer: once
    /// a receiver checked signatures on every core, the first defaults (20,000 facts and
    /// 8 MiB a second per peer, 8 MiB read) would have set the pace of a catch-up instead
    /// of the receiver (BENCHMARKS.md, "Catching up from one peer"). The global byte
    /// budgets did not change, so the device's total traffic stays as bounded.
    ///
    /// | limit | per peer | global |
    /// | --- | ---: | ---: |
    /// | facts sent / s | 64,000 | 128,000 |
    /// | bytes sent / s | 16 MiB | 32 MiB |
    /// | sessions accepted / s | 25 | 100 |
    /// | messages read / s | 1,000 | 5,000 |
    /// | bytes read / s | 16 MiB | 32 MiB |
    pub const fn device_default() -> RateConfig {
        RateConfig {
            per_peer: Rate {
                facts_per_sec: nz(64_000),
                bytes_per_sec: nz(16 << 20),
            },
            global: Rate {
                facts_per_sec: nz(128_000),
                bytes_per_sec: nz(32 << 20),
            },
            inbound_per_peer: InboundRate {
                sessions_per_sec: nz(25),
                messages_per_sec: nz(1_000),
                bytes_per_sec: nz(16 << 20),
            },
            inbound_global: InboundRate {
                sessions_per_sec: nz(100),
                messages_per_sec: nz(5_000),
                bytes_per_sec: nz(32 << 20),
            },
        }
    }
}

/// Which way the limited traffic went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// What this device sends.
    Outgoing,
    /// What peers send this device.
    Incoming,
}

/// Whether the limit is one peer's or the device's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Peer,
    Global,
}

/// What the limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Facts,
    Bytes,
    Sessions,
    Messages,
}

/// The limit that held something back: a fact batch (outgoing), a frame (incoming
/// messages or bytes) or a session (refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Limited {
    pub direction: Direction,
    pub scope: Scope,
    pub kind: Kind,
}

impl Limited {
    /// `out` or `in`.
    pub fn direction_label(&self) -> &'static str {
        match self.direction {
            Direction::Outgoing => "out",
            Direction::Incoming => "in",
        }
    }

    /// `peer` or `global`.
    pub fn scope_label(&self) -> &'static str {
        match self.scope {
            Scope::Peer => "peer",
            Scope::Global => "global",
        }
    }

    /// `facts`, `bytes`, `sessions` or `messages`.
    pub fn kind_label(&self) -> &'static str {
        match self.kind {
            Kind::Facts => "facts",
            Kind::Bytes => "bytes",
            Kind::Sessions => "sessions",
            Kind::Messages => "messages",
        }
    }
}

fn limiter(n: Option<NonZeroU32>, clock: &FakeRelativeClock) -> Option<Limiter> {
    n.map(|n| RateLimiter::direct_with_clock(Quota::per_second(n), clock.clone()))
}

struct Pair {
    facts: Option<Limiter>,
    bytes: Option<Limiter>,
}

impl Pair {
    fn new(rate: Rate, clock: &FakeRelativeClock) -> Self {
        Self {
            facts: limiter(rate.facts_per_sec, clock),
            bytes: limiter(rate.bytes_per_sec, clock),
        }
    }
}

struct Inbound {
    sessions: Option<Limiter>,
    messages: Option<Limiter>,
    bytes: Option<Limiter>,
}

impl Inbound {
    fn new(rate: InboundRate, clock: &FakeRelativeClock) -> Self {
        Self {
            sessions: limiter(rate.sessions_per_sec, clock),
            messages: limiter(rate.messages_per_sec, clock),
            bytes: limiter(rate.bytes_per_sec, clock),
        }
    }
}

/// The decision for one batch, frame or session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead now; the budget has been charged.
    Now,
    /// Try again at this time (same time base as `now`).
    RetryAt(Duration),
}

/// Progress of one incoming frame through the limits: those it passed are not charged
/// again when the frame is offered once more. Use a new ticket for each frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundTicket {
    /// Limits (in checking order) already charged for this frame.
    passed: usize,
    /// Whether the frame was already counted as held back.
    counted: bool,
}

/// Rate limits per peer and for the whole device, both ways.
pub struct RateLimits {
    config: RateConfig,
    clock: FakeRelativeClock,
    clock_at: Duration,
    global: Pair,
    peers: BTreeMap<DeviceId, Pair>,
    inbound_global: Inbound,
    inbound_peers: BTreeMap<DeviceId, Inbound>,
    limited: BTreeMap<Limited, u64>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("config", &self.config)
            .field("peers", &self.peers.len())
            .field("inbound_peers", &self.inbound_peers.len())
            .finish()
    }
}

/// Charges `n` to `limiter`. A charge larger than the burst is charged at the burst (it
/// could never pass otherwise). `Err` is the wait before it can pass.
fn charge(limiter: &Limiter, n: u32, clock: &FakeRelativeClock) -> Result<(), Duration> {
    let Some(n) = NonZeroU32::new(n) else {
        return Ok(());
    };
    let outcome = match limiter.check_n(n) {
        Ok(r) => r,
        Err(governor::InsufficientCapacity(cap)) => match NonZeroU32::new(cap) {
            Some(cap) => limiter.check_n(cap).unwrap_or(Ok(())),
            None => Ok(()),
        },
    };
    outcome.map_err(|not_until| not_until.wait_time_from(clock.now()))
}

impl RateLimits {
    /// Limits starting at time zero.
    pub fn new(config: RateConfig) -> Self {
        let clock = FakeRelativeClock::default();
        let global = Pair::new(config.global, &clock);
        let inbound_global = Inbound::new(config.inbound_global, &clock);
        Self {
            config,
            clock,
            clock_at: Duration::ZERO,
            global,
            peers: BTreeMap::new(),
            inbound_global,
            inbound_peers: BTreeMap::new(),
            limited: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> RateConfig {
        self.config
    }

    /// The largest batch (facts, bytes) that can ever pass: one second's burst.
    pub fn max_batch(&self) -> (Option<u32>, Option<u32>) {
        let min = |a: Option<NonZeroU32>, b: Option<NonZeroU32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b).get()),
            (a, b) => a.or(b).map(NonZeroU32::get),
        };
        (
            min(
                self.config.per_peer.facts_per_sec,
                self.config.global.facts_per_sec,
            ),
            min(
                self.config.per_peer.bytes_per_sec,
                self.config.global.bytes_per_sec,
            ),
        )
    }

    fn set_time(&mut self, now: Duration) {
        // The clock only moves forward; an earlier `now` is read as "no time passed".
        if now > self.clock_at {
            self.clock.advance(now - self.clock_at);
            self.clock_at = now;
        }
    }

    fn count(&mut self, limited: Limited) {
        *self.limited.entry(limited).or_insert(0) += 1;
    }

    /// Asks to send `facts` facts totalling `bytes` bytes to `peer` at `now`. Batches
    /// larger than a limit's burst are charged at the burst (they could never pass
    /// otherwise); callers keep batches under [`RateLimits::max_batch`].
    pub fn admit(&mut self, peer: DeviceId, facts: u32, bytes: u32, now: Duration) -> Admit {
        self.set_time(now);
        let clock = self.clock.clone();
        let per_peer = self.config.per_peer;
        let pair = self
            .peers
            .entry(peer)
            .or_insert_with(|| Pair::new(per_peer, &clock));
        let checks = [
            (&pair.facts, facts, Scope::Peer, Kind::Facts),
            (&pair.bytes, bytes, Scope::Peer, Kind::Bytes),
            (&self.global.facts, facts, Scope::Global, Kind::Facts),
            (&self.global.bytes, bytes, Scope::Global, Kind::Bytes),
        ];
        let mut refused = None;
        for (limiter, n, scope, kind) in checks {
            let Some(limiter) = limiter else {
                continue;
            };
            if let Err(wait) = charge(limiter, n, &clock) {
                refused = Some((wait, scope, kind));
                break;
            }
        }
        match refused {
            None => Admit::Now,
            Some((wait, scope, kind)) => {
                self.count(Limited {
                    direction: Direction::Outgoing,
                    scope,
                    kind,
                });
                Admit::RetryAt(now + wait.max(Duration::from_millis(1)))
            }
        }
    }

    /// Asks to accept a new session that `peer` opens at `now`: the peer's and the global
    /// session limits. A refused session is not charged to the limits it did not reach.
    pub fn admit_session(&mut self, peer: DeviceId, now: Duration) -> Admit {
        self.set_time(now);
        let clock = self.clock.clone();
        let rate = self.config.inbound_per_peer;
        let mine = self
            .inbound_peers
            .entry(peer)
            .or_insert_with(|| Inbound::new(rate, &clock));
        let checks = [
            (&mine.sessions, Scope::Peer),
            (&self.inbound_global.sessions, Scope::Global),
        ];
        let mut refused = None;
        for (limiter, scope) in checks {
            let Some(limiter) = limiter else {
                continue;
            };
            if let Err(wait) = charge(limiter, 1, &clock) {
                refused = Some((wait, scope));
                break;
            }
        }
        match refused {
            None => Admit::Now,
            Some((wait, scope)) => {
                self.count(Limited {
                    direction: Direction::Incoming,
                    scope,
                    kind: Kind::Sessions,
                });
                Admit::RetryAt(now + wait.max(Duration::from_millis(1)))
            }
        }
    }

    /// Asks to read one frame of `bytes` bytes from `peer` at `now`: the peer's and the
    /// global message and byte limits. On `RetryAt`, offer the same frame again with the
    /// same `ticket` at that time (the caller stops reading from the peer meanwhile, which
    /// slows the sender down through the transport's flow control). Each held-back frame
    /// is counted once, by the first limit that held it.
    pub fn admit_incoming(
        &mut self,
        peer: DeviceId,
        bytes: u32,
        now: Duration,
        ticket: &mut InboundTicket,
    ) -> Admit {
        self.set_time(now);
        let clock = self.clock.clone();
        let rate = self.config.inbound_per_peer;
        let mine = self
            .inbound_peers
            .entry(peer)
            .or_insert_with(|| Inbound::new(rate, &clock));
        let checks = [
            (&mine.messages, 1, Scope::Peer, Kind::Messages),
            (&mine.bytes, bytes, Scope::Peer, Kind::Bytes),
            (
                &self.inbound_global.messages,
                1,
                Scope::Global,
                Kind::Messages,
            ),
            (
                &self.inbound_global.bytes,
                bytes,
                Scope::Global,
                Kind::Bytes,
            ),
        ];
        let mut refused = None;
        for (i, (limiter, n, scope, kind)) in checks.into_iter().enumerate() {
            if i < ticket.passed {
                continue;
            }
            if let Some(limiter) = limiter {
                if let Err(wait) = charge(limiter, n, &clock) {
                    refused = Some((wait, scope, kind));
                    break;
                }
            }
            ticket.passed = i + 1;
        }
        match refused {
            None => Admit::Now,
            Some((wait, scope, kind)) => {
                if !ticket.counted {
                    ticket.counted = true;
                    self.count(Limited {
                        direction: Direction::Incoming,
                        scope,
                        kind,
                    });
                }
                Admit::RetryAt(now + wait.max(Duration::from_millis(1)))
            }
        }
    }

    /// The number of times each limit held something back since the last call, and
    /// resets them (for the caller's metrics).
    pub fn take_limited(&mut self) -> Vec<(Limited, u64)> {
        std::mem::take(&mut self.limited).into_iter().collect()
    }

    /// Forgets a peer's budget (when it is removed).
    pub fn forget(&mut self, peer: &DeviceId) {
        self.peers.remove(peer);
        self.inbound_peers.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[test]
    fn per_peer_and_global_limits_follow_the_injected_clock() {
        let mut r = RateLimits::new(RateConfig {
            inbound_per_peer: InboundRate::UNLIMITED,
            inbound_global: InboundRate::UNLIMITED,
            per_peer: Rate {
                facts_per_sec: nz(100),
                bytes_per_sec: None,
            },
            global: Rate {
                facts_per_sec: nz(150),
                bytes_per_sec: nz(1_000_000),
            },
        });
        let (a, b) = (DeviceId([1; 32]), DeviceId([2; 32]));
        let t0 = Duration::from_secs(10);
        assert_eq!(r.admit(a, 100, 1000, t0), Admit::Now);
        // Peer a's burst is spent.
        assert!(matches!(r.admit(a, 10, 100, t0), Admit::RetryAt(t) if t > t0));
        // Peer b still has its own budget, but the global one has 50 left.
        assert_eq!(r.admit(b, 50, 100, t0), Admit::Now);
        assert!(matches!(r.admit(b, 10, 100, t0), Admit::RetryAt(_)));
        // A second later both budgets have refilled.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.admit(a, 100, 1000, t1), Admit::Now);
        assert_eq!(r.max_batch(), (Some(100), Some(1_000_000)));
    }

    #[test]
    fn unlimited_always_admits() {
        let mut r = RateLimits::new(RateConfig::default());
        for i in 0..1000 {
            assert_eq!(
                r.admit(DeviceId([0; 32]), 1000, 1 << 30, Duration::from_millis(i)),
                Admit::Now
            );
        }
    }

    #[test]
    fn incoming_sessions_are_limited_per_peer_and_globally_and_counted() {
        let mut r = RateLimits::new(RateConfig {
            inbound_per_peer: InboundRate {
                sessions_per_sec: nz(2),
                ..InboundRate::UNLIMITED
            },
            inbound_global: InboundRate {
                sessions_per_sec: nz(3),
                ..InboundRate::UNLIMITED
            },
            ..RateConfig::UNLIMITED
        });
        let (a, b) = (DeviceId([1; 32]), DeviceId([2; 32]));
        let t0 = Duration::from_secs(1);
        assert_eq!(r.admit_session(a, t0), Admit::Now);
        assert_eq!(r.admit_session(a, t0), Admit::Now);
        // a's burst is spent; b still gets the last global slot, then nobody does.
        assert!(matches!(r.admit_session(a, t0), Admit::RetryAt(t) if t > t0));
        assert_eq!(r.admit_session(b, t0), Admit::Now);
        assert!(matches!(r.admit_session(b, t0), Admit::RetryAt(_)));
        let limited = r.take_limited();
        let count = |scope| {
            limited
                .iter()
                .find(|(l, _)| l.scope == scope && l.kind == Kind::Sessions)
                .map_or(0, |(_, n)| *n)
        };
        assert_eq!((count(Scope::Peer), count(Scope::Global)), (1, 1));
        assert!(r.take_limited().is_empty(), "taking the counts resets them");
        // A second later both budgets have refilled.
        assert_eq!(r.admit_session(a, t0 + Duration::from_secs(1)), Admit::Now);
    }

    #[test]
    fn an_incoming_frame_held_back_is_charged_once_per_limit_and_counted_once() {
        let mut r = RateLimits::new(RateConfig {
            inbound_per_peer: InboundRate {
                bytes_per_sec: nz(1000),
                ..InboundRate::UNLIMITED
            },
            inbound_global: InboundRate {
                bytes_per_sec: nz(900),
                ..InboundRate::UNLIMITED
            },
            ..RateConfig::UNLIMITED
        });
        let a = DeviceId([1; 32]);
        let t0 = Duration::from_secs(1);
        let mut first = InboundTicket::default();
        assert_eq!(r.admit_incoming(a, 500, t0, &mut first), Admit::Now);
        // The peer has 500 bytes left, the device 400: held back by the global limit.
        let mut second = InboundTicket::default();
        let Admit::RetryAt(t1) = r.admit_incoming(a, 500, t0, &mut second) else {
            panic!("the global byte limit holds the frame back");
        };
        assert!(t1 > t0);
        // Offered again early: still held, and not counted twice. At t1 (0.11 s on) it
        // passes: the peer's budget, refilled by 111 bytes only, was charged at the first
        // offer and is not charged again.
        assert!(t1 < t0 + Duration::from_millis(200), "{t1:?}");
        assert!(matches!(
            r.admit_incoming(a, 500, t0, &mut second),
            Admit::RetryAt(_)
        ));
        assert_eq!(r.admit_incoming(a, 500, t1, &mut second), Admit::Now);
        let limited = r.take_limited();
        assert_eq!(
            limited,
            vec![(
                Limited {
                    direction: Direction::Incoming,
                    scope: Scope::Global,
                    kind: Kind::Bytes
                },
                1
            )]
        );
    }

    #[test]
    fn the_device_default_limits_everything_and_default_is_unlimited() {
        let d = RateConfig::device_default();
        for n in [
            d.per_peer.facts_per_sec,
            d.per_peer.bytes_per_sec,
            d.global.facts_per_sec,
            d.global.bytes_per_sec,
            d.inbound_per_peer.sessions_per_sec,
            d.inbound_per_peer.messages_per_sec,
            d.inbound_per_peer.bytes_per_sec,
            d.inbound_global.sessions_per_sec,
            d.inbound_global.messages_per_sec,
            d.inbound_global.bytes_per_sec,
        ] {
            assert!(n.is_some());
        }
        // A whole message (1 MiB) fits every byte burst.
        assert!(
            d.inbound_per_peer.bytes_per_sec.unwrap().get() as usize
                > crate::message::DEFAULT_MAX_MESSAGE_BYTES
        );
        assert_eq!(RateConfig::default(), RateConfig::UNLIMITED);
    }
}
