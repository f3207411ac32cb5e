//! `tend-sim`: run the deterministic simulator for one seed or a range of seeds.
//!
//! `tend-sim --seed N [--steps S]` replays one run; `tend-sim --seeds A..B` runs many and
//! prints each failing seed with the command that replays it. `--scenario NAME` plays a
//! named scenario (`--list-scenarios` lists them).

use std::process::ExitCode;

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = (0u64, 100u64);
    let mut steps = 60usize;
    let mut verbose = false;
    let mut scenario = tend_sim::scenario::find("default").expect("the default scenario");
    // Switches that turn off one fix each, to replay the bug it fixed.
    let mut no_revalidate = false;
    let mut no_dkg_persist = false;
    let mut no_dkg_epoch = false;
    let mut no_vote_lock = false;
    let mut no_stale_drop = false;
    // Not a fix but the GC rule itself: off, pruning drops live application facts.
    let mut no_gc_liveness = false;
    let mut no_peer_fence = false;
    let mut no_reannounce = false;
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seed" => match val.parse::<u64>() {
                Ok(n) => {
                    seeds = (n, n + 1);
                    verbose = true;
                }
                Err(_) => return usage(&format!("bad seed {val:?}")),
            },
            "--seeds" => match parse_range(&val) {
                Some(r) => seeds = r,
                None => return usage(&format!("bad range {val:?}, expected A..B")),
            },
            "--steps" => match val.parse() {
                Ok(n) => steps = n,
                Err(_) => return usage(&format!("bad step count {val:?}")),
            },
            "--no-revalidate" | "--no-dkg-persist" | "--no-dkg-epoch" | "--no-vote-lock"
            | "--no-stale-drop" | "--no-gc-liveness" | "--no-peer-fence" | "--no-reannounce" => {
                match args[i].as_str() {
                    "--no-revalidate" => no_revalidate = true,
                    "--no-dkg-persist" => no_dkg_persist = true,
                    "--no-dkg-epoch" => no_dkg_epoch = true,
                    "--no-stale-drop" => no_stale_drop = true,
                    "--no-gc-liveness" => no_gc_liveness = true,
                    "--no-peer-fence" => no_peer_fence = true,
                    "--no-reannounce" => no_reannounce = true,
                    _ => no_vote_lock = true,
                }
                i += 1;
                continue;
            }
            "--scenario" => match tend_sim::scenario::find(&val) {
                Some(s) => scenario = s,
                None => return usage(&format!("unknown scenario {val:?} (see --list-scenarios)")),
            },
            "--list-scenarios" => {
                for s in tend_sim::SCENARIOS {
                    println!("{:<22} {}", s.name, s.about);
                }
                return ExitCode::SUCCESS;
            }
            "--write-corpus" => {
                return match tend_sim::corpus::write(std::path::Path::new(&val)) {
                    Ok(n) => {
                        println!("wrote {n} corpus files under {val}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => usage(&format!("cannot write the corpus to {val}: {e}")),
                };
            }
            "-h" | "--help" => return usage(""),
            other => return usage(&format!("unknown argument {other:?}")),
        }
        i += 2;
    }
    let mut failed = 0;
    for seed in seeds.0..seeds.1 {
        let mut cfg = scenario.config(seed, steps);
        cfg.revalidate_on_membership_change = !no_revalidate;
        cfg.dkg_persists_change = !no_dkg_persist;
        cfg.dkg_binds_maintenance_epoch = !no_dkg_epoch;
        cfg.signers_lock_epoch = !no_vote_lock;
        cfg.settle_drops_stale = !no_stale_drop;
        cfg.gc_keeps_live_facts = !no_gc_liveness;
        cfg.responder_checks_peer_fence = !no_peer_fence;
        cfg.reannounce_ready = !no_reannounce;
        let report = tend_sim::Sim::new(cfg).run();
        if verbose {
            println!("seed {seed}: {:#?}", report.stats);
        }
        if !report.violations.is_empty() {
            failed += 1;
            println!("FAIL seed {seed} ({} violations):", report.violations.len());
            for v in &report.violations {
                println!("  - {v}");
            }
            let mut flags = String::new();
            if scenario.name != "default" {
                flags.push_str(&format!(" --scenario {}", scenario.name));
            }
            for (on, name) in [
                (no_revalidate, " --no-revalidate"),
                (no_dkg_persist, " --no-dkg-persist"),
                (no_dkg_epoch, " --no-dkg-epoch"),
                (no_vote_lock, " --no-vote-lock"),
                (no_stale_drop, " --no-stale-drop"),
                (no_gc_liveness, " --no-gc-liveness"),
                (no_peer_fence, " --no-peer-fence"),
                (no_reannounce, " --no-reannounce"),
            ] {
                if on {
                    flags.push_str(name);
                }
            }
            println!(
                "  replay: cargo run -p tend-sim --release -- --seed {seed} --steps {steps}{flags}"
            );
        }
    }
    let total = seeds.1.saturating_sub(seeds.0);
    println!(
        "{}: {} of {total} seeds passed",
        scenario.name,
        total - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(err: &str) -> ExitCode {
    if !err.is_empty() {
        eprintln!("error: {err}");
    }
    eprintln!(
        "usage: tend-sim [--scenario NAME] [--seed N | --seeds A..B] [--steps S] [--no-revalidate] [--no-dkg-persist] [--no-dkg-epoch] [--no-vote-lock]\n                [--no-stale-drop] [--no-gc-liveness] [--no-peer-fence] [--no-reannounce]\n       tend-sim --list-scenarios\n       tend-sim --write-corpus DIR"
    );
    if err.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
