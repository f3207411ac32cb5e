//! `tend journal status` counts: the facts in the journal index split into application and
//! maintenance-and-authority facts that add up to the whole, and the facts the reduced
//! maintenance state is folded from split into those in the index and those pruned from it,
//! in the JSON and in the text, before and after a snapshot and GC.

mod common;

use std::path::Path;

use common::{ok_json, tend};

/// The figures of the one namespace of `home`, from `--json journal status`, checked to add
/// up and to agree with `journal list` and with the text output.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    facts: u64,
    application: u64,
    maintenance: u64,
    state: u64,
    state_pruned: u64,
}

fn counts(home: &Path) -> Counts {
    let status = ok_json(home, &["journal", "status"]);
    let namespaces = status["namespaces"].as_array().unwrap();
    assert_eq!(namespaces.len(), 1, "{status}");
    let ns = &namespaces[0];
    let n = |k: &str| {
        ns[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {ns}"))
    };
    let c = Counts {
        facts: n("facts"),
        application: n("application_facts"),
        maintenance: n("maintenance_facts"),
        state: n("state_facts"),
        state_pruned: n("state_facts_pruned"),
    };
    // The parts add up to the whole.
    assert_eq!(c.facts, c.application + c.maintenance, "{c:?}");
    assert_eq!(c.state, c.maintenance + c.state_pruned, "{c:?}");

    // The index holds what `journal list` lists: application facts are those of an `app:` kind.
    let list = ok_json(home, &["journal", "list", "--limit", "100000"]);
    let listed = list.as_array().unwrap();
    assert_eq!(listed.len() as u64, c.facts, "{list}");
    let app = listed
        .iter()
        .filter(|f| f["kind"].as_str().unwrap().starts_with("app:"))
        .count() as u64;
    assert_eq!(app, c.application, "{list}");

    // The text says the same numbers.
    let out = tend(home, &["journal", "status"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let facts_line = format!(
        "facts {} in the journal index: application {}, maintenance and authority {}",
        c.facts, c.application, c.maintenance
    );
    let state_line = format!(
        "maintenance state reduced from {} maintenance and authority facts: {} in the index, {} pruned from it",
        c.state, c.maintenance, c.state_pruned
    );
    assert!(text.contains(&facts_line), "{facts_line:?} not in {text}");
    assert!(text.contains(&state_line), "{state_line:?} not in {text}");
    c
}

fn add(home: &Path, data: &str) {
    ok_json(home, &["fact", "add", "--kind", "note", "--data", data]);
}

#[test]
fn journal_status_parts_add_up_through_snapshots_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("dev");
    ok_json(&home, &["init"]);
    for i in 0..3 {
        add(&home, &format!("before {i}"));
    }
    let start = counts(&home);
    assert_eq!(start.application, 3);
    assert_eq!(start.state_pruned, 0);

    // A snapshot before GC: nothing is pruned yet, so every fact is still in the index.
    ok_json(&home, &["snapshot", "propose"]);
    let snapped = counts(&home);
    assert_eq!(snapped.application, 3);
    assert!(snapped.maintenance > start.maintenance);
    assert_eq!(snapped.state_pruned, 0);

    // GC prunes the facts below the snapshot: the application facts and some maintenance
    // facts leave the index, and the pruned maintenance facts still count for the state.
    let gc = ok_json(&home, &["gc"]);
    let pruned = gc["facts_pruned"].as_u64().unwrap();
    assert!(pruned > 0, "{gc}");
    let collected = counts(&home);
    assert_eq!(collected.facts, snapped.facts - pruned);
    assert_eq!(collected.state, snapped.state, "GC keeps the reduced state");
    assert!(collected.state_pruned > 0, "{collected:?}");
    assert!(collected.maintenance < snapped.maintenance);

    // Facts written after GC count as application facts in the index.
    add(&home, "after gc");
    let after = counts(&home);
    assert_eq!(after.application, collected.application + 1);
    assert_eq!(after.state, collected.state);

    // A second snapshot without GC moves the floor above facts that are still indexed:
    // they still count as in the index.
    ok_json(&home, &["snapshot", "propose"]);
    let second = counts(&home);
    assert_eq!(second.application, after.application);
    assert_eq!(second.state_pruned, after.state_pruned);
    assert!(second.state > after.state);

    let gc = ok_json(&home, &["gc"]);
    let again = counts(&home);
    assert_eq!(
        again.facts,
        second.facts - gc["facts_pruned"].as_u64().unwrap()
    );
    assert_eq!(again.state, second.state);
    assert!(again.state_pruned > second.state_pruned);
}
