//! Batch writes: many writes in one transaction, each seeing the ones before it, all or
//! nothing.

use tend_node::data::{run, Bytes64, DataRequest, DataResponse};
use tend_node::Device;

fn put(key: &str, value: &str) -> DataRequest {
    DataRequest::Put {
        collection: "c".into(),
        key: key.into(),
        value: Bytes64(value.as_bytes().to_vec()),
    }
}

fn append(data: &str) -> DataRequest {
    DataRequest::LogAppend {
        log: "l".into(),
        data: Bytes64(data.as_bytes().to_vec()),
    }
}

fn get(d: &Device, key: &str) -> Option<(Vec<u8>, usize)> {
    let r = run(
        d,
        DataRequest::Get {
            collection: "c".into(),
            key: key.into(),
        },
    )
    .unwrap();
    match r {
        DataResponse::Value(v) => v.map(|v| (v.value.0, v.conflicts.len())),
        _ => unreachable!(),
    }
}

fn facts(d: &Device) -> u64 {
    d.store().stats(d.namespace()).unwrap().unwrap().facts
}

#[test]
fn a_batch_commits_together_and_each_write_sees_the_ones_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap();
    let before = facts(&d);
    let mut ops: Vec<DataRequest> = (0..500).map(|i| put("k", &format!("v{i}"))).collect();
    ops.extend((0..500).map(|i| append(&format!("e{i}"))));
    ops.push(DataRequest::Delete {
        collection: "c".into(),
        key: "k".into(),
    });
    ops.push(put("k", "last"));
    let DataResponse::Batch(written) = run(&d, DataRequest::Batch { ops }).unwrap() else {
        panic!("a batch answers with its writes");
    };
    assert_eq!(written.len(), 1002);
    assert_eq!(facts(&d), before + 1002);
    // Each put superseded the one before it: one value, no conflict with itself.
    assert_eq!(get(&d, "k"), Some((b"last".to_vec(), 0)));
    // The log reads in the order of the batch.
    let DataResponse::Log(entries) = run(
        &d,
        DataRequest::LogRead {
            log: "l".into(),
            after: None,
            limit: 1000,
        },
    )
    .unwrap() else {
        unreachable!()
    };
    let read: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8(e.data.0.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..500).map(|i| format!("e{i}")).collect();
    assert_eq!(read, expected);
}

#[test]
fn a_batch_with_a_bad_write_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap();
    let before = facts(&d);
    for bad in [
        put("", "empty key"),
        DataRequest::Get {
            collection: "c".into(),
            key: "k".into(),
        },
        DataRequest::Delete {
            collection: "c".into(),
            key: "never written".into(),
        },
        DataRequest::Batch { ops: vec![] },
    ] {
        let ops = vec![put("a", "1"), append("x"), bad];
        assert!(run(&d, DataRequest::Batch { ops }).is_err());
        assert_eq!(facts(&d), before, "nothing of a refused batch is stored");
        assert_eq!(get(&d, "a"), None);
    }
}
