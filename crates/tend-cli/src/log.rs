//! `tend log append|read|trim`: append-only application logs with stable cursors.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use tend_node::data::{Bytes64, DataRequest, DataResponse, LogEntry};

use crate::data::{import, read_input, run, shown, unexpected, written, DEFAULT_IMPORT_BATCH};
use crate::output::{CmdResult, Output};

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Append an entry; prints its cursor. With --ndjson, append many.
    Append {
        log: String,
        /// The entry, as given. Or use --data-file.
        #[arg(
            required_unless_present_any = ["data_file", "ndjson"],
            conflicts_with_all = ["data_file", "ndjson"]
        )]
        data: Option<String>,
        /// Read the entry from a file, or from stdin with `-`.
        #[arg(long, value_name = "PATH", conflicts_with = "ndjson")]
        data_file: Option<PathBuf>,
        /// Bulk import: entries from newline-delimited JSON, a file or `-` for stdin, in
        /// the order of the lines. Each line is one object, `{"data": "text"}`, or
        /// `{"data_b64": "<base64>"}` for bytes; no other field; blank lines are skipped.
        /// The entries are written in batches of --batch-size lines, each batch one
        /// transaction. Every line of a batch is checked before the batch is sent: a bad
        /// line is refused with its number and nothing of its batch, nor after it, is
        /// written, while the batches before it stay written (the error names the line to
        /// resume from). Works on a stopped device and through a running one's socket.
        #[arg(long, value_name = "FILE", verbatim_doc_comment)]
        ndjson: Option<PathBuf>,
        /// Lines per transaction with --ndjson (through a running device's socket a batch
        /// also stops short of the socket's request size limit).
        #[arg(long, default_value_t = DEFAULT_IMPORT_BATCH, requires = "ndjson")]
        batch_size: usize,
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

/// A line of `tend log append --ndjson`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendLine {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    data_b64: Option<Bytes64>,
}

pub fn log(home: &Path, cmd: LogCommand) -> CmdResult {
    match cmd {
        LogCommand::Append {
            log,
            data,
            data_file,
            ndjson: Some(input),
            batch_size,
        } => {
            let what = format!("entries to {log}");
            let to_request = move |line: &str| {
                let l: AppendLine = serde_json::from_str(line)?;
                let data = match (l.data, l.data_b64) {
                    (Some(d), None) => d.into_bytes(),
                    (None, Some(b)) => b.0,
                    _ => return Err("give exactly one of \"data\" and \"data_b64\"".into()),
                };
                Ok(DataRequest::LogAppend {
                    log: log.clone(),
                    data: Bytes64(data),
                })
            };
            let _ = (data, data_file);
            import(home, &input, batch_size, &what, to_request)
        }
        LogCommand::Append {
            log,
            data,
            data_file,
            ndjson: None,
            ..
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
