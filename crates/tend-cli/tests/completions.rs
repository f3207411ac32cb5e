//! `tend completions SHELL` and `tend man`: generated from the real command definitions,
//! with no home needed.

use std::process::Command;

fn tend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tend"))
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs")
}

#[test]
fn bash_completion_mentions_the_commands() {
    let out = tend(&["completions", "bash"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("_tend()"), "{script}");
    for word in ["put", "snapshot", "journal", "completions"] {
        assert!(script.contains(word), "no {word} in the script");
    }
}

#[test]
fn every_shell_has_a_script_and_a_bad_shell_is_one_line() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = tend(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("snapshot"),
            "{shell}"
        );
    }
    let out = tend(&["--json", "completions", "fish"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shell"], "fish");
    assert!(v["script"].as_str().unwrap().contains("put"));
    let out = tend(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

#[test]
fn man_prints_a_roff_page() {
    let out = tend(&["man"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with('.'), "not roff: {page}");
    assert!(page.contains(".TH tend 1"), "no roff title header: {page}");
    assert!(page.contains("snapshot"));
}

#[test]
fn man_out_writes_one_page_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man");
    let out = tend(&["--json", "man", "--out", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages: Vec<&str> = v["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for page in [
        "tend.1",
        "tend-put.1",
        "tend-snapshot.1",
        "tend-log-append.1",
    ] {
        assert!(pages.contains(&page), "no {page} in {pages:?}");
        let text = std::fs::read_to_string(out_dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
}
