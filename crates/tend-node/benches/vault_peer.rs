//! A 16 MiB value through a storage peer on loopback (real iroh, real redb), against the
//! same bytes sent plain over the same framing: encrypt and seal, `Put` round trip, `Get`
//! round trip, verify and decrypt. Prints medians of `TEND_BENCH_ROUNDS` (default 5) runs;
//! `TEND_BENCH_MIB` (default 16) sets the size.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use serde_bytes::ByteBuf;
use tend_core::maintenance::MaintenanceFact;
use tend_core::vault::StorageGrant;
use tend_core::{
    reduce, AuthorityFact, AuthorityGenesis, DeviceId, Epoch, GroupKey, JournalNamespace, Payload,
    UnsignedFact, VerifiedFact,
};
use tend_crypto::device::DeviceKey;
use tend_node::endpoint;
use tend_node::vault_peer::{StorageServer, VaultClient};
use tend_storage::member::{current_ring, epoch_key_facts, open_fetched, seal_for_storage};
use tend_storage::{Request, Response};

const SINK_ALPN: &[u8] = b"tend-bench/sink";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rate(bytes: usize, d: Duration) -> String {
    format!(
        "{:.1?} ({:.0} MiB/s)",
        d,
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    )
}

fn main() {
    let rounds: usize = std::env::var("TEND_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mib: usize = std::env::var("TEND_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(rounds, mib << 20));
}

async fn run(rounds: usize, size: usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let admin = SigningKey::generate(&mut OsRng);
    let genesis = AuthorityGenesis {
        nonce: [9; 32],
        members: vec![DeviceId(admin.verifying_key().to_bytes())],
        threshold: 1,
        group_key: GroupKey(admin.verifying_key().to_bytes()),
        admin: DeviceId(admin.verifying_key().to_bytes()),
    };
    let authority = genesis.authority_id();
    let ns = JournalNamespace::Authority(authority);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = StorageServer::start(&dir.path().join("storage"), authority, loopback)
        .await
        .expect("storage peer");
    let mut facts: Vec<VerifiedFact> = Vec::new();
    let sign = |payload: Payload, facts: &mut Vec<VerifiedFact>| {
        let epoch = Epoch(facts.len() as u64);
        facts.push(
            UnsignedFact {
                namespace: ns,
                epoch,
                payload,
            }
            .sign(&admin),
        );
    };
    sign(
        Payload::Authority(AuthorityFact::Genesis(genesis)),
        &mut facts,
    );
    for p in epoch_key_facts(&mut OsRng, &reduce(ns, &facts), &admin).expect("key") {
        sign(p, &mut facts);
    }
    sign(
        Payload::Maintenance(MaintenanceFact::StorageGrant(StorageGrant {
            peer: server.device_id(),
            granted: true,
        })),
        &mut facts,
    );
    let state = reduce(ns, &facts);
    let ring = current_ring(&state, &admin).expect("ring");
    let key = DeviceKey::from_signing_key(admin.clone());
    let addr = server.local_addr().expect("addr");
    let client = VaultClient::connect(&key, server.device_id(), addr)
        .await
        .expect("connect");
    let pushed = client
        .request(&Request::PushFacts {
            facts: facts
                .iter()
                .map(|f| ByteBuf::from(f.bytes().to_vec()))
                .collect(),
        })
        .await
        .expect("push");
    assert!(matches!(pushed, Response::FactsAdmitted { .. }));

    // The baseline: the same framing to an endpoint that reads the frame and answers a byte.
    let sink_key = DeviceKey::generate(&mut OsRng);
    let sink = endpoint::bind_alpns(&sink_key, loopback, vec![SINK_ALPN.to_vec()])
        .await
        .expect("sink");
    let sink_addr = endpoint::endpoint_addr(
        sink_key.device_id(),
        endpoint::local_addr(&sink).expect("addr"),
    )
    .expect("sink addr");
    let sink_task = tokio::spawn({
        let sink = sink.clone();
        async move {
            while let Some(incoming) = sink.accept().await {
                let Ok(conn) = incoming.await else { continue };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let frame = endpoint::read_frame(&mut recv, usize::MAX)
                        .await
                        .expect("frame");
                    endpoint::write_frame(&mut send, &frame[..1])
                        .await
                        .expect("answer");
                    let _ = send.finish();
                }
            }
        }
    });
    let out = endpoint::bind_alpns(&DeviceKey::generate(&mut OsRng), loopback, Vec::new())
        .await
        .expect("client endpoint");
    let sink_conn = out.connect(sink_addr, SINK_ALPN).await.expect("sink conn");

    let plain: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (mut enc, mut put, mut get, mut open, mut raw) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let start = Instant::now();
        let (request, cid) = seal_for_storage(&mut OsRng, &state, &plain).expect("seal");
        enc.push(start.elapsed());
        let start = Instant::now();
        let stored = client.request(&request).await.expect("put");
        put.push(start.elapsed());
        assert_eq!(stored, Response::Stored { cid });
        let start = Instant::now();
        let Response::Blob {
            blob,
            sealed_key,
            to_epoch,
            cfrags,
        } = client.request(&Request::Get { cid }).await.expect("get")
        else {
            panic!("the blob is there");
        };
        get.push(start.elapsed());
        let start = Instant::now();
        let opened =
            open_fetched(&state, &ring, &cid, &blob, &sealed_key, to_epoch, &cfrags).expect("open");
        open.push(start.elapsed());
        assert_eq!(opened.len(), plain.len());

        let start = Instant::now();
        let (mut send, mut recv) = sink_conn.open_bi().await.expect("bi");
        endpoint::write_frame(&mut send, &plain)
            .await
            .expect("send");
        let _ = send.finish();
        endpoint::read_frame(&mut recv, 1).await.expect("answer");
        raw.push(start.elapsed());
    }
    println!(
        "vault_peer/{}MiB/encrypt_and_seal: {}",
        size >> 20,
        rate(size, median(enc))
    );
    println!(
        "vault_peer/{}MiB/put_round_trip: {}",
        size >> 20,
        rate(size, median(put))
    );
    println!(
        "vault_peer/{}MiB/get_round_trip: {}",
        size >> 20,
        rate(size, median(get))
    );
    println!(
        "vault_peer/{}MiB/verify_and_decrypt: {}",
        size >> 20,
        rate(size, median(open))
    );
    println!(
        "vault_peer/{}MiB/plain_frame_same_transport: {}",
        size >> 20,
        rate(size, median(raw))
    );
    client.close().await;
    sink_task.abort();
    server.shutdown().await;
}
