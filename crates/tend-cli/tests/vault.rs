//! `tend storage` as a real process and `tend vault` against it: the admin keys the epoch and
//! grants the peer, a large value goes up encrypted and comes back, an outsider and bad
//! input are refused in one line, and the storage peer's home holds no plaintext.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fails_in_one_line, ok_json, start_run, terminate, wait_until};

fn start_storage(home: &Path, authority: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tend"))
        .arg("--home")
        .arg(home)
        .args([
            "--json",
            "storage",
            "--authority",
            authority,
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("TEND_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tend storage starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("start line");
    let info: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("tend storage printed {line:?}: {e}"));
    let target = format!(
        "{}@{}",
        info["device"].as_str().unwrap(),
        info["listen_addr"].as_str().unwrap()
    );
    (child, target)
}

#[test]
fn a_value_goes_to_the_storage_peer_encrypted_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, outsider, storage) = (
        dir.path().join("a"),
        dir.path().join("x"),
        dir.path().join("s"),
    );
    ok_json(&a, &["init"]);
    ok_json(&outsider, &["init"]);
    let keyed = ok_json(&a, &["vault", "key"]);
    assert_eq!(keyed["facts_written"], 1);
    assert_eq!(ok_json(&a, &["vault", "key"])["facts_written"], 0);
    let authority = keyed["authority"].as_str().unwrap().to_owned();

    let (peer, target) = start_storage(&storage, &authority);
    let peer_id = target.split('@').next().unwrap().to_owned();
    // Before the grant, the peer takes the facts but no blob.
    let marker = "STORAGE-PEER-MARKER ".repeat(2500);
    ok_json(&a, &["put", "files", "big", &marker]);
    let err = fails_in_one_line(&a, &["vault", "upload", "--storage", &target]);
    assert!(err.contains("grant"), "{err}");
    ok_json(&a, &["vault", "grant", &peer_id]);
    let uploaded = ok_json(&a, &["vault", "upload", "--storage", &target]);
    assert_eq!(
        uploaded["uploaded"].as_array().unwrap().len(),
        1,
        "{uploaded}"
    );
    let again = ok_json(&a, &["vault", "upload", "--storage", &target]);
    assert_eq!(again["already"], 1);
    let fetched = ok_json(
        &a,
        &["vault", "fetch", "files", "big", "--storage", &target],
    );
    assert_eq!(fetched["bytes"], marker.len());
    assert_eq!(again["dropped"], 0);

    // Deleted, and the delete covered by a snapshot: GC reclaims the value here, and the
    // next upload has the storage peer delete its copy.
    ok_json(&a, &["delete", "files", "big"]);
    ok_json(&a, &["snapshot", "propose"]);
    ok_json(&a, &["gc"]);
    let after_gc = ok_json(&a, &["vault", "upload", "--storage", &target]);
    assert_eq!(after_gc["dropped"], 1, "{after_gc}");
    assert_eq!(
        ok_json(&a, &["vault", "upload", "--storage", &target])["dropped"],
        0
    );

    // A device of another authority is refused; so is a malformed authority id.
    let err = fails_in_one_line(&outsider, &["vault", "upload", "--storage", &target]);
    assert!(err.contains("refused"), "{err}");
    fails_in_one_line(&storage, &["storage", "--authority", "not-an-id"]);

    terminate(peer);
    for entry in std::fs::read_dir(&storage).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes
            .windows(b"STORAGE-PEER-MARKER".len())
            .any(|w| w == b"STORAGE-PEER-MARKER"));
    }
}

/// A running device keeps its large values on the storage peer by itself (`tend run
/// --storage`): a value written through it gets its encrypted copy within a few sync
/// intervals, and once the device stops the copy comes back from the peer.
#[test]
fn a_running_device_keeps_its_large_values_on_the_storage_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (a, storage) = (dir.path().join("a"), dir.path().join("s"));
    ok_json(&a, &["init"]);
    let keyed = ok_json(&a, &["vault", "key"]);
    let authority = keyed["authority"].as_str().unwrap().to_owned();
    let (peer, target) = start_storage(&storage, &authority);
    let peer_id = target.split('@').next().unwrap().to_owned();
    ok_json(&a, &["vault", "grant", &peer_id]);

    let (run, _) = start_run(&a, &["--storage", &target, "--sync-interval", "0.2"]);
    let marker = "RUNNING-DEVICE-MARKER ".repeat(2500);
    ok_json(&a, &["put", "files", "big", &marker]);
    wait_until(
        "the value's encrypted copy",
        Duration::from_secs(30),
        || {
            let facts = ok_json(&a, &["journal", "list", "--limit", "1000"]);
            facts
                .as_array()
                .is_some_and(|l| l.iter().any(|f| f["kind"] == "vault-copy"))
        },
    );
    terminate(run);

    let fetched = ok_json(
        &a,
        &["vault", "fetch", "files", "big", "--storage", &target],
    );
    assert_eq!(fetched["bytes"], marker.len());
    terminate(peer);
    for entry in std::fs::read_dir(&storage).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes
            .windows(b"RUNNING-DEVICE-MARKER".len())
            .any(|w| w == b"RUNNING-DEVICE-MARKER"));
    }
}
