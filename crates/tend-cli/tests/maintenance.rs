//! End-to-end: a 2-of-3 authority made from three homes, a threshold snapshot, and GC.

use std::path::Path;
use std::process::Command;

fn tend(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--json")
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .expect("the tend binary runs");
    assert!(
        out.status.success(),
        "tend {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn tend_fails(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("TEND_HOME")
        .output()
        .unwrap();
    assert!(!out.status.success(), "tend {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn threshold_snapshot_then_gc_keeps_state_and_shrinks_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|d| dir.path().join(d));
    for h in [&a, &b, &c] {
        tend(h, &["init"]);
    }
    for i in 0..30 {
        tend(
            &a,
            &["fact", "add", "--kind", "note", "--data", &format!("{i}")],
        );
    }
    // Nothing may be pruned before a verified snapshot.
    assert!(tend_fails(&a, &["gc"]).contains("no verified completed snapshot"));

    let (bs, cs) = (b.to_str().unwrap(), c.to_str().unwrap());
    let created = tend(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "2",
            "--member-home",
            bs,
            "--member-home",
            cs,
        ],
    );
    assert_eq!(created["identity_epoch"], 1);
    assert_eq!(created["members"].as_array().unwrap().len(), 3);
    let status = tend(&c, &["authority", "status"]);
    assert_eq!(status["namespace"], created["namespace"]);
    assert_eq!(status["threshold"], 2);

    // A member without its key share cannot take part: the ceremony needs 2 of 3 shares,
    // and the proposer has one.
    let snap = tend(
        &a,
        &[
            "snapshot",
            "propose",
            "--member-home",
            bs,
            "--member-home",
            cs,
        ],
    );
    let epoch = snap["epoch"].as_u64().unwrap();
    for h in [&a, &b, &c] {
        let s = tend(h, &["snapshot", "status"]);
        assert_eq!(
            s["latest"]["epoch"], epoch,
            "every member has the verified snapshot"
        );
        assert_eq!(s["latest"]["blob_stored"], true);
    }

    let before = tend(&b, &["journal", "status"]);
    let dry = tend(&b, &["gc", "--dry-run"]);
    assert!(dry["facts_pruned"].as_u64().unwrap() >= 30);
    assert_eq!(
        tend(&b, &["journal", "status"]),
        before,
        "a dry run changes nothing"
    );
    let gc = tend(&b, &["gc"]);
    assert_eq!(gc["facts_pruned"], dry["facts_pruned"]);
    let after = tend(&b, &["journal", "status"]);
    let find = |s: &serde_json::Value| {
        s["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["namespace"] == created["namespace"])
            .cloned()
            .unwrap()
    };
    let (nb, na) = (find(&before), find(&after));
    assert_eq!(na["snapshot_epoch"], nb["snapshot_epoch"]);
    assert_eq!(na["identity_epoch"], nb["identity_epoch"]);
    assert_eq!(na["current_epoch"], nb["current_epoch"]);
    assert!(na["facts"].as_u64().unwrap() < nb["facts"].as_u64().unwrap());

    // The pruned device keeps writing, and a second snapshot completes although b no longer
    // holds the facts below the first one: the digest chains on the first snapshot.
    tend(&b, &["fact", "add", "--kind", "note", "--data", "after gc"]);
    for i in 0..5 {
        tend(
            &a,
            &[
                "fact",
                "add",
                "--kind",
                "note",
                "--data",
                &format!("more {i}"),
            ],
        );
    }
    let as_ = a.to_str().unwrap();
    let second = tend(
        &b,
        &[
            "snapshot",
            "propose",
            "--member-home",
            as_,
            "--member-home",
            cs,
        ],
    );
    assert!(second["epoch"].as_u64().unwrap() > epoch);
    for h in [&a, &b, &c] {
        assert_eq!(
            tend(h, &["snapshot", "status"])["latest"]["epoch"],
            second["epoch"]
        );
    }
    // An archive device refuses to prune.
    tend(&c, &["gc", "--policy", "archive"]);
    assert!(tend_fails(&c, &["gc"]).contains("archive"));
}

#[test]
fn authority_create_rejects_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = ["a", "b"].map(|d| dir.path().join(d));
    tend(&a, &["init"]);
    tend(&b, &["init"]);
    let bs = b.to_str().unwrap();
    assert!(tend_fails(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "3",
            "--member-home",
            bs
        ]
    )
    .contains("threshold"));
    assert!(tend_fails(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "1",
            "--member-home",
            bs
        ]
    )
    .contains("threshold"));
    let stranger = "ab".repeat(32);
    assert!(tend_fails(
        &a,
        &[
            "authority",
            "create",
            "--threshold",
            "2",
            "--member-home",
            bs,
            "--member",
            &stranger
        ]
    )
    .contains("--member-home"));
    // Nothing changed.
    assert_eq!(tend(&a, &["authority", "status"])["identity_epoch"], 0);
}
