//! Push on write: a local write reaches peers in a pushed round at once, not at the next
//! sync round (set to a minute here), writes made meanwhile are coalesced, facts received
//! from a peer push nothing back, and a steady write load stays within the peer's session
//! rate limit. Real nodes on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tend_node::data::{Bytes64, DataRequest, DataResponse};
use tend_node::{Node, NodeConfig, PeerAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rounds every minute: anything that arrives within seconds was pushed.
const ROUND: Duration = Duration::from_secs(60);
/// How long a pushed write may take to show up here (a debug build on a busy machine).
const PUSHED_WITHIN: Duration = Duration::from_secs(5);

fn slow_rounds(peers: Vec<PeerAddr>) -> NodeConfig {
    NodeConfig {
        sync_interval: ROUND,
        ..config(peers)
    }
}

fn put(key: &str, value: &str) -> DataRequest {
    DataRequest::Put {
        collection: "todo".into(),
        key: key.into(),
        value: Bytes64(value.as_bytes().to_vec()),
    }
}

fn read(node: &Node, key: &str) -> Option<Vec<u8>> {
    match node
        .data(DataRequest::Get {
            collection: "todo".into(),
            key: key.into(),
        })
        .expect("get")
    {
        DataResponse::Value(v) => v.map(|v| v.value.0),
        other => panic!("a get answered {other:?}"),
    }
}

fn refused_as_rate_limited(node: &Node) -> f64 {
    metric(
        &node.metrics().render(),
        "tend_handshake_refusals_total{reason=\"rate_limited\"}",
    )
    .unwrap_or(0.0)
}

/// Two members that know each other, their first rounds done and the minute-long wait
/// for the next ones begun.
async fn pair() -> (Fleet, Node, Node) {
    let mut fleet = Fleet::new(2, &[true, true]);
    let b = Node::start(fleet.take(1), slow_rounds(vec![]))
        .await
        .unwrap();
    let a = Node::start(fleet.take(0), slow_rounds(vec![b.peer_addr()]))
        .await
        .unwrap();
    b.add_peer(a.peer_addr()).unwrap();
    converge(&[&a, &b], Duration::from_secs(10)).await;
    (fleet, a, b)
}

/// A raw HTTP/1.1 request to the API (the test needs no HTTP client for one PUT).
async fn http(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reaches_the_peer_long_before_the_next_round() {
    let (_fleet, a, b) = pair().await;
    // Both sides count each session between them: a session of the setup that one side
    // has counted and the other not yet, or one about to start (b's first round with a
    // peer it was just told of), would pass for a pushed one below. Wait for the counts
    // to agree and stay put.
    let counts = || {
        (
            a.metrics().sessions_opened.get(),
            b.metrics().sessions_opened.get(),
        )
    };
    let settling = Instant::now();
    loop {
        let before = counts();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if before.0 == before.1 && counts() == before {
            break;
        }
        assert!(
            settling.elapsed() < PUSHED_WITHIN,
            "the setup's sessions never settled"
        );
    }
    let sessions_on_b = b.metrics().sessions_opened.get();

    // Node::data (the library's and the control socket's path).
    let t0 = Instant::now();
    a.data(put("milk", "2 litres")).unwrap();
    wait_until("the put to arrive on b", PUSHED_WITHIN, || {
        read(&b, "milk").as_deref() == Some(&b"2 litres"[..])
    })
    .await;
    let first = t0.elapsed();
    assert!(first < ROUND / 10, "took {first:?}");

    // An application fact (Node::add_fact).
    let fact = a.add_fact("note", b"pushed").unwrap();
    wait_until("the fact to arrive on b", PUSHED_WITHIN, || {
        b.device()
            .store()
            .get(fact.namespace(), fact.epoch(), &fact.id())
            .unwrap()
            .is_some()
    })
    .await;

    // The HTTP API.
    let token = "push-test-token".to_string();
    let listener = tend_node::api::bind(loopback()).unwrap();
    let api = tend_node::api::serve(&a, listener, token.clone()).unwrap();
    let answer = http(
        api,
        &format!("PUT /v1/kv/todo/eggs HTTP/1.1\r\nAuthorization: Bearer {token}"),
        b"a dozen",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_until("the API put to arrive on b", PUSHED_WITHIN, || {
        read(&b, "eggs").as_deref() == Some(&b"a dozen"[..])
    })
    .await;

    // What b received it pushed nowhere: b took part in the three sessions a pushed, one
    // per write (both sides count a session), and opened none of its own after them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sessions_on_b = b.metrics().sessions_opened.get() - sessions_on_b;
    assert!(
        sessions_on_b <= 3,
        "{sessions_on_b} sessions for three pushed writes"
    );
    converge(&[&a, &b], Duration::from_secs(1)).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_write_load_is_coalesced_and_never_refused_as_a_flood() {
    let (_fleet, a, b) = pair().await;
    let opened_before = a.metrics().sessions_opened.get();
    // 200 puts a second for two seconds, one at a time, as an application would.
    let writes = 400;
    let start = tokio::time::Instant::now();
    for i in 0..writes {
        tokio::time::sleep_until(start + Duration::from_millis(5 * i)).await;
        let a = a.clone();
        tokio::task::spawn_blocking(move || a.data(put(&format!("k{i:04}"), "v")).unwrap())
            .await
            .unwrap();
    }
    let last = format!("k{:04}", writes - 1);
    wait_until("the last put to arrive on b", PUSHED_WITHIN, || {
        read(&b, &last).is_some()
    })
    .await;
    converge(&[&a, &b], Duration::from_secs(5)).await;
    let rounds = a.metrics().sessions_opened.get() - opened_before;
    // Pushed rounds start at least 50 ms apart under the default limit of 25 sessions
    // a second: about 40 in two seconds, never one per write.
    assert!(rounds >= 2, "{rounds} pushed rounds");
    assert!(rounds <= 100, "{rounds} pushed rounds for {writes} writes");
    assert_eq!(refused_as_rate_limited(&b), 0.0);
    a.shutdown().await;
    b.shutdown().await;
}
