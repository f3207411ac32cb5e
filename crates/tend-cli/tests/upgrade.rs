//! End-to-end through the `tend` binary: an upgrade published to three homes, applied with
//! a real install command, activated; a hard fork that fences out a device until it
//! upgrades; admin replacement by threshold signature; cache invalidation.

use std::path::Path;
use std::process::Command;

fn tend_out(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--json")
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs")
}

fn tend(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = tend_out(home, args);
    assert!(
        out.status.success(),
        "tend {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// The one-line error of a failing command.
fn tend_fails(home: &Path, args: &[&str]) -> String {
    let out = tend_out(home, args);
    assert!(!out.status.success(), "tend {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn upgrade_admin_and_cache_commands_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|d| dir.path().join(d));
    for h in [&a, &b, &c] {
        tend(h, &["init"]);
    }
    let (bs, cs) = (b.to_str().unwrap(), c.to_str().unwrap());
    let members = ["--member-home", bs, "--member-home", cs];
    let mut create = vec!["authority", "create", "--threshold", "2"];
    create.extend(members);
    tend(&a, &create);

    // Without an install command, apply says how to set one.
    assert!(tend_fails(&b, &["upgrade", "apply"]).contains("--install-cmd"));
    for h in [&a, &b, &c] {
        let cfg = tend(
            h,
            &[
                "upgrade",
                "configure",
                "--install-cmd",
                r#"cp "$1" "$TEND_HOME/installed""#,
            ],
        );
        assert_eq!(cfg["max_attempts"], 3);
    }

    let artifact = dir.path().join("tend-1.1.0.bin");
    std::fs::write(&artifact, b"release 1.1.0").unwrap();
    let art = artifact.to_str().unwrap();
    assert!(tend_fails(
        &a,
        &[
            "upgrade",
            "publish",
            "--artifact",
            art,
            "--version",
            "1.1.0",
            "--cohort",
            "150"
        ]
    )
    .contains("150"));
    assert!(tend_fails(
        &b,
        &[
            "upgrade",
            "publish",
            "--artifact",
            art,
            "--version",
            "1.1.0"
        ]
    )
    .contains("not the admin"));
    let mut publish = vec![
        "upgrade",
        "publish",
        "--artifact",
        art,
        "--version",
        "1.1.0",
    ];
    publish.extend(members);
    let published = tend(&a, &publish);
    let id = published["package_id"].as_str().unwrap().to_string();

    // A rollout only widens: the package already goes to every device.
    let mut widen = vec!["upgrade", "widen", id.as_str(), "--percent", "50"];
    widen.extend(members);
    assert!(tend_fails(&a, &widen).contains("a rollout only widens"));

    // Too early: refused with the count, and nothing is written (the journal would not
    // count the activation anyway).
    let mut activate = vec!["upgrade", "activate", id.as_str()];
    activate.extend(members);
    let early = tend_fails(&a, &activate);
    assert!(
        early.contains("not ready: 0 of 3 required devices reported ready"),
        "{early}"
    );
    assert_eq!(
        tend(&a, &["upgrade", "status"])["packages"][0]["activated"],
        false
    );
    for h in [&a, &b, &c] {
        let r = tend(h, &["upgrade", "apply"]);
        let events: Vec<&str> = r["packages"][0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["verified", "installed", "ready"]);
        assert_eq!(
            std::fs::read(h.join("installed")).unwrap(),
            b"release 1.1.0"
        );
    }
    let activated = tend(&a, &activate);
    assert_eq!(activated["to_version"], "1.1.0");
    let status = tend(&c, &["upgrade", "status"]);
    assert_eq!(status["running_version"], "1.1.0");
    assert_eq!(status["packages"][0]["activated"], true);
    assert_eq!(
        status["packages"][0]["readiness"]["ready"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A hard fork from the current epoch; c is manual and stays behind.
    tend(&c, &["upgrade", "configure", "--policy", "manual"]);
    let now = tend(&a, &["admin", "status"])["current_epoch"]
        .as_u64()
        .unwrap();
    let fork = dir.path().join("tend-1.2.0.bin");
    std::fs::write(&fork, b"release 1.2.0").unwrap();
    let fence = now.to_string();
    let mut publish = vec![
        "upgrade",
        "publish",
        "--artifact",
        fork.to_str().unwrap(),
        "--version",
        "1.2.0",
        "--fence",
        fence.as_str(),
    ];
    publish.extend(members);
    let fork_id = tend(&a, &publish)["package_id"]
        .as_str()
        .unwrap()
        .to_string();
    tend(&a, &["upgrade", "apply"]);
    tend(&b, &["upgrade", "apply"]);
    let mut activate = vec!["upgrade", "activate", fork_id.as_str(), "--min-ready", "2"];
    activate.extend(members);
    tend(&a, &activate);
    let s = tend(&c, &["upgrade", "status"]);
    let refusal = s["fence_refusal"].as_str().expect("c is fenced out");
    assert!(refusal.contains("version 1.2.0 mandatory"), "{refusal}");
    assert_eq!(
        tend(&b, &["upgrade", "status"])["fence_refusal"],
        serde_json::Value::Null
    );
    // c's operator upgrades it (the artifact arrived before the fork): accepted again.
    tend(&c, &["upgrade", "apply"]);
    let s = tend(&c, &["upgrade", "status"]);
    assert_eq!(s["fence_refusal"], serde_json::Value::Null);
    assert_eq!(s["running_version"], "1.2.0");

    // Admin replacement without the admin: b and c threshold-sign it.
    let b_id = tend(&b, &["upgrade", "status"])["device_id"]
        .as_str()
        .unwrap()
        .to_string();
    let now = tend(&b, &["admin", "status"])["current_epoch"]
        .as_u64()
        .unwrap();
    let at = (now + 2).to_string();
    assert!(
        tend_fails(&b, &["admin", "replace", "--new", &b_id, "--at-epoch", &at])
            .contains("is not the admin")
    );
    assert!(tend_fails(
        &a,
        &[
            "admin",
            "replace",
            "--new",
            &b_id,
            "--at-epoch",
            &now.to_string()
        ]
    )
    .contains("above the current epoch"));
    let r = tend(
        &b,
        &[
            "admin",
            "replace",
            "--new",
            &b_id,
            "--at-epoch",
            &at,
            "--threshold",
            "--member-home",
            cs,
        ],
    );
    assert_eq!(r["threshold_signed"], true);
    let s = tend(&c, &["admin", "status"]);
    assert_eq!(s["replacements"][0]["certified"], true);
    assert_eq!(s["replacements"][0]["new_admin"], b_id.as_str());

    // Cache: floors at the current epoch; valid only above them.
    let now = tend(&a, &["admin", "status"])["current_epoch"]
        .as_u64()
        .unwrap();
    let inv = tend(&a, &["cache", "invalidate", "--key", "k1", "--key", "k2"]);
    assert_eq!(inv["epoch_floor"], now);
    let at_now = now.to_string();
    let next = (now + 1).to_string();
    let check = tend(&a, &["cache", "check", "--key", "k1", "--epoch", &at_now]);
    assert_eq!(
        (check["valid"].clone(), check["floor"].clone()),
        (false.into(), now.into())
    );
    assert_eq!(
        tend(&a, &["cache", "check", "--key", "k1", "--epoch", &next])["valid"],
        true
    );
    assert_eq!(
        tend(&a, &["cache", "check", "--key", "other", "--epoch", "0"])["valid"],
        true
    );
    let far = (now + 50).to_string();
    assert!(
        tend_fails(&a, &["cache", "invalidate", "--key", "k1", "--floor", &far])
            .contains("above the current epoch")
    );
    tend(
        &a,
        &[
            "cache",
            "invalidate",
            "--key",
            "k1",
            "--floor",
            &far,
            "--local",
        ],
    );
    assert_eq!(
        tend(&a, &["cache", "check", "--key", "k1", "--epoch", &next])["valid"],
        false
    );
}
