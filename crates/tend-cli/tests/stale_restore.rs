//! `tend init`, `tend run` and `tend backup restore` first remove the `.NAME.restore-PID-N`
//! directories that killed restores into their home left beside it (PID no longer a
//! process), and nothing else. The rule itself is tested in
//! `tend-backup/tests/stale_restore.rs`; here, that the commands apply it.
//!
//! Linux only: elsewhere there is no `/proc` to tell a dead PID from a live one.
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

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

/// A directory like the one a killed restore leaves: a key file and part of a store.
fn debris(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("device.key"), [7u8; 32]).unwrap();
    std::fs::write(dir.join("store.redb"), b"partial").unwrap();
    dir
}

#[test]
fn init_run_and_restore_remove_what_killed_restores_left() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let home = root.join("h");
    let kept = [
        debris(root, &format!(".h.restore-{}-0.bak", dead_pid())),
        debris(root, &format!(".other.restore-{}-0", dead_pid())),
        debris(root, &format!(".h.restore-{}-0", std::process::id())),
    ];

    let stale = debris(root, &format!(".h.restore-{}-0", dead_pid()));
    let out = tend(&home, &["init"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stale.exists(), "tend init left {}", stale.display());
    assert!(
        stderr.contains(&format!("removed {}", stale.display())),
        "{stderr}"
    );

    let stale = debris(root, &format!(".h.restore-{}-3", dead_pid()));
    let (child, _) = start_run(&home, &["--sync-interval", "3600"]);
    assert!(!stale.exists(), "tend run left {}", stale.display());
    terminate(child);

    // `tend backup restore` into a new home beside them (a passphrase archive of `h`).
    let pass = root.join("pass.txt");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let archive = root.join("h.age");
    let pass = pass.to_str().unwrap();
    ok_json(
        &home,
        &backup_args("export", &archive, "--passphrase-file", pass),
    );
    let new_home = root.join("r");
    let stale = debris(root, &format!(".r.restore-{}-0", dead_pid()));
    let out = tend(
        &new_home,
        &backup_args("restore", &archive, "--passphrase-file", pass),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stale.exists(),
        "tend backup restore left {}",
        stale.display()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("removed {}", stale.display())));

    for d in &kept {
        assert!(d.join("device.key").exists(), "{} was touched", d.display());
    }
}
