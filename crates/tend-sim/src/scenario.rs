//! Named scenarios: presets of [`SimConfig`] that play one hard fault pattern each
//! (`tend-sim --scenario NAME --seeds A..B`, `tend-sim --list-scenarios`).
//!
//! Every scenario keeps the whole random workload (writes, sessions, snapshots, pruning,
//! membership changes, upgrades, admin replacement, crashes) and every invariant check;
//! it changes the network, the partitions, the upgrade pipeline or the clocks.

use crate::sim::{NetFaults, PartitionStyle, SimConfig};

/// One named preset.
pub struct Scenario {
    pub name: &'static str,
    /// One line: what the scenario plays.
    pub about: &'static str,
    configure: fn(&mut SimConfig),
}

impl Scenario {
    /// The run of this scenario for `seed`.
    pub fn config(&self, seed: u64, steps: usize) -> SimConfig {
        let mut cfg = SimConfig::small(seed, steps);
        (self.configure)(&mut cfg);
        cfg
    }
}

/// Every scenario, in the order `--list-scenarios` prints them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "default",
        about: "the random mix: 5% loss, 3% duplication and reordering, 1-40 ms, two-group partitions, crash-restart",
        configure: |_| {},
    },
    Scenario {
        name: "three-way-split",
        about: "five devices split 2/2/1 (three groups that cannot talk), then healed",
        configure: |c| {
            c.devices = 5;
            c.partitions = PartitionStyle::ThreeWay;
        },
    },
    Scenario {
        name: "lossy-jitter",
        about: "15% loss, 5% duplication, 10% reordering, latency jittering between 1 and 400 ms",
        configure: |c| {
            c.net = NetFaults {
                drop: 0.15,
                dup: 0.05,
                reorder: 0.10,
                min_latency_ms: 1,
                max_latency_ms: 400,
            };
        },
    },
    Scenario {
        name: "flapping",
        about: "partitions lasting about 100 ms that come and go, and cascade (one heals as another starts)",
        configure: |c| c.partitions = PartitionStyle::Flapping,
    },
    Scenario {
        name: "partition-mid-session",
        about: "a split starting 2-30 ms after every device opened a session, cutting open sessions",
        configure: |c| c.partitions = PartitionStyle::MidSession,
    },
    Scenario {
        name: "fence-one-behind",
        about: "fenced upgrades activated while one device stays a release behind until the heal: refused with a reason, no session crosses the fence",
        configure: |c| {
            c.fence_laggard = true;
            c.always_fence = true;
            c.extra_upgrades = 0.15;
        },
    },
    Scenario {
        name: "clock-skew",
        about: "each device's clock is offset by up to 10 s and runs 5% fast or slow (session and ceremony timeouts)",
        configure: |c| c.clock_skew_ms = 10_000,
    },
    Scenario {
        name: "crash-during-install",
        about: "devices crash in the upgrade pipeline, before the new release is on disk or before its UpgradeReady is",
        configure: |c| {
            c.install_crash = 0.3;
            c.extra_upgrades = 0.15;
        },
    },
    Scenario {
        name: "concurrent-upgrades",
        about: "the admin publishes two packages at once (same or consecutive versions, each with its own fence)",
        configure: |c| {
            c.concurrent_publish = true;
            c.extra_upgrades = 0.15;
        },
    },
    Scenario {
        name: "bad-peer",
        about: "the last device floods every peer with sessions and sends garbage on them; honest devices pick peers by score under a device's rate limits, demote and ban it, and converge",
        configure: |c| {
            c.devices = c.devices.max(4);
            c.peer_scoring = true;
            c.bad_peer = true;
            // Sync streams are ordered and lossless below the session (QUIC): a
            // duplicated or reordered message would make an honest peer look hostile.
            c.net.dup = 0.0;
            c.net.reorder = 0.0;
        },
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
