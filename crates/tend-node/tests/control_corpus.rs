//! The control-request fuzz corpus (`fuzz/corpus/control_request/`) as an ordinary test:
//! every file goes through the check the libFuzzer target runs. Nothing may panic,
//! `valid-*` seeds must parse (and round-trip), `bad-*` ones must be refused, and every
//! request kind has a valid seed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tend_node::control::{check_request_line, Request};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/control_request")
}

/// The command name of a request. No wildcard arm: a new request kind does not compile
/// here until it is named, and then needs a `valid-<name>` seed.
fn kind(r: &Request) -> &'static str {
    match r {
        Request::Status => "status",
        Request::Peers => "peers",
        Request::PeerTrust { .. } => "peer_trust",
        Request::PeerBan { .. } => "peer_ban",
        Request::SyncNow => "sync_now",
        Request::AddFact { .. } => "add_fact",
        Request::Data(_) => "data",
        Request::SnapshotPropose { .. } => "snapshot_propose",
        Request::AuthorityCreate { .. } => "authority_create",
        Request::JournalList { .. } => "journal_list",
        Request::AuthorityStatus(_) => "authority_status",
        Request::SnapshotStatus(_) => "snapshot_status",
        Request::Gc { .. } => "gc",
        Request::SetGcPolicy { .. } => "set_gc_policy",
        Request::GetSetting { .. } => "get_setting",
        Request::PutSetting { .. } => "put_setting",
        Request::UpgradeStatus(_) => "upgrade_status",
        Request::UpgradePublish { .. } => "upgrade_publish",
        Request::UpgradeActivate { .. } => "upgrade_activate",
        Request::UpgradeWiden { .. } => "upgrade_widen",
        Request::UpgradeApply { .. } => "upgrade_apply",
        Request::UpgradeConfigure { .. } => "upgrade_configure",
        Request::AdminStatus(_) => "admin_status",
        Request::AdminReplace { .. } => "admin_replace",
        Request::CacheInvalidate { .. } => "cache_invalidate",
        Request::CacheCheck { .. } => "cache_check",
        Request::BackupExport { .. } => "backup_export",
    }
}

const ALL_KINDS: [&str; 27] = [
    "data",
    "status",
    "peers",
    "peer_trust",
    "peer_ban",
    "sync_now",
    "add_fact",
    "snapshot_propose",
    "authority_create",
    "journal_list",
    "authority_status",
    "snapshot_status",
    "gc",
    "set_gc_policy",
    "get_setting",
    "put_setting",
    "upgrade_status",
    "upgrade_publish",
    "upgrade_activate",
    "upgrade_widen",
    "upgrade_apply",
    "upgrade_configure",
    "admin_status",
    "admin_replace",
    "cache_invalidate",
    "cache_check",
    "backup_export",
];

#[test]
fn every_corpus_file_parses_or_is_refused_without_panic() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a readable directory entry").path())
        .collect();
    files.sort();
    let mut seen = BTreeSet::new();
    let mut bad = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).expect("a readable corpus file");
        // Any file (libFuzzer adds its own finds): no panic.
        let result = check_request_line(&bytes);
        if let Some(expected) = name.strip_prefix("valid-") {
            let request = result.unwrap_or_else(|e| panic!("{name} must parse: {e}"));
            assert_eq!(kind(&request), expected, "{name} parses as another request");
            seen.insert(kind(&request));
        } else if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} must be refused, got {result:?}");
            bad += 1;
        }
    }
    let missing: Vec<_> = ALL_KINDS.iter().filter(|k| !seen.contains(*k)).collect();
    assert!(missing.is_empty(), "no valid seed for {missing:?}");
    assert!(bad >= 10, "only {bad} malformed seeds");
}
