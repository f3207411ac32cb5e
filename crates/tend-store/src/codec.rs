//! On-disk layout of facts: compact index keys and values that drop what the key already says.
//!
//! Key (44 bytes, compared as bytes): `namespace number (u32 BE) | epoch (u64 BE) | fact id`,
//! so a namespace's facts are contiguous and sorted by `(epoch, id)`.
//!
//! Value: `author number (LEB128) | payload tag (LEB128) | signature (64) | payload body`,
//! and for a timed fact (format 2 or 3) `(format - 1) * 2^32 + author number (LEB128) |
//! time (LEB128) | ...`: author numbers are `u32`, so a first number of 2^32 or more marks
//! the format without changing the values stores already hold.
//! The namespace and epoch live in the key and the 32-byte author key in a dictionary, so
//! none of them is repeated per fact. The canonical wire bytes are rebuilt on read (their
//! layout is fixed: `[1, [kind, ns-id], epoch, author, tag, body, signature]`, or
//! `[format, time, [kind, ns-id], ...]`), and the rebuilt bytes are checked against the fact id,
//! so a damaged record is detected on every read.

use tend_core::{DeviceId, Epoch, FactFormat, FactId, JournalNamespace, VerifiedFact};

/// A value's first number is `(format - 1) * FORMAT_MARK + author number`.
const FORMAT_MARK: u64 = 1 << 32;

/// Length of a fact index key.
pub(crate) const KEY_LEN: usize = 44;
/// A fact index key.
pub(crate) type FactKey = [u8; KEY_LEN];

/// The key of a fact in the facts (and maintenance) table.
pub(crate) fn fact_key(ns_no: u32, epoch: Epoch, id: &FactId) -> FactKey {
    let mut k = [0u8; KEY_LEN];
    k[..4].copy_from_slice(&ns_no.to_be_bytes());
    k[4..12].copy_from_slice(&epoch.0.to_be_bytes());
    k[12..].copy_from_slice(&id.0);
    k
}

/// The smallest key of `(ns_no, epoch)`.
pub(crate) fn epoch_start(ns_no: u32, epoch: Epoch) -> FactKey {
    fact_key(ns_no, epoch, &FactId([0; 32]))
}

/// The key range of a namespace's facts with `lo <= epoch < hi` (`hi` = `None`: unbounded).
pub(crate) fn epoch_range(ns_no: u32, lo: Epoch, hi: Option<Epoch>) -> (FactKey, Option<FactKey>) {
    let start = epoch_start(ns_no, lo);
    let end = match hi {
        Some(hi) => Some(epoch_start(ns_no, hi)),
        None => ns_no.checked_add(1).map(|n| epoch_start(n, Epoch::ZERO)),
    };
    (start, end)
}

/// Splits a key into `(namespace number, epoch, id)`.
pub(crate) fn split_key(k: &FactKey) -> (u32, Epoch, FactId) {
    let mut ns = [0u8; 4];
    ns.copy_from_slice(&k[..4]);
    let mut e = [0u8; 8];
    e.copy_from_slice(&k[4..12]);
    let mut id = [0u8; 32];
    id.copy_from_slice(&k[12..]);
    (
        u32::from_be_bytes(ns),
        Epoch(u64::from_be_bytes(e)),
        FactId(id),
    )
}

/// The parts of a canonical fact that the value stores.
pub(crate) struct WireParts<'a> {
    pub format: FactFormat,
    pub author: [u8; 32],
    pub tag: u64,
    pub body: &'a [u8],
    pub signature: &'a [u8],
}

/// Reads the fixed wire layout of a canonical fact. Returns `None` if the bytes do not have
/// it (which a `VerifiedFact` always has; the caller treats `None` as a bug, not as input).
pub(crate) fn parse_wire(bytes: &[u8]) -> Option<WireParts<'_>> {
    let mut r = Reader { b: bytes, pos: 0 };
    let format = match (r.head(4)?, r.head(0)?) {
        (7, 1) => FactFormat::Untimed,
        (8, version @ 2..) => FactFormat::from_version(version, r.head(0)?)?,
        _ => return None,
    };
    if r.head(4)? != 2 {
        return None;
    }
    let _kind = r.head(0)?;
    let _ns_id = r.bytes()?;
    let _epoch = r.head(0)?;
    let author: [u8; 32] = r.bytes()?.try_into().ok()?;
    let tag = r.head(0)?;
    let body = r.bytes()?;
    let signature = r.bytes()?;
    (signature.len() == 64 && r.pos == bytes.len()).then_some(WireParts {
        format,
        author,
        tag,
        body,
        signature,
    })
}

/// Encodes the stored value of a fact whose author has dictionary number `author_no`.
pub(crate) fn encode_value(author_no: u32, parts: &WireParts<'_>) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + 64 + parts.body.len());
    let mark = (parts.format.version() - 1) * FORMAT_MARK;
    put_varint(&mut v, mark + u64::from(author_no));
    if let Some(t) = parts.format.time_ms() {
        put_varint(&mut v, t);
    }
    put_varint(&mut v, parts.tag);
    v.extend_from_slice(parts.signature);
    v.extend_from_slice(parts.body);
    v
}

/// A stored value, split but not yet rebuilt.
pub(crate) struct StoredValue<'a> {
    pub author_no: u32,
    pub format: FactFormat,
    pub tag: u64,
    pub signature: &'a [u8],
    pub body: &'a [u8],
}

/// Splits a stored value; `None` if it is malformed.
pub(crate) fn decode_value(v: &[u8]) -> Option<StoredValue<'_>> {
    let mut pos = 0;
    let first = get_varint(v, &mut pos)?;
    let author_no = u32::try_from(first % FORMAT_MARK).ok()?;
    let format = match first / FORMAT_MARK {
        0 => FactFormat::Untimed,
        mark => FactFormat::from_version(mark + 1, get_varint(v, &mut pos)?)?,
    };
    let tag = get_varint(v, &mut pos)?;
    let signature = v.get(pos..pos + 64)?;
    let body = v.get(pos + 64..)?;
    Some(StoredValue {
        author_no,
        format,
        tag,
        signature,
        body,
    })
}

/// Rebuilds the canonical wire bytes of a fact.
pub(crate) fn rebuild_wire(
    ns: &JournalNamespace,
    epoch: Epoch,
    author: &DeviceId,
    v: &StoredValue<'_>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(120 + v.body.len());
    let ns_bytes = ns.to_bytes();
    match v.format.time_ms() {
        None => {
            put_head(&mut out, 4, 7);
            put_head(&mut out, 0, v.format.version());
        }
        Some(t) => {
            put_head(&mut out, 4, 8);
            put_head(&mut out, 0, v.format.version());
            put_head(&mut out, 0, t);
        }
    }
    put_head(&mut out, 4, 2);
    put_head(&mut out, 0, u64::from(ns_bytes[0]));
    put_bytes(&mut out, &ns_bytes[1..]);
    put_head(&mut out, 0, epoch.0);
    put_bytes(&mut out, &author.0);
    put_head(&mut out, 0, v.tag);
    put_bytes(&mut out, v.body);
    put_bytes(&mut out, v.signature);
    out
}

/// Builds the stored value of a verified fact and checks that it rebuilds to the same bytes.
/// Returns `None` only if the fact's encoding is not the fixed layout (a bug in tend-core or
/// here, never a property of the input, since `VerifiedFact` is canonical).
pub(crate) fn value_of(f: &VerifiedFact, author_no: u32) -> Option<Vec<u8>> {
    let parts = parse_wire(f.bytes())?;
    if parts.author != f.author().0 {
        return None;
    }
    let value = encode_value(author_no, &parts);
    let sv = decode_value(&value)?;
    (rebuild_wire(&f.namespace(), f.epoch(), &f.author(), &sv) == f.bytes()).then_some(value)
}

fn put_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u64::from(u8::MAX) {
        out.push(m | 24);
        out.push(n as u8);
    } else if n <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Appends `b` as a CBOR byte string.
pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads a head of the given major type and returns its argument.
    fn head(&mut self, major: u8) -> Option<u64> {
        let first = *self.b.get(self.pos)?;
        if first >> 5 != major {
            return None;
        }
        self.pos += 1;
        let info = first & 0x1f;
        let n = match info {
            0..=23 => return Some(u64::from(info)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return None,
        };
        let raw = self.b.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(raw.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.head(2)?).ok()?;
        let out = self.b.get(self.pos..self.pos.checked_add(len)?)?;
        self.pos += len;
        Some(out)
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_core::{ContextId, Payload, UnsignedFact};

    #[test]
    fn values_rebuild_to_the_canonical_bytes() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        for (epoch, len) in [
            (0u64, 0usize),
            (23, 1),
            (24, 64),
            (300, 300),
            (u64::MAX, 70_000),
        ] {
            let times = [0, 24, 1_765_000_000_000, u64::MAX];
            let formats = std::iter::once(FactFormat::Untimed).chain(times.iter().flat_map(|&t| {
                [
                    FactFormat::Timed { time_ms: t },
                    FactFormat::TimedZip215 { time_ms: t },
                ]
            }));
            for format in formats {
                let f = UnsignedFact {
                    namespace: JournalNamespace::Context(ContextId([9; 32])),
                    epoch: Epoch(epoch),
                    payload: Payload::Application {
                        kind: "k".into(),
                        data: vec![7; len.min(60_000)],
                    },
                }
                .sign_with(&key, format);
                for author_no in [0, 300, u32::MAX] {
                    let v = value_of(&f, author_no).expect("layout");
                    let sv = decode_value(&v).unwrap();
                    assert_eq!((sv.author_no, sv.format), (author_no, format));
                    assert_eq!(
                        rebuild_wire(&f.namespace(), f.epoch(), &f.author(), &sv),
                        f.bytes()
                    );
                }
            }
        }
    }

    #[test]
    fn keys_sort_by_namespace_epoch_id() {
        let a = fact_key(1, Epoch(2), &FactId([9; 32]));
        let b = fact_key(1, Epoch(3), &FactId([0; 32]));
        let c = fact_key(2, Epoch(0), &FactId([0; 32]));
        assert!(a < b && b < c);
        assert_eq!(split_key(&a), (1, Epoch(2), FactId([9; 32])));
        assert_eq!(
            epoch_range(1, Epoch(0), None).1,
            Some(epoch_start(2, Epoch::ZERO))
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(decode_value(&[]).is_none());
        assert!(decode_value(&[0x80; 20]).is_none());
        assert!(decode_value(&[1, 1, 0]).is_none());
    }
}
