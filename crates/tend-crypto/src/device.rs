//! A device's own Ed25519 key: generation, and its owner-only file in the device's home.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use rand_core::{CryptoRng, RngCore};
use tend_core::DeviceId;

use crate::secret_file::{self, KeyFileError};

/// File name of the device key inside a home directory.
pub const DEVICE_KEY_FILE: &str = "device.key";

/// A device's Ed25519 signing key. Its public half is the device's [`DeviceId`].
#[derive(Clone)]
pub struct DeviceKey {
    key: SigningKey,
}

impl std::fmt::Debug for DeviceKey {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({:?})", self.device_id())
    }
}

impl DeviceKey {
    /// A fresh key from `rng`.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self {
            key: SigningKey::generate(rng),
        }
    }

    /// Wraps an existing key.
    pub fn from_signing_key(key: SigningKey) -> Self {
        Self { key }
    }

    /// The device id: the public key.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.key.verifying_key().to_bytes())
    }

    /// The key for signing facts ([`tend_core::UnsignedFact::sign`]).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Where the device key lives in `home`.
    pub fn path(home: &Path) -> PathBuf {
        home.join(DEVICE_KEY_FILE)
    }

    /// Saves the key in `home` (0600, atomic). Refuses to replace an existing key file,
    /// because losing a device key loses the device's identity.
    pub fn save(&self, home: &Path) -> Result<PathBuf, KeyFileError> {
        let path = Self::path(home);
        secret_file::write_new(&path, &self.key.to_bytes())?;
        Ok(path)
    }

    /// Loads the key from `home`: missing, wrongly sized and group/world-readable files
    /// are typed errors.
    pub fn load(home: &Path) -> Result<Self, KeyFileError> {
        let path = Self::path(home);
        let bytes = secret_file::read_private(&path, Some(32))?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyFileError::WrongSize {
                path: path.clone(),
                len: bytes.len() as u64,
                expected: 32,
            })?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }
}
