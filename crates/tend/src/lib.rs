//! Embed tend in a program: a device of your own, its data, its changes, and its sync with
//! the other devices of its authority.
//!
//! A [`Device`] is a home directory (the device's key and a redb store). The application
//! state on it is made of **collections** (keys to values; concurrent writes resolve to
//! the same winner on every device, the losers shown as conflicts), **logs** (append-only,
//! with stable cursors, trimmed from the front) and a **replicated cache** (entries that
//! an epoch floor invalidates). Every write is a signed fact in the authority's journal;
//! devices of one authority exchange facts until they hold the same set.
//!
//! # The parts
//!
//! - Open: [`Device::create`], [`Device::open`], [`Device::open_or_create`].
//! - Collections: [`Device::put`], [`Device::get`], [`Device::delete`], [`Device::scan`].
//! - Logs: [`Device::log_append`], [`Device::log_read`], [`Device::log_trim`].
//! - Cache: [`Device::cache_put`], [`Device::cache_get`].
//! - Several writes in one transaction: [`Batch`] and [`Device::commit`].
//! - Changes, live: [`Device::subscribe`] from a [`Cursor`] the application saves; after
//!   a restart it continues exactly after the last change it saw.
//! - Sync: [`Device::start`] (with [`SyncOptions`]), [`Device::add_peer`],
//!   [`Device::sync_now`], [`Device::stop`], [`Device::status`].
//! - Several devices: the admin runs [`Device::create_authority`] while each member runs
//!   [`Device::join`] (a FROST key generation over the network).
//!
//! Errors are one enum, [`Error`]; bad input is refused before anything is written.
//!
//! # Example
//!
//! ```
//! use futures_util::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tend::Error> {
//! let home = tempfile::tempdir().unwrap();
//! let device = tend::Device::create(home.path())?;
//! let seen = device.last_cursor()?; // an app would load this from its own storage
//!
//! device.put("todo", "1", b"buy milk")?;
//! device.commit(
//!     tend::Batch::new()
//!         .put("todo", "2", b"call mum")
//!         .append("history", b"added 2"),
//! )?;
//! assert_eq!(device.get("todo", "2")?.unwrap().value, b"call mum");
//! assert_eq!(device.scan("todo", &tend::Scan::new())?.len(), 2);
//!
//! // Every change after `seen`, in the order the device admitted it.
//! let mut changes = Box::pin(device.subscribe(seen));
//! let mut keys = Vec::new();
//! while keys.len() < 2 {
//!     let change = changes.next().await.expect("the feed stays open")?;
//!     if let tend::ChangeKind::Put { key, .. } = change.kind {
//!         keys.push(key);
//!     }
//!     // Save `change.cursor` to resume after this change next time.
//! }
//! assert_eq!(keys, ["1", "2"]);
//! # Ok(()) }
//! ```
//!
//! Two devices that share a to-do list live: `examples/todo.rs`
//! (`cargo run -p tend --example todo`). A subscription that saves its cursor and resumes
//! after a restart: `examples/resume.rs` (`cargo run -p tend --example resume`).
//!
//! # Sync between devices
//!
//! ```no_run
//! # async fn two(a_home: &std::path::Path, b_home: &std::path::Path) -> Result<(), tend::Error> {
//! use std::time::Duration;
//! let a = tend::Device::create(a_home)?;
//! let b = tend::Device::create(b_home)?;
//! let a_addr = a.start(tend::SyncOptions::new()).await?;
//! let b_addr = b.start(tend::SyncOptions::new()).await?;
//! a.add_peer(b_addr)?;
//! b.add_peer(a_addr)?; // b accepts key generation from its peers
//! // `a` is the admin of its own authority: it makes a 2-of-2 authority of a and b.
//! let others = [b.id()];
//! let (made, joined) = tokio::join!(
//!     a.create_authority(2, &others),
//!     b.join(a_addr, Duration::from_secs(30)),
//! );
//! assert_eq!(made?, joined?);
//! a.put("todo", "1", b"buy milk")?;
//! b.sync_now().await?; // or wait for the next round
//! assert!(b.get("todo", "1")?.is_some());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod changes;
mod data;
mod device;
mod error;

pub use changes::{Change, ChangeKind, Cursor, ParseCursorError, PutValue};
pub use data::{Batch, CacheEntry, Entry, LogCursor, LogEntry, Scan, Version, Written};
pub use device::{Authority, Device, PeerStatus, Status, SyncOptions, SyncReport};
pub use error::{Error, Result};
pub use tend_core::DeviceId;
pub use tend_node::PeerAddr;
