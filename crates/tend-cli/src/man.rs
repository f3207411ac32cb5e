//! `tend man`: the man page (roff) of `tend` on stdout, or with `--out DIR` one page per
//! command and subcommand (`tend.1`, `tend-put.1`, `tend-log-append.1`, ...).

use std::path::PathBuf;

use clap::Args as ClapArgs;

use crate::output::{CmdResult, Output};

#[derive(ClapArgs, Debug)]
pub struct ManArgs {
    /// Write one page per command and subcommand into this directory (made when absent)
    /// instead of printing the top page.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Renders the pages of `cmd` (the whole `tend` command, as cli.rs defines it).
pub fn man(args: ManArgs, cmd: clap::Command) -> CmdResult {
    match args.out {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| format!("cannot render the man page: {e}"))?;
            let json = serde_json::json!({ "page": String::from_utf8_lossy(&page) });
            Ok(Output::raw(json, page))
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| format!("cannot write man pages in {}: {e}", dir.display()))?;
            let mut pages: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".1"))
                .collect();
            pages.sort();
            let human = format!("{} man pages written in {}", pages.len(), dir.display());
            Ok(Output::new(
                serde_json::json!({ "dir": dir, "pages": pages }),
                human,
            ))
        }
    }
}
