//! The local HTTP API of `tend run --api`, against real processes: values as bytes, the
//! token, errors, and the changes feed (live, from peers, resumed after a restart).

mod api_support;
mod common;

use std::time::{Duration, Instant};

use api_support::{request, Api};
use common::{fails_in_one_line, ok_json, start_run, tend, terminate, two_device_authority};

const WAIT: Duration = Duration::from_secs(20);

fn b64(bytes: &[u8]) -> String {
    // The standard alphabet with padding, as the API writes it.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn start_api(
    home: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, Api, serde_json::Value) {
    let mut args = vec!["--api", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (child, info) = start_run(home, &args);
    let api = Api::of(home, &info);
    (child, api, info)
}

#[test]
fn values_round_trip_as_bytes_and_bad_requests_touch_nothing() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let (run, api, info) = start_api(&home, &[]);

    // The token file is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.join("api.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(api.token.len(), 64);

    // Without the token, or with a wrong one: 401, and nothing is written.
    let all_bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let r = request(api.addr, "PUT", "/v1/kv/todo/k1", &[], &all_bytes);
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.error().contains("Authorization"), "{}", r.error());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let wrong = format!("Bearer {}", "0".repeat(64));
    let r = request(
        api.addr,
        "PUT",
        "/v1/kv/todo/k1",
        &[("Authorization", &wrong)],
        &all_bytes,
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        request(
            api.addr,
            "GET",
            "/v1/status",
            &[("Authorization", "Basic eDp5")],
            b""
        )
        .status,
        401
    );
    assert_eq!(api.call("GET", "/v1/kv/todo/k1", b"").status, 404);
    let status = api.call("GET", "/v1/status", b"");
    assert_eq!(status.status, 200);
    let status = status.json();
    assert_eq!(status["device_id"], info["device_id"]);
    let cursor_before = status["changes_cursor"].as_u64().unwrap();

    // Put, get: every byte value, as octet-stream, with its version.
    let put = api.call_with(
        "PUT",
        "/v1/kv/todo/k1",
        &[("Content-Type", "application/octet-stream")],
        &all_bytes,
    );
    assert_eq!(put.status, 200, "{:?}", String::from_utf8_lossy(&put.body));
    let written = put.json();
    let id = written["id"].as_str().unwrap().to_owned();
    let got = api.call("GET", "/v1/kv/todo/k1", b"");
    assert_eq!(got.status, 200);
    assert_eq!(got.body, all_bytes);
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("etag"), Some(format!("\"{id}\"").as_str()));
    assert_eq!(got.header("x-tend-author"), info["device_id"].as_str());
    assert_eq!(got.header("x-tend-conflicts"), Some("0"));
    // The empty value is a value.
    assert_eq!(api.call("PUT", "/v1/kv/todo/empty", b"").status, 200);
    let got = api.call("GET", "/v1/kv/todo/empty", b"");
    assert_eq!((got.status, got.body.len()), (200, 0));
    // A key may hold `/`, spelled or percent-encoded; names may be any printable text.
    assert_eq!(api.call("PUT", "/v1/kv/todo/a/b", b"slash").status, 200);
    assert_eq!(api.call("GET", "/v1/kv/todo/a%2Fb", b"").body, b"slash");
    assert_eq!(
        api.call("PUT", "/v1/kv/t%C3%A2ches/cl%C3%A9%20un", b"x")
            .status,
        200
    );
    // The CLI sees what the API wrote (through the running device's socket).
    let listed = ok_json(&home, &["journal", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == id.as_str() && f["kind"] == "put:todo"),
        "{listed}"
    );

    // Scans: JSON, values in base64, paged.
    let page = api.call("GET", "/v1/kv/todo?limit=2", b"").json();
    let keys: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a/b", "empty"]);
    assert_eq!(page["next_after"], "empty");
    let page = api
        .call("GET", "/v1/kv/todo?after=empty&limit=2", b"")
        .json();
    assert_eq!(page["entries"][0]["key"], "k1");
    assert_eq!(page["entries"][0]["value"], b64(&all_bytes));
    assert!(page.get("next_after").is_none());
    let page = api.call("GET", "/v1/kv/todo?prefix=a", b"").json();
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);

    // If-Match: a write from an out-of-date version is refused with 409.
    let stale = format!("\"{}\"", "ab".repeat(32));
    let r = api.call_with("PUT", "/v1/kv/todo/k1", &[("If-Match", &stale)], b"late");
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains(&id), "{}", r.error());
    let current = format!("\"{id}\"");
    let r = api.call_with("PUT", "/v1/kv/todo/k1", &[("If-Match", &current)], b"v2");
    assert_eq!(r.status, 200);
    assert_eq!(api.call("GET", "/v1/kv/todo/k1", b"").body, b"v2");

    // Delete: then absent (404), and a second delete is 404 too.
    assert_eq!(api.call("DELETE", "/v1/kv/todo/k1", b"").status, 200);
    let r = api.call("GET", "/v1/kv/todo/k1", b"");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("absent"), "{}", r.error());
    assert_eq!(api.call("DELETE", "/v1/kv/todo/k1", b"").status, 404);

    // Logs: append answers the cursor; read pages after it.
    let mut cursors = Vec::new();
    for entry in [&b"first"[..], &[0, 159, 146, 150][..], b"third"] {
        let r = api.call("POST", "/v1/logs/events", entry);
        assert_eq!(r.status, 201, "{r:?}");
        cursors.push(r.json()["cursor"].as_str().unwrap().to_owned());
    }
    let page = api.call("GET", "/v1/logs/events?limit=2", b"").json();
    let entries = page["entries"].as_array().unwrap();
    let mut sorted = cursors.clone();
    sorted.sort_by_key(|c| {
        let (e, id) = c.split_once('-').unwrap();
        (e.parse::<u64>().unwrap(), id.to_owned())
    });
    assert_eq!(entries[0]["cursor"], sorted[0]);
    assert_eq!(page["next_after"], sorted[1]);
    let rest = api
        .call("GET", &format!("/v1/logs/events?after={}", sorted[1]), b"")
        .json();
    assert_eq!(rest["entries"][0]["cursor"], sorted[2]);

    // Bad input: 400 with a JSON error, and nothing written.
    let facts_before = api.call("GET", "/v1/status", b"").json()["changes_cursor"].clone();
    let long_key = "k".repeat(1025);
    for (method, path, body) in [
        ("PUT", "/v1/kv/bad%01name/k", &b"x"[..]),
        ("PUT", "/v1/kv/todo/bad%0Akey", b"x"),
        ("PUT", &format!("/v1/kv/todo/{long_key}")[..], b"x"),
        ("GET", "/v1/kv/todo?limit=0", b""),
        ("GET", "/v1/kv/todo?limit=many", b""),
        ("GET", "/v1/logs/events?after=not-a-cursor", b""),
        ("POST", "/v1/logs/bad%7Fname", b"x"),
        ("PUT", "/v1/kv/todo/%FF", b"x"),
    ] {
        let r = api.call(method, path, body);
        assert_eq!(r.status, 400, "{method} {path}: {r:?}");
        assert!(!r.error().is_empty());
    }
    let r = api.call_with("GET", "/v1/changes?since=yesterday", &[], b"");
    assert_eq!(r.status, 400);
    // Too large: a log entry is one fact (413), read no further.
    let big = vec![7u8; 70 * 1024];
    let r = api.call("POST", "/v1/logs/events", &big);
    assert_eq!(r.status, 413, "{r:?}");
    assert!(!r.error().is_empty());
    // Unknown endpoints and methods.
    assert_eq!(api.call("GET", "/v1/nothing", b"").status, 404);
    assert_eq!(api.call("POST", "/v1/kv/todo/k1", b"").status, 405);
    assert_eq!(
        api.call("GET", "/v1/status", b"").json()["changes_cursor"],
        facts_before
    );
    assert!(facts_before.as_u64().unwrap() > cursor_before);

    // A second device cannot take the same port: `tend run` fails at once, in one line.
    let other = dir.path().join("b");
    ok_json(&other, &["init"]);
    let taken = api.addr.to_string();
    let err = fails_in_one_line(&other, &["run", "--api", &taken]);
    assert!(err.contains("cannot serve the HTTP API"), "{err}");

    terminate(run);
    // The token stays across restarts.
    let (run, again, _) = start_api(&home, &[]);
    assert_eq!(again.token, api.token);
    assert_eq!(again.call("GET", "/v1/kv/todo/a/b", b"").body, b"slash");
    terminate(run);
    eprintln!("values test: {:?}", t0.elapsed());
}

#[test]
fn the_changes_feed_is_live_and_resumes_after_a_restart() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let (run, api, _) = start_api(&home, &[]);

    // From the start: what `init` and the node wrote (authority genesis, metadata).
    let mut feed = api.changes("/v1/changes?since=0", &[]);
    assert_eq!(feed.status, 200);
    assert!(feed
        .headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream")));
    let first = feed.take(1, WAIT);
    assert_eq!(first[0].id.as_deref(), Some("1"));
    assert_eq!(first[0].json()["kind"], "authority-genesis");

    // Subscribed from now: a put made afterwards arrives, with its cursor as the id.
    let mut live = api.changes("/v1/changes?since=now", &[]);
    assert_eq!(live.status, 200);
    assert!(live.next_event(Duration::from_millis(300)).is_none());
    let put = api.call("PUT", "/v1/kv/todo/milk", &[1, 2, 0, 255]).json();
    let ev = live.take(1, WAIT).remove(0);
    assert_eq!(ev.event.as_deref(), Some("change"));
    let data = ev.json();
    assert_eq!(ev.id.as_deref().unwrap(), data["cursor"].to_string());
    assert_eq!(data["op"], "put");
    assert_eq!(data["collection"], "todo");
    assert_eq!(data["key"], "milk");
    assert_eq!(data["value"], b64(&[1, 2, 0, 255]));
    assert_eq!(data["id"], put["id"]);
    assert_eq!(api.call("DELETE", "/v1/kv/todo/milk", b"").status, 200);
    let ev = live.take(1, WAIT).remove(0).json();
    assert_eq!(
        (ev["op"].as_str(), ev["key"].as_str()),
        (Some("delete"), Some("milk"))
    );
    // A write through the CLI (the control socket) is in the feed too.
    let added = tend(
        &home,
        &["fact", "add", "--kind", "events", "--data", "bought"],
    );
    assert!(added.status.success());
    let ev = live.take(1, WAIT).remove(0).json();
    assert_eq!(ev["op"], "log_append");
    assert_eq!(ev["log"], "events");
    assert_eq!(ev["data"], b64(b"bought"));
    let seen: u64 = ev["cursor"].as_u64().unwrap();
    // A client that stops here remembers `seen`.
    drop(live);
    drop(feed);

    // The device stops; writes land while it is down (the CLI opens the store), it
    // restarts (its API port changes), and the client resumes with Last-Event-ID.
    terminate(run);
    for data in ["eggs", "bread"] {
        let added = tend(&home, &["fact", "add", "--kind", "events", "--data", data]);
        assert!(added.status.success());
    }
    let (run, api, _) = start_api(&home, &[]);
    let last = seen.to_string();
    // `since` is ignored when Last-Event-ID is given (a reconnecting EventSource sends both).
    let mut resumed = api.changes("/v1/changes?since=0", &[("Last-Event-ID", &last)]);
    assert_eq!(resumed.status, 200);
    let mut ops = Vec::new();
    let mut cursors = Vec::new();
    // Skip what the restarted node wrote itself (its device metadata, if it changed).
    while ops.len() < 2 {
        let ev = resumed
            .next_event(WAIT)
            .expect("the writes made while the device was down");
        let d = ev.json();
        cursors.push(d["cursor"].as_u64().unwrap());
        if d["op"] != "other" {
            ops.push((d["op"].as_str().unwrap().to_owned(), d["data"].clone()));
        }
    }
    // Within one epoch, facts a stopped device wrote are listed in (epoch, id) order.
    ops.sort_by_key(|(_, d)| d.to_string());
    assert_eq!(
        ops,
        vec![
            ("log_append".to_owned(), serde_json::json!(b64(b"bread"))),
            ("log_append".to_owned(), serde_json::json!(b64(b"eggs"))),
        ]
    );
    assert_eq!(cursors[0], seen + 1, "nothing skipped, nothing repeated");
    assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1));
    // And it goes on live.
    api.call("PUT", "/v1/kv/todo/bread", b"1");
    let ev = loop {
        let ev = resumed.take(1, WAIT).remove(0).json();
        if ev["op"] != "other" {
            break ev;
        }
    };
    assert_eq!(ev["key"], "bread");
    // A bad Last-Event-ID is refused.
    let bad = api.changes("/v1/changes", &[("Last-Event-ID", "x")]);
    assert_eq!(bad.status, 400);
    // So is a feed without the token.
    let r = request(api.addr, "GET", "/v1/changes", &[], b"");
    assert_eq!(r.status, 401);
    drop(resumed);
    terminate(run);
    eprintln!("feed test: {:?}", t0.elapsed());
}

#[test]
fn the_feed_carries_what_sync_brings_from_a_peer() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_device_authority(dir.path());
    let (ra, ia) = start_run(&a, &["--listen", "127.0.0.1:0", "--sync-interval", "3600"]);
    let peer = format!(
        "{}@{}",
        ia["device_id"].as_str().unwrap(),
        ia["listen_addr"].as_str().unwrap()
    );
    let (rb, api_b, _) = start_api(&b, &["--peer", &peer, "--sync-interval", "3600"]);
    let mut feed = api_b.changes("/v1/changes?since=now", &[]);
    assert_eq!(feed.status, 200);
    let added = tend(
        &a,
        &["fact", "add", "--kind", "shared", "--data", "hello b"],
    );
    assert!(added.status.success());
    assert!(tend(&b, &["sync", "now"]).status.success());
    let ev = loop {
        let ev = feed
            .next_event(WAIT)
            .expect("a's entry reaches b's feed")
            .json();
        if ev["op"] == "log_append" {
            break ev;
        }
    };
    assert_eq!(ev["log"], "shared");
    assert_eq!(ev["author"], ia["device_id"]);
    assert_eq!(ev["data"], b64(b"hello b"));
    let log = api_b.call("GET", "/v1/logs/shared", b"").json();
    assert_eq!(log["entries"][0]["data"], b64(b"hello b"));
    drop(feed);
    terminate(rb);
    terminate(ra);
    eprintln!("peer test: {:?}", t0.elapsed());
}
