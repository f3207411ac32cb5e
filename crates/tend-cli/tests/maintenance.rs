//! End-to-end: a 2-of-3 authority made from three homes, a threshold snapshot, and GC.

mod common;

use common::{fails, ok_json};

#[test]
fn threshold_snapshot_then_gc_keeps_state_and_shrinks_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|d| dir.path().join(d));
    for h in [&a, &b, &c] {
        ok_json(h, &["init"]);
    }
    // 30 writes of one key: 29 are superseded (GC reclaims them), the last stays live.
    for i in 0..30 {
        ok_json(&a, &["put", "notes", "k", &format!("{i}")]);
    }
    // Nothing may be pruned before a verified snapshot.
    assert!(fails(&a, &["gc"]).contains("no verified completed snapshot"));

    let (bs, cs) = (b.to_str().unwrap(), c.to_str().unwrap());
    let created = ok_json(
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
    let status = ok_json(&c, &["authority", "status"]);
    assert_eq!(status["namespace"], created["namespace"]);
    assert_eq!(status["threshold"], 2);

    // A member without its key share cannot take part: the ceremony needs 2 of 3 shares,
    // and the proposer has one.
    let snap = ok_json(
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
        let s = ok_json(h, &["snapshot", "status"]);
        assert_eq!(
            s["latest"]["epoch"], epoch,
            "every member has the verified snapshot"
        );
        assert_eq!(s["latest"]["blob_stored"], true);
    }

    let before = ok_json(&b, &["journal", "status"]);
    let dry = ok_json(&b, &["gc", "--dry-run"]);
    assert!(dry["facts_pruned"].as_u64().unwrap() >= 29, "{dry}");
    assert_eq!(dry["live_kept"], 1, "the current value stays: {dry}");
    assert_eq!(
        ok_json(&b, &["journal", "status"]),
        before,
        "a dry run changes nothing"
    );
    let gc = ok_json(&b, &["gc"]);
    assert_eq!(gc["facts_pruned"], dry["facts_pruned"]);
    let after = ok_json(&b, &["journal", "status"]);
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
    ok_json(&b, &["fact", "add", "--kind", "note", "--data", "after gc"]);
    for i in 0..5 {
        ok_json(
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
    let second = ok_json(
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
            ok_json(h, &["snapshot", "status"])["latest"]["epoch"],
            second["epoch"]
        );
    }
    // An archive device refuses to prune.
    ok_json(&c, &["gc", "--policy", "archive"]);
    assert!(fails(&c, &["gc"]).contains("archive"));
}

#[test]
fn authority_create_rejects_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = ["a", "b"].map(|d| dir.path().join(d));
    ok_json(&a, &["init"]);
    ok_json(&b, &["init"]);
    let bs = b.to_str().unwrap();
    assert!(fails(
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
    assert!(fails(
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
    assert!(fails(
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
    assert_eq!(ok_json(&a, &["authority", "status"])["identity_epoch"], 0);
}
