//! Subscriptions: every fact the device admits (its own writes and what sync brings), in
//! admission order, decoded for the application, from a cursor that survives restarts.
//!
//! Built on the store's changes feed (`tend_store::changes`): a sequence number per
//! admitted fact, never reused. The stream reads pages of the feed and, once caught up,
//! sleeps on a `watch` channel that the store's `on_change` listener raises after each
//! commit, so it wakes when there is something to read and never polls.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::stream::Stream;
use serde::{Deserialize, Serialize};
use tend_core::app::{LogCursor, Value};
use tend_core::{DataOp, DeviceId, Payload};
use tend_store::Change as FeedEntry;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Entries read from the store at a time by one subscription.
const PAGE: usize = 256;

/// A position in the device's changes feed: "everything up to here has been seen".
///
/// A plain number the application may store anywhere (it is `Copy`, prints and parses as
/// a decimal, and serialises as one): a subscription from a cursor yields exactly the
/// changes after it, also after the device was closed and opened again.
///
/// ```
/// let saved: tend::Cursor = "42".parse().unwrap();
/// assert_eq!(saved.to_string(), "42");
/// assert_eq!(tend::Cursor::START.as_u64(), 0);
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cursor(u64);

impl Cursor {
    /// Before the first change: a subscription from here yields everything the device
    /// holds.
    pub const START: Cursor = Cursor(0);

    /// A cursor from its number (as stored by the application).
    pub fn from_u64(n: u64) -> Self {
        Cursor(n)
    }

    /// The cursor's number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a string is not a [`Cursor`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a cursor is a whole number, not {0:?}")]
pub struct ParseCursorError(String);

impl FromStr for Cursor {
    type Err = ParseCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse()
            .map(Cursor)
            .map_err(|_| ParseCursorError(s.chars().take(40).collect()))
    }
}

/// One change: a fact the device admitted, with what it did to the application state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Where this change is in the feed: save it, and subscribe from it to continue after
    /// this change.
    pub cursor: Cursor,
    /// The device that wrote the fact (this device for local writes).
    pub author: DeviceId,
    /// The epoch the fact was signed at.
    pub epoch: u64,
    /// The fact's id (hex); for a put, the value's version.
    pub id: String,
    /// What the fact does.
    pub kind: ChangeKind,
}

/// What a change does to the application state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ChangeKind {
    /// A value was written. It is what the key reads as unless a concurrent write wins
    /// (read the key to know; see the merge rule in docs/ARCHITECTURE.md, section 4a).
    Put {
        /// The collection.
        collection: String,
        /// The key.
        key: String,
        /// The value written.
        value: PutValue,
    },
    /// A key was deleted.
    Delete {
        /// The collection.
        collection: String,
        /// The key.
        key: String,
    },
    /// An entry was appended to a log.
    Append {
        /// The log.
        log: String,
        /// The entry's cursor in its log.
        entry: LogCursor,
        /// The entry's bytes.
        data: Vec<u8>,
    },
    /// A log was trimmed: its entries below `before` are gone.
    Trim {
        /// The log.
        log: String,
        /// The trim's cursor.
        before: LogCursor,
    },
    /// A replicated cache entry was written.
    CachePut {
        /// The cache key.
        key: String,
        /// The cached bytes.
        value: Vec<u8>,
    },
    /// A fact of tend's own (membership, snapshots, upgrades, ...), named by its kind.
    Other {
        /// The fact's kind, e.g. `snapshot_completed`.
        kind: String,
    },
}

/// The value of a [`ChangeKind::Put`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutValue {
    /// The bytes themselves (values up to 16 KiB).
    Bytes(Vec<u8>),
    /// A large value, stored as a blob: read it with [`crate::Device::get`] (sync may
    /// still be fetching it).
    Large {
        /// The blob's content id.
        cid: String,
        /// Its length in bytes.
        len: u64,
    },
}

/// The change of a feed entry, or `None` when its fact is no longer stored (pruned or
/// retracted since it was admitted).
fn decode(device: &tend_node::Device, entry: &FeedEntry) -> Result<Option<Change>> {
    let Some(stored) = device
        .store()
        .get(entry.namespace, entry.epoch, &entry.id)?
    else {
        return Ok(None);
    };
    let (author, payload) = stored
        .author_payload()
        .map_err(|e| Error::Corrupt(format!("stored fact {}: {e}", entry.id)))?;
    let kind = match payload {
        // Entries written before logs had clocks (`tend fact add`) are entries of log
        // `kind` with clock 0.
        Payload::Application { kind, data } => ChangeKind::Append {
            log: kind,
            entry: LogCursor {
                epoch: entry.epoch,
                seq: 0,
                id: entry.id,
            },
            data,
        },
        Payload::Data(DataOp::Append(a)) => ChangeKind::Append {
            log: a.log,
            entry: LogCursor {
                epoch: entry.epoch,
                seq: a.seq,
                id: entry.id,
            },
            data: a.data.into_vec(),
        },
        Payload::Data(DataOp::Put(p)) => ChangeKind::Put {
            collection: p.collection,
            key: p.key,
            value: match p.value {
                Value::Inline(b) => PutValue::Bytes(b.into_vec()),
                Value::Blob { cid, len } => PutValue::Large {
                    cid: cid.to_string(),
                    len,
                },
            },
        },
        Payload::Data(DataOp::Delete(d)) => ChangeKind::Delete {
            collection: d.collection,
            key: d.key,
        },
        Payload::Data(DataOp::Trim(t)) => ChangeKind::Trim {
            log: t.log,
            before: t.before,
        },
        Payload::Data(DataOp::CachePut(c)) => ChangeKind::CachePut {
            key: c.key,
            value: c.value.into_vec(),
        },
        other => ChangeKind::Other {
            kind: other.kind_name(),
        },
    };
    Ok(Some(Change {
        cursor: Cursor(entry.seq),
        author,
        epoch: entry.epoch.0,
        id: entry.id.to_string(),
        kind,
    }))
}

/// The changes after `cursor` (one page of the feed, decoded), and where the page ends.
///
/// `known` is a cursor the store had reported as committed before this read began: when
/// the feed holds nothing after `cursor`, the page ends there (its entries were pruned),
/// so a reader never waits again for changes that will not come back.
fn page(device: &tend_node::Device, cursor: u64, known: u64) -> Result<(Vec<Change>, u64)> {
    let entries = device.store().changes_since(cursor, PAGE)?;
    let Some(last) = entries.last().map(|e| e.seq) else {
        return Ok((Vec::new(), cursor.max(known)));
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in &entries {
        if let Some(c) = decode(device, e)? {
            out.push(c);
        }
    }
    Ok((out, last))
}

/// Counts the live subscriptions of a device (so [`crate::Device::stop`] can tell the
/// subscriptions' hold on the store from the stopped node's).
#[derive(Clone, Default)]
pub(crate) struct Subscriptions(Arc<AtomicUsize>);

impl Subscriptions {
    pub(crate) fn live(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One live subscription; counted from before it holds the device until it is dropped.
struct Counted(Subscriptions);

impl Counted {
    fn new(s: &Subscriptions) -> Self {
        s.0.fetch_add(1, Ordering::SeqCst);
        Counted(s.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Feed {
    _counted: Counted,
    device: Arc<tend_node::Device>,
    cursor: u64,
    newest: watch::Receiver<u64>,
    pending: VecDeque<Change>,
    failed: bool,
}

/// The stream of changes after `from` (see [`crate::Device::subscribe`]).
pub(crate) fn subscribe(
    subscriptions: &Subscriptions,
    device: &Arc<tend_node::Device>,
    newest: watch::Receiver<u64>,
    from: Cursor,
) -> impl Stream<Item = Result<Change>> + Send + 'static {
    let feed = Feed {
        _counted: Counted::new(subscriptions),
        device: device.clone(),
        cursor: from.0,
        newest,
        pending: VecDeque::new(),
        failed: false,
    };
    futures_util::stream::unfold(feed, |mut f| async move {
        loop {
            if let Some(c) = f.pending.pop_front() {
                return Some((Ok(c), f));
            }
            if f.failed {
                return None;
            }
            let known = *f.newest.borrow_and_update();
            if known <= f.cursor {
                // Caught up: sleep until a commit raises the mark. The store raises it
                // after every commit, so a commit the last read missed already has.
                let cursor = f.cursor;
                if f.newest.wait_for(|&n| n > cursor).await.is_err() {
                    return None;
                }
                continue;
            }
            let device = f.device.clone();
            let cursor = f.cursor;
            let read = tokio::task::spawn_blocking(move || page(&device, cursor, known)).await;
            match read.map_err(Error::from).and_then(|r| r) {
                Ok((changes, end)) => {
                    f.cursor = end;
                    f.pending.extend(changes);
                }
                Err(e) => {
                    // The error ends the stream: the application resubscribes from the
                    // last cursor it saw.
                    f.failed = true;
                    return Some((Err(e), f));
                }
            }
        }
    })
}
