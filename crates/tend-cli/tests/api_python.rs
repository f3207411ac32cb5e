//! The Python example client (`examples/api_client.py`, standard library only) against a
//! real `tend run --api`: put, get, and following the changes feed live. Skipped with a
//! note when python3 is missing, unless `CI` is set: then it fails.

mod api_support;
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use api_support::Api;
use common::{ok_json, start_run, terminate};

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/api_client.py")
}

fn has_python() -> bool {
    let found = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is required under CI to run examples/api_client.py"
        );
        eprintln!("note: python3 not found; skipping the Python API client test");
    }
    found
}

fn client(url: &str, home: &Path) -> Command {
    let mut c = Command::new("python3");
    c.arg(client_script())
        .args(["--url", url, "--home"])
        .arg(home)
        .env_remove("TEND_API_URL")
        .env_remove("TEND_API_TOKEN");
    c
}

fn ok(out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn the_python_client_puts_gets_and_follows_the_changes() {
    if !has_python() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let (run, info) = start_run(&home, &["--api", "127.0.0.1:0"]);
    let api = Api::of(&home, &info);
    let url = format!("http://{}", api.addr);

    // put and get through the client; the value is read back as the same bytes.
    let written = ok(client(&url, &home)
        .args(["put", "todo", "milk", "2 litres"])
        .output()
        .unwrap());
    let written: serde_json::Value = serde_json::from_slice(&written).unwrap();
    assert_eq!(written["id"].as_str().unwrap().len(), 64);
    let got = ok(client(&url, &home)
        .args(["get", "todo", "milk"])
        .output()
        .unwrap());
    assert_eq!(got, b"2 litres");
    // Bytes from stdin, read back over HTTP.
    let mut put = client(&url, &home)
        .args(["put", "todo", "bin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes: Vec<u8> = (0..=255u8).collect();
    std::io::Write::write_all(&mut put.stdin.take().unwrap(), &bytes).unwrap();
    ok(put.wait_with_output().unwrap());
    assert_eq!(api.call("GET", "/v1/kv/todo/bin", b"").body, bytes);
    // An absent key: a message and exit 1.
    let absent = client(&url, &home)
        .args(["get", "todo", "nothing"])
        .output()
        .unwrap();
    assert_eq!(absent.status.code(), Some(1));

    // follow: subscribed from now, it prints the put made afterwards.
    let mut follow = client(&url, &home)
        .args(["follow", "--since", "now", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = follow.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let opened = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the client says it follows");
    assert!(opened.starts_with("following changes"), "{opened}");
    assert_eq!(api.call("PUT", "/v1/kv/todo/eggs", b"12").status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the client did not see the put");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = follow.wait_with_output().unwrap();
    assert!(status.success(), "{status}");
    let line = String::from_utf8(out.stdout).unwrap();
    let change: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(change["op"], "put");
    assert_eq!(change["key"], "eggs");
    assert_eq!(change["value"], "MTI=");

    // follow from the start replays what came before, in order.
    let all = ok(client(&url, &home)
        .args(["follow", "--count", "4"])
        .output()
        .unwrap());
    let cursors: Vec<u64> = String::from_utf8(all)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["cursor"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(cursors, [1, 2, 3, 4]);
    terminate(run);
    eprintln!("python client test: {:?}", t0.elapsed());
}
