//! Log lines on stderr through `tracing-subscriber`, installed once for every command.
//!
//! `RUST_LOG` chooses what is logged (default: warnings and errors of the tend crates);
//! `--log-format` chooses text or one JSON object per line. A failing command prints its
//! one error line after every log line, so the error stays the last line on stderr.

use tracing_subscriber::EnvFilter;

/// The shape of a log line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  WARN tend_node::node: message`.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Warnings and errors of the tend crates, when `RUST_LOG` is unset or invalid.
const DEFAULT_FILTER: &str = "tend=warn,tend_cli=warn,tend_core=warn,tend_crypto=warn,\
tend_store=warn,tend_sync=warn,tend_snapshot=warn,tend_node=warn,tend_backup=warn";

fn filter() -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    }
}

/// Installs the global subscriber (once; a second call does nothing).
pub fn install(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
