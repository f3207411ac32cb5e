//! `tend backup export` on a running device: the CLI asks the device over its control
//! socket (`backup_export`) and the device writes the archive from its open store while
//! it keeps taking facts. Real `tend run` processes on 127.0.0.1.

mod common;

use common::{backup_args, fails_in_one_line, ok_json, scrape, start_run, terminate};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tend_backup::age::secrecy::ExposeSecret;
use tend_core::{Payload, UnsignedFact};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `tend backup verify --in ARCHIVE --identity IDENTITY` on `home`, as JSON.
fn verify(home: &Path, archive: &Path, identity: &Path) -> serde_json::Value {
    ok_json(
        home,
        &backup_args("verify", archive, "--identity", s(identity)),
    )
}

/// A `tend run` process, killed if a test panics before stopping it.
struct Running(Option<Child>);

impl Running {
    fn start(home: &Path) -> Running {
        Self::start_with(home, &[]).0
    }

    /// Starts with more `tend run` arguments; returns its start line too.
    fn start_with(home: &Path, args: &[&str]) -> (Running, serde_json::Value) {
        // No sync rounds to speak of: a one-device authority has no peers anyway.
        let mut all = vec!["--sync-interval", "3600"];
        all.extend_from_slice(args);
        let (child, info) = start_run(home, &all);
        (Running(Some(child)), info)
    }

    fn stop(mut self) {
        terminate(self.0.take().unwrap());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A one-device home with a snapshot and `bulk` facts after it, automatic snapshots off
/// (a ceremony started by the running device would change the journal under the test).
fn home_with_snapshot(dir: &Path, bulk: usize) -> PathBuf {
    let h = dir.join("src");
    ok_json(&h, &["init"]);
    ok_json(
        &h,
        &[
            "snapshot",
            "triggers",
            "--facts",
            "0",
            "--bytes",
            "0",
            "--age-secs",
            "0",
        ],
    );
    for i in 0..5 {
        ok_json(
            &h,
            &["fact", "add", "--kind", "note", "--data", &format!("n{i}")],
        );
    }
    ok_json(&h, &["snapshot", "propose"]);
    // Many facts after the snapshot, so an export takes long enough for `tend fact add`
    // to land during it. Written straight into the stopped device's store.
    let device = tend_node::Device::open(&h).unwrap();
    let ns = device.namespace();
    let epoch = device
        .store()
        .maintenance_state(ns)
        .unwrap()
        .current_epoch();
    let facts: Vec<_> = (0..bulk)
        .map(|i| {
            UnsignedFact {
                namespace: ns,
                epoch,
                payload: Payload::Application {
                    kind: "bulk".into(),
                    data: format!("{i:08}-some-application-data").into_bytes(),
                },
            }
            .sign(device.key().signing_key())
        })
        .collect();
    for batch in facts.chunks(10_000) {
        assert!(device
            .store()
            .insert_batch(batch)
            .unwrap()
            .rejected
            .is_empty());
    }
    h
}

/// An age identity file in `dir` and its public key.
fn age_key(dir: &Path) -> (tend_backup::age::x25519::Identity, PathBuf, String) {
    let id = tend_backup::age::x25519::Identity::generate();
    let file = dir.join("key.txt");
    std::fs::write(&file, format!("{}\n", id.to_string().expose_secret())).unwrap();
    let recipient = id.to_public().to_string();
    (id, file, recipient)
}

/// The archive's `MANIFEST.json`, read as `age -d | tar --zstd -x` would.
fn manifest(archive: &Path, id: &tend_backup::age::x25519::Identity) -> serde_json::Value {
    let bytes = std::fs::read(archive).unwrap();
    let plain = tend_backup::age::Decryptor::new(bytes.as_slice())
        .unwrap()
        .decrypt(std::iter::once(id as &dyn tend_backup::age::Identity))
        .unwrap();
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(plain).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("tend-backup/MANIFEST.json") {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            return serde_json::from_str(&text).unwrap();
        }
    }
    panic!("no manifest in {}", archive.display());
}

#[test]
fn export_from_a_running_device_while_facts_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let src = home_with_snapshot(dir.path(), 30_000);
    let (id, id_file, recipient) = age_key(dir.path());
    let (device, info) = Running::start_with(&src, &["--metrics", "127.0.0.1:0"]);
    let metrics_addr = info["metrics_addr"].as_str().unwrap().to_string();

    // Facts go in through the running device, one `tend fact add` after another, for as
    // long as the exports run.
    let stop = Arc::new(AtomicBool::new(false));
    let added = Arc::new(AtomicU64::new(0));
    let adder = {
        let (stop, added, src) = (stop.clone(), added.clone(), src.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = added.load(Ordering::SeqCst);
                ok_json(
                    &src,
                    &["fact", "add", "--kind", "live", "--data", &format!("l{n}")],
                );
                added.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    common::wait_until(
        "a fact is added",
        std::time::Duration::from_secs(30),
        || added.load(Ordering::SeqCst) > 0,
    );
    let mut archives = Vec::new();
    for k in 0..3 {
        let before = added.load(Ordering::SeqCst);
        let out = dir.path().join(format!("live{k}.age"));
        let r = ok_json(
            &src,
            &backup_args("export", &out, "--recipient", &recipient),
        );
        assert_eq!(r["out"], s(&out));
        archives.push((
            out,
            r["report"].clone(),
            before,
            added.load(Ordering::SeqCst),
        ));
    }
    stop.store(true, Ordering::SeqCst);
    adder.join().unwrap();
    // The running device counted its exports by outcome.
    let metrics = scrape(&metrics_addr);
    assert!(
        metrics.contains("tend_backups_total{outcome=\"ok\"} 3"),
        "{metrics}"
    );
    device.stop();
    let total_added = added.load(Ordering::SeqCst);

    for (archive, report, added_before, _) in &archives {
        // Everything up to the export's start is in it, and no more than was ever added.
        let tail = report["tail_facts"].as_u64().unwrap();
        assert!(tail >= 30_000 + added_before, "{report}");
        let v = verify(&src, archive, &id_file);
        assert_eq!(v["tail_facts"], report["tail_facts"]);
        let m = manifest(archive, &id);
        assert_eq!(m["tail"]["facts"], report["tail_facts"]);
        assert_eq!(v["journal_digest"], m["tail"]["digest"]);
    }
    // Facts went in while an export request was in flight.
    assert!(
        archives.iter().any(|(.., before, after)| after > before),
        "no fact was added during an export"
    );
    assert!(total_added >= archives.last().unwrap().3);

    // The last archive restored into a new home: its journal and snapshot are the
    // manifest's.
    let (archive, report, ..) = archives.last().unwrap();
    let m = manifest(archive, &id);
    let new = dir.path().join("new");
    let r = ok_json(
        &new,
        &backup_args("restore", archive, "--identity", s(&id_file)),
    );
    assert_eq!(r["report"]["tail_facts"], report["tail_facts"]);
    // The restore checked its index from the snapshot epoch on against this digest; below
    // it the index holds the live application facts the snapshot carried.
    assert_eq!(r["report"]["journal_digest"], m["tail"]["digest"]);
    let latest = &ok_json(&new, &["snapshot", "status"])["latest"];
    assert_eq!(latest["digest"], m["snapshot"]["digest"]);
    assert_eq!(latest["epoch"], m["snapshot"]["epoch"]);
    let v = verify(&src, archive, &id_file);
    assert_eq!(r["report"]["state_digest"], v["state_digest"]);
}

/// `tend --home HOME ARGS...` run from `cwd` (relative paths are the user's).
fn tend_in(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .current_dir(cwd)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs");
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_passphrase_file_and_a_recipient_work_through_the_socket_and_print_as_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = home_with_snapshot(d, 100);
    let (_, id_file, recipient) = age_key(d);
    std::fs::write(d.join("pass"), "hunter2\n").unwrap();
    let export = |out: &str, json: bool, passphrase: bool| {
        let mut args = vec![];
        if json {
            args.push("--json");
        }
        args.extend(["backup", "export", "--out", out]);
        if passphrase {
            args.extend(["--passphrase-file", "pass"]);
        } else {
            args.extend(["--recipient", &recipient]);
        }
        String::from_utf8(tend_in(d, &h, &args).stdout).unwrap()
    };

    // Relative paths, resolved by the CLI against its own directory, not the device's.
    let device = Running::start(&h);
    let live_json: serde_json::Value = serde_json::from_str(&export("p.age", true, true)).unwrap();
    let live_text = export("r.age", false, false);
    device.stop();
    let stopped_json: serde_json::Value =
        serde_json::from_str(&export("p2.age", true, true)).unwrap();
    let stopped_text = export("r2.age", false, false);

    // The same output either way (but for the archive's size, which encryption varies).
    assert_eq!(live_json["out"], "p.age");
    assert_eq!(stopped_json["out"], "p2.age");
    let without_size = |v: &serde_json::Value| {
        let mut r = v["report"].clone();
        r.as_object_mut().unwrap().remove("archive_bytes");
        r
    };
    assert_eq!(without_size(&live_json), without_size(&stopped_json));
    let (live, stopped): (Vec<_>, Vec<_>) =
        (live_text.lines().collect(), stopped_text.lines().collect());
    assert!(live[0].starts_with("wrote r.age ("), "{live_text}");
    assert!(stopped[0].starts_with("wrote r2.age ("), "{stopped_text}");
    assert_eq!(live[1..], stopped[1..]);

    // The archives the device wrote open with the passphrase and with the identity.
    let pass = d.join("pass");
    for (archive, key) in [
        ("p.age", ["--passphrase-file", s(&pass)]),
        ("r.age", ["--identity", s(&id_file)]),
    ] {
        let v = ok_json(
            &h,
            &[
                "backup",
                "verify",
                "--in",
                s(&d.join(archive)),
                key[0],
                key[1],
            ],
        );
        assert_eq!(v["tail_facts"], live_json["report"]["tail_facts"]);
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn bad_export_input_through_the_socket_is_one_line_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let h = home_with_snapshot(dir.path(), 100);
    let (_, _, recipient) = age_key(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("b.age");
    let device = Running::start(&h);

    let e = fails_in_one_line(&h, &backup_args("export", &out, "--recipient", "age1nope"));
    assert!(e.starts_with("error: invalid recipient"), "{e}");
    let missing_dir = out_dir.join("no-such-dir").join("b.age");
    let e = fails_in_one_line(
        &h,
        &backup_args("export", &missing_dir, "--recipient", &recipient),
    );
    assert!(e.contains("no-such-dir"), "{e}");
    let e = fails_in_one_line(
        &h,
        &[
            "backup",
            "export",
            "--out",
            s(&out),
            "--passphrase-file",
            s(&dir.path().join("no-such-pass")),
        ],
    );
    assert!(e.contains("no-such-pass"), "{e}");
    assert_eq!(entries(&out_dir), Vec::<String>::new());

    // A good one still works on the same device, and an existing file is not replaced.
    ok_json(&h, &backup_args("export", &out, "--recipient", &recipient));
    let before = std::fs::read(&out).unwrap();
    let e = fails_in_one_line(&h, &backup_args("export", &out, "--recipient", &recipient));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_eq!(entries(&out_dir), vec!["b.age".to_string()]);
    device.stop();
}

#[test]
fn two_exports_at_once_on_one_device_never_share_or_replace_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let h = home_with_snapshot(dir.path(), 20_000);
    let (_, id_file, recipient) = age_key(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let device = Running::start(&h);
    let export_all = |outs: Vec<PathBuf>| {
        let threads: Vec<_> = outs
            .into_iter()
            .map(|out| {
                let (h, recipient) = (h.clone(), recipient.clone());
                std::thread::spawn(move || {
                    common::tend(&h, &backup_args("export", &out, "--recipient", &recipient))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    };
    // Two archives at once: both written, both whole.
    let (a, b) = (out_dir.join("a.age"), out_dir.join("b.age"));
    for o in export_all(vec![a.clone(), b.clone()]) {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for archive in [&a, &b] {
        verify(&h, archive, &id_file);
    }
    // Two at once to one name: one archive, the other export refused, no leftovers.
    let c = out_dir.join("c.age");
    let outs = export_all(vec![c.clone(), c.clone()]);
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one export takes the name");
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(entries(&out_dir), ["a.age", "b.age", "c.age"]);
    verify(&h, &c, &id_file);
    device.stop();
}
