//! `BackupError`: every way exporting, verifying or restoring a backup can fail.

use std::path::PathBuf;

use tend_core::{DecodeError, Epoch, JournalError, JournalNamespace};
use tend_snapshot::HydrateError;
use tend_store::StoreError;

/// An error of a backup operation. Each message is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file of ours (output, passphrase or identity file, temporary directory) failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `export` refuses to overwrite a file.
    #[error("{0} already exists; choose another --out or remove it first")]
    OutputExists(PathBuf),

    /// `restore` refuses a home that already holds something.
    #[error("{0} already exists and is not empty; restore needs a new home directory")]
    HomeNotEmpty(PathBuf),

    /// The passphrase file is empty.
    #[error("passphrase file {0} is empty")]
    EmptyPassphrase(PathBuf),

    /// A `--recipient` is not an age X25519 public key.
    #[error("invalid recipient {0:?}: expected an age public key (age1...)")]
    BadRecipient(String),

    /// An identity file holds no usable age X25519 identity.
    #[error("identity file {path}: {detail}")]
    BadIdentityFile { path: PathBuf, detail: String },

    /// No passphrase or recipient was given.
    #[error("no encryption key: give a passphrase file or at least one recipient")]
    NoRecipients,

    /// age refused to encrypt.
    #[error("cannot encrypt: {0}")]
    Encrypt(String),

    /// The passphrase or identity does not open the archive.
    #[error("cannot decrypt the archive: wrong passphrase or key (or a damaged age header)")]
    WrongKey,

    /// The archive is encrypted with a passphrase whose work factor is far above this
    /// machine's (a possible denial of service).
    #[error("the archive's passphrase work factor {required} is too high for this machine (target {target})")]
    ExcessiveWork { required: u8, target: u8 },

    /// The input is not an age file, or its header is damaged.
    #[error("not a tend backup: the age header is missing or damaged ({0})")]
    NotAnAgeFile(String),

    /// Decrypting, decompressing or unpacking the payload failed: a flipped byte, a
    /// truncated file, or trailing garbage.
    #[error("the archive is damaged or truncated: {0}")]
    Damaged(String),

    /// The decrypted payload is not a tend backup of a shape this release reads.
    #[error("not a tend backup: {0}")]
    NotABackup(String),

    /// The archive was written by a newer release.
    #[error("the archive has format version {found}, newer than the version {supported} this release reads; upgrade tend to restore it")]
    NewerFormat { found: u64, supported: u64 },

    /// A member does not match what the manifest says about it, or the manifest does
    /// not match what was read.
    #[error("the archive's manifest does not match its content: {0}")]
    ManifestMismatch(String),

    /// A fact in the archive does not decode or verify.
    #[error("fact {index} of {member} does not verify: {source}")]
    BadFact {
        member: String,
        index: u64,
        #[source]
        source: DecodeError,
    },

    /// A fact in the archive would not be admitted to the journal (rules 2 and 5).
    #[error("fact {index} of {member} is not admissible: {source}")]
    Inadmissible {
        member: String,
        index: u64,
        #[source]
        source: JournalError,
    },

    /// The snapshot (signature, CID, digest, blob) does not verify.
    #[error("the snapshot does not verify: {0}")]
    Snapshot(#[from] HydrateError),

    /// The membership chain in the snapshot blob gives no group key for the completion.
    #[error("the snapshot's authority chain gives no group key at epoch {0} (not signed by this authority)")]
    NoGroupKey(Epoch),

    /// A fact of another journal is in the archive.
    #[error("the archive mixes journals: {found} in a backup of {expected}")]
    WrongNamespace {
        expected: JournalNamespace,
        found: JournalNamespace,
    },

    /// The device holds no fact of the journal to export.
    #[error("the store holds no fact of {0}; nothing to back up")]
    EmptyJournal(JournalNamespace),

    /// The latest snapshot's blob is not stored on this device.
    #[error("the blob {0} of the latest snapshot is not stored on this device; sync with a member that has it, then export again")]
    BlobMissing(String),

    /// The journal changed during the export in a way one archive cannot hold, each of
    /// the times it was tried (a running device completed a snapshot meanwhile).
    #[error("the journal changed during the export ({0}); try again")]
    Concurrent(String),

    /// The restored journal does not reproduce what the archive certifies.
    #[error("the restored journal does not match the archive: {0}")]
    RestoreMismatch(String),

    /// The target home could not be prepared.
    #[error("cannot prepare the new home: {0}")]
    Target(String),

    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackupError {
    /// A short stable label, used for `--json` output and tests.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::OutputExists(_) => "output_exists",
            Self::HomeNotEmpty(_) => "home_not_empty",
            Self::EmptyPassphrase(_) | Self::BadRecipient(_) | Self::BadIdentityFile { .. } => {
                "bad_key_input"
            }
            Self::NoRecipients => "no_recipients",
            Self::Encrypt(_) => "encrypt",
            Self::WrongKey => "wrong_key",
            Self::ExcessiveWork { .. } => "excessive_work",
            Self::NotAnAgeFile(_) => "not_age",
            Self::Damaged(_) => "damaged",
            Self::NotABackup(_) => "not_a_backup",
            Self::NewerFormat { .. } => "newer_format",
            Self::ManifestMismatch(_) => "manifest",
            Self::BadFact { .. } => "bad_fact",
            Self::Inadmissible { .. } => "inadmissible",
            Self::Snapshot(_) | Self::NoGroupKey(_) => "snapshot",
            Self::WrongNamespace { .. } => "namespace",
            Self::EmptyJournal(_) => "empty_journal",
            Self::BlobMissing(_) => "blob_missing",
            Self::Concurrent(_) => "concurrent",
            Self::RestoreMismatch(_) => "restore_mismatch",
            Self::Target(_) => "target",
            Self::Store(_) => "store",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
