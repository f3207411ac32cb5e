//! End-to-end: a real `tend rendezvous` process and `tend run --rendezvous` devices that
//! know nothing else of each other find each other and converge, all on 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{discover_each_other_and_converge, fails, ok_json, terminate, two_device_authority};

/// `tend ARGS...` for the commands that need no home (`tend rendezvous`).
fn tend_without_home(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tend"));
    c.args(args).env_remove("TEND_HOME");
    c
}

/// Spawns a long-running command and returns it with its first stdout line as JSON.
fn spawn(mut cmd: Command) -> (Child, serde_json::Value) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("start line");
    let info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (child, info)
}

#[test]
fn devices_that_know_only_a_rendezvous_service_find_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_device_authority(dir.path());
    let (server, info) = spawn(tend_without_home(&[
        "--json",
        "rendezvous",
        "--listen",
        "127.0.0.1:0",
    ]));
    let addr = info["listen_addr"].as_str().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    discover_each_other_and_converge(
        &a,
        &b,
        &[
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "0.3",
            "--rendezvous",
            &addr,
        ],
    );
    terminate(server);
}

#[test]
fn a_bad_rendezvous_address_is_one_line_of_error() {
    let out = tend_without_home(&["rendezvous", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    ok_json(dir.path(), &["init"]);
    let err = fails(dir.path(), &["run", "--rendezvous", "nowhere"]);
    assert!(err.contains("rendezvous"), "{err}");
}
