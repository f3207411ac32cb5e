//! `tend backup export|verify|restore` (encrypted archives of the device's journal) and
//! `tend snapshot triggers` (when the device proposes a snapshot by itself).
//!
//! Export on a running device goes through its control socket (`backup_export`): the
//! device writes the archive from its open store with [`exporter`], which `tend run`
//! installs, and the CLI prints the same summary as when it exports a stopped device's
//! store itself.

use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, Subcommand};
use tend_backup::{
    BackupError, Decryption, Encryption, ExportOptions, ExportReport, Progress, RestoreTarget,
    SnapshotTriggers,
};
use tend_node::control::{BackupExporter, Client, ExportRequest};
use tend_node::Device;
use tend_store::Store;

use crate::output::CmdResult;
use crate::output::Output;
use crate::progress::{ProgressBar, Watch};
use indicatif::HumanBytes;

/// Removes what restores into `home` that were killed left beside it (the
/// `.NAME.restore-PID-N` directories of processes that no longer exist; see
/// [`tend_backup::remove_stale_restores`]), with a note on stderr for each. `tend init`,
/// `tend run` and `tend backup restore` do this first.
pub fn remove_stale_restores(home: &Path) {
    for dir in tend_backup::remove_stale_restores(home) {
        eprintln!(
            "note: removed {}, left by a restore that was killed",
            dir.display()
        );
    }
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Write an encrypted archive of the latest snapshot and the journal after it.
    ///
    /// On a running device the device writes it, and keeps syncing meanwhile.
    Export {
        /// The archive to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        key: EncryptArgs,
    },
    /// Decrypt and check an archive completely, without writing anything.
    Verify {
        /// The archive to check.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        key: DecryptArgs,
    },
    /// Restore an archive into a new home (--home NEWDIR), as a new device of the authority.
    Restore {
        /// The archive to restore.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        key: DecryptArgs,
    },
}

/// Who may open the archive: a passphrase, or age public keys.
#[derive(ClapArgs, Debug)]
pub struct EncryptArgs {
    /// A file holding the passphrase (a trailing newline is not part of it).
    #[arg(long, value_name = "FILE", conflicts_with = "recipients")]
    pub passphrase_file: Option<PathBuf>,
    /// An age public key (age1...) whose identity may open the archive; repeatable.
    #[arg(long = "recipient", value_name = "AGE_PUBLIC_KEY")]
    pub recipients: Vec<String>,
}

/// How to open the archive: the passphrase, or an age identity file.
#[derive(ClapArgs, Debug)]
pub struct DecryptArgs {
    /// A file holding the passphrase (a trailing newline is not part of it).
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
    /// An age identity file (AGE-SECRET-KEY-1... lines), as `age-keygen` writes it.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
}

/// `tend snapshot triggers` options; without any, it shows the settings.
#[derive(ClapArgs, Debug)]
pub struct TriggersArgs {
    /// Propose when this many facts are above the latest snapshot (0: never).
    #[arg(long)]
    pub facts: Option<u64>,
    /// Propose when those facts take this many bytes (0: never).
    #[arg(long)]
    pub bytes: Option<u64>,
    /// Propose when the latest snapshot is this old and new facts exist (0: never).
    #[arg(long)]
    pub age_secs: Option<u64>,
}

/// A restored home: the new device and its store.
pub(crate) struct Home(pub(crate) Device);

impl RestoreTarget for Home {
    fn store(&self) -> &Store {
        self.0.store()
    }
}

pub fn run(home: &Path, cmd: BackupCommand, json: bool) -> CmdResult {
    let bar = ProgressBar::new(json);
    let progress = |p: Progress| bar.update(p);
    let progress: Option<&dyn Fn(Progress)> = bar.0.as_ref().map(|_| &progress as _);
    match cmd {
        BackupCommand::Export { out, key } => {
            if key.passphrase_file.is_none() && key.recipients.is_empty() {
                return Err(BackupError::NoRecipients.into());
            }
            // A running device holds the store: it writes the archive itself.
            if let Some(client) = Client::connect(home)? {
                return export_via_socket(client, &out, key, json);
            }
            let encryption = encryption(key.passphrase_file.as_deref(), &key.recipients)?;
            // The device is opened (and its store checked) as usual, then its store is
            // reopened with a bounded page cache: export reads every page once, and the
            // default cache would keep them all.
            let (path, ns) = {
                let device = Device::open(home)?;
                (device.store().path().to_owned(), device.namespace())
            };
            let store = Store::open_with(&path, &tend_backup::bounded_store_options())
                .map_err(BackupError::from)?;
            let r = export_store(&store, ns, &out, &encryption, progress)?;
            bar.finish();
            Ok(export_output(&out, &r))
        }
        BackupCommand::Verify { input, key } => {
            let decryption = decryption(&key)?;
            let r = tend_backup::verify_file(&input, &decryption, progress)?;
            bar.finish();
            let human = format!(
                "{} verifies: {}\n{} tail facts, {} maintenance facts from the snapshot\nstate digest {}",
                input.display(),
                match r.snapshot_epoch {
                    Some(e) => format!("threshold-signed snapshot at epoch {e}"),
                    None => "no snapshot (whole journal)".into(),
                },
                r.tail_facts,
                r.maintenance_facts,
                r.state_digest
            );
            Ok(Output::new(r, human))
        }
        BackupCommand::Restore { input, key } => {
            let decryption = decryption(&key)?;
            // `restore_home` does it too, silently.
            remove_stale_restores(home);
            let device_id = std::cell::Cell::new(None);
            let r = tend_backup::restore_home(
                &input,
                &decryption,
                home,
                |dir, ns| {
                    // A new device key and an empty store; the restore writes through a
                    // handle with a bounded page cache (it writes every page once).
                    let device = Device::init_joining(dir, ns, &mut rand::rngs::OsRng)
                        .map_err(|e| BackupError::Target(e.to_string()))?;
                    device_id.set(Some(device.device_id().to_string()));
                    let path = device.store().path().to_owned();
                    drop(device);
                    Ok(Store::open_with(
                        &path,
                        &tend_backup::bounded_store_options(),
                    )?)
                },
                progress,
            )?;
            bar.finish();
            // The id is taken when the device is made, not by opening the new home again:
            // opening checks every page of the store, which costs memory and time a
            // restore has already spent.
            let id = device_id
                .take()
                .ok_or_else(|| BackupError::Target("no device was created".into()))?;
            let human = format!(
                "restored {} into {}\nnew device {id}\n{} tail facts, {} maintenance facts from the snapshot\n\
                 the restored device is a new device of the authority: it syncs as a member once \
                 the admin adds {id} to the membership",
                r.namespace,
                home.display(),
                r.tail_facts,
                r.maintenance_facts,
            );
            Ok(Output::new(
                serde_json::json!({ "home": home, "device_id": id, "report": r }),
                human,
            ))
        }
    }
}

/// The encryption of an export: a passphrase file, else the recipients.
fn encryption(
    passphrase_file: Option<&Path>,
    recipients: &[String],
) -> Result<Encryption, BackupError> {
    match (passphrase_file, recipients.is_empty()) {
        (Some(p), _) => Encryption::passphrase_file(p),
        (None, false) => Encryption::recipients(recipients),
        (None, true) => Err(BackupError::NoRecipients),
    }
}

/// Exports journal `ns` of `store` to `out`, as both paths do.
fn export_store(
    store: &Store,
    ns: tend_core::JournalNamespace,
    out: &Path,
    encryption: &Encryption,
    progress: Option<&dyn Fn(Progress)>,
) -> Result<ExportReport, BackupError> {
    let mut opts = ExportOptions::new(encryption);
    opts.progress = progress;
    opts.created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    tend_backup::export_file(store, ns, out, &opts)
}

/// What `tend backup export` prints, `out` as the user gave it.
fn export_output(out: &Path, r: &ExportReport) -> Output {
    let human = format!(
        "wrote {} ({} bytes)\n{}\n{} facts after the snapshot, in {} chunks",
        out.display(),
        r.archive_bytes,
        match r.snapshot_epoch {
            Some(e) => format!("snapshot at epoch {e} ({} byte blob)", r.blob_bytes),
            None => "no snapshot yet: the whole journal is in the archive".into(),
        },
        r.tail_facts,
        r.tail_chunks
    );
    Output::new(serde_json::json!({ "out": out, "report": r }), human)
}

/// `tend backup export` on a running device: the device writes the archive (no progress
/// bar: it has no terminal). Paths are made absolute here, since the device's working
/// directory is not ours; the passphrase goes as its file's path, which the device reads.
fn export_via_socket(mut client: Client, out: &Path, key: EncryptArgs, json: bool) -> CmdResult {
    let absolute = |p: &Path| {
        std::path::absolute(p).map_err(|e| BackupError::Io {
            path: p.to_owned(),
            source: e,
        })
    };
    let passphrase_file = key.passphrase_file.as_deref().map(absolute).transpose()?;
    let out_abs = absolute(out)?;
    // The device reports nothing until the archive is whole: show its size as it grows.
    let watched = out_abs.clone();
    let watch = Watch::start(json, "exporting through the running device", move || {
        let n = tend_backup::bytes_written_towards(&watched).filter(|n| *n > 0)?;
        Some(format!(
            "exporting through the running device: {} written",
            HumanBytes(n)
        ))
    });
    let report = client.backup_export(out_abs, passphrase_file, key.recipients);
    drop(watch);
    let report = report?;
    let r: ExportReport = serde_json::from_value(report)
        .map_err(|e| format!("the running device answered with an unreadable report: {e}"))?;
    Ok(export_output(out, &r))
}

/// The exporter `tend run` installs for `backup_export`: the same export as a stopped
/// device's, from the running device's open store (a running device cannot reopen it
/// with a bounded page cache; its own cache holds what export reads), with no progress.
pub fn exporter() -> BackupExporter {
    BackupExporter(std::sync::Arc::new(
        |device: &Device, req: &ExportRequest| {
            let encryption = encryption(req.passphrase_file.as_deref(), &req.recipients)?;
            let r = export_store(
                device.store(),
                device.namespace(),
                &req.out,
                &encryption,
                None,
            )?;
            Ok(serde_json::to_value(r)?)
        },
    ))
}

fn decryption(key: &DecryptArgs) -> Result<Decryption, BackupError> {
    match (&key.passphrase_file, &key.identity) {
        (Some(p), _) => Decryption::passphrase_file(p),
        (None, Some(i)) => Decryption::identity_file(i),
        (None, None) => Err(BackupError::NoRecipients),
    }
}

/// `tend snapshot triggers`: shows or sets the device's automatic snapshot triggers.
pub fn triggers(home: &Path, args: TriggersArgs) -> CmdResult {
    let device = Device::open(home)?;
    let store = device.store();
    let mut t = tend_backup::triggers::load_triggers(store)?;
    let changed = merge_triggers(&mut t, &args);
    if changed {
        tend_backup::triggers::save_triggers(store, &t)?;
    }
    Ok(triggers_output(t, changed))
}

/// Puts the limits given in `args` into `t`; whether any was given.
pub(crate) fn merge_triggers(t: &mut SnapshotTriggers, args: &TriggersArgs) -> bool {
    for (given, field) in [
        (args.facts, &mut t.facts),
        (args.bytes, &mut t.bytes),
        (args.age_secs, &mut t.age_secs),
    ] {
        if let Some(v) = given {
            *field = v;
        }
    }
    args.facts.is_some() || args.bytes.is_some() || args.age_secs.is_some()
}

/// What `tend snapshot triggers` prints, whether the device runs or not.
pub(crate) fn triggers_output(t: SnapshotTriggers, changed: bool) -> Output {
    let human = format!(
        "{}snapshot triggers: {}",
        if changed { "set " } else { "" },
        describe_triggers(&t)
    );
    Output::new(t, human)
}

fn describe_triggers(t: &SnapshotTriggers) -> String {
    let show = |v: u64, unit: &str| {
        if v == 0 {
            "off".to_string()
        } else {
            format!("{v}{unit}")
        }
    };
    format!(
        "facts {}, bytes {}, age {}",
        show(t.facts, ""),
        show(t.bytes, ""),
        show(t.age_secs, "s")
    )
}

/// Adds the device's snapshot triggers to `tend snapshot status` output.
pub fn with_triggers(home: &Path, out: Output) -> CmdResult {
    let device = Device::open(home)?;
    add_triggers(out, tend_backup::triggers::load_triggers(device.store())?)
}

/// Adds snapshot triggers `t` to `tend snapshot status` output.
pub(crate) fn add_triggers(mut out: Output, t: SnapshotTriggers) -> CmdResult {
    if let Some(obj) = out.json.as_object_mut() {
        obj.insert("triggers".into(), serde_json::to_value(t)?);
    }
    out.human = format!(
        "{}\nsnapshot triggers: {}",
        out.human.trim_end(),
        describe_triggers(&t)
    );
    Ok(out)
}
