//! The application data operations (payload tags 2 to 5): `Put`, `Delete`, `Trim` and
//! `CachePut`, their values, the limits a writer respects, and log cursors. What they mean
//! together is `crate::app`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ids::{ContentId, Epoch, FactId};

/// Longest collection, log or cache-key name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest key in a collection, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Values up to this size travel inside the fact; larger ones are blobs named by CID.
pub const INLINE_VALUE_MAX: usize = 16 * 1024;
/// Largest log entry, in bytes (a fact holds at most 64 KiB with its envelope).
pub const MAX_ENTRY_BYTES: usize = 63 * 1024;
/// Most heads one write may supersede (more means a runaway conflict; the writer merges
/// them in a first write).
pub const MAX_SUPERSEDES: usize = 256;

/// A value: inline bytes, or a blob in the blob store (fetched over `tend/blob/1`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Value {
    Inline(ByteBuf),
    Blob { cid: ContentId, len: u64 },
}

impl Value {
    /// The blob a value names, if it is large.
    pub fn blob(&self) -> Option<ContentId> {
        match self {
            Value::Blob { cid, .. } => Some(*cid),
            Value::Inline(_) => None,
        }
    }

    /// The value's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Value::Inline(b) => b.len() as u64,
            Value::Blob { len, .. } => *len,
        }
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `put(collection, key, value)`, superseding the heads its author saw.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Put {
    pub collection: String,
    pub key: String,
    pub value: Value,
    pub supersedes: Vec<FactId>,
}

/// `delete(collection, key)`, superseding the heads its author saw.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delete {
    pub collection: String,
    pub key: String,
    pub supersedes: Vec<FactId>,
}

/// An entry appended to a log. `seq` is a Lamport clock: one more than the highest `seq` the
/// author has seen in the log, so a device's appends keep their order, and an append that
/// saw another sorts after it (see [`LogCursor`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Append {
    pub log: String,
    pub seq: u64,
    pub data: ByteBuf,
}

/// `trim(log, before)`: entries below the cursor are gone.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trim {
    pub log: String,
    pub before: LogCursor,
}

/// A replicated cache entry: valid while its fact's epoch (the epoch it was computed at)
/// is above the key's floor from `CacheInvalidated` facts.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePut {
    pub key: String,
    pub value: ByteBuf,
    pub supersedes: Vec<FactId>,
}

/// The data operations (payload tags 2 to 6).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum DataOp {
    Put(Put),
    Delete(Delete),
    Trim(Trim),
    CachePut(CachePut),
    Append(Append),
}

/// Why a name, key or value may not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} must not contain control characters")]
    ControlCharacter { what: &'static str },
    #[error("a write supersedes {0} heads, the limit is {MAX_SUPERSEDES}")]
    TooManySupersedes(usize),
    #[error("an inline value is {0} bytes, the limit is {INLINE_VALUE_MAX}: store it as a blob")]
    InlineTooLarge(usize),
    #[error("not a log cursor (expected EPOCH-SEQ-FACTID, e.g. 3-12-9f2c...): {0}")]
    BadCursor(String),
}

/// Checks a collection, log or cache-key name.
pub fn check_name(what: &'static str, name: &str) -> Result<(), DataError> {
    check_text(what, name, MAX_NAME_BYTES)
}

/// Checks a key of a collection.
pub fn check_key(key: &str) -> Result<(), DataError> {
    check_text("key", key, MAX_KEY_BYTES)
}

fn check_text(what: &'static str, s: &str, max: usize) -> Result<(), DataError> {
    if s.is_empty() {
        return Err(DataError::Empty { what });
    }
    if s.len() > max {
        return Err(DataError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(DataError::ControlCharacter { what });
    }
    Ok(())
}

impl DataOp {
    /// Checks the limits a writer must respect (readers fold whatever verified).
    pub fn check(&self) -> Result<(), DataError> {
        let supersedes = match self {
            DataOp::Put(p) => {
                check_name("collection name", &p.collection)?;
                check_key(&p.key)?;
                if let Value::Inline(b) = &p.value {
                    if b.len() > INLINE_VALUE_MAX {
                        return Err(DataError::InlineTooLarge(b.len()));
                    }
                }
                p.supersedes.len()
            }
            DataOp::Delete(d) => {
                check_name("collection name", &d.collection)?;
                check_key(&d.key)?;
                d.supersedes.len()
            }
            DataOp::Trim(t) => {
                check_name("log name", &t.log)?;
                0
            }
            DataOp::Append(a) => {
                check_name("log name", &a.log)?;
                if a.data.len() > MAX_ENTRY_BYTES {
                    return Err(DataError::TooLong {
                        what: "log entry",
                        len: a.data.len(),
                        max: MAX_ENTRY_BYTES,
                    });
                }
                0
            }
            DataOp::CachePut(c) => {
                check_name("cache key", &c.key)?;
                if c.value.len() > INLINE_VALUE_MAX {
                    return Err(DataError::InlineTooLarge(c.value.len()));
                }
                c.supersedes.len()
            }
        };
        if supersedes > MAX_SUPERSEDES {
            return Err(DataError::TooManySupersedes(supersedes));
        }
        Ok(())
    }
}

/// A log entry's stable cursor, and the order of a log: `(epoch, seq, fact id)`, printed
/// `EPOCH-SEQ-HEXID`. Epochs only grow along causality and `seq` is a Lamport clock within
/// the log, so an entry sorts after every entry its author had seen; concurrent entries
/// sort by `seq`, then by id, the same on every device. Entries written as
/// `Payload::Application` (tag 1, `tend fact add`) have `seq` 0.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct LogCursor {
    pub epoch: Epoch,
    pub seq: u64,
    pub id: FactId,
}

impl fmt::Display for LogCursor {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.epoch.0,
            self.seq,
            hex::encode(self.id.0)
        )
    }
}

impl FromStr for LogCursor {
    type Err = DataError;

    /// ```
    /// use tend_core::app::LogCursor;
    /// let c: LogCursor = format!("7-3-{}", "ab".repeat(32)).parse().unwrap();
    /// assert_eq!((c.epoch.0, c.seq), (7, 3));
    /// assert!("7-3-xyz".parse::<LogCursor>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, DataError> {
        let bad = || DataError::BadCursor(s.chars().take(100).collect());
        let mut parts = s.splitn(3, '-');
        let (Some(epoch), Some(seq), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let epoch = epoch.parse::<u64>().map_err(|_| bad())?;
        let seq = seq.parse::<u64>().map_err(|_| bad())?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(id, &mut bytes).map_err(|_| bad())?;
        Ok(Self {
            epoch: Epoch(epoch),
            seq,
            id: FactId(bytes),
        })
    }
}
