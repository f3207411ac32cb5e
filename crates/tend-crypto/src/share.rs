//! A device's FROST key share from a DKG run, and its owner-only file in the device's home.
//!
//! File format (canonical DAG-CBOR): `[version, checksum, body]`, where `body` is the
//! canonical encoding of `[session, device, key_package, public_key_package]` and
//! `checksum = BLAKE3("tend-key-share-v1" || body)`. The checksum turns any modification
//! into [`ShareError::Tampered`]; loading also checks that the secret share matches its
//! public verifying share, so a share that decodes but is wrong is never used.

use std::path::{Path, PathBuf};

use frost_ed25519 as frost;
use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::{DeviceId, GroupKey, Hash32};

use crate::dkg::{frost_identifier, DkgSession};
use crate::secret_file::{self, KeyFileError};
use crate::sign::PublicShares;

/// Version of the share file format.
pub const SHARE_FORMAT_VERSION: u64 = 1;
const CHECKSUM_DOMAIN: &[u8] = b"tend-key-share-v1";

/// Why a key share could not be loaded, saved or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(transparent)]
    File(#[from] KeyFileError),
    #[error("key share {} was modified: its checksum does not match", path.display())]
    Tampered { path: PathBuf },
    #[error("key share {} is malformed: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("key share {} is inconsistent: {reason}", path.display())]
    Inconsistent { path: PathBuf, reason: String },
}

impl ShareError {
    /// A short stable label, for metrics and `--json` output.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::File(e) => e.reason(),
            Self::Tampered { .. } => "tampered",
            Self::Malformed { .. } => "malformed",
            Self::Inconsistent { .. } => "inconsistent",
        }
    }
}

/// One device's share of the authority's threshold key, for one identity epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyShare {
    session: DkgSession,
    device: DeviceId,
    key_package: frost::keys::KeyPackage,
    public: frost::keys::PublicKeyPackage,
    group_key: GroupKey,
}

impl std::fmt::Debug for KeyShare {
    // Never print the secret share.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyShare")
            .field("device", &self.device)
            .field("identity_epoch", &self.session.identity_epoch)
            .field("threshold", &self.session.threshold)
            .field("group_key", &self.group_key)
            .finish()
    }
}

impl KeyShare {
    pub(crate) fn from_parts(
        session: DkgSession,
        device: DeviceId,
        key_package: frost::keys::KeyPackage,
        public: frost::keys::PublicKeyPackage,
    ) -> Result<Self, String> {
        let group_key = group_key_of(public.verifying_key())?;
        let share = Self {
            session,
            device,
            key_package,
            public,
            group_key,
        };
        share.check_consistent()?;
        Ok(share)
    }

    fn check_consistent(&self) -> Result<(), String> {
        let kp = &self.key_package;
        if *kp.identifier() != frost_identifier(&self.device) {
            return Err("identifier does not belong to the device".into());
        }
        if !self.session.members.contains(&self.device) {
            return Err("device is not a member of the session".into());
        }
        if *kp.min_signers() != self.session.threshold {
            return Err("threshold differs from the session's".into());
        }
        if kp.verifying_key() != self.public.verifying_key() {
            return Err("group key differs between key and public packages".into());
        }
        if frost::keys::VerifyingShare::from(*kp.signing_share()) != *kp.verifying_share() {
            return Err("secret share does not match its verifying share".into());
        }
        if self.public.verifying_shares().get(kp.identifier()) != Some(kp.verifying_share()) {
            return Err("verifying share differs from the public package".into());
        }
        if self.public.verifying_shares().len() != self.session.members.len() {
            return Err("public package does not cover every member".into());
        }
        Ok(())
    }

    /// The authority's group key (what genesis / membership facts carry).
    pub fn group_key(&self) -> GroupKey {
        self.group_key
    }

    /// The identity epoch this share serves.
    pub fn identity_epoch(&self) -> u64 {
        self.session.identity_epoch
    }

    /// The device holding this share.
    pub fn device_id(&self) -> DeviceId {
        self.device
    }

    /// The DKG session that produced the share.
    pub fn session(&self) -> &DkgSession {
        &self.session
    }

    /// Signers needed for a signature.
    pub fn threshold(&self) -> u16 {
        self.session.threshold
    }

    /// Sorted member devices.
    pub fn members(&self) -> &[DeviceId] {
        &self.session.members
    }

    /// The public verifying shares every coordinator needs to aggregate.
    pub fn public_shares(&self) -> PublicShares {
        PublicShares::from_frost(self.public.clone(), self.group_key)
    }

    pub(crate) fn key_package(&self) -> &frost::keys::KeyPackage {
        &self.key_package
    }

    /// Where the share of `identity_epoch` lives in `home`.
    pub fn path(home: &Path, identity_epoch: u64) -> PathBuf {
        home.join("frost")
            .join(format!("share-{identity_epoch:08}.cbor"))
    }

    /// The file contents (secret!).
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = to_canonical(&(
            &self.session,
            self.device,
            ByteBuf::from(
                self.key_package
                    .serialize()
                    .expect("a valid key package serializes"),
            ),
            ByteBuf::from(
                self.public
                    .serialize()
                    .expect("a valid public package serializes"),
            ),
        ));
        let checksum = checksum(&body);
        to_canonical(&(SHARE_FORMAT_VERSION, checksum, ByteBuf::from(body)))
    }

    /// Decodes file contents; `path` only labels errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ShareError> {
        let malformed = |reason: String| ShareError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let (version, sum, body): (u64, Hash32, ByteBuf) =
            from_canonical(bytes).map_err(|e| malformed(e.to_string()))?;
        if version != SHARE_FORMAT_VERSION {
            return Err(malformed(format!("unsupported format version {version}")));
        }
        if checksum(&body) != sum {
            return Err(ShareError::Tampered {
                path: path.to_path_buf(),
            });
        }
        let (session, device, kp, public): (DkgSession, DeviceId, ByteBuf, ByteBuf) =
            from_canonical(&body).map_err(|e| malformed(e.to_string()))?;
        let kp = frost::keys::KeyPackage::deserialize(&kp).map_err(|e| malformed(e.to_string()))?;
        let public = frost::keys::PublicKeyPackage::deserialize(&public)
            .map_err(|e| malformed(e.to_string()))?;
        Self::from_parts(session, device, kp, public).map_err(|reason| ShareError::Inconsistent {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Saves the share in `home` (0600, atomic write), replacing an older copy of the same
    /// identity epoch. Returns the path.
    pub fn save(&self, home: &Path) -> Result<PathBuf, ShareError> {
        let path = Self::path(home, self.identity_epoch());
        secret_file::write_atomic(&path, &self.to_bytes())?;
        Ok(path)
    }

    /// Loads the share of `identity_epoch` from `home`.
    pub fn load(home: &Path, identity_epoch: u64) -> Result<Self, ShareError> {
        let path = Self::path(home, identity_epoch);
        let bytes = secret_file::read_private(&path, None)?;
        Self::from_bytes(&bytes, &path)
    }
}

fn checksum(body: &[u8]) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(CHECKSUM_DOMAIN);
    h.update(body);
    h.finalize().into()
}

pub(crate) fn group_key_of(key: &frost::VerifyingKey) -> Result<GroupKey, String> {
    let bytes = key.serialize().map_err(|e| e.to_string())?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "group key is not 32 bytes".to_string())?;
    Ok(GroupKey(arr))
}
