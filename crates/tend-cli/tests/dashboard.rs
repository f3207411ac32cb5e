//! The fleet dashboard (`GET /` of `tend run --api`) in a real headless Chromium: the
//! page loads without the token while the data needs it; with the token the page shows
//! the device's id, and a value written through the API changes the live-key count
//! without a reload. Two devices of one authority run, rounds an hour apart, so the page
//! shows a peer and the writes reach it by push on write alone. Drives Debian's `/usr/bin/chromium` (or `$CHROMIUM`) with
//! playwright-core, which npm installs into the target directory on first use.
//!
//! Without node, npm, Chromium or the install the test is skipped with a note, unless `CI`
//! is set: then it fails. `TEND_UPDATE_SCREENSHOT=1` writes the screenshot to
//! `docs/dashboard.png` (else into the target directory).

mod api_support;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api_support::Api;
use common::{start_run, terminate, two_device_authority, wait_for_one_digest};

const PLAYWRIGHT: &str = "playwright-core@1.57.0";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// The directory with playwright-core and the driver script, or why there is none.
fn driver_dir() -> Result<PathBuf, String> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed".into());
    }
    if !chromium().exists() {
        return Err(format!(
            "{} is missing (apt-get install chromium)",
            chromium().display()
        ));
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-js");
    let lib = dir.join("node_modules/playwright-core/package.json");
    if !lib.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg(PLAYWRIGHT)
            .status();
        if !status.is_ok_and(|s| s.success()) || !lib.exists() {
            return Err(format!("npm install {PLAYWRIGHT} failed"));
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/drive.mjs");
    std::fs::copy(&src, dir.join("drive.mjs")).map_err(|e| format!("{}: {e}", src.display()))?;
    Ok(dir)
}

/// A request without any token: the status line and the body.
fn anonymous_get(api: &Api, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(api.addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        api.addr
    )
    .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[test]
fn the_dashboard_shows_the_device_and_updates_live_in_a_real_browser() {
    let dir = match driver_dir() {
        Ok(d) => d,
        Err(why) if in_ci() => panic!("the dashboard browser test cannot run under CI: {why}"),
        Err(why) => {
            eprintln!("note: skipping the dashboard browser test: {why}");
            return;
        }
    };
    let homes = tempfile::tempdir().unwrap();
    let (home, b) = two_device_authority(homes.path());
    let (run_b, info_b) = start_run(&b, &["--listen", "127.0.0.1:0", "--sync-interval", "3600"]);
    let peer = format!(
        "{}@{}",
        info_b["device_id"].as_str().expect("device_id"),
        info_b["listen_addr"].as_str().expect("listen_addr")
    );
    let (run, info) = start_run(
        &home,
        &[
            "--api",
            "127.0.0.1:0",
            "--peer",
            &peer,
            "--sync-interval",
            "3600",
        ],
    );
    let api = Api::of(&home, &info);
    let device_id = info["device_id"].as_str().expect("device_id").to_owned();

    // The page and its assets need no token and carry no data; the data does.
    let (status, page) = anonymous_get(&api, "/");
    assert!(status.contains(" 200 "), "{status}");
    assert!(page.contains("/dashboard.js"), "{page}");
    assert!(!page.contains(&device_id));
    assert!(anonymous_get(&api, "/dashboard.js").0.contains(" 200 "));
    assert!(anonymous_get(&api, "/v1/status").0.contains(" 401 "));
    let status = api.call("GET", "/v1/status", b"").json();
    assert_eq!(status["device_id"], device_id.as_str());
    assert_eq!(status["app"]["live_keys"], 0);

    let screenshot = if std::env::var_os("TEND_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png")
    } else {
        dir.join("dashboard.png")
    };
    let out = Command::new("node")
        .arg(dir.join("drive.mjs"))
        .arg(format!("http://{}", api.addr))
        .arg(&api.token)
        .arg(&device_id)
        .arg(&screenshot)
        .arg(chromium())
        .current_dir(&dir)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "the browser driver failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the driver printed {stdout:?}: {e}"));
    assert_eq!(seen["device_id"], device_id.as_str(), "{seen}");
    assert_eq!(seen["live_keys_before"], "0", "{seen}");
    assert_eq!(seen["live_keys_after"], "1", "{seen}");
    assert_eq!(seen["not_reloaded"], true, "{seen}");
    assert!(seen["change_rows"].as_u64() >= Some(1), "{seen}");
    assert!(
        !seen["url_after_load"]
            .as_str()
            .unwrap_or("")
            .contains("token"),
        "the token stays in the address bar: {seen}"
    );
    assert_eq!(seen["page_errors"], serde_json::json!([]), "{seen}");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000));
    // What the page showed is what the device holds.
    let status = api.call("GET", "/v1/status", b"").json();
    assert_eq!(status["app"]["live_keys"], 4);
    assert_eq!(
        status["authority"]["members"].as_array().map(Vec::len),
        Some(2)
    );
    // The writes reached the peer within seconds though rounds are an hour apart.
    wait_for_one_digest(&[&home, &b], Duration::from_secs(10));
    terminate(run);
    terminate(run_b);
}
