//! Bulk import through the real binary: `tend log append LOG --ndjson` and `tend put
//! COLLECTION --ndjson` write a few thousand lines in batches on a stopped device and
//! through a running device's socket, from a file or stdin; a bad line is refused with its
//! number, nothing of its batch is written and the batches before it stay written.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{fails_in_one_line, ok_json, start_run, tend, terminate};

fn facts_in_index(home: &Path) -> u64 {
    let s = ok_json(home, &["journal", "status"]);
    s["namespaces"][0]["facts"].as_u64().expect("a fact count")
}

/// Every entry of a log, in order (pages of 10,000; the text output is `cursor\tentry`).
fn log_entries(home: &Path, log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["log", "read", log, "--limit", "10000"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let page = tend(home, &args);
        assert!(page.status.success());
        let page = String::from_utf8(page.stdout).unwrap();
        if page.trim().is_empty() {
            return out;
        }
        for line in page.lines() {
            let (cursor, entry) = line.split_once('\t').expect("cursor and entry");
            after = Some(cursor.to_owned());
            out.push(entry.to_owned());
        }
    }
}

fn get(home: &Path, collection: &str, key: &str) -> Vec<u8> {
    let out = tend(home, &["get", collection, key]);
    assert!(out.status.success(), "{collection}/{key} is present");
    out.stdout
}

/// Appends from a file, then puts from stdin (text and base64 values; a key given twice
/// reads as its later line), both across several batches: every line is written, in order.
fn import_and_check(home: &Path, dir: &Path, tag: &str) {
    const LINES: usize = 3_000;
    let file = dir.join(format!("{tag}-log.ndjson"));
    let mut text = String::new();
    for i in 0..LINES {
        if i == 10 {
            text.push('\n'); // blank lines are skipped
        }
        if i % 3 == 0 {
            // base64 of "x"
            text.push_str("{\"data_b64\": \"eA==\"}\n");
        } else {
            text.push_str(&format!("{{\"data\": \"{tag}-{i}\"}}\n"));
        }
    }
    std::fs::write(&file, text).unwrap();
    let r = ok_json(
        home,
        &[
            "log",
            "append",
            tag,
            "--ndjson",
            file.to_str().unwrap(),
            "--batch-size",
            "1000",
        ],
    );
    assert_eq!(r["written"], LINES as u64, "{r}");
    assert_eq!(r["batches"], 3, "{r}");
    assert!(r["last"]["cursor"].is_string(), "{r}");
    let expected: Vec<String> = (0..LINES)
        .map(|i| match i % 3 {
            0 => "x".to_string(),
            _ => format!("{tag}-{i}"),
        })
        .collect();
    assert_eq!(log_entries(home, tag), expected);

    let mut puts = String::new();
    for i in 0..LINES {
        puts.push_str(&format!("{{\"key\": \"k{i}\", \"value\": \"v{i}\"}}\n"));
    }
    // Bytes that are not UTF-8, and a later line overwriting an earlier one.
    // base64 of 00 ff fe 0a
    puts.push_str("{\"key\": \"bin\", \"value_b64\": \"AP/+Cg==\"}\n");
    puts.push_str("{\"key\": \"k7\", \"value\": \"again\"}\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args(["--json", "put", tag, "--ndjson", "-"])
        .env_remove("TEND_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(puts.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["written"], LINES as u64 + 2, "{r}");
    assert_eq!(get(home, tag, "k0"), b"v0");
    assert_eq!(get(home, tag, "k2999"), b"v2999");
    assert_eq!(get(home, tag, "k7"), b"again");
    assert_eq!(get(home, tag, "bin"), [0, 0xff, 0xfe, b'\n']);
    let scan = ok_json(home, &["scan", tag, "--limit", "10000"]);
    assert_eq!(scan.as_array().unwrap().len(), LINES + 1);
}

#[test]
fn ndjson_import_on_a_stopped_and_a_running_device() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    import_and_check(&home, dir.path(), "stopped");
    let (child, _) = start_run(
        &home,
        &["--listen", "127.0.0.1:0", "--sync-interval", "3600"],
    );
    import_and_check(&home, dir.path(), "running");
    terminate(child);
    // What the running device imported is there once it stopped.
    assert_eq!(log_entries(&home, "running").len(), 3_000);
    assert_eq!(log_entries(&home, "stopped").len(), 3_000);
}

#[test]
fn a_bad_line_is_refused_with_its_number_and_nothing_of_its_batch_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let before = facts_in_index(&home);
    let file = dir.path().join("in.ndjson");
    let write_lines = |bad_at: usize, bad: &str| {
        let mut text = String::new();
        for i in 1..=250 {
            if i == bad_at {
                text.push_str(bad);
                text.push('\n');
            } else {
                text.push_str(&format!("{{\"data\": \"{i}\"}}\n"));
            }
        }
        std::fs::write(&file, text).unwrap();
    };
    let import = |home: &Path| {
        fails_in_one_line(
            home,
            &[
                "log",
                "append",
                "l",
                "--ndjson",
                file.to_str().unwrap(),
                "--batch-size",
                "100",
            ],
        )
    };
    // In the first batch: nothing is written.
    for bad in [
        "not json",
        "{\"data\": \"x\", \"extra\": 1}",
        "{\"data\": \"x\", \"data_b64\": \"eA==\"}",
        "{\"data_b64\": \"not base64!\"}",
        "{}",
    ] {
        write_lines(42, bad);
        let err = import(&home);
        assert!(err.contains("line 42:"), "{bad}: {err}");
        assert!(err.contains("nothing was written"), "{bad}: {err}");
        assert_eq!(facts_in_index(&home), before, "{bad}: nothing written");
    }
    // An entry too large for a log, in the third batch: the first two batches stay.
    let big = format!("{{\"data\": \"{}\"}}", "x".repeat(70_000));
    write_lines(230, &big);
    let err = import(&home);
    assert!(err.contains("line 230:"), "{err}");
    assert!(err.contains("lines 1 to 200 are written"), "{err}");
    assert!(err.contains("from line 201"), "{err}");
    assert_eq!(facts_in_index(&home), before + 200);
    let l = ok_json(&home, &["log", "read", "l", "--limit", "1000"]);
    assert_eq!(l.as_array().unwrap().len(), 200);

    // A put line without a key, through a running device.
    let (child, _) = start_run(
        &home,
        &["--listen", "127.0.0.1:0", "--sync-interval", "3600"],
    );
    // The running device may write facts of its own as it starts: count from here.
    let running = facts_in_index(&home);
    std::fs::write(
        &file,
        "{\"key\": \"a\", \"value\": \"1\"}\n{\"value\": \"2\"}\n",
    )
    .unwrap();
    let err = fails_in_one_line(&home, &["put", "c", "--ndjson", file.to_str().unwrap()]);
    assert!(err.contains("line 2:"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(facts_in_index(&home), running);
    // Neither a key nor a value goes with --ndjson.
    fails_in_one_line(
        &home,
        &["put", "c", "k", "--ndjson", file.to_str().unwrap()],
    );
    terminate(child);
}
