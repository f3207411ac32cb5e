//! The `tend` binary: parses arguments, runs one command, prints human or `--json` output.
//!
//! Errors print as one line on stderr (`error: ...`) with a non-zero exit code.

mod admin;
mod authority;
mod backup;
mod cache;
mod cli;
mod completions;
mod data;
mod devnet;
mod devnet_vault;
mod fact;
mod gc;
mod init;
mod journal;
mod limits;
mod log;
mod logs;
mod man;
mod output;
mod peers;
mod progress;
mod rendezvous;
mod run;
mod snapshot;
mod status;
mod sync;
mod target;
mod upgrade;
mod vault;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tend_node::allocator::bound_arenas();
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's usage text spans lines; keep the first paragraph, which says what is
            // wrong (a missing argument's name is on the lines after the first), as one line.
            let rendered = e.render().to_string();
            let what: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let line = if what.is_empty() {
                "invalid arguments".to_string()
            } else {
                what.join(" ")
            };
            eprintln!("{line} (see tend --help)");
            return ExitCode::from(2);
        }
    };
    logs::install(args.log_format);
    let json = args.json;
    match cli::run(args) {
        Ok(out) => {
            output::print(&out, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::print_error(&*e, json);
            ExitCode::FAILURE
        }
    }
}
