//! `tend-negentropy`: our negentropy v1 reconciler behind the line protocol of the reference
//! implementation's test harness, for interoperability tests against the C++ and
//! JavaScript implementations.
//!
//! Input lines: `item,<timestamp>,<hex id>` (any number), `seal`, then `initiate` (client)
//! and/or `msg,<hex>`. Output lines: `msg,<hex>` for each message to send; as client also
//! `have,<hex id>` / `need,<hex id>` and `done` when reconciliation ends. The frame size
//! limit comes from `FRAMESIZELIMIT` (0 or unset: none). Bad input ends the process with
//! one line on stderr and exit status 1.

use std::io::{self, BufRead, Write};
use std::sync::Arc;

use tend_core::{ContextId, Epoch, FactId, JournalNamespace};
use tend_sync::{MemItems, ReconcileError, Reconciler, SyncItem};

#[derive(Debug, thiserror::Error)]
enum HarnessError {
    #[error("line {line}: {what}")]
    Input { line: usize, what: String },
    #[error("line {line}: {source}")]
    Reconcile { line: usize, source: ReconcileError },
    #[error("FRAMESIZELIMIT must be a non-negative integer, got {0:?}")]
    FrameLimit(String),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

fn frame_limit() -> Result<u64, HarnessError> {
    match std::env::var("FRAMESIZELIMIT") {
        Ok(v) if v.trim().is_empty() => Ok(0),
        Ok(v) => v.trim().parse().map_err(|_| HarnessError::FrameLimit(v)),
        Err(_) => Ok(0),
    }
}

fn run() -> Result<(), HarnessError> {
    let limit = frame_limit()?;
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let namespace = JournalNamespace::Context(ContextId([0; 32]));
    let mut items: Vec<SyncItem> = Vec::new();
    let mut recon: Option<Reconciler> = None;

    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        let lineno = n + 1;
        let bad = |what: String| HarnessError::Input { line: lineno, what };
        let rec = |source| HarnessError::Reconcile {
            line: lineno,
            source,
        };
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        match fields[0] {
            "item" => {
                if recon.is_some() {
                    return Err(bad("item after seal".into()));
                }
                let [_, ts, id] = fields[..] else {
                    return Err(bad("expected item,<timestamp>,<hex id>".into()));
                };
                let epoch = ts
                    .parse::<u64>()
                    .map_err(|_| bad(format!("bad timestamp {ts:?}")))?;
                let mut raw = [0u8; 32];
                hex::decode_to_slice(id, &mut raw)
                    .map_err(|_| bad(format!("id must be 32 bytes of hex, got {id:?}")))?;
                items.push(SyncItem {
                    epoch: Epoch(epoch),
                    id: FactId(raw),
                });
            }
            "seal" => {
                if recon.is_some() {
                    return Err(bad("already sealed".into()));
                }
                let snapshot = Arc::new(MemItems::new(namespace, std::mem::take(&mut items)));
                recon = Some(Reconciler::new(snapshot, limit).map_err(rec)?);
            }
            "initiate" => {
                let r = recon
                    .as_mut()
                    .ok_or_else(|| bad("initiate before seal".into()))?;
                let msg = r.initiate().map_err(rec)?;
                writeln!(out, "msg,{}", hex::encode(msg))?;
            }
            "msg" => {
                let r = recon
                    .as_mut()
                    .ok_or_else(|| bad("msg before seal".into()))?;
                let payload = fields.get(1).copied().unwrap_or("");
                let msg = hex::decode(payload).map_err(|_| bad("msg is not hex".into()))?;
                if r.is_initiator() {
                    let step = r.step(&msg).map_err(rec)?;
                    for id in &step.have {
                        writeln!(out, "have,{}", hex::encode(id.0))?;
                    }
                    for id in &step.need {
                        writeln!(out, "need,{}", hex::encode(id.0))?;
                    }
                    match step.next {
                        Some(next) => writeln!(out, "msg,{}", hex::encode(next))?,
                        None => writeln!(out, "done")?,
                    }
                } else {
                    let answer = r.respond(&msg).map_err(rec)?;
                    writeln!(out, "msg,{}", hex::encode(answer))?;
                }
            }
            other => return Err(bad(format!("unknown command {other:?}"))),
        }
        // The driver waits for each answer before writing more.
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tend-negentropy: {e}");
        std::process::exit(1);
    }
}
