//! `tend completions SHELL`: the shell completion script, printed to stdout.

use clap::Args as ClapArgs;
use clap_complete::Shell;

use crate::output::{CmdResult, Output};

#[derive(ClapArgs, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for (bash, zsh, fish, elvish, powershell).
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Renders the script for `cmd` (the whole `tend` command, as cli.rs defines it).
pub fn completions(args: CompletionsArgs, mut cmd: clap::Command) -> CmdResult {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "tend", &mut script);
    let json = serde_json::json!({
        "shell": args.shell.to_string(),
        "script": String::from_utf8_lossy(&script),
    });
    Ok(Output::raw(json, script))
}
