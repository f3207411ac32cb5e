//! Export and restore of a large journal: wall time, peak memory (VmHWM) and archive size
//! against the store size. Each phase runs in a child process so its peak memory is its
//! own. Run with:
//!
//! ```text
//! cargo bench -p tend-backup --bench backup            # 1M facts, half of them in the tail
//! TEND_BENCH_FACTS=200000 cargo bench -p tend-backup --bench backup
//! TEND_BENCH_RUNS=5 ...                                # runs per phase (default 3), medians
//! TEND_BENCH_FACT_FORMAT=1 ...                         # facts in format 1 or 2 (default 3)
//! ```
//!
//! Both the source (export) and the restore target are opened with
//! `tend_backup::bounded_store_options()`, as the CLI does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ed25519_dalek::Signer;
use tend_backup::{BackupError, Decryption, Encryption, ExportOptions};
use tend_core::maintenance::{MaintenanceFact, SnapshotCompleted, SnapshotProposed, SnapshotV1};
use tend_core::{Epoch, FactFormat, Hash32, Payload, UnsignedFact};
use tend_node::fleet::StoreJournal;
use tend_node::Device;
use tend_store::Store;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Child phases: `export STORE NS_HEX OUT RECIPIENT`, `verify ARCHIVE KEYFILE` and
    // `restore ARCHIVE KEYFILE HOME`.
    if args.get(1).map(String::as_str) == Some("--phase") {
        return phase(&args[2..]);
    }
    let n: u64 = std::env::var("TEND_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // TEND_BENCH_KEEP=1 keeps the directory (source store, key, archive) for profiling a
    // phase by hand: `backup-<hash> --phase export|verify|restore ...`.
    let dir_path = dir.path().to_owned();
    let dir = Kept(
        std::env::var_os("TEND_BENCH_KEEP").is_none().then_some(dir),
        dir_path,
    );
    let home = dir.path().join("source");
    let t = Instant::now();
    let device = Device::init(&home, &mut rand::rngs::OsRng).expect("init");
    let half = n / 2;
    add_facts(&device, half, 1..=50);
    snapshot_1_of_1(&device, Epoch(51));
    add_facts(&device, n - half, 51..=100);
    let store_bytes = device.store().file_size().expect("size");
    let ns = device.namespace();
    drop(device);
    println!(
        "setup: {n} facts ({half} below the snapshot) in {:.1?}, store {:.1} MiB",
        t.elapsed(),
        store_bytes as f64 / 1048576.0
    );

    let id = tend_backup::age::x25519::Identity::generate();
    let key = dir.path().join("key.txt");
    {
        use tend_backup::age::secrecy::ExposeSecret;
        std::fs::write(&key, id.to_string().expose_secret()).expect("key");
    }
    let archive = dir.path().join("b.age");
    let me = std::env::current_exe().expect("exe");
    // Each child prints its human line and a last `RESULT <seconds> <peak MiB>` line.
    let run = |args: &[&str]| -> (f64, f64) {
        if std::env::var_os("TEND_BENCH_KEEP").is_some() {
            eprintln!("phase: --phase {}", args.join(" "));
        }
        let out = Command::new(&me)
            .arg("--phase")
            .args(args)
            .output()
            .expect("child");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{text}");
        let result = text
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .expect("result line");
        let mut v = result.split(' ').map(|x| x.parse::<f64>().expect("number"));
        (v.next().expect("secs"), v.next().expect("peak"))
    };
    let runs: usize = std::env::var("TEND_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let store_path = home.join("store.redb");
    let ns_hex = hex::encode(ns.to_bytes());
    let (mut export, mut verify, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let _ = std::fs::remove_file(&archive);
        export.push(run(&[
            "export",
            store_path.to_str().unwrap(),
            &ns_hex,
            archive.to_str().unwrap(),
            &id.to_public().to_string(),
        ]));
        if i == 0 {
            let archive_bytes = std::fs::metadata(&archive).expect("archive").len();
            println!(
                "archive {:.1} MiB = {:.1}% of the store ({:.1} MiB)",
                archive_bytes as f64 / 1048576.0,
                100.0 * archive_bytes as f64 / store_bytes as f64,
                store_bytes as f64 / 1048576.0
            );
        }
        verify.push(run(&[
            "verify",
            archive.to_str().unwrap(),
            key.to_str().unwrap(),
        ]));
        let restored = dir.path().join(format!("restored-{i}"));
        restore.push(run(&[
            "restore",
            archive.to_str().unwrap(),
            key.to_str().unwrap(),
            restored.to_str().unwrap(),
        ]));
        let _ = std::fs::remove_dir_all(&restored);
    }
    for (name, v) in [("export", export), ("verify", verify), ("restore", restore)] {
        let med = |f: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        println!(
            "median of {runs}: {name} {:.2} s, peak RSS {:.1} MiB",
            med(|r| r.0),
            med(|r| r.1)
        );
    }
}

/// The bench directory, removed at the end unless kept.
struct Kept(Option<tempfile::TempDir>, PathBuf);

impl Kept {
    fn path(&self) -> &Path {
        &self.1
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        match self.0.take() {
            Some(d) => drop(d),
            None => eprintln!("kept {}", self.1.display()),
        }
    }
}

fn result_line(t: Instant) {
    println!(
        "RESULT {:.3} {:.1}",
        t.elapsed().as_secs_f64(),
        vm_hwm_kib() as f64 / 1024.0
    );
}

fn phase(args: &[String]) {
    let before = vm_hwm_kib();
    let t = Instant::now();
    match args[0].as_str() {
        "export" => {
            // As the CLI opens it: a bounded page cache.
            let store =
                Store::open_with(&args[1], &tend_backup::bounded_store_options()).expect("open");
            let ns = tend_core::JournalNamespace::from_bytes(&hex::decode(&args[2]).unwrap())
                .expect("ns");
            let enc = Encryption::recipients(&[args[4].as_str()]).expect("recipient");
            let r = tend_backup::export_file(
                &store,
                ns,
                Path::new(&args[3]),
                &ExportOptions::new(&enc),
            )
            .expect("export");
            println!(
                "export: {:.2?}, peak RSS {:.1} MiB (at start {:.1} MiB); tail {} facts in {} chunks (largest {:.1} MiB), blob {:.1} MiB",
                t.elapsed(),
                vm_hwm_kib() as f64 / 1024.0,
                before as f64 / 1024.0,
                r.tail_facts,
                r.tail_chunks,
                r.largest_chunk_bytes as f64 / 1048576.0,
                r.blob_bytes as f64 / 1048576.0
            );
            result_line(t);
        }
        "verify" => {
            let dec = Decryption::identity_file(Path::new(&args[2])).expect("key");
            let r = tend_backup::verify_file(Path::new(&args[1]), &dec, None).expect("verify");
            println!(
                "verify: {:.2?}, peak RSS {:.1} MiB; {} tail facts checked",
                t.elapsed(),
                vm_hwm_kib() as f64 / 1024.0,
                r.tail_facts
            );
            result_line(t);
        }
        "restore" => {
            let dec = Decryption::identity_file(Path::new(&args[2])).expect("key");
            let home = PathBuf::from(&args[3]);
            let r = tend_backup::restore_home(
                Path::new(&args[1]),
                &dec,
                &home,
                // As the CLI does: a new device, then its store with a bounded cache.
                |dir, ns| {
                    let path = Device::init_joining(dir, ns, &mut rand::rngs::OsRng)
                        .map_err(|e| BackupError::Target(e.to_string()))?
                        .store()
                        .path()
                        .to_owned();
                    Ok(Store::open_with(
                        &path,
                        &tend_backup::bounded_store_options(),
                    )?)
                },
                None,
            )
            .expect("restore");
            let size = std::fs::metadata(home.join("store.redb"))
                .map(|m| m.len())
                .unwrap_or(0);
            println!(
                "restore: {:.2?}, peak RSS {:.1} MiB; {} tail facts replayed, restored store {:.1} MiB",
                t.elapsed(),
                vm_hwm_kib() as f64 / 1024.0,
                r.tail_facts,
                size as f64 / 1048576.0
            );
            result_line(t);
        }
        other => panic!("unknown phase {other}"),
    }
}

/// The format of the `i`th fact: `TEND_BENCH_FACT_FORMAT` (1, 2 or 3), else 3, the format a
/// fleet on this release writes; formats 1 and 2 measure a journal written before 1.0.2.
fn fact_format(i: u64) -> FactFormat {
    let time_ms = 1_765_000_000_000 + i;
    match std::env::var("TEND_BENCH_FACT_FORMAT").as_deref() {
        Ok("1") => FactFormat::Untimed,
        Ok("2") => FactFormat::Timed { time_ms },
        _ => FactFormat::TimedZip215 { time_ms },
    }
}

fn add_facts(device: &Device, n: u64, epochs: std::ops::RangeInclusive<u64>) {
    let ns = device.namespace();
    let key = device.key().signing_key();
    let span = epochs.end() - epochs.start() + 1;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        batch.push(
            UnsignedFact {
                namespace: ns,
                epoch: Epoch(epochs.start() + i * span / n.max(1)),
                payload: Payload::Application {
                    kind: "bench".into(),
                    data: format!("fact {i:010} with some application payload").into_bytes(),
                },
            }
            .sign_with(key, fact_format(i)),
        );
        if batch.len() == 10_000 || i + 1 == n {
            let r = device.store().insert_batch(&batch).expect("insert");
            assert!(r.rejected.is_empty());
            batch.clear();
        }
    }
}

/// A snapshot of a one-device authority, whose group key is the device key: the same
/// facts the ceremony writes, without re-reading the journal once per message as the
/// in-process fleet does (which dominates at 1M facts).
fn snapshot_1_of_1(device: &Device, target: Epoch) {
    let ns = device.namespace();
    let view = StoreJournal::new(device.store(), ns);
    let blob = view.try_snapshot_blob(target).expect("blob");
    let bytes = blob.encode();
    let cid = device
        .store()
        .put_blob(tend_core::ids::CODEC_DAG_CBOR, &bytes)
        .expect("blob");
    let proposal_id = Hash32([42; 32]);
    let digest = blob.prefix_digest();
    device
        .write(UnsignedFact {
            namespace: ns,
            epoch: target,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotProposed(SnapshotProposed {
                proposal_id,
                target_epoch: target,
                digest,
            })),
        })
        .expect("proposal");
    let snapshot = SnapshotV1 {
        epoch: target,
        digest,
        blob_cid: cid,
    };
    let sig = device
        .key()
        .signing_key()
        .sign(&snapshot.signing_message(&ns, &proposal_id));
    device
        .write(UnsignedFact {
            namespace: ns,
            epoch: target,
            payload: Payload::Maintenance(MaintenanceFact::SnapshotCompleted(SnapshotCompleted {
                proposal_id,
                snapshot,
                threshold_signature: sig.to_bytes(),
            })),
        })
        .expect("completion");
    let state = device.store().maintenance_state(ns).expect("state");
    assert_eq!(state.snapshot_epoch(), target, "the snapshot verifies");
}
