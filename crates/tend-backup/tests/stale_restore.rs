//! A restore that was killed leaves its temporary directory `.NAME.restore-PID-N` (a fresh
//! device key and part of a store) beside the target home. The next restore into the same
//! home removes such directories whose process is gone, and nothing else.
//!
//! Linux only: elsewhere there is no `/proc` to tell a dead PID from a live one, and
//! `remove_stale_restores` removes nothing.
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::process::{Child, Command};

use common::*;
use tend_backup::{export_file, remove_stale_restores, ExportOptions};
use tend_core::JournalNamespace;
use tend_node::Device;

/// The PID of a child process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} was reused"
    );
    pid
}

/// A live child process, killed when dropped.
struct Live(Child);

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a restore killed after it made its device: a new key and a store, nothing else.
fn debris(root: &Path, name: &str, ns: JournalNamespace) {
    Device::init_joining(&root.join(name), ns, &mut rng()).unwrap();
}

fn names(root: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn the_next_restore_removes_what_a_killed_restore_left_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let d = device(root, "source");
    add_facts(&d, 20, 1..=2, "x");
    let (enc, dec) = x25519();
    let archive = root.join("b.age");
    export_file(
        d.store(),
        d.namespace(),
        &archive,
        &ExportOptions::new(&enc),
    )
    .unwrap();
    let ns = d.namespace();
    drop(d);

    let dead = dead_pid();
    let live = Live(Command::new("sleep").arg("600").spawn().unwrap());
    let alive = live.0.id();
    // Left by killed restores into `target`: removed.
    let stale = [
        format!(".target.restore-{dead}-0"),
        format!(".target.restore-{dead}-17"),
    ];
    for name in &stale {
        debris(root, name, ns);
    }
    // Everything else stays: a restore still running, other homes' debris, names that do
    // not match exactly, a file and a symbolic link with a matching name.
    let kept_dirs = [
        format!(".target.restore-{alive}-0"),
        format!(".other.restore-{dead}-0"),
        format!(".target.restore-{dead}-0x"),
        format!(".target.restore-{dead}"),
        format!(".target.restore-{dead}-"),
        ".target.restore--0".to_string(),
        format!("target.restore-{dead}-0"),
        format!(".target.partial-{dead}-0"),
        format!(".target.restore-{dead}-1.restore-{dead}-0"),
    ];
    for name in &kept_dirs {
        debris(root, name, ns);
    }
    std::fs::write(root.join(format!(".target.restore-{dead}-2")), b"a file").unwrap();
    std::fs::create_dir(root.join("linked")).unwrap();
    std::fs::write(root.join("linked/keep"), b"mine").unwrap();
    std::os::unix::fs::symlink(
        root.join("linked"),
        root.join(format!(".target.restore-{dead}-3")),
    )
    .unwrap();
    let before = names(root);

    restore(&archive, &dec, &root.join("target")).unwrap();
    assert!(Device::open(&root.join("target")).is_ok());

    let mut expected: Vec<_> = before
        .into_iter()
        .filter(|n| !stale.contains(n))
        .chain(["target".to_string()])
        .collect();
    expected.sort();
    assert_eq!(names(root), expected);
    for name in &kept_dirs {
        assert!(
            root.join(name).join("device.key").exists(),
            "{name} lost its contents"
        );
    }
    assert_eq!(std::fs::read(root.join("linked/keep")).unwrap(), b"mine");

    // Once the running one has gone too, its directory is stale as well (the same rule
    // `tend init` and `tend run` apply to their home).
    drop(live);
    let removed = remove_stale_restores(&root.join("target"));
    assert_eq!(
        removed,
        vec![root.join(format!(".target.restore-{alive}-0"))]
    );
    assert!(remove_stale_restores(&root.join("target")).is_empty());
    assert!(remove_stale_restores(&root.join("no/such/dir/home")).is_empty());
}
