//! Per-peer and global rate limits (facts/s and bytes/s) on the facts a device sends,
//! built on `governor` with a clock the caller drives.
//!
//! Time is whatever the caller passes as `now` (a `Duration` since its own origin); the
//! limiter never reads a clock, so runs are deterministic. Limits are checked in the order
//! peer facts, peer bytes, global facts, global bytes; when a later one refuses, the
//! earlier ones have already been charged, which errs on the slow side and never lets more
//! through than any limit allows.

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

/// Facts per second and bytes per second; `None` means unlimited. The burst of each limit
/// is one second's worth.
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

/// Configuration of [`RateLimits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateConfig {
    pub per_peer: Rate,
    pub global: Rate,
}

struct Pair {
    facts: Option<Limiter>,
    bytes: Option<Limiter>,
}

impl Pair {
    fn new(rate: Rate, clock: &FakeRelativeClock) -> Self {
        let mk = |n: Option<NonZeroU32>| {
            n.map(|n| RateLimiter::direct_with_clock(Quota::per_second(n), clock.clone()))
        };
        Self {
            facts: mk(rate.facts_per_sec),
            bytes: mk(rate.bytes_per_sec),
        }
    }
}

/// The decision for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Send now; the budget has been charged.
    Now,
    /// Try again at this time (same time base as `now`).
    RetryAt(Duration),
}

/// Rate limits per peer and for the whole device.
pub struct RateLimits {
    config: RateConfig,
    clock: FakeRelativeClock,
    clock_at: Duration,
    global: Pair,
    peers: BTreeMap<DeviceId, Pair>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("config", &self.config)
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl RateLimits {
    /// Limits starting at time zero.
    pub fn new(config: RateConfig) -> Self {
        let clock = FakeRelativeClock::default();
        let global = Pair::new(config.global, &clock);
        Self {
            config,
            clock,
            clock_at: Duration::ZERO,
            global,
            peers: BTreeMap::new(),
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
            (&pair.facts, facts),
            (&pair.bytes, bytes),
            (&self.global.facts, facts),
            (&self.global.bytes, bytes),
        ];
        for (limiter, n) in checks {
            let (Some(limiter), Some(n)) = (limiter, NonZeroU32::new(n)) else {
                continue;
            };
            let outcome = match limiter.check_n(n) {
                Ok(r) => r,
                // Larger than the burst: charge a full burst instead.
                Err(governor::InsufficientCapacity(cap)) => match NonZeroU32::new(cap) {
                    Some(cap) => limiter.check_n(cap).unwrap_or(Ok(())),
                    None => Ok(()),
                },
            };
            if let Err(not_until) = outcome {
                let wait = not_until.wait_time_from(clock.now());
                return Admit::RetryAt(now + wait.max(Duration::from_millis(1)));
            }
        }
        Admit::Now
    }

    /// Forgets a peer's budget (when it is removed).
    pub fn forget(&mut self, peer: &DeviceId) {
        self.peers.remove(peer);
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
}
