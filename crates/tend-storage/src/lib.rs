//! The storage peer of an authority's encrypted blobs (issue 18, docs/ARCHITECTURE.md
//! section 14): a process that is not a member, admitted by an admin-signed grant, that
//! stores and serves blobs encrypted with `tend-vault` and re-encrypts their sealed keys when
//! the identity epoch advances, without ever holding a key that opens them.
//!
//! - [`protocol`]: the `tend/vault/1` requests and answers.
//! - [`rules`]: which pushed facts, peers and blobs the storage peer admits (sans-IO).
//! - [`store`]: its redb file.
//! - [`peer`]: [`StoragePeer`], the rules over the store, one request at a time.
//! - [`member`]: a member's side: the admin's epoch key facts, opening the ring, sealing a
//!   blob for the peer and opening what it returns.

pub mod error;
pub mod member;
pub mod peer;
pub mod protocol;
pub mod rules;
pub mod store;

pub use error::StorageError;
pub use peer::{RekeyReport, StoragePeer};
pub use protocol::{Request, Response, VAULT_ALPN};
pub use rules::{is_for_storage_peer, PeerRules};
pub use store::VaultStore;
