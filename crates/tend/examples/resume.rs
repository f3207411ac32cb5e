//! A subscription that resumes after a restart: `cargo run -p tend --example resume [DIR]`.
//!
//! Each run opens (or creates) the device in `DIR/home`, writes one note, prints every
//! change after the cursor the previous run saved in `DIR/cursor`, and saves the cursor of
//! the last change it printed. Run it twice with the same DIR: the second run prints only
//! what came after the first. Without DIR, it makes a temporary one and runs twice itself.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use tend::{ChangeKind, Cursor, Device};

async fn run_once(dir: &Path, note: &str) -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::open_or_create(dir.join("home"))?;
    let cursor_file = dir.join("cursor");
    let saved = match std::fs::read_to_string(&cursor_file) {
        Ok(s) => s.parse::<Cursor>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cursor::START,
        Err(e) => return Err(e.into()),
    };
    device.log_append("notes", note)?;

    let newest = device.last_cursor()?;
    let mut changes = Box::pin(device.subscribe(saved));
    let mut last = saved;
    println!("changes after cursor {saved}:");
    while last < newest {
        // Changes whose facts were pruned since are skipped, so the feed may end early.
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), changes.next()).await
        else {
            break;
        };
        let Some(change) = next else { break };
        let change = change?;
        match &change.kind {
            ChangeKind::Append { log, data, .. } => println!(
                "  {}: {log} += {}",
                change.cursor,
                String::from_utf8_lossy(data)
            ),
            other => println!("  {}: {other:?}", change.cursor),
        }
        last = change.cursor;
    }
    // Written after the changes were handled: a crash in between repeats them, never
    // skips one.
    std::fs::write(&cursor_file, last.to_string())?;
    println!("saved cursor {last}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args_os().nth(1) {
        Some(dir) => run_once(Path::new(&dir), "one more run").await,
        None => {
            let dir = tempfile::tempdir()?;
            run_once(dir.path(), "first run").await?;
            println!();
            run_once(dir.path(), "second run").await
        }
    }
}
