//! Owner-only secret files: atomic writes (temp file + fsync + rename) with 0600
//! permissions, and reads that refuse files other users could read.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("key file {} already exists; refusing to overwrite a key", path.display())]
    AlreadyExists { path: PathBuf },
    #[error(
        "key file {} has permissions {mode:03o}; it must be readable by its owner only \
         (run `chmod 600 {}`)",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} is {len} bytes, expected {expected}", path.display())]
    WrongSize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("key file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl KeyFileError {
    /// A short stable label, for metrics and `--json` output.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "missing",
            Self::AlreadyExists { .. } => "exists",
            Self::Permissions { .. } => "permissions",
            Self::WrongSize { .. } => "size",
            Self::Corrupt { .. } => "corrupt",
            Self::Io { .. } => "io",
        }
    }
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> KeyFileError + 'a {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Creates `dir` (and parents) if missing; a directory we create is owner-only (0700).
pub fn ensure_private_dir(dir: &Path) -> Result<(), KeyFileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir, "create directory"))
}

/// Writes `bytes` to `path` atomically with mode 0600: a reader sees the old file or the
/// whole new one, never half of it, and the secret is never readable by others, not even
/// while it is being written (the temp file is created 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_private_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        // The mode above is filtered by the umask; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(&tmp, "set permissions of"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "sync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename into"))?;
        // Persist the rename itself; failure to sync a directory is not fatal on every
        // filesystem, so it is ignored.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_atomic`], but fails with [`KeyFileError::AlreadyExists`] if `path` exists,
/// so a key is never silently replaced.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    if path.exists() {
        return Err(KeyFileError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    write_atomic(path, bytes)
}

/// Reads a secret file, refusing it if group or others have any permission on it.
/// `expected_len` (if given) is checked before the contents are read.
pub fn read_private(path: &Path, expected_len: Option<u64>) -> Result<Vec<u8>, KeyFileError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KeyFileError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path, "read metadata of")(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if let Some(expected) = expected_len {
        if meta.len() != expected {
            return Err(KeyFileError::WrongSize {
                path: path.to_path_buf(),
                len: meta.len(),
                expected,
            });
        }
    }
    fs::read(path).map_err(io_err(path, "read"))
}
