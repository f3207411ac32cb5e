//! What tend-node's benchmarks share: the size and format knobs, peak memory, and signed
//! facts.

#![allow(dead_code)]

use tend_core::{FactFormat, Payload, UnsignedFact, VerifiedFact};
use tend_node::Device;

/// Facts per run: `TEND_BENCH_FACTS`, else a million.
pub fn n_facts() -> usize {
    std::env::var("TEND_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The format of the `i`th fact a bench writes: `TEND_BENCH_FACT_FORMAT` (1, 2 or 3), else
/// 3, the format a fleet on this release writes (`MaintenanceState::write_format`).
/// Formats 1 and 2 measure a journal written before release 1.0.2.
pub fn fact_format(i: usize) -> FactFormat {
    let time_ms = 1_765_000_000_000 + i as u64;
    match std::env::var("TEND_BENCH_FACT_FORMAT").as_deref() {
        Ok("1") => FactFormat::Untimed,
        Ok("2") => FactFormat::Timed { time_ms },
        _ => FactFormat::TimedZip215 { time_ms },
    }
}

/// Peak resident memory of this process, in MiB (Linux).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time this process has used so far, on every thread.
pub fn process_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `n` application facts (log entries) by `device` at its current epoch, in
/// [`fact_format`], signed on two threads.
pub fn sign_app_facts(device: &Device, n: usize, label: &str) -> Vec<VerifiedFact> {
    let ns = device.namespace();
    let epoch = device
        .store()
        .maintenance_state(ns)
        .expect("state")
        .current_epoch();
    let key = device.key().signing_key();
    let make = |i: usize| {
        UnsignedFact {
            namespace: ns,
            epoch,
            payload: Payload::Application {
                kind: "bench".into(),
                data: format!("fact {i:08} of the {label} bench").into_bytes(),
            },
        }
        .sign_with(key, fact_format(i))
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| (0..n / 2).map(make).collect::<Vec<_>>());
        let mut b: Vec<_> = (n / 2..n).map(make).collect();
        let mut a = a.join().expect("signing thread");
        a.append(&mut b);
        a
    })
}
