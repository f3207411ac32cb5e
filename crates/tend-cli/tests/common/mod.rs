//! Helpers shared by the CLI tests: run the real `tend` binary against a home, read its
//! `--json` output, and start and stop `tend run` processes.

// Each test binary uses only some of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `tend --home HOME ARGS...`, with `TEND_HOME` unset.
pub fn tend(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs")
}

/// `tend --json --home HOME ARGS...`, which must succeed; its JSON output.
pub fn ok_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = tend(home, &all);
    assert!(
        out.status.success(),
        "tend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// `tend --home HOME ARGS...`, which must fail; its stderr.
pub fn fails(home: &Path, args: &[&str]) -> String {
    let out = tend(home, args);
    assert!(!out.status.success(), "tend {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Like [`fails`], and the error is one line.
pub fn fails_in_one_line(home: &Path, args: &[&str]) -> String {
    let err = fails(home, args);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    err
}

/// Starts `tend --json --home HOME run RUN_ARGS...` and returns it with its start line.
pub fn start_run(home: &Path, run_args: &[&str]) -> (Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args(["--json", "run"])
        .args(run_args)
        .env_remove("TEND_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tend run starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("start line");
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("tend run printed {line:?}: {e}"));
    (child, info)
}

/// Sends SIGTERM and waits (at most 10 s) for a clean exit.
pub fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "tend exited with {s}");
            return;
        }
        assert!(Instant::now() < deadline, "tend did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The journal digest of namespace `ns` in `home` (through a running device's socket, or
/// the store), or `None` if the command fails or the journal is unknown there.
pub fn journal_digest(home: &Path, ns: &str) -> Option<String> {
    let out = tend(home, &["--json", "journal", "status"]);
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["namespace"] == ns)
        .and_then(|n| n["digest"].as_str())
        .map(str::to_string)
}

/// The digest of the journal `home` currently writes to, or `None` if unknown there.
pub fn current_digest(home: &Path) -> Option<String> {
    let status = ok_json(home, &["journal", "status"]);
    journal_digest(home, status["current_namespace"].as_str()?)
}

/// Waits (at most `timeout`) until every home shows the same current journal digest.
pub fn wait_for_one_digest(homes: &[&Path], timeout: Duration) {
    let start = Instant::now();
    loop {
        let digests: Vec<Option<String>> = homes.iter().map(|h| current_digest(h)).collect();
        if digests[0].is_some() && digests.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(start.elapsed() < timeout, "no convergence: {digests:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `home`'s peer list has the device of a `tend run` start line (`other`) at the
/// address it listens on.
pub fn knows_address(home: &Path, other: &serde_json::Value) -> bool {
    ok_json(home, &["peers"]).as_array().is_some_and(|peers| {
        peers
            .iter()
            .any(|p| p["device_id"] == other["device_id"] && p["addr"] == other["listen_addr"])
    })
}

/// Runs `a` and `b` with `run_args` and no peer given, adds facts on both, and waits until
/// they converge and each has learned the other's address (from discovery: a peer that
/// only dialled in shows no address).
pub fn discover_each_other_and_converge(a: &Path, b: &Path, run_args: &[&str]) {
    let (ra, ia) = start_run(a, run_args);
    let (rb, ib) = start_run(b, run_args);
    for i in 0..5 {
        for (home, name) in [(a, "a"), (b, "b")] {
            ok_json(
                home,
                &[
                    "fact",
                    "add",
                    "--kind",
                    "note",
                    "--data",
                    &format!("{name}{i}"),
                ],
            );
        }
    }
    wait_for_one_digest(&[a, b], Duration::from_secs(30));
    wait_until(
        "the devices learn each other's addresses",
        Duration::from_secs(15),
        || knows_address(a, &ib) && knows_address(b, &ia),
    );
    terminate(ra);
    terminate(rb);
}

/// `backup VERB --out PATH` (export) or `backup VERB --in PATH` (verify, restore), then
/// one key option: `backup_args("verify", &archive, "--identity", id)`.
pub fn backup_args<'a>(
    verb: &'a str,
    path: &'a Path,
    key_option: &'a str,
    key: &'a str,
) -> [&'a str; 6] {
    let io = if verb == "export" { "--out" } else { "--in" };
    let path = path.to_str().expect("test paths are UTF-8");
    ["backup", verb, io, path, key_option, key]
}

/// Two fresh homes `a` and `b` under `dir` made into a 2-of-2 authority (key generation
/// among the stopped homes).
pub fn two_device_authority(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.join("a"), dir.join("b"));
    ok_json(&a, &["init"]);
    ok_json(&b, &["init"]);
    let member = b.to_str().expect("utf-8 temp path");
    ok_json(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "2",
            "--member-home",
            member,
        ],
    );
    (a, b)
}

/// Polls `f` every 200 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /metrics` of a running device (`tend run --metrics ADDR`).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
