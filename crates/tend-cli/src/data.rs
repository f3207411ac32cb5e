//! `tend put`, `get`, `delete`, `scan`, `log ...` and `cache put|get`: application data,
//! through the running device's socket or on the stopped device's store, with one request
//! type (`tend_node::data`) for both.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, Subcommand};
use tend_node::data::{
    self, Bytes64, CacheRead, CacheValidity, DataRequest, DataResponse, LogEntry, ValueRead,
};

use crate::output::CmdResult;
use crate::output::Output;
use crate::target::Target;

#[derive(ClapArgs, Debug)]
pub struct PutArgs {
    pub collection: String,
    pub key: String,
    /// The value, as given (bytes of the argument). Or use --value-file.
    #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
    pub value: Option<String>,
    /// Read the value from a file, or from stdin with `-`.
    #[arg(long, value_name = "PATH")]
    pub value_file: Option<PathBuf>,
}

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

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Append an entry; prints its cursor.
    Append {
        log: String,
        /// The entry, as given. Or use --data-file.
        #[arg(required_unless_present = "data_file", conflicts_with = "data_file")]
        data: Option<String>,
        /// Read the entry from a file, or from stdin with `-`.
        #[arg(long, value_name = "PATH")]
        data_file: Option<PathBuf>,
    },
    /// Untrimmed entries in order, after a cursor.
    Read {
        log: String,
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Drop the entries below a cursor (the cursor's own entry stays).
    Trim {
        log: String,
        #[arg(long)]
        before: String,
    },
}

/// Runs one data request on the device in `home`.
fn run(home: &Path, request: DataRequest) -> Result<DataResponse, Box<dyn std::error::Error>> {
    Ok(match Target::open(home)? {
        Target::Running(mut c) => c.data(request)?,
        Target::Stopped(d) => data::run(&d, request)?,
    })
}

fn read_input(
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

fn unexpected() -> Box<dyn std::error::Error> {
    "the device answered with another kind of result".into()
}

fn written(r: DataResponse, what: String) -> CmdResult {
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
    let value = read_input(a.value, a.value_file)?;
    let len = value.len();
    let what = format!("put {}/{} ({len} bytes)", a.collection, a.key);
    let r = run(
        home,
        DataRequest::Put {
            collection: a.collection,
            key: a.key,
            value: Bytes64(value),
        },
    )?;
    written(r, what)
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
fn shown(v: &[u8]) -> String {
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

pub fn log(home: &Path, cmd: LogCommand) -> CmdResult {
    match cmd {
        LogCommand::Append {
            log,
            data,
            data_file,
        } => {
            let data = read_input(data, data_file)?;
            let what = format!("appended to {log}");
            written(
                run(
                    home,
                    DataRequest::LogAppend {
                        log,
                        data: Bytes64(data),
                    },
                )?,
                what,
            )
        }
        LogCommand::Read { log, after, limit } => {
            let DataResponse::Log(entries) = run(home, DataRequest::LogRead { log, after, limit })?
            else {
                return Err(unexpected());
            };
            let human = entries
                .iter()
                .map(|e: &LogEntry| format!("{}\t{}", e.cursor, shown(&e.data.0)))
                .collect::<Vec<_>>()
                .join("\n");
            Ok(Output::new(entries, human))
        }
        LogCommand::Trim { log, before } => {
            let what = format!("trimmed {log} before {before}");
            written(run(home, DataRequest::LogTrim { log, before })?, what)
        }
    }
}

pub fn cache_put(home: &Path, key: String, value: String) -> CmdResult {
    let what = format!("cached {key}");
    written(
        run(
            home,
            DataRequest::CachePut {
                key,
                value: Bytes64(value.into_bytes()),
            },
        )?,
        what,
    )
}

pub fn cache_get(home: &Path, key: String) -> CmdResult {
    let DataResponse::Cache(c) = run(home, DataRequest::CacheGet { key })? else {
        return Err(unexpected());
    };
    let CacheRead {
        key,
        validity,
        value,
        computed_at,
        floor,
    } = &c;
    let floor = floor.map_or("none".into(), |f| f.to_string());
    let human = match validity {
        CacheValidity::Absent => format!("{key}: absent (floor {floor})"),
        _ => format!(
            "{key}: {} {} (computed at epoch {}, floor {floor})",
            if *validity == CacheValidity::Valid {
                "valid"
            } else {
                "stale"
            },
            value.as_ref().map_or(String::new(), |v| shown(&v.0)),
            computed_at.unwrap_or_default(),
        ),
    };
    Ok(Output::new(c, human))
}
