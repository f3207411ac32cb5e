//! Interoperability of `tend-negentropy` with the JavaScript negentropy v1 implementation
//! (the port of the reference Negentropy.js in the `@nostr-dev-kit/sync` npm package), driven over the reference harness line protocol:
//! both directions over random item sets, byte-for-byte equal message traces, frame size
//! limits, and the downgrade answer. The JavaScript side is installed with npm into the
//! target directory on first use; without node or npm the JS tests print a note and pass.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A JavaScript port of the reference Negentropy.js with both roles and the downgrade answer.
const JS_PACKAGE: &str = "@nostr-dev-kit/sync@1.0.0";

fn ours() -> Vec<String> {
    vec![env!("CARGO_BIN_EXE_tend-negentropy").to_string()]
}

/// The directory holding the JS harness with its dependencies, or `None` (with a note)
/// when node or npm is not available.
fn js_dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("negentropy-js");
        let node = Command::new("node").arg("--version").output();
        if !node.is_ok_and(|o| o.status.success()) {
            eprintln!("note: node is not installed; skipping the JavaScript interop tests");
            return None;
        }
        let lib = dir.join("node_modules/@nostr-dev-kit/sync/dist/index.js");
        if !lib.exists() {
            std::fs::create_dir_all(&dir).ok()?;
            let status = Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&dir)
                .arg(JS_PACKAGE)
                .status();
            if !status.is_ok_and(|s| s.success()) || !lib.exists() {
                eprintln!(
                    "note: npm install {JS_PACKAGE} failed; skipping the JavaScript interop tests"
                );
                return None;
            }
        }
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/harness.mjs");
        std::fs::copy(src, dir.join("harness.mjs")).ok()?;
        Some(dir)
    })
    .as_ref()
}

fn js() -> Option<Vec<String>> {
    js_dir().map(|d| vec!["node".into(), d.join("harness.mjs").display().to_string()])
}

struct Harness {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Harness {
    fn spawn(cmd: &[String], frame_limit: u64) -> Self {
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("FRAMESIZELIMIT", frame_limit.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("harness starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("harness reads");
    }

    fn flush(&mut self) {
        self.stdin.flush().expect("harness reads");
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("harness writes");
        assert!(!s.is_empty(), "harness ended early");
        s.trim_end().to_string()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(timestamp, hex id)` items.
type Items = Vec<(u64, String)>;

/// Random item sets in the manner of the reference fuzz test: each item goes to side 1,
/// side 2 or both with the given weights.
fn random_sets(seed: u64, n: usize, p: (u32, u32, u32)) -> (Items, Items) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let ts = 1_677_970_534 + rng.gen_range(0..n as u64);
        let id: [u8; 32] = rng.gen();
        let item = (ts, hex::encode(id));
        let r = rng.gen_range(0..p.0 + p.1 + p.2);
        if r < p.0 {
            a.push(item);
        } else if r < p.0 + p.1 {
            b.push(item);
        } else {
            a.push(item.clone());
            b.push(item);
        }
    }
    (a, b)
}

struct Run {
    trace: Vec<String>,
    have: BTreeSet<String>,
    need: BTreeSet<String>,
    rounds: usize,
    max_msg: usize,
}

/// Drives a client and a server like the reference fuzz driver.
fn reconcile(client: &[String], server: &[String], a: &Items, b: &Items, limit: u64) -> Run {
    let mut c = Harness::spawn(client, limit);
    let mut s = Harness::spawn(server, limit);
    for (ts, id) in a {
        c.send(&format!("item,{ts},{id}"));
    }
    for (ts, id) in b {
        s.send(&format!("item,{ts},{id}"));
    }
    c.send("seal");
    s.send("seal");
    s.flush();
    c.send("initiate");
    c.flush();
    let mut run = Run {
        trace: vec![],
        have: BTreeSet::new(),
        need: BTreeSet::new(),
        rounds: 0,
        max_msg: 0,
    };
    loop {
        let l = c.line();
        if let Some(id) = l.strip_prefix("have,") {
            run.have.insert(id.to_string());
        } else if let Some(id) = l.strip_prefix("need,") {
            run.need.insert(id.to_string());
        } else if l == "done" {
            break;
        } else if let Some(m) = l.strip_prefix("msg,") {
            run.max_msg = run.max_msg.max(m.len() / 2);
            run.trace.push(format!("C {m}"));
            s.send(&l);
            s.flush();
            let r = s.line();
            let m = r.strip_prefix("msg,").expect("server answers msg");
            run.max_msg = run.max_msg.max(m.len() / 2);
            run.trace.push(format!("S {m}"));
            c.send(&r);
            c.flush();
            run.rounds += 1;
            assert!(run.rounds < 1000, "no termination");
        } else {
            panic!("unexpected client line {l:?}");
        }
    }
    run
}

fn check(run: &Run, a: &Items, b: &Items, limit: u64) {
    let sa: BTreeSet<&String> = a.iter().map(|(_, id)| id).collect();
    let sb: BTreeSet<&String> = b.iter().map(|(_, id)| id).collect();
    let have: BTreeSet<&String> = sa.difference(&sb).copied().collect();
    let need: BTreeSet<&String> = sb.difference(&sa).copied().collect();
    assert_eq!(run.have.iter().collect::<BTreeSet<_>>(), have);
    assert_eq!(run.need.iter().collect::<BTreeSet<_>>(), need);
    if limit > 0 {
        assert!(
            run.max_msg as u64 <= limit,
            "message of {} bytes over the limit {limit}",
            run.max_msg
        );
    }
}

#[test]
fn ours_against_ours_over_random_sets() {
    for (seed, n, p, limit) in [
        (1, 2000, (1, 1, 8), 0),
        (2, 5000, (1, 0, 0), 0),
        (3, 5000, (0, 1, 0), 4096),
        (4, 10_000, (1, 1, 10), 8192),
        (5, 0, (1, 1, 1), 0),
    ] {
        let (a, b) = random_sets(seed, n, p);
        let run = reconcile(&ours(), &ours(), &a, &b, limit);
        check(&run, &a, &b, limit);
    }
}

#[test]
fn downgrade_answer_and_garbage() {
    let mut s = Harness::spawn(&ours(), 0);
    s.send("item,12345,eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee");
    s.send("seal");
    // A hypothetical newer version: answered with our version byte alone.
    s.send("msg,62aabbccddeeff");
    s.flush();
    assert_eq!(s.line(), "msg,61");
    // Then a v1 query (full range, empty id list) gets the normal answer.
    s.send("msg,6100000200");
    s.flush();
    let answer = s.line();
    assert!(answer.starts_with("msg,61"));
    assert!(answer.contains("eeeeeeee"));
    drop(s);

    // An initiator does not accept a downgrade it cannot follow, and garbage ends the
    // process with an error line rather than a panic.
    for input in ["initiate\nmsg,62\n", "msg,61\n", "bogus\n", "item,x,00\n"] {
        let out = Command::new(&ours()[0])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                let mut i = c.stdin.take().unwrap();
                i.write_all(format!("seal\n{input}").as_bytes())?;
                drop(i);
                c.wait_with_output()
            })
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if input.starts_with("initiate") || input == "bogus\n" || input.starts_with("item") {
            assert_eq!(out.status.code(), Some(1), "{input:?}");
            assert!(stderr.starts_with("tend-negentropy: "), "{stderr}");
            assert!(!stderr.contains("panicked"));
        }
    }
}

#[test]
fn interoperates_with_the_javascript_implementation() {
    let Some(js) = js() else { return };
    for (seed, n, p, limit) in [
        (10, 2000, (1, 1, 8), 0),
        (11, 1000, (1, 0, 0), 0),
        (12, 1000, (0, 1, 0), 0),
        (13, 8000, (1, 1, 10), 4096),
        (14, 6000, (1, 1, 2), 4096),
    ] {
        let (a, b) = random_sets(seed, n, p);
        for (client, server) in [(&ours(), &js), (&js, &ours())] {
            let run = reconcile(client, server, &a, &b, limit);
            check(&run, &a, &b, limit);
        }
    }
}

fn same_trace(a: &[String], b: &[String], seed: u64) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            let at = x.bytes().zip(y.bytes()).take_while(|(p, q)| p == q).count();
            panic!(
                "seed {seed}: message {i} differs at hex offset {at} (lengths {} and {}):\n{}\n{}",
                x.len(),
                y.len(),
                &x[at.saturating_sub(40)..(at + 80).min(x.len())],
                &y[at.saturating_sub(40)..(at + 80).min(y.len())]
            );
        }
    }
    assert_eq!(a.len(), b.len(), "seed {seed}: trace lengths");
}

/// One range of a negentropy v1 message, with the bound's id zero-padded to 32 bytes.
#[derive(Debug, PartialEq, Eq)]
struct Range {
    timestamp: u64,
    bound: Vec<u8>,
    mode: u64,
    payload: Vec<u8>,
}

fn varint(b: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    while let Some((&x, rest)) = b.split_first() {
        *b = rest;
        v = (v << 7) | u64::from(x & 0x7f);
        if x & 0x80 == 0 {
            break;
        }
    }
    v
}

fn take(b: &mut &[u8], n: usize) -> Vec<u8> {
    let (h, t) = b.split_at(n.min(b.len()));
    *b = t;
    h.to_vec()
}

/// Parses a message into ranges, so bounds compare by meaning, not by id-prefix length.
fn parse(hex_msg: &str) -> (u8, Vec<Range>) {
    let raw = hex::decode(hex_msg).unwrap();
    let (&version, mut b) = raw.split_first().unwrap();
    let (mut out, mut last) = (Vec::new(), 0u64);
    while !b.is_empty() {
        let t = varint(&mut b);
        let timestamp = if t == 0 {
            u64::MAX
        } else {
            last.saturating_add(t - 1)
        };
        last = timestamp;
        let len = varint(&mut b) as usize;
        let mut bound = take(&mut b, len);
        bound.resize(32, 0);
        let mode = varint(&mut b);
        let payload = match mode {
            1 => take(&mut b, 16),
            2 => {
                let n = varint(&mut b) as usize;
                take(&mut b, 32 * n)
            }
            _ => Vec::new(),
        };
        out.push(Range {
            timestamp,
            bound,
            mode,
            payload,
        });
    }
    (version, out)
}

fn same_meaning(a: &[String], b: &[String], seed: u64) {
    assert_eq!(a.len(), b.len(), "seed {seed}: trace lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(&x[..2], &y[..2], "seed {seed}: message {i} direction");
        assert_eq!(parse(&x[2..]), parse(&y[2..]), "seed {seed}: message {i}");
    }
}

/// Against the JavaScript implementation, every message of a session, initiator's and
/// responder's alike, is the same as ours, in both pairings and JS against JS. With our
/// responder and no bound echoed, the bytes are identical; otherwise they are compared range by range,
/// because this JS port pads every decoded bound to 32 id bytes and echoes it so, where the
/// reference implementations and we echo the bound's own length (both mean the same bound).
/// Under a frame size limit the traces may differ in where a frame is cut: negentropy 0.5.3
/// fingerprints the rest from the last range it wrote, not from the end of the range it
/// dropped (the reference's choice, which can hide a difference in the dropped range), so
/// there only convergence and the frame bound are checked.
#[test]
fn messages_match_those_of_the_javascript_implementation() {
    let Some(js) = js() else { return };
    for (seed, n, p, limit) in [
        (20, 3000, (1, 0, 0), 0),
        (21, 3000, (0, 1, 0), 0),
        (22, 3000, (0, 0, 1), 0),
        (23, 5000, (1, 1, 10), 0),
        (24, 8000, (1, 1, 10), 8192),
        (25, 6000, (1, 1, 2), 4096),
    ] {
        let (a, b) = random_sets(seed, n, p);
        let rust = reconcile(&ours(), &ours(), &a, &b, limit);
        for (client, server, our_server) in [
            (&js, &ours(), true),
            (&ours(), &js, false),
            (&js, &js, false),
        ] {
            let other = reconcile(client, server, &a, &b, limit);
            if seed <= 22 && our_server {
                same_trace(&rust.trace, &other.trace, seed);
            }
            if limit == 0 {
                same_meaning(&rust.trace, &other.trace, seed);
            }
            check(&other, &a, &b, limit);
        }
    }
}
