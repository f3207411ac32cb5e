//! Group commit on a real device: concurrent single writes share transactions, every
//! caller is answered with its own facts, which are all there after a reopen; one caller's
//! refused write leaves the others of its group committed; and a large batch signed on
//! every core keeps each write seeing the ones before it.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use tend_core::FactId;
use tend_node::data::{run, Bytes64, DataRequest, DataResponse, Written};
use tend_node::{Device, DeviceError};

fn append(log: &str, data: &str) -> DataRequest {
    DataRequest::LogAppend {
        log: log.into(),
        data: Bytes64(data.as_bytes().to_vec()),
    }
}

fn put(key: &str, value: &str) -> DataRequest {
    DataRequest::Put {
        collection: "c".into(),
        key: key.into(),
        value: Bytes64(value.as_bytes().to_vec()),
    }
}

fn stored(d: &Device, w: &Written) -> bool {
    let id: FactId = w.id.parse().expect("a fact id");
    d.store()
        .get(d.namespace(), tend_core::Epoch(w.epoch), &id)
        .expect("store reads")
        .is_some()
}

fn log_data(d: &Device, log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let r = run(
            d,
            DataRequest::LogRead {
                log: log.into(),
                after: after.clone(),
                limit: 10_000,
            },
        )
        .unwrap();
        let DataResponse::Log(page) = r else {
            panic!("a log read answers with entries")
        };
        if page.is_empty() {
            return out;
        }
        after = page.last().map(|e| e.cursor.clone());
        out.extend(
            page.into_iter()
                .map(|e| String::from_utf8(e.data.0).unwrap()),
        );
    }
}

fn value(d: &Device, key: &str) -> Option<(String, usize)> {
    let r = run(
        d,
        DataRequest::Get {
            collection: "c".into(),
            key: key.into(),
        },
    )
    .unwrap();
    let DataResponse::Value(v) = r else {
        panic!("a get answers with a value")
    };
    v.map(|v| (String::from_utf8(v.value.0).unwrap(), v.conflicts.len()))
}

#[test]
fn concurrent_writers_share_commits_and_every_write_is_durable() {
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let d = Arc::new(Device::init(&home, &mut rand::thread_rng()).unwrap());
    let acknowledged: Vec<(usize, Vec<Written>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let d = d.clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..EACH {
                        let r = if i % 2 == 0 {
                            run(&d, append("shared", &format!("{w}-{i}")))
                        } else {
                            run(&d, put(&format!("k{w}"), &format!("{w}-{i}")))
                        };
                        let DataResponse::Written(written) = r.expect("every write succeeds")
                        else {
                            panic!("a single write answers with its fact")
                        };
                        mine.push(written);
                    }
                    (w, mine)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stats = d.write_queue().stats();
    assert_eq!(
        stats.jobs,
        (WRITERS * EACH) as u64,
        "every write went through the queue"
    );
    assert!(
        stats.groups < stats.jobs,
        "concurrent writers shared commits: {stats:?}"
    );
    let ids: HashSet<&str> = acknowledged
        .iter()
        .flat_map(|(_, ws)| ws.iter().map(|w| w.id.as_str()))
        .collect();
    assert_eq!(ids.len(), WRITERS * EACH, "each caller got its own fact");
    // Appends to one log from many writers took distinct clock values.
    let cursors: HashSet<&str> = acknowledged
        .iter()
        .flat_map(|(_, ws)| ws.iter().filter_map(|w| w.cursor.as_deref()))
        .collect();
    assert_eq!(cursors.len(), WRITERS * EACH / 2);

    drop(d);
    let d = Device::open(&home).unwrap();
    for (_, ws) in &acknowledged {
        for w in ws {
            assert!(
                stored(&d, w),
                "acknowledged fact {} is stored after a reopen",
                w.id
            );
        }
    }
    let entries = log_data(&d, "shared");
    assert_eq!(entries.len(), WRITERS * EACH / 2);
    // Each writer's entries read in the order it wrote them.
    for w in 0..WRITERS {
        let mine: Vec<&String> = entries
            .iter()
            .filter(|e| e.starts_with(&format!("{w}-")))
            .collect();
        let expected: Vec<String> = (0..EACH).step_by(2).map(|i| format!("{w}-{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
        // Each key reads as its writer's last put, with no conflict: the writes of one
        // device supersede each other even when they shared a commit.
        assert_eq!(
            value(&d, &format!("k{w}")),
            Some((format!("{w}-{}", EACH - 1), 0))
        );
    }
}

#[test]
fn a_refused_write_in_a_group_leaves_the_others_committed() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap();
    let facts = |d: &Device| d.store().stats(d.namespace()).unwrap().unwrap().facts;
    let before = facts(&d);
    let groups_before = d.write_queue().stats().groups;
    let answers = d.write_queue().submit_all(
        &d,
        vec![
            vec![put("x", "1")],
            // Absent key: refused when planned.
            vec![DataRequest::Delete {
                collection: "c".into(),
                key: "never".into(),
            }],
            vec![append("l", "a")],
            // A batch with a bad write: none of it, not even its good first write.
            vec![
                append("l", "not written"),
                DataRequest::LogAppend {
                    log: String::new(),
                    data: Bytes64(b"bad".to_vec()),
                },
            ],
            // Sees the put of the first caller of the group, and supersedes it.
            vec![put("x", "2")],
            vec![append("l", "b")],
        ],
    );
    assert_eq!(
        d.write_queue().stats().groups,
        groups_before + 1,
        "one group"
    );
    assert_eq!(answers.len(), 6);
    assert!(
        matches!(answers[1], Err(DeviceError::NotFound(_))),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(answers[3], Err(DeviceError::InvalidInput(_))),
        "{:?}",
        answers[3]
    );
    for i in [0, 2, 4, 5] {
        let w = answers[i]
            .as_ref()
            .expect("the other callers' writes commit");
        assert_eq!(w.len(), 1);
        assert!(stored(&d, &w[0]));
    }
    assert_eq!(
        facts(&d),
        before + 4,
        "exactly the four good writes are stored"
    );
    assert_eq!(value(&d, "x"), Some(("2".into(), 0)));
    // The refused batch's append took no clock value: the log has no gap.
    assert_eq!(log_data(&d, "l"), ["a", "b"]);
}

#[test]
fn a_large_batch_signed_on_every_core_keeps_each_write_after_the_ones_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap();
    // Runs of appends long enough to be signed in parallel, separated by puts of one key:
    // each put supersedes the one before it, whose id the plan needs mid-way.
    let mut ops = Vec::new();
    for round in 0..4 {
        for i in 0..600 {
            ops.push(append("big", &format!("{round}-{i}")));
        }
        ops.push(put("k", &round.to_string()));
    }
    let DataResponse::Batch(written) = run(&d, DataRequest::Batch { ops }).unwrap() else {
        panic!("a batch answers with its writes")
    };
    assert_eq!(written.len(), 4 * 601);
    assert!(written.iter().all(|w| stored(&d, w)));
    let expected: Vec<String> = (0..4)
        .flat_map(|r| (0..600).map(move |i| format!("{r}-{i}")))
        .collect();
    assert_eq!(log_data(&d, "big"), expected);
    assert_eq!(
        value(&d, "k"),
        Some(("3".into(), 0)),
        "each put superseded the last"
    );
}

#[test]
fn writes_planned_while_a_snapshot_completes_are_planned_again_at_the_new_epoch() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap());
    let stop = AtomicBool::new(false);
    let (written, failures) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut written, mut failures) = (0, Vec::new());
            let mut i = 0;
            // Bounded, so that a slow machine cannot grow the journal (and with it each
            // snapshot's blob) without end.
            while !stop.load(Ordering::Relaxed) && i < 100 {
                let ops = (0..40)
                    .map(|k| append("busy", &format!("{i}-{k}")))
                    .collect();
                i += 1;
                match run(&d, DataRequest::Batch { ops }) {
                    Ok(_) => written += 40,
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (written, failures)
        });
        // Snapshots complete while batches are planned and signed: each moves the epoch
        // the batch in flight was planned at.
        for round in 0..3u8 {
            std::thread::sleep(std::time::Duration::from_millis(60));
            let next = d
                .store()
                .maintenance_state(d.namespace())
                .unwrap()
                .current_epoch()
                .next();
            common::complete_snapshot(&d, next, &[round]);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    });
    assert!(failures.is_empty(), "writes failed: {failures:?}");
    assert_eq!(log_data(&d, "busy").len(), written);
    assert!(
        d.store()
            .maintenance_state(d.namespace())
            .unwrap()
            .current_epoch()
            .0
            >= 3
    );
}

#[test]
fn writers_on_tasks_and_on_threads_share_commits_and_every_write_is_durable() {
    const TASKS: usize = 16;
    const THREADS: usize = 4;
    const EACH: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("a");
    let d = Arc::new(Device::init(&home, &mut rand::thread_rng()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acknowledged: Vec<Written> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let d = d.clone();
                s.spawn(move || {
                    (0..EACH)
                        .map(|i| match run(&d, append("shared", &format!("t{t}-{i}"))) {
                            Ok(DataResponse::Written(w)) => w,
                            other => panic!("a thread's append is written: {other:?}"),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let tasks = rt.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|w| {
                    let d = d.clone();
                    tokio::spawn(async move {
                        let mut mine = Vec::new();
                        for i in 0..EACH {
                            let r = tend_node::data::write(
                                &d,
                                append("shared", &format!("w{w}-{i}")),
                                || {},
                            )
                            .await;
                            match r {
                                Ok(DataResponse::Written(w)) => mine.push(w),
                                other => panic!("a task's append is written: {other:?}"),
                            }
                        }
                        mine
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .chain(tasks)
            .collect()
    });
    let total = (TASKS + THREADS) * EACH;
    let stats = d.write_queue().stats();
    assert_eq!(
        stats.jobs, total as u64,
        "every write went through the queue"
    );
    assert!(
        stats.groups < stats.jobs,
        "writers shared commits: {stats:?}"
    );
    // Groups led by a thread run no hook (a thread may lead every group above). A task
    // that finds the queue idle (its last leader gone: they finish microseconds after
    // the answers) leads, and its group runs the hook, just after the answer.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = told.clone();
    let solo = rt.block_on(tend_node::data::write(
        &d,
        append("solo", "alone"),
        move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        },
    ));
    assert!(matches!(solo, Ok(DataResponse::Written(_))), "{solo:?}");
    let asked = std::time::Instant::now();
    while told.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "the group a task led never told the node"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        told.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the group a task led told the node once"
    );
    let ids: HashSet<&str> = acknowledged.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids.len(), total, "each caller got its own fact");

    drop(rt);
    drop(d);
    let d = Device::open(&home).unwrap();
    assert!(acknowledged.iter().all(|w| stored(&d, w)));
    let entries = log_data(&d, "shared");
    assert_eq!(entries.len(), total);
    for w in 0..TASKS {
        let mine: Vec<&String> = entries
            .iter()
            .filter(|e| e.starts_with(&format!("w{w}-")))
            .collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("w{w}-{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "a task's entries read in the order it wrote them"
        );
    }
}

#[test]
fn a_lead_dropped_unrun_answers_its_writers_and_frees_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap();
    let (first, leader) = d.write_queue().enqueue(vec![append("l", "one")]);
    let leader = leader.expect("the first writer of an idle queue leads");
    let (second, none) = d.write_queue().enqueue(vec![append("l", "two")]);
    assert!(none.is_none(), "one leader at a time");
    // As when the runtime shuts down before the blocking task that would lead runs.
    drop(leader);
    for answer in [first, second] {
        let refused = answer
            .blocking_recv()
            .expect("the writer is answered")
            .expect_err("nothing was committed");
        assert!(
            matches!(refused, DeviceError::SharedCommit(_)),
            "{refused:?}"
        );
    }
    assert!(log_data(&d, "l").is_empty());
    // The queue was freed: the next writer leads and commits.
    let DataResponse::Written(w) = run(&d, append("l", "three")).unwrap() else {
        panic!("a single write answers with its fact")
    };
    assert!(stored(&d, &w));
    assert_eq!(log_data(&d, "l"), ["three"]);
}

#[test]
fn a_writer_that_leads_returns_while_the_others_keep_writing() {
    const WRITERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(Device::init(&dir.path().join("a"), &mut rand::thread_rng()).unwrap());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writes: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (d, stop) = (d.clone(), &stop);
                s.spawn(move || {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        run(&d, append("busy", &format!("{w}-{n}"))).expect("written");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each writer gets about the same share. A writer kept leading other writers' groups
    // for as long as they wrote (one caller's `put` not returning under load) got a few
    // writes in while the others got a thousand each.
    let mut sorted = writes.clone();
    sorted.sort_unstable();
    let median = sorted[WRITERS / 2];
    assert!(
        sorted[0] * 4 >= median,
        "a writer stayed leading the others' groups instead of returning: {writes:?}"
    );
}
