//! The rate-limit options of `tend run`. Every limit is per second, with a burst of one
//! second's worth; each exists per peer and for the whole device. `tend run` starts from
//! the device defaults (tend-sync's `RateConfig::device_default`), or from no limit at all
//! with `--no-rate-limits`; each option given replaces one figure, and `off` lifts it.

use std::num::NonZeroU32;

use clap::Args as ClapArgs;
use tend_node::NodeConfig;

/// One limit: a positive number per second, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(pub Option<NonZeroU32>);

/// Parses `N`, `N` with a suffix (`k` = 1,000, `M` = 1,000,000, `KiB` = 1,024,
/// `MiB` = 1,048,576), or `off`.
fn parse_limit(s: &str) -> Result<Limit, String> {
    let t = s.trim();
    if matches!(t, "off" | "none" | "unlimited") {
        return Ok(Limit(None));
    }
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let factor: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
            "{s:?} is not a limit: use a number per second (suffixes k, M, KiB, MiB, GiB) or off"
        ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a limit: use a number per second or off"))?;
    let n = n
        .checked_mul(factor)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{s:?} is too large (at most {} per second)", u32::MAX))?;
    NonZeroU32::new(n)
        .map(|n| Limit(Some(n)))
        .ok_or_else(|| format!("{s:?}: a limit of 0 would stop all traffic; use off for none"))
}

/// Rate limits of `tend run` (per second; `N`, `Nk`, `NM`, `NKiB`, `NMiB`, or `off`).
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct RateArgs {
    /// Start from no rate limit at all (the --limit-* options given still apply).
    #[arg(long)]
    pub no_rate_limits: bool,
    /// Sync sessions one peer may open per second; more are refused with a retry time
    /// [default: 25].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_sessions_per_peer: Option<Limit>,
    /// Sync sessions all peers together may open per second [default: 100].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_sessions: Option<Limit>,
    /// Messages read from one peer per second; more wait, slowing the sender
    /// [default: 1000].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_messages_per_peer: Option<Limit>,
    /// Messages read from all peers together per second [default: 5000].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_messages: Option<Limit>,
    /// Bytes read from one peer per second [default: 16MiB].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_bytes_in_per_peer: Option<Limit>,
    /// Bytes read from all peers together per second [default: 32MiB].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_bytes_in: Option<Limit>,
    /// Facts sent to one peer per second [default: 64000].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_facts_out_per_peer: Option<Limit>,
    /// Facts sent to all peers together per second [default: 128000].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_facts_out: Option<Limit>,
    /// Fact bytes sent to one peer per second [default: 16MiB].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_bytes_out_per_peer: Option<Limit>,
    /// Fact bytes sent to all peers together per second [default: 32MiB].
    #[arg(long, value_name = "N|off", value_parser = parse_limit)]
    pub limit_bytes_out: Option<Limit>,
}

impl RateArgs {
    /// Sets the node's rate limits from these options.
    pub fn apply(&self, config: &mut NodeConfig) {
        let r = &mut config.manager.rate;
        if self.no_rate_limits {
            r.per_peer.facts_per_sec = None;
            r.per_peer.bytes_per_sec = None;
            r.global.facts_per_sec = None;
            r.global.bytes_per_sec = None;
            for inbound in [&mut r.inbound_per_peer, &mut r.inbound_global] {
                inbound.sessions_per_sec = None;
                inbound.messages_per_sec = None;
                inbound.bytes_per_sec = None;
            }
        }
        let set = |slot: &mut Option<NonZeroU32>, given: Option<Limit>| {
            if let Some(Limit(v)) = given {
                *slot = v;
            }
        };
        set(
            &mut r.inbound_per_peer.sessions_per_sec,
            self.limit_sessions_per_peer,
        );
        set(&mut r.inbound_global.sessions_per_sec, self.limit_sessions);
        set(
            &mut r.inbound_per_peer.messages_per_sec,
            self.limit_messages_per_peer,
        );
        set(&mut r.inbound_global.messages_per_sec, self.limit_messages);
        set(
            &mut r.inbound_per_peer.bytes_per_sec,
            self.limit_bytes_in_per_peer,
        );
        set(&mut r.inbound_global.bytes_per_sec, self.limit_bytes_in);
        set(&mut r.per_peer.facts_per_sec, self.limit_facts_out_per_peer);
        set(&mut r.global.facts_per_sec, self.limit_facts_out);
        set(&mut r.per_peer.bytes_per_sec, self.limit_bytes_out_per_peer);
        set(&mut r.global.bytes_per_sec, self.limit_bytes_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(v)
    }

    #[test]
    fn limits_parse_with_units_and_off_and_refuse_zero_and_junk() {
        assert_eq!(parse_limit("250"), Ok(Limit(n(250))));
        assert_eq!(parse_limit("4k"), Ok(Limit(n(4_000))));
        assert_eq!(parse_limit("2M"), Ok(Limit(n(2_000_000))));
        assert_eq!(parse_limit("256KiB"), Ok(Limit(n(256 * 1024))));
        assert_eq!(parse_limit("8MiB"), Ok(Limit(n(8 << 20))));
        assert_eq!(parse_limit("off"), Ok(Limit(None)));
        for bad in ["0", "-1", "ten", "5 kb", "8GiB", "", "1.5M"] {
            assert!(parse_limit(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// The defaults the help text names are the node's.
    #[test]
    fn the_help_text_defaults_are_the_device_defaults() {
        let r = NodeConfig::default().manager.rate;
        assert_eq!(r.inbound_per_peer.sessions_per_sec, n(25));
        assert_eq!(r.inbound_global.sessions_per_sec, n(100));
        assert_eq!(r.inbound_per_peer.messages_per_sec, n(1000));
        assert_eq!(r.inbound_global.messages_per_sec, n(5000));
        assert_eq!(r.inbound_per_peer.bytes_per_sec, n(16 << 20));
        assert_eq!(r.inbound_global.bytes_per_sec, n(32 << 20));
        assert_eq!(r.per_peer.facts_per_sec, n(64_000));
        assert_eq!(r.global.facts_per_sec, n(128_000));
        assert_eq!(r.per_peer.bytes_per_sec, n(16 << 20));
        assert_eq!(r.global.bytes_per_sec, n(32 << 20));
    }

    #[test]
    fn options_replace_single_figures_and_no_rate_limits_starts_from_none() {
        let mut c = NodeConfig::default();
        RateArgs {
            limit_sessions_per_peer: Some(Limit(n(2))),
            limit_bytes_out: Some(Limit(None)),
            ..RateArgs::default()
        }
        .apply(&mut c);
        let r = c.manager.rate;
        assert_eq!(r.inbound_per_peer.sessions_per_sec, n(2));
        assert_eq!(r.global.bytes_per_sec, None);
        assert_eq!(r.inbound_global.sessions_per_sec, n(100), "untouched");

        let mut c = NodeConfig::default();
        RateArgs {
            no_rate_limits: true,
            limit_messages: Some(Limit(n(7))),
            ..RateArgs::default()
        }
        .apply(&mut c);
        let r = c.manager.rate;
        assert_eq!(r.inbound_global.messages_per_sec, n(7));
        assert_eq!(r.inbound_per_peer.sessions_per_sec, None);
        assert_eq!(r.per_peer.facts_per_sec, None);
    }
}
