//! End-to-end: a real `tend rendezvous` process and `tend run --rendezvous` devices that
//! know nothing else of each other find each other and converge, all on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tend(home: Option<&Path>, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tend"));
    if let Some(h) = home {
        c.arg("--home").arg(h);
    }
    c.args(args).env_remove("TEND_HOME");
    c
}

fn ok_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out: Output = tend(Some(home), &all).output().expect("tend runs");
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
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

/// Stops a child with SIGTERM; it must exit cleanly.
fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "exited with {s}");
            return;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn digest(home: &Path) -> String {
    let s = ok_json(home, &["journal", "status"]);
    s["namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["namespace"] == s["current_namespace"]))
        .map(|n| n["digest"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn devices_that_know_only_a_rendezvous_service_find_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok_json(&a, &["init"]);
    ok_json(&b, &["init"]);
    ok_json(
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
    let (server, info) = spawn(tend(
        None,
        &["--json", "rendezvous", "--listen", "127.0.0.1:0"],
    ));
    let addr = info["listen_addr"].as_str().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let run = |home: &Path| {
        spawn(tend(
            Some(home),
            &[
                "--json",
                "run",
                "--listen",
                "127.0.0.1:0",
                "--sync-interval",
                "0.3",
                "--rendezvous",
                &addr,
            ],
        ))
    };
    let (ra, ia) = run(&a);
    let (rb, ib) = run(&b);
    for i in 0..5 {
        ok_json(
            &a,
            &["fact", "add", "--kind", "note", "--data", &format!("a{i}")],
        );
        ok_json(
            &b,
            &["fact", "add", "--kind", "note", "--data", &format!("b{i}")],
        );
    }
    let start = Instant::now();
    loop {
        let (da, db) = (digest(&a), digest(&b));
        if !da.is_empty() && da == db {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no convergence: {da} vs {db}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each learns the other's address from the service (none was given); a peer that
    // only dialled in has no address, so wait for the lookup itself.
    let knows = |home: &Path, other: &serde_json::Value| {
        ok_json(home, &["peers"]).as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["device_id"] == other["device_id"] && p["addr"] == other["listen_addr"])
        })
    };
    let start = Instant::now();
    while !(knows(&a, &ib) && knows(&b, &ia)) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the devices never learned each other's addresses"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    terminate(ra);
    terminate(rb);
    terminate(server);
}

#[test]
fn a_bad_rendezvous_address_is_one_line_of_error() {
    let out = tend(None, &["rendezvous", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    ok_json(dir.path(), &["init"]);
    let out = tend(Some(dir.path()), &["run", "--rendezvous", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rendezvous"), "{err}");
}
