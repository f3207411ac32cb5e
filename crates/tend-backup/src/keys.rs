//! Who can open an archive: an age passphrase (scrypt) or age X25519 recipients, and the
//! matching decryption side (the passphrase, or an age identity file).

use std::io::{self, BufRead, Read, Write};
use std::path::Path;

use age::secrecy::SecretString;

use crate::error::BackupError;

/// How an archive is encrypted.
pub enum Encryption {
    /// Anyone with the passphrase can open the archive (age's scrypt recipient).
    Passphrase {
        passphrase: SecretString,
        /// scrypt work factor (log2 N); `None` lets age pick about one second of work on
        /// this machine. Lower values are for tests only.
        work_factor: Option<u8>,
    },
    /// Holders of the identities of these public keys can open the archive.
    Recipients(Vec<age::x25519::Recipient>),
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Passphrase { .. } => f.write_str("Encryption::Passphrase(..)"),
            Self::Recipients(r) => write!(f, "Encryption::Recipients({} keys)", r.len()),
        }
    }
}

impl Encryption {
    /// A passphrase read from a file (one trailing newline is not part of it).
    pub fn passphrase_file(path: &Path) -> Result<Self, BackupError> {
        Ok(Self::Passphrase {
            passphrase: read_passphrase(path)?,
            work_factor: None,
        })
    }

    /// Recipients given as age public keys (`age1...`).
    pub fn recipients<S: AsRef<str>>(keys: &[S]) -> Result<Self, BackupError> {
        if keys.is_empty() {
            return Err(BackupError::NoRecipients);
        }
        let parsed = keys
            .iter()
            .map(|k| {
                k.as_ref()
                    .trim()
                    .parse::<age::x25519::Recipient>()
                    .map_err(|_| BackupError::BadRecipient(k.as_ref().chars().take(100).collect()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Recipients(parsed))
    }

    /// Wraps `out` in an age encryptor; the caller must `finish` the returned writer.
    pub(crate) fn wrap<W: Write>(
        &self,
        out: W,
    ) -> Result<age::stream::StreamWriter<W>, BackupError> {
        let encryptor = match self {
            Self::Passphrase {
                passphrase,
                work_factor,
            } => {
                let mut r = age::scrypt::Recipient::new(passphrase.clone());
                if let Some(n) = work_factor.filter(|n| (1..64).contains(n)) {
                    r.set_work_factor(n);
                }
                age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
            }
            Self::Recipients(rs) => {
                age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
            }
        }
        .map_err(|e| BackupError::Encrypt(e.to_string()))?;
        encryptor
            .wrap_output(out)
            .map_err(|e| BackupError::Encrypt(e.to_string()))
    }
}

/// How an archive is opened.
pub enum Decryption {
    /// The passphrase it was encrypted with.
    Passphrase(SecretString),
    /// Identities from an age identity file (`AGE-SECRET-KEY-1...` lines).
    Identities(Vec<age::x25519::Identity>),
}

impl std::fmt::Debug for Decryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Passphrase(_) => f.write_str("Decryption::Passphrase(..)"),
            Self::Identities(i) => write!(f, "Decryption::Identities({} keys)", i.len()),
        }
    }
}

impl Decryption {
    /// A passphrase read from a file (one trailing newline is not part of it).
    pub fn passphrase_file(path: &Path) -> Result<Self, BackupError> {
        Ok(Self::Passphrase(read_passphrase(path)?))
    }

    /// The X25519 identities of an age identity file (comments and blank lines allowed).
    pub fn identity_file(path: &Path) -> Result<Self, BackupError> {
        let file = std::fs::File::open(path).map_err(|e| BackupError::io(path, e))?;
        let bad = |detail: String| BackupError::BadIdentityFile {
            path: path.to_owned(),
            detail,
        };
        let mut identities = Vec::new();
        // Identity files are small; a cap keeps a wrong path (a huge file) from being read.
        for (n, line) in io::BufReader::new(file.take(1 << 20)).lines().enumerate() {
            let line = line.map_err(|e| bad(e.to_string()))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Never echo the line: it is a secret key.
            let id = line
                .parse::<age::x25519::Identity>()
                .map_err(|_| bad(format!("line {} is not an age X25519 identity", n + 1)))?;
            identities.push(id);
        }
        if identities.is_empty() {
            return Err(bad("it holds no identity".into()));
        }
        Ok(Self::Identities(identities))
    }

    /// Opens the age layer of `input`, returning the plaintext reader.
    pub(crate) fn open<R: Read>(
        &self,
        input: R,
    ) -> Result<age::stream::StreamReader<R>, BackupError> {
        let decryptor = age::Decryptor::new(input).map_err(map_decrypt_error)?;
        let result = match self {
            Self::Passphrase(p) => {
                let id = age::scrypt::Identity::new(p.clone());
                decryptor.decrypt(std::iter::once(&id as &dyn age::Identity))
            }
            Self::Identities(ids) => decryptor.decrypt(ids.iter().map(|i| i as &dyn age::Identity)),
        };
        result.map_err(map_decrypt_error)
    }
}

fn map_decrypt_error(e: age::DecryptError) -> BackupError {
    use age::DecryptError as D;
    match e {
        D::NoMatchingKeys | D::DecryptionFailed | D::KeyDecryptionFailed => BackupError::WrongKey,
        D::ExcessiveWork { required, target } => BackupError::ExcessiveWork { required, target },
        // A flipped byte in the header makes its MAC fail; so does a header stanza that
        // was swapped for another archive's.
        D::InvalidMac => BackupError::Damaged("the age header MAC does not verify".into()),
        D::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            BackupError::Damaged("the file ends inside the age header".into())
        }
        D::UnknownFormat => {
            BackupError::NotAnAgeFile("not the age v1 format this release reads".into())
        }
        // age's messages may span lines; the CLI prints one.
        other => BackupError::NotAnAgeFile(other.to_string().replace('\n', " ")),
    }
}

fn read_passphrase(path: &Path) -> Result<SecretString, BackupError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 16).read_to_end(&mut bytes))
        .map_err(|e| BackupError::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|_| {
        BackupError::io(
            path,
            io::Error::new(io::ErrorKind::InvalidData, "the passphrase is not UTF-8"),
        )
    })?;
    // `echo secret > file` adds a newline that is not part of the passphrase.
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(BackupError::EmptyPassphrase(path.to_owned()));
    }
    Ok(SecretString::from(text))
}
