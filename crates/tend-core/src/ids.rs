//! Identifiers and epochs: devices, authorities, contexts, namespaces, hashes and CIDs.

use std::fmt;
use std::str::FromStr;

use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(#[serde(with = "crate::encoding::fixed_bytes")] pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &hex::encode(self.0)[..12])
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseIdError {
                    what: stringify!($name),
                    input: s.chars().take(80).collect(),
                })?;
                Ok(Self(out))
            }
        }
    };
}

/// A string that is not 64 hex digits was given where an id was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: expected 64 hexadecimal digits")]
pub struct ParseIdError {
    what: &'static str,
    input: String,
}

id32!(
    /// A device: its Ed25519 public key, which is also its iroh endpoint id.
    DeviceId
);
id32!(
    /// An authority: the BLAKE3 hash of its genesis, so a genesis certifies its own id.
    AuthorityId
);
id32!(
    /// A context journal shared beyond one authority.
    ContextId
);
id32!(
    /// A BLAKE3 hash.
    Hash32
);
id32!(
    /// The id of a fact, a function of its canonical encoding ([`FactId::of`]).
    FactId
);

impl Hash32 {
    /// BLAKE3 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl FactId {
    /// How many leading bytes of a timed fact's id hold its time.
    const TIME_BYTES: usize = 6;

    /// The id of the fact whose canonical encoding is `bytes` (whether or not they decode):
    /// the BLAKE3 hash of the bytes, except that a timed fact (formats 2 and 3) puts its author's
    /// clock first, as [`FactId::timed`] does. Sync orders items by `(epoch, id)`, so the
    /// facts of an epoch written about the same time are neighbours there, and the facts a
    /// device wrote while cut off are one range of recent ids, not a scatter over the whole
    /// epoch (which costs reconciliation several times the facts' own bytes).
    pub fn of(bytes: &[u8]) -> Self {
        let hash = blake3::hash(bytes);
        match crate::fact::timed_fact_clock(bytes) {
            Some(time_ms) => Self::timed(time_ms, hash.as_bytes()),
            None => Self(*hash.as_bytes()),
        }
    }

    /// The id of a timed fact written at `time_ms` whose bytes hash to `hash`: the time's
    /// low 48 bits, big-endian (milliseconds until the year 10889; later times saturate),
    /// then the first 26 bytes of the hash, which keep 104-bit collision resistance.
    pub fn timed(time_ms: u64, hash: &[u8; 32]) -> Self {
        let time = time_ms.min((1 << (8 * Self::TIME_BYTES)) - 1).to_be_bytes();
        let mut id = [0u8; 32];
        id[..Self::TIME_BYTES].copy_from_slice(&time[8 - Self::TIME_BYTES..]);
        id[Self::TIME_BYTES..].copy_from_slice(&hash[..32 - Self::TIME_BYTES]);
        Self(id)
    }
}

impl From<blake3::Hash> for Hash32 {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

/// Which journal a fact belongs to. Journals of different namespaces never merge.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum JournalNamespace {
    Authority(AuthorityId),
    Context(ContextId),
}

impl JournalNamespace {
    /// The kind byte and id, as encoded on the wire and in store keys.
    pub fn to_bytes(&self) -> [u8; 33] {
        let (kind, id) = match self {
            Self::Authority(a) => (0u8, a.0),
            Self::Context(c) => (1u8, c.0),
        };
        let mut out = [0u8; 33];
        out[0] = kind;
        out[1..].copy_from_slice(&id);
        out
    }

    /// Inverse of [`JournalNamespace::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let id: [u8; 32] = b.get(1..33)?.try_into().ok()?;
        match (b.len(), b[0]) {
            (33, 0) => Some(Self::Authority(AuthorityId(id))),
            (33, 1) => Some(Self::Context(ContextId(id))),
            _ => None,
        }
    }
}

impl fmt::Display for JournalNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Authority(a) => write!(f, "authority:{a}"),
            Self::Context(c) => write!(f, "context:{c}"),
        }
    }
}

impl Serialize for JournalNamespace {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (kind, id) = match self {
            Self::Authority(a) => (0u8, &a.0),
            Self::Context(c) => (1u8, &c.0),
        };
        (kind, serde_bytes::Bytes::new(id)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for JournalNamespace {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, id): (u8, serde_bytes::ByteBuf) = Deserialize::deserialize(d)?;
        let id: [u8; 32] = id
            .as_slice()
            .try_into()
            .map_err(|_| D::Error::custom("namespace id must be 32 bytes"))?;
        match kind {
            0 => Ok(Self::Authority(AuthorityId(id))),
            1 => Ok(Self::Context(ContextId(id))),
            k => Err(D::Error::custom(format!("unknown namespace kind {k}"))),
        }
    }
}

/// A journal epoch. Facts carry the epoch their author was at; snapshots cover every fact
/// below a target epoch.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);

    /// The next epoch, saturating at the maximum.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The epoch pair every maintenance session carries (DESIGN rule 9).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct MaintenanceEpoch {
    /// Advances on every membership change of the authority.
    pub identity_epoch: u64,
    /// The epoch of the latest completed snapshot (0 when there is none).
    pub snapshot_epoch: Epoch,
}

/// A release's protocol version; releases with the same major version interoperate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl ProtocolVersion {
    /// The protocol version this build speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion {
        major: 1,
        minor: 0,
        patch: 2,
    };
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for ProtocolVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid version {s:?}: expected MAJOR.MINOR.PATCH");
        let mut parts = s
            .trim()
            .split('.')
            .map(|p| p.parse::<u16>().map_err(|_| bad()));
        let v = ProtocolVersion {
            major: parts.next().ok_or_else(bad)??,
            minor: parts.next().ok_or_else(bad)??,
            patch: parts.next().ok_or_else(bad)??,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

/// Multicodec for raw bytes.
pub const CODEC_RAW: u64 = 0x55;
/// Multicodec for DAG-CBOR.
pub const CODEC_DAG_CBOR: u64 = 0x71;
/// Multihash code of BLAKE3-256.
pub const MULTIHASH_BLAKE3: u64 = 0x1e;

/// A CIDv1 with a BLAKE3-256 multihash: the address of a blob.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId(cid::Cid);

impl ContentId {
    /// The CID of `bytes` under `codec` ([`CODEC_RAW`] or [`CODEC_DAG_CBOR`]).
    pub fn of(codec: u64, bytes: &[u8]) -> Self {
        let digest = blake3::hash(bytes);
        let mh = multihash::Multihash::<64>::wrap(MULTIHASH_BLAKE3, digest.as_bytes())
            .expect("a 32-byte digest fits a 64-byte multihash");
        Self(cid::Cid::new_v1(codec, mh))
    }

    /// The CID of content under `codec` whose BLAKE3 hash is `hash`, without the content
    /// (e.g. a published artifact, named by its hash).
    pub fn from_blake3(codec: u64, hash: &Hash32) -> Self {
        let mh = multihash::Multihash::<64>::wrap(MULTIHASH_BLAKE3, &hash.0)
            .expect("a 32-byte digest fits a 64-byte multihash");
        Self(cid::Cid::new_v1(codec, mh))
    }

    /// The CID of raw bytes.
    pub fn of_raw(bytes: &[u8]) -> Self {
        Self::of(CODEC_RAW, bytes)
    }

    /// Whether `bytes` hash to this CID.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.0.hash().digest() == blake3::hash(bytes).as_bytes()
    }

    /// The multicodec of the content ([`CODEC_RAW`] or [`CODEC_DAG_CBOR`]).
    pub fn codec(&self) -> u64 {
        self.0.codec()
    }

    /// The binary form (also used as the blob table key).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Parses the binary form, accepting only CIDv1 with a BLAKE3 multihash.
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let c = cid::Cid::try_from(b).map_err(|e| e.to_string())?;
        Self::checked(c)
            .filter(|c| c.to_bytes() == b)
            .ok_or_else(|| "not a tend CID".into())
    }

    fn checked(c: cid::Cid) -> Option<Self> {
        (c.version() == cid::Version::V1
            && c.hash().code() == MULTIHASH_BLAKE3
            && c.hash().size() == 32
            && matches!(c.codec(), CODEC_RAW | CODEC_DAG_CBOR))
        .then_some(Self(c))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.0)
    }
}

impl FromStr for ContentId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let c = cid::Cid::from_str(s.trim()).map_err(|e| format!("invalid CID {s:?}: {e}"))?;
        Self::checked(c).ok_or_else(|| format!("invalid CID {s:?}: not CIDv1 with BLAKE3"))
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_bytes())
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = serde_bytes::ByteBuf::deserialize(d)?;
        Self::from_bytes(&b).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_round_trips_and_matches_content() {
        let c = ContentId::of_raw(b"hello");
        assert!(c.matches(b"hello"));
        assert!(!c.matches(b"hellp"));
        assert_eq!(ContentId::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(c.to_string().parse::<ContentId>().unwrap(), c);
    }

    #[test]
    fn ids_parse_only_hex_of_the_right_length() {
        let d = DeviceId([7; 32]);
        assert_eq!(d.to_string().parse::<DeviceId>().unwrap(), d);
        assert!("abc".parse::<DeviceId>().is_err());
        assert!("zz".repeat(32).parse::<DeviceId>().is_err());
    }

    #[test]
    fn namespace_bytes_round_trip() {
        let ns = JournalNamespace::Context(ContextId([3; 32]));
        assert_eq!(JournalNamespace::from_bytes(&ns.to_bytes()), Some(ns));
        assert_eq!(JournalNamespace::from_bytes(&[9; 33]), None);
        assert_eq!(JournalNamespace::from_bytes(&[0; 3]), None);
    }
}
