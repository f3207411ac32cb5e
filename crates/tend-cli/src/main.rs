//! The `tend` binary: parses arguments, runs one command, prints human or `--json` output.
//!
//! Errors print as one line on stderr (`error: ...`) with a non-zero exit code.

mod backup;
mod cli;
mod devnet;
mod maint;
mod net;
mod output;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's usage text spans lines; keep the one line that says what is wrong.
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see tend --help)", line.trim_end());
            return ExitCode::from(2);
        }
    };
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
