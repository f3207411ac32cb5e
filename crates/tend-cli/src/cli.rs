//! Argument definitions and dispatch to the device operations of `tend-node`.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::output::CmdResult;

/// tend keeps the journals of an authority's devices in step and bounded.
#[derive(Parser, Debug)]
#[command(name = "tend", version, about)]
pub struct Args {
    /// The device's home directory.
    #[arg(long, global = true, env = "TEND_HOME")]
    pub home: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// How log lines on stderr look (which ones: `RUST_LOG`, default warnings and errors
    /// of the tend crates).
    #[arg(long, global = true, value_enum, default_value_t = crate::logs::LogFormat::Text, env = "TEND_LOG_FORMAT")]
    pub log_format: crate::logs::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Is the device healthy? Its id, authority, epochs, journal and state counts, store
    /// size, latest snapshot, whether GC is pending, and (while it runs) its peers.
    Status,
    /// Create a device: a key, an empty store and a one-device authority.
    Init,
    /// Start a local fleet on 127.0.0.1 and walk the whole lifecycle, verifying each step.
    Devnet(crate::devnet::DevnetArgs),
    /// Write a value: `put(collection, key, value)` (bytes; large values become blobs).
    Put(crate::data::PutArgs),
    /// Read a value: its bytes on stdout (exit 1 when absent); --json adds the author,
    /// epoch, fact id and conflicting writes.
    Get(crate::data::KeyArgs),
    /// Delete a key.
    Delete(crate::data::KeyArgs),
    /// List the live keys of a collection in key order.
    Scan(crate::data::ScanArgs),
    /// Append-only logs: append, read from a cursor, trim.
    #[command(subcommand)]
    Log(crate::log::LogCommand),
    /// Write facts (`fact add --kind K` appends to log K).
    #[command(subcommand)]
    Fact(crate::fact::FactCommand),
    /// Inspect the journal.
    #[command(subcommand)]
    Journal(crate::journal::JournalCommand),
    /// The authority: members, threshold key, identity epoch.
    #[command(subcommand)]
    Authority(crate::authority::AuthorityCommand),
    /// Threshold-signed snapshots.
    #[command(subcommand)]
    Snapshot(crate::snapshot::SnapshotCommand),
    /// Prune what the latest verified snapshot covers, and compact the store.
    ///
    /// On a running device `tend gc` works through its control socket; compaction there
    /// waits for a moment when no sync session holds the store.
    Gc(crate::gc::GcArgs),
    /// Run the device: sync with peers over the network until SIGINT or SIGTERM.
    Run(crate::run::RunArgs),
    /// Serve a rendezvous point: devices publish signed, expiring address records to it and
    /// look each other up (`tend run --rendezvous ADDR`). Needs no home.
    Rendezvous(crate::rendezvous::RendezvousArgs),
    /// Peers of the running device, with their scores, statuses and last sync; or set a
    /// peer's trust, ban or unban it.
    Peers {
        #[command(subcommand)]
        cmd: Option<crate::peers::PeersCommand>,
    },
    /// Synchronise with peers.
    #[command(subcommand)]
    Sync(crate::sync::SyncCommand),
    /// Over-the-air upgrades: publish, apply, activate.
    #[command(subcommand)]
    Upgrade(crate::upgrade::UpgradeCommand),
    /// The authority's admin and its replacement.
    #[command(subcommand)]
    Admin(crate::admin::AdminCommand),
    /// The replicated cache: entries and their invalidation floors.
    #[command(subcommand)]
    Cache(crate::cache::CacheCommand),
    /// Encrypted backups: export, verify, restore into a new home.
    #[command(subcommand)]
    Backup(crate::backup::BackupCommand),
    /// Run a storage peer: keeps the authority's encrypted blobs for its members and
    /// re-encrypts their keys when membership changes, without reading them.
    Storage(crate::vault::StorageArgs),
    /// Encrypted blobs on a storage peer: key an epoch, grant a peer, upload, fetch.
    #[command(subcommand)]
    Vault(crate::vault::VaultCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell). Needs no home.
    Completions(crate::completions::CompletionsArgs),
    /// Print the man page of `tend` (roff), or write one page per command with --out DIR.
    /// Needs no home.
    Man(crate::man::ManArgs),
}

fn home(args: &Args) -> Result<PathBuf, Box<dyn std::error::Error>> {
    args.home
        .clone()
        .ok_or_else(|| "no home directory: pass --home DIR or set TEND_HOME".into())
}

pub fn run(args: Args) -> CmdResult {
    // Every command but `devnet`, `rendezvous`, `completions` and `man` works on one
    // device's home.
    let home = match (&args.command, home(&args)) {
        (
            Command::Devnet(_) | Command::Rendezvous(_) | Command::Completions(_) | Command::Man(_),
            _,
        ) => PathBuf::new(),
        (_, home) => home?,
    };
    match args.command {
        Command::Devnet(devnet) => crate::devnet::run(devnet, args.json),
        Command::Completions(c) => crate::completions::completions(c, Args::command()),
        Command::Man(m) => crate::man::man(m, Args::command()),
        Command::Init => crate::init::init(&home),
        Command::Run(run) => crate::run::run(&home, run, args.json),
        Command::Rendezvous(r) => crate::rendezvous::rendezvous(r, args.json),
        Command::Peers { cmd } => crate::peers::peers(&home, cmd),
        Command::Status => crate::status::status(&home),
        Command::Sync(cmd) => crate::sync::sync(&home, cmd, args.json),
        Command::Fact(cmd) => crate::fact::fact(&home, cmd),
        Command::Journal(cmd) => crate::journal::journal(&home, cmd),
        Command::Authority(cmd) => crate::authority::authority(&home, cmd),
        Command::Snapshot(cmd) => crate::snapshot::snapshot(&home, cmd),
        Command::Gc(args) => crate::gc::gc(&home, args),
        Command::Upgrade(cmd) => crate::upgrade::upgrade(&home, cmd),
        Command::Admin(cmd) => crate::admin::admin(&home, cmd),
        Command::Cache(cmd) => crate::cache::cache(&home, cmd),
        Command::Put(a) => crate::data::put(&home, a),
        Command::Get(a) => crate::data::get(&home, a),
        Command::Delete(a) => crate::data::delete(&home, a),
        Command::Scan(a) => crate::data::scan(&home, a),
        Command::Log(cmd) => crate::log::log(&home, cmd),
        Command::Backup(cmd) => crate::backup::run(&home, cmd, args.json),
        Command::Storage(a) => crate::vault::storage(&home, a, args.json),
        Command::Vault(cmd) => crate::vault::vault(&home, cmd),
    }
}
