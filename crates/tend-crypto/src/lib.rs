//! Key material of tend: Ed25519 device keys and FROST Ed25519 threshold keys.
//!
//! - [`device`]: a device's own Ed25519 key, saved in its home directory with 0600 permissions.
//! - [`dkg`]: distributed key generation among member devices (no trusted dealer), as a
//!   sans-IO participant state machine whose messages are bytes.
//! - [`share`]: the resulting key share of one device, and its persistence.
//! - [`sign`]: the two FROST signing rounds, aggregation and verification against the
//!   authority's [`tend_core::GroupKey`].
//! - [`secret_file`]: atomic, owner-only files for secrets.
//!
//! Randomness always comes in as an argument (`&mut impl RngCore + CryptoRng`), so tests can
//! seed it.

pub mod device;
pub mod dkg;
pub mod secret_file;
pub mod share;
pub mod sign;

pub use device::DeviceKey;
pub use dkg::{
    frost_identifier, run_in_memory, DkgAction, DkgError, DkgMessage, DkgParticipant, DkgRound,
    DkgSession,
};
pub use secret_file::KeyFileError;
pub use share::{KeyShare, ShareError};
pub use sign::{
    aggregate, commit, sign_share, verify, Commitment, PublicShares, SignError, SignatureShare,
    SigningNonces,
};
