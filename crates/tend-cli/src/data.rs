//! `tend put`, `get`, `delete` and `scan` (collections), and what every data command
//! (these, `tend log` and `tend cache put|get`) shares: one `tend_node::data` request,
//! through the running device's socket or on the stopped device's store, and bulk import.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use clap::Args as ClapArgs;
use tend_node::data::{self, Bytes64, DataRequest, DataResponse, ValueRead};

use crate::output::CmdResult;
use crate::output::Output;
use crate::target::Target;

#[derive(ClapArgs, Debug)]
pub struct PutArgs {
    pub collection: String,
    /// The key (not with --ndjson, whose lines name their keys).
    #[arg(required_unless_present = "ndjson", conflicts_with = "ndjson")]
    pub key: Option<String>,
    /// The value, as given (bytes of the argument). Or use --value-file.
    #[arg(
        required_unless_present_any = ["value_file", "ndjson"],
        conflicts_with_all = ["value_file", "ndjson"]
    )]
    pub value: Option<String>,
    /// Read the value from a file, or from stdin with `-`.
    #[arg(long, value_name = "PATH", conflicts_with = "ndjson")]
    pub value_file: Option<PathBuf>,
    /// Bulk import: puts from newline-delimited JSON, a file or `-` for stdin. Each line
    /// is one object, `{"key": "k", "value": "text"}`, or with `"value_b64": "<base64>"`
    /// instead of `"value"` for bytes; no other field; blank lines are skipped. The puts
    /// are written in batches of --batch-size lines, each batch one transaction (a key
    /// written twice reads as its later line). Every line of a batch is checked before the
    /// batch is sent: a bad line is refused with its number and nothing of its batch, nor
    /// after it, is written, while the batches before it stay written (the error names the
    /// line to resume from). Works on a stopped device and through a running one's socket.
    #[arg(long, value_name = "FILE", verbatim_doc_comment)]
    pub ndjson: Option<PathBuf>,
    /// Lines per transaction with --ndjson (through a running device's socket a batch
    /// also stops short of the socket's request size limit).
    #[arg(long, default_value_t = DEFAULT_IMPORT_BATCH, requires = "ndjson")]
    pub batch_size: usize,
}

/// Lines per transaction of a bulk import: large enough for batch speed, small enough that
/// a batch holds well under a second of writes.
pub const DEFAULT_IMPORT_BATCH: usize = 10_000;

#[derive(ClapArgs, Debug)]
pub struct KeyArgs {
    pub collection: String,
    pub key: String,
}

#[derive(ClapArgs, Debug)]
pub struct ScanArgs {
    pub collection: String,
    /// Only keys starting with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Start after this key (the last key of the previous page).
    #[arg(long)]
    pub after: Option<String>,
    /// At most this many keys.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// Runs one data request on the device in `home`.
pub(crate) fn run(
    home: &Path,
    request: DataRequest,
) -> Result<DataResponse, Box<dyn std::error::Error>> {
    Target::open(home)?.run(request)
}

pub(crate) fn read_input(
    given: Option<String>,
    file: Option<PathBuf>,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    match (given, file) {
        (Some(v), _) => Ok(v.into_bytes()),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .take(data::MAX_VALUE_BYTES as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            Ok(buf)
        }
        (None, Some(p)) => {
            std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()).into())
        }
        (None, None) => Err("give a value or a file".into()),
    }
}

pub(crate) fn unexpected() -> Box<dyn std::error::Error> {
    "the device answered with another kind of result".into()
}

pub(crate) fn written(r: DataResponse, what: String) -> CmdResult {
    let DataResponse::Written(w) = r else {
        return Err(unexpected());
    };
    let mut human = format!("{what} (fact {} at epoch {})", w.id, w.epoch);
    if let Some(c) = &w.cursor {
        human = format!("{c}\n{human}");
    }
    Ok(Output::new(w, human))
}

pub fn put(home: &Path, a: PutArgs) -> CmdResult {
    if let Some(input) = &a.ndjson {
        let collection = a.collection.clone();
        let to_request = move |line: &str| {
            let l: PutLine = serde_json::from_str(line)?;
            let value = match (l.value, l.value_b64) {
                (Some(v), None) => v.into_bytes(),
                (None, Some(b)) => b.0,
                _ => return Err("give exactly one of \"value\" and \"value_b64\"".into()),
            };
            Ok(DataRequest::Put {
                collection: collection.clone(),
                key: l.key,
                value: Bytes64(value),
            })
        };
        let what = format!("puts into {}", a.collection);
        return import(home, input, a.batch_size, &what, to_request);
    }
    let key = a.key.ok_or("give a key")?;
    let value = read_input(a.value, a.value_file)?;
    let len = value.len();
    let what = format!("put {}/{key} ({len} bytes)", a.collection);
    let r = run(
        home,
        DataRequest::Put {
            collection: a.collection,
            key,
            value: Bytes64(value),
        },
    )?;
    written(r, what)
}

/// A line of `tend put --ndjson`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutLine {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_b64: Option<Bytes64>,
}

/// What a bulk import wrote.
#[derive(serde::Serialize)]
struct Imported {
    /// Writes committed.
    written: u64,
    /// Transactions they were committed in.
    batches: u64,
    /// Lines read (blank ones included).
    lines: u64,
    /// The last write's fact (and, for a log, its cursor).
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<data::Written>,
}

/// Bytes of a data request through the control socket, below its limit: room for the
/// request's envelope (`{"v":1,"cmd":"data","op":"batch","ops":[...]}`).
const SOCKET_BATCH_BYTES: usize = tend_node::control::MAX_REQUEST_BYTES - 1024;

/// Writes the requests the lines of `input` make, in batches of `batch_size`, one
/// transaction each, on the stopped device or through the running one's socket.
pub(crate) fn import(
    home: &Path,
    input: &Path,
    batch_size: usize,
    what: &str,
    to_request: impl Fn(&str) -> Result<DataRequest, Box<dyn std::error::Error>>,
) -> CmdResult {
    if batch_size == 0 || batch_size > data::MAX_BATCH {
        return Err(format!("--batch-size must be 1 to {}", data::MAX_BATCH).into());
    }
    let reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(input)
            .map_err(|e| format!("cannot read {}: {e}", input.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut target = Target::open(home)?;
    let socket = matches!(target, Target::Running(_));
    let mut done = Imported {
        written: 0,
        batches: 0,
        lines: 0,
        last: None,
    };
    let mut ops: Vec<DataRequest> = Vec::new();
    let mut bytes = 0;
    // The first line of the batch being gathered.
    let mut batch_start = 1;
    let resume = |batch_start: u64, done: &Imported| {
        if done.written == 0 {
            "nothing was written".to_string()
        } else {
            format!(
                "lines 1 to {} are written ({} {what}); nothing from line {batch_start} on \
                 was written: resume from there",
                batch_start - 1,
                done.written
            )
        }
    };
    let mut lines = reader.split(b'\n');
    loop {
        let line = lines.next();
        let n = done.lines + 1;
        let request = match &line {
            None => None,
            Some(Err(e)) => return Err(format!("cannot read {}: {e}", input.display()).into()),
            Some(Ok(raw)) => {
                done.lines = n;
                let text = std::str::from_utf8(raw)
                    .map_err(|_| "the line is not UTF-8".to_string())
                    .map(|t| t.trim_end_matches('\r'));
                let request = text.map_err(Into::into).and_then(|t| {
                    if t.trim().is_empty() {
                        return Ok(None);
                    }
                    let r = to_request(t)?;
                    data::check_write(&r)?;
                    Ok(Some(r))
                });
                match request {
                    Ok(None) => continue,
                    Ok(Some(r)) => Some(r),
                    Err(e) => {
                        let e: Box<dyn std::error::Error> = e;
                        return Err(format!("line {n}: {e}; {}", resume(batch_start, &done)).into());
                    }
                }
            }
        };
        let size = match (&request, socket) {
            (Some(r), true) => serde_json::to_vec(r)?.len() + 1,
            _ => 0,
        };
        if socket && size > SOCKET_BATCH_BYTES {
            return Err(format!(
                "line {n}: the write is {size} bytes of JSON, more than a request through \
                 the running device's socket holds ({SOCKET_BATCH_BYTES}): stop the device \
                 to import it; {}",
                resume(batch_start, &done)
            )
            .into());
        }
        let full = ops.len() >= batch_size || (socket && bytes + size > SOCKET_BATCH_BYTES);
        if !ops.is_empty() && (request.is_none() || full) {
            let count = ops.len() as u64;
            let batch = DataRequest::Batch {
                ops: std::mem::take(&mut ops),
            };
            let answer = target.run(batch);
            let written = match answer {
                Ok(DataResponse::Batch(w)) => w,
                Ok(_) => return Err(unexpected()),
                Err(e) => {
                    let e: Box<dyn std::error::Error> = e;
                    return Err(format!(
                        "the device refused the batch of lines {batch_start} to {}: {}; {}",
                        n - 1,
                        tend_node::control::error_line(&*e),
                        resume(batch_start, &done)
                    )
                    .into());
                }
            };
            done.written += count;
            done.batches += 1;
            done.last = written.into_iter().last().or(done.last.take());
            batch_start = n;
            bytes = 0;
        }
        let Some(request) = request else { break };
        if ops.is_empty() {
            batch_start = n;
        }
        bytes += size;
        ops.push(request);
    }
    let mut human = format!(
        "imported {} {what} from {} lines in {} transaction{}",
        done.written,
        done.lines,
        done.batches,
        if done.batches == 1 { "" } else { "s" }
    );
    if let Some(c) = done.last.as_ref().and_then(|l| l.cursor.as_ref()) {
        human.push_str(&format!("; last cursor {c}"));
    }
    Ok(Output::new(done, human))
}

pub fn get(home: &Path, a: KeyArgs) -> CmdResult {
    let r = run(
        home,
        DataRequest::Get {
            collection: a.collection.clone(),
            key: a.key.clone(),
        },
    )?;
    match r {
        DataResponse::Value(Some(v)) => {
            let raw = v.value.0.clone();
            Ok(Output::raw(v, raw))
        }
        DataResponse::Value(None) => Err(format!("{}/{} is absent", a.collection, a.key).into()),
        _ => Err(unexpected()),
    }
}

pub fn delete(home: &Path, a: KeyArgs) -> CmdResult {
    let what = format!("deleted {}/{}", a.collection, a.key);
    let r = run(
        home,
        DataRequest::Delete {
            collection: a.collection,
            key: a.key,
        },
    )?;
    written(r, what)
}

/// A value for a terminal: text as it is, anything else as its size.
pub(crate) fn shown(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => format!("<{} bytes>", v.len()),
    }
}

pub fn scan(home: &Path, a: ScanArgs) -> CmdResult {
    let r = run(
        home,
        DataRequest::Scan {
            collection: a.collection,
            prefix: a.prefix,
            after: a.after,
            limit: a.limit,
        },
    )?;
    let DataResponse::Scan(rows) = r else {
        return Err(unexpected());
    };
    let human = rows
        .iter()
        .map(|v: &ValueRead| {
            let conflicts = if v.conflicts.is_empty() {
                String::new()
            } else {
                format!("  ({} conflicting)", v.conflicts.len())
            };
            format!("{}\t{}{conflicts}", v.key, shown(&v.value.0))
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Output::new(rows, human))
}
