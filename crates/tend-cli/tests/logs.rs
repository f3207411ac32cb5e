//! Logs through `tracing-subscriber`: `RUST_LOG` chooses them, `--log-format json` makes
//! each one a JSON object on stderr, and a failing command's error stays one last line.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ok_json, tend, terminate, wait_until};

#[test]
fn rust_log_info_with_json_format_logs_json_lines_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    let err_path = dir.path().join("run.stderr");
    let child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(&home)
        .args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .env_remove("TEND_HOME")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("tend run starts");
    wait_until("the device answers", Duration::from_secs(20), || {
        tend(&home, &["--json", "peers"]).status.success()
    });
    ok_json(&home, &["put", "notes", "a", "1"]);
    ok_json(&home, &["snapshot", "propose"]);
    wait_until("a snapshot is logged", Duration::from_secs(20), || {
        std::fs::read_to_string(&err_path).is_ok_and(|s| s.contains("snapshot at epoch"))
    });
    terminate(child);
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log line");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"INFO\"") && l.contains("tend_node")),
        "{stderr}"
    );
}

#[test]
fn a_failing_command_still_ends_with_its_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    ok_json(&home, &["init"]);
    for format in ["json", "text"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tend"))
            .arg("--home")
            .arg(&home)
            .args(["--log-format", format, "gc"])
            .env_remove("TEND_HOME")
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.trim_end().lines().collect();
        let last = lines.last().expect("an error line");
        assert!(last.starts_with("error: "), "{stderr}");
        if format == "json" {
            for line in &lines[..lines.len() - 1] {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
            }
        }
    }
    // Without RUST_LOG, an error is exactly one line.
    let out = tend(&home, &["get", "notes", "absent"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    // A bad --log-format is one line too.
    let out = tend(&home, &["--log-format", "xml", "peers"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}
