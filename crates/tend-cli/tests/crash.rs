//! Crash safety against the real store: `tend run` processes killed with SIGKILL at random
//! points during sync, and `tend gc` killed mid-way; every restart must open the store, keep
//! every acknowledged fact, and converge.

mod common;

use common::{backup_args, journal_digest, ok_json, start_run, tend};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// A running `tend run` and the address it listens on.
struct Running {
    child: Child,
    listen: String,
    device: String,
}

fn start(home: &Path, listen: &str, peers: &[String]) -> Running {
    let mut args = vec!["--listen", listen, "--sync-interval", "0.2"];
    for p in peers {
        args.extend(["--peer", p.as_str()]);
    }
    let (child, info) = start_run(home, &args);
    Running {
        child,
        listen: info["listen_addr"].as_str().unwrap().to_string(),
        device: info["device_id"].as_str().unwrap().to_string(),
    }
}

fn kill(r: &mut Running) {
    r.child.kill().unwrap(); // SIGKILL: no shutdown, no flush, no socket cleanup.
    r.child.wait().unwrap();
}

fn listed_ids(home: &Path) -> Vec<String> {
    let list = ok_json(home, &["journal", "list", "--limit", "100000"]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sigkill_during_sync_loses_no_acknowledged_fact_and_the_fleet_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (PathBuf, PathBuf) = (dir.path().join("a"), dir.path().join("b"));
    ok_json(&a, &["init"]);
    ok_json(&b, &["init"]);
    let created = ok_json(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "2",
            "--member-home",
            b.to_str().unwrap(),
        ],
    );
    let ns = created["namespace"].as_str().unwrap().to_string();

    let mut ra = start(&a, "127.0.0.1:0", &[]);
    let a_peer = format!("{}@{}", ra.device, ra.listen);
    let mut rb = start(&b, "127.0.0.1:0", std::slice::from_ref(&a_peer));
    let b_peer = format!("{}@{}", rb.device, rb.listen);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut acknowledged = Vec::new();
    for round in 0..6 {
        // Heavy writes on both devices through their control sockets.
        for i in 0..40 {
            let home = if i % 2 == 0 { &a } else { &b };
            let out = tend(
                home,
                &[
                    "--json",
                    "fact",
                    "add",
                    "--kind",
                    "crash",
                    "--data",
                    &format!("{round}-{i}"),
                ],
            );
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                acknowledged.push(v["id"].as_str().unwrap().to_string());
            }
        }
        // Kill one of them at a random moment while sync runs, then restart it on the same
        // address (peers remember it).
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        if rng.gen_bool(0.5) {
            let listen = ra.listen.clone();
            kill(&mut ra);
            ra = start(&a, &listen, std::slice::from_ref(&b_peer));
        } else {
            let listen = rb.listen.clone();
            kill(&mut rb);
            rb = start(&b, &listen, std::slice::from_ref(&a_peer));
        }
    }

    // Converge: both digests equal, and every acknowledged fact on both devices.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (da, db) = (journal_digest(&a, &ns), journal_digest(&b, &ns));
        if da.is_some() && da == db {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: {da:?} vs {db:?}"
        );
        let _ = tend(&a, &["sync", "now"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // A last SIGKILL of both, then the stores open offline, agree, and hold every
    // acknowledged fact.
    kill(&mut ra);
    kill(&mut rb);
    assert_eq!(journal_digest(&a, &ns), journal_digest(&b, &ns));
    for home in [&a, &b] {
        let ids = listed_ids(home);
        for id in &acknowledged {
            assert!(
                ids.contains(id),
                "acknowledged fact {id} lost on {}",
                home.display()
            );
        }
    }
    assert!(
        acknowledged.len() >= 200,
        "only {} facts were acknowledged",
        acknowledged.len()
    );
}

#[test]
fn sigkill_during_gc_leaves_a_store_that_opens_with_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok_json(&a, &["init"]);
    ok_json(&b, &["init"]);
    for i in 0..400 {
        ok_json(
            &a,
            &["fact", "add", "--kind", "n", "--data", &format!("{i}")],
        );
    }
    let bs = b.to_str().unwrap();
    ok_json(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "2",
            "--member-home",
            bs,
        ],
    );
    ok_json(&a, &["snapshot", "propose", "--member-home", bs]);
    let before = ok_json(&a, &["snapshot", "status"]);

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..5 {
        let mut gc = Command::new(env!("CARGO_BIN_EXE_tend"))
            .arg("--home")
            .arg(&a)
            .arg("gc")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..40_000)));
        let _ = gc.kill();
        let _ = gc.wait();
        // Whatever the moment, the store opens and the reduced state is unchanged.
        let after = ok_json(&a, &["snapshot", "status"]);
        assert_eq!(after["latest"], before["latest"]);
        assert_eq!(after["current_epoch"], before["current_epoch"]);
    }
    // A final, uninterrupted GC completes.
    ok_json(&a, &["gc"]);
}

#[test]
fn sigkill_during_restore_leaves_no_half_written_home() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    ok_json(&source, &["init"]);
    for i in 0..40 {
        ok_json(
            &source,
            &["fact", "add", "--kind", "n", "--data", &format!("{i}")],
        );
    }
    let pass = dir.path().join("pass.txt");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let archive = dir.path().join("backup.age");
    let pass_s = pass.to_str().unwrap();
    ok_json(
        &source,
        &backup_args("export", &archive, "--passphrase-file", pass_s),
    );
    let ns = ok_json(&source, &["journal", "status"])["current_namespace"]
        .as_str()
        .unwrap()
        .to_string();
    let want = journal_digest(&source, &ns);

    let target = dir.path().join("restored");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for _ in 0..6 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
            .arg("--home")
            .arg(&target)
            .args(backup_args(
                "restore",
                &archive,
                "--passphrase-file",
                pass_s,
            ))
            .env_remove("TEND_HOME")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        let _ = child.kill();
        let _ = child.wait();
        // Either nothing is there, or a complete home that holds the source's journal.
        if target.exists() {
            assert_eq!(
                journal_digest(&target, &ns),
                want,
                "a restored home must be whole"
            );
            std::fs::remove_dir_all(&target).unwrap();
        }
    }
    // An uninterrupted restore completes afterwards, whatever the killed ones left aside.
    ok_json(
        &target,
        &backup_args("restore", &archive, "--passphrase-file", pass_s),
    );
    assert_eq!(journal_digest(&target, &ns), want);
}
